//! Garbage collection: what runs a collection, and when.
//!
//! Mark and sweep live beside the tables they read ([`crate::metadata::gc`]); this
//! module owns the options, the order of the steps, the pruning of backends under
//! deadlines, and the scheduler.
//!
//! **Steps.** Mark and sweep happen in one metadata write, so they see one consistent
//! state, and are bounded by [`GcOptions::max_pause`]: writers wait at most that long.
//! Expired leases go in the same write. Then each backend prunes what no record names,
//! children first, with no metadata lock held and every backend call under
//! [`GcOptions::backend_timeout`]; a backend that fails or hangs is reported and
//! retried next time. A crash at any step leaves records and backends that the next
//! collection reconciles: records are swept atomically, and pruning only ever removes
//! what no record names.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::content::ContentStore;
use crate::digest::Digest;
use crate::error::{Context, Error, Result};
use crate::fault::Faults;
use crate::kv::Durability;
use crate::metadata::gc::{Marked, mark_and_sweep, mark_read};
use crate::metadata::{Changes, MetaDb, PrunePolicy, Snapshotter};

pub use crate::metadata::gc::{
    LABEL_GC_BREF_SNAPSHOT, LABEL_GC_REF_SNAPSHOT, LABEL_GC_ROOT, Retention,
};

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
    /// Most of the time that collections called for by deletions and mutations may
    /// take, in percent (containerd's `pause_threshold`): after one that took `d`, the
    /// next waits until `d × (100 / p − 1)` has passed, so a stream of removals is
    /// collected after, not between, each other's calls. 0: no pacing.
    pub max_time_share_percent: u64,
    /// Prune policies (`[[gc.prune]]`), applied in order before each scheduled
    /// collection, as buildkit applies its GC policy list.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub prune: Vec<ScheduledPrune>,
}

/// One prune policy of the configuration: buildkit's knobs, and where they apply.
///
/// ```toml
/// [[gc.prune]]                  # reproducible records unused for two days
/// filters = ["type==source.local", "type==exec.cachemount"]
/// keep_duration = "48h"
///
/// [[gc.prune]]                  # then everything, down to 10 GiB
/// all = true
/// keep_storage = "10GB"
/// min_free_space = "5GB"
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduledPrune {
    /// The snapshotters it prunes (every configured one that opens, if none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub snapshotters: Vec<String>,
    /// The namespaces it prunes, each on its own (all of them together, if none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// See [`PrunePolicy::all`].
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
    /// See [`PrunePolicy::filters`].
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<String>,
    /// See [`PrunePolicy::keep_duration`] (`48h`, `7days`).
    #[serde(
        with = "crate::metadata::prune::duration_text",
        skip_serializing_if = "Duration::is_zero"
    )]
    pub keep_duration: Duration,
    /// See [`PrunePolicy::keep_storage`] (bytes, or a size like `10GB`).
    #[serde(with = "crate::metadata::prune::bytes_text", skip_serializing_if = "is_zero")]
    pub keep_storage: u64,
    /// See [`PrunePolicy::reserved_space`].
    #[serde(with = "crate::metadata::prune::bytes_text", skip_serializing_if = "is_zero")]
    pub reserved_space: u64,
    /// See [`PrunePolicy::min_free_space`].
    #[serde(with = "crate::metadata::prune::bytes_text", skip_serializing_if = "is_zero")]
    pub min_free_space: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl ScheduledPrune {
    /// The policy it applies; invalid-argument if its filters do not parse (the
    /// configuration checks this when it is read).
    pub fn policy(&self) -> Result<PrunePolicy> {
        crate::filter::Filter::parse_all(&self.filters)
            .map_err(|e| e.context("[[gc.prune]] filters"))?;
        Ok(PrunePolicy {
            all: self.all,
            filters: self.filters.clone(),
            keep_duration: self.keep_duration,
            keep_storage: self.keep_storage,
            reserved_space: self.reserved_space,
            min_free_space: self.min_free_space,
        })
    }
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
            max_time_share_percent: 2,
            prune: Vec::new(),
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
    /// Blob records removed: (namespace, digest).
    #[serde(default)]
    pub removed_content: Vec<(String, String)>,
    /// Blob files deleted, once no namespace recorded them.
    #[serde(default)]
    pub deleted_blobs: Vec<String>,
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
    /// The lease deleted just before this collection (a sync lease delete), whose
    /// report this is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted_lease: Option<String>,
}

/// One collection as an observer sees it, once it has ended.
#[derive(Debug)]
pub struct Collected<'a> {
    /// It was a dry run: nothing was changed.
    pub dry_run: bool,
    /// How long it ran (not counting any wait for the collection before it).
    pub elapsed: Duration,
    /// What it did, or why it stopped.
    pub result: std::result::Result<&'a GcReport, &'a Error>,
}

/// Told of every collection (the daemon's metrics).
type Observer = Box<dyn Fn(&Collected<'_>) + Send + Sync>;

/// Runs collections over a metadata database.
pub struct Collector {
    db: Arc<MetaDb>,
    faults: Arc<Faults>,
    opts: GcOptions,
    /// One collection at a time.
    running: Mutex<()>,
    observer: OnceLock<Observer>,
    /// Whose unrecorded blob files a collection deletes.
    content: Option<Arc<ContentStore>>,
    /// The blob directory has been listed whole since this collector started.
    content_scanned: AtomicBool,
}

impl std::fmt::Debug for Collector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collector")
            .field("opts", &self.opts)
            .field("observed", &self.observer.get().is_some())
            .finish_non_exhaustive()
    }
}

impl Collector {
    /// A collector for `db`.
    pub fn new(db: Arc<MetaDb>, faults: Arc<Faults>, opts: GcOptions) -> Self {
        Collector {
            db,
            faults,
            opts,
            running: Mutex::new(()),
            observer: OnceLock::new(),
            content: None,
            content_scanned: AtomicBool::new(false),
        }
    }

    /// The same collector, deleting `content`'s blob files once their last record is
    /// swept.
    #[must_use]
    pub fn with_content(mut self, content: Arc<ContentStore>) -> Self {
        self.content = Some(content);
        self
    }

    /// Runs `f` while no collection runs: one in progress is waited for, and none
    /// starts until `f` returns. A check made this way never sees a collection's work
    /// half done (records swept, their backend snapshots not pruned yet) as orphans.
    pub fn between_collections<T>(&self, f: impl FnOnce() -> T) -> T {
        let _one = self.running.lock().unwrap_or_else(|e| e.into_inner());
        f()
    }

    /// The options in force.
    pub fn options(&self) -> &GcOptions {
        &self.opts
    }

    /// Calls `f` at the end of every collection from now on, dry or not, whether it
    /// succeeded or failed. It runs on the collecting thread, with the collection lock
    /// held: keep it quick. One observer per collector: a second is refused
    /// (failed-precondition).
    pub fn observe(&self, f: impl Fn(&Collected<'_>) + Send + Sync + 'static) -> Result<()> {
        self.observer
            .set(Box::new(f))
            .map_err(|_| Error::failed_precondition("the collector already has an observer"))
    }

    /// One collection: mark, sweep, then prune `backends` (the snapshotters that are
    /// open; others are pruned when next collected with them open).
    pub fn collect(&self, backends: &[Arc<Snapshotter>], dry_run: bool) -> Result<GcReport> {
        self.collect_after(backends, dry_run, || Ok(()))
    }

    /// As [`Collector::collect`], with `before` run first under the collection lock: no
    /// other collection runs between what `before` changes (a lease it deletes) and
    /// this one's mark, so the report shows what that change let go. If `before` fails,
    /// nothing is collected.
    pub fn collect_after(
        &self,
        backends: &[Arc<Snapshotter>],
        dry_run: bool,
        before: impl FnOnce() -> Result<()>,
    ) -> Result<GcReport> {
        let _one = self.running.lock().unwrap_or_else(|e| e.into_inner());
        before()?;
        let started = Instant::now();
        let result = self.run(backends, dry_run);
        if let Some(observe) = self.observer.get() {
            observe(&Collected { dry_run, elapsed: started.elapsed(), result: result.as_ref() });
        }
        result
    }

    fn run(&self, backends: &[Arc<Snapshotter>], dry_run: bool) -> Result<GcReport> {
        let mut report = GcReport { dry_run, ..GcReport::default() };
        let started = Instant::now();
        let (Marked { removed, removed_content, expired }, mark, sweep) = if dry_run {
            (
                self.db.read_with(|txn| mark_read(txn, &self.opts.retention))?,
                started.elapsed(),
                Duration::ZERO,
            )
        } else {
            let (retention, max_pause, faults) =
                (self.opts.retention.clone(), self.opts.max_pause(), self.faults.clone());
            self.db.write(Durability::Immediate, move |txn| {
                let held = Instant::now();
                let marked = mark_and_sweep(txn, &retention)?;
                if held.elapsed() > max_pause {
                    return Err(Error::unavailable(format!(
                        "collection gave up: mark and sweep took {:?}, more than the {max_pause:?} writers may be held",
                        held.elapsed()
                    )));
                }
                faults.hit("gc.sweep.before-commit")?;
                Ok(marked)
            })?
        };
        report.mark = mark;
        report.sweep = sweep;
        report.removed = removed
            .into_iter()
            .map(|(snapshotter, namespace, key)| SnapshotRef { snapshotter, namespace, key })
            .collect();
        report.removed.sort();
        report.expired_leases = expired;
        report.removed_content = removed_content;

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
        if let Some(content) = self.content.as_ref().filter(|_| !dry_run) {
            // The blob directory is listed whole once per process (what a crash left:
            // a file whose record was never written or already swept); after that only
            // the blobs this sweep unrecorded are candidates, so a collection after each
            // removal does not list every blob.
            let full = !self.content_scanned.load(Ordering::Relaxed);
            let swept: Vec<Digest> =
                report.removed_content.iter().filter_map(|(_, d)| Digest::parse(d).ok()).collect();
            let candidates = if full { None } else { Some(swept.as_slice()) };
            match content.remove_unrecorded(candidates) {
                Ok(deleted) => {
                    self.content_scanned.store(true, Ordering::Relaxed);
                    report.deleted_blobs = deleted.iter().map(|d| d.to_string()).collect()
                }
                Err(e) => {
                    self.content_scanned.store(false, Ordering::Relaxed);
                    report.failed.push(("content store".to_owned(), e.to_string()))
                }
            }
        }
        report.prune = prune_start.elapsed();
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::Action;

    #[test]
    fn observers_see_every_collection_and_how_it_ended() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = cap_std::fs::Dir::open_ambient_dir(tmp.path(), cap_std::ambient_authority())
            .expect("open dir");
        let faults = Arc::new(Faults::new());
        let db = Arc::new(MetaDb::open(&dir).expect("open db"));
        let collector = Collector::new(db, faults.clone(), GcOptions::default());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        collector
            .observe(move |c| {
                let ended = c.result.map(|r| r.dry_run).map_err(|e| e.to_string());
                log.lock().expect("log").push((c.dry_run, ended));
            })
            .expect("first observer");
        assert!(collector.observe(|_| {}).is_err(), "a second observer is refused");

        collector.collect(&[], false).expect("collect");
        collector.collect(&[], true).expect("dry run");
        faults.arm("gc.before-prune", Action::Error);
        assert!(collector.collect(&[], false).is_err());

        let seen = seen.lock().expect("log");
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert_eq!(seen[0], (false, Ok(false)));
        assert_eq!(seen[1], (true, Ok(true)));
        assert!(!seen[2].0 && seen[2].1.as_ref().is_err_and(|e| e.contains("gc.before-prune")));
    }
}

/// What makes the scheduler collect: counts of deletions and mutations since the last
/// collection, bumped by the metadata layer.
///
/// Every call that changes the metadata bumps a count, so the collector's thread is
/// woken only when a count reaches its threshold: below it the thread has nothing to
/// decide, and past it the thread already knows (it is waiting for its pacing, with a
/// timeout). Before a scheduler says its thresholds, every change wakes it.
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
    /// The scheduler's (deletion, mutation) thresholds, 0 for one it does not use;
    /// None until a scheduler starts.
    thresholds: Option<(u64, u64)>,
    /// Times a change woke the collector's thread.
    wakes: u64,
}

impl TriggerState {
    /// Whether the change just counted brought a count to its threshold.
    fn reached(&self) -> bool {
        match self.thresholds {
            None => true,
            Some((deletions, mutations)) => {
                (deletions > 0 && self.deletions == deletions)
                    || (mutations > 0 && self.mutations == mutations)
            }
        }
    }
}

impl Trigger {
    fn bump(&self, deletion: bool) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if deletion {
            s.deletions += 1;
        }
        s.mutations += 1;
        if s.reached() {
            s.wakes += 1;
            self.wake.notify_all();
        }
    }

    /// Times a change has woken the collector's thread.
    pub fn wakes(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).wakes
    }
}

impl Changes for Trigger {
    fn deletion(&self) {
        self.bump(true);
    }

    fn mutation(&self) {
        self.bump(false);
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
        t.state.lock().unwrap_or_else(|e| e.into_inner()).thresholds =
            Some((opts.deletion_threshold, opts.mutation_threshold));
        let thread = std::thread::Builder::new()
            .name("wasnap-gc".into())
            .spawn(move || {
                let interval = (opts.interval_secs > 0).then(|| Duration::from_secs(opts.interval_secs));
                let mut last = Instant::now();
                // When the last collection allows the next one called for by changes.
                let mut paced_until = last;
                loop {
                    let mut s = t.state.lock().unwrap_or_else(|e| e.into_inner());
                    loop {
                        if s.stop {
                            return;
                        }
                        let by_deletions = opts.deletion_threshold > 0 && s.deletions >= opts.deletion_threshold;
                        let by_mutations = opts.mutation_threshold > 0 && s.mutations >= opts.mutation_threshold;
                        let by_time = interval.is_some_and(|i| last.elapsed() >= i);
                        let paced = paced_until.saturating_duration_since(Instant::now());
                        if by_time || ((by_deletions || by_mutations) && paced.is_zero()) {
                            break;
                        }
                        let mut wait = interval.map_or(Duration::from_secs(3600), |i| i.saturating_sub(last.elapsed()));
                        if by_deletions || by_mutations {
                            wait = wait.min(paced);
                        }
                        s = t.wake.wait_timeout(s, wait).unwrap_or_else(|e| e.into_inner()).0;
                    }
                    s.deletions = 0;
                    s.mutations = 0;
                    drop(s);
                    last = Instant::now();
                    let result = collect();
                    if let Some(share) = (1..100).contains(&opts.max_time_share_percent).then_some(opts.max_time_share_percent) {
                        let took = last.elapsed();
                        paced_until = Instant::now() + took.mul_f64(100.0 / share as f64 - 1.0);
                    }
                    match result {
                        Ok(r) => tracing::info!(
                            removed = r.removed.len(), pruned = r.pruned.len(), failed = r.failed.len(),
                            mark = ?r.mark, sweep = ?r.sweep, prune = ?r.prune, "garbage collection"
                        ),
                        Err(e) => tracing::warn!(error = %e, "garbage collection failed; will retry"),
                    }
                }
            })
            .with_context(|| "start the collector thread")?;
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

#[cfg(test)]
mod pacing {
    use super::*;

    /// A scheduler on a new trigger with `(deletion, mutation)` thresholds, and a
    /// receiver told of each collection.
    fn counting(
        (deletion_threshold, mutation_threshold): (u64, u64),
    ) -> (Arc<Trigger>, Scheduler, std::sync::mpsc::Receiver<()>) {
        let trigger = Arc::new(Trigger::default());
        let opts = GcOptions {
            deletion_threshold,
            mutation_threshold,
            interval_secs: 0,
            ..GcOptions::default()
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let scheduler = Scheduler::start(trigger.clone(), opts, move || {
            let _ = tx.send(());
            Ok(GcReport::default())
        })
        .expect("start");
        (trigger, scheduler, rx)
    }

    #[test]
    fn changes_wake_the_collector_only_when_a_count_reaches_its_threshold() {
        let (trigger, scheduler, rx) = counting((0, 1_000));
        for _ in 0..999 {
            trigger.mutation();
        }
        assert_eq!(trigger.wakes(), 0, "no change below the threshold wakes the collector");
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err(), "nothing to collect yet");
        trigger.mutation();
        assert_eq!(trigger.wakes(), 1);
        rx.recv_timeout(Duration::from_secs(60)).expect("the thousandth mutation collects");
        drop(scheduler);

        // With a deletion threshold of 1, the first deletion after a collection wakes it.
        let (trigger, scheduler, rx) = counting((1, 0));
        trigger.mutation();
        assert_eq!(trigger.wakes(), 0);
        trigger.deletion();
        assert_eq!(trigger.wakes(), 1);
        rx.recv_timeout(Duration::from_secs(60)).expect("the deletion collects");
        drop(scheduler);
    }

    #[test]
    fn collections_called_for_by_changes_take_at_most_their_share_of_the_time() {
        let trigger = Arc::new(Trigger::default());
        let opts = GcOptions {
            deletion_threshold: 1,
            interval_secs: 0,
            max_time_share_percent: 20,
            ..GcOptions::default()
        };
        let starts = Arc::new(Mutex::new(Vec::new()));
        let seen = starts.clone();
        let scheduler = Scheduler::start(trigger.clone(), opts, move || {
            seen.lock().unwrap_or_else(|e| e.into_inner()).push(Instant::now());
            std::thread::sleep(Duration::from_millis(10));
            Ok(GcReport::default())
        })
        .expect("start");
        // A removal every millisecond: unpaced, a collection would follow each.
        let until = Instant::now() + Duration::from_millis(400);
        let give_up = Instant::now() + Duration::from_secs(60);
        while Instant::now() < until || starts.lock().unwrap_or_else(|e| e.into_inner()).len() < 3 {
            assert!(Instant::now() < give_up, "fewer than 3 collections in a minute");
            trigger.deletion();
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(scheduler);
        let starts = starts.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for pair in starts.windows(2) {
            // Each took at least 10 ms, so the next may start 10 × 100/20 = 50 ms later.
            let gap = pair[1] - pair[0];
            assert!(gap >= Duration::from_millis(50), "collections {gap:?} apart: {starts:?}");
        }
    }
}
