//! Garbage collection: containerd's mark and sweep, for snapshots, with one deliberate
//! difference.
//!
//! **Roots.** Snapshots created with no lease in effect (containerd, as a proxy client,
//! removes what its own collector collects, so wasnap must never collect what containerd
//! still records); snapshots labelled `containerd.io/gc.root`; snapshots whose
//! `containerd.io/gc.expire` time has not come; every snapshot an unexpired lease holds;
//! and, by the retention settings, recently used committed snapshots.
//! **References.** A snapshot holds its parent; unless held through a flat lease
//! (`containerd.io/gc.flat`), also what its `containerd.io/gc.ref.snapshot.<snapshotter>`
//! labels name; and a snapshot labelled `containerd.io/gc.bref.snapshot.<snapshotter>`
//! is held by the snapshot the label names.
//!
//! **Steps.** Mark and sweep happen in one metadata write transaction, so they see one
//! consistent state, and are bounded by [`GcOptions::max_pause`]: writers wait at most
//! that long. Expired leases go in the same transaction. Then each backend prunes what
//! no record names, children first, with no metadata lock held and every backend call
//! under [`GcOptions::backend_timeout`]; a backend that fails or hangs is reported and
//! retried next time. A crash at any step leaves records and backends that the next
//! collection reconciles: records are swept atomically, and pruning only ever removes
//! what no record names.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use redb::{ReadableMultimapTable, ReadableTable};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fault::Faults;
use crate::kv::{self, from_nanos};
use crate::metadata::MetaDb;
use crate::metadata::Snapshots;
use crate::metadata::db::{BKEYS, CHILDREN, SNAPSHOTS};
use crate::metadata::lease::{LABEL_GC_EXPIRE, LABEL_GC_FLAT, LEASE_RESOURCES, LEASES};
use crate::metadata::record::Record;
use crate::snapshot::Kind;

/// A snapshot label: the snapshot is a root.
pub const LABEL_GC_ROOT: &str = "containerd.io/gc.root";
/// A snapshot label prefix: `…<snapshotter>[/name] = key` holds that snapshot.
pub const LABEL_GC_REF_SNAPSHOT: &str = "containerd.io/gc.ref.snapshot.";
/// A snapshot label prefix: `…<snapshotter>[/name] = key` is held by that snapshot.
pub const LABEL_GC_BREF_SNAPSHOT: &str = "containerd.io/gc.bref.snapshot.";

/// The host's own retention, applied to committed snapshots that nothing else holds
/// (what buildkit's prune calls keep-duration and keep-storage).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Retention {
    /// Keep this many of the most recently used ones.
    pub keep_recent: usize,
    /// Keep those used within this long (seconds).
    pub keep_for_secs: Option<u64>,
}

/// How collections run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GcOptions {
    /// Longest mark and sweep may hold writers back (milliseconds); a collection that
    /// would take longer gives up and says so.
    pub max_pause_ms: u64,
    /// Longest any one backend call may take while pruning (milliseconds).
    pub backend_timeout_ms: u64,
    /// What to keep beyond what is held.
    pub retention: Retention,
    /// Collect after this many removals (0: never for this reason).
    pub deletion_threshold: u64,
    /// Collect after this many mutations of any kind (0: never for this reason).
    pub mutation_threshold: u64,
    /// Collect at least this often (seconds; 0: no timer).
    pub interval_secs: u64,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            max_pause_ms: 2_000,
            backend_timeout_ms: 60_000,
            retention: Retention::default(),
            deletion_threshold: 1,
            mutation_threshold: 1_000,
            interval_secs: 3_600,
        }
    }
}

impl GcOptions {
    fn max_pause(&self) -> Duration {
        Duration::from_millis(self.max_pause_ms)
    }
    fn backend_timeout(&self) -> Duration {
        Duration::from_millis(self.backend_timeout_ms)
    }
}

/// A snapshot record, as the collector names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SnapshotRef {
    /// Its snapshotter.
    pub snapshotter: String,
    /// Its namespace.
    pub namespace: String,
    /// Its key.
    pub key: String,
}

/// What a collection did (or, dry, would do), and how long each step took.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GcReport {
    /// Nothing was changed.
    pub dry_run: bool,
    /// Snapshot records removed.
    pub removed: Vec<SnapshotRef>,
    /// Expired leases removed: (namespace, id).
    pub expired_leases: Vec<(String, String)>,
    /// Backend snapshots pruned: (snapshotter, backend key).
    pub pruned: Vec<(String, String)>,
    /// What could not be done, retried next time: (what, why).
    pub failed: Vec<(String, String)>,
    /// Time to mark.
    pub mark: Duration,
    /// Time to sweep (the rest of the write transaction).
    pub sweep: Duration,
    /// Time to prune the backends.
    pub prune: Duration,
}

type Node = (String, String, String); // (snapshotter, namespace, key)
type LeaseId = (String, String); // (namespace, id)

/// Runs collections over a metadata database.
#[derive(Debug)]
pub struct Collector {
    db: Arc<MetaDb>,
    faults: Arc<Faults>,
    opts: GcOptions,
    /// One collection at a time.
    running: Mutex<()>,
}

fn label_target<'a>(key: &'a str, prefix: &str, value: &'a str) -> Option<(&'a str, &'a str)> {
    let rest = key.strip_prefix(prefix)?;
    let snapshotter = rest.split('/').next().unwrap_or(rest);
    (!snapshotter.is_empty() && !value.is_empty()).then_some((snapshotter, value))
}

impl Collector {
    /// A collector for `db`.
    pub fn new(db: Arc<MetaDb>, faults: Arc<Faults>, opts: GcOptions) -> Self {
        Collector { db, faults, opts, running: Mutex::new(()) }
    }

    /// The options in force.
    pub fn options(&self) -> &GcOptions {
        &self.opts
    }

    /// One collection: mark, sweep, then prune `backends` (the snapshotters that are
    /// open; others are pruned when next collected with them open).
    pub fn collect(&self, backends: &[Arc<Snapshots>], dry_run: bool) -> Result<GcReport> {
        let _one = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let mut report = GcReport { dry_run, ..GcReport::default() };
        let started = Instant::now();
        let txn = self.db.write()?;
        let (removed, expired) = self.mark(&txn)?;
        report.mark = started.elapsed();
        if started.elapsed() > self.opts.max_pause() {
            return Err(Error::Unavailable(format!(
                "collection gave up: marking took {:?}, more than the {:?} writers may be held",
                started.elapsed(),
                self.opts.max_pause()
            )));
        }
        let sweep_start = Instant::now();
        if dry_run {
            drop(txn);
        } else {
            self.sweep(&txn, &removed, &expired)?;
            self.faults.hit("gc.sweep.before-commit")?;
            txn.commit().map_err(kv::e)?;
        }
        report.sweep = sweep_start.elapsed();
        report.removed = removed
            .into_iter()
            .map(|(snapshotter, namespace, key)| SnapshotRef { snapshotter, namespace, key })
            .collect();
        report.removed.sort();
        report.expired_leases = expired;

        let prune_start = Instant::now();
        self.faults.hit("gc.before-prune")?;
        for sn in backends {
            if dry_run {
                // What a prune would remove now; with the sweep not done, the backend
                // snapshots of swept records are listed above, not here.
                match sn.orphans(self.opts.backend_timeout()) {
                    Ok(orphans) => {
                        report.pruned.extend(orphans.into_iter().map(|k| (sn.name().to_owned(), k)))
                    }
                    Err(e) => {
                        report.failed.push((format!("snapshotter {:?}", sn.name()), e.to_string()))
                    }
                }
                continue;
            }
            match sn.prune(self.opts.backend_timeout(), true) {
                Ok(p) => {
                    report.pruned.extend(p.removed.into_iter().map(|k| (sn.name().to_owned(), k)));
                    report.failed.extend(
                        p.failed.into_iter().map(|(k, e)| (format!("{}: {k}", sn.name()), e)),
                    );
                }
                Err(e) => {
                    report.failed.push((format!("snapshotter {:?}", sn.name()), e.to_string()))
                }
            }
        }
        report.prune = prune_start.elapsed();
        Ok(report)
    }

    /// Marks from the roots; returns the unmarked records and the expired leases.
    fn mark(&self, txn: &redb::WriteTransaction) -> Result<(Vec<Node>, Vec<LeaseId>)> {
        let now = SystemTime::now();
        let mut records: HashMap<Node, Record> = HashMap::new();
        {
            let t = txn.open_table(SNAPSHOTS).map_err(kv::e)?;
            for item in t.iter().map_err(kv::e)? {
                let (k, v) = item.map_err(kv::e)?;
                let (sn, ns, key) = k.value();
                records.insert((sn.into(), ns.into(), key.into()), Record::decode(v.value(), key)?);
            }
        }
        // Roots, each with whether it is held flat.
        let mut queue: VecDeque<(Node, bool)> = VecDeque::new();
        let mut expired = Vec::new();
        {
            let leases = txn.open_table(LEASES).map_err(kv::e)?;
            let resources = txn.open_multimap_table(LEASE_RESOURCES).map_err(kv::e)?;
            for item in leases.iter().map_err(kv::e)? {
                let (k, v) = item.map_err(kv::e)?;
                let (ns, id) = k.value();
                let stored: serde_json::Value =
                    serde_json::from_slice(v.value()).unwrap_or_default();
                let label = |name: &str| stored["labels"][name].as_str().map(str::to_owned);
                let expires =
                    label(LABEL_GC_EXPIRE).and_then(|e| humantime::parse_rfc3339_weak(&e).ok());
                if expires.is_some_and(|t| t < now) {
                    expired.push((ns.to_owned(), id.to_owned()));
                    continue;
                }
                let flat = label(LABEL_GC_FLAT).is_some();
                for r in resources.get((ns, id)).map_err(kv::e)? {
                    let r = r.map_err(kv::e)?;
                    let (kind, key) = r.value();
                    if let Some(sn) = kind.strip_prefix("snapshots/") {
                        queue.push_back(((sn.into(), ns.into(), key.into()), flat));
                    }
                }
            }
        }
        let mut held_by: HashMap<Node, Vec<Node>> = HashMap::new();
        for (node, rec) in &records {
            let (_, ns, _) = node;
            let mut root = !rec.collectable && !rec.labels.contains_key(LABEL_GC_EXPIRE);
            for (k, v) in &rec.labels {
                if k.starts_with(LABEL_GC_ROOT) {
                    root = true;
                } else if k == LABEL_GC_EXPIRE {
                    // Held until it expires; an unreadable time holds it, to be safe.
                    root |= humantime::parse_rfc3339_weak(v).map_or(true, |t| t >= now);
                } else if let Some((bsn, bkey)) = label_target(k, LABEL_GC_BREF_SNAPSHOT, v) {
                    held_by
                        .entry((bsn.into(), ns.clone(), bkey.into()))
                        .or_default()
                        .push(node.clone());
                }
            }
            if root {
                queue.push_back((node.clone(), false));
            }
        }
        let mut marked: HashMap<Node, bool> = HashMap::new(); // node -> marked non-flat
        let visit = |queue: &mut VecDeque<(Node, bool)>, marked: &mut HashMap<Node, bool>| {
            while let Some((node, flat)) = queue.pop_front() {
                match marked.get(&node) {
                    Some(done_full) if *done_full || flat => continue,
                    _ => {}
                }
                marked.insert(node.clone(), !flat);
                if let Some(holders) = held_by.get(&node) {
                    queue.extend(holders.iter().map(|h| (h.clone(), false)));
                }
                let Some(rec) = records.get(&node) else { continue };
                let (sn, ns, _) = &node;
                if let Some(p) = &rec.parent {
                    queue.push_back(((sn.clone(), ns.clone(), p.clone()), flat));
                }
                if !flat {
                    for (k, v) in &rec.labels {
                        if let Some((rsn, rkey)) = label_target(k, LABEL_GC_REF_SNAPSHOT, v) {
                            queue.push_back(((rsn.into(), ns.clone(), rkey.into()), false));
                        }
                    }
                }
            }
        };
        visit(&mut queue, &mut marked);

        // Retention: among committed snapshots nothing holds, keep the most recently
        // used ones the settings ask for (and what they hold).
        let r = &self.opts.retention;
        if r.keep_recent > 0 || r.keep_for_secs.is_some() {
            let mut unheld: Vec<(&Node, u64)> = records
                .iter()
                .filter(|(n, rec)| rec.kind == Kind::Committed && !marked.contains_key(*n))
                .map(|(n, rec)| (n, rec.updated))
                .collect();
            unheld.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
            for (i, (node, updated)) in unheld.into_iter().enumerate() {
                let recent = i < r.keep_recent;
                let young = r.keep_for_secs.is_some_and(|secs| {
                    now.duration_since(from_nanos(updated)).map_or(true, |age| age.as_secs() < secs)
                });
                if recent || young {
                    queue.push_back((node.clone(), false));
                }
            }
            visit(&mut queue, &mut marked);
        }

        let mut removed: Vec<Node> =
            records.keys().filter(|n| !marked.contains_key(*n)).cloned().collect();
        removed.sort();
        Ok((removed, expired))
    }

    fn sweep(
        &self,
        txn: &redb::WriteTransaction,
        removed: &[Node],
        expired: &[(String, String)],
    ) -> Result<()> {
        let mut t = txn.open_table(SNAPSHOTS).map_err(kv::e)?;
        let mut children = txn.open_multimap_table(CHILDREN).map_err(kv::e)?;
        let mut bkeys = txn.open_multimap_table(BKEYS).map_err(kv::e)?;
        for (sn, ns, key) in removed {
            let Some(rec) = t.remove((sn.as_str(), ns.as_str(), key.as_str())).map_err(kv::e)?
            else {
                continue;
            };
            let rec = Record::decode(rec.value(), key)?;
            if let Some(p) = &rec.parent {
                children
                    .remove((sn.as_str(), ns.as_str(), p.as_str()), key.as_str())
                    .map_err(kv::e)?;
            }
            children.remove_all((sn.as_str(), ns.as_str(), key.as_str())).map_err(kv::e)?;
            bkeys
                .remove((sn.as_str(), rec.bkey.as_str()), (ns.as_str(), key.as_str()))
                .map_err(kv::e)?;
        }
        let mut leases = txn.open_table(LEASES).map_err(kv::e)?;
        let mut resources = txn.open_multimap_table(LEASE_RESOURCES).map_err(kv::e)?;
        for (ns, id) in expired {
            leases.remove((ns.as_str(), id.as_str())).map_err(kv::e)?;
            resources.remove_all((ns.as_str(), id.as_str())).map_err(kv::e)?;
        }
        Ok(())
    }
}

/// What makes the scheduler collect: counts of deletions and mutations since the last
/// collection, bumped by the metadata layer.
#[derive(Debug, Default)]
pub struct Trigger {
    state: Mutex<TriggerState>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct TriggerState {
    deletions: u64,
    mutations: u64,
    stop: bool,
}

impl Trigger {
    /// A removal happened.
    pub fn deletion(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.deletions += 1;
        s.mutations += 1;
        self.wake.notify_all();
    }

    /// Some other mutation happened.
    pub fn mutation(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.mutations += 1;
        self.wake.notify_all();
    }
}

/// Runs collections in the background when deletions, mutations or time call for it.
#[derive(Debug)]
pub struct Scheduler {
    trigger: Arc<Trigger>,
    thread: Option<JoinHandle<()>>,
}

impl Scheduler {
    /// Starts collecting with `collect` as `opts` and `trigger` call for it.
    pub fn start(
        trigger: Arc<Trigger>,
        opts: GcOptions,
        collect: impl Fn() -> Result<GcReport> + Send + 'static,
    ) -> Result<Self> {
        let t = trigger.clone();
        let thread = std::thread::Builder::new()
            .name("wasnap-gc".into())
            .spawn(move || {
                let interval = (opts.interval_secs > 0).then(|| Duration::from_secs(opts.interval_secs));
                let mut last = Instant::now();
                loop {
                    let mut s = t.state.lock().unwrap_or_else(|e| e.into_inner());
                    loop {
                        if s.stop {
                            return;
                        }
                        let by_deletions = opts.deletion_threshold > 0 && s.deletions >= opts.deletion_threshold;
                        let by_mutations = opts.mutation_threshold > 0 && s.mutations >= opts.mutation_threshold;
                        let by_time = interval.is_some_and(|i| last.elapsed() >= i);
                        if by_deletions || by_mutations || by_time {
                            break;
                        }
                        let wait = interval.map_or(Duration::from_secs(3600), |i| i.saturating_sub(last.elapsed()));
                        s = t.wake.wait_timeout(s, wait).unwrap_or_else(|e| e.into_inner()).0;
                    }
                    s.deletions = 0;
                    s.mutations = 0;
                    drop(s);
                    last = Instant::now();
                    match collect() {
                        Ok(r) => tracing::info!(
                            removed = r.removed.len(), pruned = r.pruned.len(), failed = r.failed.len(),
                            mark = ?r.mark, sweep = ?r.sweep, prune = ?r.prune, "garbage collection"
                        ),
                        Err(e) => tracing::warn!(error = %e, "garbage collection failed; will retry"),
                    }
                }
            })
            .map_err(|e| Error::internal("start the collector thread", e))?;
        Ok(Scheduler { trigger, thread: Some(thread) })
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.trigger.state.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
        self.trigger.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
