//! `wasnap conformance`: runs the conformance suite against a backend and reports.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;
use wasnap::Snapshotter;
use wasnap::driver::overlay::OverlayOptions;
use wasnap::driver::{Btrfs, Native, Overlay};
use wasnap::error::{Error, Result};
use wasnap::fault::Faults;
use wasnap::host::{DriverConfig, PluginConfig};
use wasnap_conformance::{Backend, Factory, Layer, Options, PluginFactory, cases};

use crate::cli::Global;
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
}

/// The backends the suite can check, by the name `-s/--driver` gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Driver {
    Native,
    Overlay,
    Btrfs,
}

impl Driver {
    fn from_name(name: &str) -> Result<Self> {
        match name {
            "native" => Ok(Driver::Native),
            "overlay" => Ok(Driver::Overlay),
            "btrfs" => Ok(Driver::Btrfs),
            other => Err(Error::InvalidArgument(format!(
                "conformance checks the drivers native, overlay and btrfs; {other:?} is none of them"
            ))),
        }
    }
}

/// Opens one of wasnap's own drivers in each case's directory.
struct DriverFactory(Driver);

impl Factory for DriverFactory {
    fn name(&self) -> String {
        format!("{:?}", self.0).to_lowercase()
    }
    fn open(&self, dir: &Path) -> Result<Arc<dyn Snapshotter>> {
        let cap = cap_std::fs::Dir::open_ambient_dir(dir, cap_std::ambient_authority())
            .map_err(|e| Error::internal(format!("open {}", dir.display()), e))?;
        let faults = Arc::new(Faults::new());
        let path = dir.to_path_buf();
        Ok(match self.0 {
            Driver::Native => Arc::new(Native::open(cap, path, faults)?),
            Driver::Overlay => {
                Arc::new(Overlay::open(cap, path, faults, OverlayOptions::default())?)
            }
            Driver::Btrfs => Arc::new(Btrfs::open(cap, path, faults)?),
        })
    }
}

/// What `-s`, `--config`, `--plugin` and `--policy` select: a driver of wasnap's own, or
/// a stack with plugins.
fn factory(g: &Global) -> Result<(Option<Driver>, Arc<dyn Factory>)> {
    let (config, selected) = g.config()?;
    let Some(s) = config.snapshotters.get(&selected) else {
        // Without a config entry, -s names one of the built-in drivers.
        let d = Driver::from_name(&selected)?;
        return Ok((Some(d), Arc::new(DriverFactory(d))));
    };
    let layer = |p: &PluginConfig| -> Result<Layer> {
        Ok(Layer::load(&p.path, None)?.with_config(p.config_json()).with_limits(p.limits.clone()))
    };
    let (driver, backend) = match &s.driver {
        DriverConfig::Wasm(p) => (None, Backend::Plugin(layer(p)?)),
        DriverConfig::Native => {
            (Some(Driver::Native), Backend::Factory(Arc::new(DriverFactory(Driver::Native))))
        }
        DriverConfig::Overlay(_) => {
            (Some(Driver::Overlay), Backend::Factory(Arc::new(DriverFactory(Driver::Overlay))))
        }
        DriverConfig::Btrfs => {
            (Some(Driver::Btrfs), Backend::Factory(Arc::new(DriverFactory(Driver::Btrfs))))
        }
    };
    if s.policies.is_empty()
        && let Backend::Factory(f) = backend
    {
        return Ok((driver, f));
    }
    let policies = s.policies.iter().map(layer).collect::<Result<Vec<_>>>()?;
    Ok((driver, Arc::new(PluginFactory { backend, policies })))
}

/// Runs (or lists) the suite; fails if any case failed.
pub fn run(args: &ConformanceArgs, g: &Global, out: &mut dyn Write) -> Result<()> {
    let format = g.format;
    let io = |e: std::io::Error| Error::internal("write report", e);
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
        return Err(Error::InvalidArgument(format!(
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
                serde_json::to_writer_pretty(&mut *out, &v)
                    .map_err(|e| Error::internal("encode JSON", e))?;
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
    let (driver, factory) = factory(g)?;
    // The btrfs driver needs its directory on btrfs: without one, make a scratch btrfs
    // on a loop device for the run (its image on the real disk), and remove it after.
    let _scratch = if driver == Some(Driver::Btrfs) && !wasnap::probe::is_btrfs(&opts.base) {
        let fs = wasnap_conformance::loopfs::LoopBtrfs::try_new(2048, &std::env::temp_dir()).map_err(|why| {
            Error::FailedPrecondition(format!(
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
    let report = wasnap_conformance::run(&*factory, &selected, &opts);
    match format {
        Format::Table => report.write_table(out),
        Format::Json => report.write_json(out),
        Format::Junit => report.write_junit(out),
    }
    .map_err(io)?;
    match report.failed() {
        0 => Ok(()),
        n => Err(Error::FailedPrecondition(format!(
            "{n} of {} conformance cases failed against {}",
            report.results.len(),
            report.backend
        ))),
    }
}
