//! The btrfs driver against a real btrfs on a loop device: snapshots are subvolumes,
//! mounts really mount them, usage is stored at commit, and neither a failed step nor a
//! crash at any fault point leaves a snapshot visible or a subvolume behind cleanup.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;

use cap_std::ambient_authority;
use cap_std::fs::Dir;
use wasnap::driver::Btrfs;
use wasnap::driver::btrfs::ioctl::{set_readonly, snapshot_create, subvolume_create};
use wasnap::fault::{Action, Faults};
use wasnap::{Backend, ErrorKind, Filter, Kind, Labels, Snapshotter};

use crate::common::*;
use crate::loop_btrfs;
use crate::loopfs::{LoopBtrfs, Mounted};

const MIB: u64 = 256;

fn none() -> Labels {
    Labels::new()
}

/// The driver in `<mountpoint>/<name>`.
fn driver(fs: &LoopBtrfs, name: &str, faults: Arc<Faults>) -> Arc<Btrfs> {
    let path = fs.mountpoint.join(name);
    fs::create_dir_all(&path).unwrap();
    let dir = Dir::open_ambient_dir(&path, ambient_authority()).unwrap();
    Arc::new(Btrfs::open(dir, path, faults).unwrap())
}

/// Live subvolumes of the filesystem: id → path from its top, as `btrfs subvolume list`
/// (btrfs-progs) shows them: deleted ones that the cleaner has not reaped yet are left out.
fn subvolumes(fs: &LoopBtrfs) -> BTreeMap<u64, String> {
    let top = fs::File::open(&fs.mountpoint).unwrap();
    rustix::fs::syncfs(&top).unwrap();
    let out = std::process::Command::new("btrfs")
        .args(["subvolume", "list"])
        .arg(&fs.mountpoint)
        .output()
        .unwrap();
    assert!(out.status.success(), "btrfs subvolume list: {}", String::from_utf8_lossy(&out.stderr));
    // "ID 257 gen 9 top level 5 path tmp/new-1-1"
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let id = l.split_whitespace().nth(1).unwrap().parse().unwrap();
            let path = l.split_once(" path ").unwrap().1.to_owned();
            (id, path)
        })
        .collect()
}

/// The subvolume id a snapshot's mount names.
fn subvolid(mounts: &[wasnap::Mount]) -> u64 {
    assert_eq!(mounts.len(), 1);
    let opt = mounts[0].options.iter().find_map(|o| o.strip_prefix("subvolid=")).unwrap();
    opt.parse().unwrap()
}

/// The snapshots the driver shows: key → kind.
fn visible(b: &dyn Backend) -> BTreeMap<String, Kind> {
    backend_keys(b).into_iter().map(|i| (i.name, i.kind)).collect()
}

/// Every subvolume on disk belongs to a record, and every record has its subvolume.
fn assert_disk_matches_records(fs: &LoopBtrfs, b: &dyn Backend, context: &str) {
    let on_disk: BTreeSet<u64> = subvolumes(fs).into_keys().collect();
    let named: BTreeSet<u64> = visible(b).keys().map(|k| subvolid(&b.mounts(k).unwrap())).collect();
    assert_eq!(on_disk, named, "{context}: subvolumes {:?}", subvolumes(fs));
}

fn is_rofs(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(rustix::io::Errno::ROFS.raw_os_error())
}

#[test]
fn open_refuses_a_directory_that_is_not_on_btrfs() {
    let dir = tmp();
    let cap = Dir::open_ambient_dir(dir.path(), ambient_authority()).unwrap();
    let err = Btrfs::open(cap, dir.path().to_path_buf(), Arc::new(Faults::new())).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    let msg = err.to_string();
    assert!(msg.contains("is on tmpfs, not btrfs;"), "{msg}");
    assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0, "nothing was created");
}

#[test]
fn snapshots_are_subvolumes_that_really_mount() {
    let fs = loop_btrfs!(MIB);
    let meta = fs.scratch("meta").unwrap();
    let target = fs.scratch("target").unwrap();
    let faults = Arc::new(Faults::new());
    let backend = driver(&fs, "d", faults.clone());
    let sn = Snapshotter::new(metadb(&meta), "btrfs", backend, faults);
    let c = ctx("default");

    let m = sn.prepare(&c, "a", None, &none()).unwrap();
    assert_eq!(m[0].kind, "btrfs");
    assert_eq!(m[0].source, fs.device, "mounted from the filesystem's device");
    assert_eq!(m[0].options, [format!("subvolid={}", subvolid(&m)), "rw".into()]);
    {
        let mnt = Mounted::new(&m, &target);
        let root = fs::metadata(mnt.path()).unwrap();
        assert_eq!(root.permissions().mode() & 0o7777, 0o755, "an empty root is 0755");
        fs::create_dir(mnt.path().join("etc")).unwrap();
        fs::write(mnt.path().join("etc/hello"), "from the parent").unwrap();
    }
    let measured = sn.usage(&c, "a").unwrap();
    assert_eq!(measured.inodes, 3, "root, etc, hello");
    sn.commit(&c, "base", "a", &none()).unwrap();
    assert_eq!(sn.stat(&c, "base").unwrap().kind, Kind::Committed);
    assert_eq!(sn.usage(&c, "base").unwrap(), measured, "usage stored at commit");
    let subs = subvolumes(&fs);
    assert_eq!(
        subs.values().collect::<Vec<_>>(),
        ["d/snapshots/2"],
        "the commit is a new subvolume and the active one is gone"
    );

    // A view is read-only and sees the parent's files.
    let v = sn.view(&c, "v", Some("base"), &none()).unwrap();
    assert_eq!(v[0].options, [format!("subvolid={}", subvolid(&v)), "ro".into()]);
    assert_eq!(sn.mounts(&c, "v").unwrap(), v);
    {
        let mnt = Mounted::new(&v, &target);
        assert_eq!(fs::read_to_string(mnt.path().join("etc/hello")).unwrap(), "from the parent");
        let err = fs::write(mnt.path().join("new"), "x").unwrap_err();
        assert!(is_rofs(&err), "{err}");
    }
    // An active child is writable, and writing to it leaves the parent as it was.
    let b = sn.prepare(&c, "b", Some("base"), &none()).unwrap();
    assert_eq!(b[0].options[1], "rw");
    {
        let mnt = Mounted::new(&b, &target);
        assert_eq!(fs::read_to_string(mnt.path().join("etc/hello")).unwrap(), "from the parent");
        fs::write(mnt.path().join("etc/hello"), "changed by the child").unwrap();
        fs::write(mnt.path().join("new"), "x").unwrap();
    }
    {
        let mnt = Mounted::new(&sn.mounts(&c, "b").unwrap(), &target);
        assert_eq!(fs::read_to_string(mnt.path().join("new")).unwrap(), "x");
    }
    {
        let mnt = Mounted::new(&sn.mounts(&c, "v").unwrap(), &target);
        assert_eq!(fs::read_to_string(mnt.path().join("etc/hello")).unwrap(), "from the parent");
        assert!(!mnt.path().join("new").exists());
    }
    // A committed snapshot has no mounts of its own, as in containerd; the host reads
    // one in place read-only.
    let e = sn.mounts(&c, "base").unwrap_err();
    assert_eq!(e.kind(), wasnap::ErrorKind::FailedPrecondition, "{e}");
    let base = sn.committed_mounts(&c, "base").unwrap();
    assert_eq!(base[0].options[1], "ro");
    {
        let mnt = Mounted::new(&base, &target);
        let err = fs::write(mnt.path().join("etc/hello"), "no").unwrap_err();
        assert!(is_rofs(&err), "{err}");
    }

    assert_disk_matches_records(&fs, sn.backend().as_ref(), "three snapshots");
    let committed = list(&sn, &c, &["kind==committed"]).unwrap();
    assert_eq!(names(&committed), ["base"], "walk applies the filter");
    let mut views = Vec::new();
    let filter = Filter::parse("kind==view").unwrap();
    sn.backend()
        .walk(&filter, &mut |i| {
            views.push(i.kind);
            Ok(())
        })
        .unwrap();
    assert_eq!(views, [Kind::View], "the backend's walk filters too");
    let err = sn.remove(&c, "base").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    for key in ["b", "v", "base"] {
        sn.remove(&c, key).unwrap();
    }
    sn.cleanup().unwrap();
    assert!(subvolumes(&fs).is_empty(), "{:?}", subvolumes(&fs));
    assert!(backend_keys(sn.backend().as_ref()).is_empty());
}

#[test]
fn usage_of_a_committed_snapshot_is_the_figure_stored_at_commit() {
    let fs = loop_btrfs!(MIB);
    let target = fs.scratch("target").unwrap();
    let b = driver(&fs, "d", Arc::new(Faults::new()));
    let m = b.prepare("a", None, &none()).unwrap();
    assert_eq!(b.usage("a").unwrap().inodes, 1, "just the root directory");
    {
        let mnt = Mounted::new(&m, &target);
        fs::write(mnt.path().join("big"), vec![7u8; 1 << 20]).unwrap();
    }
    let active = b.usage("a").unwrap();
    assert_eq!(active.inodes, 2);
    assert!(active.size >= 1 << 20, "{active:?}");
    b.commit("base", "a", &none()).unwrap();
    assert_eq!(b.usage("base").unwrap(), active);

    // Behind the driver's back the committed subvolume is made writable and grows; the
    // stored figure does not move, which is what makes asking O(1).
    let sub = fs::File::open(fs.mountpoint.join("d/snapshots/2")).unwrap();
    set_readonly(&sub, false).unwrap();
    fs::write(fs.mountpoint.join("d/snapshots/2/more"), vec![1u8; 1 << 20]).unwrap();
    assert_eq!(b.usage("base").unwrap(), active);
}

#[test]
fn a_failed_step_leaves_nothing_visible_and_no_subvolume_behind() {
    let fs = loop_btrfs!(MIB);
    let faults = Arc::new(Faults::new());
    let b = driver(&fs, "d", faults.clone());
    b.prepare("a", None, &none()).unwrap();
    b.commit("base", "a", &none()).unwrap();
    let fails = |point: &str, call: &dyn Fn() -> wasnap::Result<()>| {
        faults.arm(point, Action::Error);
        let err = call().unwrap_err();
        faults.disarm(point);
        assert!(err.to_string().contains(&format!("injected fault at {point}")), "{err}");
    };

    for point in ["btrfs.create.before-rename", "btrfs.create.before-commit"] {
        fails(point, &|| b.prepare("k", None, &none()).map(drop));
        fails(point, &|| b.prepare("k", Some("base"), &none()).map(drop));
        fails(point, &|| b.view("k", Some("base"), &none()).map(drop));
        assert_eq!(visible(b.as_ref()), BTreeMap::from([("base".into(), Kind::Committed)]));
        assert_disk_matches_records(&fs, b.as_ref(), point);
    }

    b.prepare("c", Some("base"), &none()).unwrap();
    for point in ["btrfs.commit.before-rename", "btrfs.commit.before-commit"] {
        fails(point, &|| b.commit("c2", "c", &none()));
        assert_eq!(b.stat("c2").unwrap_err().kind(), ErrorKind::NotFound, "{point}");
        assert_eq!(b.stat("c").unwrap().kind, Kind::Active, "{point}: still active");
        assert_disk_matches_records(&fs, b.as_ref(), point);
    }
    fails("btrfs.remove.before-commit", &|| b.remove("c"));
    assert_eq!(b.stat("c").unwrap().kind, Kind::Active, "a failed remove keeps the snapshot");
    assert_disk_matches_records(&fs, b.as_ref(), "btrfs.remove.before-commit");

    // Past the record's commit a call cannot fail any more: a failed delete leaves a
    // subvolume no record names, for cleanup.
    faults.arm("btrfs.commit.before-delete", Action::Error);
    b.commit("c2", "c", &none()).unwrap();
    faults.disarm("btrfs.commit.before-delete");
    faults.arm("btrfs.remove.before-delete", Action::Error);
    b.remove("c2").unwrap();
    faults.disarm("btrfs.remove.before-delete");
    assert_eq!(visible(b.as_ref()), BTreeMap::from([("base".into(), Kind::Committed)]));
    assert_eq!(subvolumes(&fs).len(), 3, "base plus two leftovers: {:?}", subvolumes(&fs));
    b.cleanup().unwrap();
    assert_disk_matches_records(&fs, b.as_ref(), "after cleanup");
}

#[test]
fn cleanup_reclaims_hand_made_leftovers_and_close_is_idempotent() {
    let fs = loop_btrfs!(MIB);
    let b = driver(&fs, "d", Arc::new(Faults::new()));
    b.prepare("a", None, &none()).unwrap();
    b.commit("base", "a", &none()).unwrap();
    b.view("v", Some("base"), &none()).unwrap();
    let d = fs.mountpoint.join("d");
    let open = |p: &str| fs::File::open(d.join(p)).unwrap();
    let name = |s: &str| std::ffi::CString::new(s).unwrap();
    // What interrupted work leaves: subvolumes in tmp/ (one read-only), subvolumes under
    // ids no record has (one read-only), and a plain directory tree.
    subvolume_create(open("tmp"), &name("new-1-1")).unwrap();
    snapshot_create(open("tmp"), open("snapshots/2"), &name("commit-1-2"), true).unwrap();
    subvolume_create(open("snapshots"), &name("77")).unwrap();
    snapshot_create(open("snapshots"), open("snapshots/2"), &name("99"), true).unwrap();
    fs::create_dir_all(d.join("snapshots/junk/sub")).unwrap();
    fs::create_dir_all(d.join("tmp/junk/sub")).unwrap();
    assert_eq!(subvolumes(&fs).len(), 6);
    b.cleanup().unwrap();
    assert_disk_matches_records(&fs, b.as_ref(), "after cleanup");
    assert_eq!(fs::read_dir(d.join("tmp")).unwrap().count(), 0, "tmp/");
    let mut left: Vec<String> = fs::read_dir(d.join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["2", "3"], "the committed snapshot and the view");

    b.close().unwrap();
    b.close().unwrap();
    assert_eq!(b.stat("base").unwrap_err().kind(), ErrorKind::Unavailable);
    assert_eq!(b.prepare("x", None, &none()).unwrap_err().kind(), ErrorKind::Unavailable);
}

/// The environment variable that turns [`crash_child`] into a crashing driver user.
const CRASH_ENV: &str = "WASNAP_BTRFS_CRASH";

/// Run by [`a_crash_at_any_fault_point_leaves_nothing_visible`] in a child process:
/// opens the driver in `<dir>`, arms `<point>` to abort and makes the call `<op>`.
#[test]
#[ignore = "a child process of a_crash_at_any_fault_point_leaves_nothing_visible"]
fn crash_child() {
    let Some(spec) = std::env::var_os(CRASH_ENV) else { return };
    let spec = spec.into_string().unwrap();
    let parts: Vec<&str> = spec.split('|').collect();
    let [dir, point, ref op @ ..] = parts[..] else { panic!("{spec}") };
    // An abort is the expected end: no core file for it.
    rustix::process::setrlimit(
        rustix::process::Resource::Core,
        rustix::process::Rlimit { current: Some(0), maximum: None },
    )
    .ok();
    let faults = Arc::new(Faults::new());
    faults.arm(point, Action::Abort);
    let cap = Dir::open_ambient_dir(dir, ambient_authority()).unwrap();
    let b = Btrfs::open(cap, dir.into(), faults).unwrap();
    match *op {
        ["prepare", k, "-"] => drop(b.prepare(k, None, &none())),
        ["prepare", k, p] => drop(b.prepare(k, Some(p), &none())),
        ["view", k, p] => drop(b.view(k, Some(p), &none())),
        ["commit", name, key] => drop(b.commit(name, key, &none())),
        ["remove", k] => drop(b.remove(k)),
        _ => panic!("unknown op {op:?}"),
    }
    panic!("{point} was never reached by {op:?}");
}

#[test]
fn a_crash_at_any_fault_point_leaves_nothing_visible() {
    let fs = loop_btrfs!(MIB);
    let dir = fs.mountpoint.join("d");
    let faults = Arc::new(Faults::new());
    // (point, call, whether the crash leaves a subvolume for cleanup)
    let cases = [
        ("btrfs.create.before-rename", "prepare|k|-", true),
        ("btrfs.create.before-rename", "prepare|k|base", true),
        ("btrfs.create.before-commit", "view|k|base", true),
        ("btrfs.create.before-commit", "prepare|k|base", true),
        ("btrfs.commit.before-rename", "commit|c2|c", true),
        ("btrfs.commit.before-commit", "commit|c2|c", true),
        ("btrfs.commit.before-delete", "commit|c2|c", true),
        ("btrfs.remove.before-commit", "remove|r", false),
        ("btrfs.remove.before-delete", "remove|r", true),
    ];
    for (point, op, leaves_garbage) in cases {
        // The same snapshots before every crash: base, an active c and a view r on it.
        {
            let b = driver(&fs, "d", faults.clone());
            if b.stat("base").is_err() {
                b.prepare("a", None, &none()).unwrap();
                b.commit("base", "a", &none()).unwrap();
            }
            if b.stat("c2").is_ok() {
                b.remove("c2").unwrap();
            }
            if b.stat("c").is_err() {
                b.prepare("c", Some("base"), &none()).unwrap();
            }
            if b.stat("r").is_err() {
                b.view("r", Some("base"), &none()).unwrap();
            }
            b.cleanup().unwrap();
        } // closed: the child needs the records database.
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "btrfs::crash_child", "--include-ignored", "--nocapture"])
            .env(CRASH_ENV, format!("{}|{point}|{op}", dir.display()))
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&status.stderr);
        // Killed by the injected abort, not by a panic (which exits 101, or aborts only
        // when panicking twice).
        let aborted = status.status.signal() == Some(rustix::process::Signal::ABORT.as_raw());
        assert!(
            aborted && !stderr.contains("panicked"),
            "{point} {op}: {}\n{stderr}",
            status.status
        );

        let b = driver(&fs, "d", faults.clone());
        let mut expected = BTreeMap::from([
            ("base".to_string(), Kind::Committed),
            ("c".into(), Kind::Active),
            ("r".into(), Kind::View),
        ]);
        match point {
            "btrfs.commit.before-delete" => {
                expected.remove("c");
                expected.insert("c2".into(), Kind::Committed);
            }
            "btrfs.remove.before-delete" => {
                expected.remove("r");
            }
            _ => {}
        }
        assert_eq!(visible(b.as_ref()), expected, "{point} {op}");
        for key in expected.keys() {
            b.mounts(key).unwrap_or_else(|e| panic!("{point} {op}: {key}: {e}"));
        }
        let leftovers = subvolumes(&fs).len() - expected.len();
        assert_eq!(leftovers > 0, leaves_garbage, "{point} {op}: {:?}", subvolumes(&fs));
        b.cleanup().unwrap();
        assert_disk_matches_records(&fs, b.as_ref(), &format!("{point} {op}"));
    }
}
