//! A driver's own records: which backend keys exist, their numeric ids, kinds,
//! parents, labels and stored usage (the job of containerd's `snapshots/storage`).
//!
//! The records live in tables of their own, keyed by the driver's name. Under a host
//! they are in the root's database beside the metadata's (never in its tables), and
//! changes are [deferred](crate::kv::Durability::Deferred): the metadata commit that
//! follows every change makes it durable with one sync. Opened on its own (tests, the
//! conformance suite, embedders using a driver directly) a store has a database in the
//! driver's directory and syncs every change.
//!
//! A change that is followed by deleting data the old records name (a btrfs commit
//! deletes the active subvolume) is synced before the deleting, whatever the store.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use cap_std::fs::Dir;
use redb::{
    MultimapTableDefinition, ReadableMultimapTable, ReadableTable, TableDefinition,
    WriteTransaction,
};
use serde::{Deserialize, Serialize};

use crate::backend::FieldPath;
use crate::error::{Context, Error, Result};
use crate::kv::{Db, Durability, IdBlocks, from_nanos, now_nanos};
use crate::snapshot::{Info, Kind, Labels, Usage};

/// (driver, key) -> JSON record.
const SNAPS: TableDefinition<'static, (&str, &str), &[u8]> =
    TableDefinition::new("driver_snapshots");
/// (driver, parent) -> child keys.
const CHILDREN: MultimapTableDefinition<'static, (&str, &str), &str> =
    MultimapTableDefinition::new("driver_children");
/// (driver, counter) -> value: the highest id reserved.
const META: TableDefinition<'static, (&str, &str), u64> = TableDefinition::new("driver_meta");
const META_ID: &str = "id";

/// The file a driver opened on its own keeps its records in, inside its directory; the
/// file a driver's records were in before they moved into the root's database.
pub const DRIVER_DB: &str = "metadata.db";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Rec {
    id: u64,
    kind: Kind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    parent: Option<String>,
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    labels: Labels,
    created: u64,
    updated: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
    /// A merge: the committed snapshots it stacks, bottom first, each for its own
    /// layer only. Such a record has no parent; its entry holds nothing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    layers: Vec<String>,
}

impl Rec {
    fn info(&self, key: &str) -> Info {
        Info {
            name: key.to_owned(),
            parent: self.parent.clone(),
            kind: self.kind,
            labels: self.labels.clone(),
            created: from_nanos(self.created),
            updated: from_nanos(self.updated),
        }
    }
}

/// What a driver needs to find a snapshot on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snap {
    /// The snapshot's numeric id: its directory name.
    pub id: u64,
    /// Its kind.
    pub kind: Kind,
    /// Ids of the layers below it, nearest first: its ancestors', or for a merge
    /// (and what is made on one) the merged layers' own.
    pub parent_ids: Vec<u64>,
    /// Where `parent_ids` holds a whole snapshot's tree: `(i, id)` says that
    /// `parent_ids[i..]` is everything snapshot `id` shows. Nearest first.
    pub whole: Vec<(usize, u64)>,
    /// Whether this is a merge, whose own entry holds nothing.
    pub merge: bool,
    /// Usage stored at commit, for committed snapshots.
    pub usage: Option<Usage>,
}

fn not_found(key: &str) -> Error {
    Error::not_found(format!("snapshot {key:?}"))
}

/// Read access to the records from a read or a write transaction.
trait Records {
    fn load(&self, driver: &str, key: &str) -> Result<Option<Rec>>;
    /// The id and kind of each of `keys`, in order, the table opened once: a merge
    /// names hundreds of layers, and their labels are not needed.
    fn heads(&self, driver: &str, keys: &[String]) -> Result<Vec<Option<Head>>>;
}

/// The part of a [`Rec`] that says where and what a snapshot is.
#[derive(Debug, Deserialize)]
struct Head {
    id: u64,
    kind: Kind,
}

macro_rules! records_for {
    ($t:ty) => {
        impl Records for $t {
            fn load(&self, driver: &str, key: &str) -> Result<Option<Rec>> {
                let t = self.open_table(SNAPS)?;
                let g = t.get((driver, key))?;
                g.map(|g| {
                    serde_json::from_slice(g.value())
                        .with_context(|| format!("corrupt driver record for {key:?}"))
                })
                .transpose()
            }

            fn heads(&self, driver: &str, keys: &[String]) -> Result<Vec<Option<Head>>> {
                let t = self.open_table(SNAPS)?;
                keys.iter()
                    .map(|key| {
                        t.get((driver, key.as_str()))?
                            .map(|g| {
                                serde_json::from_slice(g.value())
                                    .with_context(|| format!("corrupt driver record for {key:?}"))
                            })
                            .transpose()
                    })
                    .collect()
            }
        }
    };
}
records_for!(redb::ReadTransaction);
records_for!(WriteTransaction);

/// Checks that `key` is free and `parent` (if any) is a committed snapshot, whose key
/// and record it returns.
fn check_new<'p>(
    txn: &impl Records,
    driver: &str,
    key: &str,
    parent: Option<&'p str>,
) -> Result<Option<(&'p str, Rec)>> {
    if txn.load(driver, key)?.is_some() {
        return Err(Error::already_exists(format!("snapshot {key:?}")));
    }
    let Some(p) = parent else { return Ok(None) };
    let prec =
        txn.load(driver, p)?.ok_or_else(|| Error::not_found(format!("parent snapshot {p:?}")))?;
    if prec.kind != Kind::Committed {
        return Err(Error::invalid_argument(format!("parent {p:?} is not a committed snapshot")));
    }
    Ok(Some((p, prec)))
}

/// A staged change asked for with no staging under way on this thread: a bug in the
/// caller, never a change silently dropped.
fn not_staging() -> Error {
    Error::internal("a driver's record change was to be staged, but no staging is under way")
}

/// Whether a snapshot has `key` as its parent or one of its layers.
fn has_children(txn: &WriteTransaction, driver: &str, key: &str) -> Result<bool> {
    Ok(txn.open_multimap_table(CHILDREN)?.get((driver, key))?.next().is_some())
}

/// Deletes the record `rec` of `key` and its links to its parent and layers.
fn remove_rec(txn: &WriteTransaction, driver: &str, key: &str, rec: &Rec) -> Result<()> {
    let mut children = txn.open_multimap_table(CHILDREN)?;
    for p in rec.parent.iter().chain(&rec.layers) {
        children.remove((driver, p.as_str()), key)?;
    }
    drop(children);
    txn.open_table(SNAPS)?.remove((driver, key))?;
    Ok(())
}

/// Checks that `name` is free and `key` an active snapshot, whose record it returns.
fn check_commit(txn: &impl Records, driver: &str, key: &str, name: &str) -> Result<Rec> {
    if txn.load(driver, name)?.is_some() {
        return Err(Error::already_exists(format!("snapshot {name:?}")));
    }
    let rec = txn.load(driver, key)?.ok_or_else(|| not_found(key))?;
    if rec.kind != Kind::Active {
        return Err(Error::failed_precondition(format!("snapshot {key:?} is not active")));
    }
    Ok(rec)
}

fn store_rec(txn: &WriteTransaction, driver: &str, key: &str, rec: &Rec) -> Result<()> {
    let bytes = serde_json::to_vec(rec).context("encode driver record")?;
    txn.open_table(SNAPS)?.insert((driver, key), bytes.as_slice())?;
    Ok(())
}

fn snap(txn: &impl Records, driver: &str, key: &str, rec: &Rec) -> Result<Snap> {
    let load = |k: &str, what: &str| {
        txn.load(driver, k)?.ok_or_else(|| {
            Error::internal(format!("driver record of {key:?} names missing {what} {k:?}"))
        })
    };
    let mut parent_ids = Vec::new();
    let mut whole = Vec::new();
    // A merge's own layers, or the first merge found below.
    let mut merged = rec.layers.clone();
    let mut next = if merged.is_empty() { rec.parent.clone() } else { None };
    // Only a damaged or forged database has a cycle: it is reported, never walked for ever.
    let mut seen = std::collections::HashSet::new();
    while let Some(p) = next {
        if !seen.insert(p.clone()) || p == key {
            return Err(Error::internal(format!(
                "driver record of {key:?}: its parents come back to {p:?} (the database \
                 is damaged)"
            )));
        }
        let below = load(&p, "parent")?;
        whole.push((parent_ids.len(), below.id));
        if !below.layers.is_empty() {
            merged = below.layers;
            break;
        }
        parent_ids.push(below.id);
        next = below.parent;
    }
    merged.reverse();
    for (layer, head) in merged.iter().zip(txn.heads(driver, &merged)?) {
        let head = head.ok_or_else(|| {
            Error::internal(format!("driver record of {key:?} names missing layer {layer:?}"))
        })?;
        parent_ids.push(head.id);
    }
    Ok(Snap {
        id: rec.id,
        kind: rec.kind,
        parent_ids,
        whole,
        merge: !rec.layers.is_empty(),
        usage: rec.usage,
    })
}

/// The [`Snap`] of `rec`, a new snapshot that is not a merge, on the parent whose Snap
/// is `parent` (none for a bottom one): what [`snap`] finds, without reading.
fn child_snap(rec: &Rec, parent: Option<&Snap>) -> Snap {
    let (mut parent_ids, mut whole) = (Vec::new(), Vec::new());
    if let Some(p) = parent {
        whole.push((0, p.id));
        if p.merge {
            // A merge's own layers are what a snapshot made on it shows below it.
            parent_ids.extend(&p.parent_ids);
        } else {
            parent_ids.push(p.id);
            parent_ids.extend(&p.parent_ids);
            whole.extend(p.whole.iter().map(|&(i, id)| (i + 1, id)));
        }
    }
    Snap { id: rec.id, kind: rec.kind, parent_ids, whole, merge: false, usage: rec.usage }
}

/// How many ids one reservation takes: ids are handed out before a tree is built, with
/// no write; a crash skips the rest of a block, never reuses an id.
const ID_BLOCK: u64 = 1024;

/// A driver's record store.
#[derive(Debug)]
pub struct Store {
    db: Arc<Db>,
    driver: String,
    durability: Durability,
    ids: IdBlocks,
}

impl Store {
    /// A store of its own in `dir` (`metadata.db`), syncing every change.
    pub fn open(dir: &Dir) -> Result<Self> {
        let db = Arc::new(Db::open(dir, DRIVER_DB, "driver database")?);
        Self::init(db, "driver".into(), Durability::Immediate)
    }

    /// The records of driver `driver` in the shared database `db`, with deferred
    /// changes (see the module documentation). Records an earlier wasnap kept in
    /// `dir/metadata.db` are moved in first, once.
    pub fn shared(db: Arc<Db>, driver: &str, dir: &Dir) -> Result<Self> {
        let store = Self::init(db, driver.to_owned(), Durability::Deferred)?;
        store.import_legacy(dir)?;
        Ok(store)
    }

    fn init(db: Arc<Db>, driver: String, durability: Durability) -> Result<Self> {
        db.write(Durability::Immediate, |txn| {
            txn.open_table(SNAPS)?;
            txn.open_multimap_table(CHILDREN)?;
            txn.open_table(META)?;
            Ok(())
        })?;
        let ids = IdBlocks::new(META, &driver, META_ID, ID_BLOCK);
        Ok(Store { db, driver, durability, ids })
    }

    /// The database the records are in.
    pub fn db(&self) -> &Arc<Db> {
        &self.db
    }

    /// Moves the records of a driver database file from before the shared database into
    /// it, then renames the file aside.
    fn import_legacy(&self, dir: &Dir) -> Result<()> {
        const OLD_SNAPS: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("snapshots");
        const OLD_META: TableDefinition<'static, &str, u64> = TableDefinition::new("meta");
        if dir.symlink_metadata(DRIVER_DB).is_err() {
            return Ok(());
        }
        let (recs, max_id) = {
            let old = Db::open(dir, DRIVER_DB, "old driver database")?;
            old.read_with(|txn| {
                let mut recs = Vec::new();
                if let Ok(t) = txn.open_table(OLD_SNAPS) {
                    for item in t.iter()? {
                        let (k, v) = item?;
                        let rec: Rec = serde_json::from_slice(v.value()).with_context(|| {
                            format!("corrupt old driver record for {:?}", k.value())
                        })?;
                        recs.push((k.value().to_owned(), rec));
                    }
                }
                let max_id = match txn.open_table(OLD_META) {
                    Ok(t) => t.get(META_ID)?.map_or(0, |g| g.value()),
                    Err(_) => 0,
                };
                Ok((recs, max_id))
            })?
        };
        let driver = self.driver.clone();
        let n = recs.len();
        self.db.write(Durability::Immediate, move |txn| {
            for (key, rec) in &recs {
                store_rec(txn, &driver, key, rec)?;
                if let Some(p) = &rec.parent {
                    txn.open_multimap_table(CHILDREN)?
                        .insert((driver.as_str(), p.as_str()), key.as_str())?;
                }
            }
            let mut meta = txn.open_table(META)?;
            let cur = meta.get((driver.as_str(), META_ID))?.map_or(0, |g| g.value());
            meta.insert((driver.as_str(), META_ID), cur.max(max_id))?;
            Ok(())
        })?;
        dir.rename(DRIVER_DB, dir, format!("{DRIVER_DB}.imported"))
            .context("set the old driver database aside")?;
        // Synced before anything changes the imported records: a start after a power
        // cut that found the old file again would import it again, bringing back what
        // was removed since.
        // (`dir` may be an O_PATH handle, which cannot be synced: opened for reading.)
        dir.open(".")
            .and_then(|d| d.sync_all())
            .context("sync the directory of the old driver database")?;
        tracing::info!(driver = %self.driver, records = n, "moved the driver's records into the root's database");
        Ok(())
    }

    /// A fresh id for a snapshot about to be built: never handed out before, even
    /// across crashes, and taken without a write (ids are reserved in blocks).
    pub fn next_id(&self) -> Result<u64> {
        self.ids.next(&self.db)
    }

    /// The info and on-disk identity of `key`.
    pub fn get(&self, key: &str) -> Result<(Info, Snap)> {
        self.db.read_with(|txn| {
            let rec = txn.load(&self.driver, key)?.ok_or_else(|| not_found(key))?;
            Ok((rec.info(key), snap(txn, &self.driver, key, &rec)?))
        })
    }

    /// Checks, before any work on disk, that `key` is free and `parent` (if any) is a
    /// committed snapshot, returning the parent. The record's write checks again; this
    /// only spares building a tree or subvolume for nothing.
    pub fn precheck(&self, key: &str, parent: Option<&str>) -> Result<Option<Snap>> {
        self.db.read_with(|txn| {
            let Some((p, prec)) = check_new(txn, &self.driver, key, parent)? else {
                return Ok(None);
            };
            Ok(Some(snap(txn, &self.driver, p, &prec)?))
        })
    }

    /// Calls `f` with every snapshot's info and id.
    pub fn walk(&self, f: &mut dyn FnMut(Info, u64) -> Result<()>) -> Result<()> {
        self.db.read_with(|txn| {
            let t = txn.open_table(SNAPS)?;
            for item in t.range((self.driver.as_str(), "")..)? {
                let (k, v) = item?;
                let (driver, key) = k.value();
                if driver != self.driver {
                    break;
                }
                let rec: Rec = serde_json::from_slice(v.value())
                    .with_context(|| format!("corrupt driver record for {key:?}"))?;
                f(rec.info(key), rec.id)?;
            }
            Ok(())
        })
    }

    /// Every id a record names: anything else on disk is a leftover.
    pub fn ids(&self) -> Result<HashSet<u64>> {
        let mut ids = HashSet::new();
        self.walk(&mut |_, id| {
            ids.insert(id);
            Ok(())
        })?;
        Ok(ids)
    }

    /// Whether changes are deferred: the records are in a shared database, whose next
    /// immediate commit makes them durable.
    pub(crate) fn defers(&self) -> bool {
        self.durability == Durability::Deferred
    }

    /// Whether this thread's changes to the records are being staged for the caller's
    /// transaction ([`Db::staging`]): only a store in a shared database defers, and
    /// only its deferred changes are staged.
    pub(crate) fn staging(&self) -> bool {
        self.durability == Durability::Deferred && self.db.is_staging()
    }

    /// Stages `write` for the caller's transaction; an internal error (nothing staged)
    /// if [`Store::staging`] is not true on this thread.
    fn stage(
        &self,
        write: impl FnMut(&WriteTransaction) -> Result<()> + Send + 'static,
    ) -> Result<()> {
        match self.db.stage(write) {
            true => Ok(()),
            false => Err(not_staging()),
        }
    }

    fn write<R: Send + 'static>(
        &self,
        durability: Option<Durability>,
        op: impl FnMut(&WriteTransaction, &str) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        let driver = self.driver.clone();
        let mut op = op;
        self.db.write(durability.unwrap_or(self.durability), move |txn| op(txn, &driver))
    }

    /// Records a new snapshot `key` of `kind` under the id `id` (from [`Store::next_id`]).
    /// The key must be free; the parent must exist and be committed. `parent_snap` is
    /// the parent's [`Snap`] as [`Store::precheck`] found it, if the caller has it: a
    /// staged create then derives the new one from it rather than read it all again.
    pub fn create(
        &self,
        id: u64,
        kind: Kind,
        key: &str,
        parent: Option<&str>,
        parent_snap: Option<&Snap>,
        labels: &Labels,
    ) -> Result<Snap> {
        let now = now_nanos();
        let rec = Rec {
            id,
            kind,
            parent: parent.map(str::to_owned),
            labels: labels.clone(),
            created: now,
            updated: now,
            usage: None,
            layers: Vec::new(),
        };
        let key = key.to_owned();
        // `parent_id`: the parent the caller's view of it was derived from, if any.
        let write = |txn: &WriteTransaction, driver: &str, key: &str, rec: &Rec, parent_id| {
            let found = check_new(txn, driver, key, rec.parent.as_deref())?;
            if let (Some((p, prec)), Some(id)) = (found, parent_id)
                && prec.id != id
            {
                return Err(Error::failed_precondition(format!(
                    "parent snapshot {p:?} was replaced while {key:?} was made from it"
                )));
            }
            if let Some(p) = &rec.parent {
                txn.open_multimap_table(CHILDREN)?.insert((driver, p.as_str()), key)?;
            }
            store_rec(txn, driver, key, rec)
        };
        if self.staging() {
            // Written by the caller's transaction, which checks again; the new Snap is
            // derived from the parent's, or checked and read now.
            let (snap, parent_id) = match (parent, parent_snap) {
                (None, _) => (child_snap(&rec, None), None),
                (Some(_), Some(ps)) => (child_snap(&rec, Some(ps)), Some(ps.id)),
                (Some(_), None) => {
                    let snap = self.db.read_with(|txn| {
                        check_new(txn, &self.driver, &key, rec.parent.as_deref())?;
                        snap(txn, &self.driver, &key, &rec)
                    })?;
                    (snap, None)
                }
            };
            let driver = self.driver.clone();
            self.stage(move |txn| write(txn, &driver, &key, &rec, parent_id))?;
            return Ok(snap);
        }
        self.write(None, move |txn, driver| {
            write(txn, driver, &key, &rec, None)?;
            snap(txn, driver, &key, &rec)
        })
    }

    /// Records the merge `key` under the id `id`: a committed snapshot stacking
    /// `layers` (committed snapshots, bottom first), which it holds as children hold a
    /// parent, so none of them can be removed before it.
    pub fn create_merge(
        &self,
        id: u64,
        key: &str,
        layers: &[String],
        labels: &Labels,
    ) -> Result<Snap> {
        let (key, layers, labels) = (key.to_owned(), layers.to_vec(), labels.clone());
        self.write(None, move |txn, driver| {
            if txn.load(driver, &key)?.is_some() {
                return Err(Error::already_exists(format!("snapshot {key:?}")));
            }
            let mut children = txn.open_multimap_table(CHILDREN)?;
            // The layers' ids, nearest (topmost) first, as `snap` would read them again.
            let mut parent_ids = Vec::with_capacity(layers.len());
            for (layer, head) in layers.iter().zip(txn.heads(driver, &layers)?).rev() {
                let head =
                    head.ok_or_else(|| Error::not_found(format!("layer snapshot {layer:?}")))?;
                parent_ids.push(head.id);
                if head.kind != Kind::Committed {
                    return Err(Error::invalid_argument(format!(
                        "layer {layer:?} is not a committed snapshot"
                    )));
                }
                children.insert((driver, layer.as_str()), key.as_str())?;
            }
            drop(children);
            let now = now_nanos();
            let rec = Rec {
                id,
                kind: Kind::Committed,
                parent: None,
                labels: labels.clone(),
                created: now,
                updated: now,
                usage: Some(Usage::default()),
                layers: layers.clone(),
            };
            store_rec(txn, driver, &key, &rec)?;
            Ok(Snap {
                id,
                kind: rec.kind,
                parent_ids,
                whole: Vec::new(),
                merge: true,
                usage: rec.usage,
            })
        })
    }

    /// Turns the active snapshot `key` into the committed `name`, storing its usage and,
    /// if given, moving it to the id `new_id` (whose data the caller has made). With a
    /// new id the change is synced, since the caller deletes the old data next.
    pub fn commit(
        &self,
        key: &str,
        name: &str,
        usage: Usage,
        labels: &Labels,
        new_id: Option<u64>,
    ) -> Result<u64> {
        let (key_ref, name_ref) = (key, name);
        let (key, name, labels) = (key.to_owned(), name.to_owned(), labels.clone());
        let write = move |txn: &WriteTransaction, driver: &str| {
            let mut rec = check_commit(txn, driver, &key, &name)?;
            txn.open_table(SNAPS)?.remove((driver, key.as_str()))?;
            if let Some(p) = &rec.parent {
                let mut children = txn.open_multimap_table(CHILDREN)?;
                children.remove((driver, p.as_str()), key.as_str())?;
                children.insert((driver, p.as_str()), name.as_str())?;
            }
            let now = now_nanos();
            rec.kind = Kind::Committed;
            rec.labels = labels.clone();
            rec.usage = Some(usage);
            rec.created = now;
            rec.updated = now;
            if let Some(id) = new_id {
                rec.id = id;
            }
            store_rec(txn, driver, &name, &rec)?;
            Ok(rec.id)
        };
        // With a new id the change is synced, never staged: the caller deletes the old
        // data next.
        if new_id.is_none() && self.staging() {
            let active =
                self.db.read_with(|txn| check_commit(txn, &self.driver, key_ref, name_ref))?;
            let driver = self.driver.clone();
            self.stage(move |txn| write(txn, &driver).map(drop))?;
            return Ok(active.id);
        }
        let durability = new_id.map(|_| Durability::Immediate);
        self.write(durability, write)
    }

    /// Forgets `key`, which must have no children. Returns its id and kind.
    pub fn remove(&self, key: &str) -> Result<(u64, Kind)> {
        let key = key.to_owned();
        self.write(None, move |txn, driver| {
            let rec = txn.load(driver, &key)?.ok_or_else(|| not_found(&key))?;
            if has_children(txn, driver, &key)? {
                return Err(Error::failed_precondition(format!(
                    "cannot remove snapshot {key:?} with child"
                )));
            }
            remove_rec(txn, driver, &key, &rec)?;
            Ok((rec.id, rec.kind))
        })
    }

    /// As [`Store::remove`], staged for the caller's transaction (an internal error if
    /// [`Store::staging`] is not true): once that commits, `removed` holds the id of the
    /// snapshot whose record went. A record that is gone already, or that still has a
    /// child (one whose own removal is queued behind this), is left as it is: no error
    /// fails the caller's transaction, and pruning takes what is left.
    pub fn remove_staged(&self, key: &str, removed: Arc<Mutex<Option<u64>>>) -> Result<()> {
        let (key, driver) = (key.to_owned(), self.driver.clone());
        self.stage(move |txn| {
            let mut out = None;
            if let Some(rec) = txn.load(&driver, &key)?
                && !has_children(txn, &driver, &key)?
            {
                remove_rec(txn, &driver, &key, &rec)?;
                out = Some(rec.id);
            }
            *removed.lock().unwrap_or_else(|e| e.into_inner()) = out;
            Ok(())
        })
    }

    /// Has `after` run once the caller's transaction commits; an internal error (never
    /// run) if [`Store::staging`] is not true.
    pub fn after_commit(&self, after: Box<dyn FnOnce() + Send>) -> Result<()> {
        match self.db.stage_after(after) {
            true => Ok(()),
            false => Err(not_staging()),
        }
    }

    /// Holds `keep` until the caller's transaction commits or is dropped, with `undo`
    /// run first if it is dropped; an internal error (`undo` not run) if
    /// [`Store::staging`] is not true.
    pub fn hold_staged(
        &self,
        undo: Option<Box<dyn FnOnce() + Send>>,
        keep: Box<dyn std::any::Any + Send>,
    ) -> Result<()> {
        match self.db.stage_hold(undo, keep) {
            true => Ok(()),
            false => Err(not_staging()),
        }
    }

    /// Applies a label update to `info.name`; returns the new info and the snapshot's id.
    pub fn update(&self, info: &Info, paths: &[FieldPath]) -> Result<(Info, u64)> {
        let (info, paths) = (info.clone(), paths.to_vec());
        self.write(None, move |txn, driver| {
            let mut rec = txn.load(driver, &info.name)?.ok_or_else(|| not_found(&info.name))?;
            FieldPath::apply(&paths, &mut rec.labels, &info.labels);
            crate::snapshot::validate_labels(&rec.labels)?;
            rec.updated = now_nanos();
            store_rec(txn, driver, &info.name, &rec)?;
            Ok((rec.info(&info.name), rec.id))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A staged create derives its Snap from the parent's ([`child_snap`]): it must be
    /// the one [`snap`] reads, on plain chains, on a merge and on chains above a merge.
    #[test]
    fn a_snap_derived_from_the_parents_is_the_one_read() {
        let dir = tempfile::tempdir().unwrap();
        let d = Dir::open_ambient_dir(dir.path(), cap_std::ambient_authority()).unwrap();
        let store = Store::open(&d).unwrap();
        let none = Labels::new();
        let committed = |key: &str, parent: Option<&str>| {
            let (id, active) = (store.next_id().unwrap(), format!("{key}-active"));
            store.create(id, Kind::Active, &active, parent, None, &none).unwrap();
            store.commit(&active, key, Usage::default(), &none, None).unwrap();
        };
        committed("a", None);
        committed("b", Some("a"));
        committed("c", Some("b"));
        let layers = ["a".to_owned(), "c".to_owned()];
        store.create_merge(store.next_id().unwrap(), "m", &layers, &none).unwrap();
        committed("d", Some("m"));
        committed("e", Some("d"));
        let cases =
            [("x", None), ("y", Some("a")), ("z", Some("c")), ("v", Some("m")), ("w", Some("e"))];
        for (key, parent) in cases {
            let id = store.next_id().unwrap();
            let read = store.create(id, Kind::View, key, parent, None, &none).unwrap();
            assert_eq!(store.get(key).unwrap().1, read, "{key}");
            let rec = Rec {
                id,
                kind: Kind::View,
                parent: parent.map(str::to_owned),
                labels: none.clone(),
                created: 0,
                updated: 0,
                usage: None,
                layers: Vec::new(),
            };
            let parent_snap = parent.map(|p| store.get(p).unwrap().1);
            assert_eq!(child_snap(&rec, parent_snap.as_ref()), read, "{key} on {parent:?}");
        }
    }

    /// The records of a driver database from before the shared one are moved in once:
    /// the old file is set aside, so a later start never brings back what was removed
    /// since, and ids go on from the old ones.
    #[test]
    fn an_old_driver_database_is_imported_once() {
        const OLD_SNAPS: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("snapshots");
        const OLD_META: TableDefinition<'static, &str, u64> = TableDefinition::new("meta");
        let dir = tempfile::tempdir().unwrap();
        let d = Dir::open_ambient_dir(dir.path(), cap_std::ambient_authority()).unwrap();
        let rec = |id, parent: Option<&str>| Rec {
            id,
            kind: Kind::Committed,
            parent: parent.map(str::to_owned),
            labels: Labels::new(),
            created: 1,
            updated: 2,
            usage: None,
            layers: Vec::new(),
        };
        {
            let old = Db::open(&d, DRIVER_DB, "old").unwrap();
            let recs = [("a", rec(7, None)), ("b", rec(9, Some("a")))];
            old.write(Durability::Immediate, move |txn| {
                let mut t = txn.open_table(OLD_SNAPS)?;
                for (key, r) in &recs {
                    t.insert(*key, serde_json::to_vec(r).unwrap().as_slice())?;
                }
                txn.open_table(OLD_META)?.insert(META_ID, 9)?;
                Ok(())
            })
            .unwrap();
        }
        let open = || {
            let db = Arc::new(Db::open(&d, "root.db", "shared").unwrap());
            Store::shared(db, "native", &d).unwrap()
        };
        let store = open();
        assert_eq!(store.get("b").unwrap().0.parent.as_deref(), Some("a"));
        assert!(store.next_id().unwrap() > 9, "ids go on from the old ones");
        assert!(d.symlink_metadata(DRIVER_DB).is_err(), "set aside");
        assert!(d.symlink_metadata(format!("{DRIVER_DB}.imported")).is_ok());
        store.remove("b").unwrap();
        store.db().flush().unwrap();
        drop(store);
        let store = open();
        assert!(store.get("b").is_err(), "not imported again");
        assert!(store.get("a").is_ok());
    }
}
