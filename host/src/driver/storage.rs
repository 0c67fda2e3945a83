//! A driver's own records: which backend keys exist, their numeric ids, kinds,
//! parents, labels and stored usage (the job of containerd's `snapshots/storage`).
//!
//! Each driver keeps these in a redb file inside its own directory; they are never in
//! the host's metadata database. Work on disk happens between [`Store::begin`] and
//! [`StoreTxn::commit`], so a failed step leaves no record behind.

use std::collections::HashSet;

use cap_std::fs::Dir;
use redb::{
    MultimapTableDefinition, ReadableDatabase, ReadableMultimapTable, ReadableTable,
    TableDefinition,
};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::kv;
use crate::kv::{from_nanos, now_nanos};
use crate::snapshot::{Info, Kind, Labels, Usage};
use crate::snapshotter::FieldPath;

const SNAPS: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("snapshots");
const CHILDREN: MultimapTableDefinition<'static, &str, &str> =
    MultimapTableDefinition::new("children");
const META: TableDefinition<'static, &str, u64> = TableDefinition::new("meta");
const META_ID: &str = "id";

/// The file a driver's records live in, inside its directory.
pub const DRIVER_DB: &str = "metadata.db";

#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// Ids of its ancestors, nearest first.
    pub parent_ids: Vec<u64>,
    /// Usage stored at commit, for committed snapshots.
    pub usage: Option<Usage>,
}

type Snaps<'t> = redb::Table<'t, &'static str, &'static [u8]>;

fn load(t: &impl ReadableTable<&'static str, &'static [u8]>, key: &str) -> Result<Option<Rec>> {
    match t.get(key).map_err(kv::e)? {
        None => Ok(None),
        Some(g) => serde_json::from_slice(g.value())
            .map(Some)
            .map_err(|e| Error::internal(format!("corrupt driver record for {key:?}"), e)),
    }
}

fn store(t: &mut Snaps<'_>, key: &str, rec: &Rec) -> Result<()> {
    let bytes = serde_json::to_vec(rec).map_err(|e| Error::internal("encode driver record", e))?;
    t.insert(key, bytes.as_slice()).map_err(kv::e)?;
    Ok(())
}

fn not_found(key: &str) -> Error {
    Error::NotFound(format!("snapshot {key:?}"))
}

fn snap(t: &impl ReadableTable<&'static str, &'static [u8]>, key: &str, rec: &Rec) -> Result<Snap> {
    let mut parent_ids = Vec::new();
    let mut next = rec.parent.clone();
    while let Some(p) = next {
        let prec = load(t, &p)?.ok_or_else(|| {
            Error::Internal(format!("driver record of {key:?} names missing parent {p:?}"))
        })?;
        parent_ids.push(prec.id);
        next = prec.parent;
    }
    Ok(Snap { id: rec.id, kind: rec.kind, parent_ids, usage: rec.usage })
}

/// A driver's record store.
#[derive(Debug)]
pub struct Store {
    db: redb::Database,
}

impl Store {
    /// Opens (creating if needed) the store in `dir`.
    pub fn open(dir: &Dir) -> Result<Self> {
        let db = kv::open(dir, DRIVER_DB, "driver database")?;
        let txn = db.begin_write().map_err(kv::e)?;
        txn.open_table(SNAPS).map_err(kv::e)?;
        txn.open_multimap_table(CHILDREN).map_err(kv::e)?;
        txn.open_table(META).map_err(kv::e)?;
        txn.commit().map_err(kv::e)?;
        Ok(Store { db })
    }

    /// Starts a change; nothing is visible until [`StoreTxn::commit`].
    pub fn begin(&self) -> Result<StoreTxn> {
        Ok(StoreTxn { txn: self.db.begin_write().map_err(kv::err("begin driver write"))? })
    }

    /// The info and on-disk identity of `key`.
    pub fn get(&self, key: &str) -> Result<(Info, Snap)> {
        let txn = self.db.begin_read().map_err(kv::e)?;
        let t = txn.open_table(SNAPS).map_err(kv::e)?;
        let rec = load(&t, key)?.ok_or_else(|| not_found(key))?;
        Ok((rec.info(key), snap(&t, key, &rec)?))
    }

    /// Checks, before any work on disk, that `key` is free and `parent` (if any) is a
    /// committed snapshot, returning the parent. A create's transaction checks again;
    /// this only spares building a tree or subvolume for nothing.
    pub fn precheck(&self, key: &str, parent: Option<&str>) -> Result<Option<Snap>> {
        match self.get(key) {
            Ok(_) => return Err(Error::AlreadyExists(format!("snapshot {key:?}"))),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
        let Some(p) = parent else { return Ok(None) };
        let (info, snap) = self.get(p).map_err(|e| {
            if e.is_not_found() { Error::NotFound(format!("parent snapshot {p:?}")) } else { e }
        })?;
        if info.kind != Kind::Committed {
            return Err(Error::InvalidArgument(format!(
                "parent {p:?} is not a committed snapshot"
            )));
        }
        Ok(Some(snap))
    }

    /// Calls `f` with every snapshot's info and id.
    pub fn walk(&self, f: &mut dyn FnMut(Info, u64) -> Result<()>) -> Result<()> {
        let txn = self.db.begin_read().map_err(kv::e)?;
        let t = txn.open_table(SNAPS).map_err(kv::e)?;
        for item in t.iter().map_err(kv::e)? {
            let (k, v) = item.map_err(kv::e)?;
            let key = k.value();
            let rec: Rec = serde_json::from_slice(v.value())
                .map_err(|e| Error::internal(format!("corrupt driver record for {key:?}"), e))?;
            f(rec.info(key), rec.id)?;
        }
        Ok(())
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
}

/// One change to a [`Store`].
pub struct StoreTxn {
    txn: redb::WriteTransaction,
}

impl std::fmt::Debug for StoreTxn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreTxn")
    }
}

impl StoreTxn {
    /// Records a new snapshot of `kind` and allocates its id. The parent must exist and
    /// be committed.
    pub fn create(
        &mut self,
        kind: Kind,
        key: &str,
        parent: Option<&str>,
        labels: &Labels,
    ) -> Result<Snap> {
        let mut t = self.txn.open_table(SNAPS).map_err(kv::e)?;
        if load(&t, key)?.is_some() {
            return Err(Error::AlreadyExists(format!("snapshot {key:?}")));
        }
        if let Some(p) = parent {
            let prec =
                load(&t, p)?.ok_or_else(|| Error::NotFound(format!("parent snapshot {p:?}")))?;
            if prec.kind != Kind::Committed {
                return Err(Error::InvalidArgument(format!(
                    "parent {p:?} is not a committed snapshot"
                )));
            }
            let mut children = self.txn.open_multimap_table(CHILDREN).map_err(kv::e)?;
            children.insert(p, key).map_err(kv::e)?;
        }
        let id = {
            let mut meta = self.txn.open_table(META).map_err(kv::e)?;
            let id = meta.get(META_ID).map_err(kv::e)?.map_or(0, |g| g.value()) + 1;
            meta.insert(META_ID, id).map_err(kv::e)?;
            id
        };
        let now = now_nanos();
        let rec = Rec {
            id,
            kind,
            parent: parent.map(str::to_owned),
            labels: labels.clone(),
            created: now,
            updated: now,
            usage: None,
        };
        store(&mut t, key, &rec)?;
        snap(&t, key, &rec)
    }

    /// The info and on-disk identity of `key`, as this change sees it.
    pub fn get(&self, key: &str) -> Result<(Info, Snap)> {
        let t = self.txn.open_table(SNAPS).map_err(kv::e)?;
        let rec = load(&t, key)?.ok_or_else(|| not_found(key))?;
        Ok((rec.info(key), snap(&t, key, &rec)?))
    }

    /// Turns the active snapshot `key` into the committed `name`, keeping its id and
    /// storing its usage. Returns the id.
    pub fn commit_active(
        &mut self,
        key: &str,
        name: &str,
        usage: Usage,
        labels: &Labels,
    ) -> Result<u64> {
        let mut t = self.txn.open_table(SNAPS).map_err(kv::e)?;
        if load(&t, name)?.is_some() {
            return Err(Error::AlreadyExists(format!("snapshot {name:?}")));
        }
        let mut rec = load(&t, key)?.ok_or_else(|| not_found(key))?;
        if rec.kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!("snapshot {key:?} is not active")));
        }
        t.remove(key).map_err(kv::e)?;
        if let Some(p) = &rec.parent {
            let mut children = self.txn.open_multimap_table(CHILDREN).map_err(kv::e)?;
            children.remove(p.as_str(), key).map_err(kv::e)?;
            children.insert(p.as_str(), name).map_err(kv::e)?;
        }
        let now = now_nanos();
        rec.kind = Kind::Committed;
        rec.labels = labels.clone();
        rec.usage = Some(usage);
        rec.created = now;
        rec.updated = now;
        store(&mut t, name, &rec)?;
        Ok(rec.id)
    }

    /// Forgets `key`, which must have no children. Returns its id and kind.
    pub fn remove(&mut self, key: &str) -> Result<(u64, Kind)> {
        let mut t = self.txn.open_table(SNAPS).map_err(kv::e)?;
        let rec = load(&t, key)?.ok_or_else(|| not_found(key))?;
        let mut children = self.txn.open_multimap_table(CHILDREN).map_err(kv::e)?;
        if children.get(key).map_err(kv::e)?.next().is_some() {
            return Err(Error::FailedPrecondition(format!(
                "cannot remove snapshot {key:?} with child"
            )));
        }
        if let Some(p) = &rec.parent {
            children.remove(p.as_str(), key).map_err(kv::e)?;
        }
        t.remove(key).map_err(kv::e)?;
        Ok((rec.id, rec.kind))
    }

    /// Applies a label update to `info.name`.
    pub fn update(&mut self, info: &Info, paths: &[FieldPath]) -> Result<Info> {
        let mut t = self.txn.open_table(SNAPS).map_err(kv::e)?;
        let mut rec = load(&t, &info.name)?.ok_or_else(|| not_found(&info.name))?;
        FieldPath::apply(paths, &mut rec.labels, &info.labels);
        crate::snapshot::validate_labels(&rec.labels)?;
        rec.updated = now_nanos();
        store(&mut t, &info.name, &rec)?;
        Ok(rec.info(&info.name))
    }

    /// Makes the change durable and visible.
    pub fn commit(self) -> Result<()> {
        self.txn.commit().map_err(kv::err("commit driver records"))
    }
}
