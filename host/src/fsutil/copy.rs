//! Copying a tree with its metadata, the way containerd's `fs.CopyDir` does for its
//! copy-based snapshotters.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Gid, Mode, OFlags, SeekFrom, Uid};
use rustix::io::Errno;

use super::xattr::{self, Node, Xattr};
use super::{
    At, Handle, Level, Meta, Stack, child_rel, fstat, list_names, lstat_at, open_in_tree,
    open_pinned, pin_in_tree, reopen_dir,
};
use crate::error::{Error, Result};

/// Copies the contents of `src` into the empty directory `dst`, preserving file type,
/// mode (including setuid, setgid and sticky), ownership, access and modification times
/// (to the nanosecond), extended attributes in every namespace the caller can read,
/// symlinks (never followed), hard links within the tree, device nodes and fifos.
/// Sockets are skipped. The metadata of `src` itself is applied to `dst` too.
///
/// Per entry the order is: contents, owner, xattrs, mode, times. Owner comes first because
/// `chown` clears setuid/setgid and file capabilities; times come last because every other
/// step may touch them, and a directory gets its metadata only after all its children are
/// written, so a read-only directory is still filled and keeps its mtime.
///
/// Not preserved: inode numbers, ctime and birth time, inode flags (`chattr`), and links to
/// inodes outside the tree. Attributes the destination filesystem does not support are
/// left out, and attributes `dst` gives new entries by itself (an inherited default ACL)
/// stay. Holes in sparse files are kept where the filesystem reports them. An entry already
/// present in `dst` is an error; on error `dst` is left partly filled.
pub fn copy_tree(src: &cap_std::fs::Dir, dst: &cap_std::fs::Dir) -> Result<()> {
    copy_or_link(src.as_fd(), dst.as_fd(), false, None)
}

/// [`copy_tree`], calling `room` before each entry and between chunks of a large file:
/// its error stops the copy, as the deadline does (a plugin's clone stops where its
/// filesystem must keep space free).
pub fn copy_tree_while(
    src: &cap_std::fs::Dir,
    dst: &cap_std::fs::Dir,
    room: &dyn Fn() -> Result<()>,
) -> Result<()> {
    copy_or_link(src.as_fd(), dst.as_fd(), false, Some(room))
}

/// [`copy_tree`], except that each regular file is hard-linked into `dst` instead of
/// copied, where a link can be made (the same filesystem; otherwise, or past the
/// filesystem's limit on links, it is copied). Directories, symlinks, devices and fifos
/// are made new, as `copy_tree` makes them.
///
/// The linked files are the same inodes in both trees: for a tree that nothing writes
/// into in place afterwards and whose source is immutable, as a merge's tree built on a
/// committed snapshot (the applier replaces files, never rewrites them; see
/// `layer::merge`). A file is linked only if an `O_PATH` pin of its name shows the very
/// regular file the listing's `lstat` did: a symlink, device or fifo swapped in is
/// neither followed nor opened, and a mount point is refused.
pub fn link_tree(src: impl AsFd, dst: impl AsFd) -> Result<()> {
    copy_or_link(src.as_fd(), dst.as_fd(), true, None)
}

fn copy_or_link(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    link: bool,
    room: Option<&dyn Fn() -> Result<()>>,
) -> Result<()> {
    let root = At { verb: if link { "link" } else { "copy" }, rel: Path::new("") };
    // Pinned: both roots are the handles given.
    let src_fd = reopen_dir(&src).map_err(root.err("open source"))?;
    let src_meta = fstat(&src_fd).map_err(root.err("stat source"))?;
    let dst_fd = reopen_dir(&dst).map_err(root.err("open destination"))?;
    let dst_meta = fstat(&dst_fd).map_err(root.err("stat destination"))?;
    if src_meta.id() == dst_meta.id() {
        return Err(Error::internal(format!(
            "{root}: source and destination are the same directory"
        )));
    }
    let mut copier = Copier {
        room,
        dst_root: dst,
        dst_id: dst_meta.id(),
        links: HashMap::new(),
        link,
        empty_path: std::cell::Cell::new(None),
    };
    let mut stack = Stack::new(Frame::new(src_fd, src_meta, dst_fd, &dst_meta, PathBuf::new())?);
    while let Some(frame) = stack.top_mut() {
        check(room)?;
        match frame.names.next() {
            Some(name) => {
                if let Some(child) = copier.entry(frame, &name)? {
                    stack.push(child);
                }
            }
            None => {
                if let Some(done) = stack.pop()? {
                    done.finish()?;
                }
            }
        }
    }
    Ok(())
}

/// A directory being copied: both sides open, the source's metadata waiting to be applied
/// once the names still to copy run out.
#[derive(Debug)]
struct Frame {
    rel: PathBuf,
    src: Handle,
    dst: Handle,
    meta: Meta,
    xattrs: Vec<Xattr>,
    names: std::vec::IntoIter<OsString>,
}

impl Frame {
    fn new(src: OwnedFd, meta: Meta, dst: OwnedFd, dst_meta: &Meta, rel: PathBuf) -> Result<Frame> {
        let at = At { verb: "copy", rel: &rel };
        // Pinned: the directory just opened and checked.
        let xattrs = xattr::read(Node::Open(src.as_fd()), at)?;
        let names = list_names(src.as_fd()).map_err(at.err("read directory"))?;
        Ok(Frame {
            src: Handle::new(src, &meta),
            dst: Handle::new(dst, dst_meta),
            meta,
            xattrs,
            names: names.into_iter(),
            rel,
        })
    }

    fn at(&self) -> At<'_> {
        At { verb: "copy", rel: &self.rel }
    }

    fn finish(&self) -> Result<()> {
        // Pinned: the destination directory this frame made and holds.
        let fd = self.dst.fd().map_err(self.at().err("apply metadata"))?;
        apply(Node::Open(fd), &self.meta, &self.xattrs, self.at())
    }
}

impl Level for Frame {
    fn close(&mut self) {
        self.src.fd = None;
        self.dst.fd = None;
    }

    fn reopen_from(&mut self, child: &Frame) -> Result<()> {
        self.src.reopen_from(&child.src, child.at())?;
        self.dst.reopen_from(&child.dst, child.at())
    }
}

/// What a copy checks between entries and chunks besides the deadline: an error stops it.
type Room<'a> = Option<&'a dyn Fn() -> Result<()>>;

/// The deadline in force, then `room`.
fn check(room: Room<'_>) -> Result<()> {
    super::deadline::check("copy")?;
    room.map_or(Ok(()), |room| room())
}

/// Bytes of a file copied between two [`check`]s.
const CHUNK: u64 = 64 << 20;

/// State shared by the whole copy.
struct Copier<'a> {
    room: Room<'a>,
    dst_root: BorrowedFd<'a>,
    dst_id: (u64, u64),
    /// First destination path of each source inode with more than one link.
    links: HashMap<(u64, u64), PathBuf>,
    /// Regular files are hard-linked ([`link_tree`]); false once a link failed with
    /// `EXDEV` (another filesystem): every file is copied then.
    link: bool,
    /// Whether `linkat(AT_EMPTY_PATH)` works here (see [`super::link_pinned`]).
    empty_path: std::cell::Cell<Option<bool>>,
}

impl Copier<'_> {
    /// Copies one entry of `parent`; a directory comes back as a frame to descend into.
    fn entry(&mut self, parent: &Frame, name: &OsString) -> Result<Option<Frame>> {
        let rel = child_rel(&parent.rel, name);
        let at = At { verb: "copy", rel: &rel };
        let sdir = parent.src.fd().map_err(at.err("source directory"))?;
        let ddir = parent.dst.fd().map_err(at.err("destination directory"))?;
        // No-follow: `name` is from the listing of the pinned `sdir`.
        let meta = lstat_at(sdir, Path::new(name)).map_err(at.err("lstat"))?;
        let kind = meta.file_type();
        if kind == FileType::Directory {
            return self.dir(sdir, ddir, name, &meta, rel.clone()).map(Some);
        }
        if kind == FileType::Socket {
            return Ok(None);
        }
        if let Some(first) = self.links.get(&meta.id()).filter(|_| meta.nlink > 1) {
            self.link(first, ddir, name, at)?;
            return Ok(None);
        }
        let meta = match kind {
            FileType::RegularFile if self.link => self.link_file(sdir, ddir, name, &meta, at)?,
            FileType::RegularFile => copy_file(sdir, ddir, name, &meta, at, self.room)?,
            FileType::Symlink => {
                // No-follow: readlink reads the last component itself (EINVAL if it is
                // no longer a symlink); symlinkat creates, never follows (EEXIST).
                let target = rustix::fs::readlinkat(sdir, name.as_os_str(), Vec::new())
                    .map_err(at.err("readlink"))?;
                rustix::fs::symlinkat(target.as_c_str(), ddir, name.as_os_str())
                    .map_err(at.err("symlink"))?;
                copy_entry_meta(sdir, ddir, name, &meta, at)?
            }
            FileType::CharacterDevice | FileType::BlockDevice | FileType::Fifo => {
                let perms = Mode::from_raw_mode(meta.mode & 0o777);
                // No-follow: mknodat creates, never follows (EEXIST). Nothing is opened.
                rustix::fs::mknodat(ddir, name.as_os_str(), kind, perms, meta.rdev)
                    .map_err(at.err("mknod"))?;
                copy_entry_meta(sdir, ddir, name, &meta, at)?
            }
            _ => {
                return Err(Error::internal(format!(
                    "{at}: unknown file type (mode {:o})",
                    meta.mode
                )));
            }
        };
        if meta.nlink > 1 {
            self.links.insert(meta.id(), rel);
        }
        Ok(None)
    }

    fn dir(
        &self,
        sdir: BorrowedFd<'_>,
        ddir: BorrowedFd<'_>,
        name: &OsStr,
        meta: &Meta,
        rel: PathBuf,
    ) -> Result<Frame> {
        let at = At { verb: "copy", rel: &rel };
        // In tree: no symlink followed, no mount crossed; then checked against the lstat.
        let src = open_in_tree(sdir, Path::new(name), OFlags::RDONLY | OFlags::DIRECTORY)
            .map_err(at.open_err("open"))?;
        let opened = fstat(&src).map_err(at.err("stat"))?;
        if opened.id() != meta.id() {
            return Err(Error::internal(format!("{at}: directory was replaced during the copy")));
        }
        if opened.id() == self.dst_id {
            return Err(Error::internal(format!("{at}: the destination is inside the source")));
        }
        // No-follow: mkdirat creates, never follows (EEXIST); the destination is the host's.
        rustix::fs::mkdirat(ddir, name, Mode::RWXU).map_err(at.err("mkdir"))?;
        let dst = open_in_tree(ddir, Path::new(name), OFlags::RDONLY | OFlags::DIRECTORY)
            .map_err(at.err("open destination"))?;
        let dst_meta = fstat(&dst).map_err(at.err("stat destination"))?;
        Frame::new(src, opened, dst, &dst_meta, rel)
    }

    /// Hard-links the regular file `name` of `sdir` (whose lstat is `meta`) as `name` in
    /// `ddir`, or copies it where no link can be made; returns the metadata of the file
    /// taken.
    fn link_file(
        &mut self,
        sdir: BorrowedFd<'_>,
        ddir: BorrowedFd<'_>,
        name: &OsStr,
        meta: &Meta,
        at: At<'_>,
    ) -> Result<Meta> {
        // Pinned before it is linked: a fifo, device or symlink swapped in after the
        // lstat is refused, never linked, followed or opened; a mount point is refused.
        let (pinned, opened) = pin_regular(sdir, name, meta, at)?;
        // Pinned: the link is to the inode checked above. No-follow: `name` is made new
        // in the destination (EEXIST if anything is there).
        match super::link_pinned(pinned.as_fd(), ddir, name, &self.empty_path) {
            Ok(()) => Ok(opened),
            Err(Errno::XDEV) => {
                self.link = false;
                copy_file(sdir, ddir, name, meta, at, self.room)
            }
            // Too many links to the inode, or links refused (protected_hardlinks).
            Err(Errno::MLINK | Errno::PERM) => copy_file(sdir, ddir, name, meta, at, self.room),
            Err(e) => Err(at.err("link")(e)),
        }
    }

    /// Links `name` to the inode already copied to `first`. The path is resolved one
    /// component at a time without following symlinks, so it stays inside the destination.
    fn link(&self, first: &Path, ddir: BorrowedFd<'_>, name: &OsStr, at: At<'_>) -> Result<()> {
        let mut held: Option<OwnedFd> = None;
        let mut parts = first.components().peekable();
        while let Some(part) = parts.next() {
            let Component::Normal(part) = part else {
                return Err(Error::internal(format!("{at}: bad link path {first:?}")));
            };
            let dir = held.as_ref().map_or(self.dst_root, |fd| fd.as_fd());
            if parts.peek().is_none() {
                // No-follow: linkat without AT_SYMLINK_FOLLOW links `part` itself.
                return rustix::fs::linkat(dir, part, ddir, name, AtFlags::empty())
                    .map_err(at.err(format!("link to {first:?}")));
            }
            // No-follow, one component at a time, in the destination only.
            let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            held = Some(
                rustix::fs::openat(dir, part, flags, Mode::empty())
                    .map_err(at.err(format!("open {first:?}")))?,
            );
        }
        Err(Error::internal(format!("{at}: empty link path")))
    }
}

/// Pins `name` of `sdir` (`O_PATH`, in tree) and checks it is still the regular file
/// whose lstat is `meta`; returns the pin and its metadata.
fn pin_regular(
    sdir: BorrowedFd<'_>,
    name: &OsStr,
    meta: &Meta,
    at: At<'_>,
) -> Result<(OwnedFd, Meta)> {
    let pinned = pin_in_tree(sdir, Path::new(name)).map_err(at.open_err("open"))?;
    let opened = fstat(&pinned).map_err(at.err("stat"))?;
    if opened.id() != meta.id() || opened.file_type() != FileType::RegularFile {
        return Err(Error::internal(format!("{at}: file was replaced during the copy")));
    }
    Ok((pinned, opened))
}

/// Copies a regular file's contents and metadata; returns the metadata of the opened source.
fn copy_file(
    sdir: BorrowedFd<'_>,
    ddir: BorrowedFd<'_>,
    name: &OsStr,
    meta: &Meta,
    at: At<'_>,
    room: Room<'_>,
) -> Result<Meta> {
    // Pinned before it is opened: a fifo or device swapped in after the lstat is refused
    // here, never opened (which could hang, or wake a driver); a symlink is pinned as
    // itself, a mount point refused.
    let (pinned, opened) = pin_regular(sdir, name, meta, at)?;
    let src = File::from(open_pinned(pinned.as_fd()).map_err(at.err("open"))?);
    // No-follow: O_CREAT | O_EXCL never follows, and makes a new inode.
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let dst = File::from(
        rustix::fs::openat(ddir, name, flags, Mode::RUSR | Mode::WUSR).map_err(at.err("create"))?,
    );
    copy_contents(&src, &dst, &opened, room)
        .map_err(|e| e.context(format!("{at}: copy contents")))?;
    // Pinned: both files are open.
    let xattrs = xattr::read(Node::Open(src.as_fd()), at)?;
    apply(Node::Open(dst.as_fd()), &opened, &xattrs, at)?;
    Ok(opened)
}

/// Copies the metadata of a symlink, device or fifo, none of which is opened.
fn copy_entry_meta(
    sdir: BorrowedFd<'_>,
    ddir: BorrowedFd<'_>,
    name: &OsStr,
    meta: &Meta,
    at: At<'_>,
) -> Result<Meta> {
    // No-follow: l*xattr calls on the listed name in the pinned directory (a read; an
    // entry swapped in meanwhile only gives other attributes to the host's copy).
    let xattrs = xattr::read(Node::Entry(sdir, name), at)?;
    apply(Node::Entry(ddir, name), meta, &xattrs, at)?;
    Ok(*meta)
}

/// Gives `target` the owner, xattrs, mode and times of `meta`, in that order.
fn apply(target: Node<'_>, meta: &Meta, xattrs: &[Xattr], at: At<'_>) -> Result<()> {
    let (uid, gid) = (Some(Uid::from_raw(meta.uid)), Some(Gid::from_raw(meta.gid)));
    // Pinned (`Open`) or no-follow (`Entry`, AT_SYMLINK_NOFOLLOW / l*xattr / pinned chmod)
    // for every step below; an `Entry` is one the copy just made in the destination.
    let chowned = match target {
        Node::Open(fd) => rustix::fs::fchown(fd, uid, gid),
        Node::Entry(dir, name) => {
            rustix::fs::chownat(dir, name, uid, gid, AtFlags::SYMLINK_NOFOLLOW)
        }
    };
    if let Err(e) = chowned {
        // Without CAP_CHOWN a chown to the owner it already has is not a failure.
        let current = match target {
            Node::Open(fd) => fstat(fd),
            Node::Entry(dir, name) => lstat_at(dir, Path::new(name)),
        };
        if !matches!(current, Ok(c) if e == Errno::PERM && (c.uid, c.gid) == (meta.uid, meta.gid)) {
            return Err(at.err("chown")(e));
        }
    }
    xattr::write(target, xattrs, at)?;
    // Symlinks have no mode of their own on Linux.
    if meta.file_type() != FileType::Symlink {
        match target {
            Node::Open(fd) => rustix::fs::fchmod(fd, meta.perms()),
            Node::Entry(dir, name) => super::chmod_nofollow(dir, name, meta.perms()),
        }
        .map_err(at.err("chmod"))?;
    }
    match target {
        Node::Open(fd) => rustix::fs::futimens(fd, &meta.times()),
        Node::Entry(dir, name) => {
            rustix::fs::utimensat(dir, name, &meta.times(), AtFlags::SYMLINK_NOFOLLOW)
        }
    }
    .map_err(at.err("utimensat"))
}

/// Copies file data. `io::copy` between files uses `copy_file_range` (a reflink where the
/// filesystem can); a file with fewer blocks than its size has holes, which are skipped so
/// the copy stays sparse. A large file is copied in chunks, [`check`]ed between them.
fn copy_contents(src: &File, dst: &File, meta: &Meta, room: Room<'_>) -> Result<()> {
    let sparse = meta.blocks.saturating_mul(512) < meta.size;
    if !sparse || !copy_data_ranges(src, dst, meta.size, room)? {
        copy_range(src, dst, u64::MAX, room)?;
    }
    Ok(())
}

/// Copies up to `len` bytes from `src`'s position to `dst`'s, in chunks with a
/// [`check`] between them; returns how many it copied (fewer at the end of `src`).
fn copy_range(src: &File, dst: &File, len: u64, room: Room<'_>) -> Result<u64> {
    let mut done = 0;
    while done < len {
        if done > 0 {
            check(room)?;
        }
        let want = (len - done).min(CHUNK);
        let copied = io::copy(&mut src.take(want), &mut &*dst)?;
        done += copied;
        if copied < want {
            break;
        }
    }
    Ok(done)
}

/// Copies only the data ranges `SEEK_DATA`/`SEEK_HOLE` report. Returns false, having
/// written nothing, if the filesystem cannot report them.
fn copy_data_ranges(src: &File, dst: &File, size: u64, room: Room<'_>) -> Result<bool> {
    let mut pos = 0;
    while pos < size {
        let start = match rustix::fs::seek(src, SeekFrom::Data(pos)) {
            Ok(start) => start,
            // No data after `pos`: the rest is a hole.
            Err(Errno::NXIO) => break,
            Err(Errno::INVAL) if pos == 0 => return Ok(false),
            Err(e) => return Err(io::Error::from(e).into()),
        };
        let end = rustix::fs::seek(src, SeekFrom::Hole(start)).map_err(io::Error::from)?;
        rustix::fs::seek(src, SeekFrom::Start(start)).map_err(io::Error::from)?;
        rustix::fs::seek(dst, SeekFrom::Start(start)).map_err(io::Error::from)?;
        if pos > 0 {
            check(room)?;
        }
        let copied = copy_range(src, dst, end - start, room)?;
        if copied < end - start {
            break;
        }
        pos = end;
    }
    dst.set_len(size)?;
    Ok(true)
}
