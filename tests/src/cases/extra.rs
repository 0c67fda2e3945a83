//! Backend cases containerd's suite lacks: places where a snapshotter can go wrong that
//! its suite does not look at.

use std::sync::Arc;

use wasnap::{Backend, ErrorKind, Kind, Labels};

use super::helpers::{
    check_active, check_view, expect_any_err, expect_err, expected, layer, no_labels, walk_all,
    write_active,
};
use crate::fixture::Op;
use crate::harness::{Case, Env, Fail, Group};

pub(crate) const CASES: &[Case] = &[
    Case {
        name: "UsageActiveAndCommitted",
        group: Group::Extra,
        about: "usage counts what a snapshot holds, while active and once committed",
        run: usage_active_and_committed,
    },
    Case {
        name: "CloseAndReopen",
        group: Group::Extra,
        about: "closing and reopening the backend keeps every snapshot, its kind, labels and files",
        run: close_and_reopen,
    },
    Case {
        name: "ConcurrentPrepares",
        group: Group::Extra,
        about: "many threads preparing and committing on one parent all succeed, each with the parent's files",
        run: concurrent_prepares,
    },
    Case {
        name: "ErrorClasses",
        group: Group::Extra,
        about: "failures carry containerd's error classes (not-found, already-exists, failed-precondition)",
        run: error_classes,
    },
    Case {
        name: "CleanupKeepsLiveSnapshots",
        group: Group::Extra,
        about: "cleanup reclaims space but never touches a snapshot that exists",
        run: cleanup_keeps_live_snapshots,
    },
];

fn usage_active_and_committed(env: &Env<'_>) -> Result<(), Fail> {
    let b = env.open()?;
    const MIB: u64 = 1 << 20;
    let ops = [Op::dir("d", 0o755), Op::file("d/big", vec![0x5a; MIB as usize], 0o644)];
    write_active(env, b.as_ref(), "active", None, &ops)?;
    let active = b.usage("active")?;
    ensure!(
        active.size >= MIB,
        "usage of an active snapshot holding 1 MiB is {} bytes",
        active.size
    );
    ensure!(
        active.inodes >= 2,
        "usage of an active snapshot holding a dir and a file counts {} inodes",
        active.inodes
    );
    b.commit("committed", "active", &no_labels())?;
    let committed = b.usage("committed")?;
    ensure!(
        committed.size >= MIB,
        "usage of the committed snapshot is {} bytes, expected at least 1 MiB",
        committed.size
    );
    ensure!(
        committed.inodes >= 2,
        "usage of the committed snapshot counts {} inodes",
        committed.inodes
    );
    ensure_eq!(b.usage("committed")?, committed, "asking twice for a committed snapshot's usage");
    expect_err(b.usage("missing"), ErrorKind::NotFound, "usage of a missing snapshot")
}

fn close_and_reopen(env: &Env<'_>) -> Result<(), Fail> {
    let base_ops = [Op::dir("etc", 0o755), Op::file("etc/hostname", "before", 0o644)];
    let child_ops = [Op::file("etc/hostname", "after", 0o600), Op::file("new", "x", 0o644)];
    let mut labels = Labels::new();
    labels.insert("containerd.io/snapshot/test.reopen".into(), "kept".into());
    {
        let b = env.open()?;
        let key = "base-active";
        write_active(env, b.as_ref(), key, None, &base_ops)?;
        b.commit("base", key, &labels)?;
        write_active(env, b.as_ref(), "child", Some("base"), &child_ops)?;
        b.view("view", Some("base"), &no_labels())?;
        b.close()?;
    }
    let b = env.open()?;
    let infos = walk_all(b.as_ref(), "")?;
    let got: Vec<(String, Kind, Option<String>)> =
        infos.iter().map(|i| (i.name.clone(), i.kind, i.parent.clone())).collect();
    let want = vec![
        ("base".to_string(), Kind::Committed, None),
        ("child".to_string(), Kind::Active, Some("base".to_string())),
        ("view".to_string(), Kind::View, Some("base".to_string())),
    ];
    ensure_eq!(got, want, "snapshots after reopening");
    ensure_eq!(b.stat("base")?.labels, labels, "labels of base after reopening");
    check_active(env, b.as_ref(), "child", &expected(env, &[&base_ops, &child_ops])?)?;
    let m = env.mount(&b.mounts("view")?)?;
    let seen = crate::fixture::check_equal(m.path(), &expected(env, &[&base_ops])?);
    let wrote = std::fs::write(m.path().join("probe"), "x");
    m.unmount()?;
    seen.map_err(|e| Fail::Failed(format!("view after reopening: {e}")))?;
    ensure!(wrote.is_err(), "a view is writable after reopening");
    // The reopened backend keeps working.
    b.commit("child-committed", "child", &no_labels())?;
    check_view(env, b.as_ref(), "child-committed", &expected(env, &[&base_ops, &child_ops])?)
}

fn concurrent_prepares(env: &Env<'_>) -> Result<(), Fail> {
    let b = env.open()?;
    let base_ops = [Op::file("shared", "from the parent", 0o644)];
    layer(env, b.as_ref(), "base", None, &base_ops)?;
    let (threads, per_thread) = (8, 5);
    let failures: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let b: Arc<dyn Backend> = b.clone();
                s.spawn(move || -> Result<(), String> {
                    for i in 0..per_thread {
                        let key = format!("t{t}-{i}");
                        b.prepare(&key, Some("base"), &Labels::new())
                            .map_err(|e| format!("prepare {key}: {e}"))?;
                        if i % 2 == 0 {
                            b.commit(&format!("{key}-c"), &key, &Labels::new())
                                .map_err(|e| format!("commit {key}: {e}"))?;
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().unwrap_or_else(|_| Err("thread panicked".into())).err())
            .collect()
    });
    ensure!(failures.is_empty(), "concurrent prepares failed: {}", failures.join("; "));
    let children = walk_all(b.as_ref(), "parent==base")?;
    ensure_eq!(children.len(), threads * per_thread, "children of base after concurrent prepares");
    let want = expected(env, &[&base_ops])?;
    for key in ["t0-1", "t7-3"] {
        check_active(env, b.as_ref(), key, &want)?;
    }
    check_view(env, b.as_ref(), "t3-0-c", &want)
}

fn error_classes(env: &Env<'_>) -> Result<(), Fail> {
    let b = env.open()?;
    let none = no_labels();
    b.prepare("a", None, &none)?;
    b.commit("base", "a", &none)?;
    b.prepare("child", Some("base"), &none)?;
    b.view("view", Some("base"), &none)?;
    expect_err(b.stat("missing"), ErrorKind::NotFound, "stat of a missing snapshot")?;
    expect_err(b.mounts("missing"), ErrorKind::NotFound, "mounts of a missing snapshot")?;
    expect_err(
        b.prepare("child", Some("base"), &none),
        ErrorKind::AlreadyExists,
        "prepare with a key in use",
    )?;
    expect_err(
        b.view("view", Some("base"), &none),
        ErrorKind::AlreadyExists,
        "view with a key in use",
    )?;
    expect_err(
        b.prepare("x", Some("missing"), &none),
        ErrorKind::NotFound,
        "prepare on a missing parent",
    )?;
    expect_err(
        b.prepare("child2", Some("base"), &none).and_then(|_| b.commit("base", "child2", &none)),
        ErrorKind::AlreadyExists,
        "commit to a name in use",
    )?;
    expect_err(
        b.commit("c", "missing", &none),
        ErrorKind::NotFound,
        "commit of a missing snapshot",
    )?;
    expect_any_err(b.commit("c", "view", &none), "commit of a view")?;
    expect_err(
        b.remove("base"),
        ErrorKind::FailedPrecondition,
        "remove of a snapshot with children",
    )?;
    expect_err(b.remove("missing"), ErrorKind::NotFound, "remove of a missing snapshot")?;
    ensure_eq!(b.stat("base")?.kind, Kind::Committed, "base after the failed calls");
    Ok(())
}

fn cleanup_keeps_live_snapshots(env: &Env<'_>) -> Result<(), Fail> {
    let b = env.open()?;
    let ops = [Op::file("f", "kept", 0o644)];
    layer(env, b.as_ref(), "base", None, &ops)?;
    write_active(env, b.as_ref(), "active", Some("base"), &[Op::file("g", "mine", 0o644)])?;
    b.view("view", Some("base"), &no_labels())?;
    layer(env, b.as_ref(), "gone", None, &ops)?;
    b.remove("gone")?;
    match b.cleanup() {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotImplemented => {}
        Err(e) => return Err(Fail::Failed(format!("cleanup: {e}"))),
    }
    let names: Vec<String> = walk_all(b.as_ref(), "")?.into_iter().map(|i| i.name).collect();
    ensure_eq!(names, ["active", "base", "view"], "snapshots after cleanup");
    check_active(
        env,
        b.as_ref(),
        "active",
        &expected(env, &[&ops, &[Op::file("g", "mine", 0o644)]])?,
    )?;
    check_view(env, b.as_ref(), "base", &expected(env, &[&ops])?)
}
