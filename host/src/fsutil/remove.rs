//! Removing a tree: never following symlinks, never recursing on the call stack.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, OFlags};
use rustix::io::Errno;

use super::{
    At, Handle, Level, Meta, Stack, child_rel, chmod_pinned, fstat, list_names, lstat_at,
    open_in_tree,
};
use crate::error::{Error, Result};

/// Removes the entry `name` of `parent` and, if it is a directory, everything below it.
/// Symlinks are removed, not followed. Directories that deny their owner write or search
/// permission (trees copied from read-only images) are opened up first, so removal works
/// without root as long as the caller owns them.
///
/// `name` must be a single path component. A missing `name` is [`Error::NotFound`];
/// entries vanishing during the walk are not errors. A mount point in the tree is an
/// error: nothing of the mounted filesystem is touched.
pub fn remove_tree(parent: &cap_std::fs::Dir, name: impl AsRef<Path>) -> Result<()> {
    let name = name.as_ref();
    let mut parts = name.components();
    let (Some(Component::Normal(single)), None) = (parts.next(), parts.next()) else {
        return Err(Error::invalid_argument(format!(
            "remove {name:?}: not a single path component"
        )));
    };
    let at = At { verb: "remove", rel: name };
    // No-follow: `name` is one component of the pinned `parent`.
    let meta = match lstat_at(parent, name) {
        Ok(meta) => meta,
        Err(Errno::NOENT) => return Err(Error::not_found(at.to_string())),
        Err(e) => return Err(at.err("lstat")(e)),
    };
    if meta.file_type() != FileType::Directory {
        // No-follow: unlinkat removes the name itself, never what a symlink points to.
        return rustix::fs::unlinkat(parent, name, AtFlags::empty()).map_err(at.err("unlink"));
    }
    let Some(top) = Removal::open(parent.as_fd(), single, name.to_path_buf(), &meta)? else {
        return Err(Error::not_found(at.to_string()));
    };
    let mut stack = Stack::new(top);
    while let Some(level) = stack.top_mut() {
        super::deadline::check("remove")?;
        if let Some(child) = level.names.next() {
            let rel = child_rel(&level.rel, &child);
            let at = At { verb: "remove", rel: &rel };
            let dir = level.dir.fd().map_err(at.err("directory"))?;
            // No-follow: `child` is from the listing of the pinned `dir`.
            let meta = match lstat_at(dir, Path::new(&child)) {
                Ok(meta) => meta,
                Err(Errno::NOENT) => continue,
                Err(e) => return Err(at.err("lstat")(e)),
            };
            if meta.file_type() == FileType::Directory {
                if let Some(next) = Removal::open(dir, &child, rel.clone(), &meta)? {
                    stack.push(next);
                }
                continue;
            }
            // No-follow: unlinkat removes the name itself (EISDIR if a directory came).
            match rustix::fs::unlinkat(dir, child.as_os_str(), AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(e) => return Err(at.err("unlink")(e)),
            }
        } else if let Some(done) = stack.pop()? {
            let dir = match stack.top_mut() {
                Some(up) => up.dir.fd().map_err(done.at().err("parent directory"))?,
                None => parent.as_fd(),
            };
            // Pinned parent, no-follow: rmdir removes only an empty directory by that name.
            match rustix::fs::unlinkat(dir, done.name.as_os_str(), AtFlags::REMOVEDIR) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(e) => return Err(done.at().err("rmdir")(e)),
            }
        }
    }
    Ok(())
}

/// A directory being emptied.
#[derive(Debug)]
struct Removal {
    rel: PathBuf,
    name: OsString,
    dir: Handle,
    names: std::vec::IntoIter<OsString>,
}

impl Removal {
    /// Opens the directory `name` of `dir` and lists it; `None` if it is gone.
    fn open(
        dir: BorrowedFd<'_>,
        name: &OsStr,
        rel: PathBuf,
        meta: &Meta,
    ) -> Result<Option<Removal>> {
        let at = At { verb: "remove", rel: &rel };
        if meta.mode & 0o700 != 0o700 {
            open_up(dir, name, meta, at)?;
        }
        // In tree: no symlink followed, no mount crossed; then checked against the lstat.
        let fd = match open_in_tree(dir, Path::new(name), OFlags::RDONLY | OFlags::DIRECTORY) {
            Ok(fd) => fd,
            Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => return Ok(None),
            Err(e) => return Err(at.open_err("open")(e)),
        };
        let opened = fstat(&fd).map_err(at.err("stat"))?;
        if opened.id() != meta.id() {
            return Err(Error::internal(format!("{at}: directory was replaced during removal")));
        }
        let names = list_names(fd.as_fd()).map_err(at.err("read directory"))?;
        Ok(Some(Removal {
            name: name.to_os_string(),
            dir: Handle::new(fd, &opened),
            names: names.into_iter(),
            rel,
        }))
    }

    fn at(&self) -> At<'_> {
        At { verb: "remove", rel: &self.rel }
    }
}

impl Level for Removal {
    fn close(&mut self) {
        self.dir.fd = None;
    }

    fn reopen_from(&mut self, child: &Removal) -> Result<()> {
        self.dir.reopen_from(&child.dir, child.at())
    }
}

/// Gives the owner read, write and search permission on a directory about to be emptied.
/// An `O_PATH` descriptor needs no permission on the directory itself, and `chmod` through
/// its `/proc/self/fd` link changes exactly that inode, whatever happens to `name`.
fn open_up(dir: BorrowedFd<'_>, name: &OsStr, meta: &Meta, at: At<'_>) -> Result<()> {
    // Pinned in tree: no symlink followed, no mount crossed (a mounted directory's mode is
    // never changed), and the inode checked against the lstat before its mode changes.
    let fd = match open_in_tree(dir, Path::new(name), OFlags::PATH | OFlags::DIRECTORY) {
        Ok(fd) => fd,
        Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => return Ok(()),
        Err(e) => return Err(at.open_err("open")(e)),
    };
    if fstat(&fd).map_err(at.err("stat"))?.id() != meta.id() {
        return Err(Error::internal(format!("{at}: directory was replaced during removal")));
    }
    chmod_pinned(fd.as_fd(), meta.perms() | rustix::fs::Mode::RWXU).map_err(at.err("chmod"))
}
