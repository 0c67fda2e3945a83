//! Opening a snapshotter's backend stack from its configuration: the driver or backend
//! plugin that stores the snapshots, and the policy plugins in front of it.
//!
//! This is the one place that does it. The host opens every configured snapshotter
//! through [`open`], and so do `wasnap conformance` and the conformance suite's
//! factory, so a configuration means the same thing (driver options included) to all.
//! A stack that fails to open part way closes what it had opened and registers
//! nothing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cap_std::fs::Dir;

use crate::backend::Backend;
use crate::config::{DriverConfig, PluginConfig, SnapshotterConfig};
use crate::driver::storage::Store;
use crate::driver::{Btrfs, Native, Overlay};
use crate::error::{Context, Error, Result};
use crate::fault::Faults;
use crate::kv::Db;
use crate::plugin::{Plugin, Role, Space, WasmSnapshotter};

/// Compiled plugins by path, so a `.wasm` used by several snapshotters (or opened again
/// for every case of a conformance run) is read and compiled once, until the file
/// changes: each load checks the file's identity (device, inode, size, change time), so
/// a new version put in its place (a reload) is read again. Compiled code is also
/// cached on disk in `cache`, if given.
#[derive(Debug, Default)]
pub struct Plugins {
    cache: Option<Dir>,
    loaded: Mutex<HashMap<PathBuf, (FileId, Arc<Plugin>)>>,
}

/// What tells one version of a file from another without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    ctime: (i64, i64),
    mtime: (i64, i64),
}

impl FileId {
    fn of(m: &std::fs::Metadata) -> FileId {
        use std::os::unix::fs::MetadataExt;
        FileId {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            ctime: (m.ctime(), m.ctime_nsec()),
            mtime: (m.mtime(), m.mtime_nsec()),
        }
    }
}

impl Plugins {
    /// A loader using `cache` (a directory the host owns) for compiled code.
    pub fn new(cache: Option<Dir>) -> Self {
        Plugins { cache, loaded: Mutex::default() }
    }

    /// The plugin `config` names, compiled (or loaded from the cache) on first use, and
    /// checked against its pinned digest, if any.
    pub fn load(&self, config: &PluginConfig) -> Result<Arc<Plugin>> {
        let plugin = self.load_path(&config.path)?;
        if let Some(pin) = config.pinned()? {
            let digest = &plugin.info().digest;
            if *digest != pin {
                return Err(Error::failed_precondition(format!(
                    "plugin {}: its sha256 is {digest}, but the configuration pins {pin}",
                    config.path.display()
                )));
            }
        }
        Ok(plugin)
    }

    fn load_path(&self, path: &Path) -> Result<Arc<Plugin>> {
        use std::io::Read;
        let bad =
            |e: std::io::Error| Error::invalid_argument(format!("plugin {}: {e}", path.display()));
        // The identity is taken from the open file, so it describes the bytes read.
        let mut file = std::fs::File::open(path).map_err(bad)?;
        let id = FileId::of(&file.metadata().map_err(bad)?);
        if let Some((seen, p)) = self.loaded.lock().unwrap_or_else(|e| e.into_inner()).get(path)
            && *seen == id
        {
            return Ok(p.clone());
        }
        let mut wasm = Vec::with_capacity(id.size as usize);
        file.read_to_end(&mut wasm).map_err(bad)?;
        let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("plugin");
        let plugin = Plugin::load(name, &wasm, self.cache.as_ref())?;
        self.loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(path.to_owned(), (id, plugin.clone()));
        Ok(plugin)
    }
}

/// A plugin a stack started, and where.
#[derive(Debug, Clone)]
pub struct LoadedPlugin {
    /// The snapshotter it serves (as its backend or as one of its policies).
    pub snapshotter: String,
    /// Backend or policy.
    pub role: Role,
    /// For a policy, its place in the snapshotter's `policies` (0 sees calls first).
    pub policy: Option<usize>,
    /// The configuration it runs with: the `.wasm` it was loaded from (`config.path`),
    /// its pin, `init` configuration and limits.
    pub config: PluginConfig,
    /// When the version now serving was loaded.
    pub loaded_at: std::time::SystemTime,
    /// The last reload that failed since that version was loaded: why, and when.
    pub reload_error: Option<(String, std::time::SystemTime)>,
    /// The running plugin.
    pub wasm: Arc<WasmSnapshotter>,
}

impl LoadedPlugin {
    /// `snapshotter` for its backend, `snapshotter/policy-<i>` for a policy: how
    /// reports name it.
    pub fn id(&self) -> String {
        match self.policy {
            Some(i) => format!("{}/policy-{i}", self.snapshotter),
            None => self.snapshotter.clone(),
        }
    }
}

/// Where a stack keeps its state: a root directory (the host's root, or a conformance
/// case's directory), its host path, and the database drivers keep their records in
/// (`None`: each driver keeps its own in its directory).
#[derive(Debug, Clone, Copy)]
pub struct Place<'a> {
    /// The directory under which `snapshotters/<name>` and `policies/<name>/` are made.
    pub root: &'a Dir,
    /// Its host path, for mount sources.
    pub root_path: &'a Path,
    /// The shared database, if any.
    pub db: Option<&'a Arc<Db>>,
}

/// An opened stack.
pub struct Stack {
    /// What the metadata layer calls: the first policy, or the backend.
    pub backend: Arc<dyn Backend>,
    /// The plugins it started, backend first.
    pub plugins: Vec<LoadedPlugin>,
    /// Whether the backend's records are in the shared database.
    pub shared_db: bool,
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack").field("plugins", &self.plugins).finish_non_exhaustive()
    }
}

/// A directory under `place.root`, created if needed (owner-only, its name synced),
/// with its host path.
pub fn private_dir(place: &Place<'_>, rel: &str) -> Result<(Dir, PathBuf)> {
    let dir = crate::fsutil::make_dir_synced(place.root, rel, 0o700)
        .with_context(|| format!("open {rel}"))?;
    Ok((dir, place.root_path.join(rel)))
}

/// Opens the stack of snapshotter `name` as `config` describes it, in `place`.
pub fn open(
    name: &str,
    config: &SnapshotterConfig,
    place: &Place<'_>,
    faults: &Arc<Faults>,
    plugins: &Plugins,
) -> Result<Stack> {
    crate::config::validate_name(name)?;
    let mut started: Vec<LoadedPlugin> = Vec::new();
    let opened = open_chain(name, config, place, faults, plugins, &mut started);
    match opened {
        Ok((backend, shared_db)) => Ok(Stack { backend, plugins: started, shared_db }),
        Err(e) => {
            // Close what did open, front first: a policy closes what is behind it.
            if let Some(first) = started.last() {
                let _ = first.wasm.close();
            }
            Err(e)
        }
    }
}

fn open_chain(
    name: &str,
    config: &SnapshotterConfig,
    place: &Place<'_>,
    faults: &Arc<Faults>,
    plugins: &Plugins,
    started: &mut Vec<LoadedPlugin>,
) -> Result<(Arc<dyn Backend>, bool)> {
    let (dir, path) = private_dir(place, &format!("snapshotters/{name}"))?;
    let dir_clone = dir.try_clone().context("open the snapshotter's directory")?;
    let store = |dir: &Dir| match place.db {
        Some(db) => Store::shared(db.clone(), name, dir),
        None => Store::open(dir),
    };
    let mut backend: Arc<dyn Backend> = match &config.driver {
        DriverConfig::Native => {
            let d = Native::with_store(dir, path, store(&dir_clone)?, faults.clone())?;
            d.set_sync_commits(config.sync_commits);
            Arc::new(d)
        }
        DriverConfig::Overlay(opts) => {
            let d =
                Overlay::with_store(dir, path, store(&dir_clone)?, faults.clone(), opts.clone())?;
            d.set_sync_commits(config.sync_commits);
            Arc::new(d)
        }
        DriverConfig::Btrfs => {
            let d = Btrfs::with_store(dir, path, store(&dir_clone)?, faults.clone())?;
            d.set_sync_commits(config.sync_commits);
            Arc::new(d)
        }
        DriverConfig::Wasm(p) => {
            let wasm = open_plugin(name, Role::Backend, p, plugins, place, (dir, path), None)?;
            started.push(loaded(name, None, p, &wasm));
            wasm
        }
    };
    // Drivers, plugins' layers and their key-value stores all keep their records in the
    // shared database when there is one.
    let shared_db = place.db.is_some();
    // The first policy listed sees a call first, so the chain is built from the back.
    for (i, p) in config.policies.iter().enumerate().rev() {
        let stem = p.path.file_stem().and_then(|s| s.to_str()).unwrap_or("policy");
        let (dir, path) = private_dir(place, &format!("policies/{name}/{i}-{stem}"))?;
        let space = format!("{name}/policy-{i}");
        let wasm =
            open_plugin(&space, Role::Policy, p, plugins, place, (dir, path), Some(backend))?;
        started.push(loaded(name, Some(i), p, &wasm));
        backend = wasm;
    }
    Ok((backend, shared_db))
}

fn loaded(
    name: &str,
    policy: Option<usize>,
    p: &PluginConfig,
    wasm: &Arc<WasmSnapshotter>,
) -> LoadedPlugin {
    LoadedPlugin {
        snapshotter: name.to_owned(),
        role: if policy.is_some() { Role::Policy } else { Role::Backend },
        policy,
        config: p.clone(),
        loaded_at: std::time::SystemTime::now(),
        reload_error: None,
        wasm: wasm.clone(),
    }
}

#[allow(clippy::too_many_arguments)]
fn open_plugin(
    space: &str,
    role: Role,
    config: &PluginConfig,
    plugins: &Plugins,
    place: &Place<'_>,
    (dir, path): (Dir, PathBuf),
    next: Option<Arc<dyn Backend>>,
) -> Result<Arc<WasmSnapshotter>> {
    let plugin = plugins.load(config)?;
    let space = Space::open(space, &dir, &path, place.db, role == Role::Backend, &config.limits)?;
    let wasm =
        WasmSnapshotter::open(plugin, space, next, config.limits.clone(), &config.config_json())
            .map_err(|e| e.context(format!("{role} plugin {}", config.path.display())))?;
    Ok(Arc::new(wasm))
}
