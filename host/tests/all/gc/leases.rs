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
    for bad in [
        Resource { kind: "ingests".into(), id: "ref".into() },
        Resource { kind: "snapshots/".into(), id: "k".into() },
        Resource { kind: "snapshots/a/b".into(), id: "k".into() },
        Resource { kind: "snapshots/native".into(), id: "".into() },
    ] {
        let err = leases.add_resource(&c, "a", &bad).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotImplemented, "{bad:?}: {err}");
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
