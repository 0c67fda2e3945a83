//! The cache as a graph: what `du` reports and what prune may remove, worked out from
//! one read transaction (buildkit's cache manager, on containerd's collection rules).
//!
//! **Holds.** A snapshot holds its parent, a merge's layers, and what its
//! `containerd.io/gc.ref.snapshot.<this snapshotter>` labels name; a snapshot named by
//! another's `containerd.io/gc.bref.snapshot.<this snapshotter>` label is held by it.
//! What a label from outside (another snapshotter's snapshot, a blob) names, or a
//! `gc.bref` label naming another snapshotter, is held from outside.
//!
//! **Roots**, as collection sees them: every lease (one root however much it holds), a
//! snapshot labelled `containerd.io/gc.root` or with a `containerd.io/gc.expire` still
//! to come, one being committed, and a snapshot made without a lease that nothing else
//! holds (a chain's top; its ancestors are its own, not roots of their own).
//!
//! **In use:** active snapshots and views, and the parent of one. **Shared:** reachable
//! from more than one root. **Protected** (never pruned): what a lease, a label or
//! something outside holds, in-use snapshots, commits under way, snapshots containerd
//! made through the daemon (a key `<namespace>/<number>/...` in the namespace it names:
//! containerd records them and collects them itself), and everything they reach. Prune
//! removes the rest, least recently used first, a snapshot only once nothing left holds
//! it: removing a leaf can free its parent in the same run.
//!
//! **Filters** (containerd's syntax) see `id`/`key`/`name`, `parent`, `kind`,
//! `description`, `type`, `labels.<key>`, and, present only when true, `inuse`,
//! `shared`, `private`, `mutable` (active) and `immutable` (committed).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::{Duration, SystemTime};

use redb::ReadTransaction;

use super::db::{BKEYS, LEASE_RESOURCES, LEASES, SNAPSHOTS};
use super::gc::{LABEL_GC_BREF_SNAPSHOT, LABEL_GC_REF_SNAPSHOT, label_target, labelled_root};
use super::lease::LABEL_GC_EXPIRE;
use super::record::Record;
use super::usage::{RECORD_TYPES_KEPT, record_type, sizes_in};
use crate::error::Result;
use crate::filter::{Adaptor, Filter, map_field};
use crate::kv::{from_nanos, to_nanos};
use crate::snapshot::{Kind, Usage};

/// Which records a graph holds: one namespace of the snapshotter, or all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    /// One namespace.
    Namespace(&'a str),
    /// Every namespace.
    All,
}

impl Scope<'_> {
    fn has(&self, ns: &str) -> bool {
        match self {
            Scope::Namespace(n) => *n == ns,
            Scope::All => true,
        }
    }
}

/// (namespace, key) pairs.
pub(crate) type Names = Vec<(String, String)>;

/// One record of the graph.
#[derive(Debug)]
pub(crate) struct Node {
    pub ns: String,
    pub key: String,
    pub rec: Record,
    /// Its size, if known (committed snapshots: as stored).
    pub size: Option<Usage>,
    /// Edges into it.
    pub held_by: u32,
    /// An active snapshot or a view stands on it.
    pub live_child: bool,
    /// How many records of the snapshotter, in any namespace, name its backend key
    /// (more than one: a layer shared between namespaces).
    pub names: u64,
    /// Some of them are outside the scope: removing records here cannot free it.
    pub named_outside: bool,
}

impl Node {
    /// When it was last used, or made if never: what prune orders by.
    pub fn last_active(&self) -> u64 {
        self.rec.last_used.max(self.rec.created)
    }
}

/// The records of one scope and what holds them.
#[derive(Debug)]
pub(crate) struct Graph {
    /// In order of namespace and key.
    pub nodes: Vec<Node>,
    /// What each record holds: `hold_to[hold_start[i]..hold_start[i + 1]]` (an edge
    /// per reason, so counts are per edge), in one allocation for all.
    hold_start: Vec<usize>,
    hold_to: Vec<usize>,
    /// Per lease holding something here: what it holds.
    leases: Vec<Vec<usize>>,
    /// Held from outside the scope.
    external: Vec<usize>,
    now: SystemTime,
}

/// What a graph's roots make of each record.
#[derive(Debug)]
pub(crate) struct Analysis {
    pub in_use: Vec<bool>,
    pub shared: Vec<bool>,
    pub protected: Vec<bool>,
}

/// A prune policy as the planner takes it (see [`super::prune::PrunePolicy`]).
#[derive(Debug, Default)]
pub(crate) struct Policy {
    pub all: bool,
    pub filter: Filter,
    pub keep_duration: Duration,
    pub keep_storage: u64,
    pub reserved_space: u64,
    pub min_free_space: u64,
}

impl Policy {
    /// `prune --all`, nothing kept: what `du` calls reclaimable.
    pub fn all() -> Self {
        Policy { all: true, ..Policy::default() }
    }
}

/// What to remove, in order (every snapshot before what it holds).
#[derive(Debug, Default)]
pub(crate) struct Plan {
    pub order: Vec<usize>,
    /// Bytes counted against the limits before pruning (committed, not shared; data
    /// several records name, once).
    pub total: u64,
    /// The size prune brings the total down to; 0: no size limit.
    pub keep: u64,
}

impl Graph {
    /// Loads `scope` of snapshotter `sn`. Also returns the committed snapshots whose
    /// size is not known yet, and size rows whose snapshot is gone.
    pub fn load(
        txn: &ReadTransaction,
        sn: &str,
        scope: Scope<'_>,
    ) -> Result<(Graph, Vec<usize>, Names)> {
        let now = SystemTime::now();
        let mut nodes = Vec::new();
        let table = txn.open_table(SNAPSHOTS)?;
        let ns0 = match scope {
            Scope::Namespace(ns) => ns,
            Scope::All => "",
        };
        for row in table.range((sn, ns0, "")..)? {
            let (k, v) = row?;
            let (s, ns, key) = k.value();
            if s != sn || !scope.has(ns) {
                break;
            }
            nodes.push(Node {
                ns: ns.to_owned(),
                key: key.to_owned(),
                rec: Record::decode(v.value(), key)?,
                size: None,
                held_by: 0,
                live_child: false,
                names: 1,
                named_outside: false,
            });
        }
        let mut g = Graph {
            nodes,
            hold_start: Vec::new(),
            hold_to: Vec::new(),
            leases: Vec::new(),
            external: Vec::new(),
            now,
        };
        let (unknown, stale) = g.load_sizes(txn, sn, scope)?;
        g.link(sn);
        g.load_leases(txn, sn, scope)?;
        g.load_outside(txn, &table, sn, scope)?;
        Ok((g, unknown, stale))
    }

    fn find(&self, ns: &str, key: &str) -> Option<usize> {
        self.nodes.binary_search_by(|n| (n.ns.as_str(), n.key.as_str()).cmp(&(ns, key))).ok()
    }

    /// Sizes of committed snapshots: the size rows and the records come in the same
    /// order, so one pass over both matches them.
    fn load_sizes(
        &mut self,
        txn: &ReadTransaction,
        sn: &str,
        scope: Scope<'_>,
    ) -> Result<(Vec<usize>, Names)> {
        let (ns0, one) = match scope {
            Scope::Namespace(ns) => (ns, true),
            Scope::All => ("", false),
        };
        let mut stale = Vec::new();
        let mut next = 0;
        let nodes = &mut self.nodes;
        sizes_in(txn, sn, ns0, one, &mut |ns, key, bkey, usage| {
            while next < nodes.len()
                && (nodes[next].ns.as_str(), nodes[next].key.as_str()) < (ns, key)
            {
                next += 1;
            }
            match nodes.get_mut(next) {
                Some(n)
                    if n.ns == ns
                        && n.key == key
                        && n.rec.bkey == bkey
                        && n.rec.kind == Kind::Committed =>
                {
                    n.size = Some(usage);
                }
                // Its record is gone, or is another snapshot of the same name now.
                _ if stale.len() < 10_000 => stale.push((ns.to_owned(), key.to_owned())),
                _ => {}
            }
        })?;
        let unknown = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].rec.kind == Kind::Committed && self.nodes[i].size.is_none())
            .collect();
        Ok((unknown, stale))
    }

    /// How many records name each record's backend key, for [`Graph::plan`]'s size
    /// limits (until this is read, each record counts as the only one naming its key).
    /// Over every namespace, the graph holds them all. In one, only keys made in it
    /// (`<ns>/...`) that another namespace adopted, or keys it adopted, have names
    /// elsewhere: one pass over the index of the namespace's own keys, and a lookup for
    /// each adopted one.
    pub(crate) fn count_names(
        &mut self,
        txn: &ReadTransaction,
        sn: &str,
        scope: Scope<'_>,
    ) -> Result<()> {
        let names: Vec<u64> = match scope {
            Scope::All => {
                let mut count: HashMap<&str, u64> = HashMap::with_capacity(self.nodes.len());
                for n in &self.nodes {
                    *count.entry(n.rec.bkey.as_str()).or_default() += 1;
                }
                self.nodes.iter().map(|n| count[n.rec.bkey.as_str()]).collect()
            }
            Scope::Namespace(ns) => {
                let bkeys = txn.open_multimap_table(BKEYS)?;
                // Namespaces have no '/', and '0' follows it: the range is `<ns>/...`.
                let (own, past) = (format!("{ns}/"), format!("{ns}0"));
                let mut many: HashMap<String, u64> = HashMap::new();
                for row in bkeys.range((sn, own.as_str())..(sn, past.as_str()))? {
                    let (k, names) = row?;
                    if names.len() > 1 {
                        many.insert(k.value().1.to_owned(), names.len());
                    }
                }
                let mut names = Vec::with_capacity(self.nodes.len());
                for n in &self.nodes {
                    let bkey = n.rec.bkey.as_str();
                    names.push(if bkey.starts_with(&own) {
                        many.get(bkey).copied().unwrap_or(1)
                    } else {
                        bkeys.get((sn, bkey))?.len().max(1)
                    });
                }
                names
            }
        };
        let mut here: HashMap<&str, u64> = HashMap::new();
        for n in names.iter().zip(&self.nodes).filter(|(names, _)| **names > 1).map(|(_, n)| n) {
            *here.entry(n.rec.bkey.as_str()).or_default() += 1;
        }
        let outside: Vec<bool> = (self.nodes.iter().zip(&names))
            .map(|(n, &names)| names > 1 && here[n.rec.bkey.as_str()] < names)
            .collect();
        for ((n, names), outside) in self.nodes.iter_mut().zip(names).zip(outside) {
            n.names = names;
            n.named_outside = outside;
        }
        Ok(())
    }

    /// The holds between records of the scope, and which are in use by a child.
    fn link(&mut self, sn: &str) {
        let mut edges: Vec<(usize, usize)> = Vec::new();
        let mut external = Vec::new();
        let mut live = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let ns = n.ns.as_str();
            if let Some(p) = n.rec.parent.as_deref().and_then(|p| self.find(ns, p)) {
                edges.push((i, p));
                if n.rec.kind != Kind::Committed {
                    live.push(p);
                }
            }
            for l in n.rec.layers.iter().filter(|l| **l != n.key) {
                if let Some(j) = self.find(ns, l) {
                    edges.push((i, j));
                }
            }
            for (k, v) in &n.rec.labels {
                if let Some((tsn, tkey)) = label_target(k, LABEL_GC_REF_SNAPSHOT, v) {
                    if let Some(j) = (tsn == sn).then(|| self.find(ns, tkey)).flatten() {
                        edges.push((i, j));
                    }
                } else if let Some((tsn, tkey)) = label_target(k, LABEL_GC_BREF_SNAPSHOT, v) {
                    match (tsn == sn).then(|| self.find(ns, tkey)) {
                        Some(Some(j)) => edges.push((j, i)),
                        Some(None) => {}
                        None => external.push(i), // held by another snapshotter's
                    }
                }
            }
        }
        // A label naming its own snapshot holds nothing.
        edges.retain(|(from, to)| from != to);
        // Edges grouped by where they start (a counting sort).
        let mut start = vec![0usize; self.nodes.len() + 1];
        for &(from, to) in &edges {
            start[from + 1] += 1;
            self.nodes[to].held_by += 1;
        }
        for i in 0..self.nodes.len() {
            start[i + 1] += start[i];
        }
        let mut fill = start.clone();
        let mut to_of = vec![0usize; edges.len()];
        for (from, to) in edges {
            to_of[fill[from]] = to;
            fill[from] += 1;
        }
        (self.hold_start, self.hold_to) = (start, to_of);
        for p in live {
            self.nodes[p].live_child = true;
        }
        self.external.extend(external);
    }

    /// What record `i` holds.
    fn holds(&self, i: usize) -> &[usize] {
        &self.hold_to[self.hold_start[i]..self.hold_start[i + 1]]
    }

    /// What each unexpired lease of the scope holds here.
    fn load_leases(&mut self, txn: &ReadTransaction, sn: &str, scope: Scope<'_>) -> Result<()> {
        let kind = format!("snapshots/{sn}");
        let resources = txn.open_multimap_table(LEASE_RESOURCES)?;
        let ns0 = match scope {
            Scope::Namespace(ns) => ns,
            Scope::All => "",
        };
        for row in txn.open_table(LEASES)?.range((ns0, "")..)? {
            let (k, v) = row?;
            let (ns, id) = k.value();
            if !scope.has(ns) {
                break;
            }
            // An unreadable lease holds what it holds, to be safe.
            let expires = super::lease::decode(id, v.value())
                .ok()
                .and_then(|s| s.labels.get(LABEL_GC_EXPIRE).cloned())
                .and_then(|e| crate::snapshot::parse_expiry(&e).ok());
            if expires.is_some_and(|t| t < self.now) {
                continue;
            }
            let mut held = Vec::new();
            for r in resources.get((ns, id))? {
                let r = r?;
                let (rkind, key) = r.value();
                if rkind == kind
                    && let Some(i) = self.find(ns, key)
                {
                    held.push(i);
                }
            }
            if !held.is_empty() {
                self.leases.push(held);
            }
        }
        Ok(())
    }

    /// What other snapshotters' snapshots and blobs of the scope's namespaces name
    /// here with `gc.ref.snapshot` labels. Other snapshotters are skipped to, one seek
    /// each, and a record is decoded only if its bytes mention such a label.
    fn load_outside(
        &mut self,
        txn: &ReadTransaction,
        table: &redb::ReadOnlyTable<(&'static str, &'static str, &'static str), &'static [u8]>,
        sn: &str,
        scope: Scope<'_>,
    ) -> Result<()> {
        let needle = format!("{LABEL_GC_REF_SNAPSHOT}{sn}");
        let mut from = String::new();
        loop {
            let other = match table.range((from.as_str(), "", "")..)?.next() {
                Some(row) => row?.0.value().0.to_owned(),
                None => break,
            };
            if other != sn {
                let ns0 = match scope {
                    Scope::Namespace(ns) => ns,
                    Scope::All => "",
                };
                for row in table.range((other.as_str(), ns0, "")..)? {
                    let (k, v) = row?;
                    let (s, ns, key) = k.value();
                    if s != other || !scope.has(ns) {
                        break;
                    }
                    if !contains(v.value(), needle.as_bytes()) {
                        continue;
                    }
                    let rec = Record::decode(v.value(), key)?;
                    self.held_by_labels(sn, ns, &rec.labels);
                }
            }
            from = other + "\0";
        }
        for (ns, _, stored) in super::content::all(txn)? {
            if scope.has(&ns) {
                self.held_by_labels(sn, &ns, &stored.labels);
            }
        }
        Ok(())
    }

    fn held_by_labels(&mut self, sn: &str, ns: &str, labels: &crate::snapshot::Labels) {
        for (k, v) in labels {
            if let Some((tsn, tkey)) = label_target(k, LABEL_GC_REF_SNAPSHOT, v)
                && tsn == sn
                && let Some(i) = self.find(ns, tkey)
            {
                self.external.push(i);
            }
        }
    }

    /// In use, shared and protected, per record.
    pub fn analyse(&self) -> Analysis {
        let n = self.nodes.len();
        let in_use: Vec<bool> =
            self.nodes.iter().map(|n| n.rec.kind != Kind::Committed || n.live_child).collect();
        // Roots: each lease, then each record that is a root of its own.
        let mut own_roots: Vec<usize> = Vec::new();
        let mut protect: Vec<usize> = self.leases.iter().flatten().copied().collect();
        protect.extend(&self.external);
        for (i, node) in self.nodes.iter().enumerate() {
            let labelled =
                labelled_root(&node.rec.labels, self.now) || node.rec.committing.is_some();
            let top = !node.rec.collectable && node.held_by == 0;
            if labelled || top {
                own_roots.push(i);
            }
            // containerd's, made through the daemon: its collector decides when it goes.
            let containerds = super::containerd_namespace(&node.key) == Some(node.ns.as_str());
            if labelled || in_use[i] || containerds {
                protect.push(i);
            }
        }
        // Shared: a second root reaching a record marks it and all it reaches; each
        // record is entered at most three times (first root, its own root again,
        // turning shared), so this is linear.
        const NONE: usize = usize::MAX;
        let mut first = vec![NONE; n];
        let mut shared = vec![false; n];
        let mut stack: Vec<(usize, usize)> = Vec::new(); // (node, root or NONE: shared)
        let starts = self.leases.iter().map(Vec::as_slice).chain(own_roots.chunks(1));
        for (r, starts) in starts.enumerate() {
            stack.extend(starts.iter().map(|&s| (s, r)));
            while let Some((i, by)) = stack.pop() {
                let spread = if by == NONE || (first[i] != NONE && first[i] != by) {
                    if shared[i] {
                        continue;
                    }
                    shared[i] = true;
                    NONE
                } else if first[i] == by {
                    continue;
                } else {
                    first[i] = by;
                    by
                };
                stack.extend(self.holds(i).iter().map(|&h| (h, spread)));
            }
        }
        let mut protected = vec![false; n];
        while let Some(i) = protect.pop() {
            if !std::mem::replace(&mut protected[i], true) {
                protect.extend(self.holds(i));
            }
        }
        Analysis { in_use, shared, protected }
    }

    /// The record `i` as filters see it.
    pub fn view<'a>(&'a self, a: &'a Analysis, i: usize) -> View<'a> {
        View { node: &self.nodes[i], in_use: a.in_use[i], shared: a.shared[i] }
    }

    /// What `policy` removes, in order, given `free` bytes on the root's filesystem.
    /// What counts against the limits is each backend snapshot once, through the
    /// records naming it that are committed and not shared, unless a record outside the
    /// scope names it too (no removal here frees it); it leaves the total with the last
    /// record naming it.
    pub fn plan(&self, a: &Analysis, policy: &Policy, free: u64) -> Plan {
        let counts = |i: usize| {
            let n = &self.nodes[i];
            n.rec.kind == Kind::Committed && !a.shared[i] && !n.named_outside
        };
        let size = |i: usize| self.nodes[i].size.map_or(0, |u| u.size);
        // The bytes counted for each key several records name.
        let mut counted: HashMap<&str, u64> = HashMap::new();
        let mut total = 0u64;
        for i in (0..self.nodes.len()).filter(|&i| counts(i)) {
            let node = &self.nodes[i];
            if node.names > 1 {
                match counted.entry(node.rec.bkey.as_str()) {
                    std::collections::hash_map::Entry::Occupied(_) => continue,
                    std::collections::hash_map::Entry::Vacant(e) => e.insert(size(i)),
                };
            }
            // Sizes a plugin reported may be anything: the sum saturates.
            total = total.saturating_add(size(i));
        }
        let keep = keep_bytes(policy, total, free);
        let mut plan = Plan { order: Vec::new(), total, keep };
        if keep != 0 && total <= keep {
            return plan;
        }
        let cutoff = (!policy.keep_duration.is_zero())
            .then(|| to_nanos(self.now.checked_sub(policy.keep_duration).unwrap_or(self.now)));
        let candidate: Vec<bool> = (0..self.nodes.len())
            .map(|i| {
                let node = &self.nodes[i];
                node.rec.kind == Kind::Committed
                    && !a.protected[i]
                    && (policy.all
                        || (!a.shared[i] && !RECORD_TYPES_KEPT.contains(&record_type(&node.rec))))
                    && cutoff.is_none_or(|c| node.last_active() <= c)
                    && policy.filter.matches(&self.view(a, i))
            })
            .collect();
        let mut held: Vec<u32> = self.nodes.iter().map(|n| n.held_by).collect();
        let key = |i: usize| Reverse((self.nodes[i].last_active(), self.nodes[i].rec.use_count, i));
        let mut ready: BinaryHeap<_> =
            (0..self.nodes.len()).filter(|&i| candidate[i] && held[i] == 0).map(key).collect();
        let mut left = total;
        // Of keys several records name: how many of those records the plan removes.
        let mut planned: HashMap<&str, u64> = HashMap::new();
        while let Some(Reverse((_, _, i))) = ready.pop() {
            if keep != 0 && left <= keep {
                break;
            }
            plan.order.push(i);
            let node = &self.nodes[i];
            let leaves = if node.names == 1 {
                counts(i).then(|| size(i))
            } else {
                let n = planned.entry(node.rec.bkey.as_str()).or_default();
                *n += 1;
                (*n >= node.names).then(|| counted.get(node.rec.bkey.as_str()).copied()).flatten()
            };
            left = left.saturating_sub(leaves.unwrap_or(0));
            for &h in self.holds(i) {
                held[h] -= 1;
                if held[h] == 0 && candidate[h] {
                    ready.push(key(h));
                }
            }
        }
        plan
    }
}

/// The bytes a policy keeps, as buildkit's `calculateKeepBytes`: 0 (no size limit)
/// without any of the three; else at most keep-storage, less what min-free-space
/// lacks, never below reserved-space; min-free-space alone, when met, removes nothing
/// for size.
fn keep_bytes(p: &Policy, total: u64, free: u64) -> u64 {
    if p.keep_storage == 0 && p.reserved_space == 0 && p.min_free_space == 0 {
        return 0;
    }
    let mut keep = p.keep_storage;
    let excess = p.min_free_space.saturating_sub(free);
    if excess > 0 {
        let room = total.saturating_sub(excess);
        keep = if keep == 0 { room } else { keep.min(room) };
    } else if p.min_free_space != 0 && keep == 0 {
        keep = total;
    }
    // Never below the reserve. 0 left means no limit: everything the policy allows.
    keep.max(p.reserved_space)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// A record as filters see it.
pub(crate) struct View<'a> {
    node: &'a Node,
    in_use: bool,
    shared: bool,
}

impl Adaptor for View<'_> {
    fn field(&self, path: &[&str]) -> Option<String> {
        let (first, rest) = path.split_first()?;
        let rec = &self.node.rec;
        let flag = |b: bool| b.then(|| "true".to_owned());
        match *first {
            "id" | "key" | "name" => Some(self.node.key.clone()),
            "parent" | "parents" => Some(rec.parent.clone().unwrap_or_default()),
            "kind" => Some(rec.kind.as_str().to_owned()),
            "description" => rec.labels.get(super::usage::LABEL_DESCRIPTION).cloned(),
            "type" => Some(record_type(rec).to_owned()),
            "labels" => map_field(&rec.labels, rest),
            "inuse" => flag(self.in_use),
            "shared" => flag(self.shared),
            "private" => flag(!self.shared),
            "mutable" => flag(rec.kind == Kind::Active),
            "immutable" => flag(rec.kind == Kind::Committed),
            "created" => {
                Some(humantime::format_rfc3339_seconds(from_nanos(rec.created)).to_string())
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_bytes_follows_buildkit() {
        let p = |keep_storage, reserved_space, min_free_space| Policy {
            keep_storage,
            reserved_space,
            min_free_space,
            ..Policy::default()
        };
        assert_eq!(keep_bytes(&p(0, 0, 0), 100, 0), 0, "no limit");
        assert_eq!(keep_bytes(&p(60, 0, 0), 100, 0), 60);
        assert_eq!(keep_bytes(&p(60, 80, 0), 100, 0), 80, "the reserve wins");
        assert_eq!(keep_bytes(&p(0, 30, 0), 100, 0), 30, "the reserve alone is a floor");
        // 50 must be free, 20 is: 30 more must go.
        assert_eq!(keep_bytes(&p(0, 0, 50), 100, 20), 70);
        assert_eq!(keep_bytes(&p(60, 0, 50), 100, 20), 60);
        assert_eq!(keep_bytes(&p(0, 90, 50), 100, 20), 90);
        // Enough free: nothing goes for size.
        assert_eq!(keep_bytes(&p(0, 0, 50), 100, 80), 100);
        assert_eq!(keep_bytes(&p(10, 0, 0), 0, 0), 10);
        assert_eq!(keep_bytes(&p(0, 0, 500), 100, 0), 0, "all of it: no limit left");
    }
}
