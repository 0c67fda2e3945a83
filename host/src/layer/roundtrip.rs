//! apply(diff(x)) on x's parent reproduces x: a property test over generated trees.
//!
//! For each seed, a parent tree P is generated and a child X made from a copy of it by
//! random operations (files, directories, symlinks, hard links, fifos and, as root,
//! devices and owners; modes with setuid, setgid and sticky; nanosecond and whole-second
//! times; user xattrs; deletions, type changes, renames, emptied and refilled
//! directories). The diff of the two trees is applied onto a fresh copy of P, which must
//! then be X: every entry's type, mode, owner, mtime (directories too, atime not),
//! xattrs, symlink target, device number and contents, and the same groups of hard
//! links. As root, the same is done through a real overlay mount: the operations run on
//! the merged view, the upper directory is diffed, and the layer is applied both onto a
//! copy of P and, with overlay whiteouts, into an empty upper directory that must hold
//! the same whiteouts and opaque directories and show the same merged tree.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, CWD, FileType, Gid, Mode, Timespec, Timestamps, Uid, XattrFlags};

use super::apply::{self, ApplyOptions};
use super::diff::{self, Source};
use super::{Compression, Whiteouts};
use crate::fsutil::At;
use crate::fsutil::xattr::{self, Node as XNode};

/// How many seeds run, unless `WASNAP_ROUNDTRIP_SEEDS` says (for a longer search).
const SEEDS: u64 = 40;
const OVERLAY_SEEDS: u64 = 12;

fn seeds(default: u64) -> std::ops::Range<u64> {
    let n = std::env::var("WASNAP_ROUNDTRIP_SEEDS").ok().and_then(|s| s.parse().ok());
    0..n.unwrap_or(default)
}

// ---------------------------------------------------------------------------------------
// A small deterministic generator.

/// xorshift64*: enough randomness for trees, and the same trees for the same seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn percent(&mut self, p: u64) -> bool {
        self.next() % 100 < p
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(n);
        out
    }
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir_in("/dev/shm").expect("tempdir")
}

fn open(path: &Path) -> File {
    File::open(path).expect("open dir")
}

fn copy(src: &Path, dst: &Path) {
    let ambient = cap_std::ambient_authority();
    let src = cap_std::fs::Dir::open_ambient_dir(src, ambient).expect("src");
    let dst = cap_std::fs::Dir::open_ambient_dir(dst, ambient).expect("dst");
    crate::fsutil::copy_tree(&src, &dst).expect("copy");
}

// ---------------------------------------------------------------------------------------
// Making and changing trees.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Char,
    Block,
    HardLink,
}

/// Builds entries with random metadata below `base`.
struct Gen {
    rng: Rng,
    root: bool,
}

impl Gen {
    fn name(&mut self) -> OsString {
        match self.rng.below(14) {
            0 => OsString::from("L".repeat(self.rng.pick(&[120, 255]))),
            1 => OsString::from("ünïcødé"),
            2 => OsString::from_vec(vec![0xff, b'z']),
            3 => OsString::from("with space"),
            4 => OsString::from("x.y"),
            n => OsString::from(["a", "b", "c", "dd", "e", "f", "g", "h", "i"][n - 5]),
        }
    }

    /// A name not yet in the directory `dir`.
    fn new_name(&mut self, dir: &Path) -> Option<PathBuf> {
        for _ in 0..8 {
            let path = dir.join(self.name());
            if std::fs::symlink_metadata(&path).is_err() {
                return Some(path);
            }
        }
        None
    }

    fn kind(&mut self, depth: usize) -> Kind {
        loop {
            let kind = match self.rng.below(100) {
                0..40 => Kind::File,
                40..62 => Kind::Dir,
                62..74 => Kind::Symlink,
                74..80 => Kind::Fifo,
                80..85 => Kind::Char,
                85..88 => Kind::Block,
                _ => Kind::HardLink,
            };
            let privileged = matches!(kind, Kind::Char | Kind::Block);
            if (privileged && !self.root) || (kind == Kind::Dir && depth >= 4) {
                continue;
            }
            return kind;
        }
    }

    fn contents(&mut self) -> Vec<u8> {
        let n = match self.rng.below(100) {
            0..15 => 0,
            15..65 => 1 + self.rng.below(100),
            65..92 => 100 + self.rng.below(5000),
            _ => 70_000 + self.rng.below(200_000),
        };
        self.rng.bytes(n)
    }

    fn time(&mut self) -> Timespec {
        let secs = if self.rng.percent(4) {
            -(self.rng.below(1_000_000) as i64) - 1
        } else {
            self.rng.below(2_000_000_000) as i64
        };
        let nanos = if self.rng.percent(30) { 0 } else { self.rng.below(1_000_000_000) as i64 };
        Timespec { tv_sec: secs, tv_nsec: nanos as _ }
    }

    fn mode(&mut self, kind: Kind) -> u32 {
        match (kind, self.root) {
            (Kind::Dir, true) => self.rng.pick(&[0o755, 0o700, 0o1777, 0o2775, 0o555, 0o711]),
            (Kind::Dir, false) => self.rng.pick(&[0o755, 0o700, 0o775]),
            (_, true) => self
                .rng
                .pick(&[0o644, 0o600, 0o755, 0o4755, 0o2755, 0o6711, 0o1644, 0o444, 0o000, 0o640]),
            (_, false) => self.rng.pick(&[0o644, 0o600, 0o755, 0o640]),
        }
    }

    fn id(&mut self) -> u32 {
        self.rng.pick(&[0, 0, 1, 1000, 65534, 3_000_000])
    }

    /// Creates `path` as a `kind`, with random metadata; a directory is filled first.
    /// `links` are regular files a hard link may point to.
    fn create(&mut self, path: &Path, kind: Kind, depth: usize, links: &mut Vec<PathBuf>) {
        let mode = Mode::from_raw_mode(0o600);
        match kind {
            Kind::File => {
                std::fs::write(path, self.contents()).expect("write");
                links.push(path.to_path_buf());
            }
            Kind::Dir => {
                std::fs::create_dir(path).expect("mkdir");
                let n = self.rng.below(if depth == 0 { 8 } else { 5 });
                for _ in 0..n {
                    if let Some(child) = self.new_name(path) {
                        let kind = self.kind(depth + 1);
                        self.create(&child, kind, depth + 1, links);
                    }
                }
            }
            Kind::Symlink => {
                let target = match self.rng.below(6) {
                    0 => "../x".to_owned(),
                    1 => "/etc/passwd".to_owned(),
                    2 => "t/".repeat(1 + self.rng.below(400)),
                    3 => "a/./b//c".to_owned(),
                    4 => "dangling".to_owned(),
                    _ => "a".to_owned(),
                };
                std::os::unix::fs::symlink(target, path).expect("symlink");
            }
            Kind::Fifo => rustix::fs::mknodat(CWD, path, FileType::Fifo, mode, 0).expect("mkfifo"),
            Kind::Char | Kind::Block => {
                let (ft, dev) = if kind == Kind::Char {
                    (
                        FileType::CharacterDevice,
                        rustix::fs::makedev(1, 3 + self.rng.below(5) as u32),
                    )
                } else {
                    (FileType::BlockDevice, rustix::fs::makedev(7, self.rng.below(8) as u32))
                };
                rustix::fs::mknodat(CWD, path, ft, mode, dev).expect("mknod");
            }
            Kind::HardLink => {
                let live: Vec<_> = links
                    .iter()
                    .filter(|l| std::fs::symlink_metadata(l).is_ok_and(|m| m.is_file()))
                    .cloned()
                    .collect();
                if live.is_empty() {
                    return self.create(path, Kind::File, depth, links);
                }
                let target = live[self.rng.below(live.len())].clone();
                std::fs::hard_link(&target, path).expect("link");
                // A link shares its inode's metadata: nothing more to set.
                return;
            }
        }
        self.metadata(path, kind);
    }

    /// Owner, xattrs, mode and times, in that order (chown clears setuid and setgid).
    fn metadata(&mut self, path: &Path, kind: Kind) {
        if self.root && self.rng.percent(40) {
            let (uid, gid) = (Uid::from_raw(self.id()), Gid::from_raw(self.id()));
            rustix::fs::chownat(CWD, path, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)
                .expect("chown");
        }
        if matches!(kind, Kind::File | Kind::Dir) {
            for key in ["user.k1", "user.k2", "user.k3"] {
                if self.rng.percent(20) {
                    let n = self.rng.below(40);
                    let value = self.rng.bytes(n);
                    rustix::fs::lsetxattr(path, key, &value, XattrFlags::empty()).expect("xattr");
                }
            }
        }
        if self.root && self.rng.percent(8) {
            let n = self.rng.below(20);
            let value = self.rng.bytes(n);
            rustix::fs::lsetxattr(path, "trusted.t", &value, XattrFlags::empty())
                .expect("trusted xattr");
        }
        if kind != Kind::Symlink {
            let mode = self.mode(kind);
            rustix::fs::chmodat(CWD, path, Mode::from_raw_mode(mode), AtFlags::empty())
                .expect("chmod");
        }
        self.touch(path);
    }

    fn touch(&mut self, path: &Path) {
        let t = self.time();
        let times = Timestamps { last_access: t, last_modification: t };
        rustix::fs::utimensat(CWD, path, &times, AtFlags::SYMLINK_NOFOLLOW).expect("utimensat");
    }

    /// A parent tree in the empty directory `base`.
    fn parent(&mut self, base: &Path) -> Vec<PathBuf> {
        let mut links = Vec::new();
        let n = 2 + self.rng.below(9);
        for _ in 0..n {
            if let Some(path) = self.new_name(base) {
                let kind = self.kind(0);
                self.create(&path, kind, 0, &mut links);
            }
        }
        links
    }

    /// `ops` random changes to the tree at `base`. Errors the kernel may give (a rename
    /// across overlay layers) leave that change out.
    fn change(&mut self, base: &Path, ops: usize, links: &mut Vec<PathBuf>) {
        for _ in 0..ops {
            let entries = list(base);
            let dirs: Vec<PathBuf> = std::iter::once(base.to_path_buf())
                .chain(entries.iter().filter(|(_, m)| m.is_dir()).map(|(p, _)| base.join(p)))
                .collect();
            let pick = |rng: &mut Rng, want: &dyn Fn(&std::fs::Metadata) -> bool| {
                let some: Vec<_> = entries.iter().filter(|(_, m)| want(m)).collect();
                (!some.is_empty()).then(|| base.join(&some[rng.below(some.len())].0))
            };
            match self.rng.below(13) {
                // Something new, anywhere.
                0 | 1 => {
                    let dir = dirs[self.rng.below(dirs.len())].clone();
                    if let Some(path) = self.new_name(&dir) {
                        let depth = path.strip_prefix(base).map_or(0, |p| p.components().count());
                        let kind = self.kind(depth);
                        self.create(&path, kind, depth, links);
                    }
                }
                // New contents, in place (hard links see them too).
                2 => {
                    if let Some(path) = pick(&mut self.rng, &|m| m.is_file()) {
                        let mut f = std::fs::OpenOptions::new()
                            .write(true)
                            .truncate(true)
                            .open(&path)
                            .expect("open for writing");
                        f.write_all(&self.contents()).expect("write");
                    }
                }
                // Same size, same whole-second mtime, other bytes: only the contents say.
                3 => {
                    let coarse =
                        |m: &std::fs::Metadata| m.is_file() && m.len() > 0 && m.mtime_nsec() == 0;
                    if let Some(path) = pick(&mut self.rng, &coarse) {
                        let meta = std::fs::symlink_metadata(&path).expect("lstat");
                        let mut data = std::fs::read(&path).expect("read");
                        let i = self.rng.below(data.len());
                        data[i] ^= 0x5a;
                        std::fs::write(&path, &data).expect("write");
                        let t = Timespec { tv_sec: meta.mtime(), tv_nsec: 0 };
                        let times = Timestamps { last_access: t, last_modification: t };
                        rustix::fs::utimensat(CWD, &path, &times, AtFlags::SYMLINK_NOFOLLOW)
                            .expect("utimensat");
                    }
                }
                // Metadata only.
                4 => {
                    if let Some(path) = pick(&mut self.rng, &|_| true) {
                        let meta = std::fs::symlink_metadata(&path).expect("lstat");
                        let kind = kind_of(&meta);
                        self.metadata(&path, kind);
                    }
                }
                5 => {
                    if let Some(path) = pick(&mut self.rng, &|_| true) {
                        self.touch(&path);
                    }
                }
                6 => {
                    if let Some(path) = pick(&mut self.rng, &|m| m.is_file() || m.is_dir()) {
                        let _ = rustix::fs::lremovexattr(&path, "user.k1");
                        let value = self.rng.bytes(5);
                        rustix::fs::lsetxattr(&path, "user.k2", &value, XattrFlags::empty())
                            .expect("xattr");
                    }
                }
                // Deleted, directories with everything below.
                7 => {
                    if let Some(path) = pick(&mut self.rng, &|_| true) {
                        remove(&path);
                    }
                }
                // Replaced by something of another type (or the same).
                8 => {
                    if let Some(path) = pick(&mut self.rng, &|_| true) {
                        remove(&path);
                        let depth = path.strip_prefix(base).map_or(0, |p| p.components().count());
                        let kind = self.kind(depth.saturating_sub(1));
                        self.create(&path, kind, depth, links);
                    }
                }
                // A hard link to any file, changed or not.
                9 => {
                    let dir = dirs[self.rng.below(dirs.len())].clone();
                    if let (Some(path), Some(target)) =
                        (self.new_name(&dir), pick(&mut self.rng, &|m| m.is_file()))
                    {
                        std::fs::hard_link(&target, &path).expect("link");
                    }
                }
                // One name of a group of links removed.
                10 => {
                    if let Some(path) = pick(&mut self.rng, &|m| m.is_file() && m.nlink() > 1) {
                        std::fs::remove_file(&path).expect("unlink");
                    }
                }
                // Emptied and filled again (an opaque directory, in overlay terms).
                11 => {
                    if let Some(dir) = pick(&mut self.rng, &|m| m.is_dir()) {
                        for entry in std::fs::read_dir(&dir).expect("read_dir") {
                            remove(&entry.expect("entry").path());
                        }
                        let depth = dir.strip_prefix(base).map_or(0, |p| p.components().count());
                        for _ in 0..1 + self.rng.below(3) {
                            if let Some(path) = self.new_name(&dir) {
                                let kind = self.kind(depth);
                                self.create(&path, kind, depth, links);
                            }
                        }
                    }
                }
                // Moved elsewhere (not into itself).
                _ => {
                    let dir = dirs[self.rng.below(dirs.len())].clone();
                    if let (Some(from), Some(to)) =
                        (pick(&mut self.rng, &|_| true), self.new_name(&dir))
                        && !dir.starts_with(&from)
                    {
                        let _ = std::fs::rename(&from, &to);
                    }
                }
            }
        }
    }
}

fn kind_of(meta: &std::fs::Metadata) -> Kind {
    use std::os::unix::fs::FileTypeExt;
    let ft = meta.file_type();
    if ft.is_dir() {
        Kind::Dir
    } else if ft.is_symlink() {
        Kind::Symlink
    } else if ft.is_fifo() {
        Kind::Fifo
    } else if ft.is_char_device() {
        Kind::Char
    } else if ft.is_block_device() {
        Kind::Block
    } else {
        Kind::File
    }
}

fn remove(path: &Path) {
    let meta = std::fs::symlink_metadata(path).expect("lstat");
    if meta.is_dir() {
        std::fs::remove_dir_all(path).expect("rm -r");
    } else {
        std::fs::remove_file(path).expect("rm");
    }
}

/// Every entry below `base` (relative), with its lstat, in no particular order.
fn list(base: &Path) -> Vec<(PathBuf, std::fs::Metadata)> {
    let mut out = Vec::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        for entry in std::fs::read_dir(base.join(&rel)).expect("read_dir") {
            let entry = entry.expect("entry");
            let child = rel.join(entry.file_name());
            let meta = std::fs::symlink_metadata(base.join(&child)).expect("lstat");
            if meta.is_dir() {
                todo.push(child.clone());
            }
            out.push((child, meta));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

// ---------------------------------------------------------------------------------------
// Comparing trees.

/// What is compared of one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    kind: char,
    mode: u32,
    owner: (u32, u32),
    mtime: (i64, i64),
    rdev: u64,
    target: Option<Vec<u8>>,
    contents: Option<Vec<u8>>,
    xattrs: BTreeMap<String, Vec<u8>>,
}

/// A whole tree (its root's own metadata left out), and its groups of hard links.
#[derive(Debug)]
struct Snapshot {
    entries: BTreeMap<PathBuf, Entry>,
    links: BTreeSet<Vec<PathBuf>>,
}

fn snapshot(base: &Path) -> Snapshot {
    let mut entries = BTreeMap::new();
    let mut inodes: HashMap<(u64, u64), Vec<PathBuf>> = HashMap::new();
    for (rel, meta) in list(base) {
        let path = base.join(&rel);
        let kind = match kind_of(&meta) {
            Kind::Dir => 'd',
            Kind::Symlink => 'l',
            Kind::Fifo => 'p',
            Kind::Char => 'c',
            Kind::Block => 'b',
            _ => '-',
        };
        let parent = open(path.parent().expect("parent"));
        let name = path.file_name().expect("name");
        let at = At { verb: "snapshot", rel: &rel };
        let xattrs = xattr::read(XNode::Entry(parent.as_fd(), name), at)
            .expect("xattrs")
            .into_iter()
            .map(|x| (String::from_utf8_lossy(&x.name).into_owned(), x.value))
            .collect();
        let target = (kind == 'l').then(|| std::fs::read_link(&path).expect("readlink"));
        let contents = (kind == '-').then(|| std::fs::read(&path).expect("read"));
        if kind != 'd' && meta.nlink() > 1 {
            inodes.entry((meta.dev(), meta.ino())).or_default().push(rel.clone());
        }
        entries.insert(
            rel,
            Entry {
                kind,
                mode: meta.mode() & 0o7777,
                owner: (meta.uid(), meta.gid()),
                mtime: (meta.mtime(), meta.mtime_nsec()),
                rdev: if matches!(kind, 'c' | 'b') { meta.rdev() } else { 0 },
                target: target.map(|t| t.into_os_string().into_vec()),
                contents,
                xattrs,
            },
        );
    }
    let links = inodes
        .into_values()
        .filter(|names| names.len() > 1)
        .map(|mut names| {
            names.sort();
            names
        })
        .collect();
    Snapshot { entries, links }
}

/// Describes every difference of `found` from `expected` (hard-link groups too if
/// `links`), or nothing.
fn differences(expected: &Snapshot, found: &Snapshot, links: bool) -> Vec<String> {
    let mut out = Vec::new();
    let show = |e: &Entry| {
        let mut e = e.clone();
        if let Some(c) = &e.contents {
            e.contents =
                Some(format!("<{} bytes, {}>", c.len(), crate::digest::Digest::of(c)).into_bytes());
        }
        format!("{e:?}")
    };
    for (path, want) in &expected.entries {
        match found.entries.get(path) {
            None => out.push(format!("{path:?}: missing; expected {}", show(want))),
            Some(got) if got != want => {
                out.push(format!("{path:?}: expected {}\n     found {}", show(want), show(got)))
            }
            Some(_) => {}
        }
    }
    for (path, got) in &found.entries {
        if !expected.entries.contains_key(path) {
            out.push(format!("{path:?}: unexpected {}", show(got)));
        }
    }
    if links && expected.links != found.links {
        out.push(format!(
            "hard links: expected groups {:?}, found {:?}",
            expected.links, found.links
        ));
    }
    out
}

fn assert_same(case: &str, expected: &Snapshot, found: &Snapshot, links: bool) {
    let diffs = differences(expected, found, links);
    assert!(diffs.is_empty(), "{case}: the applied tree differs:\n  {}", diffs.join("\n  "));
}

// ---------------------------------------------------------------------------------------
// The round trips.

const COMPRESSIONS: [Compression; 3] = [Compression::None, Compression::Gzip, Compression::Zstd];

/// Writes the layer, applies it with `whiteouts` into `root`, checks what both saw.
fn diff_and_apply(
    case: &str,
    source: Source<'_>,
    compression: Compression,
    root: BorrowedFd<'_>,
    whiteouts: Whiteouts,
    lowers: Vec<BorrowedFd<'_>>,
) -> diff::Written {
    let mut blob = Vec::new();
    let written = diff::diff(source, compression, &mut blob)
        .unwrap_or_else(|e| panic!("{case}: diff ({compression}): {e}"));
    // Half the time the applier detects the compression itself.
    let told = case.len().is_multiple_of(2).then_some(compression);
    let opts = ApplyOptions { whiteouts, compression: told, lowers };
    let applied = apply::apply(root, blob.as_slice(), &opts)
        .unwrap_or_else(|e| panic!("{case}: apply ({compression}, {whiteouts:?}): {e}"));
    assert_eq!(applied.diff_id, written.diff_id, "{case}: diffID ({compression})");
    assert_eq!(applied.compression, compression, "{case}");
    assert_eq!(applied.size, written.uncompressed_size, "{case}: uncompressed size");
    assert_eq!(applied.entries, written.entries, "{case}: entries");
    assert_eq!((written.size, written.compression), (blob.len() as u64, compression), "{case}");
    written
}

/// Diffs `x` against its parent `p` with every compression, applies each layer onto a
/// fresh copy of `p` and compares the result with `x`.
fn trees_round_trip(case: &str, p: &Path, x: &Path) {
    let expected = snapshot(x);
    let (pdir, xdir) = (open(p), open(x));
    let mut diff_ids = BTreeSet::new();
    for c in COMPRESSIONS {
        let target = tmp();
        copy(p, target.path());
        let root = open(target.path());
        let source = Source::Trees { lower: Some(pdir.as_fd()), upper: xdir.as_fd() };
        let written = diff_and_apply(case, source, c, root.as_fd(), Whiteouts::Delete, Vec::new());
        diff_ids.insert(written.diff_id);
        assert_same(&format!("{case} ({c})"), &expected, &snapshot(target.path()), true);
    }
    assert_eq!(diff_ids.len(), 1, "{case}: one tar whatever the compression");
}

fn generated(seed: u64) -> (tempfile::TempDir, tempfile::TempDir) {
    let mut g = Gen { rng: Rng::new(seed), root: is_root() };
    let (p, x) = (tmp(), tmp());
    let mut links = g.parent(p.path());
    copy(p.path(), x.path());
    // Links in X point at X's files.
    let mut xlinks: Vec<PathBuf> = links
        .drain(..)
        .filter_map(|l| l.strip_prefix(p.path()).ok().map(|r| x.path().join(r)))
        .collect();
    let ops = 1 + g.rng.below(25);
    g.change(x.path(), ops, &mut xlinks);
    (p, x)
}

/// Runs `check` for every seed, and fails with what each failing seed reported.
fn every_seed(seeds: std::ops::Range<u64>, check: impl Fn(u64)) {
    let failed: Vec<String> = seeds
        .filter_map(|seed| {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(seed)));
            let payload = result.err()?;
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Some(format!("seed {seed}: {message}"))
        })
        .collect();
    assert!(failed.is_empty(), "{} seeds failed:\n{}", failed.len(), failed.join("\n"));
}

#[test]
fn generated_trees_round_trip() {
    every_seed(seeds(SEEDS), |seed| {
        let (p, x) = generated(seed);
        trees_round_trip(&format!("seed {seed}"), p.path(), x.path());
    });
}

#[test]
fn fixed_cases_round_trip() {
    let root = is_root();
    // Nothing at all, and nothing changed.
    let (p, x) = (tmp(), tmp());
    trees_round_trip("empty", p.path(), x.path());
    let mut g = Gen { rng: Rng::new(1234), root };
    g.parent(p.path());
    copy(p.path(), x.path());
    trees_round_trip("unchanged", p.path(), x.path());

    // Everything deleted.
    let x = tmp();
    trees_round_trip("all deleted", p.path(), x.path());

    // From nothing.
    let empty = tmp();
    trees_round_trip("from nothing", empty.path(), p.path());

    // Deep: below the walk's open levels, changes at the bottom and back at the top.
    let (p, x) = (tmp(), tmp());
    let deep: PathBuf = std::iter::repeat_n("d", 90).collect();
    std::fs::create_dir_all(p.path().join(&deep)).expect("mkdir");
    std::fs::write(p.path().join(deep.join("f")), b"f").expect("write");
    std::fs::write(p.path().join("d/d/top"), b"t").expect("write");
    copy(p.path(), x.path());
    std::fs::write(x.path().join(deep.join("f")), b"changed").expect("write");
    std::fs::create_dir_all(x.path().join(deep.join("n/n/n"))).expect("mkdir");
    std::fs::remove_file(x.path().join("d/d/top")).expect("rm");
    std::fs::write(x.path().join("d/z"), b"z").expect("write");
    trees_round_trip("deep", p.path(), x.path());

    // Hard links: a group swapping a member, a new link to an unchanged file, links to
    // a symlink and a fifo, a group split by replacing one name.
    let (p, x) = (tmp(), tmp());
    let (pp, xp) = (p.path(), x.path());
    std::fs::write(pp.join("a"), b"a").expect("write");
    std::fs::hard_link(pp.join("a"), pp.join("b")).expect("link");
    std::fs::write(pp.join("u"), b"u").expect("write");
    std::os::unix::fs::symlink("target", pp.join("s")).expect("symlink");
    rustix::fs::mknodat(CWD, pp.join("q"), FileType::Fifo, Mode::from_raw_mode(0o644), 0)
        .expect("mkfifo");
    std::fs::write(pp.join("m"), b"m").expect("write");
    std::fs::hard_link(pp.join("m"), pp.join("n")).expect("link");
    std::fs::hard_link(pp.join("m"), pp.join("o")).expect("link");
    copy(pp, xp);
    std::fs::remove_file(xp.join("b")).expect("rm");
    std::fs::hard_link(xp.join("a"), xp.join("c")).expect("link");
    std::fs::create_dir(xp.join("sub")).expect("mkdir");
    std::fs::hard_link(xp.join("u"), xp.join("sub/u2")).expect("link");
    rustix::fs::linkat(CWD, xp.join("s"), CWD, xp.join("s2"), AtFlags::empty()).expect("link");
    std::fs::hard_link(xp.join("q"), xp.join("q2")).expect("link");
    std::fs::remove_file(xp.join("n")).expect("rm");
    std::fs::write(xp.join("n"), b"m").expect("write");
    trees_round_trip("hard links", pp, xp);

    // Names and values at the edges of a tar header.
    let (p, x) = (tmp(), tmp());
    copy(p.path(), x.path());
    let xp = x.path();
    let long: PathBuf = ["a".repeat(200), "b".repeat(255), "c".repeat(90)].iter().collect();
    std::fs::create_dir_all(xp.join(&long)).expect("mkdir");
    std::fs::write(xp.join(long.join("f".repeat(255))), vec![7; 3 << 20]).expect("write");
    std::os::unix::fs::symlink("x/".repeat(600), xp.join("long-target")).expect("symlink");
    std::fs::write(xp.join(OsStr::from_bytes(b"bin\xff\xfe")), b"").expect("write");
    std::fs::write(xp.join("eq"), b"").expect("write");
    rustix::fs::lsetxattr(xp.join("eq"), "user.bin", b"\0\n=\xff", XattrFlags::empty())
        .expect("xattr");
    rustix::fs::lsetxattr(xp.join("eq"), "user.empty", b"", XattrFlags::empty()).expect("xattr");
    let times = |s, n| {
        let t = Timespec { tv_sec: s, tv_nsec: n };
        Timestamps { last_access: t, last_modification: t }
    };
    for (name, t) in
        [("t0", times(0, 0)), ("t1", times(-5, 1)), ("t2", times(8_589_934_592, 999_999_999))]
    {
        std::fs::write(xp.join(name), b"").expect("write");
        rustix::fs::utimensat(CWD, xp.join(name), &t, AtFlags::empty()).expect("utimensat");
    }
    if root {
        std::fs::write(xp.join("big-ids"), b"").expect("write");
        let (uid, gid) = (Uid::from_raw(4_000_000_000), Gid::from_raw(2_097_152));
        rustix::fs::chownat(CWD, xp.join("big-ids"), Some(uid), Some(gid), AtFlags::empty())
            .expect("chown");
        let dev = rustix::fs::makedev(4095, 1_048_575);
        rustix::fs::mknodat(
            CWD,
            xp.join("bigdev"),
            FileType::BlockDevice,
            Mode::from_raw_mode(0o600),
            dev,
        )
        .expect("mknod");
    }
    trees_round_trip("edges", p.path(), x.path());
}

// ---------------------------------------------------------------------------------------
// Through a real overlay mount.

/// An overlay mount, unmounted when dropped (even when a check failed).
struct Mounted(PathBuf);

impl Mounted {
    fn overlay(lower: &Path, upper: &Path, work: &Path, at: &Path) -> crate::Result<Mounted> {
        let options = vec![
            format!("lowerdir={}", lower.display()),
            format!("upperdir={}", upper.display()),
            format!("workdir={}", work.display()),
            "index=off".to_owned(),
            "redirect_dir=off".to_owned(),
            "metacopy=off".to_owned(),
        ];
        let mount = crate::Mount {
            kind: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options,
        };
        crate::mount::mount_all(&[mount], at)?;
        Ok(Mounted(at.to_path_buf()))
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if crate::mount::unmount(&self.0).is_err() {
            let _ = crate::mount::detach(&self.0);
        }
    }
}

/// The whiteouts and opaque directories of an overlay upper directory.
fn overlay_marks(upper: &Path) -> (BTreeSet<PathBuf>, BTreeSet<PathBuf>) {
    let (mut whiteouts, mut opaque) = (BTreeSet::new(), BTreeSet::new());
    for (rel, meta) in list(upper) {
        if kind_of(&meta) == Kind::Char && meta.rdev() == 0 {
            whiteouts.insert(rel);
        } else if meta.is_dir() {
            let mut buf = [0u8; 8];
            if let Ok(n) =
                rustix::fs::lgetxattr(upper.join(&rel), "trusted.overlay.opaque", &mut buf)
                && &buf[..n] == b"y"
            {
                opaque.insert(rel);
            }
        }
    }
    (whiteouts, opaque)
}

#[test]
fn overlay_upper_directories_round_trip() {
    if !is_root() {
        eprintln!("skipped: mounting overlays needs root");
        return;
    }
    {
        let probe = tmp();
        let [l, u, w, m] = ["l", "u", "w", "m"].map(|d| {
            let path = probe.path().join(d);
            std::fs::create_dir(&path).expect("mkdir");
            path
        });
        if let Err(e) = Mounted::overlay(&l, &u, &w, &m) {
            eprintln!("skipped: cannot mount overlay here: {e}");
            return;
        }
    }
    every_seed(seeds(OVERLAY_SEEDS), |seed| {
        let case = format!("overlay seed {seed}");
        let mut g = Gen { rng: Rng::new(1000 + seed), root: true };
        let (p, lower) = (tmp(), tmp());
        g.parent(p.path());
        copy(p.path(), lower.path());
        let dirs = tmp();
        let [upper, work, merged, upper2, work2, merged2] =
            ["upper", "work", "merged", "upper2", "work2", "merged2"].map(|d| {
                let path = dirs.path().join(d);
                std::fs::create_dir(&path).expect("mkdir");
                path
            });
        let expected = {
            let _mounted = Mounted::overlay(lower.path(), &upper, &work, &merged).expect("mount");
            let ops = 1 + g.rng.below(25);
            g.change(&merged, ops, &mut Vec::new());
            snapshot(&merged)
        };
        let udir = open(&upper);
        let source = || Source::Overlay { upper: udir.as_fd(), userxattr: false };

        // Applied as a plain tree onto the parent: the merged tree (hard-link groups are
        // not compared: overlayfs without an index reports a copied-up link with its
        // lower inode number).
        let mut diff_id = None;
        for c in COMPRESSIONS {
            let target = tmp();
            copy(p.path(), target.path());
            let root = open(target.path());
            let w = diff_and_apply(&case, source(), c, root.as_fd(), Whiteouts::Delete, Vec::new());
            assert!(
                diff_id.is_none_or(|d| d == w.diff_id),
                "{case}: one tar whatever the compression"
            );
            diff_id = Some(w.diff_id);
            assert_same(&format!("{case} ({c})"), &expected, &snapshot(target.path()), false);
        }

        // Applied with overlay whiteouts into an empty upper: the same whiteouts and
        // opaque directories, the same layer when diffed again, the same merged tree.
        let root2 = open(&upper2);
        let ldir = open(lower.path());
        let whiteouts = Whiteouts::Overlay { userxattr: false };
        let w = diff_and_apply(
            &case,
            source(),
            Compression::None,
            root2.as_fd(),
            whiteouts,
            vec![ldir.as_fd()],
        );
        assert_eq!(
            overlay_marks(&upper2),
            overlay_marks(&upper),
            "{case}: whiteouts and opaque directories"
        );
        let mut again = Vec::new();
        let source2 = Source::Overlay { upper: root2.as_fd(), userxattr: false };
        let w2 = diff::diff(source2, Compression::None, &mut again).expect("diff again");
        assert_eq!(w2.diff_id, w.diff_id, "{case}: the layer diffed again from the new upper");
        let _mounted =
            Mounted::overlay(lower.path(), &upper2, &work2, &merged2).expect("mount again");
        assert_same(&format!("{case} (overlay upper)"), &expected, &snapshot(&merged2), false);
    });
}
