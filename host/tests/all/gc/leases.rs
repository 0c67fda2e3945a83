//! The lease manager's API.

use super::*;

// 9 -------------------------------------------------------------------------------------

#[test]
fn the_lease_manager_api() {
    let e = Env::native(GcOptions::default());
    let sn = e.sn("native");
    let leases = e.host.leases();
    let c = ctx("default");

    let started = std::time::SystemTime::now() - Duration::from_secs(1);
    let a = leases.create(&c, Some("a"), &labels(&[("a", "b")])).unwrap();
    assert_eq!((a.id.as_str(), a.labels.clone()), ("a", labels(&[("a", "b")])));
    assert!(a.created >= started && a.expires().is_none());
    leases.create(&c, Some("x"), &labels(&[("a", "c")])).unwrap();
    let g1 = leases.create(&c, None, &none()).unwrap();
    let g2 = leases.create(&c, None, &none()).unwrap();
    assert!(!g1.id.is_empty() && g1.id != g2.id, "{} {}", g1.id, g2.id);
    assert_eq!(leases.create(&c, Some("a"), &none()).unwrap_err().kind(), ErrorKind::AlreadyExists);
    assert_eq!(
        leases.create(&c, Some(""), &none()).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );

    let ids = |filters: &[&str]| -> Vec<String> {
        let f: Vec<String> = filters.iter().map(|s| s.to_string()).collect();
        leases.list(&c, &f).unwrap().into_iter().map(|l| l.id).collect()
    };
    assert_eq!(set(ids(&[])), set(["a".to_owned(), "x".to_owned(), g1.id.clone(), g2.id.clone()]));
    assert_eq!(ids(&["id==x"]), ["x"]);
    assert_eq!(ids(&[r#"labels."a"==b"#]), ["a"]);
    assert_eq!(ids(&["labels.a==c"]), ["x"]);
    assert_eq!(set(ids(&["id==x", "labels.a==b"])), set(["a", "x"]), "filters are alternatives");
    assert_eq!(ids(&["labels.a==nope"]), Vec::<String>::new());
    assert_eq!(
        leases.list(&c, &["id==".to_owned()]).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );

    // Resources.
    let k1 = Resource::snapshot("native", "k1");
    let k2 = Resource::snapshot("native", "k2");
    leases.add_resource(&c, "a", &k1).unwrap();
    leases.add_resource(&c, "a", &k1).unwrap();
    leases.add_resource(&c, "a", &k2).unwrap();
    assert_eq!(leases.resources(&c, "a").unwrap(), [k1.clone(), k2.clone()]);
    leases.delete_resource(&c, "a", &k1).unwrap();
    assert_eq!(leases.resources(&c, "a").unwrap(), std::slice::from_ref(&k2));
    let bad_digest = Resource { kind: "content".into(), id: "sha256:abc".into() };
    let err = leases.add_resource(&c, "a", &bad_digest).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    // As containerd answers: a known type, malformed, is an invalid argument; an
    // unknown type is not implemented.
    for (bad, kind) in [
        (Resource { kind: "ingests".into(), id: "ref".into() }, ErrorKind::NotImplemented),
        (Resource { kind: "images".into(), id: "ref".into() }, ErrorKind::NotImplemented),
        (Resource { kind: "snapshots".into(), id: "k".into() }, ErrorKind::InvalidArgument),
        (Resource { kind: "snapshots/".into(), id: "k".into() }, ErrorKind::InvalidArgument),
        (Resource { kind: "snapshots/a/b".into(), id: "k".into() }, ErrorKind::InvalidArgument),
        (Resource { kind: "snapshots/native".into(), id: "".into() }, ErrorKind::InvalidArgument),
        (
            Resource { kind: "content/x".into(), id: "sha256:abc".into() },
            ErrorKind::InvalidArgument,
        ),
    ] {
        let err = leases.add_resource(&c, "a", &bad).unwrap_err();
        assert_eq!(err.kind(), kind, "{bad:?}: {err}");
        let err = leases.delete_resource(&c, "a", &bad).unwrap_err();
        assert_eq!(err.kind(), kind, "delete {bad:?}: {err}");
        // A missing lease is not-found first, as containerd looks the lease up first.
        let err = leases.add_resource(&c, "nope", &bad).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound, "{bad:?}: {err}");
        let err = leases.delete_resource(&c, "nope", &bad).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound, "delete {bad:?}: {err}");
    }
    assert_eq!(leases.resources(&c, "a").unwrap(), [k2]);
    for err in [
        leases.add_resource(&c, "nope", &k1).unwrap_err(),
        leases.delete_resource(&c, "nope", &k1).unwrap_err(),
        leases.resources(&c, "nope").unwrap_err(),
        leases.delete(&c, "nope").unwrap_err(),
    ] {
        assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    }

    // Calls under a lease add what they make; under a missing lease they fail whole.
    let la = c.clone().with_lease(Some("a".into()));
    assert_eq!(c.clone().with_lease(Some(String::new())).lease(), None, "an empty lease is none");
    sn.prepare(&la, "w", None, &none()).unwrap();
    assert!(leases.resources(&c, "a").unwrap().contains(&Resource::snapshot("native", "w")));
    sn.commit(&la, "w-done", "w", &none()).unwrap();
    let held = leases.resources(&c, "a").unwrap();
    assert!(held.contains(&Resource::snapshot("native", "w-done")), "{held:?}");
    assert!(!held.contains(&Resource::snapshot("native", "w")), "{held:?}");

    let missing = c.clone().with_lease(Some("nope".into()));
    assert_eq!(sn.prepare(&missing, "m", None, &none()).unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(
        sn.view(&missing, "m", Some("w-done"), &none()).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(sn.stat(&c, "m").unwrap_err().kind(), ErrorKind::NotFound, "no record left");
    sn.prepare(&c, "unleased", None, &none()).unwrap();
    let err = sn.commit(&missing, "m", "unleased", &none()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert_eq!(keys(&sn, "default"), ["unleased", "w-done"], "the failed commit changed nothing");
    assert_eq!(bkeys(&sn).len(), 2, "no backend snapshot left behind: {:?}", bkeys(&sn));

    // A resource added by the API holds a snapshot whose own lease is gone.
    let l = e.lease("default", "maker", &[]);
    commit(&sn, &l, "adopted", None, &[]);
    commit(&sn, &l, "orphaned", None, &[]);
    leases.add_resource(&c, "x", &Resource::snapshot("native", "adopted")).unwrap();
    let r = e.host.delete_lease(&c, "maker", true).unwrap().unwrap();
    assert_eq!(removed(&r), ["native/default/orphaned"]);
    leases.delete_resource(&c, "x", &Resource::snapshot("native", "adopted")).unwrap();
    assert_eq!(removed(&e.collect()), ["native/default/adopted"]);

    // Leases are per namespace.
    let o = ctx("other");
    assert!(leases.list(&o, &[]).unwrap().is_empty());
    leases.create(&o, Some("a"), &none()).unwrap();
    assert_eq!(leases.resources(&o, "a").unwrap(), []);
    assert_eq!(
        sn.prepare(&ctx("third").with_lease(Some("x".into())), "k", None, &none())
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound,
        "lease x exists only in default"
    );
    leases.delete(&o, "a").unwrap();
    assert!(ids(&["id==a"]) == ["a"], "deleting other/a leaves default/a");
}

#[test]
fn lease_ids_are_what_containerds_clients_make_and_expiry_times_may_carry_any_offset() {
    let e = Env::native(GcOptions::default());
    let sn = e.sn("native");
    let leases = e.host.leases();
    let c = ctx("default");

    // What containerd's clients send (its random ids are a number, '-' and base64url),
    // and what fits in a header.
    for bad in ["", "bäum", "with space", "tab\there", &"x".repeat(1025)] {
        let err = leases.create(&c, Some(bad), &none()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{bad:?}: {err}");
    }
    let good = ["a.b_c-d", "123--xY_", "456-ab_-", "a/b", ".x", "sha256:ab", &"x".repeat(1024)];
    for (i, id) in good.into_iter().enumerate() {
        leases.create(&c, Some(id), &none()).unwrap();
        let held = c.clone().with_lease(Some(id.to_owned()));
        sn.prepare(&held, &format!("held-{i}"), None, &none()).unwrap();
    }

    // containerd writes `time.Now().Add(d).Format(time.RFC3339)` in local time.
    let at = |text: &str| {
        let l = leases.create(&c, None, &labels(&[("containerd.io/gc.expire", text)])).unwrap();
        l.expires().unwrap()
    };
    let utc = at("2099-01-01T08:00:00Z");
    assert_eq!(at("2099-01-01T10:00:00+02:00"), utc);
    assert_eq!(at("2099-01-01T03:00:00-05:00"), utc);
    assert_eq!(at("2099-01-01T08:00:00.000+00:00"), utc);
    assert_eq!(at("2099-01-01 08:00:00"), utc, "without an offset: UTC, as before");
    let err =
        leases.create(&c, None, &labels(&[("containerd.io/gc.expire", "tomorrow")])).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");

    // A lease and a snapshot past their time, each written with an offset, are collected.
    let l = e.lease("default", "past", &[("containerd.io/gc.expire", "2000-01-01T00:00:00-05:00")]);
    commit(&sn, &l, "leased", None, &[]);
    commit(&sn, &c, "labelled", None, &[("containerd.io/gc.expire", "2000-01-01T02:00:00+02:00")]);
    let report = e.collect();
    assert_eq!(set(removed(&report)), set(["native/default/labelled", "native/default/leased"]));
    assert!(leases.list(&c, &["id==past".to_owned()]).unwrap().is_empty(), "the lease expired");
}

/// Two unpacks of one layer under two leases: the commit that loses the name fails with
/// already-exists, and its lease holds the snapshot that won (containerd 1.7's commit), so
/// the layer outlives the winner's lease.
#[test]
fn a_commit_that_loses_its_name_leaves_the_winner_held_by_its_lease() {
    let e = Env::native(GcOptions::default());
    let sn = e.sn("native");
    let (l1, l2) = (e.lease("default", "l1", &[]), e.lease("default", "l2", &[]));
    sn.prepare(&l1, "extract-1", None, &none()).unwrap();
    sn.prepare(&l2, "extract-2", None, &none()).unwrap();
    sn.commit(&l1, "layer", "extract-1", &none()).unwrap();
    let err = sn.commit(&l2, "layer", "extract-2", &none()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");
    let held = e.host.leases().resources(&ctx("default"), "l2").unwrap();
    assert!(held.contains(&Resource::snapshot("native", "layer")), "{held:?}");
    sn.remove(&l2, "extract-2").unwrap();
    e.drop_lease("default", "l1");
    e.collect();
    assert_eq!(keys(&sn, "default"), ["layer"], "l2 holds it");
    e.drop_lease("default", "l2");
    e.collect();
    assert!(keys(&sn, "default").is_empty());
}

#[test]
fn a_label_set_to_nothing_is_removed_as_containerd_removes_it() {
    let e = Env::native(GcOptions::default());
    let sn = e.sn("native");
    let c = ctx("default");
    // An empty gc.root kept would hold its snapshot for ever.
    let l = e.lease("default", "l", &[]);
    commit(&sn, &l, "s", None, &[("containerd.io/gc.root", ""), ("keep", "yes")]);
    assert_eq!(sn.stat(&c, "s").unwrap().labels, labels(&[("keep", "yes")]));
    let mut info = sn.stat(&c, "s").unwrap();
    info.labels = labels(&[("containerd.io/gc.root", "x")]);
    sn.update(&c, &info, &["labels.containerd.io/gc.root".to_owned()]).unwrap();
    info.labels = labels(&[("containerd.io/gc.root", "")]);
    let updated = sn.update(&c, &info, &["labels.containerd.io/gc.root".to_owned()]).unwrap();
    assert_eq!(updated.labels, labels(&[("keep", "yes")]));
    info.labels = labels(&[("a", ""), ("b", "2")]);
    let updated = sn.update(&c, &info, &[]).unwrap();
    assert_eq!(updated.labels, labels(&[("b", "2")]));
    assert_eq!(sn.stat(&c, "s").unwrap().labels, labels(&[("b", "2")]));
    e.drop_lease("default", "l");
    assert_eq!(removed(&e.collect()), ["native/default/s"], "nothing holds it now");
    let l = e.host.leases().create(&c, None, &labels(&[("x", "")])).unwrap();
    assert!(l.labels.is_empty(), "{:?}", l.labels);
}
