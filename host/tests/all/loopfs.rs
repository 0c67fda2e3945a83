//! Scratch filesystems for tests: the fixture lives in `wasnap_conformance::loopfs`.

use std::path::{Path, PathBuf};

use wasnap::Mount;
pub use wasnap_conformance::loopfs::LoopBtrfs;

/// Gets a [`LoopBtrfs`] of `$mib` MiB on the real disk, or skips the test saying why (no
/// root, no losetup, no loop devices, no btrfs). Under CI (`CI` set) a skip is a failure.
#[macro_export]
macro_rules! loop_btrfs {
    ($mib:expr) => {
        $crate::loop_fs!("btrfs", $mib)
    };
}

/// Gets a [`LoopFs`](wasnap_conformance::loopfs::LoopFs) of type `$fs` (`btrfs`, `ext4`)
/// and `$mib` MiB on the real disk, or skips the test saying why. Under CI (`CI` set) a
/// skip is a failure.
#[macro_export]
macro_rules! loop_fs {
    ($fs:expr, $mib:expr) => {
        match wasnap_conformance::loopfs::LoopFs::try_new_of(
            $fs,
            $mib,
            std::path::Path::new(env!("CARGO_TARGET_TMPDIR")),
        ) {
            Ok(fs) => fs,
            Err(reason) => {
                if std::env::var_os("CI").is_some() {
                    panic!("{reason}; CI must not skip");
                }
                eprintln!("skipped: {reason}");
                return;
            }
        }
    };
}

/// A mount a test made, undone when dropped, so that a failing assertion does not leave
/// a snapshot mounted (and its loop device busy).
#[derive(Debug)]
pub struct Mounted {
    target: PathBuf,
}

impl Mounted {
    /// Mounts `mounts` on `target`.
    pub fn new(mounts: &[Mount], target: &Path) -> Mounted {
        wasnap::mount::mount_all(mounts, target).expect("mount snapshot");
        Mounted { target: target.to_path_buf() }
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.target
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = wasnap::mount::unmount(&self.target) {
            // Never leave it behind: a leftover mount keeps the whole loop device busy.
            eprintln!("unmount {}: {e}; detaching it lazily", self.target.display());
            let _ = wasnap::mount::detach(&self.target);
        }
    }
}
