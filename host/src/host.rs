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
use std::sync::{Arc, Mutex};

use cap_std::ambient_authority;
use cap_std::fs::Dir;

pub use crate::config::{Config, DriverConfig};
use crate::driver::{Btrfs, Native, Overlay};
use crate::error::{Error, Result};
use crate::fault::Faults;
use crate::metadata::{MetaDb, Snapshots};
use crate::snapshotter::Snapshotter;

/// The snapshotter used when none is named: the one that works everywhere.
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

/// An open root: the metadata database and the configured snapshotters, each opened
/// the first time it is asked for (so a driver this machine cannot run stops only the
/// calls that name it).
#[derive(Debug)]
pub struct Host {
    root: PathBuf,
    dir: Dir,
    db: Arc<MetaDb>,
    faults: Arc<Faults>,
    configs: BTreeMap<String, DriverConfig>,
    default_snapshotter: String,
    opened: Mutex<BTreeMap<String, Arc<Snapshots>>>,
}

impl Host {
    /// Opens (creating if needed) the root at `root` with the built-in drivers, arming
    /// fault points from `WASNAP_FAULTS` if it is set.
    pub fn open(root: &Path) -> Result<Self> {
        Self::open_with(root, Arc::new(Faults::from_env()?))
    }

    /// Opens the root with an explicit set of fault points (tests).
    pub fn open_with(root: &Path, faults: Arc<Faults>) -> Result<Self> {
        Self::open_config(root, faults, Config::default())
    }

    /// Opens the root serving the snapshotters `config` names.
    pub fn open_config(root: &Path, faults: Arc<Faults>, config: Config) -> Result<Self> {
        let io = |what: &str| {
            let what = format!("{what} {}", root.display());
            move |e: std::io::Error| Error::internal(what, e)
        };
        create_private_dir(root).map_err(io("create root"))?;
        let root = root.canonicalize().map_err(io("resolve root"))?;
        let dir = Dir::open_ambient_dir(&root, ambient_authority()).map_err(io("open root"))?;
        let db = Arc::new(MetaDb::open(&dir)?);
        Ok(Host {
            root,
            dir,
            db,
            faults,
            configs: config.snapshotters,
            default_snapshotter: config.default_snapshotter,
            opened: Mutex::new(BTreeMap::new()),
        })
    }

    /// The root directory, resolved.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The metadata database.
    pub fn db(&self) -> &Arc<MetaDb> {
        &self.db
    }

    /// The snapshotter called `name`, opening its driver on first use.
    pub fn snapshotter(&self, name: &str) -> Result<Arc<Snapshots>> {
        let mut opened = self.opened.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = opened.get(name) {
            return Ok(s.clone());
        }
        let config = self.configs.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.configs.keys().map(String::as_str).collect();
            Error::NotFound(format!("snapshotter {name:?} (configured: {})", known.join(", ")))
        })?;
        let backend = self
            .open_driver(name, config)
            .map_err(|e| e.context(format!("snapshotter {name:?}")))?;
        let s = Arc::new(Snapshots::new(self.db.clone(), name, backend, self.faults.clone()));
        opened.insert(name.to_owned(), s.clone());
        Ok(s)
    }

    fn open_driver(&self, name: &str, config: &DriverConfig) -> Result<Arc<dyn Snapshotter>> {
        let rel = format!("snapshotters/{name}");
        let io = |what: &'static str| {
            let rel = rel.clone();
            move |e: std::io::Error| Error::internal(format!("{what} {rel}"), e)
        };
        self.dir.create_dir_all(&rel).map_err(io("create"))?;
        let dir = self.dir.open_dir(&rel).map_err(io("open"))?;
        let path = self.root.join(&rel);
        Ok(match config {
            DriverConfig::Native => Arc::new(Native::open(dir, path, self.faults.clone())?),
            DriverConfig::Overlay(opts) => {
                Arc::new(Overlay::open(dir, path, self.faults.clone(), opts.clone())?)
            }
            DriverConfig::Btrfs => Arc::new(Btrfs::open(dir, path, self.faults.clone())?),
        })
    }

    /// The snapshotter commands use when they name none.
    pub fn default_snapshotter(&self) -> &str {
        &self.default_snapshotter
    }

    /// Names of the configured snapshotters.
    pub fn snapshotter_names(&self) -> impl Iterator<Item = &str> {
        self.configs.keys().map(String::as_str)
    }

    /// How each configured snapshotter is served.
    pub fn configs(&self) -> &BTreeMap<String, DriverConfig> {
        &self.configs
    }

    /// Closes every backend opened so far.
    pub fn close(&self) -> Result<()> {
        let opened = self.opened.lock().unwrap_or_else(|e| e.into_inner());
        opened.values().try_for_each(|s| s.close())
    }
}

fn create_private_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(path)
}
