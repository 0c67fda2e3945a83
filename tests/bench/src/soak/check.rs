//! The invariant checker. It runs with every client paused (the driver holds the pause
//! lock for writing, so no call is in flight and the model is exact but for the calls
//! a daemon death cut short), after every restart, at intervals and at the end. It:
//!
//! 1. settles the leases whose deletion lost its reply, finds every live lease with
//!    no expiry still listed, and deletes what a check cut short by a death left (its
//!    lease, whose views hold their parents);
//! 2. settles every [`Doubt`] from what `stat` shows, accepting any outcome the call
//!    could have had, and reporting a half state (a commit whose active snapshot and
//!    committed snapshot both exist, or neither) or a shape no outcome gives;
//! 3. runs a collection (the admin `Collect`) and then lists every namespace and
//!    snapshotter: every snapshot a live lease holds (itself or through a child) must
//!    exist with the kind, parent and labels it was made with; nothing that no lease
//!    holds may have survived the collection; nothing may exist that no client made
//!    (leases expiring within a margin of the collection may go either way);
//! 4. runs `gc --check` (the admin `Check`): no backend snapshot without a record, no
//!    record without its backend snapshot, nothing damaged;
//! 5. asks the `mounts` of every held active snapshot and view and reads every file
//!    written into its chain through them (digests compared), and does the same for
//!    committed snapshots through a view of its own (a sample of them, all at the end);
//! 6. checks that deleted and expired leases are gone after the collection.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, SystemTime};

use tonic::Code;
use wasnap_daemon::client::{Client, request};
use wasnap_daemon::proto::admin as apb;
use wasnap_daemon::proto::leases as lpb;
use wasnap_daemon::proto::snapshots as spb;

use super::Shared;
use super::model::{Doubt, Hold, Kind, LeaseState, Model, SnapId};
use super::ops::{ours, same_shape, verify_files};
use super::rng::Rng;

/// A call of the checker failed in a way that may be the daemon dying; the driver
/// decides.
#[derive(Debug)]
pub struct Failed {
    pub what: String,
    pub status: tonic::Status,
}

/// What one check covered.
#[derive(Debug, Default, Clone, Copy)]
pub struct Covered {
    pub snapshots: usize,
    pub contents: usize,
}

/// One pass of the checker; `content_sample` committed snapshots get their content
/// read (usize::MAX: all).
pub async fn check(
    client: &Client,
    sh: &Shared,
    stage: &str,
    content_sample: usize,
    rng: &mut Rng,
    counter: &mut u64,
) -> Result<Covered, Failed> {
    // The model goes back to the clients however the check ends, even if the driver
    // drops it half way (the daemon died under it).
    let mut held = Restore { sh, model: std::mem::take(&mut *sh.model()) };
    let mut c = Checker { client, sh, stage, rng, counter, covered: Covered::default() };
    let r = c.run(&mut held.model, content_sample).await;
    r.map(|()| c.covered)
}

/// Puts the model back into [`Shared`] when dropped.
struct Restore<'a> {
    sh: &'a Shared,
    model: Model,
}

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        *self.sh.model() = std::mem::take(&mut self.model);
    }
}

struct Checker<'a> {
    client: &'a Client,
    sh: &'a Shared,
    stage: &'a str,
    rng: &'a mut Rng,
    counter: &'a mut u64,
    covered: Covered,
}

fn failed(what: impl Into<String>) -> impl FnOnce(tonic::Status) -> Failed {
    let what = what.into();
    move |status| Failed { what, status }
}

/// A definite answer of a live daemon (as opposed to a lost connection).
fn definite(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        Code::NotFound | Code::FailedPrecondition | Code::InvalidArgument | Code::AlreadyExists
    )
}

impl Checker<'_> {
    fn violation(&self, what: String) {
        self.sh.violation(format!("check ({}): {what}", self.stage));
    }

    async fn run(&mut self, model: &mut Model, content_sample: usize) -> Result<(), Failed> {
        self.settle_leases(model).await?;
        self.settle_doubts(model).await?;
        let t0 = SystemTime::now();
        let msg = apb::CollectRequest { dry_run: false, ..Default::default() };
        let report = self.client.admin().collect(tonic::Request::new(msg)).await;
        let report = report.map_err(failed("collect"))?.into_inner();
        let t1 = SystemTime::now();
        match serde_json::from_str::<wasnap::gc::GcReport>(&report.json) {
            Ok(r) => {
                if !r.failed.is_empty() {
                    self.violation(format!("collection failed in part: {:?}", r.failed));
                }
                self.sh.gc_done(&r);
            }
            Err(e) => self.violation(format!("undecodable collection report: {e}")),
        }
        let margin = t1.duration_since(t0).unwrap_or_default() + Duration::from_secs(3);
        self.compare(model, t0, margin).await?;
        self.backend_check().await?;
        self.contents(model, content_sample).await?;
        self.leases_after(model, t0, margin).await
    }

    async fn list_leases(&self, ns: &str) -> Result<HashSet<String>, Failed> {
        let msg = lpb::ListRequest { filters: Vec::new() };
        let r = self.client.leases().list(request(msg, Some(ns), None)).await;
        let r = r.map_err(failed(format!("list leases in {ns}")))?.into_inner();
        Ok(r.leases.into_iter().map(|l| l.id).collect())
    }

    async fn settle_leases(&mut self, model: &mut Model) -> Result<(), Failed> {
        for ns in &self.sh.namespaces {
            let listed = self.list_leases(ns).await?;
            // A check a death cut short left its lease, and the views under it hold
            // their parents: they go now, for the collection below to take.
            for id in listed.iter().filter(|id| id.starts_with("chk-")) {
                let msg = lpb::DeleteRequest { id: id.clone(), sync: false };
                let r = self.client.leases().delete(request(msg, Some(ns), None)).await;
                r.map_err(failed(format!("delete the checker's old lease {ns}/{id}")))?;
            }
            for ((lns, id), l) in model.leases.iter_mut() {
                if lns != ns {
                    continue;
                }
                let present = listed.contains(id);
                match l.state {
                    LeaseState::DeleteInDoubt => {
                        l.state = if present { LeaseState::Live } else { LeaseState::Deleted };
                    }
                    LeaseState::Live if l.expire.is_none() && !present => {
                        self.violation(format!("lease {ns}/{id} is lost: created, never deleted"));
                        l.state = LeaseState::Deleted;
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    async fn stat(&self, id: &SnapId) -> Result<Option<spb::Info>, Failed> {
        let msg = spb::StatSnapshotRequest { snapshotter: id.sn.clone(), key: id.key.clone() };
        match self.client.snapshots().stat(request(msg, Some(&id.ns), None)).await {
            Ok(r) => Ok(r.into_inner().info),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(Failed { what: format!("stat {id}"), status: s }),
        }
    }

    async fn settle_doubts(&mut self, model: &mut Model) -> Result<(), Failed> {
        let doubts: Vec<(SnapId, Doubt)> = model
            .snaps
            .iter()
            .filter_map(|(k, r)| r.doubt.clone().map(|d| (k.clone(), d)))
            .collect();
        for (id, doubt) in doubts {
            match doubt {
                // Settled with its commit, unless that record is gone from the model.
                Doubt::CommitSource(name) => {
                    let partner = SnapId { key: name, ..id.clone() };
                    let paired = model.snaps.get(&partner).is_some_and(
                        |r| matches!(&r.doubt, Some(Doubt::CommittedFrom(k)) if *k == id.key),
                    );
                    if !paired {
                        let info = self.stat(&id).await?;
                        match info {
                            None => {
                                model.snaps.remove(&id);
                            }
                            Some(info) => {
                                if let Some(rec) = model.snaps.get_mut(&id) {
                                    rec.doubt = None;
                                    if let Err(e) = same_shape(rec, Some(&info)) {
                                        self.violation(format!("{id} (commit in doubt): {e}"));
                                    }
                                }
                            }
                        }
                    }
                }
                Doubt::Created | Doubt::Removed | Doubt::Updated(_) => {
                    let info = self.stat(&id).await?;
                    let Some(rec) = model.snaps.get_mut(&id) else { continue };
                    match (info, &doubt) {
                        (None, Doubt::Updated(_)) => rec.doubt = None, // compare reports it
                        (None, _) => {
                            model.snaps.remove(&id);
                        }
                        (Some(info), Doubt::Updated(old)) => {
                            let labels = ours(&info.labels);
                            if labels == *old {
                                rec.labels = labels;
                            } else if labels != rec.labels {
                                self.violation(format!(
                                    "{id}: an update lost its reply; labels are {labels:?}, \
                                     neither the old {old:?} nor the new {:?}",
                                    rec.labels
                                ));
                                rec.labels = labels;
                            }
                            rec.doubt = None;
                        }
                        (Some(info), _) => {
                            if let Err(e) = same_shape(rec, Some(&info)) {
                                self.violation(format!("{id} ({doubt:?} in doubt): {e}"));
                            }
                            rec.doubt = None;
                        }
                    }
                }
                Doubt::CommittedFrom(from) => {
                    let src = SnapId { key: from.clone(), ..id.clone() };
                    let name = self.stat(&id).await?;
                    let active = self.stat(&src).await?;
                    let lease = model.snaps.get(&id).map(|r| r.lease.clone()).unwrap_or_default();
                    let held = model.lease_hold(&id.ns, &lease, SystemTime::now(), Duration::ZERO)
                        != Hold::Released;
                    match (&name, &active) {
                        (Some(_), None) => {
                            model.snaps.remove(&src);
                        }
                        (None, Some(_)) => {
                            model.snaps.remove(&id);
                        }
                        (None, None) if !held => {
                            model.snaps.remove(&id);
                            model.snaps.remove(&src);
                        }
                        _ => {
                            self.violation(format!(
                                "half commit of {src} as {}: the committed snapshot {}, the active \
                                 one {} (a lost commit must leave exactly one)",
                                id.key,
                                if name.is_some() { "exists" } else { "is missing" },
                                if active.is_some() { "exists" } else { "is missing" },
                            ));
                            if name.is_none() {
                                model.snaps.remove(&id);
                            }
                            if active.is_none() {
                                model.snaps.remove(&src);
                            }
                        }
                    }
                    for (k, info) in [(&id, name), (&src, active)] {
                        if let Some(rec) = model.snaps.get_mut(k) {
                            rec.doubt = None;
                            if let Err(e) = same_shape(rec, info.as_ref()) {
                                self.violation(format!("{k} (commit in doubt): {e}"));
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    async fn list_all(&self) -> Result<BTreeMap<SnapId, spb::Info>, Failed> {
        let mut out = BTreeMap::new();
        for ns in &self.sh.namespaces {
            for sn in &self.sh.snapshotters {
                let msg =
                    spb::ListSnapshotsRequest { snapshotter: sn.clone(), filters: Vec::new() };
                let what = format!("list {ns}/{sn}");
                let r = self.client.snapshots().list(request(msg, Some(ns), None)).await;
                let mut stream = r.map_err(failed(what.clone()))?.into_inner();
                while let Some(page) = stream.message().await.map_err(failed(what.clone()))? {
                    for i in page.info {
                        let id = SnapId { ns: ns.clone(), sn: sn.clone(), key: i.name.clone() };
                        out.insert(id, i);
                    }
                }
            }
        }
        Ok(out)
    }

    async fn compare(
        &mut self,
        model: &mut Model,
        t0: SystemTime,
        margin: Duration,
    ) -> Result<(), Failed> {
        let listed = self.list_all().await?;
        let holds = model.holds(t0, margin);
        let mut gone = Vec::new();
        for (id, rec) in &model.snaps {
            self.covered.snapshots += 1;
            let hold = holds.get(id).copied().unwrap_or(Hold::Released);
            match (hold, listed.get(id)) {
                (Hold::Held, None) => {
                    self.violation(format!(
                        "{id} is lost: a {:?} snapshot made under lease {} (which holds it) is gone",
                        rec.kind, rec.lease
                    ));
                    gone.push(id.clone());
                }
                (Hold::Held | Hold::Maybe, Some(info)) => {
                    if let Err(e) = same_shape(rec, Some(info)) {
                        self.violation(format!("{id}: {e}"));
                    }
                }
                (Hold::Maybe | Hold::Released, None) => gone.push(id.clone()),
                (Hold::Released, Some(info)) => {
                    if self.sh.first_report(id) {
                        self.violation(format!(
                            "{id} survived a completed collection though nothing holds it \
                             (lease {} released; kind {}, parent {:?})",
                            rec.lease, info.kind, info.parent
                        ));
                    }
                }
            }
        }
        for id in gone {
            model.snaps.remove(&id);
        }
        for (id, info) in &listed {
            if !model.snaps.contains_key(id)
                && !id.key.starts_with("chk-")
                && self.sh.first_report(id)
            {
                self.violation(format!(
                    "{id} exists but no client made it (kind {}, parent {:?}, labels {:?})",
                    info.kind, info.parent, info.labels
                ));
            }
        }
        Ok(())
    }

    async fn backend_check(&mut self) -> Result<(), Failed> {
        let r = self.client.admin().check(tonic::Request::new(apb::CheckRequest {})).await;
        let r = r.map_err(failed("gc --check"))?.into_inner();
        match serde_json::from_str::<Vec<wasnap::root::CheckReport>>(&r.json) {
            Ok(reports) => {
                for rep in reports.iter().filter(|r| r.problems() > 0) {
                    self.violation(format!(
                        "gc --check {}: backend snapshots no record names {:?}; records whose \
                         backend snapshot is missing {:?}; damaged {:?}",
                        rep.snapshotter, rep.orphans, rep.missing, rep.damaged
                    ));
                }
            }
            Err(e) => self.violation(format!("undecodable gc --check report: {e}")),
        }
        Ok(())
    }

    async fn contents(&mut self, model: &Model, sample: usize) -> Result<(), Failed> {
        let holds = model.holds(SystemTime::now(), Duration::from_secs(3));
        let held: Vec<(&SnapId, Kind)> = model
            .snaps
            .iter()
            .filter(|(k, _)| holds.get(*k) == Some(&Hold::Held))
            .map(|(k, r)| (k, r.kind))
            .collect();
        // A lease about to expire may be collected by the daemon's own schedule
        // between two of these calls: its snapshots are skipped from then on.
        let expiring = |id: &SnapId| {
            let lease = model.snaps.get(id).map(|r| r.lease.clone()).unwrap_or_default();
            model.lease_hold(&id.ns, &lease, SystemTime::now(), Duration::from_secs(3))
                != Hold::Held
        };
        for (id, _) in held.iter().filter(|(_, k)| *k != Kind::Committed) {
            if expiring(id) {
                continue;
            }
            let msg = spb::MountsRequest { snapshotter: id.sn.clone(), key: id.key.clone() };
            match self.client.snapshots().mounts(request(msg, Some(&id.ns), None)).await {
                Ok(r) => {
                    self.covered.contents += 1;
                    if let Err(e) = verify_files(&r.into_inner().mounts, &model.expected_files(id))
                    {
                        self.violation(format!("{id}: content: {e}"));
                    }
                }
                Err(s) if definite(&s) => self.violation(format!(
                    "mounts of {id}, which stat shows, fails: {:?} {}",
                    s.code(),
                    s.message()
                )),
                Err(s) => return Err(Failed { what: format!("mounts {id}"), status: s }),
            }
        }
        let mut committed: Vec<&SnapId> =
            held.iter().filter(|(_, k)| *k == Kind::Committed).map(|(id, _)| *id).collect();
        // A random sample, from the seeded generator.
        for i in (1..committed.len()).rev() {
            committed.swap(i, self.rng.below(i as u64 + 1) as usize);
        }
        committed.truncate(sample);
        if committed.is_empty() {
            return Ok(());
        }
        *self.counter += 1;
        let lease = format!("chk-L{}", self.counter);
        let namespaces: BTreeSet<&String> = committed.iter().map(|id| &id.ns).collect();
        for ns in &namespaces {
            let msg = lpb::CreateRequest { id: lease.clone(), labels: HashMap::new() };
            let r = self.client.leases().create(request(msg, Some(ns), None)).await;
            r.map_err(failed(format!("create the checker's lease in {ns}")))?;
        }
        for id in committed {
            *self.counter += 1;
            let key = format!("chk-{}", self.counter);
            let msg = spb::ViewSnapshotRequest {
                snapshotter: id.sn.clone(),
                key: key.clone(),
                parent: id.key.clone(),
                labels: HashMap::new(),
            };
            match self.client.snapshots().view(request(msg, Some(&id.ns), Some(&lease))).await {
                Ok(r) => {
                    self.covered.contents += 1;
                    if let Err(e) = verify_files(&r.into_inner().mounts, &model.expected_files(id))
                    {
                        self.violation(format!("{id}: content (through a view): {e}"));
                    }
                }
                Err(s) if definite(&s) => {
                    self.violation(format!("a view of {id} fails: {:?} {}", s.code(), s.message()));
                    continue;
                }
                Err(s) => return Err(Failed { what: format!("view {id}"), status: s }),
            }
            let msg = spb::RemoveSnapshotRequest { snapshotter: id.sn.clone(), key: key.clone() };
            match self.client.snapshots().remove(request(msg, Some(&id.ns), None)).await {
                Ok(_) => {}
                Err(s) if definite(&s) => self.violation(format!(
                    "removing the checker's view {key} of {id} fails: {:?} {}",
                    s.code(),
                    s.message()
                )),
                Err(s) => return Err(Failed { what: format!("remove view {key}"), status: s }),
            }
        }
        for ns in namespaces {
            let msg = lpb::DeleteRequest { id: lease.clone(), sync: false };
            let r = self.client.leases().delete(request(msg, Some(ns), None)).await;
            r.map_err(failed(format!("delete the checker's lease in {ns}")))?;
        }
        Ok(())
    }

    async fn leases_after(
        &mut self,
        model: &mut Model,
        t0: SystemTime,
        margin: Duration,
    ) -> Result<(), Failed> {
        for ns in &self.sh.namespaces {
            let listed = self.list_leases(ns).await?;
            for ((lns, id), l) in model.leases.iter_mut() {
                if lns != ns {
                    continue;
                }
                let present = listed.contains(id);
                let expired = l.expire.is_some_and(|t| t + margin < t0);
                if present && l.state == LeaseState::Deleted {
                    self.violation(format!("lease {ns}/{id} was deleted but is listed"));
                } else if present && expired {
                    self.violation(format!("lease {ns}/{id} expired but survived a collection"));
                } else if !present && l.expire.is_some() {
                    l.state = LeaseState::Deleted;
                }
            }
        }
        // Forget deleted leases nothing refers to any more.
        let used: HashSet<(String, String)> =
            model.snaps.iter().map(|(k, r)| (k.ns.clone(), r.lease.clone())).collect();
        model.leases.retain(|k, l| l.state != LeaseState::Deleted || used.contains(k));
        Ok(())
    }
}
