//! Loading plugins: the world check, the compile cache, roles.

use serde_json::json;
use wasnap::plugin::{Limits, Plugin, Role, WasmSnapshotter};
use wasnap::{Backend, ErrorKind};

use super::{guest, no_labels, open, plugin};
use crate::common::tmp;

#[test]
fn a_plugin_built_against_another_wit_version_is_refused_in_plain_words() {
    let wasm = std::fs::read(guest("wrong-version")).unwrap();
    let info = Plugin::inspect(&wasm, None).unwrap();
    assert_eq!(info.role, None);
    let why = info.compatible.unwrap_err();
    assert!(why.contains("built against wasnap:snapshotter@0.1.0"), "{why}");
    assert!(why.contains("this host speaks wasnap:snapshotter@0.2.0"), "{why}");
    let err = Plugin::load("wrong", &wasm, None).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(err.to_string().contains("built against wasnap:snapshotter@0.1.0"), "{err}");
}

#[test]
fn what_is_not_a_component_is_refused() {
    for (bytes, says) in [
        (&b"\0asm\x01\0\0\0"[..], "not a WebAssembly component"),
        (&b"#!/bin/sh\necho hi\n"[..], "not a WebAssembly component"),
        (&b"\0asm\x0d\0\x01\0garbage"[..], "compile plugin"),
    ] {
        let err = Plugin::load("x", bytes, None).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
        assert!(err.to_string().contains(says), "{err}");
    }
}

#[test]
fn compiled_code_is_cached_by_content_and_a_bad_cache_file_is_recompiled() {
    let dir = tmp();
    let cache =
        cap_std::fs::Dir::open_ambient_dir(dir.path(), cap_std::ambient_authority()).unwrap();
    let wasm = std::fs::read(guest("adversary")).unwrap();
    let cold = Plugin::load("a", &wasm, Some(&cache)).unwrap();
    assert!(!cold.info().cached);
    let warm = Plugin::load("a", &wasm, Some(&cache)).unwrap();
    assert!(warm.info().cached);
    assert_eq!(warm.role(), Role::Backend);
    let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].to_str().unwrap().ends_with(".cwasm"));
    // Compiled code is mapped from the file, and a mapped file cut short under a live
    // component faults it (SIGBUS): the host only ever replaces cache files by rename, so
    // the test drops its components before damaging the file in place.
    drop((cold, warm));
    std::fs::write(&files[0], b"not compiled code").unwrap();
    let again = Plugin::load("a", &wasm, Some(&cache)).unwrap();
    assert!(!again.info().cached, "an unusable cache file is replaced, not trusted");
    assert!(Plugin::load("a", &wasm, Some(&cache)).unwrap().info().cached);
}

#[test]
fn roles_must_match_their_place_in_the_chain() {
    let dir = tmp();
    let path = dir.path().canonicalize().unwrap();
    let cap = || cap_std::fs::Dir::open_ambient_dir(&path, cap_std::ambient_authority()).unwrap();
    let backend = open("adversary", json!(null), Limits::default()).unwrap();
    let err = WasmSnapshotter::open_in(
        plugin("adversary"),
        &cap(),
        &path,
        Some(backend.s.clone()),
        Limits::default(),
        &json!(null),
    )
    .unwrap_err();
    assert!(err.to_string().contains("is a backend"), "{err}");
    let err = WasmSnapshotter::open_in(
        plugin("label-policy"),
        &cap(),
        &path,
        None,
        Limits::default(),
        &json!(null),
    )
    .unwrap_err();
    assert!(err.to_string().contains("is a policy"), "{err}");
}

#[test]
fn limits_are_checked() {
    for bad in [
        Limits { memory_mib: 0, ..Limits::default() },
        Limits { timeout_ms: 0, ..Limits::default() },
        Limits { instances: 0, ..Limits::default() },
    ] {
        let err = open("adversary", json!(null), bad).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    }
}

/// Several instances of the `copy` guest share one store: while one removes an id marker
/// or a record another is listing the same directory, and every call must still succeed.
#[test]
fn instances_sharing_a_store_do_not_trip_over_each_other() {
    let limits = Limits { instances: 4, ..Limits::default() };
    let running = open("copy", serde_json::Value::Null, limits).unwrap();
    std::thread::scope(|s| {
        for t in 0..4 {
            let sn = running.s.clone();
            s.spawn(move || {
                for i in 0..150 {
                    let (key, name) = (format!("t{t}-a{i}"), format!("t{t}-c{i}"));
                    sn.prepare(&key, None, &no_labels()).unwrap();
                    sn.commit(&name, &key, &no_labels()).unwrap();
                    sn.remove(&name).unwrap();
                }
            });
        }
    });
    let mut left = 0;
    running
        .s
        .walk(&wasnap::Filter::default(), &mut |_| {
            left += 1;
            Ok(())
        })
        .unwrap();
    assert_eq!(left, 0);
}
