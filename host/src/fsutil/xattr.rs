//! Extended attributes of tree entries, in every namespace the caller may read.

use std::ffi::OsStr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use rustix::fs::XattrFlags;
use rustix::io::{Errno, Result as SysResult};

use super::At;
use crate::error::{Error, Result};

/// One extended attribute: its full name (`user.foo`) and value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Xattr {
    pub(crate) name: Vec<u8>,
    pub(crate) value: Vec<u8>,
}

/// Where the attributes live.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Node<'a> {
    /// An open regular file or directory (not `O_PATH`).
    Open(BorrowedFd<'a>),
    /// The entry `name` in an open directory, never followed if it is a symlink. Used for
    /// symlinks, devices and fifos, which must not (or cannot) be opened.
    Entry(BorrowedFd<'a>, &'a OsStr),
}

impl Node<'_> {
    /// The entry's path through the parent's descriptor. Resolving the magic link
    /// `/proc/self/fd/N` lands exactly on the open parent, and `name` must be a single
    /// component (from a directory listing; anything else is `EINVAL`), so the path cannot
    /// leave the tree; the `l*` calls then keep a final symlink from being followed.
    fn proc_path(dir: BorrowedFd<'_>, name: &OsStr) -> SysResult<PathBuf> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
            return Err(Errno::INVAL);
        }
        let mut path = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
        path.push(name);
        Ok(path)
    }

    // Each call below is pinned (`f*` on an open descriptor) or no-follow (`l*` on a
    // listed name in a pinned directory, through `proc_path`).

    pub(crate) fn list(self) -> SysResult<Vec<u8>> {
        match self {
            Node::Open(fd) => {
                sized(|| rustix::fs::flistxattr_query(fd), |buf| rustix::fs::flistxattr(fd, buf))
            }
            Node::Entry(dir, name) => {
                let path = Self::proc_path(dir, name)?;
                sized(
                    || rustix::fs::llistxattr_query(&path),
                    |buf| rustix::fs::llistxattr(&path, buf),
                )
            }
        }
    }

    pub(crate) fn get(self, attr: &OsStr) -> SysResult<Vec<u8>> {
        match self {
            Node::Open(fd) => sized(
                || rustix::fs::fgetxattr_query(fd, attr),
                |buf| rustix::fs::fgetxattr(fd, attr, buf),
            ),
            Node::Entry(dir, name) => {
                let path = Self::proc_path(dir, name)?;
                sized(
                    || rustix::fs::lgetxattr_query(&path, attr),
                    |buf| rustix::fs::lgetxattr(&path, attr, buf),
                )
            }
        }
    }

    pub(crate) fn set(self, attr: &OsStr, value: &[u8]) -> SysResult<()> {
        match self {
            Node::Open(fd) => rustix::fs::fsetxattr(fd, attr, value, XattrFlags::empty()),
            Node::Entry(dir, name) => {
                rustix::fs::lsetxattr(Self::proc_path(dir, name)?, attr, value, XattrFlags::empty())
            }
        }
    }
}

/// Runs a size query and a read into a buffer of that size, again if the value grew
/// between the two.
fn sized(
    query: impl Fn() -> SysResult<usize>,
    read: impl Fn(&mut [u8]) -> SysResult<usize>,
) -> SysResult<Vec<u8>> {
    loop {
        let len = query()?;
        if len == 0 {
            // rustix never issues a read with an empty buffer; there is nothing to read.
            return Ok(Vec::new());
        }
        let mut buf = vec![0; len];
        match read(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(Errno::RANGE) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Reads all attributes of `node`. A filesystem without xattr support has none; an
/// attribute removed between listing and reading is skipped.
pub(crate) fn read(node: Node<'_>, at: At<'_>) -> Result<Vec<Xattr>> {
    let names = match node.list() {
        Ok(names) => names,
        Err(Errno::NOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(at.err("listxattr")(e)),
    };
    let mut attrs = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let attr = OsStr::from_bytes(name);
        match node.get(attr) {
            Ok(value) => attrs.push(Xattr { name: name.to_vec(), value }),
            Err(Errno::NODATA | Errno::NOTSUP) => {}
            Err(e) => return Err(Error::from(e).context(format!("{at}: getxattr {attr:?}"))),
        }
    }
    Ok(attrs)
}

/// Sets `attrs` on `node`. Attributes the target filesystem does not support are left out,
/// as a copy onto such a filesystem cannot carry them.
pub(super) fn write(node: Node<'_>, attrs: &[Xattr], at: At<'_>) -> Result<()> {
    for attr in attrs {
        let name = OsStr::from_bytes(&attr.name);
        match node.set(name, &attr.value) {
            Ok(()) | Err(Errno::NOTSUP) => {}
            Err(e) => return Err(Error::from(e).context(format!("{at}: setxattr {name:?}"))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::path::Path;

    #[test]
    fn reads_and_writes_on_fds_and_entries() {
        let tmp = tempfile::tempdir_in("/dev/shm").expect("tempdir");
        std::fs::write(tmp.path().join("f"), b"x").expect("write");
        std::os::unix::fs::symlink("f", tmp.path().join("l")).expect("symlink");
        let dir = std::fs::File::open(tmp.path()).expect("open dir");
        let file = std::fs::File::open(tmp.path().join("f")).expect("open file");
        let at = At { verb: "test", rel: Path::new("f") };

        let attrs = vec![
            Xattr { name: b"user.empty".to_vec(), value: Vec::new() },
            Xattr { name: b"user.big".to_vec(), value: vec![7; 3000] },
        ];
        write(Node::Open(file.as_fd()), &attrs, at).expect("write on fd");
        let mut got = read(Node::Entry(dir.as_fd(), OsStr::new("f")), at).expect("read entry");
        got.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(got, vec![attrs[1].clone(), attrs[0].clone()]);

        // The symlink itself has no attributes; following it would show the file's.
        let on_link = read(Node::Entry(dir.as_fd(), OsStr::new("l")), at).expect("read link");
        assert!(on_link.iter().all(|a| !a.name.starts_with(b"user.")), "{on_link:?}");

        // Only a single component is ever looked up below the pinned directory.
        for name in ["", ".", "..", "../f", "sub/f"] {
            let node = Node::Entry(dir.as_fd(), OsStr::new(name));
            assert_eq!(node.list().unwrap_err(), Errno::INVAL, "{name:?}");
            assert_eq!(node.set(OsStr::new("user.x"), b"1").unwrap_err(), Errno::INVAL, "{name:?}");
        }
    }
}
