//! Paths inside a layer, resolved by the kernel beneath it.
//!
//! A guest names an entry of a layer with a relative path. The path is checked
//! lexically first (for a clear error), then every directory on the way is opened with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS |
//! RESOLVE_NO_XDEV)` from the layer's descriptor, so the kernel itself refuses to leave
//! the layer, to follow any symlink or to cross into another mount, whatever the guest
//! (or a container writing to the layer) does to the tree meanwhile. The last
//! component is then acted on with `*at` calls that never follow it; where it is opened
//! or pinned, that is `openat2` with the same flags, so a mount on it is refused too.
//!
//! Nothing here can name the layer's own directory entry or anything above it: the
//! layer is a descriptor the host opened, and `.` (the layer's root) is allowed only
//! for operations that change attributes, never for removing or replacing it.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

use crate::error::{Error, ErrorKind, Result};

/// Longest path a guest may give.
const MAX_PATH: usize = 4096;

/// How every directory on the way is resolved.
const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::NO_XDEV);

/// An entry of a layer: the directory holding it, opened beneath the layer, and its
/// name there (`.` with the layer itself as `dir` for the layer's root).
#[derive(Debug)]
pub(crate) struct Entry {
    dir: OwnedFd,
    name: OsString,
}

impl Entry {
    /// Resolves `path` beneath the open layer `layer`. `root_ok` allows `.` (the
    /// layer's root); otherwise naming it is invalid-argument.
    pub(crate) fn resolve(layer: BorrowedFd<'_>, path: &str, root_ok: bool) -> Result<Entry> {
        let parts = components(path)
            .map_err(|why| Error::invalid_argument(format!("path {path:?} {why}")))?;
        let Some((last, dirs)) = parts.split_last() else {
            if !root_ok {
                return Err(Error::invalid_argument(format!(
                    "path {path:?} names the layer's root, which cannot be removed or replaced"
                )));
            }
            let dir = reopen(layer, ".")?;
            return Ok(Entry { dir, name: OsString::from(".") });
        };
        let dir = if dirs.is_empty() {
            reopen(layer, ".")?
        } else {
            let rel: PathBuf = dirs.iter().collect();
            open_dir_beneath(layer, &rel).map_err(|e| classify(e, &format!("open {rel:?}")))?
        };
        Ok(Entry { dir, name: last.to_os_string() })
    }

    /// The directory holding the entry.
    pub(crate) fn dir(&self) -> BorrowedFd<'_> {
        self.dir.as_fd()
    }

    /// The entry's name in it (`.` for the layer's root).
    pub(crate) fn name(&self) -> &OsStr {
        &self.name
    }

    /// Whether this is the layer's root.
    pub(crate) fn is_root(&self) -> bool {
        self.name == "."
    }

    /// Pins the entry with an `O_PATH` descriptor, never following it (a symlink is
    /// pinned as itself), never crossing a mount on it, and opening nothing.
    pub(crate) fn pin(&self) -> Result<OwnedFd> {
        // No-follow and beneath: O_NOFOLLOW with O_PATH returns a final symlink itself.
        let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        rustix::fs::openat2(&self.dir, &self.name, flags, Mode::empty(), RESOLVE)
            .map_err(|e| classify(e, "open"))
    }

    /// Opens the entry as a directory beneath the layer.
    pub(crate) fn open_dir(&self) -> Result<OwnedFd> {
        reopen(self.dir.as_fd(), &self.name)
    }
}

/// Reopens the directory `name` of `dir` readable, never following a symlink and never
/// crossing a mount on it.
fn reopen(dir: BorrowedFd<'_>, name: impl AsRef<Path>) -> Result<OwnedFd> {
    // No-follow and beneath; O_DIRECTORY opens nothing but a directory.
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    rustix::fs::openat2(dir, name.as_ref(), flags, Mode::empty(), RESOLVE)
        .map_err(|e| classify(e, "open"))
}

fn open_dir_beneath(layer: BorrowedFd<'_>, rel: &Path) -> rustix::io::Result<OwnedFd> {
    // Beneath: the kernel refuses any symlink, `..` out or mount on the way.
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    rustix::fs::openat2(layer, rel, flags, Mode::empty(), RESOLVE)
}

/// Checks a layer-relative path without touching the filesystem and returns its normal
/// components (none for `.`), or why it is refused.
pub(crate) fn components(path: &str) -> std::result::Result<Vec<&OsStr>, &'static str> {
    if path.is_empty() {
        return Err("is empty");
    }
    if path.len() > MAX_PATH {
        return Err("is longer than 4096 bytes");
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

/// What the guest asked for that the kernel refused, classified: a missing or wrong
/// entry is the guest's request, a symlink or an escape on the way is refused as such,
/// what the state forbids is a precondition, the rest is the host's trouble.
pub(crate) fn classify(e: Errno, what: &str) -> Error {
    let message = format!("{what}: {}", std::io::Error::from(e));
    let kind = match e {
        Errno::NOENT => ErrorKind::NotFound,
        Errno::EXIST | Errno::NOTEMPTY => ErrorKind::AlreadyExists,
        Errno::LOOP | Errno::XDEV => {
            return Error::invalid_argument(format!(
                "{what}: a symlink or a mount on the way, which is never followed"
            ));
        }
        Errno::INVAL
        | Errno::NOTDIR
        | Errno::ISDIR
        | Errno::NAMETOOLONG
        | Errno::RANGE
        | Errno::TOOBIG => ErrorKind::InvalidArgument,
        Errno::PERM
        | Errno::ACCESS
        | Errno::NOTSUP
        | Errno::ROFS
        | Errno::NOSPC
        | Errno::DQUOT
        | Errno::MLINK
        | Errno::FBIG => ErrorKind::FailedPrecondition,
        _ => ErrorKind::Internal,
    };
    Error::new(kind, message)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use rustix::fs::FileType;

    use super::*;

    fn layer() -> (tempfile::TempDir, OwnedFd) {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        std::fs::create_dir_all(dir.path().join("layer/a/b")).unwrap();
        let fd = rustix::fs::open(
            dir.path().join("layer"),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .unwrap();
        (dir, fd)
    }

    #[test]
    fn lexical_refusals_say_why() {
        for (p, why) in [
            ("", "is empty"),
            ("/etc", "is absolute"),
            ("a/../../x", "contains \"..\""),
            ("a\0b", "contains a NUL byte"),
        ] {
            assert_eq!(components(p).unwrap_err(), why, "{p:?}");
        }
        assert_eq!(components("./a//b/.").unwrap(), ["a", "b"]);
        assert!(components(".").unwrap().is_empty());
    }

    #[test]
    fn no_symlink_on_the_way_is_followed_even_inside_the_layer() {
        let (dir, fd) = layer();
        symlink("a", dir.path().join("layer/in")).unwrap();
        symlink("/etc", dir.path().join("layer/out")).unwrap();
        symlink("../..", dir.path().join("layer/a/up")).unwrap();
        for p in ["in/b/x", "out/passwd", "a/up/x"] {
            let e = Entry::resolve(fd.as_fd(), p, false).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{p}: {e}");
        }
        // The last component is not followed: it is returned as itself.
        let e = Entry::resolve(fd.as_fd(), "out", false).unwrap();
        assert_eq!(e.name(), "out");
        let st = rustix::fs::fstat(e.pin().unwrap()).unwrap();
        assert_eq!(FileType::from_raw_mode(st.st_mode), FileType::Symlink);
        assert!(Entry::resolve(fd.as_fd(), "a/b/new", false).is_ok());
        assert!(Entry::resolve(fd.as_fd(), ".", true).unwrap().is_root());
        assert_eq!(
            Entry::resolve(fd.as_fd(), ".", false).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
    }
}
