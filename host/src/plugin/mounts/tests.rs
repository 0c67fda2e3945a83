//! Mounts resolve to real paths below the root, and nothing else passes.

use std::fs;
use std::os::unix::fs::symlink;

use cap_std::ambient_authority;

use super::*;
use crate::error::ErrorKind;

struct Fixture {
    _tmp: tempfile::TempDir,
    root_path: PathBuf,
    root: Dir,
}

/// A root with `s/1/fs`, `s/2/fs`, `s/3/{fs,work}` and symlinks inside and out.
fn fixture() -> Fixture {
    let tmp = tempfile::tempdir_in("/dev/shm").expect("tempdir");
    let base = tmp.path().canonicalize().expect("canonicalize");
    let root_path = base.join("root");
    for dir in ["s/1/fs", "s/2/fs", "s/3/fs", "s/3/work", "odd:name", "odd,name"] {
        fs::create_dir_all(root_path.join(dir)).expect("mkdir");
    }
    fs::create_dir(base.join("outside")).expect("mkdir outside");
    fs::write(root_path.join("file"), b"").expect("write");
    for (link, target) in [
        ("up", ".."),
        ("abs", "/"),
        ("out", "../outside"),
        ("s/1/current", "fs"),
        ("alias", "s/2"),
        ("self", "."),
        ("colon", "odd:name"),
        ("comma", "odd,name"),
    ] {
        symlink(target, root_path.join(link)).expect("symlink");
    }
    let root = Dir::open_ambient_dir(&root_path, ambient_authority()).expect("open root");
    Fixture { _tmp: tmp, root_path, root }
}

fn mount(kind: &str, source: &str, options: &[&str]) -> Mount {
    Mount {
        kind: kind.to_owned(),
        source: source.to_owned(),
        target: String::new(),
        options: options.iter().map(|&o| o.to_owned()).collect(),
    }
}

impl Fixture {
    fn resolve(&self, mounts: Vec<Mount>) -> Result<Vec<Mount>> {
        resolve(&self.root, &self.root_path, mounts)
    }

    fn host(&self, rel: &str) -> String {
        self.root_path.join(rel).to_str().expect("utf-8").to_owned()
    }

    /// Resolves one mount that must be refused as invalid, and returns the message.
    fn refused(&self, m: Mount) -> String {
        let what = format!("{m:?}");
        let e = self.resolve(vec![m]).expect_err(&what);
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{what}: {e}");
        assert!(e.message().starts_with("plugin mount 0: "), "{e}");
        e.message().to_owned()
    }
}

#[test]
fn bind_and_overlay_resolve_to_host_paths() {
    let fx = fixture();
    let bind = mount("bind", "s/1/fs", &["rbind", "ro", "nosuid"]);
    let overlay = mount(
        "overlay",
        "overlay",
        &["index=off", "lowerdir=s/1/fs:./s/2/fs", "upperdir=s/3/fs", "workdir=s/3/work", "rw"],
    );
    let got = fx.resolve(vec![bind, overlay]).expect("resolve");
    assert_eq!(got[0].kind, "bind");
    assert_eq!(got[0].source, fx.host("s/1/fs"));
    assert_eq!(got[0].target, "");
    assert_eq!(got[0].options, ["rbind", "ro", "nosuid"]);
    assert_eq!(got[1].source, "overlay");
    let lower = format!("lowerdir={}:{}", fx.host("s/1/fs"), fx.host("s/2/fs"));
    let upper = format!("upperdir={}", fx.host("s/3/fs"));
    let work = format!("workdir={}", fx.host("s/3/work"));
    assert_eq!(got[1].options, ["index=off", &lower, &upper, &work, "rw"]);
    // A read-only overlay needs no upper and work directories.
    fx.resolve(vec![mount("overlay", "overlay", &["lowerdir=s/1/fs:s/2/fs"])]).expect("ro");
    assert!(fx.resolve(Vec::new()).expect("none").is_empty());
}

#[test]
fn symlinks_inside_resolve_to_their_real_targets() {
    let fx = fixture();
    let got = fx
        .resolve(vec![
            mount("bind", "s/1/current", &["rbind"]),
            mount("bind", "alias/fs", &["rbind"]),
            mount("overlay", "overlay", &["lowerdir=alias/fs:s/1/current"]),
        ])
        .expect("resolve");
    assert_eq!(got[0].source, fx.host("s/1/fs"));
    assert_eq!(got[1].source, fx.host("s/2/fs"));
    let lower = format!("lowerdir={}:{}", fx.host("s/2/fs"), fx.host("s/1/fs"));
    assert_eq!(got[2].options, [lower]);
}

#[test]
fn paths_leading_out_are_refused() {
    let fx = fixture();
    for path in ["out", "up", "abs", "up/root/s", "abs/tmp", "out/..", "/tmp", "..", "s/../.."] {
        let message = fx.refused(mount("bind", path, &["rbind"]));
        assert!(message.contains(&format!("{path:?}")), "{message}");
        fx.refused(mount("overlay", "overlay", &[&format!("lowerdir=s/1/fs:{path}")]));
        fx.refused(mount(
            "overlay",
            "overlay",
            &["lowerdir=s/1/fs", &format!("upperdir={path}"), "workdir=s/3/work"],
        ));
        fx.refused(mount(
            "overlay",
            "overlay",
            &["lowerdir=s/1/fs", "upperdir=s/3/fs", &format!("workdir={path}")],
        ));
    }
    let message = fx.refused(mount("bind", "out", &[]));
    assert!(message.contains("outside the plugin root"), "{message}");
}

#[test]
fn the_root_itself_missing_paths_and_files_are_refused() {
    let fx = fixture();
    for (path, why) in [
        ("", "is empty"),
        (".", "names the plugin root itself"),
        ("self", "not below the plugin root"),
        ("missing", "does not exist"),
        ("file", "is not a directory"),
        ("s/1/fs\0x", "NUL"),
    ] {
        let message = fx.refused(mount("bind", path, &[]));
        assert!(message.contains(why), "{path:?}: {message}");
    }
    let message = fx.refused(mount("overlay", "overlay", &["lowerdir=s/1/fs::s/2/fs"]));
    assert!(message.contains("lowerdir element 1 \"\" is empty"), "{message}");
}

#[test]
fn option_injection_is_refused() {
    let fx = fixture();
    for option in [
        "lowerdir=s/1/fs,upperdir=/etc",
        "lowerdir=s/1/fs,upperdir=s/3/fs",
        "lowerdir=odd,name",
        "lowerdir=odd\\:name",
        "lowerdir=comma",
        "lowerdir=colon",
        "lowerdir=s/1/fs\\",
    ] {
        let message = fx.refused(mount("overlay", "overlay", &[option]));
        assert!(message.contains("overlayfs would parse"), "{option}: {message}");
    }
    for option in ["upperdir=odd:name", "upperdir=s/3/fs,lowerdir=/"] {
        let m = mount("overlay", "overlay", &["lowerdir=s/1/fs", option, "workdir=s/3/work"]);
        let message = fx.refused(m);
        assert!(message.contains("overlayfs would parse"), "{option}: {message}");
    }
    // A bind source is a separate argument to mount(2): such names are fine there.
    let got = fx.resolve(vec![mount("bind", "odd,name", &[]), mount("bind", "colon", &[])]);
    let got = got.expect("bind of odd names");
    assert_eq!(got[0].source, fx.host("odd,name"));
    assert_eq!(got[1].source, fx.host("odd:name"));
}

#[test]
fn only_allowed_types_and_options_pass() {
    let fx = fixture();
    for kind in ["tmpfs", "proc", "btrfs", "Bind", "", "ext4"] {
        let message = fx.refused(mount(kind, "s/1/fs", &[]));
        assert!(message.contains(&format!("type {kind:?} is not allowed")), "{message}");
    }
    let bind_bad = [
        "lowerdir=s/1/fs",
        "suid",
        "dev",
        "exec",
        "shared",
        "rshared",
        "",
        "ro,dev",
        "index=off",
        "x-foo",
        "loop",
        "uid=0",
        "context=x",
    ];
    for option in bind_bad {
        let message = fx.refused(mount("bind", "s/1/fs", &["rbind", option]));
        assert!(message.contains(&format!("option {option:?} is not allowed")), "{message}");
    }
    let overlay_bad = [
        "bind",
        "rbind",
        "redirect_dir=on",
        "metacopy=on",
        "index=on",
        "lowerdir+=s/1/fs",
        "datadir+=s/2/fs",
        "xino=on",
        "nfs_export=on",
        "uuid=on",
        "suid",
        "default_permissions,ro",
    ];
    for option in overlay_bad {
        let message = fx.refused(mount("overlay", "overlay", &["lowerdir=s/1/fs", option]));
        assert!(message.contains(&format!("option {option:?} is not allowed")), "{message}");
    }
    let mut all = vec!["lowerdir=s/1/fs"];
    all.extend(COMMON_OPTIONS.iter().chain(OVERLAY_OPTIONS));
    fx.resolve(vec![mount("overlay", "overlay", &all)]).expect("every overlay option");
    let all: Vec<&str> = COMMON_OPTIONS.iter().chain(BIND_OPTIONS).copied().collect();
    fx.resolve(vec![mount("bind", "s/1/fs", &all)]).expect("every bind option");
}

#[test]
fn overlay_shape_and_source_are_checked() {
    let fx = fixture();
    let message = fx.refused(mount("overlay", "overlay", &["ro"]));
    assert!(message.contains("needs a lowerdir="), "{message}");
    let message = fx.refused(mount("overlay", "overlay", &["lowerdir=s/1/fs", "upperdir=s/3/fs"]));
    assert!(message.contains("go together"), "{message}");
    let message = fx.refused(mount("overlay", "overlay", &["lowerdir=s/1/fs", "lowerdir=s/2/fs"]));
    assert!(message.contains("given twice"), "{message}");
    for source in ["", "-o", "a b", "a,b", "/dev/sda", "x\0"] {
        let message = fx.refused(mount("overlay", source, &["lowerdir=s/1/fs"]));
        assert!(message.contains("overlay source"), "{message}");
    }
    fx.resolve(vec![mount("overlay", "wasnap-1.x_y", &["lowerdir=s/1/fs"])]).expect("plain name");
}

#[test]
fn targets_are_checked() {
    let fx = fixture();
    // Even an innocent-looking relative target: it would be resolved through content.
    for target in ["/etc", "..", "a/../..", ".", "a\0", "sub/dir", "x"] {
        let mut m = mount("bind", "s/1/fs", &[]);
        m.target = target.to_owned();
        let message = fx.refused(m);
        assert!(message.contains("target"), "{message}");
    }
}

#[test]
fn errors_name_the_mount_by_index() {
    let fx = fixture();
    let e = fx
        .resolve(vec![mount("bind", "s/1/fs", &[]), mount("bind", "s/1/fs", &["x"])])
        .expect_err("second is bad");
    assert_eq!(e.message(), "plugin mount 1: option \"x\" is not allowed");
}

#[test]
fn a_wrong_root_path_is_an_internal_error() {
    let fx = fixture();
    let other = fx.root_path.join("s");
    let e = resolve(&fx.root, &other, vec![mount("bind", "s/1/fs", &[])]).expect_err("wrong root");
    assert_eq!(e.kind(), ErrorKind::Internal, "{e}");
    let e =
        resolve(&fx.root, &fx.root_path.join("alias/.."), Vec::new()).expect_err("not canonical");
    assert_eq!(e.kind(), ErrorKind::Internal, "{e}");
}
