//! The btrfs driver: every snapshot is a btrfs subvolume, like containerd's btrfs
//! snapshotter.
//!
//! A prepare with no parent creates an empty subvolume; a prepare or view on a parent is
//! a copy-on-write snapshot of the parent's subvolume, so neither copies any data.
//! Committing snapshots the active subvolume read-only under a new id and deletes the
//! active one. The mounts are `btrfs` mounts of the filesystem's device with
//! `subvolid=<id>`, so they work from any mount namespace that can see the device.
//!
//! Its directory (which must be on btrfs) follows [`layout`](super::layout), like the
//! other drivers: `snapshots/<id>` is a subvolume, built in `tmp/`, renamed into place
//! and recorded, by the same protocol, so a cleanup running beside creates spares what
//! they are building. The kernel refuses to rename a read-only subvolume, so views and
//! commits are snapshotted writable and made read-only once in place, before their
//! record is written. Deleting a subvolume is one atomic ioctl, so a removal never leaves
//! half a snapshot.

use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cap_std::fs::Dir;
use rustix::fs::{AtFlags, FileType, Mode};

use super::layout::{Deletion, Entries, Layout, OnLayout, TMP, on_layout};
use crate::driver::storage::{Snap, Store};
use crate::error::{Context, Error, Result};
use crate::fault::Faults;
use crate::fsutil;
use crate::snapshot::{Kind, Labels, Mount};

pub mod ioctl;

use ioctl::{SUBVOL_ROOT_INO, snapshot_create, subvolume_create, subvolume_delete};

/// `f_type` of a btrfs filesystem in `statfs`.
const BTRFS_SUPER_MAGIC: u64 = 0x9123_683e;

fn cstr(name: &str) -> Result<CString> {
    CString::new(name).map_err(|e| Error::invalid_argument(format!("name {name:?}: {e}")))
}

/// Entries that are subvolumes: deleted with the ioctl (rmdir cannot), anything else (a
/// stray directory or file) as a tree.
#[derive(Debug)]
struct Subvolumes;

impl Entries for Subvolumes {
    fn delete(&self, dir: &Dir, name: &str) -> Result<()> {
        let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(rustix::io::Errno::NOENT) => {
                return Err(Error::not_found(format!("subvolume {name:?}")));
            }
            Err(e) => return Err(Error::from(e).context(format!("stat {name}"))),
        };
        let is_dir = FileType::from_raw_mode(st.st_mode) == FileType::Directory;
        if is_dir && st.st_ino == SUBVOL_ROOT_INO {
            match subvolume_delete(dir, &cstr(name)?) {
                Ok(()) => Ok(()),
                Err(rustix::io::Errno::NOENT) => {
                    Err(Error::not_found(format!("subvolume {name:?}")))
                }
                Err(e) => Err(Error::from(e).context(format!("delete subvolume {name}"))),
            }
        } else {
            fsutil::remove_tree(dir, name)
        }
    }

    fn seal(&self, dir: &Dir, name: &str) -> Result<()> {
        let fd = fsutil::open_dir_nofollow(dir, name)?;
        ioctl::set_readonly(&fd, true).with_context(|| format!("make {name} read-only"))
    }
}

/// The btrfs driver: one subvolume per snapshot.
#[derive(Debug)]
pub struct Btrfs {
    layout: Arc<Layout>,
    /// The block device the filesystem is mounted from: the source of every mount.
    device: String,
}

impl Btrfs {
    /// Opens the driver in `dir` (which is `path` on the host) with records of its own
    /// in `dir`.
    ///
    /// Fails with failed-precondition when `path` is not on btrfs, or when no btrfs mount
    /// holding it is in `/proc/self/mountinfo` (its device names every mount).
    pub fn open(dir: Dir, path: PathBuf, faults: Arc<Faults>) -> Result<Self> {
        let device = btrfs_device(&dir, &path)?;
        let store = Store::open(&dir)?;
        Self::open_on(dir, path, store, faults, device)
    }

    /// Opens the driver in `dir` keeping its records in `store`.
    pub fn with_store(dir: Dir, path: PathBuf, store: Store, faults: Arc<Faults>) -> Result<Self> {
        let device = btrfs_device(&dir, &path)?;
        Self::open_on(dir, path, store, faults, device)
    }

    fn open_on(
        dir: Dir,
        path: PathBuf,
        store: Store,
        faults: Arc<Faults>,
        device: String,
    ) -> Result<Self> {
        let layout =
            Arc::new(Layout::open(dir, path, store, Box::new(Subvolumes), faults, "btrfs", None)?);
        layout.start_deleter()?;
        Ok(Btrfs { layout, device })
    }

    /// Whether commits sync the new subvolume before recording it (the default).
    pub fn set_sync_commits(&self, sync: bool) {
        self.layout.set_sync_commits(sync);
    }

    /// The subvolume id of `snapshots/<id>`, which mounts name it by.
    fn subvol_id(&self, id: u64) -> Result<u64> {
        let fd = fsutil::open_dir_nofollow(&self.layout.snapshots, &id.to_string())?;
        ioctl::subvolume_id(&fd).with_context(|| format!("subvolume id of {}", Layout::entry(id)))
    }

    /// Snapshots `snapshots/<id>` writable into `tmp/<into>`.
    fn snapshot_into_tmp(&self, id: u64, into: &str) -> Result<()> {
        let src = fsutil::open_dir_nofollow(&self.layout.snapshots, &id.to_string())?;
        snapshot_create(&self.layout.tmp, &src, &cstr(into)?, false)
            .with_context(|| format!("snapshot {} to tmp/{into}", Layout::entry(id)))
    }

    fn mounts_of(&self, kind: Kind, subvolid: u64) -> Vec<Mount> {
        let mode = if kind == Kind::Active { "rw" } else { "ro" };
        vec![Mount {
            kind: "btrfs".into(),
            source: self.device.clone(),
            target: String::new(),
            options: vec![format!("subvolid={subvolid}"), mode.into()],
        }]
    }
}

impl OnLayout for Btrfs {
    const TREE: &'static str = "";
    // A commit snapshots the subvolume read-only under a new id.
    const COMMITS_IN_PLACE: bool = false;

    fn layout(&self) -> &Layout {
        &self.layout
    }

    fn mounts_for(&self, snap: &Snap) -> Result<Vec<Mount>> {
        Ok(self.mounts_of(snap.kind, self.subvol_id(snap.id)?))
    }

    fn build_entry(&self, tmp: &str, parent: Option<(&str, &Snap)>) -> Result<()> {
        let l = &self.layout;
        match parent {
            Some((_, p)) => self.snapshot_into_tmp(p.id, tmp),
            None => {
                subvolume_create(&l.tmp, &cstr(tmp)?)
                    .with_context(|| format!("create subvolume {TMP}/{tmp}"))?;
                // The new root's mode follows the umask; containerd's is 0755.
                let fd = fsutil::open_dir_nofollow(&l.tmp, tmp)?;
                rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o755))
                    .with_context(|| format!("chmod {TMP}/{tmp}"))
            }
        }
    }

    fn seals(&self, kind: Kind) -> bool {
        // The kernel renames only writable subvolumes: views are made read-only in place.
        kind != Kind::Active
    }

    fn commit_active(&self, name: &str, key: &str, snap: &Snap, labels: &Labels) -> Result<()> {
        let l = &self.layout;
        let new = l.store.next_id()?;
        let tmp = l.tmp_name("commit");
        if let Err(e) = self.snapshot_into_tmp(snap.id, tmp.name()) {
            let _ = l.delete_tmp(tmp.name());
            return Err(e);
        }
        // Measured on the snapshot, which is exactly what gets committed (the active
        // subvolume may still be written to), and once, so that usage is O(1) later.
        let usage = match fsutil::open_dir_nofollow(&l.tmp, tmp.name())
            .and_then(|d| fsutil::disk_usage(&d))
        {
            Ok(u) => u,
            Err(e) => {
                let _ = l.delete_tmp(tmp.name());
                return Err(e);
            }
        };
        l.commit_moved(&tmp, snap.id, new, name, key, usage, labels)
    }

    fn deletion(&self) -> Deletion {
        // Deleting a subvolume is one quick ioctl (the kernel reclaims its space in the
        // background), so it happens at once.
        Deletion::Now
    }
}

/// Checks that `dir` is on btrfs and returns the device its mount comes from.
fn btrfs_device(dir: &Dir, path: &Path) -> Result<String> {
    let stat = rustix::fs::fstatfs(dir).with_context(|| format!("statfs {}", path.display()))?;
    // `f_type` is signed on some targets; the magic is the low 32 bits.
    #[allow(clippy::unnecessary_cast, clippy::cast_sign_loss)]
    let magic = (stat.f_type as u64) & 0xffff_ffff;
    // Mount points in mountinfo are canonical; a path through a symlink would match none.
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mountinfo =
        std::fs::read("/proc/self/mountinfo").with_context(|| "read /proc/self/mountinfo")?;
    let mount = find_mount(&mountinfo, &canonical);
    let fstype = mount.as_ref().map(|m| m.fstype.as_str());
    if magic != BTRFS_SUPER_MAGIC {
        let on =
            fstype.map_or_else(|| format!("a filesystem with magic {magic:#x}"), str::to_owned);
        return Err(Error::failed_precondition(format!(
            "{} is on {on}, not btrfs; the btrfs snapshotter needs its directory on a btrfs filesystem",
            path.display()
        )));
    }
    match mount {
        Some(m) if m.fstype == "btrfs" => Ok(m.source),
        _ => Err(Error::failed_precondition(format!(
            "{} is on btrfs, but /proc/self/mountinfo shows no btrfs mount holding it (found {}), so the device to mount snapshots from is unknown",
            path.display(),
            fstype.unwrap_or("none")
        ))),
    }
}

/// One line of `/proc/self/mountinfo`, the parts the driver needs.
#[derive(Debug, PartialEq, Eq)]
struct MountEntry {
    point: PathBuf,
    fstype: String,
    source: String,
}

/// The mount holding `path`: the one with the longest mount point that contains it, the
/// last listed (the top of a stack) on a tie, as containerd's `mount.Lookup` picks it.
fn find_mount(mountinfo: &[u8], path: &Path) -> Option<MountEntry> {
    let mut best: Option<MountEntry> = None;
    for line in mountinfo.split(|&b| b == b'\n') {
        // id parent major:minor root point options [optional...] - fstype source super
        let mut fields = line.split(|&b| b == b' ');
        let Some(point) = fields.nth(4) else { continue };
        let mut tail = fields.skip_while(|f| *f != b"-").skip(1);
        let (Some(fstype), Some(source)) = (tail.next(), tail.next()) else { continue };
        let point = PathBuf::from(OsString::from_vec(unescape(point)));
        if !path.starts_with(&point) {
            continue;
        }
        if best.as_ref().is_none_or(|b| point.as_os_str().len() >= b.point.as_os_str().len()) {
            best = Some(MountEntry {
                point,
                fstype: String::from_utf8_lossy(&unescape(fstype)).into_owned(),
                source: String::from_utf8_lossy(&unescape(source)).into_owned(),
            });
        }
    }
    best
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\134` for a backslash).
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal = field.get(i + 1..i + 4).filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) if field[i] == b'\\' => {
                let v = d.iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                out.push(u8::try_from(v).unwrap_or(b'?'));
                i += 4;
            }
            _ => {
                out.push(field[i]);
                i += 1;
            }
        }
    }
    out
}

on_layout!(Btrfs);

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &[u8] = b"27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n\
        43 27 0:39 / /var/lib rw,relatime shared:1 - btrfs /dev/loop0 rw,subvolid=5\n\
        44 43 0:40 / /var/lib/my\\040disk rw - btrfs /dev/loop1 rw\n\
        45 43 0:41 / /var/lib/my\\040disk rw - btrfs /dev/loop2 rw\n";

    fn source(path: &str) -> Option<String> {
        find_mount(INFO, Path::new(path)).map(|m| format!("{} {}", m.fstype, m.source))
    }

    #[test]
    fn the_longest_containing_mount_point_wins_and_escapes_are_undone() {
        assert_eq!(source("/home/x").as_deref(), Some("ext4 /dev/vda"));
        assert_eq!(source("/var/lib").as_deref(), Some("btrfs /dev/loop0"));
        // Component-wise: /var/library is not below /var/lib.
        assert_eq!(source("/var/library").as_deref(), Some("ext4 /dev/vda"));
        // The top of a stack of mounts on one point is the one listed last.
        assert_eq!(source("/var/lib/my disk/wasnap").as_deref(), Some("btrfs /dev/loop2"));
        assert_eq!(unescape(b"a\\134b\\0"), b"a\\b\\0");
    }
}
