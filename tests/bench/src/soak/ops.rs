//! One soak client: a loop of random containerd operations in its namespace, across
//! the configured snapshotters, under its own leases.
//!
//! Each mutating call writes its intent into the [`Model`] before it is sent and
//! settles it from the reply; a call whose reply is lost to a daemon death leaves a
//! [`Doubt`] for the checker. Replies are checked on the spot where the model makes
//! them certain: `stat` of the client's own settled snapshots must show what it made,
//! a `List` filtered to its own label must list everything it holds, a view or the
//! mounts of an active snapshot must show every file written into its chain with the
//! digest written, removing a parent that has a child must fail with
//! failed-precondition, and a label the `label-policy` guest denies must be refused.
//! An error the call could not give (given the model) on a live daemon is a violation.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use tonic::Code;
use wasnap::digest::Digest;
use wasnap_daemon::client::{Client, request};
use wasnap_daemon::proto::leases as lpb;
use wasnap_daemon::proto::snapshots as spb;
use wasnap_daemon::proto::types::Mount;

use super::Shared;
use super::model::{Doubt, Kind, LeaseRec, LeaseState, Model, Record, SnapId};
use super::rng::Rng;

/// Longest one call may take before it counts as hung.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// The label every client snapshot carries: whose it is.
pub const OWNER: &str = "soak.owner";
/// The label the `label-policy` guest in front of `copy` is configured to deny.
pub const FORBIDDEN: &str = "containerd.io/snapshot/soak.forbidden";
/// A label the backend inherits (policies and backends see it).
const TAG: &str = "containerd.io/snapshot/soak.tag";
/// How long chains may grow.
const MAX_DEPTH: usize = 6;
/// How long a stalled List stream is left unread.
const STALL: Duration = Duration::from_secs(10);
/// How long a collection may take while a List stream is stalled.
const UNDER_STALL: Duration = Duration::from_secs(30);
/// The stalled List's row.
pub const STALLED_LIST: &str = "list (stalled reader)";

/// The operations, in the order the table lists them.
pub const OPS: &[&str] = &[
    "prepare",
    "commit",
    "view",
    "remove",
    "stat",
    "update",
    "list",
    "list (filtered)",
    STALLED_LIST,
    "usage",
    "mounts",
    "lease create",
    "lease delete",
    "lease (expiring)",
    "prepare (denied label)",
    "gc (on demand)",
];

/// The calls the `chaos` guest may kill (see `CHAOS_CALLS` in the driver).
const CHAOS_OPS: &[&str] = &["prepare", "view", "commit", "update"];

/// Whether `s` is the host's error for the `chaos` guest's death in a call: a trap, a
/// deadline or its memory limit.
fn guest_died(s: &tonic::Status) -> bool {
    let m = s.message();
    matches!(s.code(), Code::Internal | Code::Unavailable)
        && m.contains("plugin \"chaos\"")
        && (m.contains("panicked") || m.contains("ran past its deadline") || m.contains("memory"))
}

/// Whether `s` says the disk is full: the kernel's error, or a plugin refused more
/// layer data before the disk got there (its `keep_free_mib`).
fn no_space(s: &tonic::Status) -> bool {
    let m = s.message();
    m.contains("No space left on device")
        || (s.code() == tonic::Code::FailedPrecondition && m.contains("(keep_free_mib)"))
}

/// What a call came back with.
pub enum Reply<T> {
    Ok(T),
    /// A reply the caller expected might come (its code was in the expected list).
    Refused,
    /// No reply: the daemon died (or the call failed unexpectedly, reported already).
    Lost,
}

/// One client.
pub struct Worker {
    sh: Arc<Shared>,
    id: usize,
    ns: String,
    rng: Rng,
    n: u64,
    /// The lease its snapshots go under.
    lease: Option<String>,
    client: Client,
    generation: u64,
}

/// Runs client `id` until the soak stops.
pub async fn run(sh: Arc<Shared>, id: usize, seed: u64) {
    let ns = sh.namespaces[id % sh.namespaces.len()].clone();
    let mut rx = sh.conn.clone();
    let Ok(conn) = rx.wait_for(|c| c.client.is_some()).await.map(|c| c.clone()) else { return };
    let Some(client) = conn.client else { return };
    let mut w = Worker {
        sh,
        id,
        ns,
        rng: Rng::fork(seed, id as u64 + 1),
        n: 0,
        lease: None,
        client,
        generation: conn.generation,
    };
    while !w.sh.stop.load(Ordering::Acquire) {
        w.step().await;
    }
}

impl Worker {
    fn me(&self) -> String {
        format!("c{}", self.id)
    }

    fn fresh(&mut self, what: &str) -> String {
        self.n += 1;
        format!("c{}-{what}{}", self.id, self.n)
    }

    fn violation(&self, what: String) {
        self.sh.violation(format!("client {}: {what}", self.id));
    }

    /// One operation, with the pause lock held for reading so that the checker sees
    /// no call in flight.
    async fn step(&mut self) {
        let guard = self.sh.pause.clone().read_owned().await;
        let conn = self.sh.conn.borrow().clone();
        let Some(client) = conn.client else {
            drop(guard);
            let mut rx = self.sh.conn.clone();
            // The driver is restarting the daemon: wait for the next life.
            let _ = rx.wait_for(|c| c.client.is_some() && c.generation != conn.generation).await;
            return;
        };
        self.client = client;
        self.generation = conn.generation;
        if self.lease.is_none() {
            self.create_lease().await;
            return;
        }
        // An on-demand collection is rarer than anything else (3 in 1000 steps), so
        // latencies with and without one can be told apart; the daemon also collects
        // on its own schedule.
        if self.rng.below(1000) < 3 {
            self.gc().await;
            return;
        }
        match self.rng.below(100) {
            0..21 => self.prepare().await,
            21..36 => self.commit().await,
            36..44 => self.view().await,
            44..56 => self.remove().await,
            56..65 => self.stat().await,
            65..70 => self.update().await,
            70..73 => self.list(false).await,
            73..78 => self.list(true).await,
            78..81 => self.usage().await,
            81..88 => self.mounts().await,
            88..89 => self.rotate_lease().await,
            89..93 => self.expiring().await,
            93..95 => self.denied().await,
            // Rare: each one holds a stream open for seconds.
            95 if self.rng.chance(2) => self.stalled_list(),
            _ => self.stat().await,
        }
        drop(guard);
    }

    fn req<T>(&self, msg: T, lease: Option<&str>) -> tonic::Request<T> {
        request(msg, Some(&self.ns), lease)
    }

    fn snapshots(&self) -> spb::snapshots_client::SnapshotsClient<tonic::transport::Channel> {
        self.client.snapshots()
    }

    fn leases_client(&self) -> lpb::leases_client::LeasesClient<tonic::transport::Channel> {
        self.client.leases()
    }

    /// Runs one call, times it and sorts its reply.
    async fn call<T>(
        &self,
        op: &'static str,
        what: &str,
        expected: &[Code],
        fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Reply<T> {
        let gc_before = self.sh.gc_running.load(Ordering::Acquire) > 0;
        let started = Instant::now();
        // A call the daemon's death left waiting on its connection is given up as soon
        // as the driver sees the death.
        let mut rx = self.sh.conn.clone();
        let generation = self.generation;
        let r = tokio::select! {
            r = tokio::time::timeout(CALL_TIMEOUT, fut) => r,
            _ = rx.wait_for(|c| c.generation != generation) => {
                self.sh.count(op, Outcome::Lost, None);
                return Reply::Lost;
            }
        };
        let took = started.elapsed();
        let under_gc = gc_before || self.sh.gc_running.load(Ordering::Acquire) > 0;
        match r {
            Err(_) => {
                self.violation(format!("{op} {what}: no reply within {CALL_TIMEOUT:?}"));
                self.sh.count(op, Outcome::Lost, None);
                Reply::Lost
            }
            Ok(Ok(resp)) => {
                self.sh.count(op, Outcome::Ok, Some((took, under_gc)));
                Reply::Ok(resp.into_inner())
            }
            Ok(Err(s)) if expected.contains(&s.code()) => {
                self.sh.count(op, Outcome::Refused, Some((took, under_gc)));
                Reply::Refused
            }
            // The disk is full (the driver's ballast): any call may fail saying so, and
            // then nothing may have changed.
            Ok(Err(s)) if self.sh.disk_full.load(Ordering::Acquire) && no_space(&s) => {
                self.sh.no_space();
                self.sh.count(op, Outcome::Refused, Some((took, under_gc)));
                Reply::Refused
            }
            // The `chaos` guest in front of `copy` died in this change: the call failed,
            // so nothing may have changed (the host removed what `copy` made, or asked
            // it whether a commit took place and finished it instead of failing).
            Ok(Err(s)) if self.sh.chaos && CHAOS_OPS.contains(&op) && guest_died(&s) => {
                self.sh.guest_died();
                self.sh.count(op, Outcome::Refused, Some((took, under_gc)));
                Reply::Refused
            }
            Ok(Err(s)) => {
                if !self.died_since().await {
                    self.violation(format!(
                        "{op} {what}: unexpected {:?} on a live daemon: {}",
                        s.code(),
                        s.message()
                    ));
                }
                self.sh.count(op, Outcome::Lost, None);
                Reply::Lost
            }
        }
    }

    /// Whether the daemon this step started with has died (waiting briefly for the
    /// driver to notice, which it does as soon as the child exits).
    async fn died_since(&self) -> bool {
        let mut rx = self.sh.conn.clone();
        let generation = self.generation;
        if rx.borrow().generation != generation {
            return true;
        }
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|c| c.generation != generation))
            .await
            .is_ok()
    }

    fn model(&self) -> std::sync::MutexGuard<'_, Model> {
        self.sh.model()
    }

    fn pick_sn(&mut self) -> String {
        let sns = &self.sh.snapshotters;
        sns[self.rng.below(sns.len() as u64) as usize].clone()
    }

    /// A random settled snapshot of this client's under its current lease.
    fn pick_own(&mut self, kinds: &[Kind]) -> Option<(SnapId, Record)> {
        let lease = self.lease.clone()?;
        let picked: Vec<(SnapId, Record)> = self
            .model()
            .snaps
            .iter()
            .filter(|(k, r)| {
                r.owner == self.id
                    && k.ns == self.ns
                    && r.lease == lease
                    && !r.busy
                    && !r.pending
                    && r.doubt.is_none()
                    && kinds.contains(&r.kind)
            })
            .map(|(k, r)| (k.clone(), r.clone()))
            .collect();
        if picked.is_empty() {
            return None;
        }
        Some(picked[self.rng.below(picked.len() as u64) as usize].clone())
    }

    /// A random settled committed snapshot in `sn` of this namespace, anyone's, held by
    /// a live lease with no expiry, in a chain short enough to grow.
    fn pick_committed(&mut self, sn: &str) -> Option<(SnapId, Record)> {
        let m = self.model();
        let picked: Vec<(SnapId, Record)> = m
            .snaps
            .iter()
            .filter(|(k, r)| {
                k.ns == self.ns
                    && k.sn == sn
                    && r.kind == Kind::Committed
                    && !r.pending
                    && r.doubt.is_none()
                    && !(r.busy && r.owner == self.id)
                    && m.leases
                        .get(&(k.ns.clone(), r.lease.clone()))
                        .is_some_and(|l| l.state == LeaseState::Live && l.expire.is_none())
                    && m.depth(k) < MAX_DEPTH
            })
            .map(|(k, r)| (k.clone(), r.clone()))
            .collect();
        drop(m);
        if picked.is_empty() {
            return None;
        }
        Some(picked[self.rng.below(picked.len() as u64) as usize].clone())
    }

    fn labels(&mut self, tag: bool) -> BTreeMap<String, String> {
        let mut l = BTreeMap::from([
            (OWNER.to_owned(), self.me()),
            ("soak.n".to_owned(), self.n.to_string()),
        ]);
        if tag && self.rng.chance(30) {
            l.insert(TAG.to_owned(), format!("t{}", self.n));
        }
        l
    }

    async fn create_lease(&mut self) {
        let id = self.fresh("L");
        let msg = lpb::CreateRequest { id: id.clone(), labels: HashMap::new() };
        let mut l = self.leases_client();
        let r = self.call("lease create", &id, &[], l.create(self.req(msg, None))).await;
        if let Reply::Ok(_) = r {
            self.model().leases.insert(
                (self.ns.clone(), id.clone()),
                LeaseRec { state: LeaseState::Live, expire: None },
            );
            self.lease = Some(id);
        }
        // Lost: that lease may exist, holding nothing; the next step makes another.
    }

    async fn rotate_lease(&mut self) {
        let Some(id) = self.lease.clone() else { return };
        let key = (self.ns.clone(), id.clone());
        if let Some(l) = self.model().leases.get_mut(&key) {
            l.state = LeaseState::DeleteInDoubt;
        }
        let sync = self.rng.chance(30);
        let msg = lpb::DeleteRequest { id: id.clone(), sync };
        let mut l = self.leases_client();
        let r = self.call("lease delete", &id, &[], l.delete(self.req(msg, None))).await;
        let state = match r {
            Reply::Ok(()) => LeaseState::Deleted,
            Reply::Refused => LeaseState::Live,
            Reply::Lost => LeaseState::DeleteInDoubt,
        };
        if let Some(l) = self.model().leases.get_mut(&key) {
            l.state = state;
        }
        if state != LeaseState::Live {
            self.lease = None;
        }
    }

    /// A prepare under a lease that expires in a few seconds; nothing else touches it.
    async fn expiring(&mut self) {
        let id = self.fresh("E");
        let expire = SystemTime::now() + Duration::from_secs(3 + self.rng.below(6));
        let labels = HashMap::from([(
            "containerd.io/gc.expire".to_owned(),
            humantime::format_rfc3339_seconds(expire).to_string(),
        )]);
        let msg = lpb::CreateRequest { id: id.clone(), labels };
        let mut l = self.leases_client();
        let r = self.call("lease (expiring)", &id, &[], l.create(self.req(msg, None))).await;
        let Reply::Ok(_) = r else { return };
        self.model().leases.insert(
            (self.ns.clone(), id.clone()),
            LeaseRec { state: LeaseState::Live, expire: Some(expire) },
        );
        let sn = self.pick_sn();
        let key = self.fresh("e");
        let labels = self.labels(false);
        self.prepare_as(sn, key, String::new(), labels, id, None).await;
    }

    async fn prepare(&mut self) {
        let Some(lease) = self.lease.clone() else { return };
        let sn = self.pick_sn();
        let parent = if self.rng.chance(60) { self.pick_committed(&sn) } else { None };
        let key = self.fresh("a");
        let labels = self.labels(true);
        let parent_owner = parent.as_ref().map(|(_, r)| r.owner);
        let parent = parent.map(|(k, _)| k.key).unwrap_or_default();
        self.prepare_as(sn, key, parent, labels, lease, parent_owner).await;
    }

    /// Prepares `key` and writes a file into it.
    async fn prepare_as(
        &mut self,
        sn: String,
        key: String,
        parent: String,
        labels: BTreeMap<String, String>,
        lease: String,
        parent_owner: Option<usize>,
    ) {
        let id = SnapId { ns: self.ns.clone(), sn: sn.clone(), key: key.clone() };
        self.model().snaps.insert(
            id.clone(),
            Record {
                kind: Kind::Active,
                parent: parent.clone(),
                labels: labels.clone(),
                files: BTreeMap::new(),
                lease: lease.clone(),
                owner: self.id,
                busy: true,
                doubt: Some(Doubt::Created),
                pending: true,
            },
        );
        let msg = spb::PrepareSnapshotRequest {
            snapshotter: sn,
            key,
            parent: parent.clone(),
            labels: labels.into_iter().collect(),
        };
        let mut s = self.snapshots();
        // Someone else's parent may have been removed since the model said so.
        let expected: &[Code] =
            if parent_owner.is_some_and(|o| o != self.id) { &[Code::NotFound] } else { &[] };
        let r = self
            .call("prepare", &id.to_string(), expected, s.prepare(self.req(msg, Some(&lease))))
            .await;
        match r {
            Reply::Ok(resp) => {
                let file = self.write_file(&id, &resp.mounts);
                let mut m = self.model();
                if let Some(rec) = m.snaps.get_mut(&id) {
                    if let Some((name, digest)) = file {
                        rec.files.insert(name, digest);
                    }
                    rec.busy = false;
                    rec.pending = false;
                    rec.doubt = None;
                }
            }
            Reply::Refused => {
                self.model().snaps.remove(&id);
            }
            Reply::Lost => {
                if let Some(rec) = self.model().snaps.get_mut(&id) {
                    rec.busy = false;
                    rec.pending = false;
                }
            }
        }
    }

    /// Writes a file of random bytes into an active snapshot through its mounts.
    fn write_file(&mut self, id: &SnapId, mounts: &[Mount]) -> Option<(String, Digest)> {
        let Some(dir) = writable_dir(mounts) else {
            self.violation(format!("prepare {id}: no writable directory in the mounts {mounts:?}"));
            return None;
        };
        let name = format!("f-{}.dat", id.key);
        let size = 64 + self.rng.below(4096) as usize;
        let bytes = self.rng.bytes(size);
        if let Err(e) = std::fs::write(dir.join(&name), &bytes) {
            if e.kind() == std::io::ErrorKind::StorageFull
                && self.sh.disk_full.load(Ordering::Acquire)
            {
                // The disk is full for everyone: no file, and no part of one.
                let _ = std::fs::remove_file(dir.join(&name));
                return None;
            }
            self.violation(format!("prepare {id}: write {}: {e}", dir.join(&name).display()));
            return None;
        }
        Some((name, Digest::of(&bytes)))
    }

    async fn commit(&mut self) {
        let Some((active, rec)) = self.pick_own(&[Kind::Active]) else {
            return self.prepare().await;
        };
        let lease = rec.lease.clone();
        let name = self.fresh("c");
        let labels = self.labels(true);
        let id = SnapId { key: name.clone(), ..active.clone() };
        {
            let mut m = self.model();
            if let Some(a) = m.snaps.get_mut(&active) {
                a.busy = true;
            }
            m.snaps.insert(
                id.clone(),
                Record {
                    kind: Kind::Committed,
                    parent: rec.parent.clone(),
                    labels: labels.clone(),
                    files: rec.files.clone(),
                    lease: lease.clone(),
                    owner: self.id,
                    busy: true,
                    doubt: Some(Doubt::CommittedFrom(active.key.clone())),
                    pending: true,
                },
            );
        }
        let msg = spb::CommitSnapshotRequest {
            snapshotter: id.sn.clone(),
            name,
            key: active.key.clone(),
            labels: labels.into_iter().collect(),
            parent: String::new(),
        };
        let mut s = self.snapshots();
        let r =
            self.call("commit", &id.to_string(), &[], s.commit(self.req(msg, Some(&lease)))).await;
        let mut m = self.model();
        match r {
            Reply::Ok(()) => {
                m.snaps.remove(&active);
                if let Some(c) = m.snaps.get_mut(&id) {
                    c.busy = false;
                    c.pending = false;
                    c.doubt = None;
                }
            }
            Reply::Refused => {
                m.snaps.remove(&id);
                if let Some(a) = m.snaps.get_mut(&active) {
                    a.busy = false;
                }
            }
            Reply::Lost => {
                if let Some(c) = m.snaps.get_mut(&id) {
                    c.busy = false;
                    c.pending = false;
                }
                if let Some(a) = m.snaps.get_mut(&active) {
                    a.busy = false;
                    a.doubt = Some(Doubt::CommitSource(id.key.clone()));
                }
            }
        }
    }

    async fn view(&mut self) {
        let Some(lease) = self.lease.clone() else { return };
        let sn = self.pick_sn();
        let Some((parent, prec)) = self.pick_committed(&sn) else { return };
        let key = self.fresh("v");
        let labels = self.labels(false);
        let id = SnapId { key: key.clone(), ..parent.clone() };
        self.model().snaps.insert(
            id.clone(),
            Record {
                kind: Kind::View,
                parent: parent.key.clone(),
                labels: labels.clone(),
                files: BTreeMap::new(),
                lease: lease.clone(),
                owner: self.id,
                busy: true,
                doubt: Some(Doubt::Created),
                pending: true,
            },
        );
        let msg = spb::ViewSnapshotRequest {
            snapshotter: sn,
            key,
            parent: parent.key.clone(),
            labels: labels.into_iter().collect(),
        };
        let expected: &[Code] = if prec.owner != self.id { &[Code::NotFound] } else { &[] };
        let mut s = self.snapshots();
        let r =
            self.call("view", &id.to_string(), expected, s.view(self.req(msg, Some(&lease)))).await;
        match r {
            Reply::Ok(resp) => {
                let want = self.model().expected_files(&parent);
                if let Err(e) = verify_files(&resp.mounts, &want) {
                    self.violation(format!("view {id} of {parent}: {e}"));
                }
                let mut m = self.model();
                if let Some(rec) = m.snaps.get_mut(&id) {
                    rec.busy = false;
                    rec.pending = false;
                    rec.doubt = None;
                }
            }
            Reply::Refused => {
                self.model().snaps.remove(&id);
            }
            Reply::Lost => {
                if let Some(rec) = self.model().snaps.get_mut(&id) {
                    rec.busy = false;
                    rec.pending = false;
                }
            }
        }
    }

    async fn remove(&mut self) {
        let Some((id, rec)) = self.pick_own(&[Kind::Active, Kind::View, Kind::Committed]) else {
            return;
        };
        let children = {
            let mut m = self.model();
            let c = m.settled_children(&id);
            if let Some(r) = m.snaps.get_mut(&id) {
                r.busy = true;
            }
            c
        };
        let msg = spb::RemoveSnapshotRequest { snapshotter: id.sn.clone(), key: id.key.clone() };
        let mut s = self.snapshots();
        let expected: &[Code] =
            if rec.kind == Kind::Committed { &[Code::FailedPrecondition] } else { &[] };
        let r = self.call("remove", &id.to_string(), expected, s.remove(self.req(msg, None))).await;
        let mut m = self.model();
        match r {
            Reply::Ok(()) => {
                m.snaps.remove(&id);
                // A child settled before and after the call existed throughout it.
                let still: Vec<SnapId> =
                    m.settled_children(&id).intersection(&children).cloned().collect();
                drop(m);
                if !still.is_empty() {
                    self.violation(format!(
                        "remove {id}: succeeded though {still:?} have it as parent"
                    ));
                }
            }
            Reply::Refused => {
                if let Some(r) = m.snaps.get_mut(&id) {
                    r.busy = false;
                }
            }
            Reply::Lost => {
                if let Some(r) = m.snaps.get_mut(&id) {
                    r.busy = false;
                    r.doubt = Some(Doubt::Removed);
                }
            }
        }
    }

    async fn stat(&mut self) {
        let Some((id, rec)) = self.pick_own(&[Kind::Active, Kind::View, Kind::Committed]) else {
            return;
        };
        let msg = spb::StatSnapshotRequest { snapshotter: id.sn.clone(), key: id.key.clone() };
        let mut s = self.snapshots();
        let r = self.call("stat", &id.to_string(), &[], s.stat(self.req(msg, None))).await;
        if let Reply::Ok(resp) = r
            && let Err(e) = same_shape(&rec, resp.info.as_ref())
        {
            self.violation(format!("stat {id}: {e}"));
        }
    }

    async fn update(&mut self) {
        let Some((id, rec)) = self.pick_own(&[Kind::Active, Kind::View, Kind::Committed]) else {
            return;
        };
        let value = format!("u{}", self.n);
        self.n += 1;
        let mut new = rec.labels.clone();
        new.insert("soak.u".into(), value.clone());
        if let Some(r) = self.model().snaps.get_mut(&id) {
            r.busy = true;
        }
        let msg = spb::UpdateSnapshotRequest {
            snapshotter: id.sn.clone(),
            info: Some(spb::Info {
                name: id.key.clone(),
                labels: HashMap::from([("soak.u".to_owned(), value)]),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask { paths: vec!["labels.soak.u".into()] }),
        };
        let mut s = self.snapshots();
        let r = self.call("update", &id.to_string(), &[], s.update(self.req(msg, None))).await;
        let mut m = self.model();
        let Some(r2) = m.snaps.get_mut(&id) else { return };
        r2.busy = false;
        match r {
            Reply::Ok(resp) => {
                r2.labels = new.clone();
                let back = resp.info.map(|i| ours(&i.labels)).unwrap_or_default();
                drop(m);
                if back != new {
                    self.violation(format!(
                        "update {id}: labels came back {back:?}, wanted {new:?}"
                    ));
                }
            }
            Reply::Refused => {}
            Reply::Lost => {
                r2.doubt = Some(Doubt::Updated(rec.labels.clone()));
                r2.labels = new;
            }
        }
    }

    async fn list(&mut self, filtered: bool) {
        let sn = self.pick_sn();
        let me = self.me();
        let filters = if filtered {
            if self.rng.chance(50) {
                vec![format!("labels.\"{OWNER}\"=={me}")]
            } else {
                vec![format!("kind==committed,labels.\"{OWNER}\"=={me}")]
            }
        } else {
            Vec::new()
        };
        let committed_only = filters.first().is_some_and(|f| f.starts_with("kind=="));
        let msg = spb::ListSnapshotsRequest { snapshotter: sn.clone(), filters };
        let op = if filtered { "list (filtered)" } else { "list" };
        let mut s = self.snapshots();
        let Reply::Ok(mut stream) = self.call(op, &sn, &[], s.list(self.req(msg, None))).await
        else {
            return;
        };
        let mut got = BTreeMap::new();
        loop {
            let Ok(page) = tokio::time::timeout(CALL_TIMEOUT, stream.message()).await else {
                self.violation(format!("{op} {sn}: the stream stalled for {CALL_TIMEOUT:?}"));
                return;
            };
            match page {
                Ok(Some(page)) => {
                    for i in page.info {
                        got.insert(i.name.clone(), i);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    if !self.died_since().await {
                        self.violation(format!("{op} {sn}: stream failed on a live daemon: {e}"));
                    }
                    return;
                }
            }
        }
        if !filtered {
            return;
        }
        let Some(lease) = self.lease.clone() else { return };
        let m = self.model();
        let mut problems = Vec::new();
        for (k, r) in &m.snaps {
            let settled_mine = r.owner == self.id
                && k.ns == self.ns
                && k.sn == sn
                && r.lease == lease
                && !r.pending
                && r.doubt.is_none()
                && (!committed_only || r.kind == Kind::Committed);
            if settled_mine && !got.contains_key(&k.key) {
                problems.push(format!("{k} is missing"));
            }
        }
        for (name, info) in &got {
            let id = SnapId { ns: self.ns.clone(), sn: sn.clone(), key: name.clone() };
            match m.snaps.get(&id) {
                Some(r) if r.owner == self.id => {
                    if committed_only && Kind::from_wire(info.kind) != Some(Kind::Committed) {
                        problems.push(format!("{id} is listed as kind {}", info.kind));
                    }
                }
                _ => problems.push(format!("{id} is listed but not this client's")),
            }
        }
        drop(m);
        if !problems.is_empty() {
            self.violation(format!("{op} {sn}: {}", problems.join("; ")));
        }
    }

    async fn usage(&mut self) {
        let Some((id, _)) = self.pick_own(&[Kind::Active, Kind::View, Kind::Committed]) else {
            return;
        };
        let msg = spb::UsageRequest { snapshotter: id.sn.clone(), key: id.key.clone() };
        let mut s = self.snapshots();
        if let Reply::Ok(u) =
            self.call("usage", &id.to_string(), &[], s.usage(self.req(msg, None))).await
            && (u.size < 0 || u.inodes < 0)
        {
            self.violation(format!("usage {id}: negative {u:?}"));
        }
    }

    async fn mounts(&mut self) {
        let Some((id, _)) = self.pick_own(&[Kind::Active, Kind::View]) else { return };
        let msg = spb::MountsRequest { snapshotter: id.sn.clone(), key: id.key.clone() };
        let mut s = self.snapshots();
        if let Reply::Ok(resp) =
            self.call("mounts", &id.to_string(), &[], s.mounts(self.req(msg, None))).await
        {
            let want = self.model().expected_files(&id);
            if let Err(e) = verify_files(&resp.mounts, &want) {
                self.violation(format!("mounts {id}: {e}"));
            }
        }
    }

    /// A prepare on `copy` with a label its policy denies: refused, invalid-argument.
    async fn denied(&mut self) {
        if !self.sh.snapshotters.iter().any(|s| s == "copy") || !self.sh.policy {
            return self.stat().await;
        }
        let Some(lease) = self.lease.clone() else { return };
        let key = self.fresh("x");
        let msg = spb::PrepareSnapshotRequest {
            snapshotter: "copy".into(),
            key: key.clone(),
            parent: String::new(),
            labels: HashMap::from([(FORBIDDEN.to_owned(), "1".to_owned())]),
        };
        let mut s = self.snapshots();
        let what = format!("{}/copy/{key}", self.ns);
        let r = self
            .call(
                "prepare (denied label)",
                &what,
                &[Code::InvalidArgument],
                s.prepare(self.req(msg, Some(&lease))),
            )
            .await;
        if let Reply::Ok(_) = r {
            self.violation(format!("prepare {what} with {FORBIDDEN}: the policy let it through"));
            let id = SnapId { ns: self.ns.clone(), sn: "copy".into(), key };
            let labels = BTreeMap::from([(FORBIDDEN.to_owned(), "1".to_owned())]);
            self.model().snaps.insert(
                id,
                Record {
                    kind: Kind::Active,
                    parent: String::new(),
                    labels,
                    files: BTreeMap::new(),
                    lease,
                    owner: self.id,
                    busy: false,
                    doubt: None,
                    pending: false,
                },
            );
        }
    }

    /// A client that stops reading a List stream midway: it takes the first page and
    /// leaves the rest unread for [`STALL`], on a task of its own so that neither the
    /// other clients nor the checker wait for it. Meanwhile it asks for a collection,
    /// which must end within [`UNDER_STALL`]: a List holding a lock, a pool slot or a
    /// transaction that writers or the collector need would stall it. The stream is
    /// then dropped unread.
    fn stalled_list(&mut self) {
        let sn = self.pick_sn();
        let msg = spb::ListSnapshotsRequest { snapshotter: sn.clone(), filters: Vec::new() };
        let req = self.req(msg, None);
        let (sh, client, id) = (self.sh.clone(), self.client.clone(), self.id);
        tokio::spawn(async move {
            let mut s = client.snapshots();
            let opened = tokio::time::timeout(CALL_TIMEOUT, s.list(req)).await;
            let Ok(Ok(stream)) = opened else {
                sh.count(STALLED_LIST, Outcome::Lost, None);
                return;
            };
            let mut stream = stream.into_inner();
            if !matches!(tokio::time::timeout(CALL_TIMEOUT, stream.message()).await, Ok(Ok(_))) {
                sh.count(STALLED_LIST, Outcome::Lost, None);
                return;
            }
            let started = Instant::now();
            let msg = wasnap_daemon::proto::admin::CollectRequest {
                dry_run: false,
                ..Default::default()
            };
            let mut a = client.admin();
            match tokio::time::timeout(UNDER_STALL, a.collect(tonic::Request::new(msg))).await {
                Ok(Ok(_)) => {}
                // The daemon died or restarts: nothing to say about the stall.
                Ok(Err(_)) => {
                    sh.count(STALLED_LIST, Outcome::Lost, None);
                    return;
                }
                Err(_) => {
                    sh.violation(format!(
                        "client {id}: a collection took over {UNDER_STALL:?} while a List \
                         stream of {sn} was left unread"
                    ));
                    sh.count(STALLED_LIST, Outcome::Lost, None);
                    return;
                }
            }
            tokio::time::sleep(STALL.saturating_sub(started.elapsed())).await;
            drop(stream);
            sh.count(STALLED_LIST, Outcome::Ok, None);
        });
    }

    async fn gc(&mut self) {
        let client = self.client.clone();
        self.sh.gc_running.fetch_add(1, Ordering::AcqRel);
        let msg =
            wasnap_daemon::proto::admin::CollectRequest { dry_run: false, ..Default::default() };
        let mut a = client.admin();
        let r = self.call("gc (on demand)", "", &[], a.collect(tonic::Request::new(msg))).await;
        self.sh.gc_running.fetch_sub(1, Ordering::AcqRel);
        if let Reply::Ok(report) = r {
            match serde_json::from_str::<wasnap::gc::GcReport>(&report.json) {
                Ok(rep) => self.sh.gc_done(&rep),
                Err(e) => self.violation(format!("gc: undecodable report: {e}")),
            }
        }
    }
}

/// How a call ended, for the tally.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    Ok,
    Refused,
    Lost,
}

/// The labels the soak sets (others, if the daemon adds any, are not compared).
pub fn ours(labels: &HashMap<String, String>) -> BTreeMap<String, String> {
    labels
        .iter()
        .filter(|(k, _)| k.starts_with("soak.") || k.starts_with("containerd.io/snapshot/soak."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Whether `info` shows `rec`'s kind, parent and labels.
pub fn same_shape(rec: &Record, info: Option<&spb::Info>) -> Result<(), String> {
    let Some(info) = info else { return Err("no info in the reply".into()) };
    let kind = Kind::from_wire(info.kind);
    let labels = ours(&info.labels);
    if kind != Some(rec.kind) || info.parent != rec.parent || labels != rec.labels {
        return Err(format!(
            "shows kind {:?}, parent {:?}, labels {labels:?}; made as {:?}, parent {:?}, labels {:?}",
            kind, info.parent, rec.kind, rec.parent, rec.labels
        ));
    }
    Ok(())
}

/// Where to write into an active snapshot's mounts: a read-write bind's source, or an
/// overlay's upper directory.
pub fn writable_dir(mounts: &[Mount]) -> Option<PathBuf> {
    let [m] = mounts else { return None };
    match m.r#type.as_str() {
        "bind" | "rbind" if !m.options.iter().any(|o| o == "ro") => Some(PathBuf::from(&m.source)),
        "overlay" => m.options.iter().find_map(|o| o.strip_prefix("upperdir=")).map(PathBuf::from),
        _ => None,
    }
}

/// The directories a mount shows, top first: a bind's source, or an overlay's upper
/// then lower directories (the soak never deletes files, so no whiteouts matter).
fn layers(mounts: &[Mount]) -> Result<Vec<PathBuf>, String> {
    let [m] = mounts else { return Err(format!("{} mounts, expected one", mounts.len())) };
    match m.r#type.as_str() {
        "bind" | "rbind" => Ok(vec![PathBuf::from(&m.source)]),
        "overlay" => {
            let mut dirs = Vec::new();
            if let Some(u) = m.options.iter().find_map(|o| o.strip_prefix("upperdir=")) {
                dirs.push(PathBuf::from(u));
            }
            for o in &m.options {
                if let Some(l) = o.strip_prefix("lowerdir=") {
                    dirs.extend(l.split(':').map(PathBuf::from));
                }
            }
            Ok(dirs)
        }
        other => Err(format!("mount type {other:?}")),
    }
}

/// Reads every file of `want` through `mounts` and compares digests.
pub fn verify_files(mounts: &[Mount], want: &BTreeMap<String, Digest>) -> Result<(), String> {
    let dirs = layers(mounts)?;
    let mut problems = Vec::new();
    for (name, digest) in want {
        let found = dirs.iter().map(|d| d.join(name)).find(|p| p.exists());
        match found.as_deref().map(read_digest) {
            None => problems.push(format!("{name} is missing (looked in {dirs:?})")),
            Some(Err(e)) => problems.push(format!("{name}: {e}")),
            Some(Ok(d)) if d != *digest => {
                problems.push(format!("{name} has {} not {}", d.hex(), digest.hex()));
            }
            Some(Ok(_)) => {}
        }
    }
    if problems.is_empty() { Ok(()) } else { Err(problems.join("; ")) }
}

fn read_digest(p: &Path) -> Result<Digest, String> {
    std::fs::read(p).map(|b| Digest::of(&b)).map_err(|e| format!("read {}: {e}", p.display()))
}
