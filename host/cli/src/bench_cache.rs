//! The cache section of `wasnap bench`: `du` and prune's plan (`--dry-run`) at 100k
//! snapshots, then a real prune.
//!
//! The snapshots are made through the real metadata layer (prepare, commit, leases,
//! uses) over a backend that keeps its snapshots in memory and answers `usage` with a
//! stored figure, as native drivers do for committed snapshots: what is measured is
//! the metadata's work, which is what `du` and the plan cost whatever the driver.
//! Chains of 10 layers; a tenth of the chains held by a lease, a twentieth with a
//! container (an active snapshot) on top, every chain used at its own time.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use wasnap::error::{Error, Result};
use wasnap::fault::Faults;
use wasnap::filter::Filter;
use wasnap::metadata::{Ctx, Leases, MetaDb, PrunePolicy, Scope, Snapshotter};
use wasnap::snapshot::{Info, Kind, Labels, Mount, Usage};
use wasnap::{Backend, FieldPath};

use crate::output::table;
use crate::stats::fmt_d;

/// Layers per chain.
const DEPTH: usize = 10;

fn io(e: std::io::Error) -> Error {
    Error::from(e).context("bench")
}

/// A backend in memory: snapshots with a size each, no data.
#[derive(Default)]
struct Memory {
    snaps: Mutex<HashMap<String, (Info, u64)>>,
}

impl Memory {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Info, u64)>> {
        self.snaps.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn make(&self, key: &str, parent: Option<&str>, kind: Kind) -> Result<Vec<Mount>> {
        let now = SystemTime::now();
        let info = Info {
            name: key.to_owned(),
            parent: parent.map(str::to_owned),
            kind,
            labels: Labels::new(),
            created: now,
            updated: now,
        };
        let mut snaps = self.lock();
        if snaps.contains_key(key) {
            return Err(Error::already_exists(format!("snapshot {key:?}")));
        }
        snaps.insert(key.to_owned(), (info, 0));
        let ro = if kind == Kind::View { "ro" } else { "rw" };
        Ok(vec![Mount {
            kind: "bind".into(),
            source: "/var/empty".into(),
            target: String::new(),
            options: vec!["rbind".into(), ro.into()],
        }])
    }
}

impl Backend for Memory {
    fn stat(&self, key: &str) -> Result<Info> {
        self.lock().get(key).map(|(i, _)| i.clone()).ok_or_else(|| Error::not_found(key))
    }
    fn update(&self, info: &Info, _: &[FieldPath]) -> Result<Info> {
        Ok(info.clone())
    }
    fn usage(&self, key: &str) -> Result<Usage> {
        let size = self.lock().get(key).map(|(_, s)| *s).ok_or_else(|| Error::not_found(key))?;
        Ok(Usage { size, inodes: 1 })
    }
    fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let kind = self.stat(key)?.kind;
        let ro = if kind == Kind::Active { "rw" } else { "ro" };
        Ok(vec![Mount {
            kind: "bind".into(),
            source: "/var/empty".into(),
            target: String::new(),
            options: vec!["rbind".into(), ro.into()],
        }])
    }
    fn prepare(&self, key: &str, parent: Option<&str>, _: &Labels) -> Result<Vec<Mount>> {
        self.make(key, parent, Kind::Active)
    }
    fn view(&self, key: &str, parent: Option<&str>, _: &Labels) -> Result<Vec<Mount>> {
        self.make(key, parent, Kind::View)
    }
    fn commit(&self, name: &str, key: &str, _: &Labels) -> Result<()> {
        let mut snaps = self.lock();
        let (mut info, _) = snaps.remove(key).ok_or_else(|| Error::not_found(key))?;
        info.name = name.to_owned();
        info.kind = Kind::Committed;
        // Sizes from 64 KiB to 4 MiB, spread by the key.
        let size = 64 << 10 << (name.len() % 7);
        snaps.insert(name.to_owned(), (info, size));
        Ok(())
    }
    fn remove(&self, key: &str) -> Result<()> {
        self.lock().remove(key).map(drop).ok_or_else(|| Error::not_found(key))
    }
    fn walk(&self, filter: &Filter, f: &mut dyn FnMut(Info) -> Result<()>) -> Result<()> {
        let infos: Vec<Info> = self.lock().values().map(|(i, _)| i.clone()).collect();
        infos.into_iter().filter(|i| filter.matches(i)).try_for_each(f)
    }
    fn cleanup(&self) -> Result<()> {
        Ok(())
    }
    fn close(&self) -> Result<()> {
        Ok(())
    }
}

/// Makes `chains` chains of [`DEPTH`] committed layers on `threads` threads.
fn fill(sn: &Snapshotter, leases: &Leases, ctx: &Ctx, chains: usize) -> Result<()> {
    let lease = leases.create(ctx, Some("bench-keep"), &Labels::new())?;
    let leased = ctx.clone().with_lease(Some(lease.id));
    let threads = 4;
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (leased, ctx) = (&leased, ctx);
                s.spawn(move || -> Result<()> {
                    for c in (t..chains).step_by(threads) {
                        let ctx = if c % 10 == 0 { leased } else { ctx };
                        let mut parent: Option<String> = None;
                        for d in 0..DEPTH {
                            let name = format!("c{c}-l{d}");
                            let mut labels = Labels::new();
                            if d == DEPTH - 1 {
                                let kind = if c % 3 == 0 { "source.local" } else { "regular" };
                                labels.insert("wasnap.io/record-type".into(), kind.into());
                                labels.insert("wasnap.io/description".into(), format!("chain {c}"));
                            }
                            sn.prepare(
                                ctx,
                                &format!("a{c}-{d}"),
                                parent.as_deref(),
                                &Labels::new(),
                            )?;
                            sn.commit(ctx, &name, &format!("a{c}-{d}"), &labels)?;
                            parent = Some(name);
                        }
                        if c % 20 == 0 {
                            sn.prepare(
                                ctx,
                                &format!("container-{c}"),
                                parent.as_deref(),
                                &Labels::new(),
                            )?;
                        } else if c % 2 == 0 {
                            sn.touch(ctx, parent.as_deref().unwrap_or_default())?;
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().map_err(|_| Error::internal("fill panicked"))?)
    })
}

fn time<T>(f: impl FnOnce() -> Result<T>) -> Result<(Duration, T)> {
    let t = Instant::now();
    let v = f()?;
    Ok((t.elapsed(), v))
}

/// Runs the section in a fresh root under `base`.
pub fn run(base: &Path, smoke: bool, out: &mut dyn Write) -> Result<()> {
    let tmp =
        tempfile::Builder::new().prefix("wasnap-bench-cache-").tempdir_in(base).map_err(io)?;
    let dir =
        cap_std::fs::Dir::open_ambient_dir(tmp.path(), cap_std::ambient_authority()).map_err(io)?;
    let db = Arc::new(MetaDb::open(&dir)?);
    let sn =
        Snapshotter::new(db.clone(), "bench", Arc::new(Memory::default()), Arc::new(Faults::new()));
    let leases = Leases::new(db);
    let ctx = Ctx::new("bench")?;
    let chains = if smoke { 200 } else { 10_000 };
    writeln!(
        out,
        "wasnap bench: cache, {} snapshots in chains of {DEPTH}, metadata on {} ({})",
        chains * DEPTH,
        base.display(),
        wasnap::probe::filesystem_name(base)
    )
    .map_err(io)?;
    let (filled, ()) = time(|| fill(&sn, &leases, &ctx, chains))?;
    let mut rows = vec![vec![
        format!("make {} snapshots (prepare+commit, 4 threads)", chains * DEPTH),
        fmt_d(filled),
        String::new(),
    ]];
    let (first, du) = time(|| sn.du(&ctx, &[], false))?;
    rows.push(vec![
        "du, sizes asked of the backend once".into(),
        fmt_d(first),
        format!("{} records", du.records.len()),
    ]);
    let mut best = Duration::MAX;
    for _ in 0..3 {
        best = best.min(time(|| sn.du(&ctx, &[], false))?.0);
    }
    rows.push(vec![
        "du".into(),
        fmt_d(best),
        format!(
            "{} reclaimable of {}",
            crate::output::human_bytes(du.reclaimable),
            crate::output::human_bytes(du.total)
        ),
    ]);
    let filtered = vec!["type==source.local".to_owned()];
    let mut best = (Duration::MAX, 0);
    for _ in 0..3 {
        let (t, du) = time(|| sn.du(&ctx, &filtered, false))?;
        best = best.min((t, du.records.len()));
    }
    rows.push(vec![
        "du --filter type==source.local".into(),
        fmt_d(best.0),
        format!("{} records", best.1),
    ]);
    let scope = Scope::Namespace(ctx.namespace());
    for (what, policy) in [
        ("prune --dry-run", PrunePolicy::default()),
        ("prune --dry-run --all", PrunePolicy { all: true, ..PrunePolicy::default() }),
        (
            "prune --dry-run --keep-storage (half)",
            PrunePolicy { keep_storage: du_total(&sn, &ctx)? / 2, ..PrunePolicy::default() },
        ),
        (
            "prune --dry-run --keep-duration 1h",
            PrunePolicy { keep_duration: Duration::from_secs(3600), ..PrunePolicy::default() },
        ),
    ] {
        let mut best = (Duration::MAX, 0);
        for _ in 0..3 {
            let (t, r) = time(|| sn.prune_cache(scope, &policy, 0, true, &mut |_| {}))?;
            best = best.min((t, r.removed.len()));
        }
        rows.push(vec![what.into(), fmt_d(best.0), format!("{} would go", best.1)]);
    }
    // A real prune of a tenth of the cache: records in bounded writes, then the backend.
    let total = du_total(&sn, &ctx)?;
    let policy = PrunePolicy { keep_storage: total - total / 10, ..PrunePolicy::default() };
    let (t, r) = time(|| sn.prune_cache(scope, &policy, 0, false, &mut |_| {}))?;
    rows.push(vec![
        "prune --keep-storage (90%)".into(),
        fmt_d(t),
        format!("{} removed, {:.0}/s", r.removed.len(), r.removed.len() as f64 / t.as_secs_f64()),
    ]);
    table(out, &["CACHE", "TIME", ""], &rows)?;
    sn.close()
}

fn du_total(sn: &Snapshotter, ctx: &Ctx) -> Result<u64> {
    Ok(sn.du(ctx, &[], false)?.private)
}
