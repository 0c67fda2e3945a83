//! `wasnap conformance`: runs the conformance suite against a backend and reports.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use wasnap::config::DriverConfig;
use wasnap::error::{Context, Error, Result};
use wasnap_conformance::{Options, StackFactory, cases};

use crate::global::Global;
use crate::output::{Format, table};

/// Options of `wasnap conformance`.
#[derive(Debug, Args)]
pub struct ConformanceArgs {
    /// List the cases instead of running them
    #[arg(long)]
    pub list: bool,
    /// Run only cases whose name contains PATTERN (case-insensitive; repeatable)
    #[arg(long = "run", value_name = "PATTERN")]
    pub patterns: Vec<String>,
    /// Cases run at once [default: the number of CPUs]
    #[arg(long, short = 'j')]
    pub jobs: Option<usize>,
    /// Where each case's temporary directory goes [default: /dev/shm if present]
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Labels a policy in the stack sets (a key, or a prefix ending in `*`;
    /// repeatable): left out of what the stack returns before the suite compares it
    #[arg(long = "ignore-label", value_name = "PATTERN")]
    pub ignore_labels: Vec<String>,
}

/// What `-s`, `--config`, `--plugin` and `--policy` select: the configured stack,
/// with its driver options and policies, opened for each case by the code that opens
/// it in a host.
fn factory(g: &Global) -> Result<StackFactory> {
    let (config, selected) = g.config()?;
    let s = config.snapshotters.get(&selected).ok_or_else(|| {
        Error::invalid_argument(format!(
            "snapshotter {selected:?} is not configured ({})",
            config.snapshotters.keys().cloned().collect::<Vec<_>>().join(", ")
        ))
    })?;
    Ok(StackFactory::new(s.clone()))
}

/// Runs (or lists) the suite against the configured stack; fails if any case failed.
pub fn run(args: &ConformanceArgs, g: &Global, out: &mut dyn Write) -> Result<()> {
    run_on(args, g.format, || factory(g), out)
}

/// Runs (or lists) the suite against the stack `factory` makes.
pub fn run_on(
    args: &ConformanceArgs,
    format: Format,
    factory: impl FnOnce() -> Result<StackFactory>,
    out: &mut dyn Write,
) -> Result<()> {
    let io = |e: std::io::Error| Error::from(e).context("write report");
    let all = cases::all();
    let mut opts = Options { patterns: args.patterns.clone(), ..Options::default() };
    if let Some(j) = args.jobs {
        opts.jobs = j.max(1);
    }
    if let Some(d) = &args.dir {
        opts.base = d.clone();
    }
    let selected: Vec<_> = all.iter().filter(|c| opts.selects(c)).copied().collect();
    if selected.is_empty() {
        return Err(Error::invalid_argument(format!(
            "no case matches {:?} (see --list)",
            args.patterns
        )));
    }
    if args.list {
        return match format {
            Format::Json => {
                let v: Vec<serde_json::Value> = selected
                    .iter()
                    .map(
                        |c| serde_json::json!({"name": c.name, "suite": c.group, "about": c.about}),
                    )
                    .collect();
                serde_json::to_writer_pretty(&mut *out, &v).with_context(|| "encode JSON")?;
                writeln!(out).map_err(io)
            }
            _ => {
                let rows: Vec<Vec<String>> = selected
                    .iter()
                    .map(|c| {
                        vec![c.name.to_owned(), c.group.as_str().to_owned(), c.about.to_owned()]
                    })
                    .collect();
                table(out, &["CASE", "SUITE", "CHECKS"], &rows)
            }
        };
    }
    let factory = factory()?.ignoring_labels(args.ignore_labels.clone());
    let btrfs = matches!(factory.config().driver, DriverConfig::Btrfs);
    // The btrfs driver needs its directory on btrfs: without one, make a scratch btrfs
    // on a loop device for the run (its image on the real disk), and remove it after.
    let _scratch = if btrfs && !wasnap::probe::is_btrfs(&opts.base) {
        let fs = wasnap_conformance::loopfs::LoopBtrfs::try_new(2048, &std::env::temp_dir()).map_err(|why| {
            Error::failed_precondition(format!(
                "{} is not on btrfs and no scratch btrfs could be made ({why}); pass --dir on a btrfs filesystem",
                opts.base.display()
            ))
        })?;
        tracing::info!(device = %fs.device, "running on a scratch btrfs");
        opts.base = fs.mountpoint.clone();
        Some(fs)
    } else {
        None
    };
    let report = wasnap_conformance::run(&factory, &selected, &opts);
    match format {
        Format::Table => report.write_table(out),
        Format::Json => report.write_json(out),
        Format::Junit => report.write_junit(out),
    }
    .map_err(io)?;
    match report.failed() {
        0 => Ok(()),
        n => Err(Error::failed_precondition(format!(
            "{n} of {} conformance cases failed against {}",
            report.results.len(),
            report.backend
        ))),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use wasnap::driver::overlay::OverlayOptions;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        global: Global,
    }

    /// The suite runs the stack the configuration describes, driver options included
    /// (it once ran a default overlay whatever the file said).
    #[test]
    fn configured_overlay_options_and_policies_reach_the_suite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wasnap.toml");
        std::fs::write(
            &path,
            r#"
default_snapshotter = "fast"
[snapshotters.fast]
driver = "overlay"
volatile = true
async_remove = true
index_off = false

[[snapshotters.fast.policies]]
path = "/opt/policy.wasm"
"#,
        )
        .unwrap();
        let cli = Cli::parse_from(["wasnap", "--config", path.to_str().unwrap()]);
        let stack = factory(&cli.global).unwrap();
        let config = stack.config();
        let DriverConfig::Overlay(opts) = &config.driver else {
            panic!("expected the overlay driver, got {:?}", config.driver)
        };
        assert_eq!(
            *opts,
            OverlayOptions {
                volatile: true,
                async_remove: true,
                index_off: false,
                ..Default::default()
            }
        );
        assert_eq!(config.policies.len(), 1);
        assert_eq!(config.policies[0].path, PathBuf::from("/opt/policy.wasm"));

        let cli = Cli::parse_from(["wasnap", "--config", path.to_str().unwrap(), "-s", "nope"]);
        let err = factory(&cli.global).unwrap_err();
        assert!(err.to_string().contains("\"nope\""), "{err}");
    }
}
