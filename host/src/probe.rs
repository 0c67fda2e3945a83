//! What this machine can do: the facts `wasnap info` reports and drivers check.

use std::path::Path;

use serde::Serialize;

/// `statfs` magic numbers of the filesystems wasnap cares about.
const TMPFS_MAGIC: u64 = 0x0102_1994;
const EXT4_MAGIC: u64 = 0xEF53;
const BTRFS_MAGIC: u64 = 0x9123_683E;
const XFS_MAGIC: u64 = 0x5846_5342;
const OVERLAYFS_MAGIC: u64 = 0x794C_7630;

/// The name of the filesystem `path` is on (`tmpfs`, `ext4`, `btrfs`, ...).
pub fn filesystem_name(path: &Path) -> String {
    let Ok(st) = rustix::fs::statfs(path) else { return "unknown".into() };
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
    match st.f_type as u64 {
        TMPFS_MAGIC => "tmpfs".into(),
        EXT4_MAGIC => "ext4".into(),
        BTRFS_MAGIC => "btrfs".into(),
        XFS_MAGIC => "xfs".into(),
        OVERLAYFS_MAGIC => "overlayfs".into(),
        other => format!("fs-magic-{other:#x}"),
    }
}

/// Whether `path` is on btrfs.
pub fn is_btrfs(path: &Path) -> bool {
    #[allow(clippy::unnecessary_cast)]
    rustix::fs::statfs(path).is_ok_and(|st| st.f_type as u64 == BTRFS_MAGIC)
}

fn kernel_has(fs: &str) -> bool {
    std::fs::read_to_string("/proc/filesystems")
        .is_ok_and(|f| f.lines().any(|l| l.split('\t').nth(1) == Some(fs)))
        || Path::new("/sys/module").join(fs).exists()
}

/// What the kernel and the root's filesystem support.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Support {
    /// `uname -r`.
    pub kernel: String,
    /// The filesystem the root is on.
    pub root_filesystem: String,
    /// overlayfs is available.
    pub overlay: bool,
    /// overlay takes layers one by one (`lowerdir+`), so deep chains mount.
    pub overlay_lowerdir_plus: bool,
    /// btrfs is available in the kernel.
    pub btrfs: bool,
    /// The root is on btrfs, so the btrfs driver can run there.
    pub root_on_btrfs: bool,
    /// Running as root (mounting needs it).
    pub privileged: bool,
}

impl Support {
    /// Whether overlayfs is available (it may be a module not loaded yet).
    pub fn overlay_available() -> bool {
        kernel_has("overlay")
    }

    /// Probes this machine for a root at `root`.
    pub fn probe(root: &Path) -> Self {
        Support {
            kernel: rustix::system::uname().release().to_string_lossy().into_owned(),
            root_filesystem: filesystem_name(root),
            overlay: kernel_has("overlay"),
            overlay_lowerdir_plus: crate::mount::overlay_takes_layers_one_by_one(),
            btrfs: kernel_has("btrfs"),
            root_on_btrfs: is_btrfs(root),
            privileged: rustix::process::geteuid().is_root(),
        }
    }
}
