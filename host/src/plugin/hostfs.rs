//! The file operations of the WIT `host` interface (all but `log`), confined to a
//! plugin's root directory.
//!
//! Every path is a string relative to the root. It is checked lexically first (not
//! empty, not absolute, no `..`, no NUL byte), then split into a directory part and a
//! final component. The directory part is opened with cap-std, which follows symlinks
//! only while they stay beneath the root and refuses any that lead out. The final
//! component is acted on with `*at` system calls that never follow it: a symlink there
//! is changed itself (`chown`, xattrs), removed itself (`remove_tree`), counted itself
//! (`disk_usage`), or refused (`chmod`, `copy_tree`).
//!
//! The root itself (`.`) may be named only where that reads and never writes:
//! `disk_usage`, `get_xattr` and `list_xattrs`. The root belongs to the host, which
//! created it; a plugin changes what is below it, not the directory itself.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use cap_std::fs::Dir;
use rustix::fs::{AtFlags, FileType, Gid, Mode, OFlags, Stat, Uid};
use rustix::io::Errno;

use crate::error::{Error, Result};
use crate::fsutil;
use crate::fsutil::xattr::Node;
use crate::snapshot::Usage;

#[cfg(test)]
mod tests;

/// How many directories `copy_tree` climbs looking for the source above the
/// destination before it gives up; far deeper than any real tree.
const MAX_ANCESTORS: usize = 4096;

/// Copies the directory tree at `src` to `dst`, which must not exist, keeping all the
/// metadata [`fsutil::copy_tree`] keeps. `src` must be a directory (a symlink there is
/// refused, not followed) and `dst` must not lie inside it. On failure the partial copy
/// is removed, so the call can be retried.
pub fn copy_tree(root: &Dir, src: &str, dst: &str) -> Result<()> {
    let ctx = format!("copy {src:?} to {dst:?}");
    let from = Target::open(root, src, false, &ctx)?;
    let src_fd = from.open_dir_nofollow(root, &format!("{ctx}: source"))?;
    let to = Target::open(root, dst, false, &ctx)?;
    let src_id = id(&fstat(&src_fd, &ctx)?);
    if is_below(to.dir(root), src_id, id(&fstat(root, &ctx)?), &ctx)? {
        return Err(Error::invalid_argument(format!(
            "{ctx}: the destination is inside the source"
        )));
    }
    let (parent, name) = (to.dir(root), to.name()?);
    // Owner-only until the copy applies the source's mode at the very end.
    rustix::fs::mkdirat(parent, name, Mode::RWXU).map_err(|e| match e {
        Errno::EXIST => Error::already_exists(format!("{ctx}: destination")),
        e => sys(&format!("{ctx}: create destination"), e),
    })?;
    let copied = to
        .open_dir_nofollow(root, &format!("{ctx}: destination"))
        .and_then(|dst_fd| fsutil::copy_tree(&Dir::from(src_fd), &Dir::from(dst_fd)))
        .map_err(|e| e.context(&ctx));
    if copied.is_err() {
        // Best effort: the error that matters is the copy's, and a leftover destination
        // only makes a retry fail with already-exists.
        let _ = fsutil::remove_tree(to.parent_dir(root), name);
    }
    copied
}

/// Removes `path` and everything below it; a symlink is removed, not followed. Succeeds
/// if `path` (or a directory above it) does not exist.
pub fn remove_tree(root: &Dir, path: &str) -> Result<()> {
    let ctx = format!("remove {path:?}");
    let target = match Target::open(root, path, false, &ctx) {
        Ok(target) => target,
        Err(e) if e.is_not_found() => return Ok(()),
        Err(e) => return Err(e),
    };
    match fsutil::remove_tree(target.parent_dir(root), target.name()?) {
        Err(e) if e.is_not_found() => Ok(()),
        other => other.map_err(|e| e.context(&ctx)),
    }
}

/// Disk space used by the tree at `path` (`.` for the whole root), counting each inode
/// once. Anything but a directory, a symlink included, counts as itself alone.
pub fn disk_usage(root: &Dir, path: &str) -> Result<Usage> {
    let ctx = format!("disk usage of {path:?}");
    let target = Target::open(root, path, true, &ctx)?;
    let Some(name) = target.name.as_deref() else {
        return fsutil::disk_usage(root).map_err(|e| e.context(&ctx));
    };
    let st = lstat(target.dir(root), name, &ctx)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        return Ok(Usage { size: allocated(&st), inodes: 1 });
    }
    let fd = target.open_dir_nofollow(root, &ctx)?;
    fsutil::disk_usage(&Dir::from(fd)).map_err(|e| e.context(&ctx))
}

/// Changes the owner of `path` itself; a symlink is changed, not followed.
pub fn chown(root: &Dir, path: &str, uid: u32, gid: u32) -> Result<()> {
    let ctx = format!("chown {path:?} to {uid}:{gid}");
    let target = Target::open(root, path, false, &ctx)?;
    let (uid, gid) = (Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)));
    rustix::fs::chownat(target.dir(root), target.name()?, uid, gid, AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|e| sys(&ctx, e))
}

/// Sets the permission bits of `path`, setuid, setgid and sticky included. Any other bit
/// in `mode` is refused, and so is a symlink, which has no mode of its own on Linux.
pub fn chmod(root: &Dir, path: &str, mode: u32) -> Result<()> {
    let ctx = format!("chmod {path:?} to {mode:#o}");
    if mode & !0o7777 != 0 {
        return Err(Error::invalid_argument(format!("{ctx}: only permission bits may be set")));
    }
    let target = Target::open(root, path, false, &ctx)?;
    // An O_PATH descriptor pins the inode without following a final symlink, so the
    // check below and the chmod act on the same entry even if `path` is swapped between.
    let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = rustix::fs::openat(target.dir(root), target.name()?, flags, Mode::empty())
        .map_err(|e| sys(&ctx, e))?;
    if FileType::from_raw_mode(fstat(&fd, &ctx)?.st_mode) == FileType::Symlink {
        return Err(Error::invalid_argument(format!("{ctx}: is a symlink, which has no mode")));
    }
    // `fchmod` does not take O_PATH descriptors; their /proc link names exactly the inode.
    let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
    rustix::fs::chmod(link.as_str(), Mode::from_raw_mode(mode)).map_err(|e| sys(&ctx, e))
}

/// Sets the extended attribute `name` of `path`; a symlink is not followed.
pub fn set_xattr(root: &Dir, path: &str, name: &str, value: &[u8]) -> Result<()> {
    let ctx = format!("set xattr {name:?} of {path:?}");
    let attr = xattr_name(name, &ctx)?;
    let target = Target::open(root, path, false, &ctx)?;
    target.node(root).set(attr, value).map_err(|e| sys(&ctx, e))
}

/// The value of the extended attribute `name` of `path` (`.` for the root), or `None` if
/// it is not set or the filesystem has no extended attributes.
pub fn get_xattr(root: &Dir, path: &str, name: &str) -> Result<Option<Vec<u8>>> {
    let ctx = format!("get xattr {name:?} of {path:?}");
    let attr = xattr_name(name, &ctx)?;
    let target = Target::open(root, path, true, &ctx)?;
    match target.node(root).get(attr) {
        Ok(value) => Ok(Some(value)),
        Err(Errno::NODATA | Errno::NOTSUP) => Ok(None),
        Err(e) => Err(sys(&ctx, e)),
    }
}

/// The names of the extended attributes of `path` (`.` for the root) that the host can
/// see, in the order the filesystem lists them.
pub fn list_xattrs(root: &Dir, path: &str) -> Result<Vec<String>> {
    let ctx = format!("list xattrs of {path:?}");
    let target = Target::open(root, path, true, &ctx)?;
    let names = match target.node(root).list() {
        Ok(names) => names,
        Err(Errno::NOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(sys(&ctx, e)),
    };
    names
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| {
            String::from_utf8(n.to_vec()).map_err(|_| {
                Error::internal(format!("{ctx}: name {:?} is not UTF-8", OsStr::from_bytes(n)))
            })
        })
        .collect()
}

/// Removes the extended attribute `name` of `path`; succeeds if it is not set.
pub fn remove_xattr(root: &Dir, path: &str, name: &str) -> Result<()> {
    let ctx = format!("remove xattr {name:?} of {path:?}");
    let attr = xattr_name(name, &ctx)?;
    let target = Target::open(root, path, false, &ctx)?;
    match target.node(root).remove(attr) {
        Ok(()) | Err(Errno::NODATA) => Ok(()),
        Err(e) => Err(sys(&ctx, e)),
    }
}

/// Creates an overlayfs whiteout at `path`: a character device 0:0 with mode 0, as
/// containerd makes them. An existing entry (a symlink included) is already-exists.
pub fn make_whiteout(root: &Dir, path: &str) -> Result<()> {
    let ctx = format!("make whiteout {path:?}");
    let target = Target::open(root, path, false, &ctx)?;
    let dev = rustix::fs::makedev(0, 0);
    rustix::fs::mknodat(
        target.dir(root),
        target.name()?,
        FileType::CharacterDevice,
        Mode::empty(),
        dev,
    )
    .map_err(|e| sys(&ctx, e))
}

/// Checks a root-relative path without touching the filesystem and returns its normal
/// components (none for `.`), or why it is refused. Shared with the mount resolution.
pub(super) fn components(path: &str) -> std::result::Result<Vec<&OsStr>, &'static str> {
    if path.is_empty() {
        return Err("is empty");
    }
    if path.contains('\0') {
        return Err("contains a NUL byte");
    }
    Path::new(path)
        .components()
        .filter(|c| *c != Component::CurDir)
        .map(|c| match c {
            Component::Normal(part) => Ok(part),
            Component::ParentDir => Err("contains \"..\""),
            Component::RootDir | Component::Prefix(_) | Component::CurDir => Err("is absolute"),
        })
        .collect()
}

/// A checked path: the directory holding its final component, opened beneath the root,
/// and that component.
#[derive(Debug)]
struct Target {
    /// `None` when the final component is directly in the root.
    parent: Option<Dir>,
    /// `None` when the path names the root itself.
    name: Option<OsString>,
}

impl Target {
    /// Checks `path` and opens its directory part. `root_ok` allows `.`.
    fn open(root: &Dir, path: &str, root_ok: bool, ctx: &str) -> Result<Target> {
        let parts = components(path)
            .map_err(|why| Error::invalid_argument(format!("{ctx}: path {path:?} {why}")))?;
        let Some((last, dirs)) = parts.split_last() else {
            if root_ok {
                return Ok(Target { parent: None, name: None });
            }
            return Err(Error::invalid_argument(format!(
                "{ctx}: path {path:?} names the plugin root itself"
            )));
        };
        let name = Some(last.to_os_string());
        if dirs.is_empty() {
            return Ok(Target { parent: None, name });
        }
        let dir: PathBuf = dirs.iter().collect();
        let parent = root.open_dir(&dir).map_err(|e| open_error(ctx, &dir, &e))?;
        Ok(Target { parent: Some(parent), name })
    }

    /// The directory the final component is in (the root for `.`).
    fn dir<'a>(&'a self, root: &'a Dir) -> BorrowedFd<'a> {
        self.parent_dir(root).as_fd()
    }

    /// The same directory as a `Dir`, for the `fsutil` walks.
    fn parent_dir<'a>(&'a self, root: &'a Dir) -> &'a Dir {
        self.parent.as_ref().unwrap_or(root)
    }

    /// The final component; only the operations that allow `.` can lack one, and they
    /// check before asking.
    fn name(&self) -> Result<&OsStr> {
        self.name
            .as_deref()
            .ok_or_else(|| Error::internal("a path to the plugin root got past the check"))
    }

    /// Where the attributes of the target are read and written, never through a final
    /// symlink.
    fn node<'a>(&'a self, root: &'a Dir) -> Node<'a> {
        Node::Entry(self.dir(root), self.name.as_deref().unwrap_or(OsStr::new(".")))
    }

    /// Opens the final component as a readable directory, refusing a symlink.
    fn open_dir_nofollow(&self, root: &Dir, ctx: &str) -> Result<OwnedFd> {
        let (dir, name) = (self.dir(root), self.name()?);
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        match rustix::fs::openat(dir, name, flags, Mode::empty()) {
            Ok(fd) => Ok(fd),
            Err(e @ (Errno::NOTDIR | Errno::LOOP)) => {
                let what = match FileType::from_raw_mode(lstat(dir, name, ctx)?.st_mode) {
                    FileType::Symlink => "is a symlink, which is not followed",
                    FileType::Directory => return Err(sys(ctx, e)),
                    _ => "is not a directory",
                };
                Err(Error::invalid_argument(format!("{ctx}: {what}")))
            }
            Err(e) => Err(sys(ctx, e)),
        }
    }
}

/// Refuses xattr names the kernel would misread; the kernel checks the rest (namespace,
/// length) and its refusals come back as invalid-argument or failed-precondition.
fn xattr_name<'a>(name: &'a str, ctx: &str) -> Result<&'a OsStr> {
    if name.is_empty() || name.contains('\0') {
        return Err(Error::invalid_argument(format!("{ctx}: not a valid attribute name")));
    }
    Ok(OsStr::new(name))
}

/// Is the directory `dir`, or one above it, the directory `ancestor`? The climb stops at
/// the directory `stop` (the root), or at the top of the filesystem.
fn is_below(
    dir: BorrowedFd<'_>,
    ancestor: (u64, u64),
    stop: (u64, u64),
    ctx: &str,
) -> Result<bool> {
    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let climb = |from: BorrowedFd<'_>, name: &str| {
        rustix::fs::openat(from, name, flags, Mode::empty())
            .map_err(|e| sys(&format!("{ctx}: look above the destination"), e))
    };
    let mut current = climb(dir, ".")?;
    for _ in 0..MAX_ANCESTORS {
        let here = id(&fstat(&current, ctx)?);
        if here == ancestor {
            return Ok(true);
        }
        if here == stop {
            return Ok(false);
        }
        let up = climb(current.as_fd(), "..")?;
        if id(&fstat(&up, ctx)?) == here {
            return Ok(false);
        }
        current = up;
    }
    Err(Error::internal(format!("{ctx}: the destination is more than {MAX_ANCESTORS} levels deep")))
}

/// Device and inode: what makes two directory handles the same directory.
// The widths of `stat` fields differ between architectures.
#[allow(clippy::unnecessary_cast)]
fn id(st: &Stat) -> (u64, u64) {
    (st.st_dev as u64, st.st_ino as u64)
}

/// Bytes allocated to an inode, as `du` counts them.
// `st_blocks` is `u64` on some architectures and `i64` on others.
#[allow(clippy::unnecessary_cast)]
fn allocated(st: &Stat) -> u64 {
    (st.st_blocks as u64).saturating_mul(512)
}

fn fstat(fd: impl AsFd, ctx: &str) -> Result<Stat> {
    rustix::fs::fstat(fd).map_err(|e| sys(&format!("{ctx}: stat"), e))
}

fn lstat(dir: BorrowedFd<'_>, name: &OsStr, ctx: &str) -> Result<Stat> {
    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| sys(ctx, e))
}

/// Classifies a failed system call: what names a missing or wrong entry is the plugin's
/// request, what the kernel refuses in the current state is a precondition, and the
/// rest is the host's trouble.
fn sys(ctx: &str, e: Errno) -> Error {
    let message = format!("{ctx}: {}", io::Error::from(e));
    match e {
        Errno::NOENT => Error::not_found(message),
        Errno::EXIST | Errno::NOTEMPTY => Error::already_exists(message),
        Errno::INVAL
        | Errno::NOTDIR
        | Errno::LOOP
        | Errno::NAMETOOLONG
        | Errno::RANGE
        | Errno::TOOBIG => Error::invalid_argument(message),
        Errno::PERM
        | Errno::ACCESS
        | Errno::NOTSUP
        | Errno::ROFS
        | Errno::NOSPC
        | Errno::DQUOT
        | Errno::MLINK => Error::failed_precondition(message),
        _ => Error::internal(message),
    }
}

/// Classifies a failure of cap-std to open the directory part of a path. cap-std reports
/// a path that would leave the root as `PermissionDenied` without an OS error code.
fn open_error(ctx: &str, dir: &Path, e: &io::Error) -> Error {
    match (e.kind(), e.raw_os_error()) {
        (io::ErrorKind::PermissionDenied, None) => {
            Error::invalid_argument(format!("{ctx}: {dir:?} leads outside the plugin root"))
        }
        (_, Some(code)) => sys(&format!("{ctx}: open {dir:?}"), Errno::from_raw_os_error(code)),
        (io::ErrorKind::NotFound, None) => Error::not_found(format!("{ctx}: open {dir:?}: {e}")),
        _ => Error::internal(format!("{ctx}: open {dir:?}: {e}")),
    }
}
