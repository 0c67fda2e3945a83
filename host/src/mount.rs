//! Performing the mounts a snapshotter returns, the way containerd's `mount` package
//! does on Linux: options that are mount flags become flags, the rest become the
//! filesystem's data string, and a read-only bind mount is made writable-then-remounted
//! because the kernel ignores `MS_RDONLY` on the first bind.
//!
//! Overlay mounts the host makes only to read a stack of layers (the overlay driver
//! flattening the bottom of a deep chain) are detached ([`overlay_detached`]): never
//! attached to a mount point, gone when their descriptor closes or the process dies.
//!
//! Architecture invariant: this module is the only code that calls mount(2),
//! umount(2) or the new mount API; drivers return mount records and never mount,
//! except through this module's [`overlay_detached`], which no other process sees.

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
        return Err(Error::invalid_argument("no mounts to perform"));
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
    if m.kind == "overlay" {
        return mount_overlay(m, target);
    }
    let opts = parse_options(&m.options);
    let fail = |what: &str, e: rustix::io::Errno| {
        let err = std::io::Error::from(e);
        Error::from(err).context(format!(
            "{what} {} on {} ({})",
            m.kind,
            target.display(),
            m.source
        ))
    };
    let data = CString::new(opts.data.clone())
        .map_err(|_| Error::invalid_argument("mount options contain a NUL byte"))?;
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

/// The most lower layers the kernel stacks in one overlay mount (`OVL_MAX_STACK`). A
/// mount record never names more: the overlay driver stacks a flattened tree of the
/// bottom of a deeper chain under the layers that fit (`driver::overlay::flatten`), so
/// this bounds a mount, not a chain.
pub const OVERLAY_MAX_LAYERS: usize = 500;

/// The lower layers named by an overlay mount's `lowerdir=` option, top first.
pub fn overlay_lowerdirs(options: &[String]) -> Vec<&str> {
    options
        .iter()
        .filter_map(|o| o.strip_prefix("lowerdir="))
        .flat_map(|l| l.split(':'))
        .filter(|l| !l.is_empty())
        .collect()
}

/// Mounts overlay with the new mount API, one `lowerdir+` per layer, so that no option
/// string bounds the number of layers (classic mount(2) takes one page of options,
/// which with absolute paths is a hundred-odd layers; containerd gets further by
/// rewriting them relative to their common parent, and the overlay driver keeps its
/// records within what that fits). Kernels without the new API or without `lowerdir+`
/// (before 6.8) get classic mount(2) when the options fit.
fn mount_overlay(m: &Mount, target: &Path) -> Result<()> {
    let lowers = overlay_lowerdirs(&m.options);
    if lowers.len() > OVERLAY_MAX_LAYERS {
        return Err(Error::invalid_argument(format!(
            "overlay mount with {} lower layers: the kernel stacks at most {OVERLAY_MAX_LAYERS}",
            lowers.len()
        )));
    }
    let opts = parse_options(&m.options);
    match mount_overlay_fsconfig(m, &opts, target) {
        Ok(()) => Ok(()),
        Err(NewApi::Unsupported(why)) => {
            let page = rustix::param::page_size();
            if opts.data.len() >= page {
                return Err(Error::invalid_argument(format!(
                    "overlay options are {} bytes, more than one page ({page}), and this kernel cannot take layers one by one ({why})",
                    opts.data.len()
                )));
            }
            let data = CString::new(opts.data.clone())
                .map_err(|_| Error::invalid_argument("mount options contain a NUL byte"))?;
            rustix::mount::mount(
                m.source.as_str(),
                target,
                "overlay",
                opts.flags,
                Some(data.as_c_str()),
            )
            .map_err(|e| {
                Error::from(std::io::Error::from(e))
                    .context(format!("mount overlay on {}", target.display()))
            })
        }
        Err(NewApi::Failed(what, e)) => Err(Error::from(std::io::Error::from(e))
            .context(format!("mount overlay on {} ({what})", target.display()))),
    }
}

enum NewApi {
    /// The kernel lacks the new mount API or `lowerdir+`: use mount(2).
    Unsupported(String),
    /// The kernel refused the mount itself.
    Failed(String, rustix::io::Errno),
}

fn mount_overlay_fsconfig(m: &Mount, opts: &ParsedOptions, target: &Path) -> Result<(), NewApi> {
    use rustix::mount::{MoveMountFlags, move_mount};
    let mnt = overlay_fsmount(m, opts)?;
    move_mount(&mnt, "", rustix::fs::CWD, target, MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH)
        .map_err(|e| NewApi::Failed("move_mount".into(), e))
}

/// Mounts the overlay `m` nowhere and returns its root directory: a detached mount (the
/// new mount API's `fsmount`, never moved onto a mount point), reachable only through
/// the descriptor and undone by the kernel when the last descriptor closes, so neither
/// an error nor a crash leaves a mount behind and no other process ever sees it. For
/// the host's own reading of a stack of layers (the overlay driver's flattening). Needs
/// the new mount API with `lowerdir+` (Linux 6.8).
pub fn overlay_detached(m: &Mount) -> Result<std::os::fd::OwnedFd> {
    let lowers = overlay_lowerdirs(&m.options);
    if lowers.len() > OVERLAY_MAX_LAYERS {
        return Err(Error::invalid_argument(format!(
            "overlay mount with {} lower layers: the kernel stacks at most {OVERLAY_MAX_LAYERS}",
            lowers.len()
        )));
    }
    overlay_fsmount(m, &parse_options(&m.options)).map_err(|e| match e {
        NewApi::Unsupported(why) => Error::not_implemented(format!(
            "a detached overlay needs the new mount API with lowerdir+ (Linux 6.8): {why}"
        )),
        NewApi::Failed(what, e) => Error::from(std::io::Error::from(e))
            .context(format!("mount a detached overlay ({what})")),
    })
}

/// The overlay `m` made with the new mount API, one `lowerdir+` per layer: the
/// descriptor of a mount attached nowhere yet.
fn overlay_fsmount(m: &Mount, opts: &ParsedOptions) -> Result<std::os::fd::OwnedFd, NewApi> {
    use rustix::mount::{
        FsMountFlags, FsOpenFlags, MountAttrFlags, fsconfig_create, fsconfig_set_flag,
        fsconfig_set_string, fsmount, fsopen,
    };
    let expressible = MountFlags::RDONLY
        | MountFlags::NOSUID
        | MountFlags::NODEV
        | MountFlags::NOEXEC
        | MountFlags::NOATIME
        | MountFlags::NODIRATIME
        | MountFlags::RELATIME
        | MountFlags::STRICTATIME;
    if !(opts.flags - expressible).is_empty() {
        return Err(NewApi::Unsupported(format!(
            "flags {:?} need mount(2)",
            opts.flags - expressible
        )));
    }
    let fs = fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)
        .map_err(|e| NewApi::Unsupported(format!("fsopen: {e}")))?;
    let failed = |what: String| move |e| NewApi::Failed(what, e);
    for opt in opts.data.split(',').filter(|o| !o.is_empty()) {
        match opt.split_once('=') {
            Some(("lowerdir", layers)) => {
                for layer in layers.split(':').filter(|l| !l.is_empty()) {
                    fsconfig_set_string(&fs, "lowerdir+", layer).map_err(|e| match e {
                        rustix::io::Errno::INVAL => {
                            NewApi::Unsupported(format!("lowerdir+ refused for {layer}: {e}"))
                        }
                        e => NewApi::Failed(format!("lowerdir+ {layer}"), e),
                    })?;
                }
            }
            Some((key, value)) => {
                fsconfig_set_string(&fs, key, value).map_err(failed(format!("option {opt}")))?
            }
            None => fsconfig_set_flag(&fs, opt).map_err(failed(format!("option {opt}")))?,
        }
    }
    if m.source != "overlay" && !m.source.is_empty() {
        fsconfig_set_string(&fs, "source", m.source.as_str()).map_err(failed("source".into()))?;
    }
    fsconfig_create(&fs).map_err(failed("create the overlay".into()))?;
    let mut attrs = MountAttrFlags::empty();
    for (flag, attr) in [
        (MountFlags::RDONLY, MountAttrFlags::MOUNT_ATTR_RDONLY),
        (MountFlags::NOSUID, MountAttrFlags::MOUNT_ATTR_NOSUID),
        (MountFlags::NODEV, MountAttrFlags::MOUNT_ATTR_NODEV),
        (MountFlags::NOEXEC, MountAttrFlags::MOUNT_ATTR_NOEXEC),
        (MountFlags::NOATIME, MountAttrFlags::MOUNT_ATTR_NOATIME),
        (MountFlags::NODIRATIME, MountAttrFlags::MOUNT_ATTR_NODIRATIME),
        (MountFlags::RELATIME, MountAttrFlags::MOUNT_ATTR_RELATIME),
        (MountFlags::STRICTATIME, MountAttrFlags::MOUNT_ATTR_STRICTATIME),
    ] {
        if opts.flags.contains(flag) {
            attrs |= attr;
        }
    }
    fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, attrs).map_err(failed("fsmount".into()))
}

/// Whether this kernel takes overlay layers one by one (`lowerdir+`, Linux 6.8+),
/// which is what lets a chain of any depth up to the stack limit mount. Probes with an
/// unmounted filesystem context; needs the privilege to mount.
pub fn overlay_takes_layers_one_by_one() -> bool {
    use rustix::mount::{FsOpenFlags, fsconfig_set_string, fsopen};
    fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)
        .is_ok_and(|fs| fsconfig_set_string(&fs, "lowerdir+", "/").is_ok())
}

/// Detaches whatever is mounted at `target` now and lets the kernel finish when it is
/// no longer busy (`MNT_DETACH`): the last resort of cleanup paths that must not leave
/// a mount behind.
pub fn detach(target: &Path) -> Result<()> {
    rustix::mount::unmount(target, UnmountFlags::DETACH | UnmountFlags::NOFOLLOW).map_err(|e| {
        Error::from(std::io::Error::from(e)).context(format!("detach {}", target.display()))
    })
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
                return Err(Error::invalid_argument(format!(
                    "{} is not a mount point",
                    target.display()
                )));
            }
            Err(e) => {
                return Err(Error::from(std::io::Error::from(e))
                    .context(format!("unmount {}", target.display())));
            }
        }
        if unmounted > 64 {
            return Err(Error::internal(format!(
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
