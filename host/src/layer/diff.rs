//! Writing a tree, or the difference of two trees, as a layer tar stream.
//!
//! The stream is what containerd's `archive.WriteDiff` over continuity's `fs.Changes`
//! (and moby's overlay export) produce, made deterministic: a PAX tar whose entries come
//! in tree order (each directory before its children, the names of a directory in byte
//! order), with relative names, directories ending in `/`, the full mode, owner,
//! modification time to the nanosecond, extended attributes (`SCHILY.xattr.*`), symlink
//! targets, device numbers and hard links. A deletion is a whiteout entry `.wh.<name>`,
//! an opaque directory its entry followed by `.wh..wh..opq`.
//!
//! Two sources ([`Source`]):
//!
//! - an overlayfs upper directory, which is the difference already: everything in it is
//!   written, a 0:0 character device becomes a whiteout and the opaque xattr the opaque
//!   marker. An upper directory whose entries point into the lower layers (`redirect_dir`,
//!   `metacopy`) is not a difference by itself and is refused.
//! - two trees compared: what is only in `upper` is written with everything below it,
//!   what is only in `lower` becomes a whiteout, an entry of another type replaces the
//!   old one, and an entry of the same type is written when its metadata differ (or, for
//!   a regular file whose timestamps carry no nanoseconds, when its contents do).
//!   Directories are compared below in any case, and a directory is written when its
//!   metadata differ or when something inside it is (as moby does: the applier's writes
//!   change its mtime, and the entry restores it). Hard links are kept: when any name of
//!   a group of links is written, all of them are, and a group that changed its members
//!   is written again, so applying the stream rebuilds the groups exactly.
//!
//! [`diff_with`] can leave regular files' bytes out ([`DiffOptions::contents`]): each is
//! then an entry of size 0 with private PAX records saying it is the file at that path
//! in the tree read, for a merge's applier to link or copy
//! ([`apply_linked`](super::apply::apply_linked)); such a stream is never a layer. The
//! file is not opened and its xattrs are not read: a link shares them, and a copy takes
//! them from the file it copies.
//!
//! The root directory itself is never written (as in containerd): its metadata belong to
//! the snapshot the stream is applied into.
//!
//! The trees may be changed meanwhile by whoever can write them (a container): nothing
//! is ever followed or crossed. Entries are opened with `openat2` beneath their directory
//! without following symlinks or crossing mounts; a file is opened for reading only
//! after an `O_PATH` pin showed it is the regular file the listing showed; devices and
//! fifos are never opened. A file that shrinks while it is read is an error, never a
//! short entry. Directories are walked iteratively with a bounded number of descriptors
//! open, so any depth costs memory, not descriptors or stack.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{FileType, OFlags, Timespec};
use rustix::io::Errno;
use tar::{EntryType, Header};

use super::{Compression, WHITEOUT_OPAQUE, WHITEOUT_PREFIX, Whiteouts};
use crate::digest::{Digest, Hashing};
use crate::error::{Context, Error, Result};
use crate::fsutil::xattr::{self, Node, Xattr};
use crate::fsutil::{
    At, Handle, Level, Meta, Stack, child_rel, fstat, list_names, lstat_at, open_in_tree,
    open_pinned, pin_in_tree,
};

/// What a diff is taken from.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// An overlayfs upper directory: it is the diff. 0:0 char devices are whiteouts,
    /// the opaque xattr marks opaque directories.
    Overlay {
        /// The upper directory.
        upper: BorrowedFd<'a>,
        /// The overlay was mounted with `userxattr`: its xattrs are `user.overlay.*`.
        userxattr: bool,
    },
    /// Two whole trees compared: `lower` (None = empty) and `upper`.
    Trees {
        /// The tree before (the parent snapshot's), or none for a diff from nothing.
        lower: Option<BorrowedFd<'a>>,
        /// The tree after.
        upper: BorrowedFd<'a>,
    },
}

/// What [`diff`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// sha256 of the uncompressed tar (the layer's diffID).
    pub diff_id: Digest,
    /// sha256 of the bytes written to `out` (the blob's digest).
    pub digest: Digest,
    /// Bytes written to `out`.
    pub size: u64,
    /// Bytes of the uncompressed tar.
    pub uncompressed_size: u64,
    /// How `out`'s bytes are compressed.
    pub compression: Compression,
    /// Tar entries written (whiteouts and opaque markers included, PAX headers not).
    pub entries: u64,
}

impl Written {
    /// The OCI media type of the blob written.
    pub fn media_type(&self) -> &'static str {
        self.compression.media_type()
    }
}

/// How [`diff_with`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiffOptions {
    /// Regular files carry their bytes (a layer anyone can apply: the default). Without
    /// them, a regular file's entry has size 0 and two private PAX records,
    /// [`LINK_SOURCE`] and [`LINK_SIZE`] (its real size), and only
    /// [`apply_linked`](super::apply::apply_linked) given the very tree this diff read
    /// (whose file it links, or copies) can apply the stream: a merge's own pipe, never
    /// a blob. [`Written`]'s digests are then those of this stream, no layer's.
    pub contents: bool,
}

impl Default for DiffOptions {
    fn default() -> Self {
        DiffOptions { contents: true }
    }
}

/// The private PAX record (value `1`) of a regular file written without its bytes: the
/// file is the one at the same path in the tree the diff read.
pub const LINK_SOURCE: &str = "WASNAP.linksource";
/// The private PAX record holding the real size of a file written without its bytes.
pub const LINK_SIZE: &str = "WASNAP.linksize";
/// The prefix of every private PAX record: never honoured from a stream from outside.
pub const PRIVATE_PREFIX: &str = "WASNAP.";

/// Writes the difference `source` describes to `out` as a layer tar compressed with
/// `compression`; see the module documentation for what is written. `out` gets exactly
/// the blob's bytes; it is flushed, not synced.
pub fn diff(source: Source<'_>, compression: Compression, out: impl Write) -> Result<Written> {
    diff_with(source, compression, out, &DiffOptions::default())
}

/// [`diff`], written as `opts` says. With the default options the output is byte for
/// byte [`diff`]'s.
pub fn diff_with(
    source: Source<'_>,
    compression: Compression,
    out: impl Write,
    opts: &DiffOptions,
) -> Result<Written> {
    let encoder = compression.encoder(Hashing::new(out))?;
    let mut out = Out::new(Hashing::new(encoder));
    out.contents = opts.contents;
    walk_source(&mut out, source)?;
    let entries = out.entries;
    let write = |e: io::Error| Error::from(e).context("diff: write the layer");
    let tar_hashing = out.tar.into_inner().map_err(write)?;
    let (encoder, diff_id, uncompressed_size) = tar_hashing.finish();
    let blob_hashing = encoder.finish().map_err(write)?;
    let (mut sink, digest, size) = blob_hashing.finish();
    sink.flush().map_err(write)?;
    Ok(Written { diff_id, digest, size, uncompressed_size, compression, entries })
}

/// [`diff_with`] without contents, and without digests: the stream of a merge's own
/// pipe, which is applied at once by [`apply_linked_bytes`](super::apply::apply_linked_bytes)
/// and never stored, so nothing needs its sha256 (hashing its headers twice, as the
/// tar and as the blob, cost more than a tenth of a merge by links). Returns the
/// entries written.
pub(crate) fn diff_linked(source: Source<'_>, out: impl Write) -> Result<u64> {
    let mut out = Out::new(out);
    out.contents = false;
    walk_source(&mut out, source)?;
    let entries = out.entries;
    let mut sink =
        out.tar.into_inner().map_err(|e| Error::from(e).context("diff: write the layer"))?;
    sink.flush().map_err(|e| Error::from(e).context("diff: write the layer"))?;
    Ok(entries)
}

/// Walks `source` into `out`.
fn walk_source(out: &mut Out<impl Write>, source: Source<'_>) -> Result<()> {
    match source {
        Source::Overlay { upper, userxattr } => {
            walk(out, Mode::Overlay { userxattr }, upper, None, Groups::default())
        }
        Source::Trees { lower, upper } => {
            // Link groups matter only where some names of a group may be left out.
            let groups = match lower {
                Some(lower) => Groups {
                    upper: link_groups(upper, "diff (upper)")?,
                    lower: link_groups(lower, "diff (lower)")?,
                },
                None => Groups::default(),
            };
            walk(out, Mode::Trees, upper, lower, groups)
        }
    }
}

/// How the walk reads the trees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// One overlayfs upper directory.
    Overlay { userxattr: bool },
    /// `upper` compared with `lower`.
    Trees,
}

const VERB: &str = "diff";

// ---------------------------------------------------------------------------------------
// The walk.

/// A name of a directory being walked, and in which trees it is.
#[derive(Debug)]
struct Name {
    name: OsString,
    upper: bool,
    lower: bool,
}

/// A directory being walked: open in the upper tree, and in the lower one when there
/// is a directory there to compare with.
#[derive(Debug)]
struct Frame {
    rel: PathBuf,
    upper: Handle,
    lower: Option<Handle>,
    /// The child being walked has no lower directory, so it cannot reopen this one's
    /// lower directory through `..`: keep it open when this level is closed.
    keep_lower: bool,
    /// This directory is the same in both trees and was not written (yet).
    unwritten: Option<Box<Unwritten>>,
    names: std::vec::IntoIter<Name>,
}

/// What a directory's entry is written with, if something changes inside it.
#[derive(Debug)]
struct Unwritten {
    meta: Meta,
    attrs: Vec<Xattr>,
}

impl Frame {
    fn new(rel: PathBuf, upper: (OwnedFd, Meta), lower: Option<(OwnedFd, Meta)>) -> Result<Frame> {
        let at = At { verb: VERB, rel: &rel };
        let mut names: Vec<Name> = sorted_names(upper.0.as_fd(), at)?
            .into_iter()
            .map(|name| Name { name, upper: true, lower: false })
            .collect();
        if let Some((fd, _)) = &lower {
            let lowers = sorted_names(fd.as_fd(), at)?;
            names = merge(names, lowers);
        }
        Ok(Frame {
            upper: Handle::new(upper.0, &upper.1),
            lower: lower.map(|(fd, meta)| Handle::new(fd, &meta)),
            keep_lower: false,
            unwritten: None,
            names: names.into_iter(),
            rel,
        })
    }

    fn at(&self) -> At<'_> {
        At { verb: VERB, rel: &self.rel }
    }
}

impl Level for Frame {
    fn close(&mut self) {
        self.upper.fd = None;
        if let Some(lower) = &mut self.lower
            && !self.keep_lower
        {
            lower.fd = None;
        }
    }

    fn reopen_from(&mut self, child: &Frame) -> Result<()> {
        self.upper.reopen_from(&child.upper, child.at())?;
        if let Some(lower) = &mut self.lower
            && lower.fd.is_none()
        {
            let Some(child_lower) = &child.lower else {
                return Err(Error::internal(format!(
                    "{}: reopen parent: no lower directory to reopen it from",
                    child.at()
                )));
            };
            lower.reopen_from(child_lower, child.at())?;
        }
        Ok(())
    }
}

/// The names in `dir`, in byte order.
fn sorted_names(dir: BorrowedFd<'_>, at: At<'_>) -> Result<Vec<OsString>> {
    let mut names = list_names(dir).map_err(at.err("read directory"))?;
    names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names)
}

/// Merges two sorted lists of names, marking where each name is.
fn merge(uppers: Vec<Name>, lowers: Vec<OsString>) -> Vec<Name> {
    let mut out = Vec::with_capacity(uppers.len().max(lowers.len()));
    let mut lowers = lowers.into_iter().peekable();
    for mut up in uppers {
        while let Some(low) = lowers.next_if(|l| l.as_bytes() < up.name.as_bytes()) {
            out.push(Name { name: low, upper: false, lower: true });
        }
        up.lower = lowers.next_if(|l| l.as_bytes() == up.name.as_bytes()).is_some();
        out.push(up);
    }
    out.extend(lowers.map(|name| Name { name, upper: false, lower: true }));
    out
}

/// Reopens a directory descriptor the caller gave as a readable one of our own.
fn open_root(dir: BorrowedFd<'_>, which: &str) -> Result<(OwnedFd, Meta)> {
    let at = At { verb: VERB, rel: Path::new("") };
    // In tree: `.` is the caller's directory itself.
    let fd = open_in_tree(dir, Path::new("."), OFlags::RDONLY | OFlags::DIRECTORY)
        .map_err(at.err(format!("open the {which} directory")))?;
    let meta = fstat(&fd).map_err(at.err(format!("stat the {which} directory")))?;
    Ok((fd, meta))
}

fn walk(
    out: &mut Out<impl Write>,
    mode: Mode,
    upper: BorrowedFd<'_>,
    lower: Option<BorrowedFd<'_>>,
    groups: Groups,
) -> Result<()> {
    let upper = open_root(upper, "upper")?;
    let lower = lower.map(|l| open_root(l, "lower")).transpose()?;
    let mut walker = Walker { mode, out, groups };
    let mut stack = Stack::new(Frame::new(PathBuf::new(), upper, lower)?);
    while let Some(frame) = stack.top_mut() {
        crate::fsutil::deadline::check(VERB)?;
        match frame.names.next() {
            Some(name) => {
                if let Some(child) = walker.entry(frame, &name)? {
                    frame.keep_lower = frame.lower.is_some() && child.lower.is_none();
                    stack.push(child);
                }
            }
            None => {
                stack.pop()?;
            }
        }
    }
    Ok(())
}

/// The hard-link groups of both trees (Trees mode with a lower tree only).
#[derive(Debug, Default)]
struct Groups {
    upper: HashMap<(u64, u64), Vec<PathBuf>>,
    lower: HashMap<(u64, u64), Vec<PathBuf>>,
}

/// The names in the tree of every non-directory inode with more than one link, each
/// group in walk order (tree order).
fn link_groups(
    root: BorrowedFd<'_>,
    verb: &'static str,
) -> Result<HashMap<(u64, u64), Vec<PathBuf>>> {
    #[derive(Debug)]
    struct Scan {
        rel: PathBuf,
        dir: Handle,
        names: std::vec::IntoIter<OsString>,
    }
    impl Level for Scan {
        fn close(&mut self) {
            self.dir.fd = None;
        }
        fn reopen_from(&mut self, child: &Scan) -> Result<()> {
            self.dir.reopen_from(&child.dir, At { verb: "diff", rel: &child.rel })
        }
    }
    let open = |fd: OwnedFd, meta: &Meta, rel: PathBuf| -> Result<Scan> {
        let at = At { verb, rel: &rel };
        let names = sorted_names(fd.as_fd(), at)?;
        Ok(Scan { dir: Handle::new(fd, meta), names: names.into_iter(), rel })
    };
    let (fd, meta) = open_root(root, "tree")?;
    let mut groups: HashMap<(u64, u64), Vec<PathBuf>> = HashMap::new();
    let mut stack = Stack::new(open(fd, &meta, PathBuf::new())?);
    while let Some(level) = stack.top_mut() {
        crate::fsutil::deadline::check(VERB)?;
        let Some(name) = level.names.next() else {
            stack.pop()?;
            continue;
        };
        let rel = child_rel(&level.rel, &name);
        let at = At { verb, rel: &rel };
        let dir = level.dir.fd().map_err(at.err("directory"))?;
        // No-follow: `name` is from the listing of the pinned `dir`.
        let meta = match lstat_at(dir, Path::new(&name)) {
            Ok(meta) => meta,
            Err(Errno::NOENT) => continue,
            Err(e) => return Err(at.err("lstat")(e)),
        };
        if meta.file_type() != FileType::Directory {
            if meta.nlink > 1 {
                groups.entry(meta.id()).or_default().push(rel);
            }
            continue;
        }
        let child = open_dir(dir, &name, &meta, at)?;
        stack.push(open(child, &meta, rel)?);
    }
    // Only groups with several names in the tree need a look; one name alone is like a
    // file with one link (its other links are outside the tree).
    groups.retain(|_, names| names.len() > 1);
    Ok(groups)
}

/// The state of one walk.
#[derive(Debug)]
struct Walker<'o, W: Write> {
    mode: Mode,
    out: &'o mut Out<W>,
    groups: Groups,
}

impl<W: Write> Walker<'_, W> {
    /// Handles one name of `parent`; a directory to walk comes back as a frame.
    fn entry(&mut self, parent: &mut Frame, n: &Name) -> Result<Option<Frame>> {
        let rel = child_rel(&parent.rel, &n.name);
        let at = At { verb: VERB, rel: &rel };
        let name = n.name.as_os_str();
        let udir = parent.upper.fd().map_err(at.err("directory"))?;
        let upper = if n.upper { lstat_present(udir, name, at, "lstat")? } else { None };
        if let Mode::Overlay { userxattr } = self.mode {
            let Some(meta) = upper else { return Ok(None) };
            if meta.file_type() == FileType::CharacterDevice && meta.rdev == 0 {
                self.out.whiteout(&parent.rel, name, at)?;
                return Ok(None);
            }
            let opaque = Whiteouts::Overlay { userxattr }.opaque_xattr();
            return self.emit(udir, name, &rel, &meta, opaque);
        }

        let ldir = match (&parent.lower, n.lower) {
            (Some(lower), true) => Some(lower.fd().map_err(at.err("lower directory"))?),
            _ => None,
        };
        let lower = match ldir {
            Some(ldir) => lstat_present(ldir, name, at, "lstat (lower)")?,
            None => None,
        };
        match (upper, lower) {
            (None, None) => Ok(None),
            (None, Some(_)) => {
                self.parent_written(&mut parent.unwritten, &parent.rel)?;
                self.out.whiteout(&parent.rel, name, at)?;
                Ok(None)
            }
            (Some(up), None) => {
                self.parent_written(&mut parent.unwritten, &parent.rel)?;
                self.emit(udir, name, &rel, &up, None)
            }
            (Some(up), Some(low)) => {
                let ldir = ldir.ok_or_else(|| Error::internal(format!("{at}: no lower")))?;
                if up.file_type() != low.file_type() {
                    // Replaced by an entry of another type: writing it is enough, an
                    // applier replaces what was there (a directory with all below it).
                    self.parent_written(&mut parent.unwritten, &parent.rel)?;
                    return self.emit(udir, name, &rel, &up, None);
                }
                if up.file_type() == FileType::Directory {
                    return self.both_dirs(udir, ldir, name, rel, &up, &low);
                }
                if self.changed(udir, ldir, name, &rel, &up, &low)? {
                    self.parent_written(&mut parent.unwritten, &parent.rel)?;
                    self.emit(udir, name, &rel, &up, None)?;
                }
                Ok(None)
            }
        }
    }

    /// Writes the entry of a directory whose own metadata did not change, before the
    /// first change inside it: an applier changes the directory's mtime when it writes
    /// or removes an entry, then sets the time the layer gives it (moby writes these
    /// parents too). Without it, the applied directory would not keep its mtime.
    fn parent_written(&mut self, unwritten: &mut Option<Box<Unwritten>>, rel: &Path) -> Result<()> {
        if let Some(dir) = unwritten.take() {
            let at = At { verb: VERB, rel };
            self.out.dir(rel, &dir.meta, &dir.attrs, false, at)?;
        }
        Ok(())
    }

    /// A directory in both trees: written if its own metadata differ, walked in any case.
    fn both_dirs(
        &mut self,
        udir: BorrowedFd<'_>,
        ldir: BorrowedFd<'_>,
        name: &OsStr,
        rel: PathBuf,
        up: &Meta,
        low: &Meta,
    ) -> Result<Option<Frame>> {
        let at = At { verb: VERB, rel: &rel };
        let ufd = open_dir(udir, name, up, at)?;
        let lfd = open_dir(ldir, name, low, in_lower(at))?;
        let up = fstat(&ufd).map_err(at.err("stat"))?;
        let low = fstat(&lfd).map_err(at.err("stat (lower)"))?;
        // Pinned: both directories are open.
        let uattrs = kept_xattrs(xattr::read(Node::Open(ufd.as_fd()), at)?);
        let lattrs = kept_xattrs(xattr::read(Node::Open(lfd.as_fd()), in_lower(at))?);
        let same = up.mode == low.mode
            && (up.uid, up.gid) == (low.uid, low.gid)
            && same_time(up.mtime, low.mtime)
            && uattrs == lattrs;
        if !same {
            self.out.dir(&rel, &up, &uattrs, false, at)?;
        }
        let mut frame = Frame::new(rel, (ufd, up), Some((lfd, low)))?;
        if same {
            frame.unwritten = Some(Box::new(Unwritten { meta: up, attrs: uattrs }));
        }
        Ok(Some(frame))
    }

    /// Whether a non-directory in both trees, of the same type, is to be written.
    fn changed(
        &self,
        udir: BorrowedFd<'_>,
        ldir: BorrowedFd<'_>,
        name: &OsStr,
        rel: &Path,
        up: &Meta,
        low: &Meta,
    ) -> Result<bool> {
        let at = At { verb: VERB, rel };
        // Hard links first: a name whose group of links is not the one it had must be
        // written with all its group, or the applied tree would share the wrong inodes.
        let alone = [rel.to_path_buf()];
        let ugroup = self.groups.upper.get(&up.id()).filter(|_| up.nlink > 1);
        let lgroup = self.groups.lower.get(&low.id()).filter(|_| low.nlink > 1);
        if ugroup.map_or(&alone[..], Vec::as_slice) != lgroup.map_or(&alone[..], Vec::as_slice) {
            return Ok(true);
        }
        if up.id() == low.id() {
            return Ok(false);
        }
        let kind = up.file_type();
        let sized = matches!(kind, FileType::RegularFile | FileType::Symlink);
        let device = matches!(kind, FileType::CharacterDevice | FileType::BlockDevice);
        if up.mode != low.mode
            || (up.uid, up.gid) != (low.uid, low.gid)
            || (sized && up.size != low.size)
            || (device && up.rdev != low.rdev)
            || !same_time(up.mtime, low.mtime)
        {
            return Ok(true);
        }
        // No-follow: l*xattr on the listed names in the pinned directories.
        let uattrs = kept_xattrs(xattr::read(Node::Entry(udir, name), at)?);
        let lattrs = kept_xattrs(xattr::read(Node::Entry(ldir, name), in_lower(at))?);
        if uattrs != lattrs {
            return Ok(true);
        }
        match kind {
            FileType::Symlink => {
                Ok(read_link(udir, name, at)? != read_link(ldir, name, in_lower(at))?)
            }
            // Equal timestamps prove little when they carry no nanoseconds (a filesystem
            // or an archive that keeps whole seconds): compare the bytes then.
            FileType::RegularFile if up.mtime.tv_nsec == 0 && up.size > 0 => {
                Ok(!same_contents(udir, ldir, name, up, low, at)?)
            }
            _ => Ok(false),
        }
    }

    /// Writes the entry `name` of `dir` (whose lstat is `meta`), found new or changed; a
    /// directory comes back as a frame, to be written below too. `opaque` is the xattr
    /// that marks an opaque directory (an overlay upper directory only).
    fn emit(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        rel: &Path,
        meta: &Meta,
        opaque: Option<&str>,
    ) -> Result<Option<Frame>> {
        let at = At { verb: VERB, rel };
        let overlay = matches!(self.mode, Mode::Overlay { .. });
        let kind = meta.file_type();
        if kind == FileType::Socket {
            // A tar cannot carry a socket; containerd leaves them out too.
            return Ok(None);
        }
        check_name(name, at)?;
        if kind == FileType::Directory {
            let fd = open_dir(dir, name, meta, at)?;
            let meta = fstat(&fd).map_err(at.err("stat"))?;
            // Pinned: the directory is open.
            let attrs = xattr::read(Node::Open(fd.as_fd()), at)?;
            if overlay {
                refuse_redirects(&attrs, at)?;
            }
            let is_opaque = opaque
                .is_some_and(|o| attrs.iter().any(|a| a.name == o.as_bytes() && a.value == b"y"));
            self.out.dir(rel, &meta, &kept_xattrs(attrs), is_opaque, at)?;
            return Frame::new(rel.to_path_buf(), (fd, meta), None).map(Some);
        }
        if meta.nlink > 1
            && let Some(first) = self.out.links.get(&meta.id())
        {
            let first = first.clone();
            self.out.link(rel, meta, &first, at)?;
            return Ok(None);
        }
        match kind {
            FileType::RegularFile if !self.out.contents => {
                // Nothing is read, so nothing is opened: the entry says where the file
                // is, and the merge's applier pins it there and checks it is the regular
                // file of this size, mode, owner and time. A link shares its xattrs with
                // the inode; a copy takes them from the file it copies (and refuses
                // overlayfs's metacopy and redirect), so none are written here.
                self.out.file(rel, meta, &[], None, at)?;
                self.out.remember_link(rel, meta);
            }
            FileType::RegularFile => {
                let (file, meta) = open_regular(dir, name, meta, at)?;
                // Pinned: the file is open.
                let attrs = xattr::read(Node::Open(file.as_fd()), at)?;
                if overlay {
                    refuse_redirects(&attrs, at)?;
                }
                self.out.file(rel, &meta, &kept_xattrs(attrs), Some(file), at)?;
                self.out.remember_link(rel, &meta);
            }
            FileType::Symlink
            | FileType::CharacterDevice
            | FileType::BlockDevice
            | FileType::Fifo => {
                // No-follow: l*xattr and readlinkat act on the listed name itself;
                // nothing is opened.
                let attrs = xattr::read(Node::Entry(dir, name), at)?;
                if overlay {
                    refuse_redirects(&attrs, at)?;
                }
                let target = match kind {
                    FileType::Symlink => Some(read_link(dir, name, at)?),
                    _ => None,
                };
                self.out.special(rel, meta, &kept_xattrs(attrs), target.as_deref(), at)?;
                self.out.remember_link(rel, meta);
            }
            _ => {
                return Err(Error::internal(format!(
                    "{at}: unknown file type (mode {:o})",
                    meta.mode
                )));
            }
        }
        Ok(None)
    }
}

/// The same place, in the lower tree.
fn in_lower(at: At<'_>) -> At<'_> {
    At { verb: "diff (lower)", rel: at.rel }
}

/// Refuses a name an applier would read as a whiteout.
fn check_name(name: &OsStr, at: At<'_>) -> Result<()> {
    if name.as_bytes().starts_with(WHITEOUT_PREFIX.as_bytes()) {
        return Err(Error::failed_precondition(format!(
            "{at}: a name starting with {WHITEOUT_PREFIX:?} would read as a whiteout in a \
             layer, so it cannot be written to one"
        )));
    }
    Ok(())
}

/// `lstat` of a listed name; `None` if it vanished since the listing.
fn lstat_present(dir: BorrowedFd<'_>, name: &OsStr, at: At<'_>, op: &str) -> Result<Option<Meta>> {
    // No-follow: `name` is from the listing of the pinned `dir`.
    match lstat_at(dir, Path::new(name)) {
        Ok(meta) if meta.file_type() == FileType::Socket => Ok(None),
        Ok(meta) => Ok(Some(meta)),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(at.err(op)(e)),
    }
}

/// Opens the directory `name` of `dir`, which the lstat `meta` described, never
/// following a symlink or crossing a mount; a different inode is an error.
fn open_dir(dir: BorrowedFd<'_>, name: &OsStr, meta: &Meta, at: At<'_>) -> Result<OwnedFd> {
    // In tree: no symlink followed, no mount crossed; checked against the lstat below.
    let fd = open_in_tree(dir, Path::new(name), OFlags::RDONLY | OFlags::DIRECTORY)
        .map_err(at.open_err("open"))?;
    let opened = fstat(&fd).map_err(at.err("stat"))?;
    if opened.id() != meta.id() {
        return Err(Error::internal(format!("{at}: directory was replaced during the diff")));
    }
    Ok(fd)
}

/// Opens the regular file `name` of `dir`, which the lstat `meta` described, for
/// reading: pinned first, opened only if the pin is that very regular file. Returns the
/// file and its metadata as opened.
fn open_regular(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    meta: &Meta,
    at: At<'_>,
) -> Result<(File, Meta)> {
    // Pinned before it is opened: a fifo or device swapped in is refused, never opened;
    // a symlink is pinned as itself; a mount point is refused.
    let pinned = pin_in_tree(dir, Path::new(name)).map_err(at.open_err("open"))?;
    let opened = fstat(&pinned).map_err(at.err("stat"))?;
    if opened.id() != meta.id() || opened.file_type() != FileType::RegularFile {
        return Err(Error::internal(format!("{at}: file was replaced during the diff")));
    }
    let file = File::from(open_pinned(pinned.as_fd()).map_err(at.err("open"))?);
    Ok((file, opened))
}

/// The target of the symlink `name` of `dir`.
fn read_link(dir: BorrowedFd<'_>, name: &OsStr, at: At<'_>) -> Result<Vec<u8>> {
    // No-follow: readlinkat reads the last component itself (EINVAL if not a symlink).
    rustix::fs::readlinkat(dir, name, Vec::new())
        .map(|target| target.into_bytes())
        .map_err(at.err("readlink"))
}

/// Whether two regular files of equal size `up.size` hold the same bytes.
fn same_contents(
    udir: BorrowedFd<'_>,
    ldir: BorrowedFd<'_>,
    name: &OsStr,
    up: &Meta,
    low: &Meta,
    at: At<'_>,
) -> Result<bool> {
    const CHUNK: usize = 64 * 1024;
    let (ufile, _) = open_regular(udir, name, up, at)?;
    let (lfile, _) = open_regular(ldir, name, low, in_lower(at))?;
    let mut ufile = ufile.take(up.size);
    let mut lfile = lfile.take(up.size);
    let (mut ubuf, mut lbuf) = (vec![0; CHUNK], vec![0; CHUNK]);
    loop {
        let un = read_full(&mut ufile, &mut ubuf).with_context(|| format!("{at}: read"))?;
        let ln = read_full(&mut lfile, &mut lbuf).with_context(|| format!("{at}: read (lower)"))?;
        if un != ln || ubuf[..un] != lbuf[..ln] {
            return Ok(false);
        }
        if un == 0 {
            return Ok(true);
        }
    }
}

/// Reads until `buf` is full or the end of `r`.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Equal modification times, to the nanosecond.
fn same_time(a: Timespec, b: Timespec) -> bool {
    (a.tv_sec, a.tv_nsec) == (b.tv_sec, b.tv_nsec)
}

/// Whether an xattr belongs to overlayfs (never written to a layer).
fn is_overlay_xattr(name: &[u8]) -> bool {
    name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.")
}

/// The xattrs a layer carries, in name order: all but overlayfs' own.
fn kept_xattrs(mut attrs: Vec<Xattr>) -> Vec<Xattr> {
    attrs.retain(|a| !is_overlay_xattr(&a.name));
    attrs.sort_unstable_by(|a, b| a.name.cmp(&b.name));
    attrs
}

/// Refuses an overlay upper entry that depends on the lower layers: a redirected
/// directory (`redirect_dir`) or a file whose data stayed below (`metacopy`).
fn refuse_redirects(attrs: &[Xattr], at: At<'_>) -> Result<()> {
    for attr in attrs {
        let Some(what) = attr
            .name
            .strip_prefix(b"trusted.overlay.")
            .or_else(|| attr.name.strip_prefix(b"user.overlay."))
        else {
            continue;
        };
        if what == b"redirect" || what == b"metacopy" {
            return Err(Error::failed_precondition(format!(
                "{at}: has {:?}: the overlay upper directory refers to its lower layers \
                 (redirect_dir or metacopy), so it is not a diff by itself; diff the \
                 merged trees instead",
                String::from_utf8_lossy(&attr.name)
            )));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The tar stream.

/// The largest value of an 11-digit octal header field (size, mtime).
const MAX_OCTAL_11: u64 = 0o777_7777_7777;
/// The largest value of a 7-digit octal header field (uid, gid, device numbers).
const MAX_OCTAL_7: u64 = 0o777_7777;

/// PAX records of one entry: key and value bytes.
type Records = Vec<(Vec<u8>, Vec<u8>)>;

/// The tar being written and what the walk remembers of it.
struct Out<W: Write> {
    tar: tar::Builder<W>,
    entries: u64,
    /// Regular files are written with their bytes (see [`DiffOptions::contents`]).
    contents: bool,
    /// The first name written of each inode with more than one link.
    links: HashMap<(u64, u64), Vec<u8>>,
}

impl<W: Write> std::fmt::Debug for Out<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Out").field("entries", &self.entries).finish_non_exhaustive()
    }
}

/// A tar name: the relative path's bytes, with `/` after a directory's.
fn tar_name(rel: &Path, dir: bool) -> Vec<u8> {
    let mut name = rel.as_os_str().as_bytes().to_vec();
    if dir {
        name.push(b'/');
    }
    name
}

impl<W: Write> Out<W> {
    fn new(w: W) -> Out<W> {
        Out { tar: tar::Builder::new(w), entries: 0, contents: true, links: HashMap::new() }
    }

    fn remember_link(&mut self, rel: &Path, meta: &Meta) {
        if meta.nlink > 1 {
            self.links.entry(meta.id()).or_insert_with(|| tar_name(rel, false));
        }
    }

    /// A directory entry, then the opaque marker if `opaque`.
    fn dir(
        &mut self,
        rel: &Path,
        meta: &Meta,
        attrs: &[Xattr],
        opaque: bool,
        at: At<'_>,
    ) -> Result<()> {
        let header = self.header(
            EntryType::Directory,
            &tar_name(rel, true),
            Some(meta),
            0,
            None,
            attrs,
            at,
        )?;
        self.append(&header, io::empty(), at)?;
        if opaque {
            let marker = rel.join(WHITEOUT_OPAQUE);
            let header = self.header(
                EntryType::Regular,
                marker.as_os_str().as_bytes(),
                None,
                0,
                None,
                &[],
                at,
            )?;
            self.append(&header, io::empty(), at)?;
        }
        Ok(())
    }

    /// The whiteout of `name` in the directory at `parent`.
    fn whiteout(&mut self, parent: &Path, name: &OsStr, at: At<'_>) -> Result<()> {
        check_name(name, at)?;
        let mut wh = OsString::from(WHITEOUT_PREFIX);
        wh.push(name);
        let path = child_rel(parent, &wh);
        let header =
            self.header(EntryType::Regular, path.as_os_str().as_bytes(), None, 0, None, &[], at)?;
        self.append(&header, io::empty(), at)
    }

    /// A hard link to the entry written first as `first`.
    fn link(&mut self, rel: &Path, meta: &Meta, first: &[u8], at: At<'_>) -> Result<()> {
        let name = tar_name(rel, false);
        let header = self.header(EntryType::Link, &name, Some(meta), 0, Some(first), &[], at)?;
        self.append(&header, io::empty(), at)
    }

    /// A symlink (with its `target`), device or fifo.
    fn special(
        &mut self,
        rel: &Path,
        meta: &Meta,
        attrs: &[Xattr],
        target: Option<&[u8]>,
        at: At<'_>,
    ) -> Result<()> {
        let kind = match meta.file_type() {
            FileType::Symlink => EntryType::Symlink,
            FileType::CharacterDevice => EntryType::Char,
            FileType::BlockDevice => EntryType::Block,
            _ => EntryType::Fifo,
        };
        let header = self.header(kind, &tar_name(rel, false), Some(meta), 0, target, attrs, at)?;
        self.append(&header, io::empty(), at)
    }

    /// A regular file with exactly `meta.size` bytes of `file`; without contents (or a
    /// file), none of them and the private records that say where the file is.
    fn file(
        &mut self,
        rel: &Path,
        meta: &Meta,
        attrs: &[Xattr],
        file: Option<File>,
        at: At<'_>,
    ) -> Result<()> {
        let file = match file {
            Some(file) if self.contents => file,
            _ => return self.file_without_contents(rel, meta, attrs, at),
        };
        let header = self.header(
            EntryType::Regular,
            &tar_name(rel, false),
            Some(meta),
            meta.size,
            None,
            attrs,
            at,
        )?;
        let mut data = Exact {
            inner: BufReader::with_capacity(128 * 1024, file),
            left: meta.size,
            short: false,
        };
        match self.tar.append(&header, &mut data) {
            Ok(()) => {
                self.entries += 1;
                Ok(())
            }
            Err(_) if data.short => Err(Error::internal(format!(
                "{at}: changed while being read: shorter than the {} bytes it had",
                meta.size
            ))),
            Err(e) => Err(Error::from(e).context(format!("{at}: write"))),
        }
    }

    /// A regular file's entry with no bytes, and the private records that say where
    /// the file is and how large.
    fn file_without_contents(
        &mut self,
        rel: &Path,
        meta: &Meta,
        attrs: &[Xattr],
        at: At<'_>,
    ) -> Result<()> {
        let records = vec![
            (LINK_SOURCE.as_bytes().to_vec(), b"1".to_vec()),
            (LINK_SIZE.as_bytes().to_vec(), meta.size.to_string().into_bytes()),
        ];
        let name = tar_name(rel, false);
        let header =
            self.header_with(EntryType::Regular, &name, Some(meta), 0, None, attrs, records, at)?;
        self.append(&header, io::empty(), at)
    }

    fn append(&mut self, header: &Header, data: impl Read, at: At<'_>) -> Result<()> {
        self.tar.append(header, data).with_context(|| format!("{at}: write"))?;
        self.entries += 1;
        Ok(())
    }

    /// A ustar header for an entry named `name` (PAX records written first for what the
    /// header cannot hold). `meta` None is a whiteout or opaque marker: mode 0, owner
    /// 0:0, time 0.
    #[allow(clippy::too_many_arguments)]
    fn header(
        &mut self,
        kind: EntryType,
        name: &[u8],
        meta: Option<&Meta>,
        size: u64,
        link: Option<&[u8]>,
        attrs: &[Xattr],
        at: At<'_>,
    ) -> Result<Header> {
        self.header_with(kind, name, meta, size, link, attrs, Records::new(), at)
    }

    /// [`Out::header`] with `records` among its PAX records.
    #[allow(clippy::too_many_arguments)]
    fn header_with(
        &mut self,
        kind: EntryType,
        name: &[u8],
        meta: Option<&Meta>,
        size: u64,
        link: Option<&[u8]>,
        attrs: &[Xattr],
        mut records: Records,
        at: At<'_>,
    ) -> Result<Header> {
        let mut header = Header::new_ustar();
        header.set_entry_type(kind);
        // Every numeric field holds a number, zero where the entry has none: each set
        // once (formatting them is a good part of a header's cost).
        let octal_7 = |id: u32| Some(u64::from(id)).filter(|&id| id <= MAX_OCTAL_7);
        let secs =
            meta.and_then(|m| u64::try_from(m.mtime.tv_sec).ok()).filter(|&s| s <= MAX_OCTAL_11);
        header.set_mode(meta.map_or(0, |m| m.mode & 0o7777));
        header.set_uid(meta.and_then(|m| octal_7(m.uid)).unwrap_or(0));
        header.set_gid(meta.and_then(|m| octal_7(m.gid)).unwrap_or(0));
        header.set_mtime(secs.unwrap_or(0));
        header.set_size(if size > MAX_OCTAL_11 { 0 } else { size });
        let Some(ustar) = header.as_ustar_mut() else {
            return Err(Error::internal(format!("{at}: not a ustar header")));
        };
        set_path(&mut ustar.name, &mut ustar.prefix, name, &mut records);
        if let Some(link) = link {
            set_field(&mut ustar.linkname, link, b"linkpath", &mut records);
        }
        if size > MAX_OCTAL_11 {
            records.push((b"size".to_vec(), size.to_string().into_bytes()));
        }
        if let Some(meta) = meta {
            for (key, id) in [(&b"uid"[..], meta.uid), (b"gid", meta.gid)] {
                if octal_7(id).is_none() {
                    records.push((key.to_vec(), id.to_string().into_bytes()));
                }
            }
            if meta.mtime.tv_nsec != 0 || secs.is_none() {
                records.push((b"mtime".to_vec(), pax_time(meta.mtime).into_bytes()));
            }
            if matches!(kind, EntryType::Char | EntryType::Block) {
                let (major, minor) = (rustix::fs::major(meta.rdev), rustix::fs::minor(meta.rdev));
                if u64::from(major.max(minor)) > MAX_OCTAL_7 {
                    return Err(Error::invalid_argument(format!(
                        "{at}: device {major}:{minor} does not fit a tar header"
                    )));
                }
                let dev = |e: io::Error| Error::from(e).context(format!("{at}: device numbers"));
                header.set_device_major(major).map_err(dev)?;
                header.set_device_minor(minor).map_err(dev)?;
            }
        }
        for attr in attrs {
            if attr.name.contains(&b'=') {
                return Err(Error::failed_precondition(format!(
                    "{at}: xattr {:?} has `=` in its name, which a PAX record cannot carry",
                    String::from_utf8_lossy(&attr.name)
                )));
            }
            let mut key = b"SCHILY.xattr.".to_vec();
            key.extend_from_slice(&attr.name);
            records.push((key, attr.value.clone()));
        }
        self.pax(records, at)?;
        header.set_cksum();
        Ok(header)
    }

    /// Writes a PAX extended header with `records` (sorted by key, as Go's writer does),
    /// if there are any.
    fn pax(&mut self, mut records: Records, at: At<'_>) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        records.sort();
        let mut data = Vec::new();
        for (key, value) in &records {
            // "<len> <key>=<value>\n", where <len> counts the whole record, itself too.
            let rest = key.len() + value.len() + 3;
            let mut len = rest + 1;
            while rest + len.to_string().len() != len {
                len = rest + len.to_string().len();
            }
            data.extend_from_slice(len.to_string().as_bytes());
            data.push(b' ');
            data.extend_from_slice(key);
            data.push(b'=');
            data.extend_from_slice(value);
            data.push(b'\n');
        }
        let mut header = Header::new_ustar();
        header.set_entry_type(EntryType::XHeader);
        header.set_size(data.len() as u64);
        header.set_cksum();
        self.tar.append(&header, data.as_slice()).with_context(|| format!("{at}: write"))
    }
}

/// Puts `name` into a ustar header's name (and prefix, split at a `/` as ustar allows),
/// or into a PAX `path` record when it does not fit.
fn set_path(field: &mut [u8; 100], prefix: &mut [u8; 155], name: &[u8], records: &mut Records) {
    if name.len() <= field.len() {
        field[..name.len()].copy_from_slice(name);
        return;
    }
    // The longest prefix that fits, with a non-empty rest that fits the name field.
    let window = &name[..name.len().min(prefix.len() + 1)];
    if let Some(split) = window.iter().rposition(|&b| b == b'/') {
        let (head, tail) = (&name[..split], &name[split + 1..]);
        if !head.is_empty() && !tail.is_empty() && tail.len() <= field.len() {
            prefix[..head.len()].copy_from_slice(head);
            field[..tail.len()].copy_from_slice(tail);
            return;
        }
    }
    set_field(field, name, b"path", records);
}

/// Puts `value` into a header field, or its beginning there and all of it into the PAX
/// record `key` when it does not fit.
fn set_field(field: &mut [u8; 100], value: &[u8], key: &[u8], records: &mut Records) {
    let n = value.len().min(field.len());
    field[..n].copy_from_slice(&value[..n]);
    if value.len() > field.len() {
        records.push((key.to_vec(), value.to_vec()));
    }
}

/// A PAX time: seconds, and a fraction when there are nanoseconds (Go's format).
fn pax_time(t: Timespec) -> String {
    // `tv_nsec` is narrower than i64 on some architectures.
    #[allow(clippy::unnecessary_cast)]
    let (secs, nanos) = (t.tv_sec, t.tv_nsec as i64);
    if nanos == 0 {
        return secs.to_string();
    }
    let (sign, secs, nanos) =
        if secs < 0 { ("-", -(secs + 1), 1_000_000_000 - nanos) } else { ("", secs, nanos) };
    let fraction = format!("{nanos:09}");
    format!("{sign}{secs}.{}", fraction.trim_end_matches('0'))
}

/// A reader of exactly `left` bytes of a file: it stops there, and ends in an error if
/// the file ends first (it shrank since its size was taken), so a tar entry is never
/// short.
struct Exact<R> {
    inner: R,
    left: u64,
    short: bool,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf.len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            self.short = true;
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shrank while being read",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::os::unix::fs::{PermissionsExt, symlink};

    use rustix::fs::{AtFlags, CWD, Mode, Timestamps, XattrFlags};

    use crate::ErrorKind;

    /// One entry of a tar as a reader sees it.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Ent {
        name: String,
        kind: EntryType,
        mode: u32,
        uid: u64,
        gid: u64,
        mtime: String,
        link: Option<String>,
        xattrs: BTreeMap<String, Vec<u8>>,
        data: Vec<u8>,
    }

    fn read_tar(bytes: &[u8]) -> Vec<Ent> {
        let mut archive = tar::Archive::new(bytes);
        let mut out = Vec::new();
        for entry in archive.entries().expect("entries") {
            let mut entry = entry.expect("entry");
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let link = entry.link_name_bytes().map(|l| String::from_utf8_lossy(&l).into_owned());
            let h = entry.header().clone();
            let mut mtime = h.mtime().expect("mtime").to_string();
            let mut xattrs = BTreeMap::new();
            if let Some(pax) = entry.pax_extensions().expect("pax") {
                for ext in pax {
                    let ext = ext.expect("pax record");
                    let key = ext.key().expect("key");
                    if key == "mtime" {
                        mtime = ext.value().expect("mtime").to_owned();
                    } else if let Some(x) = key.strip_prefix("SCHILY.xattr.") {
                        xattrs.insert(x.to_owned(), ext.value_bytes().to_vec());
                    }
                }
            }
            let mut data = Vec::new();
            entry.read_to_end(&mut data).expect("data");
            out.push(Ent {
                name,
                kind: h.entry_type(),
                mode: h.mode().expect("mode"),
                uid: entry.header().uid().expect("uid"),
                gid: entry.header().gid().expect("gid"),
                mtime,
                link,
                xattrs,
                data,
            });
        }
        out
    }

    fn names(ents: &[Ent]) -> Vec<&str> {
        ents.iter().map(|e| e.name.as_str()).collect()
    }

    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir_in("/dev/shm").expect("tempdir")
    }

    fn open(path: &Path) -> File {
        File::open(path).expect("open dir")
    }

    fn is_root() -> bool {
        rustix::process::geteuid().is_root()
    }

    fn set_xattr(path: &Path, name: &str, value: &[u8]) {
        rustix::fs::lsetxattr(path, name, value, XattrFlags::empty()).expect("setxattr");
    }

    fn set_mtime(path: &Path, secs: i64, nanos: i64) {
        let t = Timespec { tv_sec: secs, tv_nsec: nanos as _ };
        let times = Timestamps { last_access: t, last_modification: t };
        rustix::fs::utimensat(CWD, path, &times, AtFlags::SYMLINK_NOFOLLOW).expect("utimensat");
    }

    fn mknod(path: &Path, kind: FileType, dev: u64) {
        rustix::fs::mknodat(CWD, path, kind, Mode::from_raw_mode(0o644), dev).expect("mknod");
    }

    fn run(source: Source<'_>) -> (Written, Vec<u8>) {
        let mut buf = Vec::new();
        let written = diff(source, Compression::None, &mut buf).expect("diff");
        (written, buf)
    }

    fn trees(lower: Option<&Path>, upper: &Path) -> (Written, Vec<Ent>) {
        let lower = lower.map(open);
        let upper = open(upper);
        let (w, buf) =
            run(Source::Trees { lower: lower.as_ref().map(|l| l.as_fd()), upper: upper.as_fd() });
        let ents = read_tar(&buf);
        assert_eq!(w.entries, ents.len() as u64);
        assert_eq!(w.uncompressed_size, buf.len() as u64);
        assert_eq!(w.diff_id, Digest::of(&buf));
        (w, ents)
    }

    fn copy(src: &Path, dst: &Path) {
        let ambient = cap_std::ambient_authority();
        let src = cap_std::fs::Dir::open_ambient_dir(src, ambient).expect("src");
        let dst = cap_std::fs::Dir::open_ambient_dir(dst, ambient).expect("dst");
        crate::fsutil::copy_tree(&src, &dst).expect("copy");
    }

    #[test]
    fn overlay_whiteouts_and_opaque_directories_are_translated() {
        if !is_root() {
            eprintln!("skipped: needs root for mknod and trusted.* xattrs");
            return;
        }
        for userxattr in [false, true] {
            let t = tmp();
            let up = t.path();
            std::fs::write(up.join("a"), b"hello").expect("write");
            mknod(&up.join("gone"), FileType::CharacterDevice, 0);
            std::fs::create_dir(up.join("op")).expect("mkdir");
            std::fs::write(up.join("op/new"), b"n").expect("write");
            let ns = if userxattr { "user" } else { "trusted" };
            set_xattr(&up.join("op"), &format!("{ns}.overlay.opaque"), b"y");
            std::fs::create_dir(up.join("plain")).expect("mkdir");
            set_xattr(&up.join("plain"), "trusted.overlay.origin", b"xyz");
            set_xattr(&up.join("plain"), "user.overlay.impure", b"y");
            set_xattr(&up.join("plain"), "user.keep", b"1");
            // The other namespace's opaque xattr is not this overlay's: no marker.
            std::fs::create_dir(up.join("q")).expect("mkdir");
            let other = if userxattr { "trusted" } else { "user" };
            set_xattr(&up.join("q"), &format!("{other}.overlay.opaque"), b"y");
            // A real (non-0:0) character device is an entry.
            mknod(&up.join("tty"), FileType::CharacterDevice, rustix::fs::makedev(5, 0));

            let dir = open(up);
            let (w, buf) = run(Source::Overlay { upper: dir.as_fd(), userxattr });
            let ents = read_tar(&buf);
            assert_eq!(
                names(&ents),
                ["a", ".wh.gone", "op/", "op/.wh..wh..opq", "op/new", "plain/", "q/", "tty"],
                "userxattr {userxattr}"
            );
            assert_eq!(w.entries, 8);
            assert_eq!(ents[0].data, b"hello");
            let wh = &ents[1];
            assert_eq!((wh.kind, wh.mode, wh.data.len()), (EntryType::Regular, 0, 0));
            assert_eq!(ents[3].kind, EntryType::Regular);
            for e in &ents {
                assert!(e.xattrs.keys().all(|k| !k.contains(".overlay.")), "{e:?}");
            }
            assert_eq!(ents[5].xattrs.get("user.keep").map(Vec::as_slice), Some(&b"1"[..]));
            assert_eq!(ents[7].kind, EntryType::Char);
        }
    }

    #[test]
    fn overlay_redirects_and_metacopy_are_refused() {
        for (what, on_dir) in [
            ("trusted.overlay.redirect", true),
            ("user.overlay.metacopy", false),
            ("user.overlay.redirect", true),
        ] {
            if what.starts_with("trusted") && !is_root() {
                continue;
            }
            let t = tmp();
            let target = t.path().join("sub/x");
            std::fs::create_dir(t.path().join("sub")).expect("mkdir");
            if on_dir {
                std::fs::create_dir(&target).expect("mkdir");
            } else {
                std::fs::write(&target, b"").expect("write");
            }
            set_xattr(&target, what, b"/elsewhere");
            let dir = open(t.path());
            let source = Source::Overlay { upper: dir.as_fd(), userxattr: false };
            let err = diff(source, Compression::None, io::sink()).expect_err(what);
            assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
            assert!(err.message().contains("\"sub/x\""), "{err}");
            // Two trees compared carry no meaning in these xattrs: they are left out.
            let (_, ents) = trees(None, t.path());
            assert_eq!(names(&ents), ["sub/", if on_dir { "sub/x/" } else { "sub/x" }]);
            assert!(ents[1].xattrs.is_empty());
        }
    }

    #[test]
    fn trees_write_deletions_type_changes_and_changes_only() {
        let (l, u) = (tmp(), tmp());
        let (lp, up) = (l.path(), u.path());
        std::fs::write(lp.join("f"), b"deleted").expect("write");
        std::fs::create_dir_all(lp.join("d/sub")).expect("mkdir");
        std::fs::write(lp.join("d/sub/x"), b"x").expect("write");
        symlink("target", lp.join("s")).expect("symlink");
        std::fs::write(lp.join("keep"), b"same").expect("write");
        std::fs::write(lp.join("e"), b"old").expect("write");
        std::fs::write(lp.join("m"), b"mode").expect("write");
        std::fs::create_dir(lp.join("gone")).expect("mkdir");
        std::fs::write(lp.join("gone/deep"), b"").expect("write");
        std::fs::create_dir(lp.join("same")).expect("mkdir");
        std::fs::write(lp.join("same/x"), b"").expect("write");
        set_mtime(&lp.join("same"), 1_000, 5);
        copy(lp, up);

        std::fs::remove_file(up.join("f")).expect("rm");
        std::fs::remove_dir_all(up.join("d")).expect("rm");
        std::fs::write(up.join("d"), b"now a file").expect("write");
        std::fs::remove_file(up.join("s")).expect("rm");
        std::fs::create_dir(up.join("s")).expect("mkdir");
        std::fs::write(up.join("s/child"), b"c").expect("write");
        std::fs::write(up.join("e"), b"new").expect("write");
        std::fs::set_permissions(up.join("m"), std::fs::Permissions::from_mode(0o4755))
            .expect("chmod");
        std::fs::remove_dir_all(up.join("gone")).expect("rm");
        std::fs::write(up.join("same/y"), b"").expect("write");
        set_mtime(&up.join("same"), 1_000, 5);

        let (_, ents) = trees(Some(lp), up);
        // `same/` has its old metadata, and is written as the parent of a change.
        let changed = ["d", "e", ".wh.f", ".wh.gone", "m", "s/", "s/child", "same/", "same/y"];
        assert_eq!(names(&ents), changed);
        assert_eq!(ents[0].data, b"now a file");
        assert_eq!(ents[1].data, b"new");
        assert_eq!(ents[4].mode, 0o4755);
        assert_eq!(ents[5].kind, EntryType::Directory);

        // Nothing changed: nothing written (not even the root).
        let (_, ents) = trees(Some(up), up);
        assert!(ents.is_empty(), "{ents:?}");
        // From nothing: everything, in tree order.
        let (_, ents) = trees(None, up);
        assert_eq!(
            names(&ents),
            ["d", "e", "keep", "m", "s/", "s/child", "same/", "same/x", "same/y"]
        );
    }

    #[test]
    fn hard_links_are_written_as_links_and_groups_are_kept() {
        let (l, u) = (tmp(), tmp());
        let (lp, up) = (l.path(), u.path());
        std::fs::write(lp.join("a"), b"shared").expect("write");
        std::fs::hard_link(lp.join("a"), lp.join("b")).expect("link");
        std::fs::write(lp.join("x"), b"x").expect("write");
        std::fs::write(lp.join("p"), b"p").expect("write");
        std::fs::hard_link(lp.join("p"), lp.join("q")).expect("link");
        std::fs::create_dir(lp.join("z")).expect("mkdir");
        copy(lp, up);

        // From nothing: the second name of a group is a link to the first.
        let (_, ents) = trees(None, lp);
        assert_eq!(names(&ents), ["a", "b", "p", "q", "x", "z/"]);
        assert_eq!((ents[1].kind, ents[1].link.as_deref()), (EntryType::Link, Some("a")));
        assert_eq!((ents[3].kind, ents[3].link.as_deref()), (EntryType::Link, Some("p")));

        // A new link to an unchanged file: the file is written again with its new link.
        std::fs::hard_link(up.join("x"), up.join("z/y")).expect("link");
        // A group that swapped a member (same link count): all of it written again.
        std::fs::remove_file(up.join("q")).expect("rm");
        std::fs::hard_link(up.join("p"), up.join("r")).expect("link");
        let (_, ents) = trees(Some(lp), up);
        // (`z/` is written for its new mtime.)
        assert_eq!(names(&ents), ["p", ".wh.q", "r", "x", "z/", "z/y"]);
        assert_eq!(ents[0].kind, EntryType::Regular);
        assert_eq!((ents[2].kind, ents[2].link.as_deref()), (EntryType::Link, Some("p")));
        assert_eq!(ents[3].kind, EntryType::Regular);
        assert_eq!((ents[5].kind, ents[5].link.as_deref()), (EntryType::Link, Some("x")));
    }

    #[test]
    fn output_is_deterministic_and_independent_of_inodes() {
        let (a, b) = (tmp(), tmp());
        std::fs::create_dir_all(a.path().join("z/y/x")).expect("mkdir");
        for (i, name) in ["m", "b", "k", "z/q", "z/y/a", "a"].iter().enumerate() {
            std::fs::write(a.path().join(name), vec![i as u8; i * 1000]).expect("write");
        }
        std::fs::hard_link(a.path().join("k"), a.path().join("z/k2")).expect("link");
        set_xattr(&a.path().join("m"), "user.b", b"2");
        set_xattr(&a.path().join("m"), "user.a", b"1");
        set_mtime(&a.path().join("b"), 1_700_000_000, 123_456_789);
        copy(a.path(), b.path());
        let dir_a = open(a.path());
        let dir_b = open(b.path());
        for c in [Compression::None, Compression::Gzip, Compression::Zstd] {
            let mut outs = Vec::new();
            for dir in [&dir_a, &dir_a, &dir_b] {
                let mut buf = Vec::new();
                let w = diff(Source::Trees { lower: None, upper: dir.as_fd() }, c, &mut buf)
                    .expect("diff");
                assert_eq!(
                    (w.digest, w.size, w.compression),
                    (Digest::of(&buf), buf.len() as u64, c)
                );
                assert_eq!(w.media_type(), c.media_type());
                outs.push(w);
            }
            assert_eq!(outs[0], outs[1], "{c}");
            assert_eq!(outs[0].diff_id, outs[2].diff_id, "{c}");
        }
        let (_, ents) = trees(None, a.path());
        let m = ents.iter().find(|e| e.name == "m").expect("m");
        assert_eq!(m.xattrs.keys().collect::<Vec<_>>(), ["user.a", "user.b"]);
        let b = ents.iter().find(|e| e.name == "b").expect("b");
        assert_eq!(b.mtime, "1700000000.123456789");
    }

    #[test]
    fn without_contents_files_carry_private_records_and_no_bytes() {
        let t = tmp();
        std::fs::create_dir(t.path().join("d")).expect("mkdir");
        std::fs::write(t.path().join("d/f"), vec![7; 70_000]).expect("write");
        std::fs::write(t.path().join("empty"), b"").expect("write");
        std::fs::hard_link(t.path().join("d/f"), t.path().join("g")).expect("link");
        symlink("d/f", t.path().join("s")).expect("symlink");
        set_xattr(&t.path().join("d/f"), "user.k", b"v");
        let dir = open(t.path());
        let source = Source::Trees { lower: None, upper: dir.as_fd() };

        // The default options are `diff`'s, byte for byte.
        let mut plain = Vec::new();
        let w = diff(source, Compression::None, &mut plain).expect("diff");
        let mut with = Vec::new();
        let w2 = diff_with(source, Compression::None, &mut with, &DiffOptions::default())
            .expect("diff_with");
        assert_eq!((&w, &plain), (&w2, &with));

        let mut bare = Vec::new();
        let opts = DiffOptions { contents: false };
        let w3 = diff_with(source, Compression::None, &mut bare, &opts).expect("no contents");
        assert_eq!(w3.entries, w2.entries);
        assert!(bare.len() + 70_000 <= plain.len(), "{} vs {}", bare.len(), plain.len());
        // Every entry as before, but regular files: size 0, their size in a record.
        let mut archive = tar::Archive::new(bare.as_slice());
        let mut seen = Vec::new();
        for entry in archive.entries().expect("entries") {
            let mut entry = entry.expect("entry");
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let kind = entry.header().entry_type();
            let mut records = BTreeMap::new();
            if let Some(pax) = entry.pax_extensions().expect("pax") {
                for r in pax {
                    let r = r.expect("record");
                    records.insert(r.key().expect("key").to_owned(), r.value_bytes().to_vec());
                }
            }
            assert_eq!(entry.size(), 0, "{name}");
            let mut data = Vec::new();
            entry.read_to_end(&mut data).expect("data");
            assert!(data.is_empty());
            let private = (
                records.get(LINK_SOURCE).map(Vec::as_slice),
                records.get(LINK_SIZE).map(Vec::as_slice),
            );
            match name.as_str() {
                "d/f" => {
                    assert_eq!(private, (Some(&b"1"[..]), Some(&b"70000"[..])));
                    // A link shares them; a copy takes them from the file it copies.
                    assert_eq!(records.get("SCHILY.xattr.user.k"), None);
                }
                "empty" => assert_eq!(private, (Some(&b"1"[..]), Some(&b"0"[..]))),
                _ => assert_eq!(private, (None, None), "{name}: {kind:?}"),
            }
            seen.push((name, kind));
        }
        let expected = [
            ("d/", EntryType::Directory),
            ("d/f", EntryType::Regular),
            ("empty", EntryType::Regular),
            ("g", EntryType::Link),
            ("s", EntryType::Symlink),
        ];
        let expected: Vec<(String, EntryType)> =
            expected.iter().map(|(n, k)| ((*n).to_owned(), *k)).collect();
        assert_eq!(seen, expected);
    }

    #[test]
    fn coarse_timestamps_compare_contents() {
        let (l, u) = (tmp(), tmp());
        for (name, lower, upper, nanos) in [
            ("differs", &b"aaaa"[..], &b"bbbb"[..], 0),
            ("same", b"cccc", b"cccc", 0),
            ("fine", b"dddd", b"eeee", 7),
            ("empty", b"", b"", 0),
        ] {
            std::fs::write(l.path().join(name), lower).expect("write");
            std::fs::write(u.path().join(name), upper).expect("write");
            set_mtime(&l.path().join(name), 1_600_000_000, nanos);
            set_mtime(&u.path().join(name), 1_600_000_000, nanos);
        }
        let (_, ents) = trees(Some(l.path()), u.path());
        // `fine` differs too, but its nanosecond timestamps are trusted (as containerd).
        assert_eq!(names(&ents), ["differs"]);
        assert_eq!(ents[0].mtime, "1600000000");
    }

    #[test]
    fn long_names_ids_and_times_go_to_pax_records() {
        let t = tmp();
        let long = "d".repeat(120);
        let deep = Path::new(&long).join("e".repeat(120)).join("f".repeat(120));
        std::fs::create_dir_all(t.path().join(&deep)).expect("mkdir");
        let file = deep.join("file");
        std::fs::write(t.path().join(&file), b"deep").expect("write");
        let target = "t/".repeat(80);
        symlink(&target, t.path().join("link")).expect("symlink");
        set_mtime(&t.path().join("link"), 5, 500_000_000);
        std::fs::write(t.path().join("old"), b"").expect("write");
        if is_root() {
            rustix::fs::chownat(
                CWD,
                t.path().join("old").as_path(),
                Some(rustix::fs::Uid::from_raw(3_000_000)),
                Some(rustix::fs::Gid::from_raw(4_000_000)),
                AtFlags::empty(),
            )
            .expect("chown");
        }
        set_mtime(&t.path().join("old"), -2, 250_000_000);
        let (_, ents) = trees(None, t.path());
        let file_name = file.to_str().expect("utf-8");
        assert!(
            ents.iter().any(|e| e.name == file_name && e.data == b"deep"),
            "{:?}",
            names(&ents)
        );
        let link = ents.iter().find(|e| e.name == "link").expect("link");
        assert_eq!((link.link.as_deref(), link.mtime.as_str()), (Some(target.as_str()), "5.5"));
        let old = ents.iter().find(|e| e.name == "old").expect("old");
        assert_eq!(old.mtime, "-1.75");
        if is_root() {
            assert_eq!((old.uid, old.gid), (3_000_000, 4_000_000));
        }
    }

    #[test]
    fn pax_times_are_gos_format() {
        let t = |s, n| pax_time(Timespec { tv_sec: s, tv_nsec: n });
        assert_eq!(t(0, 0), "0");
        assert_eq!(t(12, 1), "12.000000001");
        assert_eq!(t(12, 100_000_000), "12.1");
        assert_eq!(t(-1, 0), "-1");
        assert_eq!(t(-1, 500_000_000), "-0.5");
        assert_eq!(t(-3, 1), "-2.999999999");
    }

    #[test]
    fn whiteout_like_names_are_refused() {
        let t = tmp();
        std::fs::write(t.path().join(".wh.x"), b"").expect("write");
        let dir = open(t.path());
        let source = Source::Trees { lower: None, upper: dir.as_fd() };
        let err = diff(source, Compression::None, io::sink()).expect_err("refused");
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
        assert!(err.message().contains(".wh.x"), "{err}");
    }

    #[test]
    fn a_file_that_shrinks_while_read_is_an_error_not_a_short_entry() {
        let t = tmp();
        std::fs::write(t.path().join("f"), b"0123456789").expect("write");
        let file = File::open(t.path().join("f")).expect("open");
        let mut meta = fstat(&file).expect("stat");
        meta.size = 20;
        let mut out = Out::new(Vec::new());
        let at = At { verb: VERB, rel: Path::new("f") };
        let err = out.file(Path::new("f"), &meta, &[], Some(file), at).expect_err("short");
        assert_eq!(err.kind(), ErrorKind::Internal);
        assert!(err.message().contains("changed while being read"), "{err}");
        // A file that grew is cut at the size its header says.
        let file = File::open(t.path().join("f")).expect("open");
        meta.size = 4;
        let mut out = Out::new(Vec::new());
        out.file(Path::new("f"), &meta, &[], Some(file), at).expect("grown");
        let ents = read_tar(&out.tar.into_inner().expect("finish"));
        assert_eq!(ents[0].data, b"0123");
    }

    #[test]
    fn swapped_entries_are_never_followed_nor_opened() {
        let t = tmp();
        let outside = tmp();
        std::fs::write(outside.path().join("secret"), b"s").expect("write");
        std::fs::create_dir(t.path().join("d")).expect("mkdir");
        std::fs::write(t.path().join("f"), b"f").expect("write");
        let dir = open(t.path());
        let d_meta = lstat_at(&dir, Path::new("d")).expect("lstat");
        let f_meta = lstat_at(&dir, Path::new("f")).expect("lstat");
        // Swapped after the lstat: a symlink to a directory outside, a fifo.
        std::fs::remove_dir(t.path().join("d")).expect("rmdir");
        symlink(outside.path(), t.path().join("d")).expect("symlink");
        std::fs::remove_file(t.path().join("f")).expect("rm");
        rustix::fs::mknodat(&dir, "f", FileType::Fifo, Mode::from_raw_mode(0o644), 0)
            .expect("mkfifo");
        let at = At { verb: VERB, rel: Path::new("d") };
        assert!(open_dir(dir.as_fd(), OsStr::new("d"), &d_meta, at).is_err());
        // Opening a fifo for reading would block: the pin refuses it first.
        assert!(open_regular(dir.as_fd(), OsStr::new("f"), &f_meta, at).is_err());

        // A symlink where a directory was is written as a symlink, nothing behind it.
        let (_, ents) = trees(None, t.path());
        assert_eq!(names(&ents), ["d", "f"]);
        assert_eq!((ents[0].kind, ents[1].kind), (EntryType::Symlink, EntryType::Fifo));

        // Racing: a directory and a symlink to the outside swapped in a loop while
        // diffing. A diff may fail, but never shows what is outside.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let swapper = {
            let stop = stop.clone();
            let (root, outside) = (t.path().to_path_buf(), outside.path().to_path_buf());
            std::thread::spawn(move || {
                std::fs::create_dir(root.join("real")).expect("mkdir");
                std::fs::write(root.join("real/inner"), b"i").expect("write");
                symlink(&outside, root.join("fake")).expect("symlink");
                let mv = |a: &str, b: &str| {
                    let _ = std::fs::rename(root.join(a), root.join(b));
                };
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // "d" is the symlink, then the real directory, then the symlink...
                    mv("d", "fake");
                    mv("real", "d");
                    mv("d", "real");
                    mv("fake", "d");
                }
            })
        };
        let (mut ok, mut failed) = (0, 0);
        for _ in 0..300 {
            let mut buf = Vec::new();
            let source = Source::Trees { lower: None, upper: dir.as_fd() };
            match diff(source, Compression::None, &mut buf) {
                Ok(_) => {
                    ok += 1;
                    for e in read_tar(&buf) {
                        assert!(!e.name.contains("secret"), "{e:?}");
                    }
                }
                Err(_) => failed += 1,
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        swapper.join().expect("swapper");
        assert_eq!(ok + failed, 300);
    }

    #[test]
    fn deep_trees_keep_few_descriptors_and_compare_below_new_directories() {
        // Deeper than the open levels of a walk, in both trees; below that, a new
        // directory (no lower) deeper again; then changes back up, which need the
        // closed levels reopened on both sides.
        let (l, u) = (tmp(), tmp());
        let mut rel = PathBuf::new();
        for _ in 0..100 {
            rel.push("d");
        }
        std::fs::create_dir_all(l.path().join(&rel)).expect("mkdir");
        std::fs::write(l.path().join("d/d/d/gone"), b"").expect("write");
        copy(l.path(), u.path());
        let mut new = rel.join("n");
        for _ in 0..100 {
            new.push("n");
        }
        std::fs::create_dir_all(u.path().join(&new)).expect("mkdir");
        std::fs::write(u.path().join(new.join("leaf")), b"leaf").expect("write");
        std::fs::remove_file(u.path().join("d/d/d/gone")).expect("rm");
        std::fs::write(u.path().join("d/d/late"), b"late").expect("write");
        // Keep the directories' own metadata equal, so only the changes are written.
        let lower = open(l.path());
        let mut p = PathBuf::new();
        for _ in 0..100 {
            p.push("d");
            let m = lstat_at(&lower, &p).expect("lstat");
            #[allow(clippy::unnecessary_cast)]
            set_mtime(&u.path().join(&p), m.mtime.tv_sec, m.mtime.tv_nsec as i64);
        }
        let (_, ents) = trees(Some(l.path()), u.path());
        let got = names(&ents);
        // The new directory and everything below it, the whiteout, the late file, and
        // the parents of those three changes; in tree order: what is below `d/d/d/d`
        // comes before `d/d/d/.wh.gone`.
        assert_eq!(got.len(), 1 + 101 + 1 + 4);
        assert_eq!(got[..2], [format!("{}/", rel.display()), format!("{}/n/", rel.display())]);
        assert_eq!(got[got.len() - 4..], ["d/d/d/", "d/d/d/.wh.gone", "d/d/", "d/d/late"]);
        let leaf = format!("{}/leaf", new.display());
        assert!(got.contains(&leaf.as_str()), "{got:?}");
    }
}
