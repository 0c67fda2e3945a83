//! Performing the mounts a snapshotter returns, the way containerd's `mount` package
//! does on Linux: options that are mount flags become flags, the rest become the
//! filesystem's data string, and a read-only bind mount is made writable-then-remounted
//! because the kernel ignores `MS_RDONLY` on the first bind.
//!
//! Architecture invariant: this module and the drivers that must (overlay, btrfs) are
//! the only code that calls mount(2) or umount(2).

use std::ffi::CString;
use std::path::Path;

use rustix::mount::{MountFlags, UnmountFlags};

use crate::error::{Error, Result};
use crate::snapshot::Mount;

/// Mount options split into kernel flags and the filesystem's data string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedOptions {
    /// `MS_*` flags.
    pub flags: MountFlags,
    /// Everything that is not a flag, comma-joined.
    pub data: String,
}

/// Splits `options` as containerd does: known flag names set or clear flags; anything
/// else goes to the filesystem.
pub fn parse_options(options: &[String]) -> ParsedOptions {
    let mut flags = MountFlags::empty();
    let mut data = Vec::new();
    for o in options {
        let (set, clear) = match o.as_str() {
            "ro" => (MountFlags::RDONLY, MountFlags::empty()),
            "rw" => (MountFlags::empty(), MountFlags::RDONLY),
            "bind" => (MountFlags::BIND, MountFlags::empty()),
            "rbind" => (MountFlags::BIND | MountFlags::REC, MountFlags::empty()),
            "nosuid" => (MountFlags::NOSUID, MountFlags::empty()),
            "suid" => (MountFlags::empty(), MountFlags::NOSUID),
            "nodev" => (MountFlags::NODEV, MountFlags::empty()),
            "dev" => (MountFlags::empty(), MountFlags::NODEV),
            "noexec" => (MountFlags::NOEXEC, MountFlags::empty()),
            "exec" => (MountFlags::empty(), MountFlags::NOEXEC),
            "sync" => (MountFlags::SYNCHRONOUS, MountFlags::empty()),
            "async" => (MountFlags::empty(), MountFlags::SYNCHRONOUS),
            "dirsync" => (MountFlags::DIRSYNC, MountFlags::empty()),
            "noatime" => (MountFlags::NOATIME, MountFlags::empty()),
            "atime" => (MountFlags::empty(), MountFlags::NOATIME),
            "nodiratime" => (MountFlags::NODIRATIME, MountFlags::empty()),
            "diratime" => (MountFlags::empty(), MountFlags::NODIRATIME),
            "relatime" => (MountFlags::RELATIME, MountFlags::empty()),
            "norelatime" => (MountFlags::empty(), MountFlags::RELATIME),
            "strictatime" => (MountFlags::STRICTATIME, MountFlags::empty()),
            "nostrictatime" => (MountFlags::empty(), MountFlags::STRICTATIME),
            "nosymfollow" => (MountFlags::NOSYMFOLLOW, MountFlags::empty()),
            _ => {
                data.push(o.as_str());
                continue;
            }
        };
        flags = (flags - clear) | set;
    }
    ParsedOptions { flags, data: data.join(",") }
}

/// Mounts `mounts` in order at `target` (each at `target/<mount.target>`).
///
/// If one fails, those already made are unmounted again before the error returns.
pub fn mount_all(mounts: &[Mount], target: &Path) -> Result<()> {
    if mounts.is_empty() {
        return Err(Error::InvalidArgument("no mounts to perform".into()));
    }
    let mut done: Vec<std::path::PathBuf> = Vec::new();
    for m in mounts {
        let at = if m.target.is_empty() { target.to_path_buf() } else { target.join(&m.target) };
        if let Err(e) = mount_one(m, &at) {
            for d in done.iter().rev() {
                let _ = unmount(d);
            }
            return Err(e);
        }
        done.push(at);
    }
    Ok(())
}

fn mount_one(m: &Mount, target: &Path) -> Result<()> {
    let opts = parse_options(&m.options);
    let fail = |what: &str, e: rustix::io::Errno| {
        let err = std::io::Error::from(e);
        Error::internal(format!("{what} {} on {} ({})", m.kind, target.display(), m.source), err)
    };
    let data = CString::new(opts.data.clone())
        .map_err(|_| Error::InvalidArgument("mount options contain a NUL byte".into()))?;
    let is_bind = opts.flags.contains(MountFlags::BIND);
    let fstype = if is_bind { "none" } else { m.kind.as_str() };
    let data_arg = if opts.data.is_empty() { None } else { Some(data.as_c_str()) };
    rustix::mount::mount(m.source.as_str(), target, fstype, opts.flags, data_arg)
        .map_err(|e| fail("mount", e))?;
    if is_bind && opts.flags.contains(MountFlags::RDONLY) {
        // The first bind ignores MS_RDONLY: remount to make it stick.
        let flags = MountFlags::BIND
            | MountFlags::RDONLY
            | (opts.flags & !(MountFlags::REC | MountFlags::BIND));
        if let Err(e) = rustix::mount::mount_remount(target, flags, "") {
            let _ = unmount(target);
            return Err(fail("remount read-only", e));
        }
    }
    Ok(())
}

/// Unmounts everything stacked at `target`, like containerd's `UnmountAll`.
pub fn unmount(target: &Path) -> Result<()> {
    let mut unmounted = 0;
    loop {
        match rustix::mount::unmount(target, UnmountFlags::NOFOLLOW) {
            Ok(()) => unmounted += 1,
            // EINVAL: not (or no longer) a mount point.
            Err(rustix::io::Errno::INVAL) if unmounted > 0 => return Ok(()),
            Err(rustix::io::Errno::INVAL) => {
                return Err(Error::InvalidArgument(format!(
                    "{} is not a mount point",
                    target.display()
                )));
            }
            Err(e) => {
                return Err(Error::internal(
                    format!("unmount {}", target.display()),
                    std::io::Error::from(e),
                ));
            }
        }
        if unmounted > 64 {
            return Err(Error::Internal(format!(
                "unmount {}: still mounted after 64 unmounts",
                target.display()
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn flags_and_data_split_like_containerd() {
        let p = parse_options(&opts(&["rbind", "ro"]));
        assert_eq!(p.flags, MountFlags::BIND | MountFlags::REC | MountFlags::RDONLY);
        assert_eq!(p.data, "");
        let p = parse_options(&opts(&["ro", "rw", "lowerdir=/a:/b", "index=off", "nodev"]));
        assert_eq!(p.flags, MountFlags::NODEV);
        assert_eq!(p.data, "lowerdir=/a:/b,index=off");
    }
}
