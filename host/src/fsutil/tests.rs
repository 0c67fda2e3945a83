//! Tests of whole-tree behaviour: copy fidelity, deep trees, removal.

use std::collections::BTreeMap;
use std::fs;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use cap_std::ambient_authority;
use rustix::fs::{AtFlags, CWD, FileType, Mode, Timespec, Timestamps, XattrFlags};

use super::{MAX_OPEN_LEVELS, copy_tree, disk_usage, link_tree, remove_tree};
use crate::error::ErrorKind;

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Tells why a root-only test does nothing.
fn skip_unless_root(test: &str) -> bool {
    if !is_root() {
        // CI runs as root; a skip there would hide a broken machine set-up.
        assert!(std::env::var_os("CI").is_none(), "{test}: needs root, and CI must not skip");
        eprintln!("{test}: skipped: needs root (chown, mknod, trusted.* xattrs)");
        return true;
    }
    false
}

fn open(path: &Path) -> cap_std::fs::Dir {
    cap_std::fs::Dir::open_ambient_dir(path, ambient_authority()).expect("open dir")
}

fn roots() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir_in("/dev/shm").expect("tempdir");
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    fs::create_dir(&src).expect("mkdir src");
    fs::create_dir(&dst).expect("mkdir dst");
    (tmp, src, dst)
}

fn set_times(path: &Path, atime: (i64, i64), mtime: (i64, i64)) {
    let times = Timestamps {
        last_access: Timespec { tv_sec: atime.0, tv_nsec: atime.1 as _ },
        last_modification: Timespec { tv_sec: mtime.0, tv_nsec: mtime.1 as _ },
    };
    rustix::fs::utimensat(CWD, path, &times, AtFlags::SYMLINK_NOFOLLOW).expect("utimensat");
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    rustix::fs::lsetxattr(path, name, value, XattrFlags::empty()).expect("lsetxattr");
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

fn xattrs(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut names = vec![0u8; 4096];
    let n = rustix::fs::llistxattr(path, &mut names[..]).expect("llistxattr");
    let mut out = BTreeMap::new();
    for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let name = String::from_utf8_lossy(name).into_owned();
        let mut value = vec![0u8; 4096];
        let len = rustix::fs::lgetxattr(path, name.as_str(), &mut value[..]).unwrap_or(0);
        value.truncate(len);
        out.insert(name, value);
    }
    out
}

/// Everything about one entry that a copy must reproduce, except the access time
/// (reading the source may move it) and the inode number.
#[derive(Debug, PartialEq)]
struct Entry {
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u64,
    mtime: (i64, i64),
    rdev: u64,
    size: u64,
    link: Option<PathBuf>,
    data: Option<Vec<u8>>,
    xattrs: BTreeMap<String, Vec<u8>>,
}

fn snapshot(root: &Path) -> BTreeMap<PathBuf, Entry> {
    let mut out = BTreeMap::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        let path = root.join(&rel);
        let md = fs::symlink_metadata(&path).expect("lstat");
        let kind = FileType::from_raw_mode(md.mode());
        if kind == FileType::Socket {
            continue;
        }
        if kind == FileType::Directory {
            for entry in fs::read_dir(&path).expect("read_dir") {
                todo.push(rel.join(entry.expect("entry").file_name()));
            }
        }
        let entry = Entry {
            mode: md.mode(),
            uid: md.uid(),
            gid: md.gid(),
            nlink: if kind == FileType::Directory { 0 } else { md.nlink() },
            mtime: (md.mtime(), md.mtime_nsec()),
            rdev: md.rdev(),
            size: if kind == FileType::Directory { 0 } else { md.size() },
            link: fs::read_link(&path).ok(),
            data: (kind == FileType::RegularFile).then(|| fs::read(&path).expect("read")),
            xattrs: xattrs(&path),
        };
        out.insert(rel, entry);
    }
    out
}

const T1: (i64, i64) = (1_000_000_001, 123_456_789);
const T2: (i64, i64) = (1_200_000_002, 987_654_321);

#[test]
fn copy_preserves_types_modes_owners_xattrs_links_and_times() {
    if skip_unless_root("copy_preserves_types_modes_owners_xattrs_links_and_times") {
        return;
    }
    let (_tmp, src, dst) = roots();
    let p = |rel: &str| src.join(rel);
    fs::write(p("suid"), b"set-uid program").expect("write");
    fs::write(p("sgid"), b"").expect("write");
    fs::create_dir_all(p("a/b/c")).expect("mkdir");
    fs::create_dir(p("empty")).expect("mkdir");
    fs::create_dir(p("sticky")).expect("mkdir");
    fs::create_dir(p("ro")).expect("mkdir");
    fs::create_dir(p("ro/sub")).expect("mkdir");
    fs::write(p("ro/sub/deep"), b"deep").expect("write");
    fs::write(p("ro/x"), b"x").expect("write");
    fs::write(p("a/b/c/file"), vec![42u8; 100_000]).expect("write");
    fs::hard_link(p("suid"), p("a/hardlink")).expect("link");
    std::os::unix::fs::symlink("../suid", p("a/rel")).expect("symlink");
    std::os::unix::fs::symlink("/etc/passwd", p("abs")).expect("symlink");
    std::os::unix::fs::symlink("no/such/target", p("dangling")).expect("symlink");
    let null = rustix::fs::makedev(1, 3);
    rustix::fs::mknodat(CWD, p("null"), FileType::CharacterDevice, Mode::from(0o666), null)
        .expect("mknod");
    rustix::fs::mknodat(CWD, p("fifo"), FileType::Fifo, Mode::from(0o640), 0).expect("mkfifo");
    let _socket = std::os::unix::net::UnixListener::bind(p("socket")).expect("bind");
    let sparse = fs::File::create(p("sparse")).expect("create");
    sparse.set_len(8 << 20).expect("set_len");
    std::os::unix::fs::FileExt::write_at(&sparse, b"middle", 4 << 20).expect("write_at");
    drop(sparse);

    for rel in ["suid", "a", "a/b/c/file", "abs", "fifo", "null", "ro/x", ""] {
        std::os::unix::fs::lchown(p(rel), Some(1234), Some(5678)).expect("lchown");
    }
    for (rel, name, value) in [
        ("suid", "user.a", &b"1"[..]),
        ("suid", "trusted.t", b"2"),
        ("a/b", "user.dir", b"d"),
        ("a/b", "trusted.dir", b""),
        ("", "user.root", b"r"),
        ("abs", "trusted.link", b"l"),
        ("null", "trusted.dev", b"n"),
    ] {
        set_xattr(&p(rel), name, value);
    }
    for (rel, mode) in
        [("suid", 0o4755), ("sgid", 0o2710), ("sticky", 0o1777), ("null", 0o620), ("", 0o751)]
    {
        chmod(&p(rel), mode);
    }
    // Children before parents, so setting a child's times does not move its parent's.
    for rel in [
        "suid",
        "sgid",
        "a/b/c/file",
        "a/b/c",
        "a/b",
        "a/rel",
        "a",
        "abs",
        "dangling",
        "null",
        "fifo",
        "sparse",
        "empty",
        "sticky",
        "ro/sub/deep",
        "ro/sub",
        "ro/x",
        "ro",
        "",
    ] {
        set_times(&p(rel), T1, T2);
    }
    chmod(&p("ro"), 0o555);

    copy_tree(&open(&src), &open(&dst)).expect("copy");

    let q = |rel: &str| fs::symlink_metadata(dst.join(rel)).expect("lstat");
    // Access times first: the comparison below reads both trees, which moves them.
    for rel in ["suid", "a/b", "abs", ""] {
        assert_eq!((q(rel).atime(), q(rel).atime_nsec()), T1, "atime of {rel:?}");
    }
    // Only now: reading the source moves its access times, which the copy must carry.
    let expected = snapshot(&src);
    let got = snapshot(&dst);
    assert_eq!(got.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>());
    for (rel, want) in &expected {
        assert_eq!(&got[rel], want, "{rel:?}");
    }
    assert_eq!(q("suid").ino(), q("a/hardlink").ino());
    assert_eq!(q("suid").nlink(), 2);
    assert_eq!(q("suid").mode() & 0o7777, 0o4755);
    assert_eq!(q("sticky").mode() & 0o7777, 0o1777);
    assert_eq!((q("").uid(), q("").gid()), (1234, 5678));
    assert_eq!((q("abs").uid(), q("abs").gid()), (1234, 5678));
    assert_eq!(fs::read_link(dst.join("abs")).expect("readlink"), Path::new("/etc/passwd"));
    assert_eq!(q("null").rdev(), null);
    assert!(q("null").file_type().is_char_device());
    assert_eq!(FileType::from_raw_mode(q("fifo").mode()), FileType::Fifo);
    assert!(!dst.join("socket").exists());
    assert_eq!(q("ro").mode() & 0o7777, 0o555);
    assert_eq!(fs::read(dst.join("ro/sub/deep")).expect("read"), b"deep");
    assert!(q("sparse").blocks() * 512 < 1 << 20, "sparse file lost its holes");
    assert_eq!(xattrs(&dst.join("suid"))["trusted.t"], b"2");
    assert_eq!(xattrs(&dst)["user.root"], b"r");
}

#[test]
fn link_tree_shares_regular_files_and_makes_everything_else_new() {
    if skip_unless_root("link_tree_shares_regular_files_and_makes_everything_else_new") {
        return;
    }
    let (tmp, src, dst) = roots();
    let p = |rel: &str| src.join(rel);
    fs::create_dir_all(p("d/e")).expect("mkdir");
    fs::write(p("f"), b"file").expect("write");
    fs::write(p("d/e/g"), vec![7u8; 10_000]).expect("write");
    fs::hard_link(p("f"), p("d/f2")).expect("link");
    std::os::unix::fs::symlink("../f", p("d/s")).expect("symlink");
    rustix::fs::mknodat(CWD, p("fifo"), FileType::Fifo, Mode::from(0o640), 0).expect("mkfifo");
    fs::write(tmp.path().join("secret"), b"secret").expect("write");
    std::os::unix::fs::symlink(tmp.path().join("secret"), p("out")).expect("symlink");
    set_xattr(&p("f"), "user.k", b"v");
    set_xattr(&p(""), "user.root", b"r");
    std::os::unix::fs::lchown(p("d"), Some(1234), Some(5678)).expect("lchown");
    chmod(&p("d"), 0o750);
    for rel in ["f", "d/e/g", "d/e", "d", ""] {
        set_times(&p(rel), T1, T2);
    }

    link_tree(open(&src), open(&dst)).expect("link");

    // The same tree, to the metadata, as a copy makes it (link counts included: the
    // regular files are the same inodes).
    let expected = snapshot(&src);
    let got = snapshot(&dst);
    assert_eq!(got.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>());
    for (rel, want) in &expected {
        assert_eq!(&got[rel], want, "{rel:?}");
    }
    let ino = |root: &Path, rel: &str| fs::symlink_metadata(root.join(rel)).expect("lstat").ino();
    for rel in ["f", "d/f2", "d/e/g"] {
        assert_eq!(ino(&src, rel), ino(&dst, rel), "{rel} is linked");
    }
    // Directories, symlinks and fifos are made new; a symlink is never followed.
    for rel in ["", "d", "d/e", "d/s", "fifo", "out"] {
        assert_ne!(ino(&src, rel), ino(&dst, rel), "{rel} is new");
    }
    assert_eq!(fs::read_link(dst.join("out")).expect("readlink"), tmp.path().join("secret"));
    assert_eq!(fs::symlink_metadata(tmp.path().join("secret")).expect("lstat").nlink(), 1);
    assert_eq!(xattrs(&dst)["user.root"], b"r");

    // The source tree gone, the linked tree keeps every byte.
    remove_tree(&open(tmp.path()), Path::new("src")).expect("remove the source");
    assert_eq!(fs::read(dst.join("f")).expect("read"), b"file");
    assert_eq!(fs::read(dst.join("d/f2")).expect("read"), b"file");
    assert_eq!(fs::read(dst.join("d/e/g")).expect("read"), vec![7u8; 10_000]);
    assert_eq!(fs::symlink_metadata(dst.join("f")).expect("lstat").nlink(), 2);
}

#[test]
fn deep_trees_copy_measure_and_remove_within_the_descriptor_budget() {
    let (tmp, src, dst) = roots();
    // Deep enough that walking back up must reopen closed levels several times over.
    let depth = 200;
    assert!(depth > 2 * MAX_OPEN_LEVELS);
    let mut path = src.clone();
    for _ in 0..depth {
        path.push("d");
    }
    fs::create_dir_all(&path).expect("mkdir");
    fs::write(path.join("leaf"), b"bottom").expect("write");
    // Bottom-up so each directory keeps the time it was given.
    for level in (0..=depth).rev() {
        let dir: PathBuf =
            std::iter::once(src.clone()).chain((0..level).map(|_| "d".into())).collect();
        set_times(&dir, T1, (T2.0 + level as i64, T2.1));
    }
    copy_tree(&open(&src), &open(&dst)).expect("copy");
    assert_eq!(snapshot(&dst), snapshot(&src));

    let usage = disk_usage(&open(&dst)).expect("usage");
    assert_eq!(usage.inodes, depth as u64 + 2);

    remove_tree(&open(tmp.path()), "dst").expect("remove");
    assert!(!dst.exists());
}

#[test]
fn copy_errors_name_the_entry_and_the_operation() {
    let (_tmp, src, dst) = roots();
    fs::create_dir(src.join("sub")).expect("mkdir");
    fs::write(src.join("sub/taken"), b"new").expect("write");
    fs::create_dir(dst.join("sub")).expect("mkdir");
    let err = copy_tree(&open(&src), &open(&dst)).expect_err("sub already exists");
    assert_eq!(err.kind(), ErrorKind::Internal);
    assert!(err.to_string().starts_with("copy \"sub\": mkdir: "), "{err}");

    let inside = src.join("inside");
    fs::create_dir(&inside).expect("mkdir");
    let err = copy_tree(&open(&src), &open(&inside)).expect_err("destination inside source");
    assert!(err.to_string().contains("inside the source"), "{err}");
}

#[test]
fn remove_tree_opens_up_read_only_dirs_and_never_follows_symlinks() {
    let tmp = tempfile::tempdir_in("/dev/shm").expect("tempdir");
    let keep = tmp.path().join("keep");
    fs::create_dir(&keep).expect("mkdir");
    fs::write(keep.join("precious"), b"p").expect("write");
    let doomed = tmp.path().join("doomed");
    fs::create_dir_all(doomed.join("ro/locked")).expect("mkdir");
    fs::write(doomed.join("ro/locked/f"), b"f").expect("write");
    std::os::unix::fs::symlink(&keep, doomed.join("ro/to-keep")).expect("symlink");
    chmod(&doomed.join("ro/locked"), 0o000);
    chmod(&doomed.join("ro"), 0o555);
    let parent = open(tmp.path());

    remove_tree(&parent, "doomed").expect("remove");
    assert!(!doomed.exists());
    assert_eq!(fs::read(keep.join("precious")).expect("kept"), b"p");

    assert_eq!(remove_tree(&parent, "doomed").expect_err("gone").kind(), ErrorKind::NotFound);
    let nested = remove_tree(&parent, "keep/precious").expect_err("nested");
    assert_eq!(nested.kind(), ErrorKind::InvalidArgument);
    remove_tree(&parent, "keep").expect("remove keep");
    assert!(!keep.exists());
}

/// A tmpfs mounted at `target` for the length of a test, detached when dropped.
struct TmpfsMount(PathBuf);

impl TmpfsMount {
    /// None (the test is skipped) where mounting is not allowed.
    fn new(target: &Path, mode: &str) -> Option<TmpfsMount> {
        let data = std::ffi::CString::new(format!("mode={mode}")).expect("mount data");
        let flags = rustix::mount::MountFlags::empty();
        match rustix::mount::mount("wasnap-test", target, "tmpfs", flags, data.as_c_str()) {
            Ok(()) => Some(TmpfsMount(target.to_path_buf())),
            Err(e) => {
                eprintln!("skipped: cannot mount a tmpfs: {e}");
                None
            }
        }
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(&self.0, rustix::mount::UnmountFlags::DETACH);
    }
}

#[test]
fn walks_never_cross_a_mount_inside_the_tree() {
    if skip_unless_root("walks_never_cross_a_mount_inside_the_tree") {
        return;
    }
    let (tmp, src, dst) = roots();
    fs::write(src.join("f"), b"f").expect("write");
    fs::create_dir(src.join("m")).expect("mkdir");
    let Some(_mount) = TmpfsMount::new(&src.join("m"), "0500") else { return };
    fs::write(src.join("m/outside"), b"another filesystem's").expect("write");

    let err = copy_tree(&open(&src), &open(&dst)).expect_err("a mount in the source");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert!(err.to_string().contains("mount point"), "{err}");
    assert!(!dst.join("m/outside").exists());

    // Counted as the entry it is, never descended into.
    let usage = disk_usage(&open(&src)).expect("usage");
    assert_eq!(usage.inodes, 3, "{usage:?}");
    super::measure_and_sync(&open(&src)).expect("sync");

    // Read-only (0500) as removal sees it, so removal would first chmod it: neither that
    // nor any unlink reaches the mounted filesystem.
    let err = remove_tree(&open(tmp.path()), "src").expect_err("a mount in the tree");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert_eq!(fs::read(src.join("m/outside")).expect("still there"), b"another filesystem's");
    assert_eq!(fs::metadata(src.join("m")).expect("stat").mode() & 0o7777, 0o500);
}

#[test]
fn a_reopened_parent_must_be_the_directory_closed_before() {
    let tmp = tempfile::tempdir_in("/dev/shm").expect("tempdir");
    fs::create_dir_all(tmp.path().join("a/b")).expect("mkdir");
    fs::create_dir(tmp.path().join("c")).expect("mkdir");
    let at = super::At { verb: "test", rel: Path::new("a/b") };
    let handle = |path: &Path| {
        let fd = super::open_dir_at(CWD, path).expect("open");
        let meta = super::fstat(&fd).expect("stat");
        super::Handle::new(fd, &meta)
    };
    let mut parent = handle(&tmp.path().join("a"));
    let child = handle(&tmp.path().join("a/b"));
    parent.fd = None;
    parent.reopen_from(&child, at).expect("not moved");

    // The child moved elsewhere mid-walk: its `..` is another directory now, refused.
    parent.fd = None;
    fs::rename(tmp.path().join("a/b"), tmp.path().join("c/b")).expect("rename");
    let err = parent.reopen_from(&child, at).expect_err("moved");
    assert!(err.to_string().contains("moved during the walk"), "{err}");
    assert!(parent.fd.is_none());
}

#[test]
fn only_regular_files_and_directories_are_opened_through_a_pin() {
    let tmp = tempfile::tempdir_in("/dev/shm").expect("tempdir");
    let p = |name: &str| tmp.path().join(name);
    fs::write(p("file"), b"x").expect("write");
    rustix::fs::mknodat(CWD, p("fifo"), FileType::Fifo, Mode::from(0o600), 0).expect("mkfifo");
    std::os::unix::fs::symlink("file", p("link")).expect("symlink");
    let dir = fs::File::open(tmp.path()).expect("open");
    let pin = |name: &str| super::pin_in_tree(&dir, Path::new(name)).expect("pin");

    // A fifo with no writer would block a reading open forever; it is refused unopened.
    assert_eq!(super::open_pinned(pin("fifo").as_fd()).unwrap_err(), rustix::io::Errno::INVAL);
    // A symlink is pinned as itself, never followed.
    let link = pin("link");
    assert_eq!(super::fstat(&link).expect("stat").file_type(), FileType::Symlink);
    assert_eq!(super::open_pinned(link.as_fd()).unwrap_err(), rustix::io::Errno::INVAL);
    assert_eq!(
        super::chmod_pinned(link.as_fd(), Mode::from(0o777)).unwrap_err(),
        rustix::io::Errno::LOOP
    );
    assert_eq!(fs::metadata(p("file")).expect("stat").mode() & 0o777, 0o644 & !umask());
    let mut read = String::new();
    std::io::Read::read_to_string(
        &mut fs::File::from(super::open_pinned(pin("file").as_fd()).expect("open")),
        &mut read,
    )
    .expect("read");
    assert_eq!(read, "x");
    // Only one component, beneath the directory.
    for bad in ["..", "/etc", "link/x"] {
        assert!(super::pin_in_tree(&dir, Path::new(bad)).is_err(), "{bad}");
    }

    if is_root() {
        // A device is never opened either (a whiteout, 0:0, would fail with ENXIO).
        let whiteout = rustix::fs::makedev(0, 0);
        rustix::fs::mknodat(CWD, p("wh"), FileType::CharacterDevice, Mode::empty(), whiteout)
            .expect("mknod");
        assert_eq!(super::open_pinned(pin("wh").as_fd()).unwrap_err(), rustix::io::Errno::INVAL);
    }
}

fn umask() -> u32 {
    let old = rustix::process::umask(Mode::empty());
    rustix::process::umask(old);
    old.bits()
}

/// Every path below `root`, never following a symlink.
fn names_below(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in fs::read_dir(&dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            if fs::symlink_metadata(&path).expect("lstat").is_dir() {
                todo.push(path.clone());
            }
            out.push(path);
        }
    }
    out
}

/// Swaps the entries `a` and `b` of `dir` back and forth until dropped.
struct Swapper {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Swapper {
    fn start(dir: &Path, a: &str, b: &str) -> Swapper {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, dir, a, b) = (stop.clone(), dir.to_path_buf(), a.to_owned(), b.to_owned());
        let thread = std::thread::spawn(move || {
            let fd = fs::File::open(&dir).expect("open");
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let exchange = rustix::fs::RenameFlags::EXCHANGE;
                let _ = rustix::fs::renameat_with(&fd, a.as_str(), &fd, b.as_str(), exchange);
            }
        });
        Swapper { stop, thread: Some(thread) }
    }
}

impl Drop for Swapper {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn entries_swapped_during_a_walk_are_never_followed_or_opened() {
    let tmp = tempfile::tempdir_in("/dev/shm").expect("tempdir");
    let outside = tmp.path().join("outside");
    fs::create_dir(&outside).expect("mkdir");
    fs::write(outside.join("secret"), b"s").expect("write");
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("d/sub")).expect("mkdir");
    fs::write(src.join("d/sub/f"), b"in the tree").expect("write");
    fs::write(src.join("file"), b"file").expect("write");
    std::os::unix::fs::symlink(&outside, src.join("link")).expect("symlink");
    // As root, a device (0:0, a whiteout: opening it fails with ENXIO); else a fifo.
    if is_root() {
        let dev = rustix::fs::makedev(0, 0);
        rustix::fs::mknodat(CWD, src.join("node"), FileType::CharacterDevice, Mode::empty(), dev)
    } else {
        rustix::fs::mknodat(CWD, src.join("node"), FileType::Fifo, Mode::from(0o600), 0)
    }
    .expect("mknod");

    // A directory and a symlink out of the tree trade places, and so do a file and a
    // device, while the tree is copied and measured over and over.
    let _dirs = Swapper::start(&src, "d", "link");
    let _files = Swapper::start(&src, "file", "node");
    for round in 0..400 {
        let dst = tmp.path().join(format!("dst{round}"));
        fs::create_dir(&dst).expect("mkdir");
        // An entry that changed type between its lstat and its use fails the copy; the
        // device is never opened (which here would fail with ENXIO instead).
        if let Err(e) = copy_tree(&open(&src), &open(&dst)) {
            let msg = e.to_string();
            assert!(!msg.contains("No such device or address"), "round {round}: {msg}");
        }
        let copied = names_below(&dst);
        assert!(copied.iter().all(|p| !p.ends_with("secret")), "round {round}: {copied:?}");
        remove_tree(&open(tmp.path()), format!("dst{round}")).expect("remove a copy");
        let usage = super::measure_and_sync(&open(&src)).expect("usage");
        // root, d, d/sub, d/sub/f, file, link, node; never what `outside` holds.
        assert!(usage.inodes <= 7, "round {round}: {usage:?}");
    }
    drop((_dirs, _files));
    assert_eq!(fs::read(outside.join("secret")).expect("outside untouched"), b"s");
}

#[test]
fn removal_racing_a_symlink_swap_never_reaches_outside() {
    let tmp = tempfile::tempdir_in("/dev/shm").expect("tempdir");
    let outside = tmp.path().join("outside");
    fs::create_dir(&outside).expect("mkdir");
    for round in 0..50 {
        fs::write(outside.join("precious"), b"p").expect("write");
        let doomed = tmp.path().join("doomed");
        fs::create_dir_all(doomed.join("d")).expect("mkdir");
        for i in 0..20 {
            fs::write(doomed.join(format!("d/f{i}")), b"f").expect("write");
        }
        fs::write(doomed.join("d/precious"), b"in the tree").expect("write");
        std::os::unix::fs::symlink(&outside, doomed.join("link")).expect("symlink");
        {
            let _swap = Swapper::start(&doomed, "d", "link");
            // It may fail ("replaced during removal"); it must never follow the link.
            let _ = remove_tree(&open(tmp.path()), "doomed");
        }
        assert_eq!(fs::read(outside.join("precious")).expect("round {round}"), b"p");
        match remove_tree(&open(tmp.path()), "doomed") {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => panic!("round {round}: {e}"),
        }
    }
    assert_eq!(fs::read_dir(&outside).expect("read_dir").count(), 1);
}

#[test]
fn make_dir_synced_makes_what_is_missing_and_follows_no_symlink() {
    use std::os::unix::fs::{DirBuilderExt, symlink};
    let tmp = tempfile::tempdir_in("/dev/shm").expect("tempdir");
    let root = open(tmp.path());
    let outside = tmp.path().join("outside");
    fs::create_dir(&outside).expect("mkdir outside");

    // Made, every level, owner-only; the handle is the deepest one.
    let made = super::make_dir_synced(&root, "a/b/c", 0o700).expect("make a/b/c");
    made.write("f", b"x").expect("write through the handle");
    assert_eq!(fs::read(tmp.path().join("a/b/c/f")).expect("read"), b"x");
    for rel in ["a", "a/b", "a/b/c"] {
        let mode = fs::metadata(tmp.path().join(rel)).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{rel}");
    }
    // One already there is taken as it is, its mode untouched.
    fs::DirBuilder::new().mode(0o755).create(tmp.path().join("open")).expect("mkdir");
    fs::set_permissions(tmp.path().join("open"), fs::Permissions::from_mode(0o755)).unwrap();
    super::make_dir_synced(&root, "open/sub", 0o700).expect("make open/sub");
    let mode = fs::metadata(tmp.path().join("open")).expect("stat").permissions().mode();
    assert_eq!(mode & 0o777, 0o755);

    // A symlink, last or along the way, is refused and nothing is made through it:
    // an absolute one, and a relative one that stays inside (which cap-std follows).
    symlink(&outside, tmp.path().join("link")).expect("symlink");
    symlink("outside", tmp.path().join("rel")).expect("symlink");
    for rel in ["link", "link/sub", "rel", "rel/sub"] {
        assert!(super::make_dir_synced(&root, rel, 0o700).is_err(), "{rel}");
    }
    assert_eq!(fs::read_dir(&outside).expect("list").count(), 0);
    let err = super::make_dir_synced(&root, "a/../../x", 0o700).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(!tmp.path().join("x").exists() && !tmp.path().parent().unwrap().join("x").exists());
    // A file in the way is an error, not replaced.
    fs::write(tmp.path().join("file"), b"").expect("write");
    assert!(super::make_dir_synced(&root, "file/sub", 0o700).is_err());
}
