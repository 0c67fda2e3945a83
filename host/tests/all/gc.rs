//! Leases and the garbage collector: every rule of `wasnap::gc` (roots, references,
//! expiry, flat leases, retention), the lease manager's API, dry runs and `check`, a
//! backend that hangs, a crash at each step of a collection, and the scheduler.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use wasnap::driver::Native;
use wasnap::driver::overlay::OverlayOptions;
use wasnap::fault::{Action, Faults};
use wasnap::gc::{Collector, GcOptions, GcReport, Retention};
use wasnap::host::{Config, DriverConfig, Host};
use wasnap::metadata::{Leases, Resource};
use wasnap::snapshot::LABEL_SNAPSHOT_REF;
use wasnap::{
    Ctx, ErrorKind, FieldPath, Filter, Info, Labels, Mount, Result, Snapshots, Snapshotter, Usage,
};

use crate::common::*;

const ROOT: &str = "containerd.io/gc.root";
const EXPIRE: &str = "containerd.io/gc.expire";
const FLAT: &str = "containerd.io/gc.flat";
const REF_NATIVE: &str = "containerd.io/gc.ref.snapshot.native";
const BREF_NATIVE: &str = "containerd.io/gc.bref.snapshot.native";
const PAST: &str = "2001-02-03T04:05:06Z";
const FUTURE: &str = "2999-01-01T00:00:00Z";

fn none() -> Labels {
    Labels::new()
}

fn config(drivers: &[&str], gc: GcOptions) -> Config {
    let snapshotters = drivers
        .iter()
        .map(|d| {
            let driver = match *d {
                "native" => DriverConfig::Native,
                "overlay" => DriverConfig::Overlay(OverlayOptions::default()),
                other => panic!("no driver {other} in these tests"),
            };
            (d.to_string(), driver)
        })
        .collect();
    Config { default_snapshotter: drivers[0].to_owned(), snapshotters, gc }
}

/// A host over `drivers` in a fresh root.
struct Env {
    dir: TempDir,
    faults: Arc<Faults>,
    host: Host,
}

impl Env {
    fn new(dir: TempDir, drivers: &[&str], gc: GcOptions) -> Self {
        let faults = Arc::new(Faults::new());
        let host = Host::open_config(dir.path(), faults.clone(), config(drivers, gc)).unwrap();
        Env { dir, faults, host }
    }

    fn native(gc: GcOptions) -> Self {
        Env::new(tmp(), &["native"], gc)
    }

    fn sn(&self, name: &str) -> Arc<Snapshots> {
        self.host.snapshotter(name).unwrap()
    }

    /// Creates lease `id` in `ns` and returns a context that calls under it.
    fn lease(&self, ns: &str, id: &str, l: &[(&str, &str)]) -> Ctx {
        self.host.leases().create(&ctx(ns), Some(id), &labels(l)).unwrap();
        ctx(ns).with_lease(Some(id.to_owned()))
    }

    fn drop_lease(&self, ns: &str, id: &str) {
        assert!(self.host.delete_lease(&ctx(ns), id, false).unwrap().is_none());
    }

    fn collect(&self) -> GcReport {
        let r = self.host.collect(false).unwrap();
        assert!(r.failed.is_empty(), "{:?}", r.failed);
        r
    }

    fn lease_ids(&self, ns: &str) -> Vec<String> {
        self.host.leases().list(&ctx(ns), &[]).unwrap().into_iter().map(|l| l.id).collect()
    }
}

/// Prepares `<name>-active` on `parent` and commits it as `name` with `l`.
fn commit(sn: &Snapshots, c: &Ctx, name: &str, parent: Option<&str>, l: &[(&str, &str)]) {
    let active = format!("{name}-active");
    sn.prepare(c, &active, parent, &none()).unwrap();
    sn.commit(c, name, &active, &labels(l)).unwrap();
}

/// The keys of a namespace, sorted.
fn keys(sn: &Snapshots, ns: &str) -> Vec<String> {
    names(&list(sn, &ctx(ns), &[]).unwrap())
}

/// What a report says was removed, as `snapshotter/namespace/key`, sorted.
fn removed(r: &GcReport) -> Vec<String> {
    r.removed.iter().map(|s| format!("{}/{}/{}", s.snapshotter, s.namespace, s.key)).collect()
}

/// What a report says was pruned from the backends, as `snapshotter:bkey`, in order.
fn pruned(r: &GcReport) -> Vec<String> {
    r.pruned.iter().map(|(s, k)| format!("{s}:{k}")).collect()
}

/// The backend's keys, sorted.
fn bkeys(sn: &Snapshots) -> Vec<String> {
    backend_keys(sn.backend().as_ref()).into_iter().map(|i| i.name).collect()
}

/// The backend key (`<ns>/<seq>/<key>`) of the record `key` in `ns`.
fn bkey(sn: &Snapshots, ns: &str, key: &str) -> String {
    let found: Vec<String> = bkeys(sn)
        .into_iter()
        .filter(|b| {
            let mut parts = b.splitn(3, '/');
            parts.next() == Some(ns)
                && parts.next().is_some_and(|s| s.parse::<u64>().is_ok())
                && parts.next() == Some(key)
        })
        .collect();
    assert_eq!(found.len(), 1, "backend key of {ns}/{key}: {found:?}");
    found.into_iter().next().unwrap()
}

fn set<I: IntoIterator<Item = S>, S: Into<String>>(items: I) -> BTreeSet<String> {
    items.into_iter().map(Into::into).collect()
}

/// Sets (`Some`) or deletes (`None`) one label of `key`.
fn set_label(sn: &Snapshots, c: &Ctx, key: &str, label: &str, value: Option<&str>) {
    let mut info = sn.stat(c, key).unwrap();
    match value {
        Some(v) => info.labels.insert(label.to_owned(), v.to_owned()),
        None => info.labels.remove(label),
    };
    sn.update(c, &info, &[format!("labels.{label}")]).unwrap();
}

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
    set_label(&sn, &l, "later", ROOT, Some(""));

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
    for bad in [
        Resource { kind: "content".into(), id: "sha256:abc".into() },
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

impl Snapshotter for Stuck {
    fn stat(&self, key: &str) -> Result<Info> {
        self.inner.stat(key)
    }
    fn update(&self, info: &Info, fieldpaths: &[FieldPath]) -> Result<Info> {
        self.inner.update(info, fieldpaths)
    }
    fn usage(&self, key: &str) -> Result<Usage> {
        self.inner.usage(key)
    }
    fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        self.inner.mounts(key)
    }
    fn prepare(&self, key: &str, parent: Option<&str>, labels: &Labels) -> Result<Vec<Mount>> {
        self.inner.prepare(key, parent, labels)
    }
    fn view(&self, key: &str, parent: Option<&str>, labels: &Labels) -> Result<Vec<Mount>> {
        self.inner.view(key, parent, labels)
    }
    fn commit(&self, name: &str, key: &str, labels: &Labels) -> Result<()> {
        self.inner.commit(name, key, labels)
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
    fn walk(&self, filter: &Filter, f: &mut dyn FnMut(Info) -> Result<()>) -> Result<()> {
        self.inner.walk(filter, f)
    }
    fn cleanup(&self) -> Result<()> {
        self.inner.cleanup()
    }
    fn close(&self) -> Result<()> {
        self.inner.close()
    }
}

#[test]
fn a_hanging_backend_neither_wedges_the_collection_nor_holds_writers() {
    let dir = tmp();
    let faults = Arc::new(Faults::new());
    let backend = Stuck::new(native(dir.path(), faults.clone()));
    let db = metadb(dir.path());
    let sn = Arc::new(Snapshots::new(db.clone(), "native", backend.clone(), faults.clone()));
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
        host.delete_lease(&c, "l", false).unwrap();
    };
    setup(1);

    let scheduler = host.start_gc().unwrap();
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(
        keys(&sn, "default"),
        ["leased1", "unrelated1"],
        "nothing calls for a collection yet"
    );
    sn.remove(&c, "unrelated1").unwrap();
    let t = Instant::now();
    while keys(&sn, "default").contains(&"leased1".to_owned()) {
        assert!(t.elapsed() < Duration::from_secs(5), "the scheduler never collected");
        std::thread::sleep(Duration::from_millis(10));
    }
    while !bkeys(&sn).is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the backend was never pruned: {:?}",
            bkeys(&sn)
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    let t = Instant::now();
    drop(scheduler);
    assert!(t.elapsed() < Duration::from_secs(2), "dropping the scheduler took {:?}", t.elapsed());
    setup(2);
    sn.remove(&c, "unrelated2").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(keys(&sn, "default"), ["leased2"], "no collections after the scheduler is dropped");
    assert_eq!(removed(&host.collect(false).unwrap()), ["native/default/leased2"]);
}

// Shared backend snapshots --------------------------------------------------------------

#[test]
fn a_backend_snapshot_two_namespaces_share_is_pruned_only_when_both_records_go() {
    let dir = tmp();
    let faults = Arc::new(Faults::new());
    let backend: Arc<dyn Snapshotter> =
        Arc::new(Dedup { inner: native(dir.path(), faults.clone()) });
    let db = metadb(dir.path());
    let sn = Arc::new(Snapshots::new(db.clone(), "native", backend, faults.clone()));
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
    assert!(sn.mounts(&ctx("b"), "sha256:shared").is_ok());

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
