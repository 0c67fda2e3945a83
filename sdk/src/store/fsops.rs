//! The file operations the store is made of, each crash-safe on its own.
//!
//! Only what WASI offers is used: exclusive create, hard link (which refuses to replace),
//! rename (which replaces), unlink, and fsync of files and directories. There are no
//! locks, so every step is written to be safe when several instances of a plugin share
//! the directory.

use std::collections::hash_map::RandomState;
use std::fs::{self, File, OpenOptions};
use std::hash::BuildHasher;
use std::io::{ErrorKind as IoKind, Write};
use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use crate::error::{Error, Result};

/// A closure that turns an I/O error into an internal error about `context`.
pub(crate) fn io<C: std::fmt::Display>(context: C) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::io(context, e)
}

/// A tag for this instance, different in every instance (random, with the time mixed in),
/// for naming temporary files that instances sharing a directory must not collide on.
pub fn instance_tag() -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| {
        let seed = RandomState::new().hash_one(SystemTime::now());
        format!("{seed:016x}")
    })
}

/// A fresh name `<prefix>-<instance tag>-<n>`, unique across instances.
pub(crate) fn unique(prefix: &str) -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{n}", instance_tag())
}

/// Makes the directory entries of `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(format!("sync directory {}", dir.display())))
}

/// Writes `bytes` to the new file `path` and makes them durable; fails if it exists.
pub(crate) fn write_new(path: &Path, bytes: &[u8]) -> Result<()> {
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()));
    if let Err(e) = written {
        let _ = fs::remove_file(path);
        return Err(Error::io(format!("write {}", path.display()), e));
    }
    Ok(())
}

/// Removes the file `path`; whether it was there.
pub(crate) fn remove_file(path: &Path) -> Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == IoKind::NotFound => Ok(false),
        Err(e) => Err(Error::io(format!("remove {}", path.display()), e)),
    }
}

/// The names in directory `dir` (none if it does not exist); names that are not UTF-8
/// are left out.
///
/// Another instance may remove an entry while this one reads the directory. Inside a
/// guest, wasi-libc looks up each entry as it reads it, so the removal surfaces as
/// "not found" in the middle of the listing and ends it; the listing is then read again.
pub fn dir_names(dir: &Path) -> Result<Vec<String>> {
    const ATTEMPTS: usize = 100;
    let mut last = None;
    for _ in 0..ATTEMPTS {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == IoKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(format!("read directory {}", dir.display()), e)),
        };
        match entries
            .map(|entry| entry.map(|e| e.file_name().into_string().ok()))
            .collect::<std::io::Result<Vec<_>>>()
        {
            Ok(names) => return Ok(names.into_iter().flatten().collect()),
            Err(e) if e.kind() == IoKind::NotFound => last = Some(e),
            Err(e) => return Err(Error::io(format!("read directory {}", dir.display()), e)),
        }
    }
    let e = last.unwrap_or_else(|| IoKind::NotFound.into());
    Err(Error::io(format!("read directory {} (entries kept vanishing)", dir.display()), e))
}

/// How long ago `path` was last modified; `None` if it is gone or the clock went back.
pub(crate) fn age(path: &Path) -> Option<Duration> {
    let modified = fs::symlink_metadata(path).ok()?.modified().ok()?;
    SystemTime::now().duration_since(modified).ok()
}

/// The highest id marker in `dir`, 0 if none.
fn max_id(dir: &Path) -> Result<u64> {
    Ok(dir_names(dir)?.iter().filter_map(|n| n.parse::<u64>().ok()).max().unwrap_or(0))
}

/// Allocates an id above every id allocated before in `dir`, even by other instances at
/// the same time, and never hands out one twice.
///
/// `dir` holds one empty file per id, of which only the highest matters. To allocate:
/// create `max + 1` exclusively, then look again; if a higher marker exists by then, this
/// marker was re-created after someone had allocated past it, so it is dropped and we try
/// again. A marker is deleted only by an allocator that holds a higher one, or by its own
/// creator that has seen a higher one; so the highest marker always stays, and a second
/// claim of an id always sees a higher one.
pub(crate) fn allocate_id(dir: &Path, floor: u64) -> Result<u64> {
    for _ in 0..1000 {
        let candidate = max_id(dir)?.max(floor) + 1;
        let path = dir.join(candidate.to_string());
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(_) => {}
            Err(e) if e.kind() == IoKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io(format!("create id marker {}", path.display()), e)),
        }
        sync_dir(dir)?;
        if max_id(dir)? > candidate {
            remove_file(&path)?;
            continue;
        }
        for name in dir_names(dir)? {
            if name.parse::<u64>().is_ok_and(|n| n < candidate) {
                let _ = fs::remove_file(dir.join(name));
            }
        }
        return Ok(candidate);
    }
    Err(Error::Unavailable(format!("allocate an id in {}: too much contention", dir.display())))
}
