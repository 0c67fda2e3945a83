//! The btrfs driver: every snapshot is a btrfs subvolume, like containerd's btrfs
//! snapshotter.
//!
//! A prepare with no parent creates an empty subvolume; a prepare or view on a parent is
//! a copy-on-write snapshot of the parent's subvolume, so neither copies any data.
//! Committing snapshots the active subvolume read-only and deletes the active one. The
//! mounts are `btrfs` mounts of the filesystem's device with `subvolid=<id>`, so they
//! work from any mount namespace that can see the device.
//!
//! Layout of its directory (which must be on btrfs):
//! ```text
//! metadata.db        its records (ids, kinds, parents, labels, usage)
//! active/<id>        writable subvolumes (prepare)
//! view/<id>          read-only subvolumes (view)
//! snapshots/<id>     read-only subvolumes (commit)
//! tmp/               subvolumes being built; anything here after a crash is garbage
//! ```
//!
//! Crash safety follows the native driver: a subvolume is made in `tmp/`, where no
//! record names it, and renamed to `<area>/<id>` inside the record's transaction. The
//! kernel refuses to rename a read-only subvolume, so views and commits are snapshotted
//! writable and made read-only once in place, still before the record commits. A remove
//! forgets the record first and deletes the subvolume after: the delete is one atomic
//! ioctl, so unlike a tree removal it never leaves half a snapshot, and a crash between
//! the two leaves a subvolume no record names. `cleanup` deletes everything in `tmp/`
//! and every `<area>/<id>` that no record of that kind names.

use std::collections::HashSet;
use std::ffi::{CString, OsString};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use btrfs_uapi::subvolume::{
    SubvolumeFlags, snapshot_create, subvolume_create, subvolume_delete, subvolume_flags_set,
    subvolume_info,
};
use cap_std::fs::{Dir, DirBuilder, DirBuilderExt};
use rustix::fs::{AtFlags, FileType, Mode, OFlags};

use crate::driver::storage::{Snap, Store, StoreTxn};
use crate::error::{Error, Result};
use crate::fault::Faults;
use crate::filter::Filter;
use crate::fsutil;
use crate::snapshot::{Info, Kind, Labels, Mount, Usage};
use crate::snapshotter::{FieldPath, Snapshotter};

/// `f_type` of a btrfs filesystem in `statfs`.
const BTRFS_SUPER_MAGIC: u64 = 0x9123_683e;
/// The inode number of every subvolume's root directory (`BTRFS_FIRST_FREE_OBJECTID`).
const SUBVOL_ROOT_INO: u64 = 256;

/// The directories snapshots live in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Area {
    Active,
    View,
    Snapshots,
    Tmp,
}

impl Area {
    const ALL: [Area; 4] = [Area::Active, Area::View, Area::Snapshots, Area::Tmp];

    fn name(self) -> &'static str {
        match self {
            Area::Active => "active",
            Area::View => "view",
            Area::Snapshots => "snapshots",
            Area::Tmp => "tmp",
        }
    }

    fn of(kind: Kind) -> Area {
        match kind {
            Kind::Active => Area::Active,
            Kind::View => Area::View,
            Kind::Committed => Area::Snapshots,
        }
    }
}

/// Fault points around installing a subvolume: before the rename, before the commit.
const CREATE: [&str; 2] = ["btrfs.create.before-rename", "btrfs.create.before-commit"];
const COMMIT: [&str; 2] = ["btrfs.commit.before-rename", "btrfs.commit.before-commit"];

/// The btrfs driver: one subvolume per snapshot.
#[derive(Debug)]
pub struct Btrfs {
    /// The driver's directory as a host path, for messages.
    path: PathBuf,
    /// The block device the filesystem is mounted from: the source of every mount.
    device: String,
    /// `active/`, `view/`, `snapshots/`, `tmp/`, in [`Area::ALL`] order. Opened readable
    /// (not `O_PATH`) because btrfs ioctls are issued on them.
    areas: [Dir; 4],
    store: Store,
    faults: Arc<Faults>,
    closed: AtomicBool,
    tmp_seq: AtomicU64,
}

/// Maps a failed system call (rustix's or btrfs-uapi's errno) to an internal error.
fn os<E: Into<std::io::Error>>(context: impl std::fmt::Display) -> impl FnOnce(E) -> Error {
    move |e| Error::internal(context, e.into())
}

fn cstr(name: &str) -> Result<CString> {
    CString::new(name).map_err(|e| Error::internal(format!("name {name:?}"), e))
}

/// Opens the directory `name` below `dir` readable, never following a symlink.
fn open_dir_fd(dir: impl AsFd, name: &str) -> rustix::io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    rustix::fs::openat(dir, name, flags, Mode::empty())
}

fn as_dir(fd: OwnedFd) -> Dir {
    Dir::from_std_file(std::fs::File::from(fd))
}

impl Btrfs {
    /// Opens the driver in `dir` (which is `path` on the host), creating its layout.
    ///
    /// Fails with failed-precondition when `path` is not on btrfs, or when no btrfs mount
    /// holding it is in `/proc/self/mountinfo` (its device names every mount).
    pub fn open(dir: Dir, path: PathBuf, faults: Arc<Faults>) -> Result<Self> {
        let device = btrfs_device(&dir, &path)?;
        let mut private = DirBuilder::new();
        private.mode(0o700);
        let mut areas = Vec::with_capacity(Area::ALL.len());
        for area in Area::ALL {
            let sub = area.name();
            match dir.create_dir_with(sub, &private) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(Error::internal(format!("create {sub}/ in {}", path.display()), e));
                }
            }
            let fd =
                open_dir_fd(&dir, sub).map_err(os(format!("open {sub}/ in {}", path.display())))?;
            areas.push(as_dir(fd));
        }
        let areas: [Dir; 4] =
            areas.try_into().map_err(|_| Error::Internal("btrfs: area count".into()))?;
        let store = Store::open(&dir)?;
        Ok(Btrfs {
            path,
            device,
            areas,
            store,
            faults,
            closed: AtomicBool::new(false),
            tmp_seq: AtomicU64::new(0),
        })
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Unavailable("btrfs snapshotter is closed".into()));
        }
        Ok(())
    }

    fn area(&self, area: Area) -> &Dir {
        match area {
            Area::Active => &self.areas[0],
            Area::View => &self.areas[1],
            Area::Snapshots => &self.areas[2],
            Area::Tmp => &self.areas[3],
        }
    }

    fn tmp_name(&self, what: &str) -> String {
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        format!("{what}-{}-{n}", std::process::id())
    }

    /// A readable descriptor of the subvolume `area/name`. Missing is internal: every
    /// caller holds a record (or has just made it) that says it exists.
    fn open_subvol(&self, area: Area, name: &str) -> Result<OwnedFd> {
        open_dir_fd(self.area(area), name).map_err(os(format!(
            "open {}/{name} in {}",
            area.name(),
            self.path.display()
        )))
    }

    /// The subvolume id of `area/name`, which mounts name it by. A rename keeps it.
    fn subvol_id(&self, area: Area, name: &str) -> Result<u64> {
        let fd = self.open_subvol(area, name)?;
        let info = subvolume_info(fd.as_fd())
            .map_err(os(format!("subvolume info of {}/{name}", area.name())))?;
        Ok(info.id)
    }

    /// Deletes the subvolume `area/name`; one already gone is not an error.
    fn delete(&self, area: Area, name: &str) -> Result<()> {
        match subvolume_delete(self.area(area).as_fd(), &cstr(name)?).map_err(std::io::Error::from)
        {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::internal(format!("delete subvolume {}/{name}", area.name()), e))
            }
            _ => Ok(()),
        }
    }

    /// Deletes whatever `area/name` is: a subvolume with the ioctl (rmdir cannot), anything
    /// else (a stray directory or file) as a tree.
    fn reclaim(&self, area: Area, name: &str) -> Result<()> {
        let dir = self.area(area);
        let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(rustix::io::Errno::NOENT) => return Ok(()),
            Err(e) => return Err(os(format!("stat {}/{name}", area.name()))(e)),
        };
        let is_dir = FileType::from_raw_mode(st.st_mode) == FileType::Directory;
        let result = if is_dir && st.st_ino == SUBVOL_ROOT_INO {
            self.delete(area, name)
        } else {
            fsutil::remove_tree(dir, name)
        };
        match result {
            Err(e) if !e.is_not_found() => Err(e),
            _ => Ok(()),
        }
    }

    /// Snapshots `area/name` writable into `tmp/<into>`.
    fn snapshot_into_tmp(&self, area: Area, name: &str, into: &str) -> Result<()> {
        let src = self.open_subvol(area, name)?;
        snapshot_create(self.area(Area::Tmp).as_fd(), src.as_fd(), &cstr(into)?, false, &[])
            .map_err(os(format!("snapshot {}/{name} to tmp/{into}", area.name())))
    }

    /// Moves the subvolume `tmp/<tmp>` to `area/<id>`, makes it read-only if asked and
    /// commits `txn`, as one step: on failure the subvolume is deleted (wherever it is by
    /// then) and the records stay as they were.
    fn install(
        &self,
        txn: StoreTxn,
        tmp: &str,
        area: Area,
        id: u64,
        readonly: bool,
        [before_rename, before_commit]: [&str; 2],
    ) -> Result<()> {
        let name = id.to_string();
        // An id is only taken when its transaction commits; a subvolume already under
        // that name is a leftover of a crash before a commit.
        self.reclaim(area, &name)?;
        self.faults.hit(before_rename)?;
        rustix::fs::renameat(self.area(Area::Tmp), tmp, self.area(area), &name)
            .map_err(os(format!("rename tmp/{tmp} to {}/{name}", area.name())))?;
        let rest = (|| {
            if readonly {
                let fd = self.open_subvol(area, &name)?;
                subvolume_flags_set(fd.as_fd(), SubvolumeFlags::RDONLY)
                    .map_err(os(format!("make {}/{name} read-only", area.name())))?;
            }
            self.faults.hit(before_commit)?;
            txn.commit()
        })();
        if let Err(e) = rest {
            let _ = self.delete(area, &name);
            return Err(e);
        }
        Ok(())
    }

    fn mounts_for(&self, kind: Kind, subvolid: u64) -> Vec<Mount> {
        let mode = if kind == Kind::Active { "rw" } else { "ro" };
        vec![Mount {
            kind: "btrfs".into(),
            source: self.device.clone(),
            target: String::new(),
            options: vec![format!("subvolid={subvolid}"), mode.into()],
        }]
    }

    fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: Option<&str>,
        labels: &Labels,
    ) -> Result<Vec<Mount>> {
        self.check_open()?;
        // Fail fast before making a subvolume for nothing; the transaction re-checks.
        let parent_id = self.store.precheck(key, parent)?.map(|p| p.id);

        // Made where nothing names it, so a crash leaves only garbage in tmp/.
        let tmp = self.tmp_name("new");
        let built = match parent_id {
            Some(pid) => self.snapshot_into_tmp(Area::Snapshots, &pid.to_string(), &tmp),
            None => subvolume_create(self.area(Area::Tmp).as_fd(), &cstr(&tmp)?, &[])
                .map_err(os(format!("create subvolume tmp/{tmp}")))
                .and_then(|()| {
                    // The new root's mode follows the umask; containerd's is 0755.
                    let fd = self.open_subvol(Area::Tmp, &tmp)?;
                    rustix::fs::fchmod(fd, Mode::from_raw_mode(0o755))
                        .map_err(os(format!("chmod tmp/{tmp}")))
                }),
        };
        let result = built.and_then(|()| {
            // Asked now so that nothing can fail once the record is committed.
            let subvolid = self.subvol_id(Area::Tmp, &tmp)?;
            let mut txn = self.store.begin()?;
            let snap = txn.create(kind, key, parent, labels)?;
            let readonly = kind != Kind::Active;
            self.install(txn, &tmp, Area::of(kind), snap.id, readonly, CREATE)?;
            Ok(subvolid)
        });
        match result {
            Ok(subvolid) => Ok(self.mounts_for(kind, subvolid)),
            Err(e) => {
                let _ = self.reclaim(Area::Tmp, &tmp);
                Err(e)
            }
        }
    }
}

impl Snapshotter for Btrfs {
    fn stat(&self, key: &str) -> Result<Info> {
        self.check_open()?;
        Ok(self.store.get(key)?.0)
    }

    fn update(&self, info: &Info, fieldpaths: &[FieldPath]) -> Result<Info> {
        self.check_open()?;
        let mut txn = self.store.begin()?;
        let info = txn.update(info, fieldpaths)?;
        txn.commit()?;
        Ok(info)
    }

    fn usage(&self, key: &str) -> Result<Usage> {
        self.check_open()?;
        let (_, snap) = self.store.get(key)?;
        if let Some(usage) = snap.usage {
            return Ok(usage);
        }
        fsutil::disk_usage(&as_dir(self.open_subvol(Area::of(snap.kind), &snap.id.to_string())?))
    }

    fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        self.check_open()?;
        let (_, Snap { kind, id, .. }) = self.store.get(key)?;
        Ok(self.mounts_for(kind, self.subvol_id(Area::of(kind), &id.to_string())?))
    }

    fn prepare(&self, key: &str, parent: Option<&str>, labels: &Labels) -> Result<Vec<Mount>> {
        self.create(Kind::Active, key, parent, labels)
    }

    fn view(&self, key: &str, parent: Option<&str>, labels: &Labels) -> Result<Vec<Mount>> {
        self.create(Kind::View, key, parent, labels)
    }

    fn commit(&self, name: &str, key: &str, labels: &Labels) -> Result<()> {
        self.check_open()?;
        let (info, snap) = self.store.get(key)?;
        if info.kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!("snapshot {key:?} is not active")));
        }
        let active = snap.id.to_string();
        let tmp = self.tmp_name("commit");
        self.snapshot_into_tmp(Area::Active, &active, &tmp)?;
        let result = (|| {
            // Measured on the snapshot, which is exactly what gets committed (the active
            // subvolume may still be written to), and once, so that usage is O(1) later.
            let usage = fsutil::disk_usage(&as_dir(self.open_subvol(Area::Tmp, &tmp)?))?;
            let mut txn = self.store.begin()?;
            let id = txn.commit_active(key, name, usage, labels)?;
            self.install(txn, &tmp, Area::Snapshots, id, true, COMMIT)
        })();
        if let Err(e) = result {
            let _ = self.reclaim(Area::Tmp, &tmp);
            return Err(e);
        }
        // The commit is durable: failing now would lie. No record names the active
        // subvolume any more, so if this delete fails cleanup finds it.
        if let Err(e) = self
            .faults
            .hit("btrfs.commit.before-delete")
            .and_then(|()| self.delete(Area::Active, &active))
        {
            tracing::warn!(path = %format!("active/{active}"), error = %e, "could not delete a committed snapshot's active subvolume; cleanup will retry");
        }
        Ok(())
    }

    fn remove(&self, key: &str) -> Result<()> {
        self.check_open()?;
        let mut txn = self.store.begin()?;
        let (id, kind) = txn.remove(key)?;
        // The record goes first and the subvolume after: deleting is a single ioctl that
        // cannot be undone if the commit then failed, and a subvolume left behind by a
        // crash in between is named by no record, which is what cleanup looks for.
        self.faults.hit("btrfs.remove.before-commit")?;
        txn.commit()?;
        let area = Area::of(kind);
        if let Err(e) = self
            .faults
            .hit("btrfs.remove.before-delete")
            .and_then(|()| self.delete(area, &id.to_string()))
        {
            tracing::warn!(path = %format!("{}/{id}", area.name()), error = %e, "could not delete a removed snapshot's subvolume; cleanup will retry");
        }
        Ok(())
    }

    fn walk(&self, filter: &Filter, f: &mut dyn FnMut(Info) -> Result<()>) -> Result<()> {
        self.check_open()?;
        self.store.walk(&mut |info, _| if filter.matches(&info) { f(info) } else { Ok(()) })
    }

    fn cleanup(&self) -> Result<()> {
        self.check_open()?;
        let mut known = HashSet::new();
        self.store.walk(&mut |info, id| {
            known.insert((Area::of(info.kind), id));
            Ok(())
        })?;
        let mut doomed = Vec::new();
        for area in Area::ALL {
            let what = || format!("read {}/ in {}", area.name(), self.path.display());
            for entry in self.area(area).entries().map_err(|e| Error::internal(what(), e))? {
                let name = entry.map_err(|e| Error::internal(what(), e))?.file_name();
                let name = name.to_string_lossy().into_owned();
                let named = area != Area::Tmp
                    && name.parse::<u64>().is_ok_and(|id| known.contains(&(area, id)));
                if !named {
                    doomed.push((area, name));
                }
            }
        }
        // A subvolume being built right now by a concurrent create also lives in tmp/;
        // the metadata layer holds creates off while it cleans up, and a direct user of
        // this driver must do the same. One that cannot go (it holds a nested subvolume
        // someone made inside a container) does not keep the others.
        let mut first_error = None;
        for (area, name) in doomed {
            if let Err(e) = self.reclaim(area, &name) {
                tracing::warn!(path = %format!("{}/{name}", area.name()), error = %e, "cleanup: could not delete");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        Ok(())
    }
}

/// Checks that `dir` is on btrfs and returns the device its mount comes from.
fn btrfs_device(dir: &Dir, path: &Path) -> Result<String> {
    let stat = rustix::fs::fstatfs(dir).map_err(os(format!("statfs {}", path.display())))?;
    // `f_type` is signed on some targets; the magic is the low 32 bits.
    #[allow(clippy::unnecessary_cast, clippy::cast_sign_loss)]
    let magic = (stat.f_type as u64) & 0xffff_ffff;
    // Mount points in mountinfo are canonical; a path through a symlink would match none.
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mountinfo = std::fs::read("/proc/self/mountinfo")
        .map_err(|e| Error::internal("read /proc/self/mountinfo", e))?;
    let mount = find_mount(&mountinfo, &canonical);
    let fstype = mount.as_ref().map(|m| m.fstype.as_str());
    if magic != BTRFS_SUPER_MAGIC {
        let on =
            fstype.map_or_else(|| format!("a filesystem with magic {magic:#x}"), str::to_owned);
        return Err(Error::FailedPrecondition(format!(
            "{} is on {on}, not btrfs; the btrfs snapshotter needs its directory on a btrfs filesystem",
            path.display()
        )));
    }
    match mount {
        Some(m) if m.fstype == "btrfs" => Ok(m.source),
        _ => Err(Error::FailedPrecondition(format!(
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
