//! Leases: the job of containerd's lease manager, for snapshots and content.
//!
//! A lease holds resources (`snapshots/<snapshotter>` + key, `content` + digest) against
//! garbage collection until it is deleted or its `containerd.io/gc.expire` time passes.
//! A snapshot created or committed while a lease is in effect for the call
//! ([`Ctx::with_lease`]) is added to it, as containerd does; so is a blob ingested
//! under it.

use std::time::SystemTime;

use redb::{ReadableTable, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::Ctx;
use super::db::{LEASE_RESOURCES, LEASES, MetaDb};
use crate::error::{Context, Error, Result};
use crate::filter::{Adaptor, Filter, map_field};
use crate::kv::{Durability, from_nanos, now_nanos};
use crate::snapshot::{Labels, validate_labels};

/// A lease label: after this RFC 3339 time the lease no longer holds anything.
pub const LABEL_GC_EXPIRE: &str = "containerd.io/gc.expire";
/// A lease label: hold the leased snapshots and their parents, not what their labels
/// reference.
pub const LABEL_GC_FLAT: &str = "containerd.io/gc.flat";

/// The lease resource type of a blob (containerd's).
pub const RESOURCE_CONTENT: &str = "content";

/// A lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Its id, unique in its namespace.
    pub id: String,
    /// When it was created.
    #[serde(with = "crate::snapshot::rfc3339")]
    pub created: SystemTime,
    /// Its labels.
    pub labels: Labels,
}

impl Lease {
    /// When it expires, from `containerd.io/gc.expire`; an unparsable value is ignored,
    /// as containerd ignores it.
    pub fn expires(&self) -> Option<SystemTime> {
        self.labels.get(LABEL_GC_EXPIRE).and_then(|v| crate::snapshot::parse_expiry(v).ok())
    }

    /// Whether it has expired at `now`.
    pub fn expired(&self, now: SystemTime) -> bool {
        self.expires().is_some_and(|t| t < now)
    }
}

impl Adaptor for Lease {
    fn field(&self, path: &[&str]) -> Option<String> {
        match path {
            ["id"] => Some(self.id.clone()),
            ["labels", rest @ ..] => map_field(&self.labels, rest),
            _ => None,
        }
    }
}

/// Something a lease holds: a snapshot, or a blob.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Resource {
    /// Its type: `snapshots/<snapshotter>` for a snapshot, `content` for a blob.
    #[serde(rename = "type")]
    pub kind: String,
    /// Its id: the snapshot's key, or the blob's digest.
    pub id: String,
}

impl Resource {
    /// The snapshot `key` of `snapshotter`.
    pub fn snapshot(snapshotter: &str, key: &str) -> Self {
        Resource { kind: format!("snapshots/{snapshotter}"), id: key.to_owned() }
    }

    /// The blob `digest` in the namespace's content.
    pub fn content(digest: &crate::digest::Digest) -> Self {
        Resource { kind: RESOURCE_CONTENT.to_owned(), id: digest.to_string() }
    }

    fn validate(&self) -> Result<()> {
        if self.kind == RESOURCE_CONTENT {
            return crate::digest::Digest::parse(&self.id).map(drop);
        }
        // As containerd parses them: a type it knows but malformed is an invalid
        // argument, a type it does not know is not implemented.
        let mut parts = self.kind.split('/');
        match (parts.next(), parts.next(), parts.next()) {
            (Some("snapshots"), Some(sn), None) if !sn.is_empty() && !self.id.is_empty() => Ok(()),
            (Some("snapshots"), ..) => Err(Error::invalid_argument(format!(
                "lease resource {:?} of type {:?}: a snapshot is named by type snapshots/<snapshotter> and a non-empty key",
                self.id, self.kind
            ))),
            (Some(RESOURCE_CONTENT), ..) => Err(Error::invalid_argument(format!(
                "lease resource type {:?}: content takes no sub-type",
                self.kind
            ))),
            _ => Err(Error::not_implemented(format!(
                "lease resource type {:?}: wasnap leases hold snapshots (snapshots/<snapshotter>) and content",
                self.kind
            ))),
        }
    }
}

#[derive(Serialize, Deserialize)]
pub(crate) struct Stored {
    pub created: u64,
    #[serde(default)]
    pub labels: Labels,
}

pub(crate) fn decode(ns_id: &str, bytes: &[u8]) -> Result<Stored> {
    serde_json::from_slice(bytes).with_context(|| format!("corrupt lease {ns_id:?}"))
}

fn not_found(id: &str) -> Error {
    Error::not_found(format!("lease {id:?}"))
}

/// Whether the lease `id` exists in `ns`.
pub(crate) fn exists(txn: &WriteTransaction, ns: &str, id: &str) -> Result<bool> {
    Ok(txn.open_table(LEASES)?.get((ns, id))?.is_some())
}

/// Not-found unless the lease `id` exists in `ns`.
pub(crate) fn check_exists(txn: &WriteTransaction, ns: &str, id: &str) -> Result<()> {
    if exists(txn, ns, id)? { Ok(()) } else { Err(not_found(id)) }
}

/// [`check_exists`] on a read.
pub(crate) fn check_exists_read(txn: &redb::ReadTransaction, ns: &str, id: &str) -> Result<()> {
    match txn.open_table(LEASES) {
        Ok(t) if t.get((ns, id))?.is_some() => Ok(()),
        Ok(_) | Err(redb::TableError::TableDoesNotExist(_)) => Err(not_found(id)),
        Err(e) => Err(e.into()),
    }
}

/// Adds `resource` to the lease `id` in `ns`, which must exist, as in containerd.
pub(crate) fn hold_in(
    txn: &WriteTransaction,
    ns: &str,
    id: &str,
    resource: &Resource,
) -> Result<()> {
    check_exists(txn, ns, id)?;
    let mut res = txn.open_multimap_table(LEASE_RESOURCES)?;
    res.insert((ns, id), (resource.kind.as_str(), resource.id.as_str()))?;
    Ok(())
}

/// Drops `resource` from the lease `id` in `ns`.
pub(crate) fn release_in(
    txn: &WriteTransaction,
    ns: &str,
    id: &str,
    resource: &Resource,
) -> Result<()> {
    let mut res = txn.open_multimap_table(LEASE_RESOURCES)?;
    res.remove((ns, id), (resource.kind.as_str(), resource.id.as_str()))?;
    Ok(())
}

/// The lease manager over a metadata database.
#[derive(Debug, Clone)]
pub struct Leases {
    db: std::sync::Arc<MetaDb>,
    /// Told of each lease, or resource of one, deleted: what it held may now go.
    trigger: Option<std::sync::Arc<dyn super::Changes>>,
}

impl Leases {
    /// Leases kept in `db`.
    pub fn new(db: std::sync::Arc<MetaDb>) -> Self {
        Leases { db, trigger: None }
    }

    /// Tells `trigger` of each deletion of a lease or of a resource from one, as
    /// containerd's lease manager marks its database dirty: the collector need not wait
    /// for its interval to take what only the lease held.
    pub fn with_trigger(mut self, trigger: std::sync::Arc<dyn super::Changes>) -> Self {
        self.trigger = Some(trigger);
        self
    }

    fn deleted(&self) {
        if let Some(t) = &self.trigger {
            t.deletion();
        }
    }

    /// Creates a lease with `id` (or a generated one) and `labels`.
    pub fn create(&self, ctx: &Ctx, id: Option<&str>, labels: &Labels) -> Result<Lease> {
        validate_labels(labels)?;
        let labels = &*crate::snapshot::without_empty(labels);
        if let Some(exp) = labels.get(LABEL_GC_EXPIRE) {
            crate::snapshot::parse_expiry(exp).map_err(|e| {
                Error::invalid_argument(format!(
                    "label {LABEL_GC_EXPIRE}={exp:?}: not an RFC 3339 time ({e})"
                ))
            })?;
        }
        let id = match id {
            Some(id) => validate_id(id).map(|()| id.to_owned())?,
            None => generated_id(),
        };
        let created = now_nanos();
        let bytes = serde_json::to_vec(&Stored { created, labels: labels.clone() })
            .context("encode lease")?;
        let (ns, lid) = (ctx.namespace().to_owned(), id.clone());
        self.db.write(Durability::Immediate, move |txn| {
            let mut t = txn.open_table(LEASES)?;
            if t.get((ns.as_str(), lid.as_str()))?.is_some() {
                return Err(Error::already_exists(format!("lease {lid:?}")));
            }
            t.insert((ns.as_str(), lid.as_str()), bytes.as_slice())?;
            Ok(())
        })?;
        Ok(Lease { id, created: from_nanos(created), labels: labels.clone() })
    }

    /// Deletes a lease and its resource list (not the resources: the next collection
    /// decides their fate).
    pub fn delete(&self, ctx: &Ctx, id: &str) -> Result<()> {
        let (ns, id) = (ctx.namespace().to_owned(), id.to_owned());
        self.db.write(Durability::Immediate, move |txn| {
            let mut t = txn.open_table(LEASES)?;
            if t.remove((ns.as_str(), id.as_str()))?.is_none() {
                return Err(not_found(&id));
            }
            txn.open_multimap_table(LEASE_RESOURCES)?.remove_all((ns.as_str(), id.as_str()))?;
            Ok(())
        })?;
        self.deleted();
        Ok(())
    }

    /// The namespace's leases matching any of `filters` (fields `id`, `labels.<k>`).
    pub fn list(&self, ctx: &Ctx, filters: &[String]) -> Result<Vec<Lease>> {
        let filter = Filter::parse_all(filters)?;
        self.db.read_with(|txn| {
            let t = txn.open_table(LEASES)?;
            let mut out = Vec::new();
            for item in t.range((ctx.namespace(), "")..)? {
                let (k, v) = item?;
                let (ns, id) = k.value();
                if ns != ctx.namespace() {
                    break;
                }
                let s = decode(id, v.value())?;
                let lease =
                    Lease { id: id.to_owned(), created: from_nanos(s.created), labels: s.labels };
                if filter.matches(&lease) {
                    out.push(lease);
                }
            }
            Ok(out)
        })
    }

    /// Adds a resource to a lease. As containerd's, a missing lease is not-found before
    /// the resource is judged.
    pub fn add_resource(&self, ctx: &Ctx, id: &str, resource: &Resource) -> Result<()> {
        let (ns, id, resource) = (ctx.namespace().to_owned(), id.to_owned(), resource.clone());
        self.db.write(Durability::Immediate, move |txn| {
            check_exists(txn, &ns, &id)?;
            resource.validate()?;
            hold_in(txn, &ns, &id, &resource)
        })
    }

    /// Removes a resource from a lease (a missing lease first, as for adding).
    pub fn delete_resource(&self, ctx: &Ctx, id: &str, resource: &Resource) -> Result<()> {
        let (ns, id, resource) = (ctx.namespace().to_owned(), id.to_owned(), resource.clone());
        self.db.write(Durability::Immediate, move |txn| {
            check_exists(txn, &ns, &id)?;
            resource.validate()?;
            release_in(txn, &ns, &id, &resource)
        })?;
        self.deleted();
        Ok(())
    }

    /// Not found unless lease `id` exists: for work that would be wasted under a
    /// missing lease, checked before it starts (the write that adds to the lease checks
    /// again).
    pub fn require(&self, ctx: &Ctx, id: &str) -> Result<()> {
        self.db.read_with(|txn| match txn.open_table(LEASES)?.get((ctx.namespace(), id))? {
            Some(_) => Ok(()),
            None => Err(not_found(id)),
        })
    }

    /// What a lease holds.
    pub fn resources(&self, ctx: &Ctx, id: &str) -> Result<Vec<Resource>> {
        self.db.read_with(|txn| {
            let t = txn.open_table(LEASES)?;
            if t.get((ctx.namespace(), id))?.is_none() {
                return Err(not_found(id));
            }
            let res = txn.open_multimap_table(LEASE_RESOURCES)?;
            let mut out = Vec::new();
            for v in res.get((ctx.namespace(), id))? {
                let v = v?;
                let (kind, rid) = v.value();
                out.push(Resource { kind: kind.to_owned(), id: rid.to_owned() });
            }
            Ok(out)
        })
    }
}

/// Longest lease id taken: enough for any id containerd's clients make, short enough
/// for the header that carries it.
const MAX_ID_LEN: usize = 1024;

/// A lease id as containerd takes it: any text but empty (its clients make ids such as
/// `123--x_`, base64url after a number), here also at most 1024 bytes of visible ASCII,
/// since the `wasnap-lease` header carries it.
fn validate_id(id: &str) -> Result<()> {
    let invalid = |why: &str| Err(Error::invalid_argument(format!("lease id {id:?}: {why}")));
    if id.is_empty() {
        return invalid("must not be empty");
    }
    if id.len() > MAX_ID_LEN {
        return invalid("longer than 1024 bytes");
    }
    if !id.bytes().all(|b| b.is_ascii_graphic()) {
        return invalid("must be visible ASCII characters, no spaces (a header carries it)");
    }
    Ok(())
}

/// A fresh lease id, like containerd's generated ones (time plus randomness).
fn generated_id() -> String {
    format!("{}-{:08x}", now_nanos() / 1_000_000_000, crate::kv::nonce())
}
