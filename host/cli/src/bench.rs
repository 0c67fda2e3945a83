//! `wasnap bench`: the host's hot paths, measured on this machine and printed as a table.
//!
//! It always builds a fresh root in a temporary directory (under `--dir`), says which
//! filesystem that is (metadata cost differs by orders of magnitude between tmpfs and a
//! disk), and never asserts a time: `--smoke` only proves the benchmark still runs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;

use wasnap::error::{Error, Result};
use wasnap::fault::Faults;
use wasnap::host::{DEFAULT_SNAPSHOTTER, Host};
use wasnap::metadata::{Ctx, Snapshots};
use wasnap::snapshot::Labels;

use crate::output::table;

/// Options of `wasnap bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Directory to create the benchmark's temporary root in [default: /dev/shm if present]
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// A seconds-long run that only proves the benchmark works (CI)
    #[arg(long)]
    pub smoke: bool,
    /// Snapshot counts at which to measure stat and walk (comma-separated)
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,100000")]
    pub sizes: Vec<usize>,
    /// prepare+commit+remove cycles per workload
    #[arg(long, default_value_t = 500)]
    pub cycles: usize,
}

/// The name of the filesystem `path` is on, from its statfs magic.
pub fn filesystem_name(path: &Path) -> String {
    let Ok(st) = rustix::fs::statfs(path) else { return "unknown".into() };
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
    match st.f_type as u64 {
        0x0102_1994 => "tmpfs".into(),
        0xEF53 => "ext4".into(),
        0x9123_683E => "btrfs".into(),
        0x5846_5342 => "xfs".into(),
        0x794C_7630 => "overlayfs".into(),
        other => format!("fs-magic-{other:#x}"),
    }
}

struct Stats {
    n: usize,
    total: Duration,
    samples: Vec<Duration>,
}

impl Stats {
    fn new(mut samples: Vec<Duration>) -> Self {
        samples.sort();
        let total = samples.iter().sum();
        Stats { n: samples.len(), total, samples }
    }
    fn pct(&self, p: f64) -> Duration {
        if self.samples.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.samples.len() - 1) as f64 * p).round() as usize;
        self.samples[i]
    }
    fn per_sec(&self) -> f64 {
        self.n as f64 / self.total.as_secs_f64().max(1e-9)
    }
}

fn fmt_d(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 { format!("{us:.1} µs") } else { format!("{:.2} ms", us / 1000.0) }
}

fn timed(mut f: impl FnMut() -> Result<()>) -> Result<Duration> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed())
}

/// Runs the benchmark.
pub fn run(args: &BenchArgs, out: &mut dyn Write) -> Result<()> {
    let io = |e: std::io::Error| Error::internal("bench", e);
    let base = args.dir.clone().unwrap_or_else(|| {
        if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        }
    });
    let (sizes, cycles) =
        if args.smoke { (vec![100, 1000], 50) } else { (args.sizes.clone(), args.cycles) };
    let tmp = tempfile::Builder::new().prefix("wasnap-bench-").tempdir_in(&base).map_err(io)?;
    writeln!(
        out,
        "wasnap bench: native driver, root in {} ({})",
        base.display(),
        filesystem_name(&base)
    )
    .map_err(io)?;
    writeln!(out).map_err(io)?;

    let host = Host::open_with(&tmp.path().join("root"), Arc::new(Faults::new()))?;
    let sn = host.snapshotter(DEFAULT_SNAPSHOTTER)?;
    let ctx = Ctx::new("bench")?;
    let none = Labels::new();

    // Cycles: the lifetime of one layer, empty and on a small parent.
    let mut rows = Vec::new();
    let parent_tree = make_parent(&sn, &ctx)?;
    for (name, parent) in
        [("empty, no parent", None), ("on a 100-file parent", Some(parent_tree.as_str()))]
    {
        let mut samples = Vec::with_capacity(cycles);
        for i in 0..cycles {
            let (key, committed) = (format!("cycle-a-{i}"), format!("cycle-c-{i}"));
            samples.push(timed(|| {
                sn.prepare(&ctx, &key, parent, &none)?;
                sn.commit(&ctx, &committed, &key, &none)?;
                sn.remove(&ctx, &committed)
            })?);
        }
        let s = Stats::new(samples);
        rows.push(vec![
            format!("prepare+commit+remove ({name})"),
            s.n.to_string(),
            format!("{:.0}", s.per_sec()),
            fmt_d(s.pct(0.5)),
            fmt_d(s.pct(0.99)),
        ]);
    }
    table(out, &["WORKLOAD", "N", "CYCLES/S", "P50", "P99"], &rows)?;
    writeln!(out).map_err(io)?;

    // Scale: stat and walk as the number of snapshots grows.
    let mut rows = Vec::new();
    let mut present = 0usize;
    let mut sorted = sizes.clone();
    sorted.sort_unstable();
    for size in sorted {
        let fill = timed(|| {
            while present < size {
                let mut labels = Labels::new();
                labels.insert("bench.group".into(), (present % 10).to_string());
                sn.prepare(&ctx, &format!("scale-{present}"), None, &labels)?;
                present += 1;
            }
            Ok(())
        })?;
        let samples: Vec<Duration> = (0..1000usize)
            .map(|i| {
                let k = format!("scale-{}", (i * 7919) % size.max(1));
                timed(|| sn.stat(&ctx, &k).map(drop))
            })
            .collect::<Result<_>>()?;
        let stat = Stats::new(samples);
        let walk = |filters: &[String]| -> Result<(Duration, usize)> {
            let mut best = Duration::MAX;
            let mut n = 0;
            for _ in 0..3 {
                n = 0;
                best = best.min(timed(|| {
                    sn.walk(&ctx, filters, &mut |_| {
                        n += 1;
                        Ok(())
                    })
                })?);
            }
            Ok((best, n))
        };
        let (all, n_all) = walk(&[])?;
        let (filtered, n_f) = walk(&[r#"labels."bench.group"==7"#.to_owned()])?;
        rows.push(vec![
            size.to_string(),
            fmt_d(stat.pct(0.5)),
            fmt_d(stat.pct(0.99)),
            format!("{} ({n_all})", fmt_d(all)),
            format!("{} ({n_f})", fmt_d(filtered)),
            format!("{:.0}", size as f64 / fill.as_secs_f64().max(1e-9)),
        ]);
    }
    table(
        out,
        &[
            "SNAPSHOTS",
            "STAT P50",
            "STAT P99",
            "WALK ALL (N)",
            "WALK label==x (N)",
            "FILL PREPARES/S",
        ],
        &rows,
    )?;
    host.close()
}

fn make_parent(sn: &Snapshots, ctx: &Ctx) -> Result<String> {
    let none = Labels::new();
    let mounts = sn.prepare(ctx, "bench-parent-active", None, &none)?;
    let dir = Path::new(&mounts[0].source);
    for i in 0..100 {
        std::fs::write(dir.join(format!("file-{i}")), vec![b'x'; 10 * 1024])
            .map_err(|e| Error::internal("write bench parent", e))?;
    }
    sn.commit(ctx, "bench-parent", "bench-parent-active", &none)?;
    Ok("bench-parent".into())
}
