//! `wasnap bench`: the host's hot paths, measured on this machine and printed as a table.
//!
//! It always builds a fresh root in a temporary directory (under `--dir`), says which
//! filesystem that is (metadata cost differs by orders of magnitude between tmpfs and a
//! disk), and never asserts a time: `--smoke` only proves the benchmark still runs.
//! The plugin section loads the `copy` guest from `--guest-dir` (or `--copy-guest`) and
//! never builds it: without one it is skipped, saying how to build it. The daemon
//! against containerd, side by side, is the workspace's dev benchmark (`wasnap-bench
//! daemon`, in `tests/bench`): a shipped binary does not launch containerd.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Args;

use wasnap::Context;
use wasnap::error::{Error, Result};
use wasnap::fault::Faults;
use wasnap::gc::{GcOptions, GcReport};
use wasnap::metadata::{Ctx, Snapshotter};
use wasnap::root::{Config, DEFAULT_SNAPSHOTTER, DriverConfig, Host};
use wasnap::snapshot::Labels;

use wasnap_conformance::loopfs::LoopBtrfs;

use crate::output::table;
use crate::stats::{Stats, fmt_d, timed};

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
    /// Chain depths at which to time view+mount+unmount, per driver (comma-separated)
    #[arg(long, value_delimiter = ',', default_value = "1,10,100,500")]
    pub depths: Vec<usize>,
    /// A directory on btrfs for the btrfs driver (without one, btrfs is reported skipped)
    #[arg(long)]
    pub btrfs_dir: Option<PathBuf>,
    /// A directory holding the `copy` guest (`copy.wasm`) to compare with the native
    /// driver; without it (or `--copy-guest`), the plugin section is skipped
    #[arg(long, env = "WASNAP_GUESTS_DIR", value_name = "DIR")]
    pub guest_dir: Option<PathBuf>,
    /// The `copy` guest's `.wasm` itself (before `--guest-dir`)
    #[arg(long = "copy-guest", value_name = "WASM")]
    pub copy_guest: Option<PathBuf>,
    /// Directory on a real disk for the cost of durable commits (syncing on tmpfs costs
    /// nothing, so the figure only means something on a disk)
    #[arg(long, default_value = "/var/tmp")]
    pub disk_dir: PathBuf,
    /// Only the layers section: apply against `tar -x`, gzip against `tar -xzf`, diff,
    /// and registering an existing chain
    #[arg(long)]
    pub layers_only: bool,
    /// Only the merge section: merges stacked (overlay) and hard-linked (native) against
    /// copying the same layers
    #[arg(long)]
    pub merge_only: bool,
    /// Only the cache section: `du` and prune's plan (dry run) at 100k snapshots
    /// (--sizes' largest, or the smoke size), then a real prune
    #[arg(long)]
    pub cache_only: bool,
    /// Only the deep chain section: 1,000 layers on overlay, the first container start
    /// on it (which flattens the bottom of the chain) and later ones
    #[arg(long)]
    pub deep_only: bool,
}

/// Runs the benchmark.
pub fn run(args: &BenchArgs, out: &mut dyn Write) -> Result<()> {
    let io = |e: std::io::Error| Error::from(e).context("bench");
    let base = args.dir.clone().unwrap_or_else(|| {
        if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        }
    });
    let (sizes, cycles) =
        if args.smoke { (vec![100, 1000], 50) } else { (args.sizes.clone(), args.cycles) };
    if args.layers_only {
        return crate::bench_layers::run(&base, args.smoke, out);
    }
    if args.merge_only {
        return crate::bench_merge::run(&base, args.smoke, out);
    }
    if args.cache_only {
        return crate::bench_cache::run(&base, args.smoke, out);
    }
    if args.deep_only {
        return crate::bench_deep::run(&base, args.smoke, out);
    }
    let tmp = tempfile::Builder::new().prefix("wasnap-bench-").tempdir_in(&base).map_err(io)?;
    writeln!(
        out,
        "wasnap bench: native driver, root in {} ({})",
        base.display(),
        wasnap::probe::filesystem_name(&base)
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
    host.close()?;
    writeln!(out).map_err(io)?;
    let depths = if args.smoke { vec![1, 10] } else { args.depths.clone() };
    drivers(args, &base, cycles, &depths, out)?;
    writeln!(out).map_err(io)?;
    match copy_guest(args) {
        Ok(guest) => crate::bench_plugins::run(&base, &guest, cycles, args.smoke, out)?,
        Err(why) => writeln!(
            out,
            "plugin section skipped: {why} (build copy.wasm with: cargo build --release \
             --target wasm32-wasip2 -p copy, then pass --guest-dir target/wasm32-wasip2/release)"
        )
        .map_err(io)?,
    }
    writeln!(out).map_err(io)?;
    durability(&args.disk_dir, if args.smoke { 10 } else { 100 }, out)?;
    writeln!(out).map_err(io)?;
    gc(tmp.path(), &sizes, args.smoke, out)?;
    writeln!(out).map_err(io)?;
    crate::bench_layers::run(&base, args.smoke, out)?;
    writeln!(out).map_err(io)?;
    crate::bench_merge::run(&base, args.smoke, out)?;
    writeln!(out).map_err(io)?;
    crate::bench_deep::run(&base, args.smoke, out)
}

/// Files written into each layer of the durability section, and their size.
const DURABLE_FILES: usize = 16;
const DURABLE_FILE_BYTES: usize = 4096;

/// What a durable commit costs: the same layer lifetime (prepare, write a few small
/// files, commit, remove) with `sync_commits` on and off, per driver, on `dir`'s
/// filesystem. The two settings alternate cycle by cycle, so a disk that slows down
/// over the run weighs on both alike.
fn durability(dir: &Path, cycles: usize, out: &mut dyn Write) -> Result<()> {
    let io = |e: std::io::Error| Error::from(e).context("bench");
    let fs = wasnap::probe::filesystem_name(dir);
    let tmp = match tempfile::Builder::new().prefix("wasnap-bench-").tempdir_in(dir) {
        Ok(t) => t,
        Err(e) => {
            writeln!(out, "durability section skipped: cannot use {}: {e}", dir.display())
                .map_err(io)?;
            return Ok(());
        }
    };
    let root_user = rustix::process::geteuid().is_root();
    let drivers: Vec<(&str, DriverConfig)> =
        if root_user && wasnap::probe::Support::overlay_available() {
            vec![
                ("native", DriverConfig::Native),
                ("overlay", DriverConfig::Overlay(Default::default())),
            ]
        } else {
            vec![("native", DriverConfig::Native)]
        };
    let mut snapshotters = BTreeMap::new();
    for (name, driver) in &drivers {
        for sync in [true, false] {
            let mut config = wasnap::config::SnapshotterConfig::from(driver.clone());
            config.sync_commits = sync;
            snapshotters.insert(format!("{name}-sync-{sync}"), config);
        }
    }
    let config = Config {
        default_snapshotter: format!("{}-sync-true", drivers[0].0),
        snapshotters,
        ..Config::default()
    };
    let host = Host::open_config(&tmp.path().join("root"), Arc::new(Faults::new()), config)?;
    let ctx = Ctx::new("bench-sync")?;
    let none = Labels::new();
    let target = tmp.path().join("mnt");
    std::fs::create_dir_all(&target).map_err(io)?;
    let mut rows = Vec::new();
    for (name, _) in &drivers {
        let synced = host.snapshotter(&format!("{name}-sync-true"))?;
        let unsynced = host.snapshotter(&format!("{name}-sync-false"))?;
        let (mut on, mut off) = (Vec::new(), Vec::new());
        for i in 0..cycles {
            for (sn, samples) in [(&synced, &mut on), (&unsynced, &mut off)] {
                let (key, committed) = (format!("sync-a-{i}"), format!("sync-c-{i}"));
                let mounts = sn.prepare(&ctx, &key, None, &none)?;
                write_files(&mounts, &target, root_user)?;
                samples.push(timed(|| sn.commit(&ctx, &committed, &key, &none))?);
                sn.remove(&ctx, &committed)?;
            }
        }
        let (on, off) = (Stats::new(on), Stats::new(off));
        let ratio = on.pct(0.5).as_secs_f64() / off.pct(0.5).as_secs_f64().max(1e-9);
        rows.push(vec![
            name.to_string(),
            on.n.to_string(),
            fmt_d(on.pct(0.5)),
            fmt_d(on.pct(0.99)),
            fmt_d(off.pct(0.5)),
            fmt_d(off.pct(0.99)),
            format!("{ratio:.1}x"),
        ]);
    }
    host.close()?;
    table(
        out,
        &[
            "COMMIT COST",
            "N",
            "SYNCED P50",
            "SYNCED P99",
            "UNSYNCED P50",
            "UNSYNCED P99",
            "SYNCED/UNSYNCED",
        ],
        &rows,
    )?;
    writeln!(
        out,
        "  commit of a layer holding {DURABLE_FILES} files of {} KiB, root in {} ({fs}); \
         sync_commits = false in a snapshotter's config trades this for the power-cut window",
        DURABLE_FILE_BYTES / 1024,
        dir.display()
    )
    .map_err(io)?;
    Ok(())
}

/// Writes the durability section's files into a fresh active snapshot.
fn write_files(mounts: &[wasnap::Mount], target: &Path, mount: bool) -> Result<()> {
    let write = |dir: &Path| -> Result<()> {
        for f in 0..DURABLE_FILES {
            std::fs::write(dir.join(format!("file-{f}")), [b'd'; DURABLE_FILE_BYTES])
                .with_context(|| "bench: write layer")?;
        }
        Ok(())
    };
    in_layer(mounts, target, mount, write)
}

/// The `copy` guest the plugin section loads (never builds), or why there is none.
fn copy_guest(args: &BenchArgs) -> std::result::Result<PathBuf, String> {
    let (guest, missing) = match (&args.copy_guest, &args.guest_dir) {
        (Some(wasm), _) => (wasm.clone(), format!("no copy guest at {}", wasm.display())),
        (None, Some(dir)) => (dir.join("copy.wasm"), format!("no copy.wasm in {}", dir.display())),
        (None, None) => {
            return Err("no --guest-dir, WASNAP_GUESTS_DIR or --copy-guest given".into());
        }
    };
    if guest.is_file() { Ok(guest) } else { Err(missing) }
}

/// One driver's root for the side-by-side comparison, or why it cannot run here. For
/// btrfs without a btrfs directory, a scratch btrfs on a loop device (kept alive by the
/// returned guard) stands in.
fn driver_root(
    name: &str,
    base: &Path,
    args: &BenchArgs,
) -> std::result::Result<(PathBuf, Option<LoopBtrfs>), String> {
    match name {
        "btrfs" => match &args.btrfs_dir {
            Some(d) if wasnap::probe::is_btrfs(d) => Ok((d.clone(), None)),
            Some(d) => Err(format!("{} is not on btrfs", d.display())),
            None if wasnap::probe::is_btrfs(base) => Ok((base.to_path_buf(), None)),
            None => {
                let fs = LoopBtrfs::try_new(4096, &std::env::temp_dir())
                    .map_err(|why| format!("no --btrfs-dir, and no scratch btrfs: {why}"))?;
                Ok((fs.mountpoint.clone(), Some(fs)))
            }
        },
        "overlay" if !wasnap::probe::Support::overlay_available() => {
            Err("no overlayfs in this kernel".into())
        }
        _ => Ok((base.to_path_buf(), None)),
    }
}

/// The drivers side by side: layer cycles, and what starting a container on a chain of
/// N layers costs (a view of the top, mounted and unmounted).
fn drivers(
    args: &BenchArgs,
    base: &Path,
    cycles: usize,
    depths: &[usize],
    out: &mut dyn Write,
) -> Result<()> {
    let io = |e: std::io::Error| Error::from(e).context("bench");
    let root_user = rustix::process::geteuid().is_root();
    let names = ["native", "overlay", "btrfs"];
    let mut cycle_row = vec!["cycles/s (p50)".to_string()];
    let mut depth_rows: Vec<Vec<String>> =
        depths.iter().map(|d| vec![format!("view+mount {d} layers")]).collect();
    let mut notes = Vec::new();
    for name in names {
        let measured = driver_root(name, base, args).and_then(|(dir, _scratch)| {
            let tmp = tempfile::Builder::new()
                .prefix("wasnap-bench-")
                .tempdir_in(&dir)
                .map_err(|e| e.to_string())?;
            let host =
                Host::open_with(tmp.path(), Arc::new(Faults::new())).map_err(|e| e.to_string())?;
            let r =
                measure_driver(&host, name, cycles, depths, root_user).map_err(|e| e.to_string());
            let _ = host.close();
            r
        });
        match measured {
            Ok((c, d)) => {
                cycle_row.push(c);
                for (row, cell) in depth_rows.iter_mut().zip(d) {
                    row.push(cell);
                }
            }
            Err(why) => {
                cycle_row.push("skipped".into());
                for row in &mut depth_rows {
                    row.push("skipped".into());
                }
                notes.push(format!("{name} skipped: {why}"));
            }
        }
    }
    let mut rows = vec![cycle_row];
    rows.extend(depth_rows);
    table(out, &["DRIVERS SIDE BY SIDE", "native", "overlay", "btrfs"], &rows)?;
    if !root_user {
        notes.push("mount times need root; shown as '-'".into());
    }
    for n in notes {
        writeln!(out, "  {n}").map_err(io)?;
    }
    Ok(())
}

fn measure_driver(
    host: &Host,
    name: &str,
    cycles: usize,
    depths: &[usize],
    mount: bool,
) -> Result<(String, Vec<String>)> {
    let sn = host.snapshotter(name)?;
    let ctx = Ctx::new("bench")?;
    let none = Labels::new();
    let mut samples = Vec::with_capacity(cycles);
    for i in 0..cycles {
        let (key, committed) = (format!("c-a-{i}"), format!("c-c-{i}"));
        samples.push(timed(|| {
            sn.prepare(&ctx, &key, None, &none)?;
            sn.commit(&ctx, &committed, &key, &none)?;
            sn.remove(&ctx, &committed)
        })?);
    }
    let s = Stats::new(samples);
    let cycle_cell = format!("{:.0} ({})", s.per_sec(), fmt_d(s.pct(0.5)));

    // Grow one chain, stopping at each depth to time a container start on it.
    let mut cells = Vec::new();
    let mut top: Option<String> = None;
    let mut built = 0;
    let target = host.root().join("bench-mnt");
    std::fs::create_dir_all(&target).with_context(|| "bench")?;
    for &depth in depths {
        while built < depth {
            let key = format!("chain-{built}-active");
            let mounts = sn.prepare(&ctx, &key, top.as_deref(), &none)?;
            write_layer(&mounts, &target, mount, built)?;
            let name = format!("chain-{built}");
            sn.commit(&ctx, &name, &key, &none)?;
            top = Some(name);
            built += 1;
        }
        let Some(parent) = &top else { continue };
        let mut samples = Vec::new();
        for rep in 0..3 {
            let key = format!("view-{depth}-{rep}");
            samples.push(timed(|| {
                let mounts = sn.view(&ctx, &key, Some(parent), &none)?;
                if mount {
                    wasnap::mount::mount_all(&mounts, &target)?;
                    wasnap::mount::unmount(&target)?;
                }
                Ok(())
            })?);
            sn.remove(&ctx, &key)?;
        }
        let s = Stats::new(samples);
        cells.push(if mount {
            fmt_d(s.pct(0.5))
        } else {
            format!("{} (no mount)", fmt_d(s.pct(0.5)))
        });
    }
    Ok((cycle_cell, cells))
}

/// Writes layer `n`'s file into a fresh active snapshot.
fn write_layer(mounts: &[wasnap::Mount], target: &Path, mount: bool, n: usize) -> Result<()> {
    in_layer(mounts, target, mount, |dir| {
        std::fs::write(dir.join(format!("file-{n}")), n.to_string())
            .with_context(|| "bench: write layer")
    })
}

/// Runs `write` on an active snapshot's tree: through a real mount when we may mount,
/// otherwise straight in the directory a bind or overlay mount would show.
fn in_layer(
    mounts: &[wasnap::Mount],
    target: &Path,
    mount: bool,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    if mount {
        wasnap::mount::mount_all(mounts, target)?;
        let r = write(target);
        wasnap::mount::unmount(target)?;
        return r;
    }
    let m = &mounts[0];
    match (m.kind.as_str(), m.options.iter().find_map(|o| o.strip_prefix("upperdir="))) {
        (_, Some(upper)) => write(Path::new(upper)),
        ("bind", None) => write(Path::new(&m.source)),
        (kind, None) => Err(Error::failed_precondition(format!(
            "writing into a {kind} snapshot needs root to mount it"
        ))),
    }
}

fn make_parent(sn: &Snapshotter, ctx: &Ctx) -> Result<String> {
    let none = Labels::new();
    let mounts = sn.prepare(ctx, "bench-parent-active", None, &none)?;
    let dir = Path::new(&mounts[0].source);
    for i in 0..100 {
        std::fs::write(dir.join(format!("file-{i}")), vec![b'x'; 10 * 1024])
            .with_context(|| "write bench parent")?;
    }
    sn.commit(ctx, "bench-parent", "bench-parent-active", &none)?;
    Ok("bench-parent".into())
}

/// Layers per chain in the garbage-collection benchmark.
const GC_CHAIN: usize = 10;

/// Garbage collection as the number of snapshots grows: what each step costs, and how
/// long writers wait for it. Each size gets a fresh root serving only the native driver,
/// with chains of committed layers under leases: half held by a lease that stays, a
/// quarter by a lease deleted before the timed collection, and a quarter by one deleted
/// before the collection writers run against.
fn gc(dir: &Path, sizes: &[usize], smoke: bool, out: &mut dyn Write) -> Result<()> {
    let io = |e: std::io::Error| Error::from(e).context("bench");
    // How long writers run with no collection, for their baseline.
    let idle = if smoke { Duration::from_millis(200) } else { Duration::from_secs(1) };
    let defaults = GcOptions::default();
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let mut built = Vec::new();
    let mut sorted = sizes.to_vec();
    sorted.sort_unstable();
    for size in sorted {
        let root = dir.join(format!("gc-{size}"));
        let config = Config {
            default_snapshotter: DEFAULT_SNAPSHOTTER.to_owned(),
            snapshotters: BTreeMap::from([(
                DEFAULT_SNAPSHOTTER.to_owned(),
                DriverConfig::Native.into(),
            )]),
            // Measure however long marking takes, rather than give up at the limit.
            gc: GcOptions { max_pause_ms: 600_000, ..defaults.clone() },
            ..Config::default()
        };
        let host = Host::open_config(&root, Arc::new(Faults::new()), config)?;
        let sn = host.snapshotter(DEFAULT_SNAPSHOTTER)?;
        let ctx = Ctx::new("bench-gc")?;
        let kept = size / 2;
        let first = (size - kept) / 2;
        let second = size - kept - first;
        let build = timed(|| {
            leased_chains(&host, &sn, &ctx, "kept", kept)?;
            leased_chains(&host, &sn, &ctx, "garbage-1", first)?;
            leased_chains(&host, &sn, &ctx, "garbage-2", second)
        })?;

        host.leases().delete(&ctx, "garbage-1")?;
        let report = host.collect(false)?;

        host.leases().delete(&ctx, "garbage-2")?;
        let pause = writers_during_gc(&host, &sn, &ctx, idle)?;

        for (r, expected) in [(&report, first), (&pause.report, second)] {
            if r.removed.len() != expected || !r.failed.is_empty() {
                notes.push(format!(
                    "{size}: a collection removed {} snapshots, expected {expected}; failed: {:?}",
                    r.removed.len(),
                    r.failed
                ));
            }
        }
        let held = (report.mark + report.sweep).max(pause.report.mark + pause.report.sweep);
        if held > Duration::from_millis(defaults.max_pause_ms) {
            notes.push(format!(
                "{size}: mark+sweep took {}, more than the default max_pause_ms ({} ms) allows",
                fmt_d(held),
                defaults.max_pause_ms
            ));
        }
        built.push(format!("{size} in {:.1} s", build.as_secs_f64()));
        rows.push(vec![
            size.to_string(),
            fmt_d(report.mark),
            fmt_d(report.sweep),
            fmt_d(report.prune),
            report.removed.len().to_string(),
            fmt_d(pause.idle.pct(0.5)),
            fmt_d(pause.during.pct(0.99)),
            fmt_d(pause.during.pct(1.0)),
        ]);
        host.close()?;
        std::fs::remove_dir_all(&root).map_err(io)?;
    }
    table(
        out,
        &[
            "SNAPSHOTS",
            "MARK",
            "SWEEP",
            "PRUNE",
            "REMOVED",
            "WRITER P50 (idle)",
            "WRITER P99 DURING GC",
            "WRITER MAX DURING GC",
        ],
        &rows,
    )?;
    writeln!(
        out,
        "  chains of {GC_CHAIN} committed layers under leases; a quarter of them is garbage at \
         each collection; 2 writer threads prepare while the second one runs"
    )
    .map_err(io)?;
    writeln!(out, "  built: {}", built.join(", ")).map_err(io)?;
    for n in notes {
        writeln!(out, "  {n}").map_err(io)?;
    }
    Ok(())
}

/// Creates the lease `id` and `n` committed snapshots it holds, in chains of
/// [`GC_CHAIN`] layers.
fn leased_chains(host: &Host, sn: &Snapshotter, ctx: &Ctx, id: &str, n: usize) -> Result<()> {
    let lease = host.leases().create(ctx, Some(id), &Labels::new())?;
    let ctx = ctx.clone().with_lease(Some(lease.id));
    let none = Labels::new();
    for chain in 0..n.div_ceil(GC_CHAIN) {
        let mut parent: Option<String> = None;
        for layer in 0..GC_CHAIN.min(n - chain * GC_CHAIN) {
            let name = format!("{id}-{chain}-{layer}");
            let active = format!("{name}-active");
            sn.prepare(&ctx, &active, parent.as_deref(), &none)?;
            sn.commit(&ctx, &name, &active, &none)?;
            parent = Some(name);
        }
    }
    Ok(())
}

/// What writers saw around one collection.
struct Pause {
    report: GcReport,
    /// Writer calls that finished before the collection started.
    idle: Stats,
    /// Writer calls that overlapped the collection.
    during: Stats,
}

/// Two threads prepare fresh snapshots (no lease) in a loop, timing each call; after
/// `idle`, one collection runs; then the writers stop.
fn writers_during_gc(host: &Host, sn: &Snapshotter, ctx: &Ctx, idle: Duration) -> Result<Pause> {
    let stop = AtomicBool::new(false);
    let write = |w: usize| -> Result<Vec<(Instant, Duration)>> {
        let none = Labels::new();
        let mut calls = Vec::new();
        for i in 0.. {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let start = Instant::now();
            sn.prepare(ctx, &format!("writer-{w}-{i}"), None, &none)?;
            calls.push((start, start.elapsed()));
        }
        Ok(calls)
    };
    let (report, calls, gc_start, gc_end) = std::thread::scope(|s| {
        let writers: Vec<_> = (0..2).map(|w| s.spawn(move || write(w))).collect();
        std::thread::sleep(idle);
        let gc_start = Instant::now();
        let report = host.collect(false);
        let gc_end = Instant::now();
        stop.store(true, Ordering::Relaxed);
        let mut calls = Vec::new();
        for w in writers {
            let done = w.join().map_err(|_| Error::internal("bench: a writer panicked"))?;
            calls.extend(done?);
        }
        Ok::<_, Error>((report?, calls, gc_start, gc_end))
    })?;
    let idle = calls.iter().filter(|&&(start, d)| start + d <= gc_start).map(|&(_, d)| d);
    let during =
        calls.iter().filter(|&&(start, d)| start < gc_end && start + d > gc_start).map(|&(_, d)| d);
    Ok(Pause { report, idle: Stats::new(idle.collect()), during: Stats::new(during.collect()) })
}
