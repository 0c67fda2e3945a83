//! What the clients believe the daemon holds: every snapshot and lease they were told
//! they made, with the shape (kind, parent, labels) and content (files and their
//! digests) each should have, and what an operation whose reply was lost may have done.
//!
//! The model is the checker's reference. A client writes an intent into it before a
//! mutating call and settles it from the reply; a call cut short by a daemon death
//! leaves a [`Doubt`] that the checker settles from what the daemon shows after the
//! restart, accepting any outcome the call could have had and nothing else.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::SystemTime;

use wasnap::digest::Digest;

/// A snapshot: namespace, snapshotter, key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SnapId {
    pub ns: String,
    pub sn: String,
    pub key: String,
}

impl std::fmt::Display for SnapId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.ns, self.sn, self.key)
    }
}

/// A snapshot's kind, as containerd's API names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Active,
    View,
    Committed,
}

impl Kind {
    /// From the wire's enum value.
    pub fn from_wire(k: i32) -> Option<Kind> {
        match k {
            1 => Some(Kind::View),
            2 => Some(Kind::Active),
            3 => Some(Kind::Committed),
            _ => None,
        }
    }
}

pub type Labels = BTreeMap<String, String>;

/// A lost reply: what the call may have done.
#[derive(Debug, Clone)]
pub enum Doubt {
    /// A prepare or view: the record exists as modelled, or not at all.
    Created,
    /// A commit of the active snapshot `from` as this record: either this exists and
    /// `from` is gone, or `from` is still active and this does not exist.
    CommittedFrom(String),
    /// The active side of such a commit, committed as this name (settled with it).
    CommitSource(String),
    /// A remove: the record exists as modelled, or not at all.
    Removed,
    /// A label update: the labels are the modelled ones or these.
    Updated(Labels),
}

/// One snapshot the clients made.
#[derive(Debug, Clone)]
pub struct Record {
    pub kind: Kind,
    /// The parent's key, empty for none.
    pub parent: String,
    pub labels: Labels,
    /// Files written into this snapshot itself (not its parents): name → digest.
    pub files: BTreeMap<String, Digest>,
    /// The lease that holds it.
    pub lease: String,
    /// The client that made it (`usize::MAX`: the checker).
    pub owner: usize,
    /// A call on it is in flight (the owner's); others leave it alone.
    pub busy: bool,
    /// Set before a call is sent; cleared or settled after its reply.
    pub doubt: Option<Doubt>,
    /// A call is about to create it and has not answered yet: not yet a fact.
    pub pending: bool,
}

/// A lease's state as the clients know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    Live,
    /// Its deletion lost its reply.
    DeleteInDoubt,
    Deleted,
}

/// One lease the clients made.
#[derive(Debug, Clone)]
pub struct LeaseRec {
    pub state: LeaseState,
    /// Its `containerd.io/gc.expire`, if any.
    pub expire: Option<SystemTime>,
}

/// Everything the clients believe.
#[derive(Debug, Default)]
pub struct Model {
    pub snaps: BTreeMap<SnapId, Record>,
    /// By (namespace, id).
    pub leases: HashMap<(String, String), LeaseRec>,
}

/// Whether a lease holds its snapshots at `at`, as far as anyone can say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    Held,
    /// Expiring about now, or its deletion is in doubt: may hold or not.
    Maybe,
    Released,
}

impl Model {
    /// Whether `lease` in `ns` holds at `at`, give or take `margin`.
    pub fn lease_hold(
        &self,
        ns: &str,
        lease: &str,
        at: SystemTime,
        margin: std::time::Duration,
    ) -> Hold {
        let Some(l) = self.leases.get(&(ns.to_owned(), lease.to_owned())) else {
            return Hold::Released;
        };
        let by_state = match l.state {
            LeaseState::Live => Hold::Held,
            LeaseState::DeleteInDoubt => Hold::Maybe,
            LeaseState::Deleted => Hold::Released,
        };
        match (by_state, l.expire) {
            (Hold::Released, _) | (_, None) => by_state,
            (_, Some(t)) if t > at + margin => by_state,
            (_, Some(t)) if t + margin < at => Hold::Released,
            _ => Hold::Maybe,
        }
    }

    /// Each record's hold at `at`: its lease's, raised by any record below it in a
    /// chain (a held child holds its parents).
    pub fn holds(&self, at: SystemTime, margin: std::time::Duration) -> BTreeMap<SnapId, Hold> {
        let mut out: BTreeMap<SnapId, Hold> = BTreeMap::new();
        for (id, r) in &self.snaps {
            if r.pending {
                continue;
            }
            let h = self.lease_hold(&id.ns, &r.lease, at, margin);
            raise(&mut out, id, h);
        }
        // Push holds up parent chains until nothing changes (chains are short).
        loop {
            let mut changed = false;
            let snapshot: Vec<(SnapId, Hold)> = out.iter().map(|(k, v)| (k.clone(), *v)).collect();
            for (id, h) in snapshot {
                if h == Hold::Released {
                    continue;
                }
                let Some(r) = self.snaps.get(&id) else { continue };
                if r.parent.is_empty() {
                    continue;
                }
                let p = SnapId { key: r.parent.clone(), ..id.clone() };
                if self.snaps.contains_key(&p) {
                    changed |= raise(&mut out, &p, h);
                }
            }
            if !changed {
                return out;
            }
        }
    }

    /// The files a snapshot shows: its own and every ancestor's (as far as modelled).
    pub fn expected_files(&self, id: &SnapId) -> BTreeMap<String, Digest> {
        let mut files = BTreeMap::new();
        let mut cur = Some(id.clone());
        let mut seen = BTreeSet::new();
        while let Some(c) = cur.take() {
            if !seen.insert(c.clone()) {
                break;
            }
            let Some(r) = self.snaps.get(&c) else { break };
            for (n, d) in &r.files {
                files.entry(n.clone()).or_insert(*d);
            }
            if !r.parent.is_empty() {
                cur = Some(SnapId { key: r.parent.clone(), ..c });
            }
        }
        files
    }

    /// How deep a chain `id` tops (1: no parent).
    pub fn depth(&self, id: &SnapId) -> usize {
        let mut n = 0;
        let mut cur = Some(id.clone());
        while let Some(c) = cur.take() {
            n += 1;
            if n > 64 {
                break;
            }
            if let Some(r) = self.snaps.get(&c)
                && !r.parent.is_empty()
            {
                cur = Some(SnapId { key: r.parent.clone(), ..c });
            }
        }
        n
    }

    /// The settled records, not busy, held by a live lease with no expiry, that have
    /// `id` as their parent: children the daemon must know of while they stay so.
    pub fn settled_children(&self, id: &SnapId) -> BTreeSet<SnapId> {
        self.snaps
            .iter()
            .filter(|(k, r)| {
                k.ns == id.ns
                    && k.sn == id.sn
                    && r.parent == id.key
                    && !r.pending
                    && !r.busy
                    && r.doubt.is_none()
                    && self
                        .leases
                        .get(&(k.ns.clone(), r.lease.clone()))
                        .is_some_and(|l| l.state == LeaseState::Live && l.expire.is_none())
            })
            .map(|(k, _)| k.clone())
            .collect()
    }
}

fn raise(out: &mut BTreeMap<SnapId, Hold>, id: &SnapId, h: Hold) -> bool {
    let rank = |h: Hold| match h {
        Hold::Released => 0,
        Hold::Maybe => 1,
        Hold::Held => 2,
    };
    let cur = out.entry(id.clone()).or_insert(Hold::Released);
    if rank(h) > rank(*cur) {
        *cur = h;
        true
    } else {
        false
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    fn rec(parent: &str, lease: &str, file: Option<(&str, &[u8])>) -> Record {
        Record {
            kind: Kind::Committed,
            parent: parent.into(),
            labels: Labels::new(),
            files: file.map(|(n, b)| (n.to_owned(), Digest::of(b))).into_iter().collect(),
            lease: lease.into(),
            owner: 0,
            busy: false,
            doubt: None,
            pending: false,
        }
    }

    fn id(key: &str) -> SnapId {
        SnapId { ns: "n".into(), sn: "native".into(), key: key.into() }
    }

    fn lease(m: &mut Model, name: &str, state: LeaseState, expire: Option<SystemTime>) {
        m.leases.insert(("n".into(), name.into()), LeaseRec { state, expire });
    }

    #[test]
    fn a_held_child_holds_its_released_parents() {
        let mut m = Model::default();
        lease(&mut m, "gone", LeaseState::Deleted, None);
        lease(&mut m, "live", LeaseState::Live, None);
        m.snaps.insert(id("a"), rec("", "gone", None));
        m.snaps.insert(id("b"), rec("a", "gone", None));
        m.snaps.insert(id("c"), rec("b", "live", None));
        m.snaps.insert(id("d"), rec("", "gone", None));
        let h = m.holds(SystemTime::now(), Duration::from_secs(1));
        assert_eq!(h[&id("a")], Hold::Held);
        assert_eq!(h[&id("b")], Hold::Held);
        assert_eq!(h[&id("c")], Hold::Held);
        assert_eq!(h[&id("d")], Hold::Released);
    }

    #[test]
    fn expiry_near_the_collection_may_go_either_way() {
        let now = SystemTime::now();
        let margin = Duration::from_secs(3);
        let mut m = Model::default();
        lease(&mut m, "past", LeaseState::Live, Some(now - Duration::from_secs(10)));
        lease(&mut m, "near", LeaseState::Live, Some(now + Duration::from_secs(1)));
        lease(&mut m, "later", LeaseState::Live, Some(now + Duration::from_secs(60)));
        lease(&mut m, "doubt", LeaseState::DeleteInDoubt, None);
        assert_eq!(m.lease_hold("n", "past", now, margin), Hold::Released);
        assert_eq!(m.lease_hold("n", "near", now, margin), Hold::Maybe);
        assert_eq!(m.lease_hold("n", "later", now, margin), Hold::Held);
        assert_eq!(m.lease_hold("n", "doubt", now, margin), Hold::Maybe);
        assert_eq!(m.lease_hold("n", "unknown", now, margin), Hold::Released);
    }

    #[test]
    fn a_snapshot_shows_the_files_of_its_whole_chain() {
        let mut m = Model::default();
        m.snaps.insert(id("a"), rec("", "l", Some(("fa", b"1"))));
        m.snaps.insert(id("b"), rec("a", "l", Some(("fb", b"2"))));
        m.snaps.insert(id("c"), rec("b", "l", None));
        let f = m.expected_files(&id("c"));
        assert_eq!(f.keys().collect::<Vec<_>>(), ["fa", "fb"]);
        assert_eq!(f["fb"], Digest::of(b"2"));
        assert_eq!(m.depth(&id("c")), 3);
    }

    #[test]
    fn children_in_flight_or_released_do_not_count() {
        let mut m = Model::default();
        lease(&mut m, "live", LeaseState::Live, None);
        lease(&mut m, "gone", LeaseState::Deleted, None);
        m.snaps.insert(id("p"), rec("", "live", None));
        m.snaps.insert(id("settled"), rec("p", "live", None));
        let mut busy = rec("p", "live", None);
        busy.busy = true;
        m.snaps.insert(id("busy"), busy);
        m.snaps.insert(id("released"), rec("p", "gone", None));
        assert_eq!(m.settled_children(&id("p")).into_iter().collect::<Vec<_>>(), [id("settled")]);
    }
}
