//! The metadata's tables, and the one place that reads and changes them (as containerd
//! keeps bucket access in `metadata/buckets.go`): a snapshot record together with its
//! child link and backend-key row, leases and their resources, commit intents, and the
//! sequence that names backend keys.
//!
//! Every change here runs inside an operation of the root's [`Db`](crate::kv::Db): the
//! callers (`snapshotter`, `lease`, `gc`) decide what to change, these functions keep
//! the three snapshot tables in step.

use std::collections::BTreeMap;
use std::sync::Arc;

use cap_std::fs::Dir;
use redb::{
    MultimapTableDefinition, ReadableMultimapTable, ReadableTable, ReadableTableMetadata,
    TableDefinition, WriteTransaction,
};

use super::record::{Intent, Record};
use crate::error::{Error, Result};
use crate::kv::{Db, Durability};

/// (snapshotter, namespace, key) -> JSON [`Record`].
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
/// (snapshotter, namespace, name) -> JSON [`Intent`]: a commit whose backend step may
/// have run but whose record has not been written. The name is taken meanwhile.
pub(crate) const INTENTS: TableDefinition<'static, (&str, &str, &str), &[u8]> =
    TableDefinition::new("commit_intents");
/// (namespace, lease id) -> JSON lease record.
pub(crate) const LEASES: TableDefinition<'static, (&str, &str), &[u8]> =
    TableDefinition::new("leases");
/// (namespace, lease id) -> (resource type, resource id).
pub(crate) const LEASE_RESOURCES: MultimapTableDefinition<'static, (&str, &str), (&str, &str)> =
    MultimapTableDefinition::new("lease_resources");
/// (snapshotter, namespace, digest of a merge's layer list) -> the merge's key: an
/// earlier merge of the same layers is reused.
pub(crate) const MERGES: TableDefinition<'static, (&str, &str, &str), &str> =
    TableDefinition::new("merges");
/// Counters and the schema version.
pub(crate) const META: TableDefinition<'static, &str, u64> = TableDefinition::new("meta");

const META_SCHEMA: &str = "schema";
const META_SEQ: &str = "seq";
const SCHEMA_VERSION: u64 = 1;

/// The database file inside the host's root.
pub const METADATA_DB: &str = "metadata.db";

/// The host's metadata: its tables in the root's database. One per root; a second
/// process opening it gets an unavailable error.
#[derive(Debug)]
pub struct MetaDb {
    db: Arc<Db>,
    seq: std::sync::Mutex<SeqBlock>,
}

impl MetaDb {
    /// Opens (creating if needed) `metadata.db` inside `root`.
    pub fn open(root: &Dir) -> Result<Self> {
        Self::on(Arc::new(Db::open(root, METADATA_DB, "metadata database")?))
    }

    /// The metadata's tables in `db`, created if missing.
    pub fn on(db: Arc<Db>) -> Result<Self> {
        db.write(Durability::Immediate, |txn| {
            txn.open_table(SNAPSHOTS)?;
            txn.open_multimap_table(CHILDREN)?;
            txn.open_multimap_table(BKEYS)?;
            txn.open_table(INTENTS)?;
            txn.open_table(LEASES)?;
            txn.open_multimap_table(LEASE_RESOURCES)?;
            txn.open_table(MERGES)?;
            txn.open_table(super::content::CONTENT)?;
            txn.open_multimap_table(super::content::BLOB_SNAPSHOTS)?;
            let mut meta = txn.open_table(META)?;
            let found = meta.get(META_SCHEMA)?.map(|g| g.value());
            match found {
                None => {
                    meta.insert(META_SCHEMA, SCHEMA_VERSION)?;
                }
                Some(SCHEMA_VERSION) => {}
                Some(other) => {
                    return Err(Error::failed_precondition(format!(
                        "metadata database has schema version {other}, this wasnap reads {SCHEMA_VERSION}"
                    )));
                }
            }
            Ok(())
        })?;
        Ok(MetaDb { db, seq: Default::default() })
    }

    /// The database the tables live in, shared with the root's drivers and plugins.
    pub fn db(&self) -> &Arc<Db> {
        &self.db
    }

    /// Runs a change of the tables (see [`Db::write`]).
    pub(crate) fn write<R: Send + 'static>(
        &self,
        durability: Durability,
        op: impl FnMut(&WriteTransaction) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        self.db.write(durability, op)
    }

    /// [`Db::read_with`]: `f` on a consistent view, a panic in redb contained.
    pub(crate) fn read_with<R>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<R>,
    ) -> Result<R> {
        self.db.read_with(f)
    }

    /// How many snapshot records there are, over every snapshotter and namespace.
    pub fn record_count(&self) -> Result<u64> {
        self.read_with(|txn| Ok(txn.open_table(SNAPSHOTS)?.len()?))
    }

    /// How many snapshot records each (snapshotter, namespace) has; pairs with none are
    /// absent. One read transaction over every key (records are not decoded), so it
    /// takes time in proportion to the records: for a metrics scrape, not a hot path.
    pub fn record_counts(&self) -> Result<BTreeMap<(String, String), u64>> {
        self.read_with(|txn| {
            let table = txn.open_table(SNAPSHOTS)?;
            let mut counts = BTreeMap::<(String, String), u64>::new();
            // Keys come in order, so one pair's records are consecutive: only a new pair
            // allocates.
            for row in table.iter()? {
                let (key, _) = row?;
                let (snapshotter, namespace, _) = key.value();
                match counts.last_entry() {
                    Some(mut last) if last.key().0 == snapshotter && last.key().1 == namespace => {
                        *last.get_mut() += 1
                    }
                    _ => {
                        counts.insert((snapshotter.to_owned(), namespace.to_owned()), 1);
                    }
                }
            }
            Ok(counts)
        })
    }
}

/// How many sequence numbers one reservation takes. Creating a snapshot needs a fresh
/// sequence number before its (slow) backend call; reserving them in blocks keeps that
/// off the commit path, and a crash only skips the rest of a block, never reuses it.
const SEQ_BLOCK: u64 = 1024;

/// The in-memory part of the sequence allocator: `(next, limit]` is reserved on disk.
#[derive(Debug, Default)]
struct SeqBlock {
    next: u64,
    limit: u64,
}

impl MetaDb {
    /// A sequence number never handed out before, even across crashes.
    pub(crate) fn next_seq(&self) -> Result<u64> {
        let mut b = self.seq.lock().unwrap_or_else(|e| e.into_inner());
        if b.next >= b.limit {
            let stored = self.write(Durability::Immediate, |txn| {
                let mut meta = txn.open_table(META)?;
                let stored = meta.get(META_SEQ)?.map_or(0, |g| g.value());
                meta.insert(META_SEQ, seq_after(stored, SEQ_BLOCK)?)?;
                Ok(stored)
            })?;
            b.next = stored;
            b.limit = stored + SEQ_BLOCK;
        }
        b.next += 1;
        Ok(b.next)
    }
}

/// The stored sequence counter `stored` moved on by `n`: an error, never a wrap, at the
/// end of the range (only a damaged or forged database gets there).
fn seq_after(stored: u64, n: u64) -> Result<u64> {
    stored.checked_add(n).ok_or_else(|| {
        Error::internal(format!(
            "the metadata database's sequence counter is at {stored}, the end of its range: \
             the database is damaged"
        ))
    })
}

/// Read access to the snapshot tables, from a read or a write transaction.
pub(crate) trait Tables {
    /// The record of `key`, if there is one.
    fn record(&self, sn: &str, ns: &str, key: &str) -> Result<Option<Record>>;
    /// Whether `key` has a child.
    fn has_children(&self, sn: &str, ns: &str, key: &str) -> Result<bool>;
    /// The commit under way to `name`, if any.
    fn intent(&self, sn: &str, ns: &str, name: &str) -> Result<Option<Intent>>;
    /// The backend key and kind of each of `keys`, in order, the table opened once (a
    /// merge names hundreds of layers; their labels are not needed).
    fn heads<'k>(
        &self,
        sn: &str,
        ns: &str,
        keys: impl IntoIterator<Item = &'k str>,
    ) -> Result<Vec<Option<Head>>>;
}

/// The part of a [`Record`] that says which backend snapshot it is and its kind.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct Head {
    pub bkey: String,
    pub kind: crate::snapshot::Kind,
}

fn decode_opt<T>(bytes: Option<&[u8]>, f: impl FnOnce(&[u8]) -> Result<T>) -> Result<Option<T>> {
    bytes.map(f).transpose()
}

macro_rules! tables_for {
    ($t:ty) => {
        impl Tables for $t {
            fn record(&self, sn: &str, ns: &str, key: &str) -> Result<Option<Record>> {
                let t = self.open_table(SNAPSHOTS)?;
                let g = t.get((sn, ns, key))?;
                decode_opt(g.as_ref().map(|g| g.value()), |b| Record::decode(b, key))
            }
            fn has_children(&self, sn: &str, ns: &str, key: &str) -> Result<bool> {
                let c = self.open_multimap_table(CHILDREN)?;
                Ok(c.get((sn, ns, key))?.next().is_some())
            }
            fn intent(&self, sn: &str, ns: &str, name: &str) -> Result<Option<Intent>> {
                let t = self.open_table(INTENTS)?;
                let g = t.get((sn, ns, name))?;
                decode_opt(g.as_ref().map(|g| g.value()), |b| Intent::decode(b, name))
            }
            fn heads<'k>(
                &self,
                sn: &str,
                ns: &str,
                keys: impl IntoIterator<Item = &'k str>,
            ) -> Result<Vec<Option<Head>>> {
                let t = self.open_table(SNAPSHOTS)?;
                keys.into_iter()
                    .map(|key| {
                        let g = t.get((sn, ns, key))?;
                        decode_opt(g.as_ref().map(|g| g.value()), |b| {
                            serde_json::from_slice(b).map_err(|e| {
                                Error::from(e)
                                    .context(format!("corrupt metadata record for {key:?}"))
                            })
                        })
                    })
                    .collect()
            }
        }
    };
}
tables_for!(redb::ReadTransaction);
tables_for!(WriteTransaction);

/// Writes the record of `key`, new or replacing one with the same parent and backend
/// key, with its child link and backend-key row.
pub(crate) fn put_record(
    txn: &WriteTransaction,
    sn: &str,
    ns: &str,
    key: &str,
    rec: &Record,
) -> Result<()> {
    txn.open_table(SNAPSHOTS)?.insert((sn, ns, key), rec.encode()?.as_slice())?;
    if let Some(p) = &rec.parent {
        txn.open_multimap_table(CHILDREN)?.insert((sn, ns, p.as_str()), key)?;
    }
    super::merge::hold_layers(txn, sn, ns, key, &rec.layers)?;
    if super::merge::is_merge(key, &rec.layers) {
        let id = super::merge::layers_id(&rec.layers);
        txn.open_table(MERGES)?.insert((sn, ns, id.as_str()), key)?;
    }
    txn.open_multimap_table(BKEYS)?.insert((sn, rec.bkey.as_str()), (ns, key))?;
    if let Some(blob) = &rec.blob {
        super::content::map(txn, ns, blob, sn, key)?;
    }
    Ok(())
}

/// Deletes the record of `key` with its child link and backend-key row, and any child
/// links left under it. Returns the record and whether it was the last one naming its
/// backend key. The caller has checked that `key` has no children it wants kept.
pub(crate) fn delete_record(
    txn: &WriteTransaction,
    sn: &str,
    ns: &str,
    key: &str,
) -> Result<Option<(Record, bool)>> {
    let rec = {
        let mut t = txn.open_table(SNAPSHOTS)?;
        let Some(g) = t.remove((sn, ns, key))? else { return Ok(None) };
        Record::decode(g.value(), key)?
    };
    let mut children = txn.open_multimap_table(CHILDREN)?;
    if let Some(p) = &rec.parent {
        children.remove((sn, ns, p.as_str()), key)?;
    }
    children.remove_all((sn, ns, key))?;
    drop(children);
    super::merge::release_layers(txn, sn, ns, key, &rec.layers)?;
    if super::merge::is_merge(key, &rec.layers) {
        let id = super::merge::layers_id(&rec.layers);
        let mut merges = txn.open_table(MERGES)?;
        let ours = merges.get((sn, ns, id.as_str()))?.is_some_and(|g| g.value() == key);
        if ours {
            merges.remove((sn, ns, id.as_str()))?;
        }
    }
    let mut bkeys = txn.open_multimap_table(BKEYS)?;
    bkeys.remove((sn, rec.bkey.as_str()), (ns, key))?;
    let last = bkeys.get((sn, rec.bkey.as_str()))?.next().is_none();
    if let Some(blob) = &rec.blob {
        super::content::unmap(txn, ns, blob, sn, key)?;
    }
    Ok(Some((rec, last)))
}

/// Replaces the record of `from` by `to` under the name `name` (a commit): the parent's
/// child link and the backend-key rows follow.
pub(crate) fn rename_record(
    txn: &WriteTransaction,
    sn: &str,
    ns: &str,
    from: &str,
    name: &str,
    to: &Record,
) -> Result<()> {
    delete_record(txn, sn, ns, from)?;
    put_record(txn, sn, ns, name, to)
}

/// Records that a commit to `name` is under way.
pub(crate) fn put_intent(
    txn: &WriteTransaction,
    sn: &str,
    ns: &str,
    name: &str,
    intent: &Intent,
) -> Result<()> {
    txn.open_table(INTENTS)?.insert((sn, ns, name), intent.encode()?.as_slice())?;
    Ok(())
}

/// Forgets the commit under way to `name`.
pub(crate) fn delete_intent(txn: &WriteTransaction, sn: &str, ns: &str, name: &str) -> Result<()> {
    txn.open_table(INTENTS)?.remove((sn, ns, name))?;
    Ok(())
}

/// Every commit under way for snapshotter `sn`: (namespace, name, intent).
pub(crate) fn intents(
    txn: &redb::ReadTransaction,
    sn: &str,
) -> Result<Vec<(String, String, Intent)>> {
    let t = txn.open_table(INTENTS)?;
    let mut out = Vec::new();
    for item in t.range((sn, "", "")..)? {
        let (k, v) = item?;
        let (s, ns, name) = k.value();
        if s != sn {
            break;
        }
        out.push((ns.to_owned(), name.to_owned(), Intent::decode(v.value(), name)?));
    }
    Ok(out)
}

/// Every backend key some record or commit under way names for snapshotter `sn`.
pub(crate) fn named_bkeys(
    txn: &redb::ReadTransaction,
    sn: &str,
) -> Result<std::collections::HashSet<String>> {
    let bkeys = txn.open_multimap_table(BKEYS)?;
    let mut named = std::collections::HashSet::new();
    for item in bkeys.range((sn, "")..)? {
        let (k, _) = item?;
        let (s, bkey) = k.value();
        if s != sn {
            break;
        }
        named.insert(bkey.to_owned());
    }
    for (_, _, intent) in intents(txn, sn)? {
        named.insert(intent.bname);
    }
    Ok(named)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_counts_per_snapshotter_and_namespace() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = Dir::open_ambient_dir(tmp.path(), cap_std::ambient_authority()).expect("dir");
        let db = MetaDb::open(&dir).expect("open");
        assert!(db.record_counts().expect("counts").is_empty());
        db.write(Durability::Immediate, |txn| {
            let mut t = txn.open_table(SNAPSHOTS)?;
            for key in
                [("a", "ns1", "k1"), ("a", "ns1", "k2"), ("a", "ns2", "k"), ("b", "ns1", "k")]
            {
                t.insert(key, b"{}".as_slice())?;
            }
            Ok(())
        })
        .expect("write");
        let counts = db.record_counts().expect("counts");
        let pair = |s: &str, n: &str| (s.to_owned(), n.to_owned());
        assert_eq!(
            counts,
            BTreeMap::from([(pair("a", "ns1"), 2), (pair("a", "ns2"), 1), (pair("b", "ns1"), 1)])
        );
        assert_eq!(counts.values().sum::<u64>(), db.record_count().expect("count"));
    }
}
