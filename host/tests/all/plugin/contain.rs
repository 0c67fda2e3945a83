//! Each misbehaviour of `guests/adversary` is contained.

use serde_json::json;
use wasnap::plugin::Limits;
use wasnap::{Backend, ErrorKind, Filter};

use super::{no_labels, open, tight, while_another_plugin_works};

#[test]
fn a_well_behaved_plugin_serves_and_pings() {
    // A plugin of its own, so that other tests' calls do not show in its counters.
    let wasm = std::fs::read(super::guest("adversary")).unwrap();
    let plugin = wasnap::plugin::Plugin::load("own", &wasm, None).unwrap();
    let r = super::open_plugin(plugin, json!(null), Limits::default()).unwrap();
    let mounts = r.s.prepare("a", None, &no_labels()).unwrap();
    assert_eq!(mounts.len(), 1);
    assert!(mounts[0].source.starts_with(r.root.path().canonicalize().unwrap().to_str().unwrap()));
    r.s.commit("c", "a", &no_labels()).unwrap();
    r.s.ping().unwrap();
    let mut names = Vec::new();
    r.s.walk(&Filter::default(), &mut |i| {
        names.push(i.name);
        Ok(())
    })
    .unwrap();
    assert_eq!(names, ["c"]);
    let c = r.s.plugin().counters().snapshot();
    // init, prepare, commit, ping, and one page of list.
    assert_eq!((c.calls, c.errors, c.traps, c.instances), (5, 0, 0, 1), "{c:?}");
}

#[test]
fn a_guest_that_loops_forever_is_stopped_at_its_deadline() {
    let r = open("adversary", json!({"mode": "spin", "only": "bad"}), tight()).unwrap();
    let before = r.s.plugin().counters().snapshot();
    let err = while_another_plugin_works(|| {
        let started = std::time::Instant::now();
        let err = r.s.prepare("bad", None, &no_labels()).unwrap_err();
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "{:?}", started.elapsed());
        err
    });
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.to_string().contains("deadline of 500 ms"), "{err}");
    // The instance was replaced: the next call is served.
    r.s.prepare("fine", None, &no_labels()).unwrap();
    let after = r.s.plugin().counters().snapshot();
    assert_eq!(after.timeouts - before.timeouts, 1);
    assert!(after.instances - before.instances >= 1);
}

#[test]
fn a_guest_that_waits_in_the_host_for_ever_is_stopped_at_its_deadline() {
    // `std::thread::sleep(Duration::MAX)`: a timer, then a block on it, all in the host,
    // where the epoch deadline never fires. The timer is cut to the call's time left.
    // A plugin of its own, so that other tests' timeouts do not show in its counters.
    let wasm = std::fs::read(super::guest("adversary")).unwrap();
    let plugin = wasnap::plugin::Plugin::load("sleeper", &wasm, None).unwrap();
    let config = json!({"mode": "sleep", "only": "bad"});
    let r = super::open_plugin(plugin, config, tight()).unwrap();
    let before = r.s.plugin().counters().snapshot();
    for _ in 0..2 {
        let started = std::time::Instant::now();
        let err = r.s.prepare("bad", None, &no_labels()).unwrap_err();
        let took = started.elapsed();
        assert!(took < std::time::Duration::from_secs(5), "{took:?}");
        assert!(took >= std::time::Duration::from_millis(500), "{took:?}");
        assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
        assert!(err.to_string().contains("deadline of 500 ms"), "{err}");
    }
    // Each time the instance was replaced, and the next call is served.
    r.s.prepare("fine", None, &no_labels()).unwrap();
    let after = r.s.plugin().counters().snapshot();
    assert_eq!(after.timeouts - before.timeouts, 2);
}

#[test]
fn a_guest_that_allocates_without_bound_hits_its_memory_cap() {
    let r = open("adversary", json!({"mode": "hog", "only": "bad"}), tight()).unwrap();
    let err = while_another_plugin_works(|| r.s.prepare("bad", None, &no_labels()).unwrap_err());
    assert_eq!(err.kind(), ErrorKind::Internal, "{err}");
    assert!(err.to_string().contains("exceeded its memory limit"), "{err}");
    r.s.prepare("fine", None, &no_labels()).unwrap();
}

#[test]
fn a_panic_becomes_an_internal_error_that_quotes_it() {
    let r = open("adversary", json!({"mode": "panic", "only": "bad"}), tight()).unwrap();
    let err = r.s.stat("bad").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Internal, "{err}");
    let text = err.to_string();
    assert!(text.contains("panicked") && text.contains("deliberate panic"), "{text}");
    r.s.prepare("fine", None, &no_labels()).unwrap();
    assert_eq!(r.s.stat("fine").unwrap().name, "fine");
}

#[test]
fn mounts_that_break_the_rules_are_refused() {
    let r = open("adversary", json!({"mode": "bad-mount"}), Limits::default()).unwrap();
    for (i, way) in ["foreign", "twice", "passed", "deep", "removed", "many"].iter().enumerate() {
        for op in ["prepare", "view"] {
            let key = format!("{op}-{i}-{way}");
            let err = match op {
                "prepare" => r.s.prepare(&key, None, &no_labels()),
                _ => r.s.view(&key, None, &no_labels()),
            }
            .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{key}: {err}");
            assert!(err.to_string().contains("plugin \"adversary\""), "{key}: {err}");
        }
    }
    // A well-formed mount from the same guest passes, naming the host's own path.
    let m = r.s.prepare("plain", None, &no_labels()).unwrap();
    assert_eq!(m.len(), 1);
    let root = r.root.path().canonicalize().unwrap();
    assert!(m[0].source.starts_with(root.join("layers").to_str().unwrap()), "{m:?}");
    assert!(!m[0].source.starts_with(root.join("state").to_str().unwrap()), "{m:?}");
}

/// A backend that hands out a writable mount for a view or a committed snapshot is
/// refused above every backend, by the metadata layer, and the view leaves no record.
#[test]
fn a_writable_mount_for_a_view_is_refused_by_the_metadata_layer() {
    use std::sync::Arc;
    use wasnap::fault::Faults;
    use wasnap::metadata::{Ctx, Snapshotter};

    let r = open("adversary", json!({"mode": "bad-mount"}), Limits::default()).unwrap();
    let meta = crate::common::tmp();
    let sn = Snapshotter::new(
        crate::common::metadb(meta.path()),
        "adversary",
        r.s.clone(),
        Arc::new(Faults::new()),
    );
    let ctx = Ctx::new("default").unwrap();
    // Writable is right for an active snapshot.
    let m = sn.prepare(&ctx, "a-writable", None, &no_labels()).unwrap();
    assert!(m[0].options.iter().any(|o| o == "rw"), "{m:?}");
    sn.commit(&ctx, "base", "a-writable", &no_labels()).unwrap();
    let err = sn.view(&ctx, "v-writable", Some("base"), &no_labels()).unwrap_err();
    assert!(err.to_string().contains("writable bind mount for the view snapshot"), "{err}");
    assert_eq!(sn.stat(&ctx, "v-writable").unwrap_err().kind(), ErrorKind::NotFound);
    // A view the guest mounts correctly is read-only, and its mounts stay so.
    let m = sn.view(&ctx, "v", Some("base"), &no_labels()).unwrap();
    assert!(m[0].options.iter().any(|o| o == "ro"), "{m:?}");
}

#[test]
fn walks_that_run_away_are_cut_off() {
    let r = open("adversary", json!({"mode": "huge-walk", "count": 5000}), tight()).unwrap();
    let err = r.s.walk(&Filter::default(), &mut |_| Ok(())).unwrap_err();
    assert!(err.to_string().contains("for a page of at most 1000"), "{err}");

    let limits = Limits { max_walk: 20_000, ..tight() };
    let r = open("adversary", json!({"mode": "huge-walk", "pages": "endless"}), limits).unwrap();
    let mut seen = 0u64;
    let err =
        r.s.walk(&Filter::default(), &mut |_| {
            seen += 1;
            Ok(())
        })
        .unwrap_err();
    assert!(err.to_string().contains("max_walk"), "{err}");
    assert!(seen <= 20_000);

    let r = open("adversary", json!({"mode": "huge-walk", "pages": "unordered"}), tight()).unwrap();
    let err = r.s.walk(&Filter::default(), &mut |_| Ok(())).unwrap_err();
    assert!(err.to_string().contains("out of order"), "{err}");
}

#[test]
fn init_failures_fail_loading_clearly() {
    let err = open("adversary", json!({"mode": "bad-init"}), tight()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    assert!(err.to_string().contains("init"), "{err}");
    for mode in ["slow-init", "sleep-init"] {
        let started = std::time::Instant::now();
        let err = open("adversary", json!({"mode": mode}), tight()).unwrap_err();
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "{mode}");
        assert_eq!(err.kind(), ErrorKind::Unavailable, "{mode}: {err}");
        assert!(err.to_string().contains("deadline"), "{mode}: {err}");
    }
}

#[test]
fn floods_of_output_are_bounded_and_calls_succeed() {
    let r = open("adversary", json!({"mode": "stdout", "bytes": 4_000_000}), Limits::default())
        .unwrap();
    for i in 0..3 {
        r.s.prepare(&format!("k{i}"), None, &no_labels()).unwrap();
    }
}
