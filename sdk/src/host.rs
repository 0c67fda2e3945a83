//! What the host does for a plugin that WASI cannot express or would do slowly.
//!
//! Inside a guest the plugin's root is preopened at `/`, so `std::fs` takes paths such as
//! `/snapshots/1`. The host functions take paths relative to that root; these wrappers
//! accept either form (a leading `/` is stripped), so the same path serves both. The host
//! refuses paths that leave the root (`..`, symlinks out).
//!
//! Outside a wasm guest (unit tests on the build machine) there is no host: every
//! function here returns [`Error::NotImplemented`].

use std::path::Path;

use crate::error::{Error, Result};
use crate::types::Usage;

/// `path` relative to the plugin's root, as the host and mounts want it: a leading `/` is
/// stripped, and the root itself is `.`. Not UTF-8 is invalid-argument (the WIT carries
/// strings).
pub fn relative(path: impl AsRef<Path>) -> Result<String> {
    let path = path.as_ref();
    let s = path
        .to_str()
        .ok_or_else(|| Error::InvalidArgument(format!("path {path:?} is not UTF-8")))?;
    let s = s.trim_start_matches('/');
    Ok(if s.is_empty() { ".".to_owned() } else { s.to_owned() })
}

#[cfg(target_arch = "wasm32")]
mod imp {
    pub(super) use crate::wit::wasnap::snapshotter::host::*;
}

/// Stands in for the host outside a wasm guest, with the same signatures.
#[cfg(not(target_arch = "wasm32"))]
mod imp {
    use crate::wit::wasnap::snapshotter::types::{Error, UsageInfo};

    fn none<T>() -> Result<T, Error> {
        Err(Error::NotImplemented("host functions exist only inside a wasm guest".into()))
    }
    pub(super) fn copy_tree(_: &str, _: &str) -> Result<(), Error> {
        none()
    }
    pub(super) fn remove_tree(_: &str) -> Result<(), Error> {
        none()
    }
    pub(super) fn disk_usage(_: &str) -> Result<UsageInfo, Error> {
        none()
    }
    pub(super) fn chown(_: &str, _: u32, _: u32) -> Result<(), Error> {
        none()
    }
    pub(super) fn chmod(_: &str, _: u32) -> Result<(), Error> {
        none()
    }
    pub(super) fn set_xattr(_: &str, _: &str, _: &[u8]) -> Result<(), Error> {
        none()
    }
    pub(super) fn get_xattr(_: &str, _: &str) -> Result<Option<Vec<u8>>, Error> {
        none()
    }
    pub(super) fn list_xattrs(_: &str) -> Result<Vec<String>, Error> {
        none()
    }
    pub(super) fn remove_xattr(_: &str, _: &str) -> Result<(), Error> {
        none()
    }
    pub(super) fn make_whiteout(_: &str) -> Result<(), Error> {
        none()
    }
}

/// Copies the tree at `src` to `dst` (which must not exist), keeping mode, ownership,
/// timestamps, extended attributes, symlinks, hard links within the tree and devices.
pub fn copy_tree(src: impl AsRef<Path>, dst: impl AsRef<Path>) -> Result<()> {
    Ok(imp::copy_tree(&relative(src)?, &relative(dst)?)?)
}

/// Removes `path` and everything below it; succeeds if it does not exist.
pub fn remove_tree(path: impl AsRef<Path>) -> Result<()> {
    Ok(imp::remove_tree(&relative(path)?)?)
}

/// Disk space used by the tree at `path`, counting each inode once.
pub fn disk_usage(path: impl AsRef<Path>) -> Result<Usage> {
    Ok(imp::disk_usage(&relative(path)?)?.into())
}

/// Changes the owner of `path` itself (a symlink is not followed).
pub fn chown(path: impl AsRef<Path>, uid: u32, gid: u32) -> Result<()> {
    Ok(imp::chown(&relative(path)?, uid, gid)?)
}

/// Changes the permission bits of `path`, setuid, setgid and sticky included. WASI cannot
/// set modes, so this is how a plugin gives a directory `0o755`.
pub fn chmod(path: impl AsRef<Path>, mode: u32) -> Result<()> {
    Ok(imp::chmod(&relative(path)?, mode)?)
}

/// Sets the extended attribute `name` of `path` (a symlink is not followed).
pub fn set_xattr(path: impl AsRef<Path>, name: &str, value: &[u8]) -> Result<()> {
    Ok(imp::set_xattr(&relative(path)?, name, value)?)
}

/// The value of the extended attribute `name` of `path`, if it is set.
pub fn get_xattr(path: impl AsRef<Path>, name: &str) -> Result<Option<Vec<u8>>> {
    Ok(imp::get_xattr(&relative(path)?, name)?)
}

/// The names of the extended attributes of `path`.
pub fn list_xattrs(path: impl AsRef<Path>) -> Result<Vec<String>> {
    Ok(imp::list_xattrs(&relative(path)?)?)
}

/// Removes the extended attribute `name` of `path`; succeeds if it is not set.
pub fn remove_xattr(path: impl AsRef<Path>, name: &str) -> Result<()> {
    Ok(imp::remove_xattr(&relative(path)?, name)?)
}

/// Creates an overlayfs whiteout at `path`: a character device 0:0.
pub fn make_whiteout(path: impl AsRef<Path>) -> Result<()> {
    Ok(imp::make_whiteout(&relative(path)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_become_root_relative() {
        assert_eq!(relative("/snapshots/1").unwrap(), "snapshots/1");
        assert_eq!(relative("snapshots/1").unwrap(), "snapshots/1");
        assert_eq!(relative("//a").unwrap(), "a");
        assert_eq!(relative("/").unwrap(), ".");
        assert_eq!(relative("").unwrap(), ".");
    }

    #[test]
    #[cfg(not(target_arch = "wasm32"))]
    fn outside_a_guest_there_is_no_host() {
        assert_eq!(copy_tree("/a", "/b").unwrap_err().kind(), crate::ErrorKind::NotImplemented);
    }
}
