//! Each root and reference rule, expiry, flat leases, retention and the scheduler.

use super::*;

// 1 -------------------------------------------------------------------------------------

#[test]
fn snapshots_made_with_no_lease_survive_every_collection() {
    let e = Env::native(GcOptions::default());
    let sn = e.sn("native");
    let c = ctx("default");
    commit(&sn, &c, "base", None, &[]);
    commit(&sn, &c, "mid", Some("base"), &[("some", "label")]);
    sn.prepare(&c, "work", Some("mid"), &none()).unwrap();
    sn.view(&c, "look", Some("base"), &none()).unwrap();
    sn.prepare(&ctx("other"), "lone", None, &none()).unwrap();
    // A lease that holds nothing changes nothing either.
    e.lease("default", "idle", &[]);

    let before = (keys(&sn, "default"), keys(&sn, "other"), bkeys(&sn));
    assert_eq!(before.0, ["base", "look", "mid", "work"]);
    assert_eq!(before.2.len(), 5);
    for _ in 0..3 {
        let r = e.collect();
        assert!(!r.dry_run);
        assert_eq!(removed(&r), Vec::<String>::new());
        assert_eq!(pruned(&r), Vec::<String>::new());
        assert!(r.expired_leases.is_empty());
        assert_eq!((keys(&sn, "default"), keys(&sn, "other"), bkeys(&sn)), before);
    }
    // Deleting an unrelated lease synchronously collects, and still keeps them.
    let r = e.host.delete_lease(&ctx("default"), "idle", true).unwrap().unwrap();
    assert!(r.removed.is_empty() && r.pruned.is_empty(), "{r:?}");
    assert_eq!((keys(&sn, "default"), keys(&sn, "other"), bkeys(&sn)), before);
}

// 2 -------------------------------------------------------------------------------------

#[test]
fn leased_snapshots_live_as_long_as_their_lease_on_native_and_overlay() {
    let e = Env::new(tmp(), &["native", "overlay"], GcOptions::default());
    for driver in ["native", "overlay"] {
        let sn = e.sn(driver);
        let c = ctx("default");
        commit(&sn, &c, "kept", None, &[]);
        let lease = format!("{driver}-lease");
        let l = e.lease("default", &lease, &[]);
        commit(&sn, &l, "layer", None, &[]);
        sn.prepare(&l, "rw", Some("layer"), &none()).unwrap();
        let (b_layer, b_rw, b_kept) = (
            bkey(&sn, "default", "layer"),
            bkey(&sn, "default", "rw"),
            bkey(&sn, "default", "kept"),
        );
        assert_eq!(set(bkeys(&sn)), set([&b_layer, &b_rw, &b_kept]));
        assert_eq!(
            e.host.leases().resources(&ctx("default"), &lease).unwrap(),
            [Resource::snapshot(driver, "layer"), Resource::snapshot(driver, "rw")],
            "what a call under a lease makes, the lease holds (the consumed active key is not)"
        );

        for _ in 0..2 {
            let r = e.collect();
            assert!(r.removed.is_empty() && r.pruned.is_empty(), "{driver}: {r:?}");
        }
        assert_eq!(keys(&sn, "default"), ["kept", "layer", "rw"], "{driver}");

        let r = e.host.delete_lease(&ctx("default"), &lease, true).unwrap().expect("sync collects");
        assert_eq!(
            removed(&r),
            [format!("{driver}/default/layer"), format!("{driver}/default/rw")]
        );
        assert_eq!(
            pruned(&r),
            [format!("{driver}:{b_rw}"), format!("{driver}:{b_layer}")],
            "children first"
        );
        assert!(r.failed.is_empty(), "{r:?}");
        assert_eq!(keys(&sn, "default"), ["kept"], "{driver}");
        assert_eq!(bkeys(&sn), [b_kept], "{driver}: gone from the backend too");
        assert_eq!(
            e.host.delete_lease(&ctx("default"), &lease, true).unwrap_err().kind(),
            ErrorKind::NotFound
        );
    }
}

// 3 -------------------------------------------------------------------------------------

#[test]
fn parents_of_held_snapshots_are_held_and_go_with_their_last_child() {
    let e = Env::native(GcOptions::default());
    let sn = e.sn("native");
    let c = ctx("default");

    // A leased chain under one lease, a leased child of it under another.
    let l1 = e.lease("default", "l1", &[]);
    commit(&sn, &l1, "base", None, &[]);
    commit(&sn, &l1, "mid", Some("base"), &[]);
    let l2 = e.lease("default", "l2", &[]);
    sn.prepare(&l2, "child", Some("mid"), &none()).unwrap();
    // A leased parent of an unleased child.
    let l3 = e.lease("default", "l3", &[]);
    commit(&sn, &l3, "p", None, &[]);
    sn.prepare(&c, "q", Some("p"), &none()).unwrap();
    // A leased chain whose leased child goes with its lease.
    let l4 = e.lease("default", "l4", &[]);
    commit(&sn, &l4, "x", None, &[]);
    let l5 = e.lease("default", "l5", &[]);
    commit(&sn, &l5, "y", Some("x"), &[]);

    e.drop_lease("default", "l1");
    e.drop_lease("default", "l3");
    e.drop_lease("default", "l4");
    let r = e.collect();
    assert!(r.removed.is_empty(), "parents of held snapshots are held: {r:?}");
    assert_eq!(keys(&sn, "default"), ["base", "child", "mid", "p", "q", "x", "y"]);

    // The child goes by its lease: it and its whole unheld chain go in one collection.
    let r = e.host.delete_lease(&c, "l5", true).unwrap().unwrap();
    assert_eq!(removed(&r), ["native/default/x", "native/default/y"]);

    // The child goes by an explicit removal: the parents go at the next collection.
    sn.remove(&l2, "child").unwrap();
    sn.remove(&c, "q").unwrap();
    assert_eq!(keys(&sn, "default"), ["base", "mid", "p"], "a removal alone collects nothing");
    let r = e.collect();
    assert_eq!(removed(&r), ["native/default/base", "native/default/mid", "native/default/p"]);
    assert_eq!(r.pruned.len(), 3, "{r:?}");
    assert_eq!(keys(&sn, "default"), Vec::<String>::new());
    assert_eq!(bkeys(&sn), Vec::<String>::new());
    assert_eq!(e.lease_ids("default"), ["l2"]);
}

// 4 -------------------------------------------------------------------------------------

#[test]
fn gc_root_keeps_a_leased_snapshot_and_its_parents_after_the_lease() {
    let e = Env::native(GcOptions::default());
    let sn = e.sn("native");
    let l = e.lease("default", "l", &[]);
    commit(&sn, &l, "rp", None, &[]);
    commit(&sn, &l, "r", Some("rp"), &[(ROOT, "true")]);
    commit(&sn, &l, "later", None, &[]);
    commit(&sn, &l, "plain", None, &[]);
    // Any value holds; an empty one is no label at all, as in containerd (see
    // a_label_set_to_nothing_is_removed_as_containerd_removes_it).
    set_label(&sn, &l, "later", ROOT, Some("x"));

    let r = e.host.delete_lease(&ctx("default"), "l", true).unwrap().unwrap();
    assert_eq!(removed(&r), ["native/default/plain"]);
    assert_eq!(keys(&sn, "default"), ["later", "r", "rp"]);

    // Without the label it is an ordinary unheld leased snapshot again.
    set_label(&sn, &l, "later", ROOT, None);
    assert_eq!(removed(&e.collect()), ["native/default/later"]);
    assert_eq!(keys(&sn, "default"), ["r", "rp"]);
}

// 5 -------------------------------------------------------------------------------------

#[test]
fn gc_ref_labels_hold_what_they_name_in_the_same_namespace_until_removed() {
    let e = Env::native(GcOptions::default());
    let sn = e.sn("native");
    let c = ctx("default");
    let l = e.lease("default", "l", &[]);
    let lo = e.lease("other", "l", &[]);
    for t in ["t1", "t2", "t3"] {
        commit(&sn, &l, t, None, &[]);
    }
    commit(&sn, &lo, "t1", None, &[]);
    // An unleased holder names t1 and (by the `/`-suffixed form) t2.
    let suffixed = format!("{REF_NATIVE}/extra");
    commit(&sn, &c, "s", None, &[(REF_NATIVE, "t1"), (&suffixed, "t2")]);
    // A leased holder names t3 while its lease lives.
    let h = e.lease("default", "h", &[]);
    commit(&sn, &h, "holder", None, &[(REF_NATIVE, "t3")]);
    // A reference to another snapshotter's key, or to nothing, holds nothing here.
    commit(
        &sn,
        &c,
        "s2",
        None,
        &[("containerd.io/gc.ref.snapshot.overlay", "t2"), (REF_NATIVE, "ghost")],
    );

    e.drop_lease("default", "l");
    e.drop_lease("other", "l");
    let r = e.collect();
    assert_eq!(removed(&r), ["native/other/t1"], "a reference holds only in its own namespace");
    assert_eq!(keys(&sn, "default"), ["holder", "s", "s2", "t1", "t2", "t3"]);

    set_label(&sn, &c, "s", REF_NATIVE, None);
    assert_eq!(removed(&e.collect()), ["native/default/t1"]);
    set_label(&sn, &c, "s", &suffixed, None);
    assert_eq!(removed(&e.collect()), ["native/default/t2"]);

    // An unheld holder's references hold nothing: both go in one collection.
    let r = e.host.delete_lease(&c, "h", true).unwrap().unwrap();
    assert_eq!(removed(&r), ["native/default/holder", "native/default/t3"]);
    assert_eq!(keys(&sn, "default"), ["s", "s2"]);
    assert_eq!(bkeys(&sn).len(), 2);
}

// 6 -------------------------------------------------------------------------------------

#[test]
fn gc_bref_labels_hold_a_snapshot_while_what_they_name_is_held() {
    let e = Env::native(GcOptions::default());
    let sn = e.sn("native");
    let c = ctx("default");
    commit(&sn, &c, "p", None, &[]);
    let l = e.lease("default", "l", &[]);
    commit(&sn, &l, "s", None, &[(BREF_NATIVE, "p")]);
    commit(&sn, &l, "s-suffixed", None, &[(&format!("{BREF_NATIVE}/x"), "p")]);
    commit(&sn, &l, "p2", None, &[]);
    commit(&sn, &l, "s2", None, &[(BREF_NATIVE, "p2")]);
    commit(&sn, &l, "s3", None, &[(BREF_NATIVE, "ghost")]);
    // The same key in another namespace does not hold it.
    commit(&sn, &ctx("other"), "p", None, &[]);
    let lo = e.lease("other", "l", &[]);
    commit(&sn, &lo, "s", None, &[(BREF_NATIVE, "nothing-here")]);

    e.drop_lease("default", "l");
    e.drop_lease("other", "l");
    let r = e.collect();
    assert_eq!(
        removed(&r),
        ["native/default/p2", "native/default/s2", "native/default/s3", "native/other/s"],
        "held while what they name is held; an unheld or missing one holds nothing"
    );
    assert_eq!(keys(&sn, "default"), ["p", "s", "s-suffixed"]);

    sn.remove(&c, "p").unwrap();
    let r = e.collect();
    assert_eq!(removed(&r), ["native/default/s", "native/default/s-suffixed"]);
    assert_eq!(keys(&sn, "default"), Vec::<String>::new());
    assert_eq!(keys(&sn, "other"), ["p"]);
}

// 7 -------------------------------------------------------------------------------------

#[test]
fn gc_expire_on_snapshots_and_on_leases() {
    let e = Env::native(GcOptions::default());
    let sn = e.sn("native");
    let c = ctx("default");
    commit(&sn, &c, "old", None, &[(EXPIRE, PAST)]);
    commit(&sn, &c, "young", None, &[(EXPIRE, FUTURE)]);
    commit(&sn, &c, "unreadable", None, &[(EXPIRE, "soon")]);
    // A leased snapshot whose expire time has not come is held after its lease.
    let l = e.lease("default", "l", &[]);
    commit(&sn, &l, "leased-young", None, &[(EXPIRE, FUTURE)]);
    commit(&sn, &l, "leased-old", None, &[(EXPIRE, PAST)]);
    // An expired lease holds nothing; an unexpired one holds.
    let gone = e.lease("default", "gone", &[(EXPIRE, PAST)]);
    commit(&sn, &gone, "e", None, &[]);
    let live = e.lease("default", "live", &[(EXPIRE, FUTURE)]);
    commit(&sn, &live, "f", None, &[]);
    e.drop_lease("default", "l");

    let r = e.collect();
    assert_eq!(
        removed(&r),
        ["native/default/e", "native/default/leased-old", "native/default/old"]
    );
    assert_eq!(r.expired_leases, [("default".to_owned(), "gone".to_owned())]);
    assert_eq!(r.pruned.len(), 3, "{r:?}");
    assert_eq!(keys(&sn, "default"), ["f", "leased-young", "unreadable", "young"]);
    assert_eq!(e.lease_ids("default"), ["live"], "the expired lease is deleted by the collection");
    assert_eq!(sn.prepare(&gone, "late", None, &none()).unwrap_err().kind(), ErrorKind::NotFound);

    let r = e.collect();
    assert!(r.removed.is_empty() && r.expired_leases.is_empty(), "{r:?}");

    let err =
        e.host.leases().create(&c, Some("bad"), &labels(&[(EXPIRE, "tomorrow")])).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    assert_eq!(e.lease_ids("default"), ["live"]);
    let lease = e.host.leases().list(&c, &["id==live".to_owned()]).unwrap().remove(0);
    assert!(lease.expires().is_some() && !lease.expired(std::time::SystemTime::now()));
}

// 8 -------------------------------------------------------------------------------------

#[test]
fn a_flat_lease_holds_parents_but_not_references() {
    let e = Env::native(GcOptions::default());
    let sn = e.sn("native");
    // The same layout in two namespaces: one held by a flat lease, one by a plain one.
    for (ns, flat) in [("flat", true), ("deep", false)] {
        let setup = e.lease(ns, "setup", &[]);
        commit(&sn, &setup, "r1", None, &[]);
        commit(&sn, &setup, "r2", None, &[]);
        commit(&sn, &setup, "base", None, &[(REF_NATIVE, "r2")]);
        let held =
            if flat { e.lease(ns, "held", &[(FLAT, "true")]) } else { e.lease(ns, "held", &[]) };
        sn.prepare(&held, "child", Some("base"), &labels(&[(REF_NATIVE, "r1")])).unwrap();
        e.drop_lease(ns, "setup");
    }
    let r = e.collect();
    assert_eq!(removed(&r), ["native/flat/r1", "native/flat/r2"]);
    assert_eq!(keys(&sn, "flat"), ["base", "child"]);
    assert_eq!(keys(&sn, "deep"), ["base", "child", "r1", "r2"]);

    // A flat lease does not stop what something else holds fully from being followed.
    let setup = e.lease("flat", "setup2", &[]);
    commit(&sn, &setup, "r3", None, &[]);
    commit(&sn, &ctx("flat"), "anchor", Some("base"), &[]);
    set_label(&sn, &ctx("flat"), "base", REF_NATIVE, Some("r3"));
    e.drop_lease("flat", "setup2");
    assert!(e.collect().removed.is_empty(), "r3 is held through the unleased anchor's parent");
}

// 13 ------------------------------------------------------------------------------------

#[test]
fn retention_keeps_the_most_recently_updated_unheld_committed_snapshots() {
    let gc = GcOptions {
        retention: Retention { keep_recent: 1, ..Retention::default() },
        ..GcOptions::default()
    };
    let e = Env::native(gc);
    let sn = e.sn("native");
    let l = e.lease("default", "l", &[]);
    commit(&sn, &l, "pa", None, &[]);
    commit(&sn, &l, "a", Some("pa"), &[]);
    std::thread::sleep(Duration::from_millis(2));
    commit(&sn, &l, "b", None, &[]);
    sn.prepare(&l, "scratch", None, &none()).unwrap();
    std::thread::sleep(Duration::from_millis(2));
    // `a` was created before `b` but updated after it.
    set_label(&sn, &l, "a", "touched", Some("yes"));
    assert!(sn.stat(&l, "a").unwrap().updated > sn.stat(&l, "b").unwrap().updated);

    let r = e.host.delete_lease(&ctx("default"), "l", true).unwrap().unwrap();
    assert_eq!(
        removed(&r),
        ["native/default/b", "native/default/scratch"],
        "the most recent committed one (and its parent) stay; active ones are never retained"
    );
    assert_eq!(keys(&sn, "default"), ["a", "pa"]);
    assert!(e.collect().removed.is_empty(), "still the most recent");

    // By age: everything committed within the hour stays.
    let gc = GcOptions {
        retention: Retention { keep_recent: 0, keep_for_secs: Some(3600) },
        ..GcOptions::default()
    };
    let e = Env::native(gc);
    let sn = e.sn("native");
    let l = e.lease("default", "l", &[]);
    commit(&sn, &l, "x", None, &[]);
    commit(&sn, &l, "y", Some("x"), &[]);
    sn.prepare(&l, "z", Some("y"), &none()).unwrap();
    let r = e.host.delete_lease(&ctx("default"), "l", true).unwrap().unwrap();
    assert_eq!(removed(&r), ["native/default/z"]);
    assert_eq!(keys(&sn, "default"), ["x", "y"]);
}

// 14 ------------------------------------------------------------------------------------

/// The scheduler collects once something is deleted: a snapshot, a lease, a resource of
/// a lease (containerd's lease manager marks its database dirty for both), and stops
/// when dropped.
#[test]
fn the_scheduler_collects_after_a_deletion_and_stops_when_dropped() {
    let gc = GcOptions { deletion_threshold: 1, ..GcOptions::default() };
    let e = Env::native(gc);
    let Env { dir: _dir, host, .. } = e;
    let host = Arc::new(host);
    let sn = host.snapshotter("native").unwrap();
    let c = ctx("default");
    let setup = |n: u32| {
        host.leases().create(&c, Some("l"), &none()).unwrap();
        let l = c.clone().with_lease(Some("l".into()));
        commit(&sn, &l, &format!("leased{n}"), None, &[]);
        sn.prepare(&c, &format!("unrelated{n}"), None, &none()).unwrap();
    };
    let until = |what: &str, done: &dyn Fn() -> bool| {
        let t = Instant::now();
        while !done() {
            assert!(t.elapsed() < Duration::from_secs(5), "the scheduler never {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    setup(1);

    let scheduler = host.start_gc().unwrap();
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(
        keys(&sn, "default"),
        ["leased1", "unrelated1"],
        "nothing calls for a collection yet"
    );
    // The lease goes, without sync: what only it held goes soon after.
    host.delete_lease(&c, "l", false).unwrap();
    until("collected after a lease went", &|| keys(&sn, "default") == ["unrelated1"]);
    until("pruned the backend", &|| bkeys(&sn).len() == 1);
    // A resource leaves a lease that stays.
    host.leases().create(&c, Some("m"), &none()).unwrap();
    commit(&sn, &c.clone().with_lease(Some("m".into())), "held", None, &[]);
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(keys(&sn, "default"), ["held", "unrelated1"]);
    host.leases().delete_resource(&c, "m", &Resource::snapshot("native", "held")).unwrap();
    until("collected after a lease's resource went", &|| keys(&sn, "default") == ["unrelated1"]);
    // A snapshot removed.
    sn.remove(&c, "unrelated1").unwrap();
    until("pruned the backend after a removal", &|| bkeys(&sn).is_empty());

    let t = Instant::now();
    drop(scheduler);
    assert!(t.elapsed() < Duration::from_secs(2), "dropping the scheduler took {:?}", t.elapsed());
    setup(2);
    host.delete_lease(&c, "l", false).unwrap();
    sn.remove(&c, "unrelated2").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(keys(&sn, "default"), ["leased2"], "no collections after the scheduler is dropped");
    assert_eq!(removed(&host.collect(false).unwrap()), ["native/default/leased2"]);
}
