//! The metadata layer: the job of containerd's `metadata/snapshot.go`.
//!
//! It owns namespaces, the mapping from a user's key to the backend key
//! (`<ns>/<seq>/<key>`), labels, parent/child links and timestamps, all in one redb
//! database, and drives a backend [`Backend`](crate::Backend) that only ever
//! sees backend keys.
//!
//! Architecture invariant: this module is the only one that opens the metadata database,
//! and backends never see a namespace.

mod cache;
pub(crate) mod content;
pub(crate) mod db;
pub mod gc;
mod helpers;
pub mod lease;
mod merge;
pub mod prune;
pub(crate) mod record;
mod snapshotter;
mod unnamed;
pub mod usage;

pub use db::MetaDb;

/// Told of every change the metadata layer makes. What decides when to collect
/// garbage listens ([`crate::gc::Trigger`]); the metadata layer knows nothing of it.
pub trait Changes: Send + Sync + std::fmt::Debug {
    /// Something that can hold data went away: a snapshot, a lease, or a lease's
    /// reference to a resource.
    fn deletion(&self);
    /// Something else changed.
    fn mutation(&self);
}
pub use cache::Scope;
pub use lease::{Lease, Leases, Resource};
pub use merge::{MERGE_MAX_LAYERS, MergePlan};
pub use prune::{CachePruneReport, PrunePolicy, PruneProgress, PrunedSnapshot};
pub use snapshotter::{PruneReport, Recovery, Snapshotter};
pub use usage::{DiskUsage, UsageRecord};

use crate::error::{Error, Result};

/// The namespace a key of the shape containerd gives its backend keys
/// (`<namespace>/<number>/<key>`) names, if it has that shape. Through the daemon,
/// containerd (as its proxy snapshotter's client) makes snapshots under such keys, in
/// the namespace they name, and collects them itself.
pub fn containerd_namespace(key: &str) -> Option<&str> {
    let (ns, rest) = key.split_once('/')?;
    let (seq, name) = rest.split_once('/')?;
    let shaped = !ns.is_empty()
        && !seq.is_empty()
        && seq.bytes().all(|b| b.is_ascii_digit())
        && !name.is_empty();
    shaped.then_some(ns)
}

/// The namespace used when a caller names none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Most bytes in a namespace name (containerd's limit).
const MAX_NAMESPACE_LEN: usize = 76;

/// Who is asking: the context of one call into the metadata layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ctx {
    namespace: String,
    lease: Option<String>,
}

impl Ctx {
    /// A context for `namespace`, which must be a valid containerd namespace name:
    /// alphanumeric runs joined by single `.`, `_` or `-`, at most 76 bytes.
    pub fn new(namespace: &str) -> Result<Self> {
        validate_namespace(namespace)?;
        Ok(Ctx { namespace: namespace.to_owned(), lease: None })
    }

    /// The same context with `lease` in effect: snapshots the call creates or commits
    /// are added to it, and become collectable once nothing holds them.
    #[must_use]
    pub fn with_lease(mut self, lease: Option<String>) -> Self {
        self.lease = lease.filter(|l| !l.is_empty());
        self
    }

    /// The namespace of the call.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The lease in effect for the call, if any.
    pub fn lease(&self) -> Option<&str> {
        self.lease.as_deref()
    }
}

fn validate_namespace(ns: &str) -> Result<()> {
    validate_identifier("namespace", ns)
}

/// containerd's rule for namespaces: alphanumeric runs joined by single `.`, `_` or
/// `-`, at most 76 bytes.
pub(crate) fn validate_identifier(what: &str, id: &str) -> Result<()> {
    let invalid = |why: &str| Err(Error::invalid_argument(format!("{what} {id:?}: {why}")));
    if id.is_empty() {
        return invalid("must not be empty");
    }
    if id.len() > MAX_NAMESPACE_LEN {
        return invalid("longer than 76 bytes");
    }
    let bytes = id.as_bytes();
    let is_sep = |b: u8| matches!(b, b'.' | b'_' | b'-');
    for (i, &b) in bytes.iter().enumerate() {
        if b.is_ascii_alphanumeric() {
            continue;
        }
        let at_edge = i == 0 || i == bytes.len() - 1;
        if !is_sep(b) || at_edge || is_sep(bytes[i - 1]) {
            return invalid(
                "must be letters and digits, optionally joined by single '.', '_' or '-'",
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn containerd_keys_name_their_namespace() {
        use super::containerd_namespace;
        assert_eq!(containerd_namespace("default/3/extract-1 sha256:ab"), Some("default"));
        assert_eq!(containerd_namespace("k8s.io/12/sha256:ab/c"), Some("k8s.io"));
        for not in ["base", "default/x/y", "default//y", "/3/y", "default/3/", "default/3"] {
            assert_eq!(containerd_namespace(not), None, "{not}");
        }
    }

    use super::*;

    #[test]
    fn namespaces_follow_containerd_rules() {
        for ok in ["default", "k8s.io", "a", "moby", "a-b_c.d", "A1"] {
            assert!(Ctx::new(ok).is_ok(), "{ok}");
        }
        let long = "a".repeat(77);
        for bad in ["", "-a", "a-", "a..b", "a/b", "a b", "ü", long.as_str()] {
            let err = Ctx::new(bad).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument, "{bad}");
        }
    }
}
