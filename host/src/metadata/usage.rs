//! Usage records for the cache (buildkit's cache manager): when each snapshot was last
//! used and how often, what it weighs, and `du`.
//!
//! **Use.** `prepare` and `view` use their parent, counted in the write that stores the
//! new record; `mounts` uses the snapshot it mounts, in a deferred write of its own (no
//! sync on that hot path); [`Snapshotter::touch`] uses one explicitly. A use sets
//! `last_used` and adds one to `use_count`, and nothing else: not `updated`, not what
//! collection keeps, and an update of labels racing with it keeps both
//! ([`same_but_use`]). A use rewrites the record's own row only: no link changes.
//!
//! **Sizes.** A committed snapshot never changes, so its size is asked of the backend
//! once (for native drivers, the usage stored at its commit: O(1)) and kept in a table
//! of this module's own, keyed as the records are (so one ordered pass reads both) and
//! holding the backend key it was measured for (a record made again under the same
//! name is measured again). `du` and prune then read every size in the same read
//! transaction as the records, with no backend call.
//!
//! **du** reads records, leases and sizes in one read transaction and works out, per
//! snapshot, whether it is in use, shared and reclaimable ([`super::cache`]).

use std::time::SystemTime;

use redb::{TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::Ctx;
use super::cache::{Graph, Scope};
use super::db::{SNAPSHOTS, Tables};
use super::record::Record;
use super::snapshotter::{Snapshotter, not_found};
use crate::error::{Error, Result};
use crate::filter::Filter;
use crate::kv::{Durability, from_nanos, now_nanos};
use crate::snapshot::{Kind, Usage};

/// A snapshot label: what the snapshot holds, in words (buildkit's record description),
/// shown by `du`.
pub const LABEL_DESCRIPTION: &str = "wasnap.io/description";
/// A snapshot label: what kind of cache record the snapshot is, as buildkit types its
/// records (`regular`, `internal`, `frontend`, `source.local`, `source.git.checkout`,
/// `exec.cachemount`). Without `--all`, prune leaves `internal` and `frontend` alone.
pub const LABEL_RECORD_TYPE: &str = "wasnap.io/record-type";
/// The record type of a snapshot without [`LABEL_RECORD_TYPE`].
pub const RECORD_TYPE_REGULAR: &str = "regular";
/// Record types that only `prune --all` removes.
pub const RECORD_TYPES_KEPT: [&str; 2] = ["internal", "frontend"];

/// (snapshotter, namespace, key) -> (backend key, bytes, inodes) of a committed
/// snapshot, as its backend measured it. A cache: a row whose record is gone (or names
/// another backend key) is dropped when seen, and a missing row is learnt again.
pub(crate) const SIZES: TableDefinition<'static, (&str, &str, &str), (&str, u64, u64)> =
    TableDefinition::new("cache_sizes");

/// A size row: (namespace, key, backend key, usage).
pub(crate) type SizeRow = (String, String, String, Usage);

/// Most rows one write of learnt sizes carries, so that no write holds others long.
const SIZE_BATCH: usize = 4096;

/// Marks `rec` as used at `now`.
fn used(rec: &mut Record, now: u64) {
    rec.last_used = rec.last_used.max(now);
    rec.use_count = rec.use_count.saturating_add(1);
}

/// Records a use of `key` inside `txn` (a record that is gone is not an error: the use
/// raced a removal). Only the record's own row is written.
pub(crate) fn touch_in(txn: &WriteTransaction, sn: &str, ns: &str, key: &str) -> Result<()> {
    let Some(mut rec) = txn.record(sn, ns, key)? else { return Ok(()) };
    used(&mut rec, now_nanos());
    txn.open_table(SNAPSHOTS)?.insert((sn, ns, key), rec.encode()?.as_slice())?;
    Ok(())
}

/// Whether two records differ at most in their use: what an update that read `b` may
/// still write over `a`.
pub(crate) fn same_but_use(a: &Record, b: &Record) -> bool {
    let mut a = a.clone();
    a.last_used = b.last_used;
    a.use_count = b.use_count;
    a == *b
}

/// `rec` with the use recorded in `current` (an update must not undo a use that came
/// between its read and its write).
pub(crate) fn with_use_of(rec: &Record, current: &Record) -> Record {
    let mut rec = rec.clone();
    rec.last_used = current.last_used;
    rec.use_count = current.use_count;
    rec
}

/// One snapshot as `du` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// Its namespace.
    pub namespace: String,
    /// Its key.
    pub key: String,
    /// Its kind.
    pub kind: Kind,
    /// Its parent, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// A merge's layers, bottom first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<String>,
    /// Bytes it uses on its own (not its parents'): the usage its backend stored at
    /// commit. `None` for active snapshots and views unless measured (`du --verbose`),
    /// and for a snapshot whose backend could not say.
    pub size: Option<u64>,
    /// When it was made.
    #[serde(with = "crate::snapshot::rfc3339")]
    pub created: SystemTime,
    /// When it was last used (prepared or viewed on, mounted, touched); `None`: never.
    #[serde(default, with = "opt_rfc3339", skip_serializing_if = "Option::is_none")]
    pub last_used: Option<SystemTime>,
    /// How many times it was used.
    pub use_count: u64,
    /// Its [`LABEL_DESCRIPTION`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Its [`LABEL_RECORD_TYPE`], `regular` without one.
    pub record_type: String,
    /// Active, a view, or the parent of an active snapshot or a view.
    pub in_use: bool,
    /// Reachable from more than one root (a lease, a `gc.root` label, a snapshot
    /// nothing else holds): removing one of them does not free it.
    pub shared: bool,
    /// What `prune --all` would remove now.
    pub reclaimable: bool,
}

/// What `du` reports: the matching snapshots and their totals (bytes, over known sizes).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskUsage {
    /// The snapshots, in order of namespace and key.
    pub records: Vec<UsageRecord>,
    /// Bytes of every listed snapshot.
    pub total: u64,
    /// Bytes of the shared ones.
    pub shared: u64,
    /// Bytes of the others.
    pub private: u64,
    /// Bytes `prune --all` would free of the listed ones.
    pub reclaimable: u64,
}

pub(crate) mod opt_rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => crate::snapshot::rfc3339::serialize(t, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| humantime::parse_rfc3339(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

impl UsageRecord {
    pub(crate) fn new(g: &Graph, i: usize, in_use: bool, shared: bool, reclaimable: bool) -> Self {
        let n = &g.nodes[i];
        let rec = &n.rec;
        UsageRecord {
            namespace: n.ns.clone(),
            key: n.key.clone(),
            kind: rec.kind,
            parent: rec.parent.clone(),
            layers: rec.layers.iter().filter(|l| **l != n.key).cloned().collect(),
            size: n.size.map(|u| u.size),
            created: from_nanos(rec.created),
            last_used: (rec.last_used > 0).then(|| from_nanos(rec.last_used)),
            use_count: rec.use_count,
            description: rec.labels.get(LABEL_DESCRIPTION).cloned(),
            record_type: record_type(rec).to_owned(),
            in_use,
            shared,
            reclaimable,
        }
    }
}

/// A record's [`LABEL_RECORD_TYPE`], `regular` if it has none.
pub(crate) fn record_type(rec: &Record) -> &str {
    rec.labels.get(LABEL_RECORD_TYPE).map_or(RECORD_TYPE_REGULAR, String::as_str)
}

impl Snapshotter {
    /// Records a use of `key` now (buildkit's touch): its last use is now and its use
    /// count goes up by one. Durable when this returns.
    pub fn touch(&self, ctx: &Ctx, key: &str) -> Result<()> {
        let (sn, ns, k) = (self.name().to_owned(), ctx.namespace().to_owned(), key.to_owned());
        self.db.write(Durability::Immediate, move |txn| {
            if txn.record(&sn, &ns, &k)?.is_none() {
                return Err(not_found(&k));
            }
            touch_in(txn, &sn, &ns, &k)
        })
    }

    /// Records a use of `key` without waiting for the disk (`mounts`, a hot path): the
    /// next durable commit carries it. A failure is logged, never the caller's.
    pub(crate) fn touch_later(&self, ctx: &Ctx, key: &str) {
        let (sn, ns, k) = (self.name().to_owned(), ctx.namespace().to_owned(), key.to_owned());
        if let Err(e) = self.db.write(Durability::Deferred, move |txn| touch_in(txn, &sn, &ns, &k))
        {
            tracing::debug!(snapshotter = %self.name(), key, error = %e, "could not record a use");
        }
    }

    /// The namespace's snapshots matching any of `filters` (containerd's syntax, over
    /// the fields [`super::cache`] lists) with their size, use and whether they are in
    /// use, shared and reclaimable. One read transaction and, for committed snapshots
    /// whose size is not yet known, one backend usage call each (then kept); with
    /// `measure`, active snapshots and views are measured too (a walk of each).
    pub fn du(&self, ctx: &Ctx, filters: &[String], measure: bool) -> Result<DiskUsage> {
        let filter = Filter::parse_all(filters)?;
        let mut g = self.load_graph(Scope::Namespace(ctx.namespace()))?;
        if measure {
            for n in g.nodes.iter_mut().filter(|n| n.rec.kind != Kind::Committed) {
                n.size = self.backend.usage(&n.rec.bkey).ok();
            }
        }
        let a = g.analyse();
        let plan = g.plan(&a, &super::cache::Policy::all(), 0);
        let mut reclaimable = vec![false; g.nodes.len()];
        for &i in &plan.order {
            reclaimable[i] = true;
        }
        let mut du = DiskUsage::default();
        for (i, &reclaimable) in reclaimable.iter().enumerate() {
            if !filter.matches(&g.view(&a, i)) {
                continue;
            }
            let r = UsageRecord::new(&g, i, a.in_use[i], a.shared[i], reclaimable);
            let size = r.size.unwrap_or(0);
            // Sizes a plugin reported may be anything: sums saturate, never wrap or panic.
            du.total = du.total.saturating_add(size);
            if r.shared {
                du.shared = du.shared.saturating_add(size);
            } else {
                du.private = du.private.saturating_add(size);
            }
            if r.reclaimable {
                du.reclaimable = du.reclaimable.saturating_add(size);
            }
            du.records.push(r);
        }
        Ok(du)
    }

    /// The records of `scope` with what holds them, in one read transaction, and the
    /// sizes of its committed snapshots (asked of the backend, then kept, for those not
    /// known yet).
    pub(crate) fn load_graph(&self, scope: Scope<'_>) -> Result<Graph> {
        let (mut g, unknown, stale) =
            { self.db.read_with(|txn| Graph::load(txn, self.name(), scope))? };
        let mut learnt = Vec::new();
        for i in unknown {
            let n = &mut g.nodes[i];
            let bkey = n.rec.bkey.clone();
            match self.backend.usage(&bkey) {
                Ok(u) => {
                    n.size = Some(u);
                    learnt.push((n.ns.clone(), n.key.clone(), bkey, u));
                }
                Err(e) => tracing::debug!(snapshotter = %self.name(), bkey, error = %e,
                    "no usage for a committed snapshot; its size is unknown"),
            }
        }
        self.store_sizes(learnt, stale);
        Ok(g)
    }

    /// Keeps learnt sizes and drops rows whose snapshot is gone, in bounded deferred
    /// writes (a cache: losing them to a crash costs only asking again).
    fn store_sizes(&self, learnt: Vec<SizeRow>, stale: Vec<(String, String)>) {
        let mut learnt = learnt.into_iter().peekable();
        let mut stale = stale.into_iter().peekable();
        while learnt.peek().is_some() || stale.peek().is_some() {
            let put: Vec<SizeRow> = learnt.by_ref().take(SIZE_BATCH).collect();
            let drop: Vec<(String, String)> = stale.by_ref().take(SIZE_BATCH).collect();
            let sn = self.name().to_owned();
            let written = self.db.write(Durability::Deferred, move |txn| {
                let mut t = txn.open_table(SIZES)?;
                for (ns, key, bkey, u) in &put {
                    t.insert(
                        (sn.as_str(), ns.as_str(), key.as_str()),
                        (bkey.as_str(), u.size, u.inodes),
                    )?;
                }
                forget_sizes(txn, &sn, &drop)
            });
            if let Err(e) = written {
                tracing::debug!(snapshotter = %self.name(), error = %e, "could not keep sizes");
                return;
            }
        }
    }
}

/// Drops the size rows of `keys` ((namespace, key): their records are gone) inside
/// `txn`.
pub(crate) fn forget_sizes(
    txn: &WriteTransaction,
    sn: &str,
    keys: &[(String, String)],
) -> Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    let mut t = txn.open_table(SIZES)?;
    for (ns, key) in keys {
        t.remove((sn, ns.as_str(), key.as_str()))?;
    }
    Ok(())
}

/// Calls `f` with each size row of `sn` from namespace `ns0` on (one namespace with
/// `one`), in key order, from a read transaction, until `f` says stop. A database
/// without the table has none.
pub(crate) fn sizes_in(
    txn: &redb::ReadTransaction,
    sn: &str,
    ns0: &str,
    one: bool,
    f: &mut dyn FnMut(&str, &str, &str, Usage),
) -> Result<()> {
    let t = match txn.open_table(SIZES) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
        Err(e) => return Err(Error::from(e)),
    };
    for row in t.range((sn, ns0, "")..)? {
        let (k, v) = row?;
        let (s, ns, key) = k.value();
        if s != sn || (one && ns != ns0) {
            break;
        }
        let (bkey, size, inodes) = v.value();
        f(ns, key, bkey, Usage { size, inodes });
    }
    Ok(())
}
