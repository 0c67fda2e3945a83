//! Prune: removing unused snapshots by buildkit's policy knobs (keep-duration,
//! keep-storage, reserved-space, min-free-space, filters, `--all`), least recently
//! used first. What may go, and in which order, is [`super::cache`]'s plan; this file
//! carries it out.
//!
//! Like the collector, prune never holds the metadata write lock across a backend
//! call: the plan is read in one read transaction; records go in bounded write
//! transactions, each checking again that every one is still unused, unheld and
//! unchanged (a prepare that made it a parent meanwhile wins, as do a lease, a root
//! label and a use); the backend snapshots of the records removed go after each write,
//! children first. A crash between the two leaves backend snapshots no record names,
//! which the next collection prunes; nothing a kept record refers to is ever removed.
//! One thing is read once, with the plan: `gc.ref` labels. A label added meanwhile on
//! another snapshot naming one the plan removes does not keep it.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use redb::{MultimapValue, ReadableMultimapTable};
use serde::{Deserialize, Serialize};

use super::cache::{Graph, Policy, Scope};
use super::db::{self, LEASE_RESOURCES, Tables};
use super::gc::labelled_root;
use super::snapshotter::Snapshotter;
use super::unnamed::Outcome;
use super::usage::forget_sizes;
use crate::error::{Error, Result};
use crate::filter::Filter;
use crate::kv::{Durability, from_nanos};
use crate::snapshot::Kind;

/// Most records one write transaction of a prune removes.
const BATCH: usize = 128;
/// Longest one backend removal may take.
const BACKEND_DEADLINE: Duration = Duration::from_secs(60);

/// What a prune removes (buildkit's prune options). Sizes are bytes; 0 means unset.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrunePolicy {
    /// Also shared snapshots and those of record type `internal` or `frontend`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
    /// Only snapshots matching any of these (containerd's filter syntax, over the
    /// fields `du` shows: `id`, `parent`, `kind`, `type`, `description`, `labels.<k>`,
    /// `inuse`, `shared`, `private`, `mutable`, `immutable`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<String>,
    /// Keep what was used (or made, if never used) within this long.
    #[serde(with = "duration_text", skip_serializing_if = "Duration::is_zero")]
    pub keep_duration: Duration,
    /// Remove until the snapshots use at most this much (buildkit's max-used-space).
    #[serde(with = "bytes_text", skip_serializing_if = "is_zero")]
    pub keep_storage: u64,
    /// Never remove below this much.
    #[serde(with = "bytes_text", skip_serializing_if = "is_zero")]
    pub reserved_space: u64,
    /// Remove until the root's filesystem has this much free.
    #[serde(with = "bytes_text", skip_serializing_if = "is_zero")]
    pub min_free_space: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl PrunePolicy {
    pub(crate) fn compile(&self) -> Result<Policy> {
        Ok(Policy {
            all: self.all,
            filter: Filter::parse_all(&self.filters)?,
            keep_duration: self.keep_duration,
            keep_storage: self.keep_storage,
            reserved_space: self.reserved_space,
            min_free_space: self.min_free_space,
        })
    }
}

/// Parses a size: bytes, or a number with a unit (`512MB`, `10GB`, `1.5 GiB`). As
/// docker's `--keep-storage` and buildkit's configuration read them, `K`, `M`, `G`,
/// `T` and `P` are powers of 1024, with or without `B` or `iB`.
pub fn parse_bytes(text: &str) -> Result<u64> {
    let bad = || {
        Error::invalid_argument(format!(
            "size {text:?}: expected bytes or a number with a unit (512MB, 10GB, 1.5TiB)"
        ))
    };
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num.parse().map_err(|_| bad())?;
    let power = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 1,
        "m" | "mb" | "mib" => 2,
        "g" | "gb" | "gib" => 3,
        "t" | "tb" | "tib" => 4,
        "p" | "pb" | "pib" => 5,
        _ => return Err(bad()),
    };
    let bytes = num * 1024f64.powi(power);
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes.round() as u64)
}

pub(crate) mod bytes_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(n: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(*n)
    }

    /// Bytes as a number, or a size with a unit as text.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            N(u64),
            S(String),
        }
        match Either::deserialize(d)? {
            Either::N(n) => Ok(n),
            Either::S(s) => super::parse_bytes(&s).map_err(serde::de::Error::custom),
        }
    }
}

pub(crate) mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    /// A duration as text (`48h`, `30m`, `7days`).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map_err(|e| serde::de::Error::custom(format!("duration {s:?}: {e}")))
    }
}

/// One snapshot a prune removed (or, dry, would remove).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrunedSnapshot {
    /// Its namespace.
    pub namespace: String,
    /// Its key.
    pub key: String,
    /// Its size in bytes, if known.
    pub size: Option<u64>,
    /// When it was last used; `None`: never.
    #[serde(default, with = "super::usage::opt_rfc3339", skip_serializing_if = "Option::is_none")]
    pub last_used: Option<SystemTime>,
    /// When it was made.
    #[serde(with = "crate::snapshot::rfc3339")]
    pub created: SystemTime,
}

/// What a prune did (or, dry, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachePruneReport {
    /// Nothing was changed.
    pub dry_run: bool,
    /// What went (or would go), in the order it did.
    pub removed: Vec<PrunedSnapshot>,
    /// Bytes freed: the sizes of the snapshots whose data went. A record removed
    /// while another still names its data (a layer shared between namespaces, or one a
    /// create adopted meanwhile) frees nothing. Dry, counted the same way from the
    /// records as they are: each backend snapshot once, and only if no record outside
    /// the plan names it.
    pub freed: u64,
    /// Bytes counted against the size limits before (committed snapshots not shared;
    /// a backend snapshot several records name, such as a layer shared between
    /// namespaces, once).
    pub total: u64,
    /// The size the limits asked to come down to; 0: no size limit.
    pub keep: u64,
    /// Planned, then left: used, held or changed since the plan ((namespace, key)).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<(String, String)>,
    /// Backend snapshots whose record went but which could not be removed now, with
    /// why: the next collection removes them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<(String, String)>,
}

/// How a prune is getting on, for a progress bar.
#[derive(Debug, Clone, Copy)]
pub enum PruneProgress<'a> {
    /// The plan: this many snapshots, freeing this many bytes.
    Planned {
        /// Snapshots to remove.
        snapshots: usize,
        /// The bytes their removal would free (see [`CachePruneReport::freed`]).
        bytes: u64,
    },
    /// One went.
    Removed {
        /// Its key.
        key: &'a str,
        /// The bytes its removal freed (dry: would free); 0 where its data stays.
        size: u64,
    },
}

/// What one write of a prune did: the records removed (index in the batch, and whether
/// no record names the backend key any more), and those skipped.
type Removal = (Vec<(usize, bool)>, Vec<usize>);

/// A record the plan removes, as it was when planned.
struct Planned {
    ns: String,
    key: String,
    bkey: String,
    last_used: u64,
    size: u64,
}

impl Snapshotter {
    /// Removes the snapshots of `scope` that `policy` lets go, least recently used
    /// first, never one in use, held (a lease, a `gc.root` label, a label from
    /// elsewhere) or referred to by one kept; `free` is the bytes free on the root's
    /// filesystem (for min-free-space). With `dry_run`, only says what would go.
    pub fn prune_cache(
        &self,
        scope: Scope<'_>,
        policy: &PrunePolicy,
        free: u64,
        dry_run: bool,
        progress: &mut dyn FnMut(PruneProgress<'_>),
    ) -> Result<CachePruneReport> {
        let compiled = policy.compile()?;
        let mut g = self.load_graph(scope)?;
        // Only a prune's limits need them (`du` does not): read apart from the graph,
        // since a record changed between the two reads is checked again when removed.
        self.db.read_with(|txn| g.count_names(txn, self.name(), scope))?;
        let a = g.analyse();
        let plan = g.plan(&a, &compiled, free);
        let mut report = CachePruneReport {
            dry_run,
            total: plan.total,
            keep: plan.keep,
            ..CachePruneReport::default()
        };
        let frees = self.would_free(&g, &plan.order, matches!(scope, Scope::All))?;
        // Sizes a plugin reported may be anything: sums saturate, never wrap or panic.
        let bytes = frees.iter().fold(0u64, |sum, &b| sum.saturating_add(b));
        progress(PruneProgress::Planned { snapshots: plan.order.len(), bytes });
        if dry_run {
            for (&i, &size) in plan.order.iter().zip(&frees) {
                report.freed = report.freed.saturating_add(size);
                report.removed.push(pruned(&g, i));
                progress(PruneProgress::Removed { key: &g.nodes[i].key, size });
            }
            return Ok(report);
        }
        let planned: Vec<Planned> = plan.order.iter().map(|&i| planned(&g, i)).collect();
        let index: HashMap<(&str, &str), usize> = plan
            .order
            .iter()
            .map(|&i| ((g.nodes[i].ns.as_str(), g.nodes[i].key.as_str()), i))
            .collect();
        for batch in planned.chunks(BATCH) {
            self.faults.hit("prune.before-records")?;
            let (gone, skipped) = self.remove_records(batch)?;
            if let Some(t) = &self.trigger
                && !gone.is_empty()
            {
                t.deletion();
            }
            for &j in &skipped {
                report.skipped.push((batch[j].ns.clone(), batch[j].key.clone()));
            }
            self.faults.hit("prune.after-records")?;
            // Children first: the batch is in plan order.
            let bkeys: Vec<String> = gone
                .iter()
                .filter(|(_, last)| *last)
                .map(|&(j, _)| batch[j].bkey.clone())
                .collect();
            let mut removals = self.remove_backend_keys(bkeys);
            for (j, last) in gone {
                let p = &batch[j];
                // Bytes are freed only where the data went: not while another record
                // names it (a layer shared between namespaces, or one a create adopted
                // after the record went), nor when its removal failed.
                let freed = last
                    && {
                        let removed = removals.next().unwrap_or_else(|| {
                            Err(Error::internal("the backend's removals ended early"))
                        });
                        match removed {
                            Ok(Outcome::Removed) => true,
                            Ok(Outcome::Named) => false,
                            Err(e) if e.is_not_found() => true,
                            Err(e) => {
                                tracing::warn!(snapshotter = %self.name(), bkey = %p.bkey, error = %e,
                                "prune: the record is gone but the backend snapshot is not; collection will retry");
                                report.failed.push((p.bkey.clone(), e.to_string()));
                                false
                            }
                        }
                    };
                let size = if freed { p.size } else { 0 };
                report.freed = report.freed.saturating_add(size);
                if let Some(&i) = index.get(&(p.ns.as_str(), p.key.as_str())) {
                    report.removed.push(pruned(&g, i));
                }
                progress(PruneProgress::Removed { key: &p.key, size });
            }
        }
        // Removals a backend defers reach the disk now, as the collector's do.
        self.db.db().flush()?;
        Ok(report)
    }

    /// The bytes the removal of each of `order` (indexes into `g`, in plan order) would
    /// free, as a real prune counts them: a backend snapshot's size once, at the last
    /// planned record that names it, and nothing for one a record outside the plan (in
    /// any namespace) or a commit under way still names. One read transaction; `all`:
    /// `g` holds every record of the snapshotter.
    fn would_free(&self, g: &Graph, order: &[usize], all: bool) -> Result<Vec<u64>> {
        if order.is_empty() {
            return Ok(Vec::new());
        }
        let name = |i: usize| (g.nodes[i].ns.as_str(), g.nodes[i].key.as_str());
        // Each backend key's last position in the plan.
        let mut last: HashMap<&str, usize> = HashMap::with_capacity(order.len());
        for (at, &i) in order.iter().enumerate() {
            last.insert(g.nodes[i].rec.bkey.as_str(), at);
        }
        // Made only for a key more than one record names, which few are.
        let planned = std::cell::OnceCell::new();
        let in_plan = |n: (&str, &str)| {
            planned
                .get_or_init(|| order.iter().map(|&i| name(i)).collect::<HashSet<_>>())
                .contains(&n)
        };
        // Whether a record outside the plan names `bkey`, of `names` (all that do).
        let outside = |bkey: &str, names: MultimapValue<'_, (&str, &str)>| -> Result<bool> {
            let own = name(order[last[bkey]]);
            for n in names {
                let n = n?;
                let n = n.value();
                if n != own && !in_plan(n) {
                    return Ok(true);
                }
            }
            Ok(false)
        };
        let sn = self.name();
        let kept: HashSet<String> = self.db.read_with(|txn| {
            let bkeys = txn.open_multimap_table(db::BKEYS)?;
            let mut kept = HashSet::new();
            if all && order.len().saturating_mul(4) >= g.nodes.len() {
                // Most of the snapshotter's rows: one pass over them costs a fraction
                // of a lookup each.
                for row in bkeys.range((sn, "")..)? {
                    let (k, names) = row?;
                    let (s, bkey) = k.value();
                    if s != sn {
                        break;
                    }
                    if last.contains_key(bkey) && outside(bkey, names)? {
                        kept.insert(bkey.to_owned());
                    }
                }
            } else {
                for &bkey in last.keys() {
                    if outside(bkey, bkeys.get((sn, bkey))?)? {
                        kept.insert(bkey.to_owned());
                    }
                }
            }
            // Both keys of a commit under way, as the removal of what no record names
            // spares them (`super::unnamed`).
            for (_, _, intent) in db::intents(txn, sn)? {
                kept.extend([intent.bkey, intent.bname]);
            }
            Ok(kept)
        })?;
        Ok(order
            .iter()
            .enumerate()
            .map(|(at, &i)| {
                let n = &g.nodes[i];
                let bkey = n.rec.bkey.as_str();
                let frees = last.get(bkey) == Some(&at) && !kept.contains(bkey);
                if frees { n.size.map_or(0, |u| u.size) } else { 0 }
            })
            .collect())
    }

    /// Removes `bkeys` from the backend, in order, on one helper thread (see
    /// [`super::helpers`]): the results come back one by one, each within
    /// [`BACKEND_DEADLINE`]; after one that does not, the rest are reported unavailable
    /// (the thread may still finish them, and the next collection takes what it does
    /// not).
    fn remove_backend_keys(&self, bkeys: Vec<String>) -> impl Iterator<Item = Result<Outcome>> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (backend, faults, n) = (self.backend.clone(), self.faults.clone(), bkeys.len());
        let unnamed = self.unnamed.clone();
        let spawned = super::helpers::BACKEND.run(move || {
            for bkey in bkeys {
                // Kept if a create adopted it meanwhile; the record pruning removed is
                // gone either way.
                let r = faults
                    .hit("prune.backend.remove")
                    .and_then(|()| unnamed.remove(&bkey, || backend.remove(&bkey)));
                if tx.send(r).is_err() {
                    return;
                }
            }
        });
        let mut stuck = spawned.is_err().then(|| "could not start a thread".to_owned());
        (0..n).map(move |_| {
            if let Some(why) = &stuck {
                return Err(Error::unavailable(format!("backend removal: {why}")));
            }
            rx.recv_timeout(BACKEND_DEADLINE).unwrap_or_else(|e| {
                let why = match e {
                    std::sync::mpsc::RecvTimeoutError::Timeout => {
                        format!("no answer within {BACKEND_DEADLINE:?}")
                    }
                    std::sync::mpsc::RecvTimeoutError::Disconnected => {
                        "the backend panicked".to_owned()
                    }
                };
                stuck = Some(why.clone());
                Err(Error::unavailable(format!("backend removal: {why}")))
            })
        })
    }

    /// Removes the records of `batch` still as planned, in one write: each must still
    /// exist with the same backend key and last use, be committed, have no child (a
    /// parent link or a merge's), no lease and no root label. Returns the removed ones
    /// (index in the batch, and whether no record names its backend key any more) and
    /// the skipped ones.
    fn remove_records(&self, batch: &[Planned]) -> Result<Removal> {
        let sn = self.name().to_owned();
        let want: Vec<(String, String, String, u64)> = batch
            .iter()
            .map(|p| (p.ns.clone(), p.key.clone(), p.bkey.clone(), p.last_used))
            .collect();
        self.db.write(Durability::Immediate, move |txn| {
            let kind = format!("snapshots/{sn}");
            let mut leased: HashSet<(String, String)> = HashSet::new();
            for row in txn.open_multimap_table(LEASE_RESOURCES)?.iter()? {
                let (k, values) = row?;
                let ns = k.value().0.to_owned();
                for v in values {
                    let v = v?;
                    let (rkind, key) = v.value();
                    if rkind == kind {
                        leased.insert((ns.clone(), key.to_owned()));
                    }
                }
            }
            let now = SystemTime::now();
            let (mut gone, mut skipped, mut forget) = (Vec::new(), Vec::new(), Vec::new());
            for (j, (ns, key, bkey, last_used)) in want.iter().enumerate() {
                let unchanged = match txn.record(&sn, ns, key)? {
                    Some(rec) => {
                        rec.bkey == *bkey
                            && rec.last_used == *last_used
                            && rec.kind == Kind::Committed
                            && rec.committing.is_none()
                            && !labelled_root(&rec.labels, now)
                    }
                    None => false,
                };
                if !unchanged
                    || txn.has_children(&sn, ns, key)?
                    || leased.contains(&(ns.clone(), key.clone()))
                {
                    skipped.push(j);
                    continue;
                }
                if let Some((_, last)) = db::delete_record(txn, &sn, ns, key)? {
                    forget.push((ns.clone(), key.clone()));
                    gone.push((j, last));
                }
            }
            forget_sizes(txn, &sn, &forget)?;
            Ok((gone, skipped))
        })
    }
}

fn planned(g: &Graph, i: usize) -> Planned {
    let n = &g.nodes[i];
    Planned {
        ns: n.ns.clone(),
        key: n.key.clone(),
        bkey: n.rec.bkey.clone(),
        last_used: n.rec.last_used,
        size: n.size.map_or(0, |u| u.size),
    }
}

fn pruned(g: &Graph, i: usize) -> PrunedSnapshot {
    let n = &g.nodes[i];
    PrunedSnapshot {
        namespace: n.ns.clone(),
        key: n.key.clone(),
        size: n.size.map(|u| u.size),
        last_used: (n.rec.last_used > 0).then(|| from_nanos(n.rec.last_used)),
        created: from_nanos(n.rec.created),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_docker_reads_them() {
        for (text, bytes) in [
            ("0", 0),
            ("1024", 1024),
            ("1k", 1024),
            ("512MB", 512 << 20),
            ("10GB", 10 << 30),
            ("10 GiB", 10 << 30),
            ("1.5g", 3 << 29),
            ("2TB", 2 << 40),
        ] {
            assert_eq!(parse_bytes(text).unwrap(), bytes, "{text}");
        }
        for bad in ["", "GB", "ten", "-1GB", "1XB", "1.2.3"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn policies_read_from_toml_and_refuse_unknown_fields() {
        let p: PrunePolicy = toml::from_str(
            "keep_duration = \"48h\"\nkeep_storage = \"10GB\"\nreserved_space = 1024\nall = true\nfilters = [\"type==regular\"]\n",
        )
        .unwrap();
        assert_eq!(p.keep_duration, Duration::from_secs(48 * 3600));
        assert_eq!(p.keep_storage, 10 << 30);
        assert_eq!(p.reserved_space, 1024);
        assert!(p.all);
        let again: PrunePolicy = toml::from_str(&toml::to_string(&p).unwrap()).unwrap();
        assert_eq!(again, p);
        let err = toml::from_str::<PrunePolicy>("keep_bytes = 1\n").unwrap_err();
        assert!(err.to_string().contains("keep_bytes"), "{err}");
        assert!(toml::from_str::<PrunePolicy>("keep_duration = \"soon\"\n").is_err());
    }
}
