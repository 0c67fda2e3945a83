//! `wasnap conformance`: runs the conformance suite against a backend and reports.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;
use wasnap::Snapshotter;
use wasnap::driver::overlay::OverlayOptions;
use wasnap::driver::{Native, Overlay};
use wasnap::error::{Error, Result};
use wasnap::fault::Faults;
use wasnap_conformance::{Factory, Options, cases};

use crate::output::{Format, table};

/// Options of `wasnap conformance`.
#[derive(Debug, Args)]
pub struct ConformanceArgs {
    /// The native driver to check
    #[arg(long, value_enum, default_value_t = Driver::Native)]
    pub driver: Driver,
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

/// The backends `--driver` can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Driver {
    /// The copy-based native driver.
    Native,
    /// The overlayfs driver.
    Overlay,
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
        Ok(match self.0 {
            Driver::Native => Arc::new(Native::open(cap, dir.to_path_buf(), faults)?),
            Driver::Overlay => {
                Arc::new(Overlay::open(cap, dir.to_path_buf(), faults, OverlayOptions::default())?)
            }
        })
    }
}

/// Runs (or lists) the suite; fails if any case failed.
pub fn run(args: &ConformanceArgs, format: Format, out: &mut dyn Write) -> Result<()> {
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
    let report = wasnap_conformance::run(&DriverFactory(args.driver), &selected, &opts);
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
