//! Start-up: turning a root path into the running stack.
//!
//! Architecture invariant: this is the only module that calls `ambient_authority()`.
//! Everything below it receives directory capabilities.
//!
//! Layout of a root:
//! ```text
//! metadata.db                 the host's metadata (namespaces, keys, labels, links)
//! snapshotters/<name>/        each snapshotter's own directory, its backend's to manage
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cap_std::ambient_authority;
use cap_std::fs::Dir;

use crate::driver::Native;
use crate::error::{Error, Result};
use crate::fault::Faults;
use crate::metadata::{MetaDb, Snapshots};

/// The snapshotter used when none is named.
pub const DEFAULT_SNAPSHOTTER: &str = "native";

/// The root used when none is given: `/var/lib/wasnap` for root, otherwise
/// `$XDG_DATA_HOME/wasnap` (or `~/.local/share/wasnap`).
pub fn default_root() -> PathBuf {
    if rustix::process::geteuid().is_root() {
        return PathBuf::from("/var/lib/wasnap");
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("wasnap");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".local/share/wasnap"),
        None => PathBuf::from("/var/lib/wasnap"),
    }
}

/// An open root: the metadata database and every configured snapshotter.
#[derive(Debug)]
pub struct Host {
    root: PathBuf,
    db: Arc<MetaDb>,
    snapshotters: BTreeMap<String, Arc<Snapshots>>,
}

impl Host {
    /// Opens (creating if needed) the root at `root`, arming fault points from
    /// `WASNAP_FAULTS` if it is set.
    pub fn open(root: &Path) -> Result<Self> {
        Self::open_with(root, Arc::new(Faults::from_env()?))
    }

    /// Opens the root with an explicit set of fault points (tests).
    pub fn open_with(root: &Path, faults: Arc<Faults>) -> Result<Self> {
        let io = |what: &str| {
            let what = format!("{what} {}", root.display());
            move |e: std::io::Error| Error::internal(what, e)
        };
        create_private_dir(root).map_err(io("create root"))?;
        let root = root.canonicalize().map_err(io("resolve root"))?;
        let dir = Dir::open_ambient_dir(&root, ambient_authority()).map_err(io("open root"))?;
        let db = Arc::new(MetaDb::open(&dir)?);

        let native_rel = format!("snapshotters/{DEFAULT_SNAPSHOTTER}");
        dir.create_dir_all(&native_rel).map_err(io("create snapshotter dir in"))?;
        let native_dir = dir.open_dir(&native_rel).map_err(io("open snapshotter dir in"))?;
        let native = Native::open(native_dir, root.join(&native_rel), faults.clone())?;
        let snapshots = Snapshots::new(db.clone(), DEFAULT_SNAPSHOTTER, Arc::new(native), faults);
        let mut snapshotters = BTreeMap::new();
        snapshotters.insert(DEFAULT_SNAPSHOTTER.to_owned(), Arc::new(snapshots));
        Ok(Host { root, db, snapshotters })
    }

    /// The root directory, resolved.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The metadata database.
    pub fn db(&self) -> &Arc<MetaDb> {
        &self.db
    }

    /// The snapshotter called `name`.
    pub fn snapshotter(&self, name: &str) -> Result<&Arc<Snapshots>> {
        self.snapshotters.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.snapshotters.keys().map(String::as_str).collect();
            Error::NotFound(format!("snapshotter {name:?} (configured: {})", known.join(", ")))
        })
    }

    /// Names of the configured snapshotters.
    pub fn snapshotter_names(&self) -> impl Iterator<Item = &str> {
        self.snapshotters.keys().map(String::as_str)
    }

    /// Closes every backend.
    pub fn close(&self) -> Result<()> {
        self.snapshotters.values().try_for_each(|s| s.close())
    }
}

fn create_private_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(path)
}
