//! Dry runs and checks, a hanging backend, failures mid-collection, shared backend
//! snapshots, and races between pruning and writers.

use super::*;

// 10 ------------------------------------------------------------------------------------

#[test]
fn a_dry_run_and_check_report_and_change_nothing() {
    let e = Env::native(GcOptions::default());
    let sn = e.sn("native");
    let c = ctx("default");
    commit(&sn, &c, "base", None, &[]);
    sn.prepare(&c, "k", Some("base"), &none()).unwrap();
    commit(&sn, &c, "m", None, &[]);
    let l = e.lease("default", "l", &[]);
    commit(&sn, &l, "g", None, &[]);
    sn.prepare(&l, "ga", Some("g"), &none()).unwrap();
    e.drop_lease("default", "l");
    e.lease("default", "expired", &[(EXPIRE, PAST)]);
    // Behind the metadata's back: a backend snapshot no record names, and a record
    // whose backend snapshot is gone.
    sn.backend().prepare("default/999/x", None, &none()).unwrap();
    let bm = bkey(&sn, "default", "m");
    sn.backend().remove(&bm).unwrap();
    let (bg, bga) = (bkey(&sn, "default", "g"), bkey(&sn, "default", "ga"));

    let state = || (keys(&sn, "default"), bkeys(&sn), e.lease_ids("default"));
    let before = state();
    assert_eq!(before.0, ["base", "g", "ga", "k", "m"]);

    let r = e.host.collect(true).unwrap();
    assert!(r.dry_run);
    assert_eq!(removed(&r), ["native/default/g", "native/default/ga"]);
    assert_eq!(r.expired_leases, [("default".to_owned(), "expired".to_owned())]);
    assert_eq!(
        pruned(&r),
        ["native:default/999/x"],
        "only today's orphans; swept records are listed above"
    );
    assert!(r.failed.is_empty(), "{r:?}");
    assert_eq!(state(), before, "a dry run changes nothing");

    let checks = e.host.check().unwrap();
    assert_eq!(checks.len(), 1);
    assert_eq!(checks[0].snapshotter, "native");
    assert_eq!(checks[0].orphans, ["default/999/x"]);
    assert_eq!(checks[0].missing, std::slice::from_ref(&bm));
    assert_eq!(state(), before, "check changes nothing");

    // The real thing does what the dry run said.
    let r = e.collect();
    assert_eq!(removed(&r), ["native/default/g", "native/default/ga"]);
    assert_eq!(r.expired_leases, [("default".to_owned(), "expired".to_owned())]);
    let p = pruned(&r);
    assert_eq!(
        set(p.clone()),
        set([format!("native:{bg}"), format!("native:{bga}"), "native:default/999/x".into()])
    );
    assert_eq!(p[0], format!("native:{bga}"), "children first: {p:?}");
    let checks = e.host.check().unwrap();
    assert!(checks[0].orphans.is_empty(), "{checks:?}");
    assert_eq!(checks[0].missing, [bm], "a missing backend snapshot is reported, not invented");
    assert_eq!(keys(&sn, "default"), ["base", "k", "m"]);
    assert!(e.lease_ids("default").is_empty());
}

// 11 ------------------------------------------------------------------------------------

/// A native backend whose `remove` can be made to hang until released.
struct Stuck {
    inner: Arc<Native>,
    block: AtomicBool,
    entered: AtomicUsize,
    released: Mutex<bool>,
    wake: Condvar,
}

impl Stuck {
    fn new(inner: Arc<Native>) -> Arc<Self> {
        Arc::new(Stuck {
            inner,
            block: AtomicBool::new(false),
            entered: AtomicUsize::new(0),
            released: Mutex::new(false),
            wake: Condvar::new(),
        })
    }

    fn release(&self) {
        self.block.store(false, Ordering::SeqCst);
        *self.released.lock().unwrap() = true;
        self.wake.notify_all();
    }
}

impl Wrapper for Stuck {
    fn inner(&self) -> &dyn Backend {
        &*self.inner
    }
    fn remove(&self, key: &str) -> Result<()> {
        if self.block.load(Ordering::SeqCst) {
            self.entered.fetch_add(1, Ordering::SeqCst);
            let mut released = self.released.lock().unwrap();
            while !*released {
                released = self.wake.wait(released).unwrap();
            }
        }
        self.inner.remove(key)
    }
}

#[test]
fn a_hanging_backend_neither_wedges_the_collection_nor_holds_writers() {
    let dir = tmp();
    let faults = Arc::new(Faults::new());
    let backend = Stuck::new(native(dir.path(), faults.clone()));
    let db = metadb(dir.path());
    let sn = Arc::new(Snapshotter::new(db.clone(), "native", backend.clone(), faults.clone()));
    let leases = Leases::new(db.clone());
    let opts = GcOptions { backend_timeout_ms: 200, ..GcOptions::default() };
    let collector = Arc::new(Collector::new(db, faults, opts));
    let c = ctx("default");

    commit(&sn, &c, "keep", None, &[]);
    leases.create(&c, Some("l"), &none()).unwrap();
    let l = c.clone().with_lease(Some("l".into()));
    let doomed = ["g1", "g2", "g3", "g4", "g5"];
    for g in doomed {
        commit(&sn, &l, g, None, &[]);
    }
    let doomed_bkeys: BTreeSet<String> = doomed.iter().map(|g| bkey(&sn, "default", g)).collect();
    leases.delete(&c, "l").unwrap();

    backend.block.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let run = {
        let (collector, sn) = (collector.clone(), sn.clone());
        std::thread::spawn(move || {
            let r = collector.collect(&[sn], false);
            (r, started.elapsed())
        })
    };
    while backend.entered.load(Ordering::SeqCst) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the collection never reached the backend"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // The collection is now stuck on a backend call: writers must not be.
    for i in 0..3 {
        let t = Instant::now();
        sn.prepare(&c, &format!("w{i}-active"), Some("keep"), &none()).unwrap();
        assert!(t.elapsed() < Duration::from_secs(1), "prepare took {:?}", t.elapsed());
        let t = Instant::now();
        sn.commit(&c, &format!("w{i}"), &format!("w{i}-active"), &none()).unwrap();
        assert!(t.elapsed() < Duration::from_secs(1), "commit took {:?}", t.elapsed());
    }
    assert!(!run.is_finished(), "the writes above ran while the collection was blocked");

    while !run.is_finished() {
        assert!(started.elapsed() < Duration::from_secs(5), "the collection is wedged");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (r, took) = run.join().unwrap();
    let r = r.unwrap();
    assert!(took < Duration::from_secs(4), "the collection took {took:?}");
    assert_eq!(
        removed(&r),
        doomed.iter().map(|g| format!("native/default/{g}")).collect::<Vec<_>>(),
        "records are swept whatever the backend does"
    );
    assert!(r.pruned.is_empty(), "{r:?}");
    let failed: BTreeSet<String> = r.failed.iter().map(|(what, _)| what.clone()).collect();
    assert_eq!(
        failed,
        doomed_bkeys.iter().map(|b| format!("native: {b}")).collect::<BTreeSet<_>>()
    );
    assert!(r.failed.iter().all(|(_, why)| why.contains("no answer within")), "{:?}", r.failed);
    assert_eq!(keys(&sn, "default"), ["keep", "w0", "w1", "w2"]);

    // Once the backend answers again the parked calls finish, and nothing is left over.
    backend.release();
    let t = Instant::now();
    while !sn.orphans(Duration::from_secs(5)).unwrap().is_empty() {
        assert!(t.elapsed() < Duration::from_secs(5), "the released removals never finished");
        std::thread::sleep(Duration::from_millis(10));
    }
    let r = collector.collect(std::slice::from_ref(&sn), false).unwrap();
    assert!(r.removed.is_empty() && r.failed.is_empty(), "{r:?}");
    let left: BTreeSet<String> = bkeys(&sn).into_iter().collect();
    assert!(left.is_disjoint(&doomed_bkeys), "{left:?}");
    assert_eq!(left.len(), 4, "{left:?}");
}

/// Found by the soak (`wasnap-bench soak --seed 2026 --duration 5m --kills 10`): `gc
/// --check` right after a completed collection listed as orphans the backend snapshots
/// of expired leases that the daemon's own collection had just swept and was pruning.
#[test]
fn check_during_a_collection_does_not_call_its_swept_snapshots_orphans() {
    let dir = tmp();
    let faults = Arc::new(Faults::new());
    let backend = Stuck::new(native(dir.path(), faults.clone()));
    let db = metadb(dir.path());
    let sn = Arc::new(Snapshotter::new(db.clone(), "native", backend.clone(), faults.clone()));
    let leases = Leases::new(db.clone());
    let collector = Arc::new(Collector::new(db, faults, GcOptions::default()));
    let c = ctx("default");
    leases.create(&c, Some("l"), &none()).unwrap();
    let l = c.clone().with_lease(Some("l".into()));
    commit(&sn, &l, "g", None, &[]);
    let bg = bkey(&sn, "default", "g");
    leases.delete(&c, "l").unwrap();

    // A collection sweeps the record and hangs pruning its backend snapshot.
    backend.block.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let run = {
        let (collector, sn) = (collector.clone(), sn.clone());
        std::thread::spawn(move || collector.collect(&[sn], false))
    };
    while backend.entered.load(Ordering::SeqCst) == 0 {
        assert!(started.elapsed() < Duration::from_secs(5), "the collection never pruned");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(sn.orphans(Duration::from_secs(5)).unwrap(), std::slice::from_ref(&bg), "half done");

    // A check now waits for the collection instead of reporting its work half done.
    let check = {
        let (collector, sn) = (collector.clone(), sn.clone());
        std::thread::spawn(move || {
            collector.between_collections(|| sn.orphans(Duration::from_secs(5)))
        })
    };
    // Time for the check to have run, had it not waited (it passes either way with the
    // wait; without it, it would have finished listing `bg`).
    std::thread::sleep(Duration::from_millis(200));
    assert!(!check.is_finished(), "the check ran during the collection");
    backend.release();
    let r = run.join().unwrap().unwrap();
    assert_eq!(pruned(&r), [format!("native:{bg}")]);
    assert!(check.join().unwrap().unwrap().is_empty(), "nothing is left to report");
}

// 12 ------------------------------------------------------------------------------------

/// A root on disk with some garbage: two leased committed snapshots and an expired
/// lease's one, next to an unleased keeper. Returns the garbage's backend keys.
fn garbage(e: &Env) -> Vec<String> {
    let sn = e.sn("native");
    commit(&sn, &ctx("default"), "keeper", None, &[]);
    let l = e.lease("default", "l", &[]);
    commit(&sn, &l, "a", None, &[]);
    commit(&sn, &l, "b", Some("a"), &[]);
    let x = e.lease("default", "expired", &[(EXPIRE, PAST)]);
    sn.prepare(&x, "c", None, &none()).unwrap();
    e.drop_lease("default", "l");
    ["a", "b", "c"].iter().map(|k| bkey(&sn, "default", k)).collect()
}

fn reopen(e: Env) -> Env {
    let Env { dir, host, .. } = e;
    host.close().unwrap();
    drop(host);
    Env::new(dir, &["native"], GcOptions::default())
}

#[test]
fn a_collection_that_fails_before_its_sweep_commits_changes_nothing() {
    let e = Env::new(disk_tmp(), &["native"], GcOptions::default());
    let doomed = garbage(&e);
    let sn = e.sn("native");
    let before = (keys(&sn, "default"), bkeys(&sn), e.lease_ids("default"));
    assert_eq!(before.0, ["a", "b", "c", "keeper"]);

    e.faults.arm("gc.sweep.before-commit", Action::Error);
    let err = e.host.collect(false).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Internal, "{err}");
    assert_eq!((keys(&sn, "default"), bkeys(&sn), e.lease_ids("default")), before);
    let checks = e.host.check().unwrap();
    assert!(checks[0].orphans.is_empty() && checks[0].missing.is_empty(), "{checks:?}");
    drop(sn);

    let e = reopen(e);
    let sn = e.sn("native");
    assert_eq!(
        (keys(&sn, "default"), bkeys(&sn), e.lease_ids("default")),
        before,
        "nothing changed on disk"
    );
    let r = e.collect();
    assert_eq!(removed(&r), ["native/default/a", "native/default/b", "native/default/c"]);
    assert_eq!(r.expired_leases, [("default".to_owned(), "expired".to_owned())]);
    assert_eq!(set(r.pruned.iter().map(|(_, k)| k.clone())), set(doomed));
    assert_eq!(keys(&sn, "default"), ["keeper"]);
    assert_eq!(bkeys(&sn), [bkey(&sn, "default", "keeper")]);
    assert!(e.lease_ids("default").is_empty());
}

#[test]
fn a_collection_that_fails_before_pruning_leaves_orphans_the_next_one_prunes() {
    let e = Env::new(disk_tmp(), &["native"], GcOptions::default());
    let doomed = garbage(&e);
    let sn = e.sn("native");
    let all_bkeys = bkeys(&sn);

    e.faults.arm("gc.before-prune", Action::Error);
    let err = e.host.collect(false).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Internal, "{err}");
    assert_eq!(keys(&sn, "default"), ["keeper"], "the records were swept");
    assert!(e.lease_ids("default").is_empty(), "and the expired lease with them");
    assert_eq!(bkeys(&sn), all_bkeys, "the backend still holds the data");
    drop(sn);

    let e = reopen(e);
    let sn = e.sn("native");
    let checks = e.host.check().unwrap();
    assert_eq!(set(checks[0].orphans.clone()), set(doomed.clone()));
    assert_eq!(checks[0].orphans.first(), Some(&bkey(&sn, "default", "b")), "children first");
    assert!(checks[0].missing.is_empty(), "{checks:?}");
    assert_eq!(bkeys(&sn), all_bkeys, "check changes nothing");

    let r = e.collect();
    assert!(r.removed.is_empty() && r.expired_leases.is_empty(), "{r:?}");
    assert_eq!(set(r.pruned.iter().map(|(_, k)| k.clone())), set(doomed));
    assert_eq!(bkeys(&sn), [bkey(&sn, "default", "keeper")]);
    let checks = e.host.check().unwrap();
    assert!(checks[0].orphans.is_empty() && checks[0].missing.is_empty(), "{checks:?}");
}

// Shared backend snapshots --------------------------------------------------------------

#[test]
fn a_backend_snapshot_two_namespaces_share_is_pruned_only_when_both_records_go() {
    let dir = tmp();
    let faults = Arc::new(Faults::new());
    let backend: Arc<dyn Backend> = Arc::new(Dedup { inner: native(dir.path(), faults.clone()) });
    let db = metadb(dir.path());
    let sn = Arc::new(Snapshotter::new(db.clone(), "native", backend, faults.clone()));
    let leases = Leases::new(db.clone());
    let collector = Collector::new(db, faults, GcOptions::default());
    let target = labels(&[(LABEL_SNAPSHOT_REF, "sha256:shared")]);
    for ns in ["a", "b"] {
        leases.create(&ctx(ns), Some("l"), &none()).unwrap();
    }
    let (la, lb) = (ctx("a").with_lease(Some("l".into())), ctx("b").with_lease(Some("l".into())));
    sn.prepare(&la, "extract", None, &target).unwrap();
    sn.commit(&la, "sha256:shared", "extract", &target).unwrap();
    let err = sn.prepare(&lb, "extract", None, &target).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");
    assert_eq!(
        leases.resources(&ctx("b"), "l").unwrap(),
        [Resource::snapshot("native", "sha256:shared")]
    );
    let shared = bkeys(&sn);
    assert_eq!(shared.len(), 1);

    leases.delete(&ctx("a"), "l").unwrap();
    let r = collector.collect(std::slice::from_ref(&sn), false).unwrap();
    assert_eq!(removed(&r), ["native/a/sha256:shared"]);
    assert!(r.pruned.is_empty(), "b's record still names it: {r:?}");
    assert_eq!(bkeys(&sn), shared);
    assert!(sn.committed_mounts(&ctx("b"), "sha256:shared").is_ok());

    leases.delete(&ctx("b"), "l").unwrap();
    let r = collector.collect(std::slice::from_ref(&sn), false).unwrap();
    assert_eq!(removed(&r), ["native/b/sha256:shared"]);
    assert_eq!(pruned(&r), [format!("native:{}", shared[0])]);
    assert!(bkeys(&sn).is_empty());
}

// Races --------------------------------------------------------------------------------

/// While prepares and commits run, `orphans` (what a prune removes) must never name a
/// backend snapshot that a record names or is about to name. (It once did: the records
/// were read before the in-flight set, so a create finishing between the two reads was
/// in neither and a concurrent collection pruned a live record's data.)
#[test]
fn orphans_never_names_a_snapshot_being_created_or_committed() {
    let s = native_stack();
    let sn = Arc::new(s.sn);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (sn, stop) = (sn.clone(), stop.clone());
        std::thread::spawn(move || {
            let c = ctx("default");
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                sn.prepare(&c, &format!("a{i}"), None, &none()).unwrap();
                if i.is_multiple_of(2) {
                    sn.commit(&c, &format!("c{i}"), &format!("a{i}"), &none()).unwrap();
                }
                i += 1;
            }
        })
    };
    // Nothing here is ever an orphan: a listed key still in the backend is a live
    // record's. (A commit's consumed active key may be listed: it is gone by then, and
    // a prune's remove of it is a harmless not-found.)
    let t = Instant::now();
    let mut false_orphans = Vec::new();
    while t.elapsed() < Duration::from_secs(3) && false_orphans.is_empty() {
        false_orphans = sn.orphans(Duration::from_secs(5)).unwrap();
        false_orphans.retain(|k| sn.backend().stat(k).is_ok());
    }
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    assert_eq!(false_orphans, Vec::<String>::new(), "after {:?}", t.elapsed());
    assert_eq!(sn.missing(Duration::from_secs(5)).unwrap(), Vec::<String>::new());
}
