//! One snapshotter as its users see it: namespaced keys over a backend that knows only
//! backend keys.
//!
//! No backend call runs inside a metadata write: a create reserves a backend key, calls
//! the backend, then records; a commit records its intent, calls the backend, then
//! replaces the active record by the committed one; an update that reaches the backend
//! calls it before recording. A slow or stuck backend therefore delays its own callers
//! only, never another snapshotter's writes.
//!
//! A backend that stages its records ([`Backend::stages_records`]: native and overlay in
//! the root's database) is still called outside the write, but its record change is
//! staged and written by ours: a create or a commit is one transaction, and a commit
//! needs no intent (see [`crate::kv::Db::staging`]). A backend whose store is our
//! database but whose writes are its own (a plugin's) carries a commit's intent in its
//! first write instead (see [`crate::kv::Db::carrying`]): the intent commits with the
//! backend's first change, never after it.

use std::collections::{HashMap, HashSet};
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use super::Ctx;
use super::db::{self, MetaDb, SNAPSHOTS, Tables};
use super::lease::{self, Resource};
use super::record::{Intent, Record};
use super::unnamed::{Doomed, Outcome, Unnamed};
use crate::backend::{Backend, FieldPath};
use crate::error::{Context, Error, ErrorKind, Result};
use crate::fault::Faults;
use crate::filter::Filter;
use crate::kv::{Carried, Durability, Staged, now_nanos, to_nanos};
use crate::snapshot::{
    Info, Kind, LABEL_SNAPSHOT_REF, Labels, Mount, Usage, inherited_labels, validate_labels,
    without_empty,
};

/// A named snapshotter: the metadata layer in front of one backend.
///
/// Every mutation is atomic from the caller's view: a backend failure leaves no record
/// behind, a record that cannot be stored after the backend succeeded has its backend
/// snapshot removed again, and a commit cut short by a crash is finished or undone when
/// the snapshotter is next opened ([`Snapshotter::recover`]); one a failed call left
/// under way, by the next prune ([`Snapshotter::settle_failed_commits`]).
pub struct Snapshotter {
    pub(super) db: Arc<MetaDb>,
    name: String,
    pub(super) backend: Arc<dyn Backend>,
    pub(super) faults: Arc<Faults>,
    /// Backend keys a create or commit has made (or is making) in the backend but not
    /// yet recorded. Pruning spares them; it holds no lock that would stop writers.
    pub(super) inflight: Arc<Mutex<HashMap<String, usize>>>,
    /// Removes, in the background and in the order given, backend snapshots whose last
    /// record is gone ([`Snapshotter::remove_later`]); started on first use.
    reclaimer: Mutex<Option<Reclaimer>>,
    /// Removals of backend snapshots no record names, kept from racing a create that
    /// adopts one ([`super::unnamed`]).
    pub(super) unnamed: Arc<Unnamed>,
    /// Told of removals and other mutations, so a scheduler can collect.
    pub(super) trigger: Option<Arc<dyn super::Changes>>,
    /// The backend keeps its records in the metadata's own database, so its changes
    /// reach the disk no later than the metadata changes that follow them.
    shared_db: bool,
    /// Updates that change what the backend sees go one at a time, so the backend and
    /// the record agree on a snapshot's inherited labels.
    backend_updates: Mutex<()>,
    /// The backend's last commit wrote to our database on the calling thread (a
    /// plugin's key-value commit), so the next commit's intent may ride on its write
    /// (see [`Snapshotter::commit_as`]). Learnt, never assumed: a backend that keeps its
    /// state elsewhere gets its intent written before it is called.
    carries: AtomicBool,
}

/// Records a walk reads in one transaction (containerd's List reads 100).
const WALK_BATCH: usize = 100;

/// What every label that decides collection begins with (`gc.root`, `gc.ref.*`,
/// `gc.expire`, ...).
const LABEL_GC_PREFIX: &str = "containerd.io/gc.";

/// How long a create waits for the removal of a backend snapshot it would adopt.
const ADOPT_WAIT: Duration = Duration::from_secs(30);

/// The background remover of backend snapshots no record names any more: one thread,
/// first in first out (a child before the parent removed after it), each key marked
/// in flight until its removal is done, so neither pruning nor `check` takes it for
/// an orphan meanwhile.
struct Reclaimer {
    queue: std::sync::mpsc::Sender<String>,
    thread: std::thread::JoinHandle<()>,
}

impl Reclaimer {
    fn start(sn: &Snapshotter) -> Result<Reclaimer> {
        let (queue, keys) = std::sync::mpsc::channel::<String>();
        let (backend, faults, inflight, unnamed) =
            (sn.backend.clone(), sn.faults.clone(), sn.inflight.clone(), sn.unnamed.clone());
        let name = sn.name.clone();
        let thread = std::thread::Builder::new()
            .name(format!("wasnap-reclaim-{name}"))
            .spawn(move || {
                for bkey in keys {
                    // A backend that panics costs that removal (an orphan pruning takes
                    // later), never the keys queued after it.
                    let removal = std::panic::AssertUnwindSafe(|| {
                        remove_unnamed(&name, &unnamed, &*backend, &faults, &bkey)
                    });
                    if std::panic::catch_unwind(removal).is_err() {
                        tracing::error!(snapshotter = %name, bkey, "backend panicked removing a snapshot; cleanup will retry");
                    }
                    unmark(&inflight, &bkey);
                }
            })
            .with_context(|| "start the reclaimer thread")?;
        Ok(Reclaimer { queue, thread })
    }
}

/// Removes `bkey`, which no record names any more, from `backend`, unless a create has
/// adopted it meanwhile; a failure is left to pruning (the next collection, or the next
/// start).
fn remove_unnamed(sn: &str, unnamed: &Unnamed, backend: &dyn Backend, faults: &Faults, bkey: &str) {
    let remove = || faults.hit("metadata.remove.backend").and_then(|()| backend.remove(bkey));
    match unnamed.remove(bkey, remove) {
        Ok(_) => {}
        Err(e) if e.is_not_found() => {}
        Err(e) => tracing::warn!(snapshotter = %sn, bkey, error = %e,
            "backend failed to remove a snapshot no record names any more; cleanup will retry"),
    }
}

fn mark(set: &Mutex<HashMap<String, usize>>, bkey: &str) {
    *set.lock().unwrap_or_else(|e| e.into_inner()).entry(bkey.to_owned()).or_default() += 1;
}

fn unmark(set: &Mutex<HashMap<String, usize>>, bkey: &str) {
    let mut set = set.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(n) = set.get_mut(bkey) {
        *n -= 1;
        if *n == 0 {
            set.remove(bkey);
        }
    }
}

/// Marks a backend key as in flight for as long as it lives.
pub(super) struct InFlight<'a> {
    set: &'a Mutex<HashMap<String, usize>>,
    bkey: String,
}

impl<'a> InFlight<'a> {
    pub(super) fn new(set: &'a Mutex<HashMap<String, usize>>, bkey: &str) -> Self {
        mark(set, bkey);
        InFlight { set, bkey: bkey.to_owned() }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        unmark(self.set, &self.bkey);
    }
}

/// Runs a backend call on a helper thread (see [`super::helpers`]) and gives up waiting
/// after `deadline`: a backend that hangs costs that call (and a parked thread), never
/// the caller.
pub(crate) fn with_deadline<T: Send + 'static>(
    deadline: Duration,
    what: String,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    use std::sync::mpsc::RecvTimeoutError;
    let (tx, rx) = std::sync::mpsc::channel();
    super::helpers::BACKEND
        .run(move || {
            let _ = tx.send(f());
        })
        .map_err(|e| Error::from(e).context("start a thread for a backend call"))?;
    match rx.recv_timeout(deadline) {
        Ok(r) => r,
        Err(RecvTimeoutError::Timeout) => {
            Err(Error::unavailable(format!("{what}: no answer within {deadline:?}")))
        }
        Err(RecvTimeoutError::Disconnected) => {
            Err(Error::internal(format!("{what}: the backend panicked")))
        }
    }
}

/// The kind of `backend`'s snapshot `bkey`, or None if it has none.
fn held_by(backend: &dyn Backend, bkey: &str) -> Result<Option<Kind>> {
    match backend.stat(bkey) {
        Ok(info) => Ok(Some(info.kind)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

impl std::fmt::Debug for Snapshotter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshotter").field("name", &self.name).finish_non_exhaustive()
    }
}

/// What [`Snapshotter::cleanup`] did.
#[derive(Debug, Default, Clone, Serialize, serde::Deserialize)]
pub struct PruneReport {
    /// Backend keys removed because no record named them.
    pub removed: Vec<String>,
    /// Backend keys that could not be removed, with the reason; retried next time.
    pub failed: Vec<(String, String)>,
}

/// What [`Snapshotter::recover`] did with the commits a crash cut short.
#[derive(Debug, Default, Clone, Serialize, serde::Deserialize)]
pub struct Recovery {
    /// Commits the backend had finished: their records are written now ((namespace, name)).
    pub finished: Vec<(String, String)>,
    /// Commits the backend had not made: the active snapshots stay ((namespace, key)).
    pub undone: Vec<(String, String)>,
    /// Commits whose snapshot the backend holds under neither key: reported, the active
    /// record is kept ((namespace, key, why)).
    pub lost: Vec<(String, String, String)>,
}

pub(super) fn not_found(key: &str) -> Error {
    Error::not_found(format!("snapshot {key:?}"))
}

fn committing(key: &str, name: &str) -> Error {
    Error::failed_precondition(format!("snapshot {key:?} is being committed as {name:?}"))
}

/// Checks that `name` is free and `key` an active snapshot not being committed, whose
/// record it returns: what a commit needs.
fn check_commit(txn: &impl Tables, sn: &str, ns: &str, name: &str, key: &str) -> Result<Record> {
    if txn.record(sn, ns, name)?.is_some() || txn.intent(sn, ns, name)?.is_some() {
        return Err(Error::already_exists(format!("snapshot {name:?}")));
    }
    let rec = txn.record(sn, ns, key)?.ok_or_else(|| not_found(key))?;
    if rec.kind != Kind::Active {
        return Err(Error::failed_precondition(format!(
            "snapshot {key:?} is a {} snapshot, only active snapshots can be committed",
            rec.kind
        )));
    }
    if let Some(other) = &rec.committing {
        return Err(committing(key, other));
    }
    Ok(rec)
}

/// Refuses to commit `rec` (the active snapshot `key`) onto a parent other than its own:
/// containerd 2 names one to rebase a layer, which no backend here can do. Checked on the
/// record the commit then carries out (its backend key is checked again when written),
/// so a snapshot removed and made again on another parent meanwhile fails the commit.
fn check_parent(rec: &Record, key: &str, parent: Option<&str>) -> Result<()> {
    match parent {
        Some(p) if rec.parent.as_deref() != Some(p) => Err(Error::not_implemented(format!(
            "commit {key:?} onto parent {p:?}: rebasing is not supported (its parent is {:?})",
            rec.parent.as_deref().unwrap_or_default()
        ))),
        _ => Ok(()),
    }
}

/// Whether mounts give read-only access only: what views and committed snapshots must
/// return, whatever the backend.
pub(super) fn check_readonly(key: &str, kind: Kind, mounts: &[Mount]) -> Result<()> {
    if kind == Kind::Active {
        return Ok(());
    }
    for m in mounts {
        let ro = m.options.iter().any(|o| o == "ro");
        let upper = m.options.iter().any(|o| o.starts_with("upperdir="));
        if !ro || upper {
            return Err(Error::internal(format!(
                "the backend returned a writable {} mount for the {kind} snapshot {key:?}; refused",
                m.kind
            )));
        }
    }
    Ok(())
}

impl Snapshotter {
    /// The snapshotter `name`, recording into `db` and storing data in `backend`.
    ///
    /// Make one per name and database, and share it: the calls in flight that pruning
    /// leaves alone are those of this handle (a second handle's prune could settle a
    /// commit this one is making, which then fails rather than claim it).
    pub fn new(
        db: Arc<MetaDb>,
        name: impl Into<String>,
        backend: Arc<dyn Backend>,
        faults: Arc<Faults>,
    ) -> Self {
        let name = name.into();
        Snapshotter {
            unnamed: Arc::new(Unnamed::new(db.clone(), &name)),
            db,
            name,
            backend,
            faults,
            inflight: Arc::default(),
            reclaimer: Mutex::new(None),
            trigger: None,
            shared_db: false,
            backend_updates: Mutex::new(()),
            carries: AtomicBool::new(false),
        }
    }

    /// Tells `trigger` of every removal and mutation from now on.
    #[must_use]
    pub fn with_trigger(mut self, trigger: Arc<dyn super::Changes>) -> Self {
        self.trigger = Some(trigger);
        self
    }

    /// Declares that the backend keeps its records in the metadata's own database
    /// (drivers and plugins opened by the host do), so a commit's intent need not be
    /// synced on its own: anything that makes the backend's change durable makes the
    /// intent, written before it, durable too.
    #[must_use]
    pub fn with_shared_db(mut self, shared: bool) -> Self {
        self.shared_db = shared;
        self
    }

    pub(super) fn mutated(&self) {
        if let Some(t) = &self.trigger {
            t.mutation();
        }
    }

    /// The snapshotter's name (`native`, ...).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The backend behind the metadata.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// A backend's error as the caller should read it: the backend keys in it replaced
    /// by the caller's names.
    pub(super) fn in_user_terms(&self, e: Error, names: &[(&str, &str)]) -> Error {
        e.map_message(|m| {
            names.iter().fold(
                m.to_owned(),
                |m, (bkey, key)| {
                    if bkey.is_empty() { m } else { m.replace(bkey, key) }
                },
            )
        })
    }

    /// Adds `key` to the lease in effect for the call, if any.
    pub(crate) fn hold(&self, ctx: &Ctx, key: &str) -> Result<()> {
        let Some(lease) = ctx.lease() else { return Ok(()) };
        let (ns, lease) = (ctx.namespace().to_owned(), lease.to_owned());
        let res = Resource::snapshot(&self.name, key);
        self.db.write(Durability::Immediate, move |txn| lease::hold_in(txn, &ns, &lease, &res))
    }

    fn record(&self, ctx: &Ctx, key: &str) -> Result<Record> {
        self.db
            .read_with(|txn| txn.record(&self.name, ctx.namespace(), key))?
            .ok_or_else(|| not_found(key))
    }

    /// What is known about `key`.
    pub fn stat(&self, ctx: &Ctx, key: &str) -> Result<Info> {
        let rec = self.record(ctx, key)?;
        Ok(self.with_computed(rec.info(key), &rec.bkey))
    }

    /// `info` with the labels the backend computes when asked, if it does
    /// ([`Backend::computed_labels`]), under ours; none of its other labels (a
    /// snapshot shared between namespaces has another namespace's there). A backend
    /// that cannot say (the snapshot removed meanwhile, say) adds nothing.
    fn with_computed(&self, mut info: Info, bkey: &str) -> Info {
        let computed = self.backend.computed_labels();
        if computed.is_empty() {
            return info;
        }
        match self.backend.stat(bkey) {
            Ok(mut b) => {
                for name in computed {
                    if let Some(v) = b.labels.remove(*name) {
                        info.labels.entry((*name).to_owned()).or_insert(v);
                    }
                }
            }
            Err(e) => tracing::debug!(snapshotter = %self.name, bkey, error = %e,
                "no computed labels from the backend"),
        }
        info
    }

    /// Changes the labels of `info.name`: with no field paths all labels are replaced;
    /// `labels` replaces all, `labels.<k>` sets or (if absent from `info`) deletes one.
    /// Any other field path is invalid-argument.
    pub fn update(&self, ctx: &Ctx, info: &Info, fieldpaths: &[String]) -> Result<Info> {
        if info.name.is_empty() {
            return Err(Error::invalid_argument("snapshot name must not be empty"));
        }
        let key = info.name.as_str();
        // As containerd's: a missing snapshot is not-found before the paths are judged.
        let current = self.record(ctx, key)?;
        let paths = FieldPath::parse_all(fieldpaths, &info.name)?;
        let apply = |rec: &Record| -> Result<Record> {
            let mut rec = rec.clone();
            FieldPath::apply(&paths, &mut rec.labels, &info.labels);
            validate_labels(&rec.labels)?;
            rec.updated = now_nanos();
            Ok(rec)
        };
        let touches_backend =
            inherited_labels(&apply(&current)?.labels) != inherited_labels(&current.labels);
        // Only updates the backend sees take turns; the others go straight to the record.
        let _turn =
            touches_backend.then(|| self.backend_updates.lock().unwrap_or_else(|e| e.into_inner()));
        let current = if touches_backend { self.record(ctx, key)? } else { current };
        if let Some(name) = &current.committing {
            return Err(committing(key, name));
        }
        let new = apply(&current)?;
        let after = inherited_labels(&new.labels);
        let changes_backend = after != inherited_labels(&current.labels);
        if changes_backend {
            let mut inner = new.info(&new.bkey);
            inner.labels = after;
            self.backend
                .update(&inner, &[FieldPath::Labels])
                .map_err(|e| self.in_user_terms(e, &[(&new.bkey, key)]))?;
        }
        let (sn, ns, k) = (self.name.clone(), ctx.namespace().to_owned(), key.to_owned());
        let expected = current.clone();
        let written = new.clone();
        let (again, given) = (paths.clone(), info.labels.clone());
        let stored = self.faults.hit("metadata.update.after-backend").and_then(|()| {
            self.db.write(Durability::Immediate, move |txn| {
                let conflict = || {
                    Error::failed_precondition(format!(
                        "snapshot {k:?} changed during the update; retry"
                    ))
                };
                let rec = match txn.record(&sn, &ns, &k)? {
                    // A use (usage.rs) between the read and this write is kept, not a
                    // conflict.
                    Some(r) if super::usage::same_but_use(&r, &expected) => {
                        super::usage::with_use_of(&written, &r)
                    }
                    // Changed meanwhile (another update, a blob mapping): the update is
                    // applied to the record as it is now, as containerd's updates, one
                    // write at a time, are, if the backend then keeps what it holds (it
                    // took `written`'s inherited labels, or none changed); else it
                    // conflicts.
                    Some(r) => {
                        if let Some(name) = &r.committing {
                            return Err(committing(&k, name));
                        }
                        let mut rec = r.clone();
                        FieldPath::apply(&again, &mut rec.labels, &given);
                        let held = if changes_backend { &written.labels } else { &r.labels };
                        if inherited_labels(&rec.labels) != inherited_labels(held) {
                            return Err(conflict());
                        }
                        validate_labels(&rec.labels)?;
                        rec.updated = now_nanos();
                        rec
                    }
                    None => return Err(not_found(&k)),
                };
                db::put_record(txn, &sn, &ns, &k, &rec)?;
                Ok(rec)
            })
        });
        if let Err(e) = stored {
            if changes_backend {
                // The update failed whole: the backend gets its labels back (still our
                // turn, so no other update of the backend came between).
                let mut inner = current.info(&current.bkey);
                inner.labels = inherited_labels(&current.labels);
                match self.backend.update(&inner, &[FieldPath::Labels]) {
                    // Removed meanwhile: nothing is left to put back.
                    Ok(_) => {}
                    Err(undo) if undo.is_not_found() => {}
                    Err(undo) => {
                        tracing::error!(snapshotter = %self.name, key, error = %e, undo = %undo,
                            "the backend took the new labels, the record could not be written, and the backend's labels could not be put back");
                    }
                }
            }
            return Err(e);
        }
        self.mutated();
        stored.map(|rec| self.with_computed(rec.info(key), &rec.bkey))
    }

    /// Maps `key` to the blob `digest` of the namespace's content, which it then holds
    /// (buildkit's blob mapping): mapping the same blob again changes nothing, a
    /// different one is failed-precondition, and a blob the namespace does not hold is
    /// not-found.
    pub fn set_blob(&self, ctx: &Ctx, key: &str, digest: &crate::digest::Digest) -> Result<()> {
        let (sn, ns, k, d) =
            (self.name.clone(), ctx.namespace().to_owned(), key.to_owned(), digest.to_string());
        let changed = self.db.write(Durability::Immediate, move |txn| {
            let mut rec = txn.record(&sn, &ns, &k)?.ok_or_else(|| not_found(&k))?;
            match &rec.blob {
                Some(b) if *b == d => return Ok(false),
                Some(b) => {
                    return Err(Error::failed_precondition(format!(
                        "snapshot {k:?} is mapped to blob {b} already, not {d}"
                    )));
                }
                None => {}
            }
            if let Some(name) = &rec.committing {
                return Err(committing(&k, name));
            }
            if super::content::Tables::content(txn, &ns, &d)?.is_none() {
                return Err(Error::not_found(format!("content {d}")));
            }
            rec.blob = Some(d.clone());
            rec.updated = now_nanos();
            db::put_record(txn, &sn, &ns, &k, &rec)?;
            Ok(true)
        })?;
        if changed {
            self.mutated();
        }
        Ok(())
    }

    /// The blob `key` is mapped to, if any.
    pub fn blob(&self, ctx: &Ctx, key: &str) -> Result<Option<crate::digest::Digest>> {
        let rec = self.record(ctx, key)?;
        rec.blob.as_deref().map(crate::digest::Digest::parse).transpose()
    }

    /// Disk usage of `key` itself. A view's is zero, as containerd's snapshotters
    /// report it: a view holds no changes of its own. (What a backend made to show it,
    /// a native view's copy, is measured by `du` when asked to measure.)
    pub fn usage(&self, ctx: &Ctx, key: &str) -> Result<Usage> {
        let rec = self.record(ctx, key)?;
        if rec.kind == Kind::View {
            return Ok(Usage::default());
        }
        self.backend.usage(&rec.bkey).map_err(|e| self.in_user_terms(e, &[(&rec.bkey, key)]))
    }

    /// The mounts of the active snapshot or view `key`; a view's are read-only,
    /// whatever the backend says. A committed snapshot has none, as in containerd: it
    /// is seen through a view of it (or, inside the host, [`Self::committed_mounts`]).
    pub fn mounts(&self, ctx: &Ctx, key: &str) -> Result<Vec<Mount>> {
        let rec = self.record(ctx, key)?;
        if rec.kind == Kind::Committed {
            return Err(Error::failed_precondition(format!(
                "snapshot {key:?} is committed, not active or a view: mount a view of it"
            )));
        }
        let mounts = self
            .backend
            .mounts(&rec.bkey)
            .map_err(|e| self.in_user_terms(e, &[(&rec.bkey, key)]))?;
        check_readonly(key, rec.kind, &mounts)?;
        self.touch_later(ctx, key); // cache usage (usage.rs), deferred: no sync
        Ok(mounts)
    }

    /// Creates the active snapshot `key` on `parent`.
    pub fn prepare(
        &self,
        ctx: &Ctx,
        key: &str,
        parent: Option<&str>,
        labels: &Labels,
    ) -> Result<Vec<Mount>> {
        self.create(ctx, key, parent, labels, Kind::Active, true)
    }

    /// Creates the read-only view `key` of `parent`.
    pub fn view(
        &self,
        ctx: &Ctx,
        key: &str,
        parent: Option<&str>,
        labels: &Labels,
    ) -> Result<Vec<Mount>> {
        self.create(ctx, key, parent, labels, Kind::View, true)
    }

    /// Makes the snapshot; `again` allows one more attempt if the backend snapshot it
    /// would adopt is gone by the time it is adopted (removed meanwhile).
    fn create(
        &self,
        ctx: &Ctx,
        key: &str,
        parent: Option<&str>,
        labels: &Labels,
        kind: Kind,
        again: bool,
    ) -> Result<Vec<Mount>> {
        if key.is_empty() {
            return Err(Error::invalid_argument("snapshot key must not be empty"));
        }
        let parent = parent.filter(|p| !p.is_empty());
        validate_labels(labels)?;
        let labels = &*without_empty(labels);
        let target = labels.get(LABEL_SNAPSHOT_REF).filter(|t| !t.is_empty());
        let (sn, ns) = (self.name.as_str(), ctx.namespace());

        // containerd, calling through the daemon under its own keys, looked for the
        // target among its records before it called: a record here named like the
        // target is another client's (`wasnap image import`, say), and already-exists
        // would send containerd to look for a snapshot its walk cannot find.
        let containerds = super::containerd_namespace(key) == Some(ns);

        // Phase 1: check the names and reserve a backend key, holding no write lock.
        let bparent = self.db.read_with(|txn| {
            if let Some(target) = target
                && !containerds
                && txn.record(sn, ns, target)?.is_some()
            {
                // As containerd does: the caller's lease now holds what it found.
                self.hold(ctx, target)?;
                return Err(Error::already_exists(format!("target snapshot {target:?}")));
            }
            if txn.record(sn, ns, key)?.is_some() || txn.intent(sn, ns, key)?.is_some() {
                self.hold(ctx, key)?;
                return Err(Error::already_exists(format!("snapshot {key:?}")));
            }
            Ok(match parent {
                None => None,
                Some(p) => {
                    let prec = txn
                        .record(sn, ns, p)?
                        .ok_or_else(|| Error::not_found(format!("parent snapshot {p:?}")))?;
                    if prec.kind != Kind::Committed {
                        return Err(Error::invalid_argument(format!(
                            "parent {p:?} is not a committed snapshot"
                        )));
                    }
                    Some(prec.bkey)
                }
            })
        })?;
        let bkey = format!("{ns}/{}/{key}", self.db.next_seq()?);
        let _inflight = InFlight::new(&self.inflight, &bkey);

        // Phase 2: the backend, outside any transaction (it may copy a whole tree).
        let inherited = inherited_labels(labels);
        let make = || match kind {
            Kind::View => self.backend.view(&bkey, bparent.as_deref(), &inherited),
            _ => self.backend.prepare(&bkey, bparent.as_deref(), &inherited),
        };
        // The backend's record, if it stages it, is written with ours (below), in one
        // transaction.
        let (made, mut staged) = self.staging(make);
        if made.is_err() {
            // Undone (what it built deleted) before anything else is asked of it.
            drop(std::mem::take(&mut staged));
        }
        // The backend's data goes with `staged` if our record is not written: it is not
        // asked to remove a snapshot it never recorded.
        let undoes = !staged.is_empty();
        let names =
            [(bkey.as_str(), key), (bparent.as_deref().unwrap_or(""), parent.unwrap_or(""))];
        let now = now_nanos();
        let (rec_key, rec, mounts, created, mut refused, adopted) = match made {
            Ok(mounts) => {
                if let Err(e) = check_readonly(key, kind, &mounts) {
                    match undoes {
                        true => drop(staged),
                        false => self.remove_backend(&bkey, "its mounts were refused"),
                    }
                    return Err(e);
                }
                let rec = Record {
                    bkey: bkey.clone(),
                    kind,
                    parent: parent.map(str::to_owned),
                    labels: labels.clone(),
                    created: now,
                    updated: now,
                    collectable: ctx.lease().is_some(),
                    committing: None,
                    blob: None,
                    layers: Vec::new(),
                    last_used: 0,
                    use_count: 0,
                };
                (key.to_owned(), rec, mounts, Some(bkey.clone()), None, None)
            }
            Err(e) if e.is_already_exists() => {
                let Some(target) = target else {
                    // A fresh backend key cannot exist; do not let the caller mistake
                    // this for its own key existing.
                    return Err(Error::internal(format!(
                        "unexpected error from snapshotter {sn:?}: {}",
                        self.in_user_terms(e, &names)
                    )));
                };
                let mut rec = self.backend_target(target, bparent.as_deref(), parent, labels)?;
                rec.collectable = ctx.lease().is_some();
                let err =
                    Error::already_exists(format!("target snapshot {target:?} from snapshotter"));
                let adopted = Some(rec.bkey.clone());
                (target.clone(), rec, Vec::new(), None, Some(err), adopted)
            }
            Err(e) => {
                // A backend may have made the snapshot and failed after (a policy in
                // front of it that trapped once the backend was done, found by the
                // soak's chaos guest): no record will name it, so it goes now.
                self.discard_backend(&bkey, "its creation failed");
                // The parent may have been removed, and its data deleted, while the
                // backend was copying it: that is a parent not found, not an internal
                // error (found by the soak: native's copy failed with "lstat: No such
                // file or directory").
                if let (Some(p), Some(bp)) = (parent, bparent.as_deref())
                    && self.db.read_with(|txn| txn.record(sn, ns, p))?.is_none_or(|r| r.bkey != bp)
                {
                    return Err(Error::not_found(format!(
                        "parent snapshot {p:?} (removed while {key:?} was made from it)"
                    )));
                }
                return Err(self.in_user_terms(e, &names));
            }
        };

        // An adopted backend snapshot may be one whose last record is gone, its removal
        // under way or over: its record is written only once no removal of it runs,
        // the backend still holds it, and none can begin (`super::unnamed`).
        let adoption = match adopted.as_deref() {
            None => None,
            Some(b) => {
                let target = target.map_or("", String::as_str);
                let Some(adoption) = self.unnamed.adopt(b, ADOPT_WAIT) else {
                    return Err(Error::unavailable(format!(
                        "target snapshot {target:?}: the backend's snapshot {b:?} is still being removed; try again"
                    )));
                };
                match self.backend.stat(b) {
                    Ok(_) => Some(adoption),
                    Err(e) if e.is_not_found() && again => {
                        // Removed since the backend said it had it: made anew.
                        drop((adoption, staged));
                        return self.create(ctx, key, parent, labels, kind, false);
                    }
                    Err(e) if e.is_not_found() => {
                        return Err(Error::unavailable(format!(
                            "target snapshot {target:?}: the backend's snapshot {b:?} was removed as it was found, twice; try again"
                        )));
                    }
                    Err(e) => return Err(self.in_user_terms(e, &names)),
                }
            }
        };

        // Phase 3: record it, re-checking what phase 1 saw.
        let stored = self.faults.hit("metadata.create.after-backend").and_then(|()| {
            let (sn, ns) = (sn.to_owned(), ns.to_owned());
            let (lease, parent) = (ctx.lease().map(str::to_owned), parent.map(str::to_owned));
            let (rec_key, rec, bparent) = (rec_key.clone(), rec.clone(), bparent.clone());
            let target = target.cloned();
            let mut writes = staged.take_writes();
            self.db.write(Durability::Immediate, move |txn| {
                if txn.record(&sn, &ns, &rec_key)?.is_some()
                    || txn.intent(&sn, &ns, &rec_key)?.is_some()
                {
                    // Someone else made it meanwhile: the caller's lease holds theirs.
                    if let Some(l) = &lease {
                        lease::hold_in(txn, &ns, l, &Resource::snapshot(&sn, &rec_key))?;
                    }
                    return Ok(false);
                }
                if let Some(p) = &parent {
                    let prec = txn
                        .record(&sn, &ns, p)?
                        .ok_or_else(|| Error::not_found(format!("parent snapshot {p:?}")))?;
                    if Some(&prec.bkey) != bparent.as_ref() {
                        return Err(Error::invalid_argument(format!(
                            "mismatched parent {p:?} from target {target:?}"
                        )));
                    }
                }
                writes.run(txn)?;
                if let Some(l) = &lease {
                    lease::hold_in(txn, &ns, l, &Resource::snapshot(&sn, &rec_key))?;
                }
                db::put_record(txn, &sn, &ns, &rec_key, &rec)?;
                if let Some(p) = &parent {
                    super::usage::touch_in(txn, &sn, &ns, p)?; // cache usage (usage.rs)
                }
                Ok(true)
            })
        });
        // Let go at once: what follows may remove a backend snapshot, which takes the
        // same lock.
        drop(adoption);
        match &stored {
            Ok(true) => staged.committed(),
            _ => drop(staged),
        }
        let created = created.filter(|_| !undoes);
        match stored {
            Ok(true) => {}
            Ok(false) if refused.is_none() => {
                refused = Some(Error::already_exists(format!("snapshot {rec_key:?}")));
            }
            Ok(false) => {}
            Err(e) => refused = Some(e),
        }
        if let Some(err) = refused {
            if let Some(created) = created {
                // The record is not stored: the backend snapshot must not outlive it.
                self.remove_backend(&created, "its record could not be stored");
            }
            return Err(err);
        }
        self.mutated();
        Ok(mounts)
    }

    /// Runs `f`, a backend call, with the backend's records staged for our next write
    /// if it stages them ([`Backend::stages_records`]) and shares our database.
    fn staging<R>(&self, f: impl FnOnce() -> R) -> (R, Staged) {
        match self.shared_db && self.backend.stages_records() {
            true => self.db.db().staging(f),
            false => (f(), Staged::default()),
        }
    }

    /// Removes a backend snapshot that no record will name; a failure is left to
    /// pruning.
    pub(super) fn remove_backend(&self, bkey: &str, why: &str) {
        if let Err(e) = self.unnamed.remove(bkey, || self.backend.remove(bkey)) {
            tracing::error!(snapshotter = %self.name, bkey, error = %e,
                "failed to remove a backend snapshot ({why}); cleanup will retry");
        }
    }

    /// Removes the backend snapshot `bkey` if a failed call made it after all; most
    /// often it does not exist. A failure is left to pruning.
    pub(super) fn discard_backend(&self, bkey: &str, why: &str) {
        match self.unnamed.remove(bkey, || self.backend.remove(bkey)) {
            Ok(Outcome::Named) => {}
            Ok(Outcome::Removed) => tracing::warn!(snapshotter = %self.name, bkey,
                "removed a backend snapshot the backend made although the call failed ({why})"),
            Err(e) if e.is_not_found() => {}
            Err(e) => tracing::warn!(snapshotter = %self.name, bkey, error = %e,
                "could not remove what a failed call may have made ({why}); pruning will"),
        }
    }

    /// The backend said a snapshot for `target` exists already (it de-duplicates by
    /// `containerd.io/snapshot.ref`): find it, and build the record that names it here.
    fn backend_target(
        &self,
        target: &str,
        bparent: Option<&str>,
        parent: Option<&str>,
        labels: &Labels,
    ) -> Result<Record> {
        let mut found: Option<Info> = None;
        self.backend.walk(&Filter::default(), &mut |i| {
            if found.is_none()
                && i.kind == Kind::Committed
                && i.labels.get(LABEL_SNAPSHOT_REF).map(String::as_str) == Some(target)
                && i.parent.as_deref() == bparent
            {
                found = Some(i);
            }
            Ok(())
        })?;
        let t = found
            .ok_or_else(|| Error::not_found(format!("target snapshot {target:?} in backend")))?;
        // The backend's labels under the caller's, but only those a caller could have
        // set, and none that decides collection: a backend (a plugin) says what it
        // holds, not what the host keeps.
        let mut all: Labels = t
            .labels
            .into_iter()
            .filter(|(k, v)| {
                let kept = !k.starts_with(LABEL_GC_PREFIX)
                    && crate::snapshot::validate_label(k, v).is_ok();
                if !kept {
                    tracing::warn!(snapshotter = %self.name, bkey = %t.name, label = %k,
                        "a label the backend gave its snapshot is not adopted");
                }
                kept
            })
            .collect();
        all.extend(labels.iter().map(|(k, v)| (k.clone(), v.clone())));
        Ok(Record {
            bkey: t.name,
            kind: Kind::Committed,
            parent: parent.map(str::to_owned),
            labels: all,
            created: to_nanos(t.created),
            updated: to_nanos(t.updated),
            collectable: false,
            committing: None,
            blob: None,
            layers: Vec::new(),
            last_used: 0,
            use_count: 0,
        })
    }

    /// Commits the active snapshot `key` as `name` with `labels`; `key` stops existing.
    ///
    /// Three steps, none holding a write lock across the backend: record the intent
    /// (the name is taken, `key` is marked as committing), commit in the backend, then
    /// replace the active record by the committed one. A crash between them is repaired
    /// by [`Snapshotter::recover`]: the active snapshot or the committed one exists with
    /// its data, never neither. Over a plugin on our database, the intent is written by
    /// the plugin's first write, in the same transaction, so no change of the plugin's
    /// store commits before it.
    pub fn commit(&self, ctx: &Ctx, name: &str, key: &str, labels: &Labels) -> Result<()> {
        self.commit_onto(ctx, name, key, None, labels)
    }

    /// [`Snapshotter::commit`], onto `parent` if one is named: containerd 2 names the
    /// parent it wants the layer committed onto, and rebases it there on snapshotters
    /// that can. None here can: a parent other than the active snapshot's own is
    /// refused ([`ErrorKind::NotImplemented`]), never dropped (the layer would lose the
    /// lower layers its caller meant it to have).
    pub fn commit_onto(
        &self,
        ctx: &Ctx,
        name: &str,
        key: &str,
        parent: Option<&str>,
        labels: &Labels,
    ) -> Result<()> {
        let committed = self.commit_as(ctx, name, key, parent, labels, Vec::new(), Vec::new());
        match committed {
            // As containerd does: the caller's lease now holds the snapshot that has the
            // name (an unpacker that lost a race takes already-exists for success, and
            // counts on its lease to keep the layer).
            Err(e) if e.kind() == ErrorKind::AlreadyExists && ctx.lease().is_some() => {
                self.hold_existing(ctx, name)?;
                Err(e)
            }
            r => r,
        }
    }

    /// Has the caller's lease hold `key` if a record, or a commit under way, has that
    /// name.
    fn hold_existing(&self, ctx: &Ctx, key: &str) -> Result<()> {
        let Some(lease) = ctx.lease() else { return Ok(()) };
        let (sn, ns, key, lease) =
            (self.name.clone(), ctx.namespace().to_owned(), key.to_owned(), lease.to_owned());
        self.db.write(Durability::Immediate, move |txn| {
            if txn.record(&sn, &ns, &key)?.is_none() && txn.intent(&sn, &ns, &key)?.is_none() {
                return Ok(());
            }
            lease::hold_in(txn, &ns, &lease, &Resource::snapshot(&sn, &key))
        })
    }

    /// [`Snapshotter::commit_onto`], recording the committed snapshot as a merge of `layers`
    /// (see [`Record::layers`]), held by the commit from its intent on, so none can be
    /// removed meanwhile. Each of `read` (key, backend key), the layers the caller read
    /// to make it, must still be that committed snapshot when the intent is written: a
    /// layer removed (or removed and made again) while it was read fails the commit, as
    /// what was read of it may be incomplete.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn commit_as(
        &self,
        ctx: &Ctx,
        name: &str,
        key: &str,
        parent: Option<&str>,
        labels: &Labels,
        layers: Vec<String>,
        read: Vec<(String, String)>,
    ) -> Result<()> {
        if name.is_empty() {
            return Err(Error::invalid_argument("snapshot name must not be empty"));
        }
        validate_labels(labels)?;
        let labels = &*without_empty(labels);
        if layers.is_empty() && read.is_empty() && self.shared_db && self.backend.stages_records() {
            return self.commit_staged(ctx, name, key, parent, labels);
        }
        let (sn, ns) = (self.name.clone(), ctx.namespace().to_owned());
        let lease = ctx.lease().map(str::to_owned);

        // Step 1: the intent. Checked here, so that the usual errors come before the
        // backend is called; written by `put`, which checks again.
        let bkey = self.db.read_with(|txn| {
            if let Some(l) = &lease {
                lease::check_exists_read(txn, &ns, l)?;
            }
            let rec = check_commit(txn, &sn, &ns, name, key)?;
            check_parent(&rec, key, parent)?;
            Ok(rec.bkey)
        })?;
        let intent = Intent {
            key: key.to_owned(),
            bkey,
            bname: format!("{ns}/{}/{name}", self.db.next_seq()?),
            labels: labels.clone(),
            lease: lease.clone(),
            layers,
        };
        let old_slot: Arc<Mutex<Option<Record>>> = Arc::default();
        let put = {
            let (sn, ns, name, intent, slot) =
                (sn.clone(), ns.clone(), name.to_owned(), intent.clone(), old_slot.clone());
            let faults = self.faults.clone();
            move |txn: &redb::WriteTransaction| -> Result<()> {
                // Before anything is written: inside a plugin's write, when carried.
                faults.hit("metadata.commit.intent")?;
                if let Some(l) = &intent.lease {
                    lease::check_exists(txn, &ns, l)?;
                }
                let mut rec = check_commit(txn, &sn, &ns, &name, &intent.key)?;
                if rec.bkey != intent.bkey {
                    // Removed and made again since it was read.
                    return Err(not_found(&intent.key));
                }
                let what = "was removed while the merge read it";
                super::merge::check_layers(txn, &sn, &ns, &read, what)?;
                super::merge::hold_layers(txn, &sn, &ns, &name, &intent.layers)?;
                db::put_intent(txn, &sn, &ns, &name, &intent)?;
                let old = rec.clone();
                rec.committing = Some(name.clone());
                db::put_record(txn, &sn, &ns, &intent.key, &rec)?;
                *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(old);
                Ok(())
            }
        };
        let durability = if self.shared_db { Durability::Deferred } else { Durability::Immediate };
        let _inflight = InFlight::new(&self.inflight, &intent.bname);
        let names = [(intent.bname.as_str(), name), (intent.bkey.as_str(), key)];

        // Step 2: the backend. Over a backend whose store is our database and that
        // wrote to it in its last commit (a plugin's key-value commit), the intent is
        // carried by the backend's first write, in its transaction: one commit fewer,
        // and still none of the backend's changes commits before it (see
        // `kv::Db::carrying`). Otherwise it is written first, as it must be for a
        // backend that keeps its state elsewhere: its change would not wait for the
        // intent, nor the intent's checks (the name is free, the key still active) hold
        // it back from racing another commit.
        let backend_commit = || {
            self.faults.hit("metadata.commit.before-backend").and_then(|()| {
                self.backend.commit(&intent.bname, &intent.bkey, &inherited_labels(labels))
            })
        };
        let shared = intent.layers.is_empty() && self.shared_db;
        let (done, mut unwritten) = if shared && self.carries.load(Ordering::Relaxed) {
            match self.db.db().carrying(durability, put, backend_commit) {
                (done, Carried::Committed) => (done, None),
                (_, Carried::Failed(e)) => {
                    // Every write the backend tried failed with it: its store is as it
                    // was, and what else it made is no record's, so pruning takes it.
                    return Err(self.in_user_terms(e, &names));
                }
                (done, Carried::Unused(w)) => {
                    self.carries.store(false, Ordering::Relaxed);
                    (done, Some(w))
                }
            }
        } else {
            // On disk before the backend is called: what the backend changes may reach
            // the disk without our database (a plugin's own files, say), and a commit
            // found done with no intent naming its key would be lost.
            self.db.write(Durability::Immediate, put)?;
            let done = if shared {
                // Whether the backend writes here, learnt from a write carrying nothing.
                let (done, wrote) = self.db.db().carrying(durability, |_| Ok(()), backend_commit);
                if matches!(wrote, Carried::Committed) && done.is_ok() {
                    self.carries.store(true, Ordering::Relaxed);
                }
                done
            } else {
                backend_commit()
            };
            (done, None)
        };
        let done = done.map_err(|e| self.in_user_terms(e, &names));
        // The intent, if the backend made no write to carry it, is written before the
        // outcome is acted on, so that a crash from here on is repaired as before; on
        // disk at once, as nothing of the backend's will carry it there.
        let write_late = |unwritten: &mut Option<crate::kv::StagedWrites>| -> Result<()> {
            match unwritten.take() {
                Some(mut w) => self
                    .db
                    .write(Durability::Immediate, move |txn| w.run(txn))
                    .map_err(|e| self.in_user_terms(e, &names)),
                None => Ok(()),
            }
        };
        if done.is_ok() {
            write_late(&mut unwritten)?;
        }
        if let Err(e) = done {
            // The backend may have committed and failed after (a policy in front of it
            // that trapped once the backend was done, found by the soak's chaos guest):
            // ask it which key it holds, as recovery after a crash does, instead of
            // putting back an active record whose data has moved.
            match self.held(&intent.bname).and_then(|new| Ok((new, self.held(&intent.bkey)?))) {
                Ok((Some(Kind::Committed), _)) => {
                    write_late(&mut unwritten)?;
                    tracing::warn!(snapshotter = %sn, key, name, error = %e,
                        "the backend reported a failed commit but holds the committed snapshot; finishing it");
                }
                Ok((_, Some(Kind::Active))) => {
                    if unwritten.is_none() {
                        let old = old_slot.lock().unwrap_or_else(|e| e.into_inner()).take();
                        if let Err(undo) = self.end_intent(&ns, name, &intent, old.as_ref(), None) {
                            tracing::error!(snapshotter = %sn, key, error = %undo,
                                "could not undo the intent of a failed commit; the next collection or cleanup will");
                        }
                    }
                    return Err(e);
                }
                found => {
                    // Neither, or the backend cannot say: the intent stays (is written,
                    // if it was not), for the next prune to settle, and the snapshot
                    // stays marked as committing.
                    if let Err(late) = write_late(&mut unwritten) {
                        tracing::error!(snapshotter = %sn, key, name, error = %late,
                            "could not record the intent of a commit the backend failed");
                    }
                    tracing::error!(snapshotter = %sn, key, name, error = %e, ?found,
                        "a failed commit left the backend holding neither key, or it cannot say which; the next collection or cleanup settles it");
                    return Err(e);
                }
            }
        }
        let old =
            old_slot.lock().unwrap_or_else(|e| e.into_inner()).take().ok_or_else(|| {
                Error::internal("a commit's intent was written without its record")
            })?;

        // Step 3: the committed record.
        let now = now_nanos();
        let committed = Record {
            bkey: intent.bname.clone(),
            kind: Kind::Committed,
            parent: old.parent.clone(),
            labels: labels.clone(),
            created: now,
            updated: now,
            collectable: lease.is_some(),
            committing: None,
            blob: None, // taken from the active record
            layers: intent.layers.clone(),
            last_used: 0,
            use_count: 0,
        };
        let ended = self
            .faults
            .hit("metadata.commit.after-backend")
            .and_then(|()| self.end_intent(&ns, name, &intent, None, Some(committed)))
            .inspect_err(|e| {
                tracing::error!(snapshotter = %sn, key, name, error = %e,
                    "the backend committed but the record could not be written; the next collection or cleanup finishes the commit");
            })?;
        if !ended {
            // Settled by someone else while this call ran (a prune skips commits in
            // flight, so nothing should): success only if it was finished as asked.
            let finished = self.db.read_with(|txn| txn.record(&sn, &ns, name))?;
            if finished.is_none_or(|r| r.bkey != intent.bname || r.kind != Kind::Committed) {
                return Err(Error::internal(format!(
                    "the commit of {key:?} to {name:?} was settled by another call while it ran"
                )));
            }
        }
        self.mutated();
        Ok(())
    }

    /// [`Snapshotter::commit`] on a backend that stages its records: its commit and
    /// ours are written in one transaction, so no crash can come between them and no
    /// intent is needed. The active snapshot is read, the backend commits (its record
    /// staged), then one write checks again what was read and records both.
    fn commit_staged(
        &self,
        ctx: &Ctx,
        name: &str,
        key: &str,
        parent: Option<&str>,
        labels: &Labels,
    ) -> Result<()> {
        let (sn, ns) = (self.name.clone(), ctx.namespace().to_owned());
        let lease = ctx.lease().map(str::to_owned);
        let bkey = self.db.read_with(|txn| {
            let rec = check_commit(txn, &sn, &ns, name, key)?;
            check_parent(&rec, key, parent)?;
            Ok(rec.bkey)
        })?;
        let bname = format!("{ns}/{}/{name}", self.db.next_seq()?);
        let (done, mut staged) = self.staging(|| {
            self.faults
                .hit("metadata.commit.before-backend")
                .and_then(|()| self.backend.commit(&bname, &bkey, &inherited_labels(labels)))
        });
        let names = [(bname.as_str(), name), (bkey.as_str(), key)];
        done.map_err(|e| self.in_user_terms(e, &names))?;
        if staged.is_empty() {
            // Not one of ours after all: its commit is already its own.
            tracing::warn!(snapshotter = %sn, key, name,
                "the backend committed without staging its record");
        }
        self.faults.hit("metadata.commit.after-backend")?;
        let mut writes = staged.take_writes();
        let now = now_nanos();
        let (name_, key_, labels) = (name.to_owned(), key.to_owned(), labels.clone());
        let bname_ = bname.clone();
        let bkey_ = bkey.clone();
        self.db
            .write(Durability::Immediate, move |txn| {
                let (name, key) = (name_.as_str(), key_.as_str());
                if let Some(l) = &lease {
                    lease::check_exists(txn, &ns, l)?;
                }
                let active = check_commit(txn, &sn, &ns, name, key)?;
                if active.bkey != bkey_ {
                    // Removed and made again while the backend committed the old one.
                    return Err(not_found(key));
                }
                writes.run(txn)?;
                if let Some(l) = &lease {
                    lease::release_in(txn, &ns, l, &Resource::snapshot(&sn, key))?;
                    lease::hold_in(txn, &ns, l, &Resource::snapshot(&sn, name))?;
                }
                let committed = Record {
                    bkey: bname_.clone(),
                    kind: Kind::Committed,
                    parent: active.parent.clone(),
                    labels: labels.clone(),
                    created: now,
                    updated: now,
                    collectable: lease.is_some(),
                    committing: None,
                    blob: active.blob.clone(),
                    layers: Vec::new(),
                    last_used: 0,
                    use_count: 0,
                };
                db::rename_record(txn, &sn, &ns, key, name, &committed)
            })
            .map_err(|e| self.in_user_terms(e, &names))?;
        staged.committed();
        self.mutated();
        Ok(())
    }

    /// Ends the commit `intent` to `name`: with `committed`, writes that record in place
    /// of the active one; otherwise puts the active record back as it was (`old`, or
    /// the stored one with its mark cleared). False if the intent was ended already.
    fn end_intent(
        &self,
        ns: &str,
        name: &str,
        intent: &Intent,
        old: Option<&Record>,
        committed: Option<Record>,
    ) -> Result<bool> {
        let (sn, ns, name) = (self.name.clone(), ns.to_owned(), name.to_owned());
        let (intent, old) = (intent.clone(), old.cloned());
        self.db.write(Durability::Immediate, move |txn| {
            match txn.intent(&sn, &ns, &name)? {
                Some(i) if i == intent => {}
                _ => return Ok(false), // ended already (by another prune, say)
            }
            db::delete_intent(txn, &sn, &ns, &name)?;
            if committed.is_none() {
                super::merge::release_layers(txn, &sn, &ns, &name, &intent.layers)?;
            }
            let Some(active) = txn.record(&sn, &ns, &intent.key)? else { return Ok(true) };
            match &committed {
                Some(rec) => {
                    if let Some(l) = &intent.lease {
                        // The lease may have gone meanwhile; the snapshot is then not
                        // held by it, as with any lease deleted after a commit.
                        lease::release_in(txn, &ns, l, &Resource::snapshot(&sn, &intent.key))?;
                        if lease::exists(txn, &ns, l)? {
                            lease::hold_in(txn, &ns, l, &Resource::snapshot(&sn, &name))?;
                        }
                    }
                    let mut rec = rec.clone();
                    rec.parent = active.parent.clone();
                    rec.blob = active.blob.clone();
                    db::rename_record(txn, &sn, &ns, &intent.key, &name, &rec)?;
                }
                None => {
                    let mut back = old.clone().unwrap_or(active);
                    back.committing = None;
                    db::put_record(txn, &sn, &ns, &intent.key, &back)?;
                }
            }
            Ok(true)
        })
    }

    /// The kind of the backend snapshot `bkey`, or None if the backend has none.
    fn held(&self, bkey: &str) -> Result<Option<Kind>> {
        held_by(&*self.backend, bkey)
    }

    /// Finishes or undoes every commit a crash cut short, by asking the backend which
    /// of the two keys it holds. Run when the snapshotter is opened, before any call.
    pub fn recover(&self) -> Result<Recovery> {
        self.settle_intents(None)
    }

    /// Finishes or undoes, as [`Snapshotter::recover`] does, the commits a failed call
    /// left under way: the backend committed but the record could not be written (a
    /// full disk, say), or the backend failed and could not say which key it holds.
    /// Their snapshots are held (the name taken, the key marked committing) until this
    /// runs, so every prune does, rather than only the next open. Commits still in
    /// flight are left alone; if the backend does not answer about one within
    /// `deadline`, it and the rest are left for the next prune.
    pub fn settle_failed_commits(&self, deadline: Duration) -> Result<Recovery> {
        self.settle_intents(Some(deadline))
    }

    /// Settles the stored intents; with `live` (a running snapshotter: a deadline for
    /// each backend call), only those of calls that have returned.
    fn settle_intents(&self, live: Option<Duration>) -> Result<Recovery> {
        let mut report = Recovery::default();
        let pending = self.db.read_with(|txn| db::intents(txn, &self.name))?;
        if pending.is_empty() {
            return Ok(report);
        }
        // In flight after the intents: a commit marks its new key before it writes its
        // intent and drops the mark once it has returned, so an intent read here whose
        // key is not marked when the set is read belongs to a call that has returned.
        // Read the other way round, a commit starting between the two reads would be in
        // neither, and be settled under its caller's feet.
        let inflight: HashSet<String> = match live {
            Some(_) => {
                self.inflight.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect()
            }
            None => HashSet::new(),
        };
        let cause = if live.is_some() { "a failed call" } else { "a crash" };
        for (ns, name, intent) in pending {
            if inflight.contains(&intent.bname) {
                continue;
            }
            let held = |bkey: &str| match live {
                None => self.held(bkey),
                Some(deadline) => {
                    let (backend, key) = (self.backend.clone(), bkey.to_owned());
                    with_deadline(
                        deadline,
                        format!("stat {bkey:?} in snapshotter {:?}", self.name),
                        move || held_by(&*backend, &key),
                    )
                }
            };
            let found = held(&intent.bname).and_then(|new| Ok((new, held(&intent.bkey)?)));
            let (found_new, found_old) = match found {
                Ok(found) => found,
                Err(e) if live.is_some() => {
                    // The rest wait too: a backend that cannot answer one would hold
                    // this prune a deadline per commit.
                    tracing::warn!(snapshotter = %self.name, namespace = %ns, key = %intent.key, name,
                        error = %e, "cannot ask the backend about a commit a failed call left under way; the next collection or cleanup asks again");
                    break;
                }
                Err(e) => return Err(e),
            };
            match (found_new, found_old) {
                (Some(Kind::Committed), _) => {
                    let now = now_nanos();
                    let rec = Record {
                        bkey: intent.bname.clone(),
                        kind: Kind::Committed,
                        parent: None, // taken from the active record
                        labels: intent.labels.clone(),
                        created: now,
                        updated: now,
                        collectable: intent.lease.is_some(),
                        committing: None,
                        blob: None, // taken from the active record
                        layers: intent.layers.clone(),
                        last_used: 0,
                        use_count: 0,
                    };
                    if self.end_intent(&ns, &name, &intent, None, Some(rec))? {
                        tracing::warn!(snapshotter = %self.name, namespace = %ns, key = %intent.key, name,
                            "finished a commit {cause} had cut short");
                        report.finished.push((ns, name));
                    }
                }
                (_, Some(Kind::Active)) => {
                    if self.end_intent(&ns, &name, &intent, None, None)? {
                        tracing::warn!(snapshotter = %self.name, namespace = %ns, key = %intent.key,
                            "undid a commit {cause} had cut short; the active snapshot stays");
                        report.undone.push((ns, intent.key.clone()));
                    }
                }
                (found_new, found_old) => {
                    let why = format!(
                        "the backend holds neither {:?} ({found_old:?}) nor {:?} ({found_new:?})",
                        intent.bkey, intent.bname
                    );
                    if self.end_intent(&ns, &name, &intent, None, None)? {
                        tracing::error!(snapshotter = %self.name, namespace = %ns, key = %intent.key, name,
                            "a commit cut short by {cause} left no data: {why}");
                        report.lost.push((ns, intent.key.clone(), why));
                    }
                }
            }
        }
        Ok(report)
    }

    /// Removes `key`, which must have no children. The backend snapshot goes when no
    /// record names it any more; if the backend fails to remove it, the metadata removal
    /// stands and [`Snapshotter::cleanup`] retries.
    pub fn remove(&self, ctx: &Ctx, key: &str) -> Result<()> {
        if let Some(bkey) = self.remove_record(ctx, key)? {
            remove_unnamed(&self.name, &self.unnamed, &*self.backend, &self.faults, &bkey);
        }
        Ok(())
    }

    /// As [`Snapshotter::remove`], but returns once the record is gone (durably): the
    /// backend snapshot is removed in the background, after the removals asked for
    /// before it, as containerd's metadata layer leaves it to its collector. Until it
    /// is, pruning and `check` leave it alone; if the process ends first, it is an
    /// orphan the next collection prunes.
    pub fn remove_later(&self, ctx: &Ctx, key: &str) -> Result<()> {
        let Some(bkey) = self.remove_record(ctx, key)? else { return Ok(()) };
        mark(&self.inflight, &bkey);
        let mut reclaimer = self.reclaimer.lock().unwrap_or_else(|e| e.into_inner());
        if reclaimer.is_none() {
            match Reclaimer::start(self) {
                Ok(r) => *reclaimer = Some(r),
                Err(e) => tracing::warn!(snapshotter = %self.name, error = %e,
                    "cannot reclaim in the background; removing in the call"),
            }
        }
        let queued = reclaimer.as_ref().is_some_and(|r| r.queue.send(bkey.clone()).is_ok());
        drop(reclaimer);
        if !queued {
            remove_unnamed(&self.name, &self.unnamed, &*self.backend, &self.faults, &bkey);
            unmark(&self.inflight, &bkey);
        }
        Ok(())
    }

    /// Waits until every removal [`Snapshotter::remove_later`] queued so far is done.
    pub fn settle(&self) {
        let Some(r) = self.reclaimer.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        drop(r.queue);
        let _ = r.thread.join();
    }

    /// Deletes the record of `key`; returns its backend key if no record names that
    /// any more (the backend snapshot is then the caller's to remove).
    ///
    /// A backend that stages its records in this database ([`Backend::stages_records`])
    /// has its record removed in the same transaction, so nothing is returned: what it
    /// deletes on disk follows the commit, and a crash in between leaves data no record
    /// names, which cleanup reclaims.
    fn remove_record(&self, ctx: &Ctx, key: &str) -> Result<Option<String>> {
        let (sn, ns, k) = (self.name.clone(), ctx.namespace().to_owned(), key.to_owned());
        let lease = ctx.lease().map(str::to_owned);
        let (staged_bkey, staged, doomed) = self.stage_removal(ctx, key)?;
        // Bound in this order so that `staged` (and what it undoes) drops first, while
        // the key is still doomed.
        let (_doomed, mut staged) = (doomed, staged);
        let mut writes = staged.take_writes();
        let (bkey, last, with_backend) = self.db.write(Durability::Immediate, move |txn| {
            let rec = txn.record(&sn, &ns, &k)?.ok_or_else(|| not_found(&k))?;
            if let Some(name) = &rec.committing {
                return Err(committing(&k, name));
            }
            if txn.has_children(&sn, &ns, &k)? {
                return Err(Error::failed_precondition(format!(
                    "cannot remove snapshot {k:?} with child"
                )));
            }
            if let Some(l) = &lease {
                lease::release_in(txn, &ns, l, &Resource::snapshot(&sn, &k))?;
            }
            let (rec, last) = db::delete_record(txn, &sn, &ns, &k)?.ok_or_else(|| not_found(&k))?;
            // The backend's removal was staged for the record read before: it goes
            // only if that is the record removed, and the last to name its data.
            let with_backend = last && staged_bkey.as_ref() == Some(&rec.bkey);
            if with_backend {
                writes.run(txn)?;
            }
            Ok((rec.bkey, last, with_backend))
        })?;
        if let Some(t) = &self.trigger {
            t.deletion();
        }
        if !with_backend {
            return Ok(last.then_some(bkey));
        }
        if let Err(e) = self.faults.hit("metadata.remove.backend") {
            tracing::warn!(snapshotter = %self.name, bkey, error = %e,
                "the removed snapshot's data is left; cleanup will reclaim it");
            staged.skip_after();
        }
        staged.committed();
        Ok(None)
    }

    /// For a backend that stages its records here, stages the removal of the data of
    /// `key`'s record as it is now: that record's backend key, and what was staged. A
    /// backend that does not stage, or fails to, is asked after the record is gone.
    ///
    /// The backend key is doomed from before the backend is asked until the guard
    /// returned drops: a create adopting the data either wrote its record first (then
    /// the removal's record is not the last, and the staged removal is undone) or
    /// waits for the removal to end.
    fn stage_removal(
        &self,
        ctx: &Ctx,
        key: &str,
    ) -> Result<(Option<String>, Staged, Option<Doomed<'_>>)> {
        if !(self.shared_db && self.backend.stages_records()) {
            return Ok((None, Staged::default(), None));
        }
        let (sn, ns) = (self.name.as_str(), ctx.namespace());
        let Some(bkey) = self.db.read_with(|txn| Ok(txn.record(sn, ns, key)?.map(|r| r.bkey)))?
        else {
            return Ok((None, Staged::default(), None));
        };
        let doomed = self.unnamed.doom(&bkey);
        match self.staging(|| self.backend.remove(&bkey)) {
            (Ok(()), staged) if !staged.is_empty() => Ok((Some(bkey), staged, Some(doomed))),
            (_, staged) => {
                drop(staged);
                Ok((None, Staged::default(), None))
            }
        }
    }

    /// Calls `f` for each snapshot in the namespace that matches any of `filters`
    /// (containerd's filter syntax; none means all).
    pub fn walk(
        &self,
        ctx: &Ctx,
        filters: &[String],
        f: &mut dyn FnMut(Info) -> Result<()>,
    ) -> Result<()> {
        let filter = Filter::parse_all(filters)?;
        let (sn, ns) = (self.name.as_str(), ctx.namespace());
        let mut after: Option<String> = None;
        loop {
            let from = match &after {
                None => Bound::Included((sn, ns, "")),
                Some(k) => Bound::Excluded((sn, ns, k.as_str())),
            };
            let batch = self.read_batch(from, |s, n| s == sn && n == ns)?;
            after = batch.last().map(|(_, i, _)| i.name.clone());
            let full = batch.len() == WALK_BATCH;
            for (_, info, bkey) in batch {
                let info = self.with_computed(info, &bkey);
                if filter.matches(&info) {
                    f(info)?;
                }
            }
            if !full {
                return Ok(());
            }
        }
    }

    /// As [`Snapshotter::walk`], over every namespace: `f` gets each matching snapshot
    /// with its namespace, in order of namespace, then key.
    pub fn walk_all(
        &self,
        filters: &[String],
        f: &mut dyn FnMut(&str, Info) -> Result<()>,
    ) -> Result<()> {
        let filter = Filter::parse_all(filters)?;
        let sn = self.name.as_str();
        let mut after: Option<(String, String)> = None;
        loop {
            let from = match &after {
                None => Bound::Included((sn, "", "")),
                Some((n, k)) => Bound::Excluded((sn, n.as_str(), k.as_str())),
            };
            let batch = self.read_batch(from, |s, _| s == sn)?;
            after = batch.last().map(|(n, i, _)| (n.clone(), i.name.clone()));
            let full = batch.len() == WALK_BATCH;
            for (ns, info, bkey) in batch {
                let info = self.with_computed(info, &bkey);
                if filter.matches(&info) {
                    f(&ns, info)?;
                }
            }
            if !full {
                return Ok(());
            }
        }
    }

    /// Up to [`WALK_BATCH`] records from `from` on, while `within` holds for their
    /// snapshotter and namespace, in one read transaction, with their namespaces and
    /// backend keys. A
    /// walk reads in batches, as containerd's does: a caller that takes its time over
    /// what it is given (a client that stops reading a List) holds no transaction.
    fn read_batch(
        &self,
        from: Bound<(&str, &str, &str)>,
        within: impl Fn(&str, &str) -> bool,
    ) -> Result<Vec<(String, Info, String)>> {
        self.db.read_with(|txn| {
            let t = txn.open_table(SNAPSHOTS)?;
            let mut out = Vec::new();
            for item in t.range::<(&str, &str, &str)>((from, Bound::Unbounded))? {
                let (k, v) = item?;
                let (s, n, key) = k.value();
                if !within(s, n) {
                    break;
                }
                let rec = Record::decode(v.value(), key)?;
                out.push((n.to_owned(), rec.info(key), rec.bkey));
                if out.len() == WALK_BATCH {
                    break;
                }
            }
            Ok(out)
        })
    }

    /// Removes from the backend every snapshot that no record names (children before
    /// parents; one still holding children is skipped, as containerd does), then asks
    /// the backend to reclaim space. Each backend call gets one minute.
    pub fn cleanup(&self) -> Result<PruneReport> {
        self.prune(Duration::from_secs(60), true)
    }

    /// The backend keys no record names and no call has in flight: what a prune would
    /// remove, children first. Changes nothing.
    pub fn orphans(&self, deadline: Duration) -> Result<Vec<String>> {
        // Walk the backend first, then read what is in flight, then the records.
        let backend = self.backend.clone();
        let parents: HashMap<String, Option<String>> =
            with_deadline(deadline, format!("walk of snapshotter {:?}", self.name), move || {
                let mut parents = HashMap::new();
                backend.walk(&Filter::default(), &mut |i| {
                    parents.insert(i.name, i.parent);
                    Ok(())
                })?;
                Ok(parents)
            })?;
        // In flight before records: a key the walk saw is either still in flight when
        // we read that set, or its record (or intent) committed before we read the
        // records (a mark is dropped only after its record commits). Read the other way
        // round, a create finishing between the two reads would be in neither, and be
        // pruned alive.
        let inflight: Vec<String> =
            self.inflight.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
        let mut named = self.db.read_with(|txn| db::named_bkeys(txn, &self.name))?;
        named.extend(inflight);
        let depth = |key: &str| {
            let mut k = key.to_owned();
            let mut d = 0usize;
            while let Some(Some(p)) = parents.get(&k) {
                d += 1;
                k = p.clone();
                if d > parents.len() {
                    break; // a cycle in a broken backend; do not spin
                }
            }
            d
        };
        let mut orphans: Vec<(usize, &String)> =
            parents.keys().filter(|k| !named.contains(*k)).map(|k| (depth(k), k)).collect();
        orphans.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
        Ok(orphans.into_iter().map(|(_, k)| k.clone()).collect())
    }

    /// Backend keys that records name but the backend does not have. Changes nothing.
    pub fn missing(&self, deadline: Duration) -> Result<Vec<String>> {
        let backend = self.backend.clone();
        let present: HashSet<String> =
            with_deadline(deadline, format!("walk of snapshotter {:?}", self.name), move || {
                let mut present = HashSet::new();
                backend.walk(&Filter::default(), &mut |i| {
                    present.insert(i.name);
                    Ok(())
                })?;
                Ok(present)
            })?;
        let inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let intents: HashSet<String> = self
            .db
            .read_with(|txn| db::intents(txn, &self.name))?
            .into_iter()
            .map(|(_, _, i)| i.bname)
            .collect();
        let mut missing: Vec<String> = self
            .db
            .read_with(|txn| db::named_bkeys(txn, &self.name))?
            .into_iter()
            .filter(|k| !present.contains(k) && !inflight.contains_key(k) && !intents.contains(k))
            .collect();
        missing.sort();
        Ok(missing)
    }

    /// Snapshots whose data the backend says is missing or damaged: (backend key, why).
    /// Changes nothing.
    pub fn damaged(&self, deadline: Duration) -> Result<Vec<(String, String)>> {
        let backend = self.backend.clone();
        with_deadline(deadline, format!("verify snapshotter {:?}", self.name), move || {
            backend.verify()
        })
    }

    /// Settles the commits failed calls left under way
    /// ([`Snapshotter::settle_failed_commits`]), then removes the orphans
    /// [`Snapshotter::orphans`] finds, each backend call under `deadline`; one that fails
    /// or hangs is reported and retried next time, and writers are never held up. With
    /// `reclaim`, the backend's `cleanup` follows.
    pub fn prune(&self, deadline: Duration, reclaim: bool) -> Result<PruneReport> {
        let sn = self.name.clone();
        let mut report = PruneReport::default();
        // A commit a failed call left under way holds its snapshot until it is settled,
        // and its keys from pruning: settled first, it frees both now, not at a restart.
        if let Err(e) = self.settle_failed_commits(deadline) {
            tracing::warn!(snapshotter = %sn, error = %e,
                "prune: could not settle the commits failed calls left under way; will retry");
            report.failed.push(("(commits under way)".into(), e.to_string()));
        }
        // Deepest first; what still has a child (a merge's layers, which the backend's
        // parents do not show) is tried again once a pass has removed something.
        let mut pending = self.orphans(deadline)?;
        loop {
            let mut held = Vec::new();
            let mut progressed = false;
            for bkey in pending {
                let backend = self.backend.clone();
                let key = bkey.clone();
                let (faults, unnamed) = (self.faults.clone(), self.unnamed.clone());
                let removed = with_deadline(
                    deadline,
                    format!("remove {bkey:?} from snapshotter {sn:?}"),
                    move || {
                        faults.hit("gc.prune.remove")?;
                        unnamed.remove(&key, || backend.remove(&key))
                    },
                );
                match removed {
                    // A create adopted it since the orphans were listed.
                    Ok(Outcome::Named) => {}
                    Ok(Outcome::Removed) => {
                        report.removed.push(bkey);
                        progressed = true;
                    }
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) if e.kind() == ErrorKind::FailedPrecondition => held.push((bkey, e)),
                    Err(e) => {
                        tracing::warn!(snapshotter = %sn, bkey, error = %e, "prune: could not remove; will retry");
                        report.failed.push((bkey, e.to_string()));
                    }
                }
            }
            if held.is_empty() || !progressed {
                for (bkey, e) in held {
                    tracing::warn!(snapshotter = %sn, bkey, error = %e, "prune: could not remove; will retry");
                    report.failed.push((bkey, e.to_string()));
                }
                break;
            }
            pending = held.into_iter().map(|(k, _)| k).collect();
        }
        // Removals a backend defers reach the disk now, not at some later commit: a
        // prune that reports a removal must not see it undone by a crash. With none,
        // there is nothing to sync (containerd calls Cleanup after each of its
        // collections, which made this a synced commit per collection for nothing).
        if !report.removed.is_empty() {
            self.db.db().flush()?;
        }
        if reclaim {
            let backend = self.backend.clone();
            match with_deadline(deadline, format!("cleanup of snapshotter {sn:?}"), move || {
                backend.cleanup()
            }) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotImplemented => {}
                Err(e) => {
                    tracing::warn!(snapshotter = %sn, error = %e, "backend cleanup failed; will retry");
                    report.failed.push(("(cleanup)".into(), e.to_string()));
                }
            }
        }
        Ok(report)
    }

    /// Finishes the removals queued in the background, then closes the backend.
    pub fn close(&self) -> Result<()> {
        self.settle();
        self.backend.close()
    }
}
