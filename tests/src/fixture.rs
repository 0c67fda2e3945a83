//! Building file trees in snapshots and checking what a mount shows, like containerd's
//! `fstest` appliers and `CheckDirectoryEqual`.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

/// One change to a file tree. Paths are relative to the tree's root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Create a directory with a mode (its parent must exist).
    Dir(String, u32),
    /// Create or replace a regular file with content and a mode.
    File(String, Vec<u8>, u32),
    /// Remove a file or a whole directory tree.
    Remove(String),
    /// Rename within the tree.
    Rename(String, String),
    /// Change owner (of the entry itself, not a symlink's target).
    Chown(String, u32, u32),
    /// Change mode.
    Chmod(String, u32),
    /// Create a symlink `path` pointing at `target`: `Symlink(target, path)`.
    Symlink(String, String),
    /// Create a hard link `path` to `existing`: `Link(existing, path)`.
    Link(String, String),
}

impl Op {
    /// `Op::Dir` with a mode.
    pub fn dir(p: &str, mode: u32) -> Op {
        Op::Dir(p.into(), mode)
    }
    /// `Op::File` with a mode.
    pub fn file(p: &str, content: impl AsRef<[u8]>, mode: u32) -> Op {
        Op::File(p.into(), content.as_ref().to_vec(), mode)
    }
    /// `Op::Remove`.
    pub fn remove(p: &str) -> Op {
        Op::Remove(p.into())
    }
    /// `Op::Rename`.
    pub fn rename(from: &str, to: &str) -> Op {
        Op::Rename(from.into(), to.into())
    }
    /// `Op::Chown`.
    pub fn chown(p: &str, uid: u32, gid: u32) -> Op {
        Op::Chown(p.into(), uid, gid)
    }
    /// `Op::Chmod`.
    pub fn chmod(p: &str, mode: u32) -> Op {
        Op::Chmod(p.into(), mode)
    }
    /// `Op::Symlink`.
    pub fn symlink(target: &str, p: &str) -> Op {
        Op::Symlink(target.into(), p.into())
    }
    /// `Op::Link`.
    pub fn link(existing: &str, p: &str) -> Op {
        Op::Link(existing.into(), p.into())
    }
}

/// Applies `ops` in order to the tree at `root`.
pub fn apply(root: &Path, ops: &[Op]) -> std::io::Result<()> {
    let at = |p: &str| root.join(p);
    fn ctx(op: &Op) -> impl FnOnce(std::io::Error) -> std::io::Error + '_ {
        move |e| std::io::Error::new(e.kind(), format!("{op:?}: {e}"))
    }
    for op in ops {
        match op {
            Op::Dir(p, mode) => {
                fs::create_dir(at(p)).map_err(ctx(op))?;
                fs::set_permissions(at(p), fs::Permissions::from_mode(*mode)).map_err(ctx(op))?;
            }
            Op::File(p, content, mode) => {
                fs::write(at(p), content).map_err(ctx(op))?;
                fs::set_permissions(at(p), fs::Permissions::from_mode(*mode)).map_err(ctx(op))?;
            }
            Op::Remove(p) => {
                let md = fs::symlink_metadata(at(p)).map_err(ctx(op))?;
                if md.is_dir() {
                    fs::remove_dir_all(at(p)).map_err(ctx(op))?;
                } else {
                    fs::remove_file(at(p)).map_err(ctx(op))?;
                }
            }
            Op::Rename(from, to) => fs::rename(at(from), at(to)).map_err(ctx(op))?,
            Op::Chown(p, uid, gid) => {
                std::os::unix::fs::lchown(at(p), Some(*uid), Some(*gid)).map_err(ctx(op))?
            }
            Op::Chmod(p, mode) => {
                fs::set_permissions(at(p), fs::Permissions::from_mode(*mode)).map_err(ctx(op))?
            }
            Op::Symlink(target, p) => std::os::unix::fs::symlink(target, at(p)).map_err(ctx(op))?,
            Op::Link(existing, p) => fs::hard_link(at(existing), at(p)).map_err(ctx(op))?,
        }
    }
    Ok(())
}

/// Checks that the tree at `actual` holds exactly what the tree at `expected` holds:
/// the same names, types, modes, owners, contents, link targets and device numbers
/// (timestamps are not compared; neither is the roots' own metadata).
pub fn check_equal(actual: &Path, expected: &Path) -> Result<(), String> {
    compare_dir(actual, expected, Path::new(""))
}

fn names(dir: &Path) -> Result<Vec<String>, String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map_err(|e| format!("read {}: {e}", dir.display()))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("read {}: {e}", dir.display()))?;
    v.sort();
    Ok(v)
}

fn compare_dir(actual: &Path, expected: &Path, rel: &Path) -> Result<(), String> {
    let (a, e) = (names(actual)?, names(expected)?);
    if a != e {
        let extra: Vec<&String> = a.iter().filter(|n| !e.contains(n)).collect();
        let missing: Vec<&String> = e.iter().filter(|n| !a.contains(n)).collect();
        return Err(format!(
            "/{}: unexpected entries {extra:?}, missing entries {missing:?}",
            rel.display()
        ));
    }
    for name in a {
        let (ap, ep, r) = (actual.join(&name), expected.join(&name), rel.join(&name));
        let read =
            |p: &Path| fs::symlink_metadata(p).map_err(|err| format!("/{}: {err}", r.display()));
        let (am, em) = (read(&ap)?, read(&ep)?);
        let differ = |what: &str, a: String, e: String| {
            Err(format!("/{}: {what} is {a}, expected {e}", r.display()))
        };
        if am.file_type() != em.file_type() {
            return differ("type", kind(&am), kind(&em));
        }
        if !am.file_type().is_symlink() && am.mode() & 0o7777 != em.mode() & 0o7777 {
            return differ(
                "mode",
                format!("{:o}", am.mode() & 0o7777),
                format!("{:o}", em.mode() & 0o7777),
            );
        }
        if (am.uid(), am.gid()) != (em.uid(), em.gid()) {
            return differ(
                "owner",
                format!("{}:{}", am.uid(), am.gid()),
                format!("{}:{}", em.uid(), em.gid()),
            );
        }
        let ft = am.file_type();
        if ft.is_file() {
            let (ac, ec) = (
                fs::read(&ap).map_err(|e| e.to_string())?,
                fs::read(&ep).map_err(|e| e.to_string())?,
            );
            if ac != ec {
                return differ(
                    "content",
                    format!("{:?}", String::from_utf8_lossy(&ac)),
                    format!("{:?}", String::from_utf8_lossy(&ec)),
                );
            }
        } else if ft.is_symlink() {
            let (at, et) = (
                fs::read_link(&ap).map_err(|e| e.to_string())?,
                fs::read_link(&ep).map_err(|e| e.to_string())?,
            );
            if at != et {
                return differ("link target", at.display().to_string(), et.display().to_string());
            }
        } else if (ft.is_char_device() || ft.is_block_device()) && am.rdev() != em.rdev() {
            return differ("device", am.rdev().to_string(), em.rdev().to_string());
        } else if ft.is_dir() {
            compare_dir(&ap, &ep, &r)?;
        }
    }
    Ok(())
}

fn kind(m: &fs::Metadata) -> String {
    let t = m.file_type();
    let k = if t.is_dir() {
        "directory"
    } else if t.is_file() {
        "file"
    } else if t.is_symlink() {
        "symlink"
    } else if t.is_char_device() {
        "char device"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_fifo() {
        "fifo"
    } else {
        "socket"
    };
    k.into()
}
