//! The native driver: what a child snapshot inherits from its parent, and the mounts.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::Path;

use rustix::fs::{Mode, XattrFlags};
use wasnap::{Backend, ErrorKind, Labels};

use crate::common::*;
use crate::require_root;

fn none() -> Labels {
    Labels::new()
}

/// Builds a parent tree with every kind of thing a layer holds.
fn populate(dir: &Path) {
    fs::create_dir(dir.join("etc")).unwrap();
    fs::write(dir.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
    // chown clears setuid, so it comes first.
    rustix::fs::chown(dir.join("etc/passwd"), Some(uid(1234)), Some(gid(5678))).unwrap();
    fs::set_permissions(dir.join("etc/passwd"), fs::Permissions::from_mode(0o4751)).unwrap();
    rustix::fs::setxattr(dir.join("etc/passwd"), "user.wasnap", b"file-attr", XattrFlags::empty())
        .unwrap();
    rustix::fs::setxattr(dir.join("etc"), "trusted.overlay.opaque", b"y", XattrFlags::empty())
        .unwrap();
    fs::hard_link(dir.join("etc/passwd"), dir.join("etc/passwd.link")).unwrap();
    symlink("passwd", dir.join("etc/relative")).unwrap();
    symlink("/does/not/exist", dir.join("etc/dangling")).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        dir.join("null"),
        rustix::fs::FileType::CharacterDevice,
        Mode::from_raw_mode(0o666),
        rustix::fs::makedev(1, 3),
    )
    .unwrap();
    fs::create_dir(dir.join("ro")).unwrap();
    fs::write(dir.join("ro/inside"), "x").unwrap();
    fs::set_permissions(dir.join("ro"), fs::Permissions::from_mode(0o555)).unwrap();
}

fn uid(n: u32) -> rustix::fs::Uid {
    rustix::fs::Uid::from_raw(n)
}
fn gid(n: u32) -> rustix::fs::Gid {
    rustix::fs::Gid::from_raw(n)
}

#[test]
fn a_child_inherits_mode_owner_xattrs_links_and_devices() {
    require_root!();
    let s = native_stack();
    let c = ctx("default");
    let m = s.sn.prepare(&c, "a", None, &none()).unwrap();
    populate(&source(&m));
    let parent_mtime = fs::symlink_metadata(source(&m).join("etc/passwd")).unwrap().mtime_nsec();
    s.sn.commit(&c, "base", "a", &none()).unwrap();

    for (key, view) in [("child", false), ("view", true)] {
        let m = if view {
            s.sn.view(&c, key, Some("base"), &none()).unwrap()
        } else {
            s.sn.prepare(&c, key, Some("base"), &none()).unwrap()
        };
        let d = source(&m);
        let passwd = fs::symlink_metadata(d.join("etc/passwd")).unwrap();
        assert_eq!(passwd.mode() & 0o7777, 0o4751, "mode incl. setuid");
        assert_eq!((passwd.uid(), passwd.gid()), (1234, 5678), "ownership");
        assert_eq!(passwd.mtime_nsec(), parent_mtime, "timestamps");
        assert_eq!(
            fs::read_to_string(d.join("etc/passwd")).unwrap(),
            "root:x:0:0::/root:/bin/sh\n"
        );
        let mut buf = [0u8; 64];
        let n = rustix::fs::getxattr(d.join("etc/passwd"), "user.wasnap", &mut buf).unwrap();
        assert_eq!(&buf[..n], b"file-attr");
        let n = rustix::fs::getxattr(d.join("etc"), "trusted.overlay.opaque", &mut buf).unwrap();
        assert_eq!(&buf[..n], b"y");
        let link = fs::symlink_metadata(d.join("etc/passwd.link")).unwrap();
        assert_eq!(link.ino(), passwd.ino(), "hard links stay one inode");
        assert_eq!(passwd.nlink(), 2);
        assert_eq!(fs::read_link(d.join("etc/relative")).unwrap(), Path::new("passwd"));
        assert_eq!(fs::read_link(d.join("etc/dangling")).unwrap(), Path::new("/does/not/exist"));
        let null = fs::symlink_metadata(d.join("null")).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_char_device(&null.file_type()));
        assert_eq!(null.rdev(), rustix::fs::makedev(1, 3));
        assert_eq!(fs::symlink_metadata(d.join("ro")).unwrap().mode() & 0o777, 0o555);
        assert_eq!(fs::read_to_string(d.join("ro/inside")).unwrap(), "x");
    }
    // Removing a tree with read-only directories in it works.
    s.sn.remove(&c, "child").unwrap();
    s.sn.remove(&c, "view").unwrap();
    s.sn.remove(&c, "base").unwrap();
    assert!(backend_keys(s.sn.backend().as_ref()).is_empty());
}

#[test]
fn mounts_are_rw_binds_for_active_and_ro_for_views_and_really_are() {
    require_root!();
    let s = native_stack();
    let c = ctx("default");
    let m = s.sn.prepare(&c, "a", None, &none()).unwrap();
    assert_eq!(m[0].options, ["rbind", "rw"]);
    fs::write(source(&m).join("f"), "data").unwrap();
    s.sn.commit(&c, "base", "a", &none()).unwrap();
    let v = s.sn.view(&c, "v", Some("base"), &none()).unwrap();
    assert_eq!(v[0].options, ["rbind", "ro"]);
    assert_eq!(s.sn.mounts(&c, "v").unwrap(), v);

    let target = s.root().join("mnt");
    fs::create_dir(&target).unwrap();
    wasnap::mount::mount_all(&v, &target).unwrap();
    let read = fs::read_to_string(target.join("f"));
    let write = fs::write(target.join("g"), "nope");
    wasnap::mount::unmount(&target).unwrap();
    assert_eq!(read.unwrap(), "data");
    let err = write.unwrap_err();
    assert_eq!(err.raw_os_error(), Some(rustix::io::Errno::ROFS.raw_os_error()), "{err}");

    let a = s.sn.prepare(&c, "b", Some("base"), &none()).unwrap();
    wasnap::mount::mount_all(&a, &target).unwrap();
    let write = fs::write(target.join("g"), "yes");
    wasnap::mount::unmount(&target).unwrap();
    write.unwrap();
    assert_eq!(fs::read_to_string(source(&a).join("g")).unwrap(), "yes");
    assert_eq!(wasnap::mount::unmount(&target).unwrap_err().kind(), ErrorKind::InvalidArgument);
}

#[test]
fn usage_of_committed_snapshots_is_measured_once_at_commit() {
    let s = native_stack();
    let c = ctx("default");
    let m = s.sn.prepare(&c, "a", None, &none()).unwrap();
    let empty = s.sn.usage(&c, "a").unwrap();
    assert_eq!(empty.inodes, 1, "just the root directory");
    fs::write(source(&m).join("big"), vec![7u8; 1 << 20]).unwrap();
    let active = s.sn.usage(&c, "a").unwrap();
    assert_eq!(active.inodes, 2);
    assert!(active.size >= 1 << 20, "{active:?}");
    s.sn.commit(&c, "base", "a", &none()).unwrap();
    let committed = s.sn.usage(&c, "base").unwrap();
    assert_eq!(committed, active);
    // Behind the driver's back the tree changes; the stored figure does not, which is
    // what makes asking O(1).
    fs::write(source(&m).join("more"), vec![1u8; 4096]).unwrap();
    assert_eq!(s.sn.usage(&c, "base").unwrap(), committed);
}

#[test]
fn cleanup_reclaims_leftover_trees() {
    let dir = tmp();
    let faults = std::sync::Arc::new(wasnap::fault::Faults::new());
    let n = native(dir.path(), faults.clone());
    n.prepare("k1", None, &none()).unwrap();
    // Leftovers of interrupted work: a half-built tree and a tree no record names.
    fs::create_dir_all(dir.path().join("native/tmp/new-1-1/sub")).unwrap();
    fs::create_dir_all(dir.path().join("native/snapshots/999/sub")).unwrap();
    n.cleanup().unwrap();
    assert!(!dir.path().join("native/tmp/new-1-1").exists());
    assert!(!dir.path().join("native/snapshots/999").exists());
    assert!(dir.path().join("native/snapshots/1").is_dir(), "recorded trees stay");
    n.close().unwrap();
    n.close().unwrap();
    assert_eq!(n.stat("k1").unwrap_err().kind(), ErrorKind::Unavailable);
}

#[test]
fn a_failed_step_inside_the_driver_leaves_nothing() {
    let dir = tmp();
    let faults = std::sync::Arc::new(wasnap::fault::Faults::new());
    let n = native(dir.path(), faults.clone());
    for point in ["native.create.before-rename", "native.create.before-commit"] {
        faults.arm(point, wasnap::fault::Action::Error);
        assert!(n.prepare("k", None, &none()).is_err());
        faults.disarm(point);
        assert_eq!(n.stat("k").unwrap_err().kind(), ErrorKind::NotFound, "{point}");
        assert_eq!(fs::read_dir(dir.path().join("native/tmp")).unwrap().count(), 0, "{point}");
        assert_eq!(
            fs::read_dir(dir.path().join("native/snapshots")).unwrap().count(),
            0,
            "{point}"
        );
    }
    n.prepare("k", None, &none()).unwrap();
    faults.arm("native.remove.before-commit", wasnap::fault::Action::Error);
    assert!(n.remove("k").is_err());
    faults.disarm("native.remove.before-commit");
    assert!(n.stat("k").is_ok(), "a failed remove keeps the snapshot");
    let m = n.mounts("k").unwrap();
    assert!(source(&m).is_dir(), "and its tree, moved back");
    n.remove("k").unwrap();
    assert!(!source(&m).exists());
}

#[test]
fn a_record_whose_data_is_gone_is_reported_and_kept() {
    let dir = tmp();
    let host =
        wasnap::Host::open_with(dir.path(), std::sync::Arc::new(wasnap::fault::Faults::new()))
            .unwrap();
    let sn = host.snapshotter("native").unwrap();
    let c = ctx("default");
    let m = sn.prepare(&c, "a", None, &Labels::new()).unwrap();
    sn.commit(&c, "base", "a", &Labels::new()).unwrap();
    // The disk loses the layer behind the host's back.
    std::fs::remove_dir_all(source(&m)).unwrap();
    let report = host.check().unwrap().into_iter().find(|r| r.snapshotter == "native").unwrap();
    assert_eq!(report.damaged.len(), 1, "{report:?}");
    assert!(report.damaged[0].1.contains("is gone"), "{report:?}");
    assert_eq!(report.problems(), 1, "{report:?}");
    // Reported, never dropped: the record is still there for the operator to decide.
    sn.stat(&c, "base").unwrap();
}

/// A host closed while the driver's deleter is still deleting a removed tree waits
/// for it: the deleter holds the root's database while it works, and a reopen right
/// after the close must find the database free. What the deleter had not reached
/// stays for cleanup.
#[test]
fn closing_waits_for_the_background_deleter_and_the_root_reopens() {
    let dir = tmp();
    let root = dir.path().join("root");
    let config = "default_snapshotter = \"native\"\n[snapshotters.native]\ndriver = \"native\"\n";
    let c = ctx("default");
    {
        let host = crate::layers::host_with(&root, config);
        let sn = host.snapshotter("native").unwrap();
        let m = sn.prepare(&c, "big", None, &none()).unwrap();
        // Enough files that deleting them takes far longer than a close and a reopen.
        let src = source(&m);
        for d in 0..40 {
            let sub = src.join(format!("d{d}"));
            fs::create_dir(&sub).unwrap();
            for f in 0..500 {
                fs::write(sub.join(format!("f{f}")), b"x").unwrap();
            }
        }
        sn.remove_later(&c, "big").unwrap();
        // Closed once the deleter is under way.
        let tmp = root.join("snapshotters/native/tmp");
        while files_under(&tmp) == 20_000 {
            std::thread::yield_now();
        }
        host.close().unwrap();
    }
    let host = crate::layers::host_with(&root, config);
    let sn = host.snapshotter("native").unwrap();
    assert!(list(&sn, &c, &[]).unwrap().is_empty());
    sn.cleanup().unwrap();
    let left = |d: &str| fs::read_dir(root.join("snapshotters/native").join(d)).unwrap().count();
    assert_eq!((left("snapshots"), left("tmp")), (0, 0), "cleanup deleted the rest");
    host.close().unwrap();
}

/// Files under `dir`, whatever is deleted meanwhile.
fn files_under(dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => files_under(&e.path()),
            Ok(_) => 1,
            Err(_) => 0,
        })
        .sum()
}

/// The background deleter yields the CPU to calls: it runs nicer than the thread that
/// opened the driver, and only it does (Linux sets a niceness per thread).
#[test]
fn the_background_deleter_runs_nicer_than_calls() {
    let dir = tmp();
    let root = dir.path().join("root");
    let config = "default_snapshotter = \"native\"\n[snapshotters.native]\ndriver = \"native\"\n";
    // Native deleters of this process (other tests' too), by thread id, with their
    // niceness.
    let deleters = || -> Vec<(String, i32)> {
        let mut found = Vec::new();
        for task in fs::read_dir("/proc/self/task").unwrap().flatten() {
            let comm = fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if !comm.starts_with("wasnap-native-") {
                continue;
            }
            let Ok(stat) = fs::read_to_string(task.path().join("stat")) else { continue };
            // After the command: state is field 3, nice field 19.
            let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
            found.push((
                task.file_name().to_string_lossy().into_owned(),
                fields[16].parse().unwrap(),
            ));
        }
        found
    };
    let before: Vec<String> = deleters().into_iter().map(|(tid, _)| tid).collect();
    let base = rustix::process::getpriority_process(None).unwrap();
    let host = crate::layers::host_with(&root, config);
    let _sn = host.snapshotter("native").unwrap();
    let want = (base + 10).min(19);
    // Ours is among the deleters started since; it sets its niceness as it starts.
    // (Another test's may have fallen behind and be back at the process's priority.)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let new: Vec<i32> = deleters()
            .into_iter()
            .filter(|(tid, _)| !before.contains(tid))
            .map(|(_, n)| n)
            .collect();
        if new.contains(&want) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "new deleters' niceness {new:?}, want {want}"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(rustix::process::getpriority_process(None).unwrap(), base, "the caller's own");
    host.close().unwrap();
}
