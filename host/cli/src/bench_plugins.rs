//! `wasnap bench`, plugins: the same workload on the native copy driver and on the
//! `copy` guest (ratio), the cost of one call into a guest, plugin load time cold and
//! warm, and whether a second instance helps two concurrent clients.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use wasnap::Context;
use wasnap::error::{Error, Result};
use wasnap::fault::Faults;
use wasnap::metadata::{Ctx, Snapshotter};
use wasnap::plugin::{Limits, Plugin};
use wasnap::root::{Config, DriverConfig, Host, PluginConfig};
use wasnap::snapshot::Labels;
use wasnap::{Backend, Filter};

use crate::output::table;
use crate::stats::{Stats, fmt_d, timed};

fn host(root: &Path, guest: &Path, instances: u32) -> Result<Host> {
    let limits = Limits { instances, ..Limits::default() };
    let config = Config {
        default_snapshotter: "native".into(),
        snapshotters: BTreeMap::from([
            ("native".to_owned(), DriverConfig::Native.into()),
            (
                "copy".to_owned(),
                DriverConfig::Wasm(PluginConfig { limits, ..PluginConfig::new(guest) }).into(),
            ),
        ]),
        ..Config::default()
    };
    Host::open_config(root, Arc::new(Faults::new()), config)
}

fn cycles(sn: &Snapshotter, ctx: &Ctx, tag: &str, n: usize, parent: Option<&str>) -> Result<Stats> {
    let none = Labels::new();
    let samples = (0..n)
        .map(|i| {
            let (key, name) = (format!("{tag}-a-{i}"), format!("{tag}-c-{i}"));
            timed(|| {
                sn.prepare(ctx, &key, parent, &none)?;
                sn.commit(ctx, &name, &key, &none)?;
                sn.remove(ctx, &name)
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Stats::new(samples))
}

/// A committed parent of 100 small files, written through the backend's bind mount
/// source (both drivers here return one).
fn parent(sn: &Snapshotter, ctx: &Ctx) -> Result<String> {
    let mounts = sn.prepare(ctx, "bench-parent-a", None, &Labels::new())?;
    let dir = PathBuf::from(&mounts[0].source);
    for i in 0..100 {
        std::fs::write(dir.join(format!("f{i}")), vec![b'x'; 4096])
            .with_context(|| "write parent file")?;
    }
    sn.commit(ctx, "bench-parent", "bench-parent-a", &Labels::new())?;
    Ok("bench-parent".into())
}

fn direct(backend: &dyn Backend, n: usize) -> Result<(Stats, Stats)> {
    let mut key = None;
    backend.walk(&Filter::default(), &mut |i| {
        key.get_or_insert(i.name);
        Ok(())
    })?;
    let key = key.ok_or_else(|| Error::internal("no snapshot to stat"))?;
    let stat = (0..n).map(|_| timed(|| backend.stat(&key).map(drop))).collect::<Result<_>>()?;
    let mounts = (0..n).map(|_| timed(|| backend.mounts(&key).map(drop))).collect::<Result<_>>()?;
    Ok((Stats::new(stat), Stats::new(mounts)))
}

fn ratio(native: f64, guest: f64) -> String {
    format!("{:.2}x", guest / native.max(1e-12))
}

/// Runs the plugin section against the `copy` guest at `guest`.
pub fn run(base: &Path, guest: &Path, n: usize, smoke: bool, out: &mut dyn Write) -> Result<()> {
    let io = |e: std::io::Error| Error::from(e).context("bench");
    let tmp =
        tempfile::Builder::new().prefix("wasnap-bench-plugins-").tempdir_in(base).map_err(io)?;
    writeln!(
        out,
        "plugins: native copy driver against the copy guest ({}), root in {} ({})",
        guest.display(),
        base.display(),
        wasnap::probe::filesystem_name(base)
    )
    .map_err(io)?;

    // Load: cold compiles; warm deserializes from the cache the cold load filled.
    let wasm = std::fs::read(guest).map_err(io)?;
    let cache_dir = tmp.path().join("cache");
    std::fs::create_dir(&cache_dir).map_err(io)?;
    let cache =
        cap_std::fs::Dir::open_ambient_dir(&cache_dir, cap_std::ambient_authority()).map_err(io)?;
    let cold = timed(|| Plugin::load("copy", &wasm, Some(&cache)).map(drop))?;
    let warm = Stats::new(
        (0..if smoke { 3 } else { 20 })
            .map(|_| timed(|| Plugin::load("copy", &wasm, Some(&cache)).map(drop)))
            .collect::<Result<_>>()?,
    );

    let h = host(&tmp.path().join("root"), guest, 1)?;
    let ctx = Ctx::new("bench")?;
    let native = h.snapshotter("native")?;
    let copy = h.snapshotter("copy")?;
    let mut rows = Vec::new();
    for (what, with_parent) in [("empty, no parent", false), ("on a 100-file parent", true)] {
        let pn = if with_parent { Some(parent(&native, &ctx)?) } else { None };
        let pc = if with_parent { Some(parent(&copy, &ctx)?) } else { None };
        let a = cycles(&native, &ctx, "n", n, pn.as_deref())?;
        let b = cycles(&copy, &ctx, "c", n, pc.as_deref())?;
        rows.push(vec![
            format!("prepare+commit+remove ({what}) p50"),
            fmt_d(a.pct(0.5)),
            fmt_d(b.pct(0.5)),
            ratio(a.pct(0.5).as_secs_f64(), b.pct(0.5).as_secs_f64()),
        ]);
        rows.push(vec![
            format!("  cycles/s ({what})"),
            format!("{:.0}", a.per_sec()),
            format!("{:.0}", b.per_sec()),
            ratio(a.per_sec(), b.per_sec()),
        ]);
    }
    let calls = if smoke { 200 } else { 5000 };
    let (ns, nm) = direct(&**native.backend(), calls)?;
    let (cs, cm) = direct(&**copy.backend(), calls)?;
    rows.push(vec![
        "backend stat p50".into(),
        fmt_d(ns.pct(0.5)),
        fmt_d(cs.pct(0.5)),
        ratio(ns.pct(0.5).as_secs_f64(), cs.pct(0.5).as_secs_f64()),
    ]);
    rows.push(vec![
        "backend mounts p50".into(),
        fmt_d(nm.pct(0.5)),
        fmt_d(cm.pct(0.5)),
        ratio(nm.pct(0.5).as_secs_f64(), cm.pct(0.5).as_secs_f64()),
    ]);
    table(out, &["WORKLOAD", "NATIVE", "COPY GUEST", "GUEST/NATIVE"], &rows)?;
    writeln!(out).map_err(io)?;

    // One call into the guest that does nothing: the floor under every plugin call.
    let wasm_s = h
        .loaded_plugins()
        .into_iter()
        .find(|p| p.snapshotter == "copy")
        .ok_or_else(|| Error::internal("copy plugin not loaded"))?;
    let pings = if smoke { 1000 } else { 100_000 };
    let nop = Stats::new((0..pings).map(|_| timed(|| wasm_s.wasm.ping())).collect::<Result<_>>()?);
    let mut rows = vec![
        vec!["nop call round trip (ping)".into(), fmt_d(nop.pct(0.5)), fmt_d(nop.pct(0.99))],
        vec!["load cold (compile)".into(), fmt_d(cold), String::new()],
        vec!["load warm (from the cache)".into(), fmt_d(warm.pct(0.5)), fmt_d(warm.pct(0.99))],
    ];
    h.close()?;
    drop(h);

    // Two clients at once: one instance (calls take turns) against two.
    for instances in [1, 2] {
        let h = host(&tmp.path().join(format!("root-{instances}")), guest, instances)?;
        let copy = h.snapshotter("copy")?;
        let started = std::time::Instant::now();
        let per = n.max(2) / 2;
        std::thread::scope(|s| -> Result<()> {
            let workers: Vec<_> = (0..2)
                .map(|t| {
                    let copy = copy.clone();
                    s.spawn(move || -> Result<()> {
                        let ctx = Ctx::new("bench")?;
                        cycles(&copy, &ctx, &format!("t{t}"), per, None).map(drop)
                    })
                })
                .collect();
            workers
                .into_iter()
                .try_for_each(|w| w.join().map_err(|_| Error::internal("bench worker panicked"))?)
        })?;
        let rate = (per * 2) as f64 / started.elapsed().as_secs_f64().max(1e-9);
        rows.push(vec![
            format!("2 clients, {instances} instance(s): cycles/s"),
            format!("{rate:.0}"),
            String::new(),
        ]);
        h.close()?;
    }
    table(out, &["PLUGIN CALLS", "P50 / VALUE", "P99"], &rows)?;
    stuck_guest(tmp.path(), guest, n, out)
}

/// How long the stuck guest stays stuck (its deadline); the run beside it stops early.
const STUCK_FOR: std::time::Duration = std::time::Duration::from_secs(3);

/// The native driver's prepare+remove latency alone, and while a guest of the same root
/// is stuck in `commit` (the `adversary` guest, spinning until its deadline): a stuck
/// plugin must hold nothing the others need. Skipped, saying so, when the adversary
/// guest is not beside the `copy` guest (it is a test guest, built by the tests).
fn stuck_guest(base: &Path, guest: &Path, n: usize, out: &mut dyn Write) -> Result<()> {
    let io = |e: std::io::Error| Error::from(e).context("bench");
    let adversary = guest.with_file_name("adversary.wasm");
    if !adversary.is_file() {
        writeln!(out, "\nstuck guest: skipped, no {} (the tests build it)", adversary.display())
            .map_err(io)?;
        return Ok(());
    }
    let config: toml::Value = toml::from_str(
        r#"mode = "spin"
only = "stuck""#,
    )
    .map_err(|e| Error::internal(format!("bench config: {e}")))?;
    let stuck_plugin = PluginConfig {
        config: Some(config),
        limits: Limits { timeout_ms: STUCK_FOR.as_millis() as u64, ..Limits::default() },
        ..PluginConfig::new(&adversary)
    };
    let cfg = Config {
        default_snapshotter: "native".into(),
        snapshotters: BTreeMap::from([
            ("native".to_owned(), DriverConfig::Native.into()),
            ("stuck".to_owned(), DriverConfig::Wasm(stuck_plugin).into()),
        ]),
        // No collection after each of the measured removes: on two cores a background
        // collection per call competes for the one core the spinning guest leaves, and
        // the figure is about what the guest holds, not about CPU.
        gc: wasnap::gc::GcOptions {
            deletion_threshold: 0,
            mutation_threshold: 0,
            interval_secs: 0,
            ..Default::default()
        },
        ..Config::default()
    };
    let h = Host::open_config(&base.join("root-stuck"), Arc::new(Faults::new()), cfg)?;
    let (native, stuck) = (h.snapshotter("native")?, h.snapshotter("stuck")?);
    let ctx = Ctx::new("bench")?;
    // Enough samples for a p99 that is not just the slowest call.
    let ops = n.max(50) * 4;
    let run = |tag: &str| -> Result<Stats> {
        let until = std::time::Instant::now() + STUCK_FOR / 2;
        let samples = (0..ops)
            .take_while(|_| std::time::Instant::now() < until)
            .map(|i| {
                let key = format!("{tag}-{i}");
                timed(|| {
                    native.prepare(&ctx, &key, None, &Labels::new())?;
                    native.remove(&ctx, &key)
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Stats::new(samples))
    };
    run("warm")?;
    let alone = run("alone")?;
    stuck.prepare(&ctx, "k", None, &Labels::new())?;
    let (tx, rx) = std::sync::mpsc::channel();
    let committing = {
        let stuck = stuck.clone();
        std::thread::spawn(move || {
            let ctx = Ctx::new("bench").expect("a valid namespace");
            let r = stuck.commit(&ctx, "stuck-name", "k", &Labels::new());
            let _ = tx.send(());
            r
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(50));
    let beside = run("beside")?;
    let still_stuck = rx.try_recv().is_err();
    // The guest's deadline ends the commit with unavailable.
    let ended = committing.join().map_err(|_| Error::internal("the stuck commit panicked"))?;
    if ended.is_ok() {
        return Err(Error::internal("the stuck guest's commit succeeded"));
    }
    let rows = vec![
        vec![
            "native prepare+remove p50".into(),
            fmt_d(alone.pct(0.5)),
            fmt_d(beside.pct(0.5)),
            ratio(alone.pct(0.5).as_secs_f64(), beside.pct(0.5).as_secs_f64()),
        ],
        vec![
            "native prepare+remove p99".into(),
            fmt_d(alone.pct(0.99)),
            fmt_d(beside.pct(0.99)),
            ratio(alone.pct(0.99).as_secs_f64(), beside.pct(0.99).as_secs_f64()),
        ],
    ];
    writeln!(out).map_err(io)?;
    table(out, &["BESIDE A GUEST STUCK IN COMMIT", "ALONE", "BESIDE", "BESIDE/ALONE"], &rows)?;
    if !still_stuck {
        writeln!(out, "  (the guest came unstuck before the run ended: the figures understate it)")
            .map_err(io)?;
    }
    Ok(())
}
