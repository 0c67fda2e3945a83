//! Start-up: turning a root path into the running stack.
//!
//! Architecture invariant: this is the only module that calls `ambient_authority()`.
//! Everything below it receives directory capabilities.
//!
//! Layout of a root:
//! ```text
//! metadata.db                 the root's one database: the metadata (namespaces, keys,
//!                             labels, links, leases), each driver's records, each
//!                             plugin's layer registry and key-value store
//! snapshotters/<name>/        each snapshotter's own directory, its backend's to manage
//!                             (a wasm backend's root: the only directory it sees)
//! policies/<name>/<i>-<stem>/ the root of the i-th policy plugin in front of <name>
//! plugins/cache/              compiled plugins, keyed by content and engine
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use cap_std::ambient_authority;
use cap_std::fs::Dir;

pub use crate::config::{
    Config, DEFAULT_SNAPSHOTTER, DriverConfig, PluginConfig, SnapshotterConfig,
};
use crate::error::{Context, Error, Result};
use crate::fault::Faults;
use crate::gc::{Collector, GcReport, Scheduler, Trigger};
use crate::metadata::{Ctx, Leases, MetaDb, Snapshotter};
use crate::plugin::Plugin;
use crate::probe::Support;
pub use crate::stack::LoadedPlugin;
use crate::stack::{Place, Plugins};

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
    /// One slot per configured snapshotter: opening one never holds a lock another
    /// snapshotter's calls need.
    slots: BTreeMap<String, Slot>,
    plugins: Mutex<Vec<LoadedPlugin>>,
    loader: Plugins,
    trigger: Arc<Trigger>,
    collector: Arc<Collector>,
}

/// Where one snapshotter stands.
#[derive(Debug, Default)]
struct Slot {
    state: Mutex<SlotState>,
    opened: Condvar,
}

#[derive(Debug, Default)]
enum SlotState {
    #[default]
    Closed,
    Opening,
    Open(Arc<Snapshotter>),
    /// The last open failed; another is not tried before `retry`.
    Failed {
        error: Error,
        retry: Instant,
        attempts: u32,
    },
}

/// Waits between attempts to open a snapshotter that failed: doubling from the first,
/// up to the last.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// How a configured snapshotter stands, for `status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum SnapshotterState {
    /// Not asked for yet (snapshotters open on first use).
    Closed,
    /// Being opened now.
    Opening,
    /// Serving.
    Open,
    /// Its last open failed; the reason, and when it is tried again (seconds from now).
    Failed {
        /// Why.
        error: String,
        /// Attempts so far.
        attempts: u32,
        /// Seconds until the next attempt may run.
        retry_in_secs: u64,
    },
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
        let at = |what: &str| format!("{what} {}", root.display());
        create_private_dir(root).with_context(|| at("create root"))?;
        let root = root.canonicalize().with_context(|| at("resolve root"))?;
        let dir =
            Dir::open_ambient_dir(&root, ambient_authority()).with_context(|| at("open root"))?;
        let db = Arc::new(MetaDb::open(&dir)?);
        let collector = Arc::new(Collector::new(db.clone(), faults.clone(), config.gc));
        let cache = {
            let place = Place { root: &dir, root_path: &root, db: None };
            crate::stack::private_dir(&place, "plugins/cache")?.0
        };
        let slots = config.snapshotters.keys().map(|n| (n.clone(), Slot::default())).collect();
        Ok(Host {
            root,
            dir,
            db,
            faults,
            configs: config.snapshotters,
            default_snapshotter: config.default_snapshotter,
            slots,
            plugins: Mutex::default(),
            loader: Plugins::new(Some(cache)),
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

    /// The snapshotter called `name`, opening its stack on first use. Callers of one
    /// snapshotter wait for its opening; nobody else does. A snapshotter that failed to
    /// open is tried again on use, at most once a second at first and at least once a
    /// minute, and says why in the meantime.
    pub fn snapshotter(&self, name: &str) -> Result<Arc<Snapshotter>> {
        let slot = self.slots.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.configs.keys().map(String::as_str).collect();
            Error::not_found(format!("snapshotter {name:?} (configured: {})", known.join(", ")))
        })?;
        let mut st = slot.state.lock().unwrap_or_else(|e| e.into_inner());
        let attempts = loop {
            match &*st {
                SlotState::Open(s) => return Ok(s.clone()),
                SlotState::Opening => {
                    st = slot.opened.wait(st).unwrap_or_else(|e| e.into_inner());
                }
                SlotState::Failed { error, retry, attempts } => {
                    if Instant::now() < *retry {
                        return Err(error.clone());
                    }
                    break *attempts;
                }
                SlotState::Closed => break 0,
            }
        };
        *st = SlotState::Opening;
        drop(st);
        let opened = self.open_snapshotter(name);
        let mut st = slot.state.lock().unwrap_or_else(|e| e.into_inner());
        *st = match &opened {
            Ok(s) => SlotState::Open(s.clone()),
            Err(error) => {
                let wait = RETRY_FIRST.saturating_mul(1 << attempts.min(6)).min(RETRY_MAX);
                // The caller gets the error (the CLI prints it, the daemon logs it at
                // start and answers it); `status` keeps it. A warning here would say it
                // twice.
                tracing::info!(snapshotter = name, error = %error, retry_in = ?wait, "could not open the snapshotter");
                SlotState::Failed {
                    error: error.clone(),
                    retry: Instant::now() + wait,
                    attempts: attempts + 1,
                }
            }
        };
        slot.opened.notify_all();
        opened
    }

    fn open_snapshotter(&self, name: &str) -> Result<Arc<Snapshotter>> {
        let config = &self.configs[name];
        let place = Place { root: &self.dir, root_path: &self.root, db: Some(self.db.db()) };
        let stack = crate::stack::open(name, config, &place, &self.faults, &self.loader)
            .map_err(|e| e.context(format!("snapshotter {name:?}")))?;
        let s = Snapshotter::new(self.db.clone(), name, stack.backend.clone(), self.faults.clone())
            .with_trigger(self.trigger.clone())
            .with_shared_db(stack.shared_db);
        let recovered =
            s.recover().map_err(|e| e.context(format!("snapshotter {name:?}: recover commits")));
        if let Err(e) = recovered {
            let _ = stack.backend.close();
            return Err(e);
        }
        self.plugins.lock().unwrap_or_else(|e| e.into_inner()).extend(stack.plugins);
        Ok(Arc::new(s))
    }

    /// How each configured snapshotter stands.
    pub fn snapshotter_states(&self) -> BTreeMap<String, SnapshotterState> {
        let now = Instant::now();
        self.slots
            .iter()
            .map(|(name, slot)| {
                let st = match &*slot.state.lock().unwrap_or_else(|e| e.into_inner()) {
                    SlotState::Closed => SnapshotterState::Closed,
                    SlotState::Opening => SnapshotterState::Opening,
                    SlotState::Open(_) => SnapshotterState::Open,
                    SlotState::Failed { error, retry, attempts } => SnapshotterState::Failed {
                        error: error.to_string(),
                        attempts: *attempts,
                        retry_in_secs: retry.saturating_duration_since(now).as_secs(),
                    },
                };
                (name.clone(), st)
            })
            .collect()
    }

    /// Compiles the plugin `config` names (or loads it from the root's cache), checked
    /// against its pinned digest.
    pub fn load_plugin(&self, config: &PluginConfig) -> Result<Arc<Plugin>> {
        self.loader.load(config)
    }

    /// The plugin cache directory (compiled components).
    pub fn plugin_cache(&self) -> Result<Dir> {
        let place = Place { root: &self.dir, root_path: &self.root, db: None };
        crate::stack::private_dir(&place, "plugins/cache").map(|(d, _)| d)
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
    fn open_all(&self) -> (Vec<Arc<Snapshotter>>, Vec<(String, Error)>) {
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
                    damaged: s.damaged(timeout)?,
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
            None => Err(Error::unavailable("host closed")),
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
        self.slots.get(name).is_some_and(|slot| {
            matches!(*slot.state.lock().unwrap_or_else(|e| e.into_inner()), SlotState::Open(_))
        })
    }

    /// Closes every backend opened so far.
    pub fn close(&self) -> Result<()> {
        let mut first_error = None;
        for slot in self.slots.values() {
            if let SlotState::Open(s) = &*slot.state.lock().unwrap_or_else(|e| e.into_inner())
                && let Err(e) = s.close()
            {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
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
    /// Backend keys the backend has a record of but whose data is missing or damaged,
    /// with what is wrong.
    #[serde(default)]
    pub damaged: Vec<(String, String)>,
}

impl CheckReport {
    /// How many problems it lists.
    pub fn problems(&self) -> usize {
        self.orphans.len() + self.missing.len() + self.damaged.len()
    }
}

fn create_private_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(path)
}
