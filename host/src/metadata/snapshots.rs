//! One snapshotter as its users see it: namespaced keys over a backend that knows only
//! backend keys.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redb::{ReadableMultimapTable, ReadableTable};
use serde::Serialize;

use super::Ctx;
use super::db::{BKEYS, CHILDREN, MetaDb, SNAPSHOTS};
use super::lease::{self, Resource};
use super::record::Record;
use crate::error::{Error, ErrorKind, Result};
use crate::fault::Faults;
use crate::filter::Filter;
use crate::kv;
use crate::kv::{now_nanos, to_nanos};
use crate::snapshot::{
    Info, Kind, LABEL_SNAPSHOT_REF, Labels, Mount, Usage, inherited_labels, validate_labels,
};
use crate::snapshotter::{FieldPath, Snapshotter};

/// A named snapshotter: the metadata layer in front of one backend.
///
/// Every mutation is atomic from the caller's view: a backend failure leaves no record
/// behind, and a record that cannot be stored after the backend succeeded has its
/// backend snapshot removed again.
pub struct Snapshots {
    db: Arc<MetaDb>,
    name: String,
    backend: Arc<dyn Snapshotter>,
    faults: Arc<Faults>,
    /// Backend keys a create or commit has made (or is making) in the backend but not
    /// yet recorded. Pruning spares them; it holds no lock that would stop writers.
    inflight: Mutex<HashMap<String, usize>>,
    /// Told of removals and other mutations, so a scheduler can collect.
    trigger: Option<Arc<crate::gc::Trigger>>,
}

/// Marks a backend key as in flight for as long as it lives.
struct InFlight<'a> {
    set: &'a Mutex<HashMap<String, usize>>,
    bkey: String,
}

impl<'a> InFlight<'a> {
    fn new(set: &'a Mutex<HashMap<String, usize>>, bkey: &str) -> Self {
        *set.lock().unwrap_or_else(|e| e.into_inner()).entry(bkey.to_owned()).or_default() += 1;
        InFlight { set, bkey: bkey.to_owned() }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut set = self.set.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = set.get_mut(&self.bkey) {
            *n -= 1;
            if *n == 0 {
                set.remove(&self.bkey);
            }
        }
    }
}

/// Runs a backend call on its own thread and gives up waiting after `deadline`: a
/// backend that hangs costs that call (and a parked thread), never the caller.
pub(crate) fn with_deadline<T: Send + 'static>(
    deadline: Duration,
    what: String,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("wasnap-backend-call".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|e| Error::internal("spawn a backend call", e))?;
    match rx.recv_timeout(deadline) {
        Ok(r) => r,
        Err(_) => Err(Error::Unavailable(format!("{what}: no answer within {deadline:?}"))),
    }
}

impl std::fmt::Debug for Snapshots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshots").field("name", &self.name).finish_non_exhaustive()
    }
}

/// What [`Snapshots::cleanup`] did.
#[derive(Debug, Default, Clone, Serialize, serde::Deserialize)]
pub struct PruneReport {
    /// Backend keys removed because no record named them.
    pub removed: Vec<String>,
    /// Backend keys that could not be removed, with the reason; retried next time.
    pub failed: Vec<(String, String)>,
}

fn not_found(key: &str) -> Error {
    Error::NotFound(format!("snapshot {key:?}"))
}

type SnapTable<'t> = redb::Table<'t, (&'static str, &'static str, &'static str), &'static [u8]>;

fn get(
    t: &impl ReadableTable<(&'static str, &'static str, &'static str), &'static [u8]>,
    sn: &str,
    ns: &str,
    key: &str,
) -> Result<Option<Record>> {
    match t.get((sn, ns, key)).map_err(kv::e)? {
        Some(g) => Record::decode(g.value(), key).map(Some),
        None => Ok(None),
    }
}

fn put(t: &mut SnapTable<'_>, sn: &str, ns: &str, key: &str, rec: &Record) -> Result<()> {
    t.insert((sn, ns, key), rec.encode()?.as_slice()).map_err(kv::e)?;
    Ok(())
}

impl Snapshots {
    /// The snapshotter `name`, recording into `db` and storing data in `backend`.
    pub fn new(
        db: Arc<MetaDb>,
        name: impl Into<String>,
        backend: Arc<dyn Snapshotter>,
        faults: Arc<Faults>,
    ) -> Self {
        Snapshots {
            db,
            name: name.into(),
            backend,
            faults,
            inflight: Mutex::new(HashMap::new()),
            trigger: None,
        }
    }

    /// Tells `trigger` of every removal and mutation from now on.
    #[must_use]
    pub fn with_trigger(mut self, trigger: Arc<crate::gc::Trigger>) -> Self {
        self.trigger = Some(trigger);
        self
    }

    fn mutated(&self) {
        if let Some(t) = &self.trigger {
            t.mutation();
        }
    }

    /// The snapshotter's name (`native`, ...).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The backend behind the metadata.
    pub fn backend(&self) -> &Arc<dyn Snapshotter> {
        &self.backend
    }

    /// Adds `key` to the lease in effect for the call, if any.
    fn hold(&self, ctx: &Ctx, key: &str) -> Result<()> {
        if ctx.lease().is_none() {
            return Ok(());
        }
        let txn = self.db.write()?;
        lease::hold_in(&txn, ctx, &Resource::snapshot(&self.name, key))?;
        txn.commit().map_err(kv::e)
    }

    fn record(&self, ctx: &Ctx, key: &str) -> Result<Record> {
        let txn = self.db.read()?;
        let t = txn.open_table(SNAPSHOTS).map_err(kv::e)?;
        get(&t, &self.name, ctx.namespace(), key)?.ok_or_else(|| not_found(key))
    }

    /// What is known about `key`.
    pub fn stat(&self, ctx: &Ctx, key: &str) -> Result<Info> {
        Ok(self.record(ctx, key)?.info(key))
    }

    /// Changes the labels of `info.name`: with no field paths all labels are replaced;
    /// `labels` replaces all, `labels.<k>` sets or (if absent from `info`) deletes one.
    /// Any other field path is invalid-argument.
    pub fn update(&self, ctx: &Ctx, info: &Info, fieldpaths: &[String]) -> Result<Info> {
        if info.name.is_empty() {
            return Err(Error::InvalidArgument("snapshot name must not be empty".into()));
        }
        let paths = FieldPath::parse_all(fieldpaths, &info.name)?;
        let (sn, ns, key) = (self.name.as_str(), ctx.namespace(), info.name.as_str());
        let txn = self.db.write()?;
        let (updated, backend_touched) = {
            let mut t = txn.open_table(SNAPSHOTS).map_err(kv::e)?;
            let mut rec = get(&t, sn, ns, key)?.ok_or_else(|| not_found(key))?;
            let before = inherited_labels(&rec.labels);
            FieldPath::apply(&paths, &mut rec.labels, &info.labels);
            validate_labels(&rec.labels)?;
            rec.updated = now_nanos();
            let after = inherited_labels(&rec.labels);
            // The backend only ever sees inherited labels; spare it (and its fsync) when
            // none of those change, which is the common case of `ctr snapshots label`.
            let touched = before != after;
            if touched {
                let mut inner = rec.info(&rec.bkey);
                inner.labels = after;
                self.backend.update(&inner, &[FieldPath::Labels])?;
            }
            put(&mut t, sn, ns, key, &rec)?;
            (rec.info(key), touched)
        };
        txn.commit().map_err(|e| {
            if backend_touched {
                tracing::error!(snapshotter = sn, key, error = %e,
                    "metadata transaction failed after updating the backend's labels");
            }
            kv::e(e)
        })?;
        self.mutated();
        Ok(updated)
    }

    /// Disk usage of `key` itself.
    pub fn usage(&self, ctx: &Ctx, key: &str) -> Result<Usage> {
        let rec = self.record(ctx, key)?;
        self.backend.usage(&rec.bkey)
    }

    /// The mounts of `key`.
    pub fn mounts(&self, ctx: &Ctx, key: &str) -> Result<Vec<Mount>> {
        let rec = self.record(ctx, key)?;
        self.backend.mounts(&rec.bkey)
    }

    /// Creates the active snapshot `key` on `parent`.
    pub fn prepare(
        &self,
        ctx: &Ctx,
        key: &str,
        parent: Option<&str>,
        labels: &Labels,
    ) -> Result<Vec<Mount>> {
        self.create(ctx, key, parent, labels, Kind::Active)
    }

    /// Creates the read-only view `key` of `parent`.
    pub fn view(
        &self,
        ctx: &Ctx,
        key: &str,
        parent: Option<&str>,
        labels: &Labels,
    ) -> Result<Vec<Mount>> {
        self.create(ctx, key, parent, labels, Kind::View)
    }

    fn create(
        &self,
        ctx: &Ctx,
        key: &str,
        parent: Option<&str>,
        labels: &Labels,
        kind: Kind,
    ) -> Result<Vec<Mount>> {
        if key.is_empty() {
            return Err(Error::InvalidArgument("snapshot key must not be empty".into()));
        }
        let parent = parent.filter(|p| !p.is_empty());
        validate_labels(labels)?;
        let target = labels.get(LABEL_SNAPSHOT_REF).filter(|t| !t.is_empty());
        let (sn, ns) = (self.name.as_str(), ctx.namespace());

        // Phase 1: check the names and reserve a backend key, holding no write lock.
        let bparent = {
            let txn = self.db.read()?;
            let t = txn.open_table(SNAPSHOTS).map_err(kv::e)?;
            if let Some(target) = target
                && get(&t, sn, ns, target)?.is_some()
            {
                // As containerd does: the caller's lease now holds what it found.
                self.hold(ctx, target)?;
                return Err(Error::AlreadyExists(format!("target snapshot {target:?}")));
            }
            if get(&t, sn, ns, key)?.is_some() {
                self.hold(ctx, key)?;
                return Err(Error::AlreadyExists(format!("snapshot {key:?}")));
            }
            match parent {
                None => None,
                Some(p) => {
                    let prec = get(&t, sn, ns, p)?
                        .ok_or_else(|| Error::NotFound(format!("parent snapshot {p:?}")))?;
                    if prec.kind != Kind::Committed {
                        return Err(Error::InvalidArgument(format!(
                            "parent {p:?} is not a committed snapshot"
                        )));
                    }
                    Some(prec.bkey)
                }
            }
        };
        let bkey = format!("{ns}/{}/{key}", self.db.next_seq()?);
        let _inflight = InFlight::new(&self.inflight, &bkey);

        // Phase 2: the backend, outside any transaction (it may copy a whole tree).
        let inherited = inherited_labels(labels);
        let made = match kind {
            Kind::View => self.backend.view(&bkey, bparent.as_deref(), &inherited),
            _ => self.backend.prepare(&bkey, bparent.as_deref(), &inherited),
        };
        let now = now_nanos();
        let (rec_key, rec, mounts, created, mut rerr) = match made {
            Ok(mounts) => {
                let rec = Record {
                    bkey: bkey.clone(),
                    kind,
                    parent: parent.map(str::to_owned),
                    labels: labels.clone(),
                    created: now,
                    updated: now,
                    collectable: ctx.lease().is_some(),
                };
                (key, rec, mounts, Some(bkey), None)
            }
            Err(e) if e.is_already_exists() => {
                let Some(target) = target else {
                    // A fresh backend key cannot exist; do not let the caller mistake
                    // this for its own key existing.
                    return Err(Error::Internal(format!(
                        "unexpected error from snapshotter {sn:?}: {e}"
                    )));
                };
                let mut rec = self.backend_target(target, bparent.as_deref(), parent, labels)?;
                rec.collectable = ctx.lease().is_some();
                let err =
                    Error::AlreadyExists(format!("target snapshot {target:?} from snapshotter"));
                (target.as_str(), rec, Vec::new(), None, Some(err))
            }
            Err(e) => return Err(e),
        };

        // Phase 3: record it, re-checking what phase 1 saw.
        let stored = self.faults.hit("metadata.create.after-backend").and_then(|()| {
            let txn = self.db.write()?;
            {
                lease::hold_in(&txn, ctx, &Resource::snapshot(sn, rec_key))?;
                let mut t = txn.open_table(SNAPSHOTS).map_err(kv::e)?;
                if get(&t, sn, ns, rec_key)?.is_some() {
                    if rerr.is_none() {
                        rerr = Some(Error::AlreadyExists(format!("snapshot {rec_key:?}")));
                    }
                    drop(t);
                    return txn.commit().map_err(kv::e);
                }
                if let Some(p) = parent {
                    let prec = get(&t, sn, ns, p)?
                        .ok_or_else(|| Error::NotFound(format!("parent snapshot {p:?}")))?;
                    if Some(&prec.bkey) != bparent.as_ref() {
                        return Err(Error::InvalidArgument(format!(
                            "mismatched parent {p:?} from target {target:?}"
                        )));
                    }
                    let mut children = txn.open_multimap_table(CHILDREN).map_err(kv::e)?;
                    children.insert((sn, ns, p), rec_key).map_err(kv::e)?;
                }
                put(&mut t, sn, ns, rec_key, &rec)?;
                let mut bkeys = txn.open_multimap_table(BKEYS).map_err(kv::e)?;
                bkeys.insert((sn, rec.bkey.as_str()), (ns, rec_key)).map_err(kv::e)?;
            }
            txn.commit().map_err(kv::e)
        });
        if let Err(e) = stored {
            rerr = Some(e);
        }
        if let Some(err) = rerr {
            if let Some(created) = created {
                // The record is not stored: the backend snapshot must not outlive it.
                if let Err(e) = self.backend.remove(&created) {
                    tracing::error!(snapshotter = sn, bkey = %created, error = %e,
                        "failed to remove a backend snapshot whose record could not be stored; cleanup will retry");
                }
            }
            return Err(err);
        }
        self.mutated();
        Ok(mounts)
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
            .ok_or_else(|| Error::NotFound(format!("target snapshot {target:?} in backend")))?;
        let mut all = t.labels.clone();
        all.extend(labels.iter().map(|(k, v)| (k.clone(), v.clone())));
        Ok(Record {
            bkey: t.name,
            kind: Kind::Committed,
            parent: parent.map(str::to_owned),
            labels: all,
            created: to_nanos(t.created),
            updated: to_nanos(t.updated),
            collectable: false,
        })
    }

    /// Commits the active snapshot `key` as `name` with `labels`; `key` stops existing.
    pub fn commit(&self, ctx: &Ctx, name: &str, key: &str, labels: &Labels) -> Result<()> {
        if name.is_empty() {
            return Err(Error::InvalidArgument("snapshot name must not be empty".into()));
        }
        validate_labels(labels)?;
        let (sn, ns) = (self.name.as_str(), ctx.namespace());
        let txn = self.db.write()?;
        let (bname, _inflight) = {
            lease::hold_in(&txn, ctx, &Resource::snapshot(sn, name))?;
            let mut t = txn.open_table(SNAPSHOTS).map_err(kv::e)?;
            if get(&t, sn, ns, name)?.is_some() {
                drop(t);
                txn.commit().map_err(kv::e)?;
                return Err(Error::AlreadyExists(format!("snapshot {name:?}")));
            }
            let rec = get(&t, sn, ns, key)?.ok_or_else(|| not_found(key))?;
            if rec.kind != Kind::Active {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key:?} is a {} snapshot, only active snapshots can be committed",
                    rec.kind
                )));
            }
            let bname = format!("{ns}/{}/{name}", MetaDb::reserve_in(&txn)?);
            let inflight = InFlight::new(&self.inflight, &bname);
            let now = now_nanos();
            let committed = Record {
                bkey: bname.clone(),
                kind: Kind::Committed,
                parent: rec.parent.clone(),
                labels: labels.clone(),
                created: now,
                updated: now,
                collectable: ctx.lease().is_some(),
            };
            lease::release_in(&txn, ctx, &Resource::snapshot(sn, key))?;
            t.remove((sn, ns, key)).map_err(kv::e)?;
            put(&mut t, sn, ns, name, &committed)?;
            if let Some(p) = &rec.parent {
                let mut children = txn.open_multimap_table(CHILDREN).map_err(kv::e)?;
                children.remove((sn, ns, p.as_str()), key).map_err(kv::e)?;
                children.insert((sn, ns, p.as_str()), name).map_err(kv::e)?;
            }
            let mut bkeys = txn.open_multimap_table(BKEYS).map_err(kv::e)?;
            bkeys.remove((sn, rec.bkey.as_str()), (ns, key)).map_err(kv::e)?;
            bkeys.insert((sn, bname.as_str()), (ns, name)).map_err(kv::e)?;
            // Inside the transaction, as containerd does: if the backend fails, nothing
            // changed; the window in which the backend has committed and the record has
            // not is one local commit wide.
            self.backend.commit(&bname, &rec.bkey, &inherited_labels(labels))?;
            (bname, inflight)
        };
        self.faults.hit("metadata.commit.after-backend").and_then(|()| txn.commit().map_err(kv::e)).map_err(|e| {
            tracing::error!(snapshotter = sn, key, bname = %bname, error = %e,
                "uncommittable snapshot: metadata transaction failed after the backend committed; the active record remains and the backend snapshot is left for cleanup");
            e
        })?;
        self.mutated();
        Ok(())
    }

    /// Removes `key`, which must have no children. The backend snapshot goes when no
    /// record names it any more; if the backend fails to remove it, the metadata removal
    /// stands and [`Snapshots::cleanup`] retries.
    pub fn remove(&self, ctx: &Ctx, key: &str) -> Result<()> {
        let (sn, ns) = (self.name.as_str(), ctx.namespace());
        let txn = self.db.write()?;
        let (bkey, last) = {
            let mut t = txn.open_table(SNAPSHOTS).map_err(kv::e)?;
            let rec = get(&t, sn, ns, key)?.ok_or_else(|| not_found(key))?;
            let mut children = txn.open_multimap_table(CHILDREN).map_err(kv::e)?;
            if children.get((sn, ns, key)).map_err(kv::e)?.next().is_some() {
                return Err(Error::FailedPrecondition(format!(
                    "cannot remove snapshot {key:?} with child"
                )));
            }
            if let Some(p) = &rec.parent {
                children.remove((sn, ns, p.as_str()), key).map_err(kv::e)?;
            }
            t.remove((sn, ns, key)).map_err(kv::e)?;
            lease::release_in(&txn, ctx, &Resource::snapshot(sn, key))?;
            let mut bkeys = txn.open_multimap_table(BKEYS).map_err(kv::e)?;
            bkeys.remove((sn, rec.bkey.as_str()), (ns, key)).map_err(kv::e)?;
            let last = bkeys.get((sn, rec.bkey.as_str())).map_err(kv::e)?.next().is_none();
            (rec.bkey, last)
        };
        txn.commit().map_err(kv::e)?;
        if let Some(t) = &self.trigger {
            t.deletion();
        }
        if last {
            match self
                .faults
                .hit("metadata.remove.backend")
                .and_then(|()| self.backend.remove(&bkey))
            {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => tracing::warn!(snapshotter = sn, bkey, error = %e,
                    "backend failed to remove a snapshot no record names any more; cleanup will retry"),
            }
        }
        Ok(())
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
        let txn = self.db.read()?;
        let t = txn.open_table(SNAPSHOTS).map_err(kv::e)?;
        for item in t.range((sn, ns, "")..).map_err(kv::e)? {
            let (k, v) = item.map_err(kv::e)?;
            let (s, n, key) = k.value();
            if s != sn || n != ns {
                break;
            }
            let info = Record::decode(v.value(), key)?.info(key);
            if filter.matches(&info) {
                f(info)?;
            }
        }
        Ok(())
    }

    /// As [`Snapshots::walk`], over every namespace: `f` gets each matching snapshot
    /// with its namespace, in order of namespace, then key.
    pub fn walk_all(
        &self,
        filters: &[String],
        f: &mut dyn FnMut(&str, Info) -> Result<()>,
    ) -> Result<()> {
        let filter = Filter::parse_all(filters)?;
        let sn = self.name.as_str();
        let txn = self.db.read()?;
        let t = txn.open_table(SNAPSHOTS).map_err(kv::e)?;
        for item in t.range((sn, "", "")..).map_err(kv::e)? {
            let (k, v) = item.map_err(kv::e)?;
            let (s, ns, key) = k.value();
            if s != sn {
                break;
            }
            let info = Record::decode(v.value(), key)?.info(key);
            if filter.matches(&info) {
                f(ns, info)?;
            }
        }
        Ok(())
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
        // we read that set, or its record committed before we read the records (a mark
        // is dropped only after its record commits). Read the other way round, a create
        // finishing between the two reads would be in neither, and be pruned alive.
        let inflight: Vec<String> =
            self.inflight.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
        let mut named = self.named()?;
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

    /// Every backend key some record names, in any namespace.
    fn named(&self) -> Result<HashSet<String>> {
        let sn = self.name.as_str();
        let txn = self.db.read()?;
        let bkeys = txn.open_multimap_table(BKEYS).map_err(kv::e)?;
        let mut named = HashSet::new();
        for item in bkeys.range((sn, "")..).map_err(kv::e)? {
            let (k, _) = item.map_err(kv::e)?;
            let (s, bkey) = k.value();
            if s != sn {
                break;
            }
            named.insert(bkey.to_owned());
        }
        Ok(named)
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
        let mut missing: Vec<String> = self
            .named()?
            .into_iter()
            .filter(|k| !present.contains(k) && !inflight.contains_key(k))
            .collect();
        missing.sort();
        Ok(missing)
    }

    /// Removes the orphans [`Snapshots::orphans`] finds, each backend call under
    /// `deadline`; one that fails or hangs is reported and retried next time, and
    /// writers are never held up. With `reclaim`, the backend's `cleanup` follows.
    pub fn prune(&self, deadline: Duration, reclaim: bool) -> Result<PruneReport> {
        let sn = self.name.clone();
        let mut report = PruneReport::default();
        for bkey in self.orphans(deadline)? {
            let backend = self.backend.clone();
            let key = bkey.clone();
            let faults = self.faults.clone();
            let removed = with_deadline(
                deadline,
                format!("remove {bkey:?} from snapshotter {sn:?}"),
                move || {
                    faults.hit("gc.prune.remove")?;
                    backend.remove(&key)
                },
            );
            match removed {
                Ok(()) => report.removed.push(bkey),
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(snapshotter = %sn, bkey, error = %e, "prune: could not remove; will retry");
                    report.failed.push((bkey, e.to_string()));
                }
            }
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

    /// Closes the backend.
    pub fn close(&self) -> Result<()> {
        self.backend.close()
    }
}
