//! Turning the mounts a plugin returns, with paths relative to its root, into host
//! mounts with absolute paths that are certain to lie beneath that root.
//!
//! A plugin's mounts go to containerd and from there to whoever mounts them, as root, so
//! they are checked as untrusted input: only the types `bind` and `overlay`, only the
//! options on an allow-list, and every path opened beneath the root with cap-std (which
//! refuses symlinks leading out) before the kernel's name for the opened directory is
//! put in its place. Everything wrong with a mount is invalid-argument, the plugin's
//! request to the host being wrong; only I/O failures are internal.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use cap_std::fs::Dir;

use super::hostfs::components;
use crate::error::{Context, Error, Result};
use crate::snapshot::Mount;

#[cfg(test)]
mod tests;

/// Options any mount may carry: access, the usual restrictions, and propagation (which
/// a mounter applies with a separate call, never to anything but this mount).
const COMMON_OPTIONS: &[&str] = &[
    "ro",
    "rw",
    "nosuid",
    "nodev",
    "noexec",
    "noatime",
    "relatime",
    "nodiratime",
    "rprivate",
    "private",
    "rslave",
    "slave",
];

/// Options only a bind mount may carry.
const BIND_OPTIONS: &[&str] = &["bind", "rbind"];

/// Flag options only an overlay mount may carry. Each one turns a feature off or limits
/// the mount; the ones that turn features on (`redirect_dir=on`, `metacopy=on`, which
/// follow paths stored in xattrs) stay out.
const OVERLAY_OPTIONS: &[&str] =
    &["index=off", "userxattr", "volatile", "metacopy=off", "redirect_dir=off"];

/// Characters that overlayfs treats as separators or escapes in its options, so a path
/// holding one could smuggle in another layer or option.
const OVERLAY_SPECIAL: &[char] = &[':', ',', '\\'];

/// Resolves the mounts a plugin returned. `root` is the plugin's root and `root_path`
/// its canonical host path. Each `bind` source and each `lowerdir=` element,
/// `upperdir=` and `workdir=` is opened beneath `root`, must be a directory below it
/// (not the root itself) and is replaced by its real host path; symlinks inside the
/// root are followed, those leading out are refused. Options are copied in order once
/// allowed. `lowerdir+=` and the other new-style overlay options are not accepted.
///
/// The check holds when it is made: a plugin that writes to its root later (WASI lets it
/// create relative symlinks, `..` included) could replace a directory on a returned path
/// before the mount happens, so whoever mounts should resolve beneath `root_path` again.
pub fn resolve(root: &Dir, root_path: &Path, mounts: Vec<Mount>) -> Result<Vec<Mount>> {
    let root_real = real_path(root).map_err(|e| e.context("resolve the plugin root"))?;
    if root_real != root_path {
        return Err(Error::internal(format!(
            "plugin root {root_path:?} is not the directory the plugin was given \
             ({root_real:?})"
        )));
    }
    let resolver = Resolver { root, root_path };
    mounts
        .into_iter()
        .enumerate()
        .map(|(i, mount)| resolver.mount(mount).map_err(|e| e.context(format!("plugin mount {i}"))))
        .collect()
}

#[derive(Debug)]
struct Resolver<'a> {
    root: &'a Dir,
    root_path: &'a Path,
}

impl Resolver<'_> {
    fn mount(&self, mount: Mount) -> Result<Mount> {
        check_target(&mount.target)?;
        match mount.kind.as_str() {
            "bind" => self.bind(mount),
            "overlay" => self.overlay(mount),
            other => Err(invalid(format!("type {other:?} is not allowed (only bind and overlay)"))),
        }
    }

    fn bind(&self, mount: Mount) -> Result<Mount> {
        for option in &mount.options {
            if !COMMON_OPTIONS.contains(&option.as_str())
                && !BIND_OPTIONS.contains(&option.as_str())
            {
                return Err(not_allowed(option));
            }
        }
        let source = self.host_path(&mount.source, "source", false)?;
        Ok(Mount { source, ..mount })
    }

    fn overlay(&self, mount: Mount) -> Result<Mount> {
        check_overlay_source(&mount.source)?;
        let (mut lower, mut upper, mut work) = (false, false, false);
        let mut options = Vec::with_capacity(mount.options.len());
        for option in &mount.options {
            let resolved = if let Some(dirs) = option.strip_prefix("lowerdir=") {
                once(&mut lower, "lowerdir")?;
                let layers = dirs
                    .split(':')
                    .enumerate()
                    .map(|(i, dir)| self.host_path(dir, &format!("lowerdir element {i}"), true))
                    .collect::<Result<Vec<_>>>()?;
                format!("lowerdir={}", layers.join(":"))
            } else if let Some(dir) = option.strip_prefix("upperdir=") {
                once(&mut upper, "upperdir")?;
                format!("upperdir={}", self.host_path(dir, "upperdir", true)?)
            } else if let Some(dir) = option.strip_prefix("workdir=") {
                once(&mut work, "workdir")?;
                format!("workdir={}", self.host_path(dir, "workdir", true)?)
            } else if COMMON_OPTIONS.contains(&option.as_str())
                || OVERLAY_OPTIONS.contains(&option.as_str())
            {
                option.clone()
            } else {
                return Err(not_allowed(option));
            };
            options.push(resolved);
        }
        if !lower {
            return Err(invalid("an overlay mount needs a lowerdir= option"));
        }
        if upper != work {
            return Err(invalid("upperdir= and workdir= go together"));
        }
        Ok(Mount { options, ..mount })
    }

    /// Opens the root-relative directory `rel` and returns its real host path. For an
    /// overlay option the path must not hold characters overlayfs would parse.
    fn host_path(&self, rel: &str, what: &str, overlay: bool) -> Result<String> {
        let parts = components(rel).map_err(|why| invalid(format!("{what} {rel:?} {why}")))?;
        if parts.is_empty() {
            return Err(invalid(format!("{what} {rel:?} names the plugin root itself")));
        }
        if overlay && rel.contains(OVERLAY_SPECIAL) {
            return Err(invalid(format!(
                "{what} {rel:?} contains one of {OVERLAY_SPECIAL:?}, which overlayfs would parse"
            )));
        }
        let dir = self.root.open_dir(rel).map_err(|e| open_error(what, rel, &e))?;
        let real = real_path(&dir).map_err(|e| e.context(format!("{what} {rel:?}")))?;
        if !real.starts_with(self.root_path) || real == self.root_path {
            return Err(invalid(format!(
                "{what} {rel:?} resolves to {real:?}, which is not below the plugin root"
            )));
        }
        let Some(real) = real.to_str() else {
            return Err(invalid(format!("{what} {rel:?} resolves to a path that is not UTF-8")));
        };
        if overlay && real.contains(OVERLAY_SPECIAL) {
            return Err(invalid(format!(
                "{what} {rel:?} resolves to {real:?}, which overlayfs would parse"
            )));
        }
        Ok(real.to_owned())
    }
}

/// A plugin's mounts all go at the mount point: a `target` below it would be looked up
/// through what earlier mounts put there, which is the guest's (or an image's) content,
/// so a symlink planted there could send a mount, made as root, anywhere on the host.
fn check_target(target: &str) -> Result<()> {
    if target.is_empty() {
        return Ok(());
    }
    Err(invalid(format!(
        "target {target:?}: a plugin's mounts go at the mount point (empty target); a target below it would be resolved through the mounted content"
    )))
}

/// The source of an overlay mount is only a name, but mounters may pass it on a command
/// line, so it is kept to a plain word.
fn check_overlay_source(source: &str) -> Result<()> {
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if source.is_empty() || source.starts_with('-') || !source.chars().all(plain) {
        return Err(invalid(format!(
            "overlay source {source:?} must be a word of letters, digits, '.', '_' and '-'"
        )));
    }
    Ok(())
}

/// Marks an overlay path option as seen, refusing it the second time.
fn once(seen: &mut bool, key: &str) -> Result<()> {
    if std::mem::replace(seen, true) {
        return Err(invalid(format!("option {key}= is given twice")));
    }
    Ok(())
}

/// The kernel's path of an open directory. Looking the path up again and finding the
/// same directory shows it is current: a removed directory reads as `... (deleted)`,
/// and one renamed meanwhile is somewhere else.
fn real_path(dir: &Dir) -> Result<PathBuf> {
    let link = format!("/proc/self/fd/{}", dir.as_fd().as_raw_fd());
    let path = std::fs::read_link(&link).with_context(|| format!("read {link}"))?;
    let opened = rustix::fs::fstat(dir).with_context(|| "stat directory")?;
    let found = rustix::fs::stat(&path).ok();
    let same = found.is_some_and(|st| (st.st_dev, st.st_ino) == (opened.st_dev, opened.st_ino));
    if !path.is_absolute() || !same {
        return Err(Error::internal(format!(
            "directory was moved or removed while being resolved (last at {path:?})"
        )));
    }
    Ok(path)
}

fn open_error(what: &str, rel: &str, e: &io::Error) -> Error {
    let why = match (e.kind(), e.raw_os_error()) {
        // cap-std's refusal of a path leading out carries no OS error code.
        (io::ErrorKind::PermissionDenied, None) => "leads outside the plugin root".to_owned(),
        (io::ErrorKind::NotFound, _) => "does not exist".to_owned(),
        (_, Some(code)) if code == rustix::io::Errno::NOTDIR.raw_os_error() => {
            "is not a directory".to_owned()
        }
        (_, Some(code)) if code == rustix::io::Errno::LOOP.raw_os_error() => {
            "has too many levels of symlinks".to_owned()
        }
        _ => return Error::internal(format!("open {what} {rel:?}: {e}")),
    };
    invalid(format!("{what} {rel:?} {why}"))
}

fn not_allowed(option: &str) -> Error {
    invalid(format!("option {option:?} is not allowed"))
}

fn invalid(message: impl Into<String>) -> Error {
    Error::invalid_argument(message.into())
}
