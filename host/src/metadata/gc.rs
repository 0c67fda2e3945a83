//! Mark and sweep over the metadata's tables: containerd's `metadata/gc.go`, for
//! snapshots and content, beside the tables it reads. What runs a collection (options, timing,
//! pruning backends, scheduling) is [`crate::gc`].
//!
//! **Roots.** Snapshots created with no lease in effect (containerd, as a proxy client,
//! removes what its own collector collects, so wasnap must never collect what containerd
//! still records); snapshots labelled `containerd.io/gc.root`; snapshots whose
//! `containerd.io/gc.expire` time has not come; every snapshot an unexpired lease holds;
//! an active snapshot with a commit under way (holding, for a merge by copy, the layers
//! its intent names); and, by the retention settings, recently used committed
//! snapshots.
//! **References.** A snapshot holds its parent, and a merge its layers; unless held through a flat lease
//! (`containerd.io/gc.flat`), also what its `containerd.io/gc.ref.snapshot.<snapshotter>`
//! labels name; and a snapshot labelled `containerd.io/gc.bref.snapshot.<snapshotter>`
//! is held by the snapshot the label names.
//! **Content.** A blob's record is a root only when labelled `containerd.io/gc.root` or
//! with an unexpired `containerd.io/gc.expire`; otherwise, as in containerd, it lives
//! while a lease holds it, a snapshot is mapped to it (its `blob`), or a
//! `containerd.io/gc.ref.content[.<anything>]` label on a held snapshot or blob names
//! it. A blob's own `gc.ref.snapshot.<snapshotter>` and `gc.ref.content` labels hold
//! what they name. Blob files are deleted after the sweep, once no namespace records
//! them ([`crate::content`]).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant, SystemTime};

use redb::{ReadableMultimapTable, ReadableTable, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::content::{self, Stored};
use super::db::{self, LEASE_RESOURCES, LEASES, SNAPSHOTS};
use super::lease::{LABEL_GC_EXPIRE, LABEL_GC_FLAT, RESOURCE_CONTENT};
use super::record::Record;
use crate::error::Result;
use crate::kv::from_nanos;
use crate::snapshot::Kind;

/// The host's own retention, applied to committed snapshots that nothing else holds
/// (what buildkit's prune calls keep-duration and keep-storage).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Retention {
    /// Keep this many of the most recently used ones.
    pub keep_recent: usize,
    /// Keep those used within this long (seconds).
    pub keep_for_secs: Option<u64>,
}

/// A label (on a snapshot or a blob): it is a root.
pub const LABEL_GC_ROOT: &str = "containerd.io/gc.root";
/// A snapshot label prefix: `…<snapshotter>[/name] = key` holds that snapshot.
pub const LABEL_GC_REF_SNAPSHOT: &str = "containerd.io/gc.ref.snapshot.";
/// A label prefix (on a snapshot or a blob): `…[.<anything>] = <digest>` holds that blob.
pub const LABEL_GC_REF_CONTENT: &str = "containerd.io/gc.ref.content";
/// A snapshot label prefix: `…<snapshotter>[/name] = key` is held by that snapshot.
pub const LABEL_GC_BREF_SNAPSHOT: &str = "containerd.io/gc.bref.snapshot.";

/// (snapshotter, namespace, key).
pub(crate) type Node = (String, String, String);
/// (namespace, digest): a blob's record.
pub(crate) type BlobNode = (String, String);
/// (namespace, lease id).
pub(crate) type LeaseId = (String, String);

/// What a mark found: the records nothing holds and the leases that have expired.
#[derive(Debug, Default, Clone)]
pub(crate) struct Marked {
    pub removed: Vec<Node>,
    pub removed_content: Vec<BlobNode>,
    pub expired: Vec<LeaseId>,
}

/// Something the collector marks: a snapshot record or a blob record.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Item {
    Snap(Node),
    Blob(BlobNode),
}

/// Everything a mark reads, loaded from one transaction.
struct State {
    records: HashMap<Node, Record>,
    content: HashMap<BlobNode, Stored>,
    /// Per live lease: its resources, and whether it is flat.
    leases: Vec<(LeaseId, bool, Vec<Item>)>,
    /// The layers of each merge by copy under way, by the active snapshot being
    /// committed: its record does not list them yet, its intent does.
    merging: HashMap<Node, Vec<String>>,
    expired: Vec<LeaseId>,
}

macro_rules! load_for {
    ($name:ident, $t:ty) => {
        fn $name(txn: &$t, now: SystemTime) -> Result<State> {
            let mut records = HashMap::new();
            for item in txn.open_table(SNAPSHOTS)?.iter()? {
                let (k, v) = item?;
                let (sn, ns, key) = k.value();
                records.insert((sn.into(), ns.into(), key.into()), Record::decode(v.value(), key)?);
            }
            let content = content::all(txn)?
                .into_iter()
                .map(|(ns, digest, stored)| ((ns, digest), stored))
                .collect();
            let mut leases = Vec::new();
            let mut expired = Vec::new();
            let resources = txn.open_multimap_table(LEASE_RESOURCES)?;
            for item in txn.open_table(LEASES)?.iter()? {
                let (k, v) = item?;
                let (ns, id) = k.value();
                // An unreadable lease holds what it holds, to be safe.
                let labels =
                    super::lease::decode(id, v.value()).map(|s| s.labels).unwrap_or_default();
                let expires =
                    labels.get(LABEL_GC_EXPIRE).and_then(|e| crate::snapshot::parse_expiry(e).ok());
                if expires.is_some_and(|t| t < now) {
                    expired.push((ns.to_owned(), id.to_owned()));
                    continue;
                }
                let mut held = Vec::new();
                for r in resources.get((ns, id))? {
                    let r = r?;
                    let (kind, key) = r.value();
                    if let Some(sn) = kind.strip_prefix("snapshots/") {
                        held.push(Item::Snap((sn.into(), ns.into(), key.into())));
                    } else if kind == RESOURCE_CONTENT {
                        held.push(Item::Blob((ns.into(), key.into())));
                    }
                }
                leases.push((
                    (ns.to_owned(), id.to_owned()),
                    labels.contains_key(LABEL_GC_FLAT),
                    held,
                ));
            }
            let mut merging = HashMap::new();
            for item in txn.open_table(db::INTENTS)?.iter()? {
                let (k, v) = item?;
                let (sn, ns, name) = k.value();
                let intent = super::record::Intent::decode(v.value(), name)?;
                if !intent.layers.is_empty() {
                    merging.insert((sn.into(), ns.into(), intent.key), intent.layers);
                }
            }
            Ok(State { records, content, leases, expired, merging })
        }
    };
}
load_for!(load_read, redb::ReadTransaction);
load_for!(load_write, WriteTransaction);

pub(crate) fn label_target<'a>(
    key: &'a str,
    prefix: &str,
    value: &'a str,
) -> Option<(&'a str, &'a str)> {
    let rest = key.strip_prefix(prefix)?;
    let snapshotter = rest.split('/').next().unwrap_or(rest);
    (!snapshotter.is_empty() && !value.is_empty()).then_some((snapshotter, value))
}

/// The blob a `containerd.io/gc.ref.content[.<anything>]` label names, if `key` is one.
fn content_target<'a>(key: &str, value: &'a str) -> Option<&'a str> {
    let rest = key.strip_prefix(LABEL_GC_REF_CONTENT)?;
    ((rest.is_empty() || rest.starts_with('.') || rest.starts_with('/')) && !value.is_empty())
        .then_some(value)
}

/// Whether labels make their object a root: `containerd.io/gc.root`, or a
/// `containerd.io/gc.expire` time still to come (an unreadable one holds, to be safe).
pub(crate) fn labelled_root(labels: &crate::snapshot::Labels, now: SystemTime) -> bool {
    labels.iter().any(|(k, v)| {
        k.starts_with(LABEL_GC_ROOT)
            || (k == LABEL_GC_EXPIRE && crate::snapshot::parse_expiry(v).map_or(true, |t| t >= now))
    })
}

/// Marks from the roots in a read transaction: what a sweep would remove now.
pub(crate) fn mark_read(txn: &redb::ReadTransaction, retention: &Retention) -> Result<Marked> {
    let now = SystemTime::now();
    Ok(mark(load_read(txn, now)?, now, retention))
}

/// Marks and sweeps in one write transaction; also says how long each took.
pub(crate) fn mark_and_sweep(
    txn: &WriteTransaction,
    retention: &Retention,
) -> Result<(Marked, Duration, Duration)> {
    let now = SystemTime::now();
    let started = Instant::now();
    let marked = mark(load_write(txn, now)?, now, retention);
    let marking = started.elapsed();
    sweep(txn, &marked)?;
    Ok((marked, marking, started.elapsed() - marking))
}

fn mark(state: State, now: SystemTime, retention: &Retention) -> Marked {
    let State { records, content, leases, expired, merging } = state;
    // Roots, each with whether it is held flat.
    let mut queue: VecDeque<(Item, bool)> = VecDeque::new();
    for (_, flat, held) in leases {
        queue.extend(held.into_iter().map(|n| (n, flat)));
    }
    let mut held_by: HashMap<Node, Vec<Node>> = HashMap::new();
    for (node, rec) in &records {
        let (_, ns, _) = node;
        let mut root = !rec.collectable && !rec.labels.contains_key(LABEL_GC_EXPIRE);
        root |= rec.committing.is_some();
        root |= labelled_root(&rec.labels, now);
        for (k, v) in &rec.labels {
            if let Some((bsn, bkey)) = label_target(k, LABEL_GC_BREF_SNAPSHOT, v) {
                held_by
                    .entry((bsn.into(), ns.clone(), bkey.into()))
                    .or_default()
                    .push(node.clone());
            }
        }
        if root {
            queue.push_back((Item::Snap(node.clone()), false));
        }
    }
    // Blobs are collectable unless held, as in containerd: ingested under a lease, mapped
    // to a snapshot, or referenced by a label.
    for (node, stored) in &content {
        if labelled_root(&stored.labels, now) {
            queue.push_back((Item::Blob(node.clone()), false));
        }
    }
    let mut marked: HashMap<Item, bool> = HashMap::new(); // item -> marked non-flat
    let visit = |queue: &mut VecDeque<(Item, bool)>, marked: &mut HashMap<Item, bool>| {
        while let Some((item, flat)) = queue.pop_front() {
            match marked.get(&item) {
                Some(done_full) if *done_full || flat => continue,
                _ => {}
            }
            marked.insert(item.clone(), !flat);
            match &item {
                Item::Snap(node) => {
                    if let Some(holders) = held_by.get(node) {
                        queue.extend(holders.iter().map(|h| (Item::Snap(h.clone()), false)));
                    }
                    let Some(rec) = records.get(node) else { continue };
                    let (sn, ns, _) = node;
                    if let Some(p) = &rec.parent {
                        queue.push_back((Item::Snap((sn.clone(), ns.clone(), p.clone())), flat));
                    }
                    // A merge holds its layers as a child holds its parent; so does
                    // one being committed, from its intent, until its record lists them.
                    let intended = merging.get(node).map(Vec::as_slice).unwrap_or_default();
                    for l in rec.layers.iter().chain(intended) {
                        queue.push_back((Item::Snap((sn.clone(), ns.clone(), l.clone())), flat));
                    }
                    if let Some(blob) = &rec.blob {
                        queue.push_back((Item::Blob((ns.clone(), blob.clone())), flat));
                    }
                    if !flat {
                        for (k, v) in &rec.labels {
                            if let Some((rsn, rkey)) = label_target(k, LABEL_GC_REF_SNAPSHOT, v) {
                                let target = (rsn.into(), ns.clone(), rkey.into());
                                queue.push_back((Item::Snap(target), false));
                            } else if let Some(d) = content_target(k, v) {
                                queue.push_back((Item::Blob((ns.clone(), d.into())), false));
                            }
                        }
                    }
                }
                Item::Blob(node) => {
                    let Some(stored) = content.get(node) else { continue };
                    if flat {
                        continue;
                    }
                    let (ns, _) = node;
                    for (k, v) in &stored.labels {
                        if let Some((rsn, rkey)) = label_target(k, LABEL_GC_REF_SNAPSHOT, v) {
                            let target = (rsn.into(), ns.clone(), rkey.into());
                            queue.push_back((Item::Snap(target), false));
                        } else if let Some(d) = content_target(k, v) {
                            queue.push_back((Item::Blob((ns.clone(), d.into())), false));
                        }
                    }
                }
            }
        }
    };
    visit(&mut queue, &mut marked);

    // Retention: among committed snapshots nothing holds, keep the most recently used
    // ones the settings ask for (and what they hold).
    if retention.keep_recent > 0 || retention.keep_for_secs.is_some() {
        let mut unheld: Vec<(&Node, u64)> = records
            .iter()
            .filter(|(n, rec)| {
                rec.kind == Kind::Committed && !marked.contains_key(&Item::Snap((*n).clone()))
            })
            // Used (prepared on, mounted, touched) counts as recent as updated.
            .map(|(n, rec)| (n, rec.updated.max(rec.last_used)))
            .collect();
        unheld.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        for (i, (node, updated)) in unheld.into_iter().enumerate() {
            let recent = i < retention.keep_recent;
            let young = retention.keep_for_secs.is_some_and(|secs| {
                now.duration_since(from_nanos(updated)).map_or(true, |age| age.as_secs() < secs)
            });
            if recent || young {
                queue.push_back((Item::Snap(node.clone()), false));
            }
        }
        visit(&mut queue, &mut marked);
    }

    let mut removed: Vec<Node> =
        records.into_keys().filter(|n| !marked.contains_key(&Item::Snap(n.clone()))).collect();
    removed.sort();
    let mut removed_content: Vec<BlobNode> =
        content.into_keys().filter(|n| !marked.contains_key(&Item::Blob(n.clone()))).collect();
    removed_content.sort();
    Marked { removed, removed_content, expired }
}

fn sweep(txn: &WriteTransaction, marked: &Marked) -> Result<()> {
    for (sn, ns, key) in &marked.removed {
        db::delete_record(txn, sn, ns, key)?;
    }
    for (ns, digest) in &marked.removed_content {
        content::sweep(txn, ns, digest)?;
    }
    let mut leases = txn.open_table(LEASES)?;
    let mut resources = txn.open_multimap_table(LEASE_RESOURCES)?;
    for (ns, id) in &marked.expired {
        leases.remove((ns.as_str(), id.as_str()))?;
        resources.remove_all((ns.as_str(), id.as_str()))?;
    }
    Ok(())
}
