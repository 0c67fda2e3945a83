//! Each operation works inside the root, and no path gets any of them outside it.
//!
//! Every test builds the same layout in a tmpfs directory:
//!
//! ```text
//! outside/secret          a file the plugin must never touch, with user.keep set
//! root/                   the plugin's root
//!   a/f, a/d/g            an ordinary tree
//!   in -> a               a symlink that stays inside
//!   up -> ..              leads out relatively
//!   abs -> /              leads out absolutely
//!   out -> ../outside     a directory outside
//!   outfile -> ../outside/secret
//!   dangle -> ../outside/new   dangling, outside
//! ```

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use cap_std::ambient_authority;
use rustix::fs::XattrFlags;

use super::*;
use crate::error::ErrorKind;

/// Tells why a root-only test does nothing.
fn skip_unless_root(test: &str) -> bool {
    if !rustix::process::geteuid().is_root() {
        // CI runs as root; a skip there would hide a broken machine set-up.
        assert!(std::env::var_os("CI").is_none(), "{test}: needs root, and CI must not skip");
        eprintln!("{test}: skipped: needs root (chown, mknod, trusted.* xattrs)");
        return true;
    }
    false
}

struct Fixture {
    _tmp: tempfile::TempDir,
    root_path: PathBuf,
    outside: PathBuf,
    root: Dir,
}

impl Fixture {
    fn new() -> Fixture {
        let tmp = tempfile::tempdir_in("/dev/shm").expect("tempdir");
        let (root_path, outside) = (tmp.path().join("root"), tmp.path().join("outside"));
        fs::create_dir_all(root_path.join("a/d")).expect("mkdir");
        fs::create_dir(&outside).expect("mkdir outside");
        fs::write(root_path.join("a/f"), b"hello").expect("write");
        fs::write(root_path.join("a/d/g"), vec![7u8; 10_000]).expect("write");
        let secret = outside.join("secret");
        fs::write(&secret, b"secret").expect("write secret");
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o640)).expect("chmod secret");
        rustix::fs::setxattr(&secret, "user.keep", b"1", XattrFlags::empty()).expect("xattr");
        for (link, target) in [
            ("in", "a"),
            ("up", ".."),
            ("abs", "/"),
            ("out", "../outside"),
            ("outfile", "../outside/secret"),
            ("dangle", "../outside/new"),
        ] {
            symlink(target, root_path.join(link)).expect("symlink");
        }
        let root = Dir::open_ambient_dir(&root_path, ambient_authority()).expect("open root");
        Fixture { _tmp: tmp, root_path, outside, root }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root_path.join(rel)
    }

    /// Everything about `outside/` that an escaping call could change.
    fn outside_state(&self) -> Vec<Seen> {
        let mut state = Vec::new();
        for entry in fs::read_dir(&self.outside).expect("read outside") {
            let path = entry.expect("entry").path();
            let meta = fs::symlink_metadata(&path).expect("lstat");
            let contents = if meta.is_file() { fs::read(&path).expect("read") } else { Vec::new() };
            let mut buf = vec![0u8; 256];
            let keep =
                rustix::fs::lgetxattr(&path, "user.keep", &mut buf).ok().map(|n| buf[..n].to_vec());
            let name = path.file_name().expect("name").to_string_lossy().into_owned();
            let (mode, uid, gid) = (meta.mode(), meta.uid(), meta.gid());
            state.push(Seen { name, mode, uid, gid, contents, keep });
        }
        state.sort();
        state
    }
}

/// One entry of `outside/` as the tests compare it.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Seen {
    name: String,
    mode: u32,
    uid: u32,
    gid: u32,
    contents: Vec<u8>,
    keep: Option<Vec<u8>>,
}

fn assert_kind<T: std::fmt::Debug>(result: Result<T>, kind: ErrorKind, what: &str) {
    match result {
        Err(e) => assert_eq!(e.kind(), kind, "{what}: {e}"),
        Ok(v) => panic!("{what}: expected {kind}, got Ok({v:?})"),
    }
}

/// Paths that must be refused by every operation before it touches anything.
const ESCAPES: &[&str] = &[
    "/etc",
    "/",
    "..",
    "../outside/secret",
    "a/../../outside/secret",
    "a/..",
    "up/outside/secret",
    "abs/etc",
    "abs/tmp",
    "out/secret",
    "out/new",
    "in/../../outside",
    "",
    "a\0b",
];

#[test]
fn components_are_checked_lexically() {
    assert_eq!(components("./a//b/").expect("ok"), [OsStr::new("a"), OsStr::new("b")]);
    assert_eq!(components("a/./b").expect("ok"), [OsStr::new("a"), OsStr::new("b")]);
    assert!(components(".").expect("ok").is_empty());
    assert!(components("./").expect("ok").is_empty());
    assert_eq!(components(""), Err("is empty"));
    assert_eq!(components("/a"), Err("is absolute"));
    assert_eq!(components("a/../b"), Err("contains \"..\""));
    assert_eq!(components("a\0"), Err("contains a NUL byte"));
}

#[test]
fn every_operation_refuses_every_escape() {
    let fx = Fixture::new();
    let before = fx.outside_state();
    let root = &fx.root;
    for &path in ESCAPES {
        let ops: Vec<(&str, Result<()>)> = vec![
            ("copy src", copy_tree(root, path, "copy")),
            ("copy dst", copy_tree(root, "a", path)),
            ("remove", remove_tree(root, path)),
            ("usage", disk_usage(root, path).map(drop)),
            ("chown", chown(root, path, 4242, 4242)),
            ("chmod", chmod(root, path, 0o777)),
            ("set xattr", set_xattr(root, path, "user.x", b"v")),
            ("get xattr", get_xattr(root, path, "user.keep").map(drop)),
            ("list xattrs", list_xattrs(root, path).map(drop)),
            ("remove xattr", remove_xattr(root, path, "user.keep")),
            ("whiteout", make_whiteout(root, path)),
        ];
        for (op, result) in ops {
            let e = result.expect_err(&format!("{op} {path:?} must be refused"));
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{op} {path:?}: {e}");
            let shown = format!("{path:?}");
            assert!(e.message().contains(&shown), "{op}: message names the path: {e}");
        }
    }
    assert!(!fx.path("copy").exists(), "no copy was made");
    assert_eq!(fx.outside_state(), before);
}

#[test]
fn copy_tree_copies_and_refuses_bad_sources_and_destinations() {
    let fx = Fixture::new();
    let root = &fx.root;
    symlink("f", fx.path("a/link")).expect("symlink");
    fs::set_permissions(fx.path("a/f"), fs::Permissions::from_mode(0o4751)).expect("chmod");
    copy_tree(root, "a", "b").expect("copy");
    assert_eq!(fs::read(fx.path("b/f")).expect("read"), b"hello");
    assert_eq!(fs::read(fx.path("b/d/g")).expect("read").len(), 10_000);
    assert_eq!(fs::read_link(fx.path("b/link")).expect("readlink"), Path::new("f"));
    assert_eq!(fs::metadata(fx.path("b/f")).expect("stat").mode() & 0o7777, 0o4751);
    copy_tree(root, "./a/d/", "b/d2").expect("copy into a subdirectory");
    assert!(fx.path("b/d2/g").is_file());

    assert_kind(copy_tree(root, "a", "b"), ErrorKind::AlreadyExists, "existing destination");
    assert_kind(copy_tree(root, "missing", "c"), ErrorKind::NotFound, "missing source");
    assert_kind(copy_tree(root, "a", "missing/c"), ErrorKind::NotFound, "missing parent");
    assert_kind(copy_tree(root, "a/f", "c"), ErrorKind::InvalidArgument, "file source");
    assert_kind(copy_tree(root, ".", "c"), ErrorKind::InvalidArgument, "root source");
    assert_kind(copy_tree(root, "a", "."), ErrorKind::InvalidArgument, "root destination");
    assert_kind(copy_tree(root, "a", "a/c"), ErrorKind::InvalidArgument, "dst in src");
    assert_kind(copy_tree(root, "a", "a/d/c"), ErrorKind::InvalidArgument, "dst deep in src");
    assert_kind(copy_tree(root, "a", "in/c"), ErrorKind::InvalidArgument, "dst in src via link");
    assert!(!fx.path("a/c").exists() && !fx.path("a/d/c").exists());
    // A symlink as the source is refused even when it stays inside.
    assert_kind(copy_tree(root, "in", "c"), ErrorKind::InvalidArgument, "symlink source");
    assert!(!fx.path("c").exists());
}

#[test]
fn copy_tree_never_follows_a_final_symlink_out() {
    let fx = Fixture::new();
    let before = fx.outside_state();
    let root = &fx.root;
    for link in ["out", "outfile", "up", "abs"] {
        assert_kind(copy_tree(root, link, "c"), ErrorKind::InvalidArgument, link);
        assert_kind(copy_tree(root, "a", link), ErrorKind::AlreadyExists, link);
    }
    // mkdirat does not follow a dangling symlink either.
    assert_kind(copy_tree(root, "a", "dangle"), ErrorKind::AlreadyExists, "dangle");
    assert!(!fx.outside.join("new").exists());
    assert!(!fx.path("c").exists());
    assert_eq!(fx.outside_state(), before);
}

#[test]
fn remove_tree_removes_and_never_follows() {
    let fx = Fixture::new();
    let before = fx.outside_state();
    let root = &fx.root;
    remove_tree(root, "a/d").expect("remove dir");
    assert!(!fx.path("a/d").exists());
    remove_tree(root, "a/f").expect("remove file");
    assert!(!fx.path("a/f").exists());
    remove_tree(root, "a/d").expect("missing is fine");
    remove_tree(root, "nope/deeper").expect("missing parent is fine");
    for link in ["out", "outfile", "up", "abs", "dangle"] {
        remove_tree(root, link).expect("remove a symlink");
        assert!(fs::symlink_metadata(fx.path(link)).is_err(), "{link} removed");
    }
    assert_kind(remove_tree(root, "."), ErrorKind::InvalidArgument, "root");
    assert!(fx.root_path.is_dir());
    assert_eq!(fx.outside_state(), before);
}

#[test]
fn disk_usage_counts_trees_and_single_entries() {
    let fx = Fixture::new();
    let root = &fx.root;
    assert_eq!(disk_usage(root, ".").expect("root"), fsutil::disk_usage(root).expect("fsutil"));
    let a = disk_usage(root, "a").expect("a");
    assert_eq!(a.inodes, 4, "a, f, d, g");
    assert!(a.size >= 10_000, "{a:?}");
    let f = disk_usage(root, "a/d/g").expect("file");
    assert_eq!(f.inodes, 1);
    assert!(f.size >= 10_000, "{f:?}");
    // A symlink leading out counts as itself, however big its target.
    for link in ["out", "outfile", "in"] {
        assert_eq!(disk_usage(root, link).expect(link).inodes, 1, "{link}");
    }
    assert_kind(disk_usage(root, "missing"), ErrorKind::NotFound, "missing");
}

#[test]
fn chown_changes_entries_and_links_themselves() {
    if skip_unless_root("chown_changes_entries_and_links_themselves") {
        return;
    }
    let fx = Fixture::new();
    let before = fx.outside_state();
    let root = &fx.root;
    chown(root, "a/f", 1000, 2000).expect("chown file");
    let meta = fs::metadata(fx.path("a/f")).expect("stat");
    assert_eq!((meta.uid(), meta.gid()), (1000, 2000));
    chown(root, "in/d", 1001, 1001).expect("chown through an inside link");
    assert_eq!(fs::metadata(fx.path("a/d")).expect("stat").uid(), 1001);
    for link in ["out", "outfile", "dangle", "abs"] {
        chown(root, link, 1002, 1003).expect("chown a symlink");
        let meta = fs::symlink_metadata(fx.path(link)).expect("lstat");
        assert_eq!((meta.uid(), meta.gid()), (1002, 1003), "{link}");
    }
    assert_eq!(fs::metadata("/").expect("stat /").uid(), 0);
    assert_kind(chown(root, "missing", 1, 1), ErrorKind::NotFound, "missing");
    assert_kind(chown(root, ".", 1, 1), ErrorKind::InvalidArgument, "root");
    assert_eq!(fx.outside_state(), before);
}

#[test]
fn chmod_sets_permission_bits_and_refuses_symlinks() {
    let fx = Fixture::new();
    let before = fx.outside_state();
    let root = &fx.root;
    chmod(root, "a/f", 0o4750).expect("chmod file");
    assert_eq!(fs::metadata(fx.path("a/f")).expect("stat").mode() & 0o7777, 0o4750);
    chmod(root, "a/d", 0o1777).expect("chmod dir");
    assert_eq!(fs::metadata(fx.path("a/d")).expect("stat").mode() & 0o7777, 0o1777);
    chmod(root, "in/f", 0o600).expect("chmod through an inside link");
    assert_eq!(fs::metadata(fx.path("a/f")).expect("stat").mode() & 0o7777, 0o600);
    assert_kind(chmod(root, "a/f", 0o100644), ErrorKind::InvalidArgument, "file type bits");
    for link in ["out", "outfile", "dangle", "in", "abs"] {
        let e = chmod(root, link, 0o777).expect_err(link);
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{link}: {e}");
        assert!(e.message().contains("symlink"), "{e}");
    }
    assert_kind(chmod(root, "missing", 0o644), ErrorKind::NotFound, "missing");
    assert_kind(chmod(root, ".", 0o700), ErrorKind::InvalidArgument, "root");
    assert_eq!(fx.outside_state(), before);
}

#[test]
fn xattrs_are_set_read_listed_and_removed() {
    let fx = Fixture::new();
    let root = &fx.root;
    assert_eq!(get_xattr(root, "a/f", "user.x").expect("get unset"), None);
    set_xattr(root, "a/f", "user.x", b"1").expect("set");
    set_xattr(root, "a/f", "user.empty", b"").expect("set empty");
    set_xattr(root, "in/f", "user.big", &[9u8; 3000]).expect("set through an inside link");
    assert_eq!(get_xattr(root, "a/f", "user.x").expect("get"), Some(b"1".to_vec()));
    assert_eq!(get_xattr(root, "a/f", "user.empty").expect("get"), Some(Vec::new()));
    assert_eq!(get_xattr(root, "a/f", "user.big").expect("get"), Some(vec![9u8; 3000]));
    let mut names = list_xattrs(root, "a/f").expect("list");
    names.retain(|n| n.starts_with("user."));
    names.sort();
    assert_eq!(names, ["user.big", "user.empty", "user.x"]);
    remove_xattr(root, "a/f", "user.x").expect("remove");
    remove_xattr(root, "a/f", "user.x").expect("remove again");
    assert_eq!(get_xattr(root, "a/f", "user.x").expect("get removed"), None);

    set_xattr(root, "a", "user.dir", b"d").expect("set on dir");
    fs::write(fx.path("x"), b"").expect("write");
    set_xattr(root, "x", "user.top", b"t").expect("set at top level");
    assert_eq!(get_xattr(root, "x", "user.top").expect("get"), Some(b"t".to_vec()));
    // The root may be read but not written.
    list_xattrs(root, ".").expect("list root");
    assert_eq!(get_xattr(root, ".", "user.nope").expect("get root"), None);
    assert_kind(set_xattr(root, ".", "user.x", b"1"), ErrorKind::InvalidArgument, "set root");
    assert_kind(remove_xattr(root, ".", "user.x"), ErrorKind::InvalidArgument, "rm root");

    assert_kind(set_xattr(root, "a/f", "", b"1"), ErrorKind::InvalidArgument, "empty name");
    assert_kind(set_xattr(root, "a/f", "user.\0", b"1"), ErrorKind::InvalidArgument, "NUL");
    assert_kind(get_xattr(root, "missing", "user.x"), ErrorKind::NotFound, "missing");
    assert_kind(set_xattr(root, "missing", "user.x", b""), ErrorKind::NotFound, "missing");
}

#[test]
fn xattrs_of_a_symlink_are_its_own() {
    let fx = Fixture::new();
    let before = fx.outside_state();
    let root = &fx.root;
    // The target outside has user.keep; through the link nothing of it shows.
    assert_eq!(get_xattr(root, "outfile", "user.keep").expect("get"), None);
    assert!(!list_xattrs(root, "outfile").expect("list").contains(&"user.keep".to_owned()));
    // Linux keeps user.* off symlinks; the refusal must not reach the target either.
    let e = set_xattr(root, "outfile", "user.keep", b"2").expect_err("user.* on a symlink");
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
    let e = remove_xattr(root, "outfile", "user.keep").expect_err("user.* on a symlink");
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
    if !skip_unless_root("xattrs_of_a_symlink_are_its_own (trusted.*)") {
        for link in ["outfile", "out", "dangle"] {
            set_xattr(root, link, "trusted.x", b"link").expect("trusted.* on a symlink");
            let got = get_xattr(root, link, "trusted.x").expect("get");
            assert_eq!(got, Some(b"link".to_vec()), "{link}");
        }
        let mut buf = [0u8; 16];
        let on_target = rustix::fs::getxattr(fx.outside.join("secret"), "trusted.x", &mut buf);
        assert_eq!(on_target, Err(Errno::NODATA));
    }
    assert_eq!(fx.outside_state(), before);
}

#[test]
fn make_whiteout_creates_a_0_0_char_device() {
    if skip_unless_root("make_whiteout_creates_a_0_0_char_device") {
        return;
    }
    let fx = Fixture::new();
    let before = fx.outside_state();
    let root = &fx.root;
    make_whiteout(root, "a/d/wh").expect("whiteout");
    let meta = fs::symlink_metadata(fx.path("a/d/wh")).expect("lstat");
    assert!(meta.file_type().is_char_device());
    assert_eq!(meta.rdev(), 0);
    assert_eq!(meta.mode() & 0o7777, 0);
    make_whiteout(root, "in/wh2").expect("whiteout through an inside link");
    assert!(fs::symlink_metadata(fx.path("a/wh2")).expect("lstat").file_type().is_char_device());
    assert_kind(make_whiteout(root, "a/d/wh"), ErrorKind::AlreadyExists, "twice");
    assert_kind(make_whiteout(root, "a/f"), ErrorKind::AlreadyExists, "over a file");
    for link in ["out", "outfile", "dangle"] {
        assert_kind(make_whiteout(root, link), ErrorKind::AlreadyExists, link);
    }
    assert!(!fx.outside.join("new").exists());
    assert_kind(make_whiteout(root, "missing/wh"), ErrorKind::NotFound, "missing parent");
    assert_eq!(fx.outside_state(), before);
}
