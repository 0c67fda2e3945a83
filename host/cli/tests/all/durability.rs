//! What survives a restart and a crash. These run on the real disk, where fsync means
//! something, and kill a real `wasnap` process at injected fault points.

use std::path::Path;
use std::process::{Command, Output};

use wasnap::Host;
use wasnap::{ErrorKind, Kind, Labels};

use crate::common::*;

fn wasnap(root: &Path, faults: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wasnap"));
    cmd.arg("--root").arg(root).args(args).env_remove("WASNAP_FAULTS");
    if let Some(f) = faults {
        cmd.env("WASNAP_FAULTS", f);
    }
    cmd.output().expect("run wasnap")
}

fn ok(out: Output) -> String {
    assert!(out.status.success(), "wasnap failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

fn crashed(out: &Output) -> bool {
    use std::os::unix::process::ExitStatusExt;
    out.status.signal() == Some(libc_sigabrt())
}

fn libc_sigabrt() -> i32 {
    rustix::process::Signal::ABORT.as_raw()
}

fn backend_count(root: &Path) -> usize {
    let host = Host::open(root).unwrap();
    let sn = host.snapshotter("native").unwrap();
    backend_keys(sn.backend().as_ref()).len()
}

#[test]
fn snapshots_survive_close_and_reopen() {
    let dir = disk_tmp();
    let c = ctx("default");
    {
        let host = Host::open(dir.path()).unwrap();
        let sn = host.snapshotter("native").unwrap();
        let m = sn.prepare(&c, "a", None, &labels(&[("l", "v")])).unwrap();
        std::fs::write(source(&m).join("f"), "kept").unwrap();
        sn.commit(&c, "base", "a", &Labels::new()).unwrap();
        sn.prepare(&c, "child", Some("base"), &Labels::new()).unwrap();
        host.close().unwrap();
    }
    let host = Host::open(dir.path()).unwrap();
    let sn = host.snapshotter("native").unwrap();
    assert_eq!(names(&list(&sn, &c, &[]).unwrap()), ["base", "child"]);
    assert_eq!(sn.stat(&c, "child").unwrap().parent.as_deref(), Some("base"));
    assert_eq!(sn.stat(&c, "base").unwrap().kind, Kind::Committed);
    let m = sn.mounts(&c, "child").unwrap();
    assert_eq!(std::fs::read_to_string(source(&m).join("f")).unwrap(), "kept");
    // New keys after a reopen never collide with old backend keys.
    sn.prepare(&c, "after", Some("base"), &Labels::new()).unwrap();
    assert_eq!(backend_keys(sn.backend().as_ref()).len(), 3);
}

#[test]
fn a_second_opener_of_the_same_root_is_refused_clearly() {
    let dir = tmp();
    let _first = Host::open(dir.path()).unwrap();
    let err = Host::open(dir.path()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.to_string().contains("in use by another process"), "{err}");
    let out = wasnap(dir.path(), None, &["ls"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("in use by another process"), "{stderr}");
}

#[test]
fn a_crash_between_backend_and_record_is_reclaimed_by_cleanup() {
    let dir = disk_tmp();
    let root = dir.path();
    ok(wasnap(root, None, &["prepare", "a"]));
    ok(wasnap(root, None, &["commit", "base", "a"]));
    for point in [
        "metadata.create.after-backend",
        "native.create.before-commit",
        "native.create.before-rename",
    ] {
        let out = wasnap(root, Some(&format!("{point}=abort")), &["prepare", "child", "base"]);
        assert!(crashed(&out), "{point}: expected an abort, got {:?}", out.status);
        let listed = ok(wasnap(root, None, &["ls"]));
        assert!(!listed.contains("child"), "{point}: no record of the crashed prepare:\n{listed}");
        ok(wasnap(root, None, &["cleanup"]));
        assert_eq!(backend_count(root), 1, "{point}: cleanup left only base");
        let tmp_left = std::fs::read_dir(root.join("snapshotters/native/tmp")).unwrap().count();
        assert_eq!(tmp_left, 0, "{point}: no half-built trees");
        // The key is usable again, and new backend snapshots do not trip over leftovers.
        ok(wasnap(root, None, &["prepare", "child", "base"]));
        ok(wasnap(root, None, &["rm", "child"]));
    }
}

/// Whichever way a cut-short commit went, the snapshot exists with its data, as active
/// `a` or committed `base`, and nothing else is left: no orphan, no record without data.
fn assert_one_whole_snapshot(root: &Path) -> Kind {
    assert_one_whole(&Host::open(root).unwrap(), "native")
}

/// [`assert_one_whole_snapshot`] in `host`'s snapshotter `name`.
fn assert_one_whole(host: &Host, name: &str) -> Kind {
    let sn = host.snapshotter(name).unwrap();
    let c = ctx("default");
    let left = list(&sn, &c, &[]).unwrap();
    assert_eq!(left.len(), 1, "{left:?}");
    let key = &left[0].name;
    assert!(
        (key == "a" && left[0].kind == Kind::Active)
            || (key == "base" && left[0].kind == Kind::Committed),
        "{left:?}"
    );
    let m = match left[0].kind {
        Kind::Committed => sn.committed_mounts(&c, key),
        _ => sn.mounts(&c, key),
    };
    assert_eq!(std::fs::read_to_string(source(&m.unwrap()).join("f")).unwrap(), "data", "{key}");
    for report in host.check().unwrap() {
        assert!(report.orphans.is_empty() && report.missing.is_empty(), "{report:?}");
    }
    left[0].kind
}

/// The native driver's records are in the root's database: its commit and the
/// metadata's are one transaction, so a commit that fails after the driver's step
/// changes nothing at all (the commit intent's recovery, which a plugin's commit needs,
/// is tested in the host's metadata tests).
#[test]
fn a_commit_failing_after_the_driver_step_changes_nothing() {
    let dir = disk_tmp();
    let root = dir.path();
    let c = ctx("default");
    {
        let faults = std::sync::Arc::new(wasnap::fault::Faults::new());
        let host = Host::open_with(root, faults.clone()).unwrap();
        let sn = host.snapshotter("native").unwrap();
        let m = sn.prepare(&c, "a", None, &Labels::new()).unwrap();
        std::fs::write(source(&m).join("f"), "data").unwrap();
        faults.arm("metadata.commit.after-backend", wasnap::fault::Action::Error);
        sn.commit(&c, "base", "a", &labels(&[("l", "v")])).unwrap_err();
        let info = sn.stat(&c, "a").unwrap();
        assert_eq!(info.kind, Kind::Active, "{info:?}");
        sn.stat(&c, "base").unwrap_err();
        faults.disarm("metadata.commit.after-backend");
        host.close().unwrap();
    }
    assert_eq!(assert_one_whole_snapshot(root), Kind::Active);
    // And the commit goes through once nothing fails.
    let host = Host::open(root).unwrap();
    let sn = host.snapshotter("native").unwrap();
    sn.commit(&c, "base", "a", &labels(&[("l", "v")])).unwrap();
    assert_eq!(sn.stat(&c, "base").unwrap().labels, labels(&[("l", "v")]));
    host.close().unwrap();
    drop((sn, host));
    assert_eq!(assert_one_whole_snapshot(root), Kind::Committed);
}

#[test]
fn a_commit_cut_short_before_the_backend_is_undone_at_the_next_open() {
    let dir = disk_tmp();
    let root = dir.path();
    let c = ctx("default");
    {
        let faults = std::sync::Arc::new(wasnap::fault::Faults::new());
        let host = Host::open_with(root, faults.clone()).unwrap();
        let sn = host.snapshotter("native").unwrap();
        let m = sn.prepare(&c, "a", None, &Labels::new()).unwrap();
        std::fs::write(source(&m).join("f"), "data").unwrap();
        faults.arm("metadata.commit.before-backend", wasnap::fault::Action::Error);
        sn.commit(&c, "base", "a", &Labels::new()).unwrap_err();
        // A backend step that failed undoes the intent at once.
        sn.stat(&c, "a").unwrap();
        host.close().unwrap();
    }
    assert_eq!(assert_one_whole_snapshot(root), Kind::Active);
}

#[test]
fn a_process_killed_at_any_step_of_a_commit_leaves_one_whole_snapshot() {
    for point in [
        "metadata.commit.before-backend",
        "native.commit.before-commit",
        "metadata.commit.after-backend",
    ] {
        let dir = disk_tmp();
        let root = dir.path();
        let m = ok(wasnap(root, None, &["--format", "json", "prepare", "a"]));
        let mounts: serde_json::Value = serde_json::from_str(&m).unwrap();
        let src = mounts[0]["source"].as_str().unwrap().to_owned();
        std::fs::write(Path::new(&src).join("f"), "data").unwrap();
        let out = wasnap(root, Some(&format!("{point}=abort")), &["commit", "base", "a"]);
        assert!(crashed(&out), "{point}: {:?}", out.status);
        assert_one_whole_snapshot(root);
    }
}

/// A commit over a plugin whose store is the root's database. Killed before the plugin
/// is called, while the intent is written (in a process's first commit, before the
/// call; in a daemon's later ones, inside the plugin's first write, which the host's
/// metadata tests and the soak cover), or after the plugin returned, the snapshot is
/// whole, active or committed, and a commit cut short goes through when asked again.
#[test]
fn a_process_killed_at_any_step_of_a_commit_over_a_plugin_leaves_one_whole_snapshot() {
    let copy = wasnap_test_util::guests::path("copy").unwrap_or_else(|e| panic!("{e}"));
    let config = format!(
        "default_snapshotter = \"copy\"\n[snapshotters.copy]\ndriver = \"wasm\"\npath = {:?}\n",
        copy.to_str().unwrap()
    );
    for point in [
        "metadata.commit.before-backend",
        "metadata.commit.intent",
        "metadata.commit.after-backend",
    ] {
        let dir = disk_tmp();
        let root = dir.path();
        let file = root.join("wasnap.toml");
        std::fs::write(&file, &config).unwrap();
        let with = |args: &[&str]| {
            let mut v = vec!["--config", file.to_str().unwrap()];
            v.extend_from_slice(args);
            v.into_iter().map(str::to_owned).collect::<Vec<_>>()
        };
        let run = |faults: Option<&str>, args: &[&str]| {
            let args = with(args);
            wasnap(root, faults, &args.iter().map(String::as_str).collect::<Vec<_>>())
        };
        let m = ok(run(None, &["--format", "json", "prepare", "a"]));
        let mounts: serde_json::Value = serde_json::from_str(&m).unwrap();
        let src = mounts[0]["source"].as_str().unwrap().to_owned();
        std::fs::write(Path::new(&src).join("f"), "data").unwrap();
        let out = run(Some(&format!("{point}=abort")), &["commit", "base", "a"]);
        assert!(crashed(&out), "{point}: {:?}", out.status);
        let open = || {
            let config = wasnap::config::Config::parse(&config, "test").unwrap();
            let faults = std::sync::Arc::new(wasnap::fault::Faults::new());
            Host::open_config(root, faults, config).unwrap()
        };
        let host = open();
        let kind = assert_one_whole(&host, "copy");
        host.close().unwrap();
        drop(host);
        if kind == Kind::Active {
            ok(run(None, &["commit", "base", "a"]));
        }
        let host = open();
        assert_eq!(assert_one_whole(&host, "copy"), Kind::Committed, "{point}");
        host.close().unwrap();
    }
}

#[test]
fn a_crash_in_the_middle_of_a_remove_is_finished_by_cleanup() {
    let dir = disk_tmp();
    let root = dir.path();
    let trees = || std::fs::read_dir(root.join("snapshotters/native/snapshots")).unwrap().count();
    ok(wasnap(root, None, &["prepare", "a"]));
    // Killed once the records are gone, before the data is deleted.
    let out = wasnap(root, Some("metadata.remove.backend=abort"), &["rm", "a"]);
    assert!(crashed(&out));
    assert_eq!(ok(wasnap(root, None, &["ls"])).lines().count(), 1, "the record is gone");
    assert_eq!(backend_count(root), 0, "the driver's record went in the same transaction");
    assert_eq!(trees(), 1, "the data is still there");
    ok(wasnap(root, None, &["cleanup"]));
    assert_eq!(trees(), 0, "cleanup reclaimed the data no record names");
}

#[test]
fn overlay_killed_between_the_steps_of_commit_and_remove_converges() {
    let dir = disk_tmp();
    let root = dir.path();
    fn ov<'a>(args: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec!["-s", "overlay"];
        v.extend_from_slice(args);
        v
    }
    let backend = |root: &Path| {
        let host = Host::open(root).unwrap();
        backend_keys(host.snapshotter("overlay").unwrap().backend().as_ref()).len()
    };
    let trees = |root: &Path| {
        std::fs::read_dir(root.join("snapshotters/overlay/snapshots")).unwrap().count()
    };
    ok(wasnap(root, None, &ov(&["prepare", "a"])));
    ok(wasnap(root, None, &ov(&["commit", "base", "a"])));
    ok(wasnap(root, None, &ov(&["prepare", "child", "base"])));

    // Killed inside the driver's commit: the commit never happened.
    let out =
        wasnap(root, Some("overlay.commit.before-commit=abort"), &ov(&["commit", "done", "child"]));
    assert!(crashed(&out), "{:?}", out.status);
    let listed = ok(wasnap(root, None, &ov(&["ls"])));
    assert!(listed.contains("child") && !listed.contains("done"), "{listed}");
    ok(wasnap(root, None, &ov(&["commit", "done", "child"])));

    // Killed inside the driver's remove, before the transaction that removes both
    // records: nothing was removed.
    ok(wasnap(root, None, &ov(&["prepare", "scratch", "done"])));
    let out = wasnap(root, Some("overlay.remove.before-commit=abort"), &ov(&["rm", "scratch"]));
    assert!(crashed(&out), "{:?}", out.status);
    assert!(ok(wasnap(root, None, &ov(&["ls"]))).contains("scratch"), "nothing was removed");
    // Killed after it, before the tree was moved out: the removal stands, and the tree
    // no record names is reclaimed by cleanup.
    let out = wasnap(root, Some("overlay.remove.before-delete=abort"), &ov(&["rm", "scratch"]));
    assert!(crashed(&out), "{:?}", out.status);
    assert!(!ok(wasnap(root, None, &ov(&["ls"]))).contains("scratch"), "the removal stands");
    assert_eq!(trees(root), 3, "its tree is still there");
    ok(wasnap(root, None, &ov(&["cleanup"])));
    assert_eq!(backend(root), 2, "base and done remain in the backend");
    assert_eq!(trees(root), 2, "no tree without a record");
    let tmp = std::fs::read_dir(root.join("snapshotters/overlay/tmp")).unwrap().count();
    assert_eq!(tmp, 0, "cleanup reclaimed the moved tree");

    // Killed between building a tree and recording it.
    let out =
        wasnap(root, Some("overlay.create.before-commit=abort"), &ov(&["prepare", "c2", "done"]));
    assert!(crashed(&out));
    ok(wasnap(root, None, &ov(&["cleanup"])));
    assert_eq!((backend(root), trees(root)), (2, 2));
    assert_eq!(ok(wasnap(root, None, &ov(&["ls"]))).lines().count(), 3, "header, base, done");
}

#[test]
fn a_process_killed_during_a_collection_converges_and_loses_nothing_held() {
    let dir = disk_tmp();
    let root = dir.path();
    let mounts_of = |key: &str| -> serde_json::Value {
        serde_json::from_str(&ok(wasnap(root, None, &["--format", "json", "mounts", key]))).unwrap()
    };
    ok(wasnap(root, None, &["lease", "create", "--id", "kept"]));
    ok(wasnap(root, None, &["lease", "create", "--id", "dropped"]));
    ok(wasnap(root, None, &["--lease", "kept", "prepare", "held"]));
    let held_dir = mounts_of("held")[0]["source"].as_str().unwrap().to_owned();
    std::fs::write(Path::new(&held_dir).join("data"), "precious").unwrap();
    ok(wasnap(root, None, &["--lease", "dropped", "prepare", "a"]));
    ok(wasnap(root, None, &["--lease", "dropped", "commit", "garbage", "a"]));
    ok(wasnap(root, None, &["prepare", "unleased"]));
    ok(wasnap(root, None, &["lease", "rm", "dropped"]));

    // Killed before the sweep commits: nothing changed.
    let out = wasnap(root, Some("gc.sweep.before-commit=abort"), &["gc"]);
    assert!(crashed(&out), "{:?}", out.status);
    assert!(ok(wasnap(root, None, &["ls"])).contains("garbage"));

    // Killed after the sweep, before pruning: the record is gone, its data is an orphan
    // that a check shows and the next collection prunes.
    let out = wasnap(root, Some("gc.before-prune=abort"), &["gc"]);
    assert!(crashed(&out), "{:?}", out.status);
    let listed = ok(wasnap(root, None, &["ls"]));
    assert!(
        !listed.contains("garbage") && listed.contains("held") && listed.contains("unleased"),
        "{listed}"
    );
    let check = ok(wasnap(root, None, &["gc", "--check"]));
    assert!(check.contains("/garbage") && check.contains("no record names it"), "{check}");
    let gc = ok(wasnap(root, None, &["gc"]));
    assert!(gc.contains("pruned"), "{gc}");
    assert!(ok(wasnap(root, None, &["gc", "--check"])).contains("0 problems"));
    assert_eq!(backend_count(root), 2, "held and unleased remain");
    assert_eq!(std::fs::read_to_string(Path::new(&held_dir).join("data")).unwrap(), "precious");
}
