//! Start-up: turning a root path into the running stack.
//!
//! Architecture invariant: this is the only module that calls `ambient_authority()`.
//! Everything below it receives directory capabilities.
//!
//! Layout of a root:
//! ```text
//! metadata.db                 the host's metadata (namespaces, keys, labels, links)
//! snapshotters/<name>/        each snapshotter's own directory, its backend's to manage
//!                             (a wasm backend's root: the only directory it sees)
//! policies/<name>/<i>-<stem>/ the root of the i-th policy plugin in front of <name>
//! plugins/cache/              compiled plugins, keyed by content and engine
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cap_std::ambient_authority;
use cap_std::fs::Dir;

pub use crate::config::{Config, DriverConfig, PluginConfig, SnapshotterConfig};
use crate::driver::{Btrfs, Native, Overlay};
use crate::error::{Error, Result};
use crate::fault::Faults;
use crate::gc::{Collector, GcReport, Scheduler, Trigger};
use crate::metadata::{Ctx, Leases, MetaDb, Snapshots};
use crate::plugin::{Plugin, Role, WasmSnapshotter};
use crate::probe::Support;
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
    configs: BTreeMap<String, SnapshotterConfig>,
    default_snapshotter: String,
    opened: Mutex<BTreeMap<String, Arc<Snapshots>>>,
    plugins: Mutex<Vec<LoadedPlugin>>,
    trigger: Arc<Trigger>,
    collector: Arc<Collector>,
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
        let collector = Arc::new(Collector::new(db.clone(), faults.clone(), config.gc));
        Ok(Host {
            root,
            dir,
            db,
            faults,
            configs: config.snapshotters,
            default_snapshotter: config.default_snapshotter,
            opened: Mutex::new(BTreeMap::new()),
            plugins: Mutex::default(),
            trigger: Arc::default(),
            collector,
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
        let s = Arc::new(
            Snapshots::new(self.db.clone(), name, backend, self.faults.clone())
                .with_trigger(self.trigger.clone()),
        );
        opened.insert(name.to_owned(), s.clone());
        Ok(s)
    }

    fn open_driver(&self, name: &str, config: &SnapshotterConfig) -> Result<Arc<dyn Snapshotter>> {
        let (dir, path) = self.private_dir(&format!("snapshotters/{name}"))?;
        let mut backend: Arc<dyn Snapshotter> = match &config.driver {
            DriverConfig::Native => Arc::new(Native::open(dir, path, self.faults.clone())?),
            DriverConfig::Overlay(opts) => {
                Arc::new(Overlay::open(dir, path, self.faults.clone(), opts.clone())?)
            }
            DriverConfig::Btrfs => Arc::new(Btrfs::open(dir, path, self.faults.clone())?),
            DriverConfig::Wasm(p) => self.open_plugin(name, Role::Backend, p, dir, path, None)?,
        };
        // The first policy listed sees a call first, so the chain is built from the back.
        for (i, p) in config.policies.iter().enumerate().rev() {
            let stem = p.path.file_stem().and_then(|s| s.to_str()).unwrap_or("policy");
            let (dir, path) = self.private_dir(&format!("policies/{name}/{i}-{stem}"))?;
            backend = self.open_plugin(name, Role::Policy, p, dir, path, Some(backend))?;
        }
        Ok(backend)
    }

    /// A directory under the root, created if needed (owner-only), with its host path.
    fn private_dir(&self, rel: &str) -> Result<(Dir, PathBuf)> {
        let io = |what: &'static str| {
            let rel = rel.to_owned();
            move |e: std::io::Error| Error::internal(format!("{what} {rel}"), e)
        };
        let mut builder = cap_std::fs::DirBuilder::new();
        {
            use cap_std::fs::DirBuilderExt;
            builder.recursive(true).mode(0o700);
        }
        self.dir.create_dir_with(rel, &builder).map_err(io("create"))?;
        let dir = self.dir.open_dir(rel).map_err(io("open"))?;
        Ok((dir, self.root.join(rel)))
    }

    fn open_plugin(
        &self,
        snapshotter: &str,
        role: Role,
        config: &PluginConfig,
        dir: Dir,
        path: PathBuf,
        next: Option<Arc<dyn Snapshotter>>,
    ) -> Result<Arc<dyn Snapshotter>> {
        let plugin = self.load_plugin(&config.path)?;
        let wasm = WasmSnapshotter::open(
            plugin.clone(),
            dir,
            path,
            next,
            config.limits.clone(),
            &config.config_json(),
        )?;
        let wasm = Arc::new(wasm);
        self.plugins.lock().unwrap_or_else(|e| e.into_inner()).push(LoadedPlugin {
            snapshotter: snapshotter.to_owned(),
            role,
            path: config.path.clone(),
            wasm: wasm.clone(),
        });
        Ok(wasm)
    }

    /// Compiles the plugin at `path` (or loads it from the root's cache).
    pub fn load_plugin(&self, path: &Path) -> Result<Arc<Plugin>> {
        let wasm = std::fs::read(path)
            .map_err(|e| Error::InvalidArgument(format!("plugin {}: {e}", path.display())))?;
        let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("plugin");
        let (cache, _) = self.private_dir("plugins/cache")?;
        Plugin::load(name, &wasm, Some(&cache))
    }

    /// The plugin cache directory (compiled components).
    pub fn plugin_cache(&self) -> Result<Dir> {
        self.private_dir("plugins/cache").map(|(d, _)| d)
    }

    /// Every plugin this host has started so far, with the snapshotter it serves.
    pub fn loaded_plugins(&self) -> Vec<LoadedPlugin> {
        self.plugins.lock().unwrap_or_else(|e| e.into_inner()).clone()
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
    pub fn configs(&self) -> &BTreeMap<String, SnapshotterConfig> {
        &self.configs
    }

    /// The lease manager.
    pub fn leases(&self) -> Leases {
        Leases::new(self.db.clone())
    }

    /// Deletes a lease; with `sync`, collects before returning, so what only the lease
    /// held is gone when this returns (containerd's synchronous delete).
    pub fn delete_lease(&self, ctx: &Ctx, id: &str, sync: bool) -> Result<Option<GcReport>> {
        self.leases().delete(ctx, id)?;
        if sync { self.collect(false).map(Some) } else { Ok(None) }
    }

    /// Every configured snapshotter that opens; those that do not are reported.
    fn open_all(&self) -> (Vec<Arc<Snapshots>>, Vec<(String, Error)>) {
        let mut open = Vec::new();
        let mut failed = Vec::new();
        for name in self.configs.keys() {
            match self.snapshotter(name) {
                Ok(s) => open.push(s),
                Err(e) => failed.push((format!("snapshotter {name:?}"), e)),
            }
        }
        (open, failed)
    }

    /// Runs one garbage collection over every snapshotter that can be opened here.
    pub fn collect(&self, dry_run: bool) -> Result<GcReport> {
        let (open, unavailable) = self.open_all();
        let mut report = self.collector.collect(&open, dry_run)?;
        // A snapshotter that cannot run here is not an error of the collection: its
        // records were swept all the same, and its backend is pruned where it runs.
        report.failed.extend(
            unavailable
                .into_iter()
                .filter(|(_, e)| e.kind() != crate::error::ErrorKind::FailedPrecondition)
                .map(|(what, e)| (what, e.to_string())),
        );
        Ok(report)
    }

    /// For every snapshotter that opens: backend snapshots no record names, and
    /// records whose backend snapshot is missing. Changes nothing.
    pub fn check(&self) -> Result<Vec<CheckReport>> {
        let timeout = Duration::from_millis(self.collector.options().backend_timeout_ms);
        let (open, _) = self.open_all();
        open.iter()
            .map(|s| {
                Ok(CheckReport {
                    snapshotter: s.name().to_owned(),
                    orphans: s.orphans(timeout)?,
                    missing: s.missing(timeout)?,
                })
            })
            .collect()
    }

    /// Starts collecting in the background as the configuration's `[gc]` says;
    /// collections stop when the returned scheduler is dropped.
    pub fn start_gc(self: &Arc<Self>) -> Result<Scheduler> {
        let host = Arc::downgrade(self);
        let opts = self.collector.options().clone();
        Scheduler::start(self.trigger.clone(), opts, move || match host.upgrade() {
            Some(h) => h.collect(false),
            None => Err(Error::Unavailable("host closed".into())),
        })
    }

    /// The root, the snapshotters (with `selected` as the caller's choice), and what this
    /// machine supports.
    pub fn info(&self, selected: &str) -> HostInfo {
        let support = Support::probe(&self.root);
        let snapshotters = self
            .configs
            .iter()
            .map(|(name, config)| {
                let note = driver_phrase(&config.driver, &support);
                let note = match config.policies.len() {
                    0 => note,
                    n => format!("{note}; behind {n} policy plugin(s)"),
                };
                SnapshotterNote { name: name.clone(), note }
            })
            .collect();
        HostInfo {
            root: self.root.clone(),
            selected_snapshotter: selected.to_owned(),
            default_snapshotter: self.default_snapshotter().to_owned(),
            snapshotters,
            support,
        }
    }

    /// Whether the snapshotter `name` has been opened (they open on first use).
    pub fn is_open(&self, name: &str) -> bool {
        self.opened.lock().unwrap_or_else(|e| e.into_inner()).contains_key(name)
    }

    /// Closes every backend opened so far.
    pub fn close(&self) -> Result<()> {
        let opened = self.opened.lock().unwrap_or_else(|e| e.into_inner());
        opened.values().try_for_each(|s| s.close())
    }
}

/// A plugin a [`Host`] started, and where.
#[derive(Debug, Clone)]
pub struct LoadedPlugin {
    /// The snapshotter it serves (as its backend or as one of its policies).
    pub snapshotter: String,
    /// Backend or policy.
    pub role: Role,
    /// The `.wasm` it was loaded from.
    pub path: PathBuf,
    /// The running plugin.
    pub wasm: Arc<WasmSnapshotter>,
}

/// What [`Host::info`] reports: the root, the snapshotters and what this machine supports.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct HostInfo {
    /// The state directory.
    pub root: PathBuf,
    /// The snapshotter the caller selected.
    pub selected_snapshotter: String,
    /// The configuration's default snapshotter.
    pub default_snapshotter: String,
    /// Every configured snapshotter, with why it is or is not usable here.
    pub snapshotters: Vec<SnapshotterNote>,
    /// What the kernel and the root's filesystem support.
    pub support: Support,
}

/// A snapshotter in a [`HostInfo`].
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SnapshotterNote {
    /// Its name.
    pub name: String,
    /// Its driver and whether it works here, in a phrase.
    pub note: String,
}

/// Why a driver is or is not usable here, in a phrase.
fn driver_phrase(driver: &DriverConfig, support: &Support) -> String {
    match driver {
        DriverConfig::Native => {
            "copies trees; works on any filesystem, needs no kernel feature".into()
        }
        DriverConfig::Overlay(_) if !support.overlay => {
            "unavailable: this kernel has no overlayfs".into()
        }
        DriverConfig::Overlay(_) if support.overlay_lowerdir_plus => {
            "overlayfs; layers mount one by one (lowerdir+), chains up to 500 layers".into()
        }
        DriverConfig::Overlay(_) => {
            "overlayfs; classic mount(2), chains bounded by one page of options".into()
        }
        DriverConfig::Btrfs if !support.btrfs => "unavailable: this kernel has no btrfs".into(),
        DriverConfig::Btrfs if !support.root_on_btrfs => format!(
            "unavailable here: the root is on {}, btrfs needs a btrfs root",
            support.root_filesystem
        ),
        DriverConfig::Btrfs => "btrfs subvolumes and snapshots".into(),
        DriverConfig::Wasm(p) => format!("WebAssembly plugin {}", p.path.display()),
    }
}

/// What [`Host::check`] found for one snapshotter.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CheckReport {
    /// The snapshotter.
    pub snapshotter: String,
    /// Backend keys no record names (what a collection would prune).
    pub orphans: Vec<String>,
    /// Backend keys records name that the backend does not have.
    pub missing: Vec<String>,
}

fn create_private_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(path)
}
