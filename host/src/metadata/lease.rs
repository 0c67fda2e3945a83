//! Leases: the job of containerd's lease manager, for snapshots.
//!
//! A lease holds resources (`snapshots/<snapshotter>` + key) against garbage collection
//! until it is deleted or its `containerd.io/gc.expire` time passes. A snapshot created
//! or committed while a lease is in effect for the call ([`Ctx::with_lease`]) is added
//! to it, as containerd does.

use std::time::SystemTime;

use redb::{MultimapTableDefinition, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::Ctx;
use super::db::MetaDb;
use crate::error::{Error, Result};
use crate::filter::{Adaptor, Filter, map_field};
use crate::kv::{self, from_nanos, now_nanos};
use crate::snapshot::{Labels, validate_labels};

/// (namespace, lease id) -> JSON lease record.
pub(crate) const LEASES: TableDefinition<'static, (&str, &str), &[u8]> =
    TableDefinition::new("leases");
/// (namespace, lease id) -> (resource type, resource id).
pub(crate) const LEASE_RESOURCES: MultimapTableDefinition<'static, (&str, &str), (&str, &str)> =
    MultimapTableDefinition::new("lease_resources");

/// A lease label: after this RFC 3339 time the lease no longer holds anything.
pub const LABEL_GC_EXPIRE: &str = "containerd.io/gc.expire";
/// A lease label: hold the leased snapshots and their parents, not what their labels
/// reference.
pub const LABEL_GC_FLAT: &str = "containerd.io/gc.flat";

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
        self.labels.get(LABEL_GC_EXPIRE).and_then(|v| humantime::parse_rfc3339_weak(v).ok())
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

/// Something a lease holds.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Resource {
    /// Its type: `snapshots/<snapshotter>` for a snapshot.
    #[serde(rename = "type")]
    pub kind: String,
    /// Its id: the snapshot's key.
    pub id: String,
}

impl Resource {
    /// The snapshot `key` of `snapshotter`.
    pub fn snapshot(snapshotter: &str, key: &str) -> Self {
        Resource { kind: format!("snapshots/{snapshotter}"), id: key.to_owned() }
    }

    fn validate(&self) -> Result<()> {
        match self.kind.strip_prefix("snapshots/") {
            Some(sn) if !sn.is_empty() && !sn.contains('/') && !self.id.is_empty() => Ok(()),
            _ => Err(Error::NotImplemented(format!(
                "lease resource type {:?}: wasnap leases hold snapshots (snapshots/<snapshotter>)",
                self.kind
            ))),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Stored {
    created: u64,
    #[serde(default)]
    labels: Labels,
}

fn decode(ns_id: &str, bytes: &[u8]) -> Result<Stored> {
    serde_json::from_slice(bytes)
        .map_err(|e| Error::internal(format!("corrupt lease {ns_id:?}"), e))
}

fn not_found(id: &str) -> Error {
    Error::NotFound(format!("lease {id:?}"))
}

/// Adds `resource` to the lease named in `ctx` (if any) inside `txn`; the lease must
/// exist, as in containerd.
pub(crate) fn hold_in(txn: &redb::WriteTransaction, ctx: &Ctx, resource: &Resource) -> Result<()> {
    let Some(lease) = ctx.lease() else { return Ok(()) };
    let leases = txn.open_table(LEASES).map_err(kv::e)?;
    if leases.get((ctx.namespace(), lease)).map_err(kv::e)?.is_none() {
        return Err(not_found(lease));
    }
    let mut res = txn.open_multimap_table(LEASE_RESOURCES).map_err(kv::e)?;
    res.insert((ctx.namespace(), lease), (resource.kind.as_str(), resource.id.as_str()))
        .map_err(kv::e)?;
    Ok(())
}

/// Drops `resource` from the lease named in `ctx` (if any) inside `txn`.
pub(crate) fn release_in(
    txn: &redb::WriteTransaction,
    ctx: &Ctx,
    resource: &Resource,
) -> Result<()> {
    let Some(lease) = ctx.lease() else { return Ok(()) };
    let mut res = txn.open_multimap_table(LEASE_RESOURCES).map_err(kv::e)?;
    res.remove((ctx.namespace(), lease), (resource.kind.as_str(), resource.id.as_str()))
        .map_err(kv::e)?;
    Ok(())
}

/// The lease manager over a metadata database.
#[derive(Debug, Clone)]
pub struct Leases {
    db: std::sync::Arc<MetaDb>,
}

impl Leases {
    /// Leases kept in `db`.
    pub fn new(db: std::sync::Arc<MetaDb>) -> Self {
        Leases { db }
    }

    /// Creates a lease with `id` (or a generated one) and `labels`.
    pub fn create(&self, ctx: &Ctx, id: Option<&str>, labels: &Labels) -> Result<Lease> {
        validate_labels(labels)?;
        if let Some(exp) = labels.get(LABEL_GC_EXPIRE) {
            humantime::parse_rfc3339_weak(exp).map_err(|e| {
                Error::InvalidArgument(format!(
                    "label {LABEL_GC_EXPIRE}={exp:?}: not an RFC 3339 time ({e})"
                ))
            })?;
        }
        let id = match id {
            Some("") => return Err(Error::InvalidArgument("lease id must not be empty".into())),
            Some(id) => id.to_owned(),
            None => generated_id(),
        };
        let created = now_nanos();
        let txn = self.db.write()?;
        {
            let mut t = txn.open_table(LEASES).map_err(kv::e)?;
            if t.get((ctx.namespace(), id.as_str())).map_err(kv::e)?.is_some() {
                return Err(Error::AlreadyExists(format!("lease {id:?}")));
            }
            let bytes = serde_json::to_vec(&Stored { created, labels: labels.clone() })
                .map_err(|e| Error::internal("encode lease", e))?;
            t.insert((ctx.namespace(), id.as_str()), bytes.as_slice()).map_err(kv::e)?;
        }
        txn.commit().map_err(kv::e)?;
        Ok(Lease { id, created: from_nanos(created), labels: labels.clone() })
    }

    /// Deletes a lease and its resource list (not the resources: the next collection
    /// decides their fate).
    pub fn delete(&self, ctx: &Ctx, id: &str) -> Result<()> {
        let txn = self.db.write()?;
        {
            let mut t = txn.open_table(LEASES).map_err(kv::e)?;
            if t.remove((ctx.namespace(), id)).map_err(kv::e)?.is_none() {
                return Err(not_found(id));
            }
            let mut res = txn.open_multimap_table(LEASE_RESOURCES).map_err(kv::e)?;
            res.remove_all((ctx.namespace(), id)).map_err(kv::e)?;
        }
        txn.commit().map_err(kv::e)
    }

    /// The namespace's leases matching any of `filters` (fields `id`, `labels.<k>`).
    pub fn list(&self, ctx: &Ctx, filters: &[String]) -> Result<Vec<Lease>> {
        let filter = Filter::parse_all(filters)?;
        let txn = self.db.read()?;
        let t = txn.open_table(LEASES).map_err(kv::e)?;
        let mut out = Vec::new();
        for item in t.range((ctx.namespace(), "")..).map_err(kv::e)? {
            let (k, v) = item.map_err(kv::e)?;
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
    }

    /// Adds a resource to a lease.
    pub fn add_resource(&self, ctx: &Ctx, id: &str, resource: &Resource) -> Result<()> {
        resource.validate()?;
        let txn = self.db.write()?;
        hold_in(&txn, &ctx.clone().with_lease(Some(id.to_owned())), resource)?;
        txn.commit().map_err(kv::e)
    }

    /// Removes a resource from a lease.
    pub fn delete_resource(&self, ctx: &Ctx, id: &str, resource: &Resource) -> Result<()> {
        let txn = self.db.write()?;
        {
            let t = txn.open_table(LEASES).map_err(kv::e)?;
            if t.get((ctx.namespace(), id)).map_err(kv::e)?.is_none() {
                return Err(not_found(id));
            }
        }
        release_in(&txn, &ctx.clone().with_lease(Some(id.to_owned())), resource)?;
        txn.commit().map_err(kv::e)
    }

    /// What a lease holds.
    pub fn resources(&self, ctx: &Ctx, id: &str) -> Result<Vec<Resource>> {
        let txn = self.db.read()?;
        let t = txn.open_table(LEASES).map_err(kv::e)?;
        if t.get((ctx.namespace(), id)).map_err(kv::e)?.is_none() {
            return Err(not_found(id));
        }
        let res = txn.open_multimap_table(LEASE_RESOURCES).map_err(kv::e)?;
        let mut out = Vec::new();
        for v in res.get((ctx.namespace(), id)).map_err(kv::e)? {
            let v = v.map_err(kv::e)?;
            let (kind, rid) = v.value();
            out.push(Resource { kind: kind.to_owned(), id: rid.to_owned() });
        }
        Ok(out)
    }
}

/// A fresh lease id, like containerd's generated ones (time plus randomness).
fn generated_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now_nanos());
    format!("{}-{:08x}", now_nanos() / 1_000_000_000, h.finish() as u32)
}
