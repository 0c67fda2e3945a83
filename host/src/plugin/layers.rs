//! The `layers` interface: what a backend guest may do to the layers it holds. Making,
//! cloning, removing and measuring them is [`Space`](super::space::Space)'s; this is
//! their contents, each path resolved by [`beneath`](super::beneath).
//!
//! Every operation here acts on the entry the path names and never through it:
//! - a symlink anywhere on the way is refused by the kernel, and the last component is
//!   never followed (it is changed itself, removed itself, or refused);
//! - an entry with other hard links is never changed through this name: the other name
//!   may lie outside the layer (a container can link any file it sees), and changing the
//!   inode would change it there too;
//! - a file is written by creating a new one and renaming it over the old name, so no
//!   write ever lands in an inode that was there before;
//! - an entry is opened for reading only through an `O_PATH` pin that showed it is a
//!   regular file or a directory, so no device or fifo is ever opened;
//! - the layer's root may be listed, have its mode, owner and xattrs changed, never be
//!   removed or replaced.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};

use rustix::fs::{AtFlags, FileType, Gid, Mode, OFlags, Uid};
use rustix::io::Errno;

use super::beneath::{Entry, classify};
use crate::error::{Context, Error, Result};
use crate::fsutil;
use crate::fsutil::xattr::Node;

/// Largest file `read-file` returns and `write-file` takes.
pub(crate) const MAX_FILE: usize = 1 << 20;
/// Most names `read-dir` returns.
const MAX_NAMES: usize = 65_536;

fn perms(mode: u32, what: &str) -> Result<Mode> {
    if mode & !0o7777 != 0 {
        return Err(Error::invalid_argument(format!(
            "{what}: mode {mode:#o} has more than permission bits"
        )));
    }
    Ok(Mode::from_raw_mode(mode))
}

/// Checks that the pinned entry `pinned` (named `e`) is the layer's own before it is
/// changed in place, and returns its type.
///
/// A file with another hard link may have that link outside the layer (whoever made the
/// link could see both), and changing the inode would change it there too. So a
/// non-directory must have exactly one link, and the name must still lead to the pinned
/// inode, with one link, when looked up again after that: an inode whose outside name
/// was removed between the pin and the first check is caught by the second. Directories
/// cannot be hard-linked. Either way the entry must be on the layer's filesystem (not a
/// mount someone made on it).
fn sole(e: &Entry, pinned: &OwnedFd, layer: &OwnedFd, what: &str) -> Result<FileType> {
    // Pinned: both fstats act on descriptors.
    let layer_dev = rustix::fs::fstat(layer).map_err(|err| classify(err, what))?.st_dev;
    let st = rustix::fs::fstat(pinned).map_err(|err| classify(err, what))?;
    let kind = FileType::from_raw_mode(st.st_mode);
    if st.st_dev != layer_dev {
        return Err(Error::invalid_argument(format!("{what}: a mount, not part of the layer")));
    }
    if kind == FileType::Directory {
        return Ok(kind);
    }
    let refuse = |links: u64| {
        Err(Error::failed_precondition(format!(
            "{what}: it has {links} hard links, and is not changed through one of them"
        )))
    };
    // `st_nlink`'s width differs between architectures.
    #[allow(clippy::unnecessary_cast)]
    if st.st_nlink as u64 != 1 {
        return refuse(st.st_nlink as u64);
    }
    // No-follow: the name again, in the directory resolved beneath the layer.
    let again = rustix::fs::statat(e.dir(), e.name(), AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|err| classify(err, what))?;
    if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino) {
        return Err(Error::failed_precondition(format!("{what}: it was replaced meanwhile")));
    }
    #[allow(clippy::unnecessary_cast)]
    if again.st_nlink as u64 != 1 {
        return refuse(again.st_nlink as u64);
    }
    Ok(kind)
}

/// The names in the directory `path` of the layer, sorted.
pub(crate) fn read_dir(layer: &OwnedFd, path: &str) -> Result<Vec<String>> {
    let what = format!("read directory {path:?}");
    // Beneath, no-follow, no mount; the listing reads this descriptor.
    let dir = Entry::resolve(layer.as_fd(), path, true)?.open_dir().context(&what)?;
    let mut listing = rustix::fs::Dir::read_from(&dir).map_err(|e| classify(e, &what))?;
    let mut names = Vec::new();
    while let Some(entry) = listing.read() {
        let entry = entry.map_err(|e| classify(e, &what))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "." || name == ".." {
            continue;
        }
        if names.len() == MAX_NAMES {
            return Err(Error::failed_precondition(format!(
                "{what}: more than {MAX_NAMES} entries"
            )));
        }
        names.push(name);
    }
    names.sort_unstable();
    Ok(names)
}

/// The contents of the regular file `path`.
pub(crate) fn read_file(layer: &OwnedFd, path: &str) -> Result<Vec<u8>> {
    let what = format!("read {path:?}");
    let e = Entry::resolve(layer.as_fd(), path, false)?;
    // Pinned first, opened after: a fifo or device (which a container may make and swap
    // in) is refused here, never opened, so it neither hangs the call nor wakes a driver.
    let pinned = e.pin().context(&what)?;
    let st = rustix::fs::fstat(&pinned).map_err(|e| classify(e, &what))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err(Error::invalid_argument(format!("{what}: not a regular file")));
    }
    if st.st_size as u64 > MAX_FILE as u64 {
        return Err(Error::invalid_argument(format!("{what}: larger than {MAX_FILE} bytes")));
    }
    let fd = fsutil::open_pinned(pinned.as_fd()).map_err(|e| classify(e, &what))?;
    let mut out = Vec::new();
    std::fs::File::from(fd).take(MAX_FILE as u64 + 1).read_to_end(&mut out).context(&what)?;
    if out.len() > MAX_FILE {
        return Err(Error::invalid_argument(format!("{what}: larger than {MAX_FILE} bytes")));
    }
    Ok(out)
}

/// Writes the regular file `path`: a new file, renamed over the old name.
pub(crate) fn write_file(layer: &OwnedFd, path: &str, contents: &[u8], mode: u32) -> Result<()> {
    let what = format!("write {path:?}");
    if contents.len() > MAX_FILE {
        return Err(Error::invalid_argument(format!("{what}: larger than {MAX_FILE} bytes")));
    }
    let mode = perms(mode, &what)?;
    let e = Entry::resolve(layer.as_fd(), path, false)?;
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let tmp = format!(
        ".wasnap-write-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    // No-follow: O_CREAT | O_EXCL never follows, and makes a new inode written by fd.
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = rustix::fs::openat(e.dir(), tmp.as_str(), flags, Mode::RUSR | Mode::WUSR)
        .map_err(|err| classify(err, &what))?;
    let written = (|| {
        let mut f = std::fs::File::from(fd);
        f.write_all(contents).context(&what)?;
        rustix::fs::fchmod(&f, mode).map_err(|err| classify(err, &what))?;
        // No-follow: rename moves names, never what a symlink points to; whatever sits at
        // `tmp` now only gets another name in the same directory.
        rustix::fs::renameat(e.dir(), tmp.as_str(), e.dir(), e.name())
            .map_err(|err| classify(err, &what))
    })();
    if written.is_err() {
        // No-follow: unlinkat removes the name itself.
        let _ = rustix::fs::unlinkat(e.dir(), tmp.as_str(), AtFlags::empty());
    }
    written
}

/// Makes the directory `path` with `mode`.
pub(crate) fn make_dir(layer: &OwnedFd, path: &str, mode: u32) -> Result<()> {
    let what = format!("make directory {path:?}");
    let mode = perms(mode, &what)?;
    let e = Entry::resolve(layer.as_fd(), path, false)?;
    // No-follow: mkdirat creates, never follows (EEXIST).
    rustix::fs::mkdirat(e.dir(), e.name(), Mode::RWXU).map_err(|err| classify(err, &what))?;
    // The mode asked for, whatever the umask, set on the directory opened (beneath, no
    // symlink, no mount) by that name: if it was swapped meanwhile, the change lands on
    // another directory of this layer, which has no name outside it.
    let fd = e.open_dir().context(&what)?;
    rustix::fs::fchmod(&fd, mode).map_err(|err| classify(err, &what))
}

/// Makes `path` a symlink to `target`.
pub(crate) fn symlink(layer: &OwnedFd, path: &str, target: &str) -> Result<()> {
    let what = format!("symlink {path:?}");
    if target.is_empty() || target.len() > 4096 || target.contains('\0') {
        return Err(Error::invalid_argument(format!("{what}: not a valid target")));
    }
    let e = Entry::resolve(layer.as_fd(), path, false)?;
    // No-follow: symlinkat creates, never follows (EEXIST).
    rustix::fs::symlinkat(target, e.dir(), e.name()).map_err(|err| classify(err, &what))
}

/// Removes `path` (a tree, if it is a directory); gone already is fine.
pub(crate) fn remove_entry(layer: &OwnedFd, path: &str) -> Result<()> {
    let what = format!("remove {path:?}");
    let e = match Entry::resolve(layer.as_fd(), path, false) {
        Err(err) if err.is_not_found() => return Ok(()),
        other => other?,
    };
    // Pinned: remove_tree works below this directory, never following or crossing a mount.
    let dir = cap_std::fs::Dir::from_std_file(std::fs::File::from(
        rustix::io::dup(e.dir()).map_err(|err| classify(err, &what))?,
    ));
    match fsutil::remove_tree(&dir, e.name()) {
        Err(err) if err.is_not_found() => Ok(()),
        other => other.map_err(|err| err.context(&what)),
    }
}

/// Sets the permission bits of `path`.
pub(crate) fn set_mode(layer: &OwnedFd, path: &str, mode: u32) -> Result<()> {
    let what = format!("set the mode of {path:?}");
    let mode = perms(mode, &what)?;
    let e = Entry::resolve(layer.as_fd(), path, true)?;
    let pinned = e.pin()?;
    if sole(&e, &pinned, layer, &what)? == FileType::Symlink {
        return Err(Error::invalid_argument(format!("{what}: a symlink has no mode")));
    }
    // Pinned: `fchmod` does not take O_PATH descriptors; their /proc link names exactly
    // the pinned inode.
    fsutil::chmod_pinned(pinned.as_fd(), mode).map_err(|err| classify(err, &what))
}

/// Changes the owner of `path` itself.
pub(crate) fn set_owner(layer: &OwnedFd, path: &str, uid: u32, gid: u32) -> Result<()> {
    let what = format!("set the owner of {path:?}");
    let e = Entry::resolve(layer.as_fd(), path, true)?;
    let pinned = e.pin()?;
    sole(&e, &pinned, layer, &what)?;
    // Pinned: AT_EMPTY_PATH on the pinned descriptor, the very inode checked (a symlink
    // itself), never followed.
    rustix::fs::chownat(
        &pinned,
        "",
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(gid)),
        AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|err| classify(err, &what))
}

/// Sets the extended attribute `name` of `path`.
pub(crate) fn set_xattr(layer: &OwnedFd, path: &str, name: &str, value: &[u8]) -> Result<()> {
    let what = format!("set xattr {name:?} of {path:?}");
    if name.is_empty() || name.contains('\0') || value.len() > 64 * 1024 {
        return Err(Error::invalid_argument(format!("{what}: not a valid attribute")));
    }
    let e = Entry::resolve(layer.as_fd(), path, true)?;
    let pinned = e.pin()?;
    let kind = sole(&e, &pinned, layer, &what)?;
    if !matches!(kind, FileType::RegularFile | FileType::Directory) {
        return Err(Error::invalid_argument(format!(
            "{what}: xattrs are set on files and directories only"
        )));
    }
    // Pinned: reopened through the pinned descriptor's /proc link, the very inode checked.
    let fd = fsutil::open_pinned(pinned.as_fd()).map_err(|err| classify(err, &what))?;
    Node::Open(fd.as_fd())
        .set(std::ffi::OsStr::new(name), value)
        .map_err(|err| classify(err, &what))
}

/// The value of the extended attribute `name` of `path`, if set.
pub(crate) fn get_xattr(layer: &OwnedFd, path: &str, name: &str) -> Result<Option<Vec<u8>>> {
    let what = format!("get xattr {name:?} of {path:?}");
    if name.is_empty() || name.contains('\0') {
        return Err(Error::invalid_argument(format!("{what}: not a valid attribute name")));
    }
    let e = Entry::resolve(layer.as_fd(), path, true)?;
    // Pinned (the root) or no-follow (lgetxattr on the name); only a read.
    match node(&e, layer).get(std::ffi::OsStr::new(name)) {
        Ok(v) => Ok(Some(v)),
        Err(Errno::NODATA | Errno::NOTSUP) => Ok(None),
        Err(err) => Err(classify(err, &what)),
    }
}

/// Makes `path` an overlayfs whiteout (a character device 0:0).
pub(crate) fn make_whiteout(layer: &OwnedFd, path: &str) -> Result<()> {
    let what = format!("make whiteout {path:?}");
    let e = Entry::resolve(layer.as_fd(), path, false)?;
    // No-follow: mknodat creates, never follows (EEXIST).
    rustix::fs::mknodat(
        e.dir(),
        e.name(),
        FileType::CharacterDevice,
        Mode::empty(),
        rustix::fs::makedev(0, 0),
    )
    .map_err(|err| classify(err, &what))
}

/// Where an entry's attributes are read and written: the layer itself for its root,
/// otherwise the entry in its directory, never through a final symlink.
fn node<'a>(e: &'a Entry, layer: &'a OwnedFd) -> Node<'a> {
    if e.is_root() { Node::Open(layer.as_fd()) } else { Node::Entry(e.dir(), e.name()) }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, symlink};
    use std::path::Path;

    use rustix::fs::CWD;

    use super::*;
    use crate::error::ErrorKind;

    fn layer() -> (tempfile::TempDir, OwnedFd) {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        std::fs::create_dir_all(dir.path().join("layer/sub")).unwrap();
        std::fs::write(dir.path().join("outside"), b"outside").unwrap();
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let fd = rustix::fs::open(dir.path().join("layer"), flags, Mode::empty()).unwrap();
        (dir, fd)
    }

    fn root() -> bool {
        rustix::process::geteuid().is_root()
    }

    #[test]
    fn no_fifo_or_device_is_ever_opened() {
        let (dir, fd) = layer();
        let fifo = dir.path().join("layer/fifo");
        rustix::fs::mknodat(CWD, &fifo, FileType::Fifo, Mode::from(0o600), 0).unwrap();
        // Would block forever without a writer if it were opened for reading.
        let e = read_file(&fd, "fifo").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
        let e = set_xattr(&fd, "fifo", "user.x", b"1").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
        if root() {
            // A whiteout (0:0) opened would fail with ENXIO; it is refused unopened.
            make_whiteout(&fd, "sub/wh").unwrap();
            let e = read_file(&fd, "sub/wh").unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
            assert!(e.to_string().contains("not a regular file"), "{e}");
        }
        write_file(&fd, "sub/f", b"data", 0o640).unwrap();
        assert_eq!(read_file(&fd, "sub/f").unwrap(), b"data");
    }

    #[test]
    fn a_final_symlink_is_changed_itself_or_refused() {
        let (dir, fd) = layer();
        let outside = dir.path().join("outside");
        symlink(&outside, dir.path().join("layer/link")).unwrap();
        let before = std::fs::metadata(&outside).unwrap();
        assert_eq!(read_file(&fd, "link").unwrap_err().kind(), ErrorKind::InvalidArgument);
        assert_eq!(set_mode(&fd, "link", 0o777).unwrap_err().kind(), ErrorKind::InvalidArgument);
        let e = set_xattr(&fd, "link", "user.x", b"1").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
        if root() {
            set_owner(&fd, "link", 4321, 8765).unwrap();
            let link = std::fs::symlink_metadata(dir.path().join("layer/link")).unwrap();
            assert_eq!((link.uid(), link.gid()), (4321, 8765));
        }
        let after = std::fs::metadata(&outside).unwrap();
        assert_eq!(
            (after.mode(), after.uid(), after.gid()),
            (before.mode(), before.uid(), before.gid())
        );
        assert_eq!(std::fs::read(&outside).unwrap(), b"outside");
    }

    #[test]
    fn a_mount_on_the_last_component_is_refused() {
        if !root() {
            eprintln!("skipped: needs root to mount");
            return;
        }
        let (dir, fd) = layer();
        let target = dir.path().join("layer/sub");
        let data = std::ffi::CString::new("mode=0755").unwrap();
        let flags = rustix::mount::MountFlags::empty();
        if let Err(e) =
            rustix::mount::mount("wasnap-test", &target, "tmpfs", flags, data.as_c_str())
        {
            eprintln!("skipped: cannot mount a tmpfs: {e}");
            return;
        }
        struct Unmount<'a>(&'a Path);
        impl Drop for Unmount<'_> {
            fn drop(&mut self) {
                let _ = rustix::mount::unmount(self.0, rustix::mount::UnmountFlags::DETACH);
            }
        }
        let _unmount = Unmount(&target);
        std::fs::write(target.join("f"), b"mounted").unwrap();

        for e in [
            set_mode(&fd, "sub", 0o700).unwrap_err(),
            set_owner(&fd, "sub", 1, 1).unwrap_err(),
            read_dir(&fd, "sub").unwrap_err(),
            read_file(&fd, "sub/f").unwrap_err(),
            make_dir(&fd, "sub/d", 0o755).unwrap_err(),
            remove_entry(&fd, "sub").unwrap_err(),
        ] {
            assert!(
                matches!(e.kind(), ErrorKind::InvalidArgument | ErrorKind::FailedPrecondition),
                "{e}"
            );
        }
        let st = std::fs::metadata(&target).unwrap();
        assert_eq!((st.mode() & 0o7777, st.uid()), (0o755, 0));
        assert_eq!(std::fs::read(target.join("f")).unwrap(), b"mounted");
    }
}
