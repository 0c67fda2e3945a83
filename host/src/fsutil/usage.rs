//! Disk usage of a tree, counted the way containerd's `fs.DiskUsage` counts it.

use std::collections::HashSet;
use std::ffi::OsString;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{FileType, OFlags};
use rustix::io::Errno;

use super::{
    At, Handle, Level, Meta, Stack, child_rel, fstat, list_names, lstat_at, open_in_tree,
    open_pinned, pin_in_tree, reopen_dir,
};
use crate::error::Result;
use crate::snapshot::Usage;

/// Disk usage of everything inside `dir`, `dir` itself included: `size` is the sum of
/// allocated blocks (`st_blocks * 512`) and `inodes` the number of inodes, each inode
/// counted once however many hard links it has. Symlinks are counted, never followed.
///
/// The tree may be in use (an active snapshot), so entries that vanish during the walk
/// are skipped rather than reported as errors. A mount point inside the tree is not
/// descended into.
pub fn disk_usage(dir: &cap_std::fs::Dir) -> Result<Usage> {
    walk(dir, false)
}

/// As [`disk_usage`], and makes everything in the tree durable on the way: each
/// regular file and each directory is synced (`fsync`), so a record written afterwards
/// never names a layer whose files a power cut could truncate. A tree being synced is
/// one nobody writes to any more (a layer being committed).
pub fn measure_and_sync(dir: &cap_std::fs::Dir) -> Result<Usage> {
    walk(dir, true)
}

fn walk(dir: &cap_std::fs::Dir, sync: bool) -> Result<Usage> {
    let root = At { verb: if sync { "sync" } else { "disk usage" }, rel: Path::new("") };
    // Pinned: the root is the handle given; fsync and listing act on this descriptor.
    let fd = reopen_dir(dir).map_err(root.err("open"))?;
    let meta = fstat(&fd).map_err(root.err("stat"))?;
    if sync {
        rustix::fs::fsync(&fd).map_err(root.err("fsync"))?;
    }
    let mut counter = Counter::default();
    counter.add(&meta);
    let names = list_names(fd.as_fd()).map_err(root.err("read directory"))?;
    let top = Walk { rel: PathBuf::new(), dir: Handle::new(fd, &meta), names: names.into_iter() };
    let mut stack = Stack::new(top);
    while let Some(level) = stack.top_mut() {
        super::deadline::check("walk")?;
        let Some(name) = level.names.next() else {
            stack.pop()?;
            continue;
        };
        let rel = child_rel(&level.rel, &name);
        let at = At { verb: root.verb, rel: &rel };
        let parent = level.dir.fd().map_err(at.err("directory"))?;
        // No-follow: `name` is from the listing of the pinned `parent`.
        let meta = match lstat_at(parent, Path::new(&name)) {
            Ok(meta) => meta,
            Err(Errno::NOENT) => continue,
            Err(e) => return Err(at.err("lstat")(e)),
        };
        let first = counter.add(&meta);
        if sync && first && meta.file_type() == FileType::RegularFile {
            sync_file(parent, &name).map_err(at.err("fsync"))?;
        }
        if meta.file_type() != FileType::Directory {
            continue;
        }
        // In tree: no symlink followed, no mount crossed; fsync and listing act on `child`.
        let child = match open_in_tree(parent, Path::new(&name), OFlags::RDONLY | OFlags::DIRECTORY)
        {
            Ok(child) => child,
            // Removed, replaced by something that is not a directory, or a mount point.
            Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP | Errno::XDEV) => continue,
            Err(e) => return Err(at.err("open")(e)),
        };
        let opened = fstat(&child).map_err(at.err("stat"))?;
        counter.add(&opened);
        if sync {
            rustix::fs::fsync(&child).map_err(at.err("fsync"))?;
        }
        let names = match list_names(child.as_fd()) {
            Ok(names) => names,
            Err(Errno::NOENT) => continue,
            Err(e) => return Err(at.err("read directory")(e)),
        };
        stack.push(Walk { dir: Handle::new(child, &opened), names: names.into_iter(), rel });
    }
    Ok(counter.usage)
}

/// Sums blocks over distinct inodes.
#[derive(Debug, Default)]
struct Counter {
    seen: HashSet<(u64, u64)>,
    usage: Usage,
}

impl Counter {
    /// Counts `meta`'s inode; true the first time it is seen.
    fn add(&mut self, meta: &Meta) -> bool {
        let first = self.seen.insert(meta.id());
        if first {
            self.usage.size += meta.blocks * 512;
            self.usage.inodes += 1;
        }
        first
    }
}

/// Syncs the regular file `name` in `dir`. It is pinned first and opened only if it is
/// still a regular file: a symlink, fifo or device swapped in meanwhile (or a mount
/// point) is skipped, never followed or opened.
fn sync_file(dir: BorrowedFd<'_>, name: &OsString) -> rustix::io::Result<()> {
    let pinned = match pin_in_tree(dir, Path::new(name)) {
        Ok(fd) => fd,
        Err(Errno::NOENT | Errno::XDEV) => return Ok(()),
        Err(e) => return Err(e),
    };
    if fstat(&pinned)?.file_type() != FileType::RegularFile {
        return Ok(());
    }
    // Pinned: opens the regular file checked just above.
    rustix::fs::fsync(open_pinned(pinned.as_fd())?)
}

/// A directory being measured.
#[derive(Debug)]
struct Walk {
    rel: PathBuf,
    dir: Handle,
    names: std::vec::IntoIter<OsString>,
}

impl Level for Walk {
    fn close(&mut self) {
        self.dir.fd = None;
    }

    fn reopen_from(&mut self, child: &Walk) -> Result<()> {
        self.dir.reopen_from(&child.dir, At { verb: "walk", rel: &child.rel })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cap_std::ambient_authority;

    #[test]
    fn counts_hard_links_once_and_sees_new_files() {
        let tmp = tempfile::tempdir_in("/dev/shm").expect("tempdir");
        let root = tmp.path();
        std::fs::create_dir(root.join("d")).expect("mkdir");
        std::fs::write(root.join("d/f"), vec![1u8; 10_000]).expect("write");
        std::fs::hard_link(root.join("d/f"), root.join("g")).expect("link");
        std::os::unix::fs::symlink("/nonexistent", root.join("l")).expect("symlink");
        let dir = cap_std::fs::Dir::open_ambient_dir(root, ambient_authority()).expect("open");

        let before = disk_usage(&dir).expect("usage");
        // root, d, f (= g), l
        assert_eq!(before.inodes, 4);
        let blocks: u64 = ["", "d", "d/f", "l"]
            .iter()
            .map(|p| {
                std::os::unix::fs::MetadataExt::blocks(
                    &std::fs::symlink_metadata(root.join(p)).expect("stat"),
                )
            })
            .sum();
        assert_eq!(before.size, blocks * 512);
        assert!(before.size >= 10_000, "{before:?}");

        std::fs::write(root.join("d/new"), vec![2u8; 20_000]).expect("write");
        let after = disk_usage(&dir).expect("usage");
        assert_eq!(after.inodes, 5);
        assert!(after.size >= before.size + 20_000, "{before:?} -> {after:?}");
    }
}
