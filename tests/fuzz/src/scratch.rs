//! Scratch space on tmpfs for targets that need files: one directory per process,
//! `/dev/shm/wasnap-fuzz-<pid>` (or under the temp dir without `/dev/shm`), removed at
//! the start of a later process once its owner is gone.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const PREFIX: &str = "wasnap-fuzz-";

fn base() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() { shm.to_owned() } else { std::env::temp_dir() }
}

/// This process's scratch directory, made on first use.
pub fn dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = base();
        // Leftovers of processes that are gone (a fuzz run ends by exit on a hang).
        if let Ok(entries) = std::fs::read_dir(&base) {
            for e in entries.flatten() {
                let name = e.file_name();
                let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(PREFIX)) else {
                    continue;
                };
                if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = base.join(format!("{PREFIX}{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        dir
    })
}

/// A fresh directory inside the scratch directory, removed when dropped.
pub fn tempdir(prefix: &str) -> std::io::Result<tempfile::TempDir> {
    tempfile::Builder::new().prefix(prefix).tempdir_in(dir())
}

/// Removes this process's scratch directory (the binary calls it before exiting).
pub fn remove() {
    let _ = std::fs::remove_dir_all(dir());
}
