//! The metadata database: its tables and how it is opened.

use cap_std::fs::Dir;
use redb::{MultimapTableDefinition, ReadableDatabase, ReadableTable, TableDefinition};

use crate::error::{Error, Result};
use crate::kv;

/// (snapshotter, namespace, key) -> JSON [`Record`](super::record::Record).
pub(crate) const SNAPSHOTS: TableDefinition<'static, (&str, &str, &str), &[u8]> =
    TableDefinition::new("snapshots");
/// (snapshotter, namespace, parent) -> child keys.
pub(crate) const CHILDREN: MultimapTableDefinition<'static, (&str, &str, &str), &str> =
    MultimapTableDefinition::new("children");
/// (snapshotter, backend key) -> (namespace, key) of every record naming it. A backend
/// snapshot may be named from several namespaces (target de-duplication); it is removed
/// from the backend only when the last name goes.
pub(crate) const BKEYS: MultimapTableDefinition<'static, (&str, &str), (&str, &str)> =
    MultimapTableDefinition::new("backend_keys");
/// Counters and the schema version.
pub(crate) const META: TableDefinition<'static, &str, u64> = TableDefinition::new("meta");

pub(crate) const META_SCHEMA: &str = "schema";
pub(crate) const META_SEQ: &str = "seq";
const SCHEMA_VERSION: u64 = 1;

/// The metadata database file name inside the host's root.
pub const METADATA_DB: &str = "metadata.db";

/// The host's metadata database. One per root; a second process opening it gets an
/// unavailable error.
#[derive(Debug)]
pub struct MetaDb {
    pub(crate) db: redb::Database,
    seq: std::sync::Mutex<SeqBlock>,
}

impl MetaDb {
    /// Opens (creating if needed) `metadata.db` inside `root`.
    pub fn open(root: &Dir) -> Result<Self> {
        let db = kv::open(root, METADATA_DB, "metadata database")?;
        let this = MetaDb { db, seq: Default::default() };
        this.init()?;
        Ok(this)
    }

    fn init(&self) -> Result<()> {
        let txn = self.db.begin_write().map_err(kv::e)?;
        {
            txn.open_table(SNAPSHOTS).map_err(kv::e)?;
            txn.open_multimap_table(CHILDREN).map_err(kv::e)?;
            txn.open_multimap_table(BKEYS).map_err(kv::e)?;
            txn.open_table(super::lease::LEASES).map_err(kv::e)?;
            txn.open_multimap_table(super::lease::LEASE_RESOURCES).map_err(kv::e)?;
            let mut meta = txn.open_table(META).map_err(kv::e)?;
            let found = meta.get(META_SCHEMA).map_err(kv::e)?.map(|g| g.value());
            match found {
                None => {
                    meta.insert(META_SCHEMA, SCHEMA_VERSION).map_err(kv::e)?;
                }
                Some(SCHEMA_VERSION) => {}
                Some(other) => {
                    return Err(Error::FailedPrecondition(format!(
                        "metadata database has schema version {other}, this wasnap reads {SCHEMA_VERSION}"
                    )));
                }
            }
        }
        txn.commit().map_err(kv::e)
    }

    pub(crate) fn write(&self) -> Result<redb::WriteTransaction> {
        self.db.begin_write().map_err(kv::err("begin metadata write"))
    }

    pub(crate) fn read(&self) -> Result<redb::ReadTransaction> {
        self.db.begin_read().map_err(kv::err("begin metadata read"))
    }
}

/// How many sequence numbers one reservation takes. Creating a snapshot needs a fresh
/// sequence number before its (slow) backend call; reserving them in blocks keeps that
/// off the disk's fsync path, and a crash only skips the rest of a block, never reuses it.
const SEQ_BLOCK: u64 = 1024;

/// The in-memory part of the sequence allocator: `(next, limit]` is reserved on disk.
#[derive(Debug, Default)]
struct SeqBlock {
    next: u64,
    limit: u64,
}

impl MetaDb {
    /// A sequence number never handed out before, even across crashes. Must not be
    /// called while this thread holds a write transaction.
    pub(crate) fn next_seq(&self) -> Result<u64> {
        let mut b = self.seq.lock().unwrap_or_else(|e| e.into_inner());
        if b.next >= b.limit {
            let txn = self.write()?;
            let stored = {
                let mut meta = txn.open_table(META).map_err(kv::e)?;
                let stored = meta.get(META_SEQ).map_err(kv::e)?.map_or(0, |g| g.value());
                meta.insert(META_SEQ, stored + SEQ_BLOCK).map_err(kv::e)?;
                stored
            };
            txn.commit().map_err(kv::e)?;
            b.next = stored;
            b.limit = stored + SEQ_BLOCK;
        }
        b.next += 1;
        Ok(b.next)
    }

    /// A sequence number reserved inside `txn`: it is only taken if `txn` commits.
    pub(crate) fn reserve_in(txn: &redb::WriteTransaction) -> Result<u64> {
        let mut meta = txn.open_table(META).map_err(kv::e)?;
        let seq = meta.get(META_SEQ).map_err(kv::e)?.map_or(0, |g| g.value()) + 1;
        meta.insert(META_SEQ, seq).map_err(kv::e)?;
        Ok(seq)
    }
}
