//! Content records: which blobs each namespace holds, with their labels, and which
//! snapshots are mapped to a blob (buildkit's blob mapping, in the generic metadata
//! layer). The blob files themselves are [`crate::content`]'s; this module keeps only
//! the records, in the same database as the snapshots, so that one garbage collection
//! marks both at once.

use redb::{
    MultimapTableDefinition, ReadableMultimapTable, ReadableTable, TableDefinition,
    WriteTransaction,
};
use serde::{Deserialize, Serialize};

use super::lease::{self, Resource};
use crate::digest::Digest;
use crate::error::{Context, Error, Result};
use crate::snapshot::Labels;

/// (namespace, digest) -> JSON [`Stored`].
pub(crate) const CONTENT: TableDefinition<'static, (&str, &str), &[u8]> =
    TableDefinition::new("content");
/// (namespace, digest) -> (snapshotter, key) of every snapshot mapped to that blob.
pub(crate) const BLOB_SNAPSHOTS: MultimapTableDefinition<'static, (&str, &str), (&str, &str)> =
    MultimapTableDefinition::new("blob_snapshots");

/// A blob's record in one namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Stored {
    pub size: u64,
    /// Nanoseconds since the Unix epoch.
    pub created: u64,
    pub updated: u64,
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
}

impl Stored {
    pub fn decode(bytes: &[u8], digest: &str) -> Result<Self> {
        serde_json::from_slice(bytes).with_context(|| format!("corrupt content record {digest}"))
    }
}

pub(crate) fn not_found(digest: &Digest) -> Error {
    Error::not_found(format!("content {digest}"))
}

/// The record of `digest` in `ns`, if any.
pub(crate) fn get<T: Tables>(txn: &T, ns: &str, digest: &Digest) -> Result<Option<Stored>> {
    txn.content(ns, &digest.to_string())
}

/// Read access to the content tables, from a read or a write transaction.
pub(crate) trait Tables {
    fn content(&self, ns: &str, digest: &str) -> Result<Option<Stored>>;
    /// Every (snapshotter, key) mapped to `digest` in `ns`.
    fn mapped(&self, ns: &str, digest: &str) -> Result<Vec<(String, String)>>;
}

macro_rules! tables_for {
    ($t:ty) => {
        impl Tables for $t {
            fn content(&self, ns: &str, digest: &str) -> Result<Option<Stored>> {
                let t = self.open_table(CONTENT)?;
                let g = t.get((ns, digest))?;
                g.map(|g| Stored::decode(g.value(), digest)).transpose()
            }
            fn mapped(&self, ns: &str, digest: &str) -> Result<Vec<(String, String)>> {
                let t = self.open_multimap_table(BLOB_SNAPSHOTS)?;
                let mut out = Vec::new();
                for v in t.get((ns, digest))? {
                    let v = v?;
                    let (sn, key) = v.value();
                    out.push((sn.to_owned(), key.to_owned()));
                }
                Ok(out)
            }
        }
    };
}
tables_for!(redb::ReadTransaction);
tables_for!(WriteTransaction);

/// Records `digest` in `ns` with `labels` (an existing record keeps its other labels:
/// those given are set) and, under `lease`, has the lease hold it. Returns the record and
/// whether it is new.
pub(crate) fn put(
    txn: &WriteTransaction,
    ns: &str,
    digest: &Digest,
    size: u64,
    labels: &Labels,
    lease: Option<&str>,
    now: u64,
) -> Result<(Stored, bool)> {
    let d = digest.to_string();
    if let Some(l) = lease {
        lease::hold_in(txn, ns, l, &Resource::content(digest))?;
    }
    if let Some(existing) = txn.content(ns, &d)? {
        if existing.size != size {
            // The file is named by its digest and was verified: a different size means
            // the record is corrupt, not that the content differs.
            return Err(Error::internal(format!(
                "content {d}: recorded size {} differs from the blob's {size}",
                existing.size
            )));
        }
        // The labels given hold the blob as the caller asked (a `gc.root`, the
        // references of `gc.ref.content.*`): dropping them would let a collection take
        // what the caller was told is kept.
        let mut stored = existing;
        let changed = labels.iter().any(|(k, v)| stored.labels.get(k) != Some(v));
        if changed {
            stored.labels.extend(labels.iter().map(|(k, v)| (k.clone(), v.clone())));
            stored.updated = now;
            let bytes = serde_json::to_vec(&stored).context("encode content record")?;
            txn.open_table(CONTENT)?.insert((ns, d.as_str()), bytes.as_slice())?;
        }
        return Ok((stored, false));
    }
    let stored = Stored { size, created: now, updated: now, labels: labels.clone() };
    let bytes = serde_json::to_vec(&stored).context("encode content record")?;
    txn.open_table(CONTENT)?.insert((ns, d.as_str()), bytes.as_slice())?;
    Ok((stored, true))
}

/// Replaces the labels of `digest` in `ns`.
pub(crate) fn set_labels(
    txn: &WriteTransaction,
    ns: &str,
    digest: &Digest,
    labels: &Labels,
    now: u64,
) -> Result<Stored> {
    let d = digest.to_string();
    let mut stored = txn.content(ns, &d)?.ok_or_else(|| not_found(digest))?;
    stored.labels = labels.clone();
    stored.updated = now;
    let bytes = serde_json::to_vec(&stored).context("encode content record")?;
    txn.open_table(CONTENT)?.insert((ns, d.as_str()), bytes.as_slice())?;
    Ok(stored)
}

/// Deletes the record of `digest` in `ns`; a blob a snapshot is mapped to is refused.
pub(crate) fn delete(txn: &WriteTransaction, ns: &str, digest: &Digest) -> Result<()> {
    let d = digest.to_string();
    if let Some((sn, key)) = txn.mapped(ns, &d)?.into_iter().next() {
        return Err(Error::failed_precondition(format!(
            "content {d} is the blob of snapshot {key:?} (snapshotter {sn:?}); remove the snapshot first"
        )));
    }
    if txn.open_table(CONTENT)?.remove((ns, d.as_str()))?.is_none() {
        return Err(not_found(digest));
    }
    Ok(())
}

/// Deletes the record of `digest` in `ns` whatever maps to it (the collector's sweep,
/// which removes those snapshots in the same transaction).
pub(crate) fn sweep(txn: &WriteTransaction, ns: &str, digest: &str) -> Result<()> {
    txn.open_table(CONTENT)?.remove((ns, digest))?;
    Ok(())
}

/// Every (namespace, digest, record), in key order.
pub(crate) fn all<T: ReadAll>(txn: &T) -> Result<Vec<(String, String, Stored)>> {
    txn.all_content()
}

/// Reading every content record, from a read or a write transaction.
pub(crate) trait ReadAll {
    fn all_content(&self) -> Result<Vec<(String, String, Stored)>>;
}

macro_rules! read_all_for {
    ($t:ty) => {
        impl ReadAll for $t {
            fn all_content(&self) -> Result<Vec<(String, String, Stored)>> {
                let mut out = Vec::new();
                for item in self.open_table(CONTENT)?.iter()? {
                    let (k, v) = item?;
                    let (ns, d) = k.value();
                    out.push((ns.to_owned(), d.to_owned(), Stored::decode(v.value(), d)?));
                }
                Ok(out)
            }
        }
    };
}
read_all_for!(redb::ReadTransaction);
read_all_for!(WriteTransaction);

/// Which of `digests` some namespace records: one lookup per namespace and digest, each
/// namespace found by seeking past the one before, so the cost does not grow with the
/// number of records (a delete asks this of one digest).
pub(crate) fn recorded(
    txn: &redb::ReadTransaction,
    digests: &[Digest],
) -> Result<std::collections::HashSet<Digest>> {
    let table = txn.open_table(CONTENT)?;
    let keys: Vec<(Digest, String)> = digests.iter().map(|d| (*d, d.to_string())).collect();
    let mut found = std::collections::HashSet::new();
    // The first namespace at or after `from`; "ns\0" is the first name after "ns".
    let mut from = String::new();
    while found.len() < keys.len() {
        let Some(first) = table.range((from.as_str(), "")..)?.next() else { break };
        let ns = first?.0.value().0.to_owned();
        for (d, key) in &keys {
            if !found.contains(d) && table.get((ns.as_str(), key.as_str()))?.is_some() {
                found.insert(*d);
            }
        }
        from = format!("{ns}\0");
    }
    Ok(found)
}

/// The records of namespace `ns`, in digest order.
pub(crate) fn list(txn: &redb::ReadTransaction, ns: &str) -> Result<Vec<(String, Stored)>> {
    let mut out = Vec::new();
    for item in txn.open_table(CONTENT)?.range((ns, "")..)? {
        let (k, v) = item?;
        let (n, d) = k.value();
        if n != ns {
            break;
        }
        out.push((d.to_owned(), Stored::decode(v.value(), d)?));
    }
    Ok(out)
}

/// Adds the mapping row of a snapshot record to `blob`.
pub(crate) fn map(txn: &WriteTransaction, ns: &str, blob: &str, sn: &str, key: &str) -> Result<()> {
    txn.open_multimap_table(BLOB_SNAPSHOTS)?.insert((ns, blob), (sn, key))?;
    Ok(())
}

/// Drops the mapping row of a snapshot record to `blob`.
pub(crate) fn unmap(
    txn: &WriteTransaction,
    ns: &str,
    blob: &str,
    sn: &str,
    key: &str,
) -> Result<()> {
    txn.open_multimap_table(BLOB_SNAPSHOTS)?.remove((ns, blob), (sn, key))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::Durability;
    use crate::metadata::MetaDb;

    /// Namespaces that prefix each other are all found, and a digest is found in any.
    #[test]
    fn recorded_finds_a_digest_in_any_namespace() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = cap_std::fs::Dir::open_ambient_dir(tmp.path(), cap_std::ambient_authority())
            .expect("dir");
        let db = MetaDb::open(&dir).expect("open");
        let d: Vec<Digest> = (0..5u8).map(|i| Digest::of(&[i])).collect();
        let rows = [("a", d[0]), ("a", d[1]), ("a0", d[2]), ("ab", d[3])];
        db.write(Durability::Immediate, move |txn| {
            for (ns, digest) in rows {
                put(txn, ns, &digest, 1, &Labels::new(), None, 0)?;
            }
            Ok(())
        })
        .expect("write");
        let found = db.read_with(|txn| recorded(txn, &d)).expect("recorded");
        let want: std::collections::HashSet<Digest> = d[..4].iter().copied().collect();
        assert_eq!(found, want);
        let none = db.read_with(|txn| recorded(txn, &d[4..])).expect("recorded");
        assert!(none.is_empty());
        let one = db.read_with(|txn| recorded(txn, &[d[3]])).expect("recorded");
        assert_eq!(one.into_iter().collect::<Vec<_>>(), [d[3]]);
    }
}
