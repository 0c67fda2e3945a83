//! File-tree utilities for copy-based snapshotters: copying a tree with all its metadata,
//! measuring disk usage, and removing a tree.
//!
//! Everything works relative to capability handles (`cap_std::fs::Dir`) through `*at`
//! system calls with `O_NOFOLLOW`, so a symlink inside a tree never leads outside it.
//! Entries of a tree are opened with `openat2` beneath their directory, so a mount point
//! inside a tree is refused rather than crossed (`open_in_tree`), and a file is opened
//! for reading only after an `O_PATH` descriptor showed it is one (`open_pinned`): a
//! device or fifo swapped in is never opened. Walks are iterative and keep a bounded
//! number of directories open: deep trees neither overflow the stack nor exhaust file
//! descriptors.

mod copy;
pub mod deadline;
mod remove;
mod usage;
pub(crate) mod xattr;

#[cfg(test)]
mod tests;

use std::ffi::OsString;
use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Stat, Timespec, Timestamps};
use rustix::io::Errno;

use crate::error::{Error, Result};

pub use copy::{copy_tree, copy_tree_while, link_tree};
pub use remove::remove_tree;
pub use usage::{disk_usage, measure_and_sync};

/// How many directory levels of a walk hold open descriptors. Deeper levels close their
/// ancestors and reopen them through `..` on the way back up.
pub(crate) const MAX_OPEN_LEVELS: usize = 64;

/// The fields of `stat` the utilities use, in fixed-width types.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Meta {
    pub(crate) dev: u64,
    pub(crate) ino: u64,
    pub(crate) mode: u32,
    pub(crate) nlink: u64,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) rdev: u64,
    pub(crate) size: u64,
    pub(crate) blocks: u64,
    pub(crate) atime: Timespec,
    pub(crate) mtime: Timespec,
}

impl Meta {
    // The widths of `stat` fields differ between architectures, so some casts are no-ops
    // on one and needed on another.
    #[allow(clippy::unnecessary_cast)]
    pub(crate) fn from_stat(st: &Stat) -> Meta {
        Meta {
            dev: st.st_dev as u64,
            ino: st.st_ino as u64,
            mode: st.st_mode as u32,
            nlink: st.st_nlink as u64,
            uid: st.st_uid as u32,
            gid: st.st_gid as u32,
            rdev: st.st_rdev as u64,
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: Timespec { tv_sec: st.st_atime as i64, tv_nsec: st.st_atime_nsec as _ },
            mtime: Timespec { tv_sec: st.st_mtime as i64, tv_nsec: st.st_mtime_nsec as _ },
        }
    }

    pub(crate) fn file_type(&self) -> FileType {
        FileType::from_raw_mode(self.mode)
    }

    /// Permission bits including setuid, setgid and sticky.
    pub(crate) fn perms(&self) -> Mode {
        Mode::from_raw_mode(self.mode & 0o7777)
    }

    pub(crate) fn id(&self) -> (u64, u64) {
        (self.dev, self.ino)
    }

    fn times(&self) -> Timestamps {
        Timestamps { last_access: self.atime, last_modification: self.mtime }
    }
}

pub(crate) fn fstat(fd: impl AsFd) -> rustix::io::Result<Meta> {
    // Pinned: describes the descriptor's own inode.
    rustix::fs::fstat(fd).map(|st| Meta::from_stat(&st))
}

/// `lstat` of the entry `name` in `dir`.
pub(crate) fn lstat_at(dir: impl AsFd, name: &Path) -> rustix::io::Result<Meta> {
    // No-follow: a final symlink is described, not followed.
    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).map(|st| Meta::from_stat(&st))
}

/// Opens the directory `name` below `dir` for reading, refusing to follow a symlink. For
/// directories the host named itself (a mount point there is followed, on purpose); an
/// entry found inside a tree is opened with [`open_in_tree`].
fn open_dir_at(dir: impl AsFd, name: &Path) -> rustix::io::Result<OwnedFd> {
    // No-follow: a final symlink is ELOOP/ENOTDIR; O_DIRECTORY opens nothing else.
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    rustix::fs::openat(dir, name, flags, Mode::empty())
}

/// Opens the directory `name` below `dir` as a readable handle, never following a
/// symlink (a symlink there is an error, not a way out).
pub fn open_dir_nofollow(dir: &cap_std::fs::Dir, name: &str) -> Result<cap_std::fs::Dir> {
    let fd = open_dir_at(dir, Path::new(name))?;
    Ok(cap_std::fs::Dir::from_std_file(std::fs::File::from(fd)))
}

/// Makes the directory `rel` below `dir` (components joined by `/`), each missing one
/// with `mode` (less the umask), and opens it as [`open_dir_nofollow`] does. Each
/// component's name is synced into its parent before the next is made or the handle
/// returned, so what is later synced inside it cannot be lost to a power cut with its
/// directory's name; one already there is synced too (a crash may have come between
/// its making and its sync), and otherwise taken as it is. A symlink anywhere along
/// `rel` is an error, never followed.
pub fn make_dir_synced(dir: &cap_std::fs::Dir, rel: &str, mode: u32) -> Result<cap_std::fs::Dir> {
    let err = |what: &str, at: &str| format!("{what} {rel:?} (at {at:?})");
    // Readable, to be synced: `dir` itself may be an O_PATH handle.
    let mut at = open_dir_at(dir, Path::new(".")).map_err(Error::from)?;
    for name in rel.split('/').filter(|c| !c.is_empty() && *c != ".") {
        if name == ".." {
            return Err(Error::invalid_argument(format!("{rel:?} leads out of its directory")));
        }
        // No-follow: mkdirat makes, never follows; the open below refuses a symlink.
        match rustix::fs::mkdirat(&at, name, Mode::from_raw_mode(mode)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(Error::from(e).context(err("create", name))),
        }
        rustix::fs::fsync(&at)
            .map_err(|e| Error::from(e).context(err("sync the parent of", name)))?;
        at = open_dir_at(&at, Path::new(name))
            .map_err(|e| Error::from(e).context(err("open", name)))?;
    }
    Ok(cap_std::fs::Dir::from_std_file(std::fs::File::from(at)))
}

/// Syncs `dir` (its entries' names), which may be an `O_PATH` handle.
pub fn sync_dir(dir: &cap_std::fs::Dir) -> Result<()> {
    let fd = open_dir_at(dir, Path::new(".")).map_err(Error::from)?;
    rustix::fs::fsync(&fd).map_err(Error::from)
}

/// Syncs the directory entry `path` into its parent: what a file or directory just
/// made by path needs before a power cut cannot lose it.
pub fn sync_parent(path: &Path) -> std::io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::File::open(parent).and_then(|d| d.sync_all())
}

/// How an entry of a tree is resolved: beneath its directory, no symlink (nor magic
/// link) followed, no mount crossed.
const IN_TREE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::NO_XDEV);

/// Set once `openat2` turned out to be missing (Linux before 5.6).
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// Opens the entry `name` (one component, from a listing) of `dir` with `flags`, never
/// following it if it is a symlink and never crossing into a mount on it: a mount point
/// inside a tree is `EXDEV`, so a walk cannot reach, change or remove another
/// filesystem's files through it. Kernels without `openat2` get `openat` with
/// `O_NOFOLLOW`, which follows no symlink but cannot refuse a mount.
pub(crate) fn open_in_tree(
    dir: impl AsFd,
    name: &Path,
    flags: OFlags,
) -> rustix::io::Result<OwnedFd> {
    let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    if !NO_OPENAT2.load(Ordering::Relaxed) {
        match rustix::fs::openat2(dir.as_fd(), name, flags, Mode::empty(), IN_TREE) {
            Err(Errno::NOSYS) => NO_OPENAT2.store(true, Ordering::Relaxed),
            other => return other,
        }
    }
    rustix::fs::openat(dir, name, flags, Mode::empty())
}

/// Pins the entry `name` of a tree with an `O_PATH` descriptor: never following a final
/// symlink (a symlink is pinned as itself), never crossing a mount, and opening nothing
/// (no device driver is woken, no fifo blocks).
pub(crate) fn pin_in_tree(dir: impl AsFd, name: &Path) -> rustix::io::Result<OwnedFd> {
    open_in_tree(dir, name, OFlags::PATH)
}

/// The `/proc/self/fd` link of `fd`: resolving it lands on exactly the inode `fd` holds,
/// wherever its names have gone since.
fn proc_link(fd: BorrowedFd<'_>) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

/// Hard-links the inode `pinned` holds (an `O_PATH` descriptor of a regular file) as
/// `name` in `dir`: with `AT_EMPTY_PATH` on the descriptor where that is allowed (it needs
/// `CAP_DAC_READ_SEARCH`; `empty_path` remembers whether it is), otherwise through its
/// `/proc/self/fd` link. Either way the link is to that very inode, never to whatever a
/// path names now.
pub(crate) fn link_pinned(
    pinned: BorrowedFd<'_>,
    dir: BorrowedFd<'_>,
    name: &std::ffi::OsStr,
    empty_path: &std::cell::Cell<Option<bool>>,
) -> rustix::io::Result<()> {
    if empty_path.get() != Some(false) {
        // Pinned: AT_EMPTY_PATH links the descriptor's own inode. No-follow: `name` is
        // made new (EEXIST if anything is there).
        match rustix::fs::linkat(pinned, c"", dir, name, AtFlags::EMPTY_PATH) {
            Ok(()) => {
                empty_path.set(Some(true));
                return Ok(());
            }
            // Without CAP_DAC_READ_SEARCH the kernel answers ENOENT.
            Err(Errno::NOENT) if empty_path.get().is_none() => empty_path.set(Some(false)),
            Err(e) => return Err(e),
        }
    }
    // Pinned: AT_SYMLINK_FOLLOW follows only the magic link, which names the pinned
    // inode. No-follow: `name` is made new.
    rustix::fs::linkat(
        rustix::fs::CWD,
        proc_link(pinned).as_str(),
        dir,
        name,
        AtFlags::SYMLINK_FOLLOW,
    )
}

/// Opens the inode held by the `O_PATH` descriptor `pinned` for reading, through its
/// `/proc/self/fd` link. Only a regular file or a directory is opened (`EINVAL`
/// otherwise), so no device or fifo is ever opened by a name someone else controls;
/// `O_NONBLOCK` keeps a lease holder from stalling the open.
pub(crate) fn open_pinned(pinned: BorrowedFd<'_>) -> rustix::io::Result<OwnedFd> {
    let kind = FileType::from_raw_mode(rustix::fs::fstat(pinned)?.st_mode);
    if !matches!(kind, FileType::RegularFile | FileType::Directory) {
        return Err(Errno::INVAL);
    }
    let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    // Pinned: the magic link names the inode checked above, not a path.
    rustix::fs::open(proc_link(pinned).as_str(), flags, Mode::empty())
}

/// Sets the permission bits of the inode held by the `O_PATH` descriptor `pinned`
/// through its `/proc/self/fd` link (`fchmod` takes no `O_PATH` descriptor, `chmodat`
/// cannot refuse to follow). A symlink, which has no mode of its own, is `ELOOP`.
pub(crate) fn chmod_pinned(pinned: BorrowedFd<'_>, mode: Mode) -> rustix::io::Result<()> {
    if FileType::from_raw_mode(rustix::fs::fstat(pinned)?.st_mode) == FileType::Symlink {
        return Err(Errno::LOOP);
    }
    // Pinned: the magic link names the inode checked above, not a path.
    rustix::fs::chmod(proc_link(pinned).as_str(), mode)
}

/// Sets the permission bits of the entry `name` in `dir` without following it: the
/// entry is pinned ([`pin_in_tree`]) and changed through [`chmod_pinned`], so a symlink
/// swapped in meanwhile is never followed, and nothing is opened for real (which could
/// block on a fifo or wake a device).
pub(crate) fn chmod_nofollow(
    dir: impl AsFd,
    name: &std::ffi::OsStr,
    mode: Mode,
) -> rustix::io::Result<()> {
    let fd = pin_in_tree(dir, Path::new(name))?;
    chmod_pinned(fd.as_fd(), mode)
}

/// A readable descriptor for the directory behind a handle, which may be an `O_PATH` one.
fn reopen_dir(dir: &impl AsFd) -> rustix::io::Result<OwnedFd> {
    // Pinned: `.` is the handle's own directory.
    open_dir_at(dir, Path::new("."))
}

/// The names in a directory, without `.` and `..`. Reading them all up front lets the
/// walk release the listing before descending, so wide trees cost memory, not descriptors.
pub(crate) fn list_names(dir: BorrowedFd<'_>) -> rustix::io::Result<Vec<OsString>> {
    // Pinned: read through `dir` itself, from its start (a descriptor may be read twice),
    // rather than through a reopened `.`, which took three more calls per directory.
    match rustix::fs::seek(dir, rustix::fs::SeekFrom::Start(0)) {
        Ok(_) => {}
        // An O_PATH descriptor cannot be read: its `.` can.
        Err(Errno::BADF) => return list_names_reopened(dir),
        Err(e) => return Err(e),
    }
    let mut buf = Vec::with_capacity(32 << 10);
    let mut listing = rustix::fs::RawDir::new(dir, buf.spare_capacity_mut());
    let mut names = Vec::new();
    while let Some(entry) = listing.next() {
        let entry = match entry {
            Ok(entry) => entry,
            // A directory removed meanwhile has no entries (rustix's `Dir` says so too).
            Err(Errno::NOENT) => break,
            Err(e) => return Err(e),
        };
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsString::from_vec(name.to_vec()));
        }
    }
    Ok(names)
}

/// [`list_names`] through a reopened `.` of `dir`.
fn list_names_reopened(dir: BorrowedFd<'_>) -> rustix::io::Result<Vec<OsString>> {
    // Pinned: rustix reopens `.` of `dir` to read it.
    let mut listing = rustix::fs::Dir::read_from(dir)?;
    let mut names = Vec::new();
    while let Some(entry) = listing.read() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsString::from_vec(name.to_vec()));
        }
    }
    Ok(names)
}

/// Names an entry in error messages: what is being done to the tree and where in it,
/// e.g. `copy "a/b"`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct At<'a> {
    pub(crate) verb: &'static str,
    pub(crate) rel: &'a Path,
}

impl fmt::Display for At<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.rel.as_os_str().is_empty() {
            write!(f, "{} \".\"", self.verb)
        } else {
            write!(f, "{} {:?}", self.verb, self.rel)
        }
    }
}

impl At<'_> {
    /// Turns a failed system call into an internal error naming this entry and `op`.
    pub(crate) fn err(self, op: impl fmt::Display) -> impl FnOnce(Errno) -> Error {
        move |e| Error::from(e).context(format!("{self}: {op}"))
    }

    /// As [`At::err`] for opening an entry with [`open_in_tree`], which refuses a mount.
    pub(crate) fn open_err(self, op: impl fmt::Display) -> impl FnOnce(Errno) -> Error {
        move |e| match e {
            Errno::XDEV => Error::failed_precondition(format!(
                "{self}: {op}: a mount point, which is never crossed"
            )),
            e => self.err(op)(e),
        }
    }
}

/// Whether this process runs in a user namespace other than the initial one: the
/// kernel gives the initial one a fixed inode number (`PROC_USER_INIT_INO`), whatever
/// the uid map of the one we are in says (a container may map the whole range). Read
/// once; without `/proc` nothing says so, and it is taken for the initial one.
pub(crate) fn in_user_namespace() -> bool {
    /// The inode of `/proc/self/ns/user` in the initial user namespace.
    const INITIAL: u64 = 0xEFFF_FFFD;
    static IN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *IN.get_or_init(|| match rustix::fs::stat("/proc/self/ns/user") {
        Ok(st) => st.st_ino != INITIAL,
        Err(_) => false,
    })
}

/// The path of `name` inside the directory at `rel`.
pub(crate) fn child_rel(rel: &Path, name: &OsString) -> PathBuf {
    if rel.as_os_str().is_empty() { PathBuf::from(name) } else { rel.join(name) }
}

/// One open directory of a walk, with the identity it must still have when reopened.
#[derive(Debug)]
pub(crate) struct Handle {
    pub(crate) fd: Option<OwnedFd>,
    pub(crate) dev: u64,
    pub(crate) ino: u64,
}

impl Handle {
    pub(crate) fn new(fd: OwnedFd, meta: &Meta) -> Handle {
        Handle { fd: Some(fd), dev: meta.dev, ino: meta.ino }
    }

    pub(crate) fn fd(&self) -> rustix::io::Result<BorrowedFd<'_>> {
        self.fd.as_ref().map(|fd| fd.as_fd()).ok_or(Errno::BADF)
    }

    /// Reopens this directory as the parent of `child`. Checking device and inode makes
    /// `..` safe: it can only yield the very directory that was open before.
    pub(crate) fn reopen_from(&mut self, child: &Handle, at: At<'_>) -> Result<()> {
        // `..` of the open child, accepted only if it is the very directory closed before.
        let fd = open_dir_at(child.fd().map_err(at.err("reopen parent"))?, Path::new(".."))
            .map_err(at.err("reopen parent"))?;
        let meta = fstat(&fd).map_err(at.err("reopen parent"))?;
        if (meta.dev, meta.ino) != (self.dev, self.ino) {
            return Err(Error::internal(format!(
                "{at}: reopen parent: directory was moved during the walk"
            )));
        }
        self.fd = Some(fd);
        Ok(())
    }
}

/// A level of a walk that can give up its descriptors and get them back from its child.
pub(crate) trait Level {
    fn close(&mut self);
    fn reopen_from(&mut self, child: &Self) -> Result<()>;
}

/// The directories from the root of a walk down to where it is now. Only the deepest
/// [`MAX_OPEN_LEVELS`] hold descriptors.
#[derive(Debug)]
pub(crate) struct Stack<T> {
    levels: Vec<T>,
    /// Levels below this index are closed; those from it on are open.
    first_open: usize,
}

impl<T: Level> Stack<T> {
    pub(crate) fn new(root: T) -> Stack<T> {
        Stack { levels: vec![root], first_open: 0 }
    }

    pub(crate) fn push(&mut self, level: T) {
        self.levels.push(level);
        if self.levels.len() - self.first_open > MAX_OPEN_LEVELS {
            self.levels[self.first_open].close();
            self.first_open += 1;
        }
    }

    /// Removes the deepest level, making sure its parent (now the deepest) is open.
    pub(crate) fn pop(&mut self) -> Result<Option<T>> {
        let Some(child) = self.levels.pop() else { return Ok(None) };
        if let Some(parent) = self.levels.len().checked_sub(1)
            && parent < self.first_open
        {
            self.levels[parent].reopen_from(&child)?;
            self.first_open = parent;
        }
        Ok(Some(child))
    }

    pub(crate) fn top_mut(&mut self) -> Option<&mut T> {
        self.levels.last_mut()
    }
}
