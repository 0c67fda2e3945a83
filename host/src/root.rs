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
//! content/blobs/sha256/<hex>  the content store's blobs (their records: metadata.db)
//! content/ingest/             blobs being written, renamed into blobs/ once verified
//! tmp/layers/                 private mount points of layer calls, for their length
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use cap_std::ambient_authority;
use cap_std::fs::Dir;

pub use crate::config::{
    Config, DEFAULT_SNAPSHOTTER, DriverConfig, PluginConfig, SnapshotterConfig,
};
use crate::content::ContentStore;
use crate::error::{Context, Error, Result};
use crate::fault::Faults;
use crate::gc::{Collector, GcReport, Scheduler, Trigger};
use crate::metadata::{
    CachePruneReport, Ctx, Leases, MetaDb, PrunePolicy, PruneProgress, Scope, Snapshotter,
};
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
    /// How each snapshotter is served; a reload may change its plugins' settings.
    configs: RwLock<BTreeMap<String, SnapshotterConfig>>,
    default_snapshotter: String,
    /// One slot per configured snapshotter: opening one never holds a lock another
    /// snapshotter's calls need.
    slots: BTreeMap<String, Slot>,
    plugins: Mutex<Vec<LoadedPlugin>>,
    /// One reload at a time.
    reloading: Mutex<()>,
    loader: Plugins,
    trigger: Arc<Trigger>,
    collector: Arc<Collector>,
    content: Arc<ContentStore>,
}

/// Where one snapshotter stands.
#[derive(Debug, Default)]
struct Slot {
    state: Mutex<SlotState>,
    opened: Condvar,
    /// A plugin serves it (a wasm driver or a policy); fixed until a restart.
    plugins: bool,
    /// Its driver makes a new snapshot by copying its parent (native); fixed until a
    /// restart.
    copies: bool,
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
        let content = Arc::new(ContentStore::open(&dir, db.clone(), faults.clone())?);
        let collector = Arc::new(
            Collector::new(db.clone(), faults.clone(), config.gc).with_content(content.clone()),
        );
        let cache = {
            let place = Place { root: &dir, root_path: &root, db: None };
            crate::stack::private_dir(&place, "plugins/cache")?.0
        };
        let slots = config
            .snapshotters
            .iter()
            .map(|(n, c)| {
                let copies = matches!(c.driver, crate::config::DriverConfig::Native);
                (n.clone(), Slot { plugins: c.has_plugins(), copies, ..Slot::default() })
            })
            .collect();
        Ok(Host {
            root,
            dir,
            db,
            faults,
            configs: RwLock::new(config.snapshotters),
            default_snapshotter: config.default_snapshotter,
            slots,
            plugins: Mutex::default(),
            reloading: Mutex::default(),
            loader: Plugins::new(Some(cache)),
            trigger: Arc::default(),
            collector,
            content,
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
            let known: Vec<&str> = self.slots.keys().map(String::as_str).collect();
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
        let config = self.configs.read().unwrap_or_else(|e| e.into_inner())[name].clone();
        let config = &config;
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

    /// Loads again the plugins of the snapshotters `names` (every snapshotter if none),
    /// without stopping them: each plugin whose file or settings changed is swapped for
    /// its new version once that version has started, new calls go to it and calls in
    /// flight finish on the old one. A version that fails to load, check or `init` leaves
    /// the old one serving, with the reason in its [`LoadedPlugin::reload_error`] and the
    /// log.
    ///
    /// With `config` (the configuration file read again), plugins take their path, pin,
    /// `init` configuration and limits from it. Anything else about a snapshotter (its
    /// driver, how many policies it has, their order) applies only from a restart: a
    /// snapshotter whose configuration changed that way is reported failed, untouched.
    pub fn reload(
        &self,
        names: &[String],
        config_file: Option<&Config>,
    ) -> Result<Vec<ReloadReport>> {
        if let Some(unknown) = names.iter().find(|n| !self.slots.contains_key(*n)) {
            let known: Vec<&str> = self.slots.keys().map(String::as_str).collect();
            return Err(Error::not_found(format!(
                "snapshotter {unknown:?} (configured: {})",
                known.join(", ")
            )));
        }
        {
            let configs = self.configs.read().unwrap_or_else(|e| e.into_inner());
            let plain = |n: &&String| !configs[n.as_str()].has_plugins();
            if let Some(plain) = names.iter().find(plain) {
                return Err(Error::invalid_argument(format!(
                    "snapshotter {plain:?} runs no plugin: there is nothing to reload"
                )));
            }
        }
        let _one = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let targets: Vec<&String> = match names {
            [] => self.slots.keys().collect(),
            _ => names.iter().collect(),
        };
        let mut reports = Vec::new();
        for name in targets {
            // The snapshotter's configuration after this reload, or why the new one
            // cannot be taken.
            let mut config =
                self.configs.read().unwrap_or_else(|e| e.into_inner())[name.as_str()].clone();
            let mut refused = None;
            let mut changed = false;
            if let Some(new) = config_file {
                match new.snapshotters.get(name.as_str()) {
                    None => {
                        refused = Some(format!(
                            "snapshotter {name:?} is no longer in the configuration; it is removed at the next start"
                        ))
                    }
                    Some(c) if !same_but_plugins(&config, c) => {
                        refused = Some(format!(
                            "snapshotter {name:?} changed beyond its plugins' settings (driver, policies or their order); that applies at the next start"
                        ))
                    }
                    Some(c) => {
                        changed = *c != config;
                        config = c.clone();
                    }
                }
            }
            let mine: Vec<LoadedPlugin> =
                self.loaded_plugins().into_iter().filter(|p| &p.snapshotter == name).collect();
            if mine.is_empty() && (!names.is_empty() || refused.is_some()) {
                // Named, or changed in a way a reload cannot apply: say so, even for a
                // snapshotter with no plugin open (a native driver's options, say).
                let outcome =
                    if refused.is_some() { ReloadOutcome::Failed } else { ReloadOutcome::NotOpen };
                if let Some(why) = &refused {
                    tracing::warn!(snapshotter = %name, "reload: {why}");
                }
                reports.push(ReloadReport {
                    plugin: name.clone(),
                    path: PathBuf::new(),
                    from: String::new(),
                    to: String::new(),
                    outcome,
                    error: refused.clone(),
                });
            }
            let mut all_serve = true;
            for p in mine {
                let wanted = match p.policy {
                    Some(i) => config.policies.get(i).cloned(),
                    None => match &config.driver {
                        DriverConfig::Wasm(c) => Some(c.clone()),
                        _ => None,
                    },
                }
                .unwrap_or_else(|| p.config.clone());
                let report = self.reload_one(&p, &wanted, refused.clone());
                all_serve &= report.outcome != ReloadOutcome::Failed;
                reports.push(report);
            }
            // Kept for the snapshotter's next opening only once every plugin of it runs
            // the new settings (or it is not open): what opens is what was serving.
            if changed && refused.is_none() && all_serve {
                self.configs
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(name.clone(), config);
            }
        }
        Ok(reports)
    }

    fn reload_one(
        &self,
        p: &LoadedPlugin,
        wanted: &PluginConfig,
        refused: Option<String>,
    ) -> ReloadReport {
        let old = p.wasm.plugin();
        let from = old.info().digest.clone();
        let tried = match refused {
            Some(why) => Err(Error::failed_precondition(why)),
            None => self.loader.load(wanted).and_then(|new| {
                if new.info().digest == from && *wanted == p.config {
                    return Ok((new, false));
                }
                p.wasm
                    .reload(new.clone(), wanted.limits.clone(), &wanted.config_json())
                    .map(|()| (new, true))
            }),
        };
        let mut report = ReloadReport {
            plugin: p.id(),
            path: wanted.path.clone(),
            from: from.clone(),
            to: from,
            outcome: ReloadOutcome::Unchanged,
            error: None,
        };
        let now = std::time::SystemTime::now();
        let mut plugins = self.plugins.lock().unwrap_or_else(|e| e.into_inner());
        let entry = plugins.iter_mut().find(|e| Arc::ptr_eq(&e.wasm, &p.wasm));
        match tried {
            Ok((_, false)) => {}
            Ok((new, true)) => {
                report.to = new.info().digest.clone();
                report.outcome = ReloadOutcome::Reloaded;
                tracing::info!(plugin = %report.plugin, from = %report.from, to = %report.to, "plugin reloaded");
                if let Some(e) = entry {
                    e.config = wanted.clone();
                    e.loaded_at = now;
                    e.reload_error = None;
                }
            }
            Err(error) => {
                tracing::warn!(plugin = %report.plugin, error = %error, "reload failed; the version loaded before keeps serving");
                report.outcome = ReloadOutcome::Failed;
                report.error = Some(error.to_string());
                if let Some(e) = entry {
                    e.reload_error = Some((error.to_string(), now));
                }
            }
        }
        report
    }

    /// The snapshotter commands use when they name none.
    pub fn default_snapshotter(&self) -> &str {
        &self.default_snapshotter
    }

    /// Names of the configured snapshotters.
    pub fn snapshotter_names(&self) -> impl Iterator<Item = &str> {
        self.slots.keys().map(String::as_str)
    }

    /// Whether a snapshotter called `name` is configured.
    pub fn is_configured(&self, name: &str) -> bool {
        self.slots.contains_key(name)
    }

    /// Whether a plugin serves the snapshotter called `name` (its driver, or a policy in
    /// front of it), so that its calls run guest code; None if it is not configured.
    /// Fixed for the host's life: a reload changes only the plugins' own settings.
    pub fn runs_plugins(&self, name: &str) -> Option<bool> {
        self.slots.get(name).map(|s| s.plugins)
    }

    /// Whether the snapshotter called `name` makes a new snapshot by copying its parent
    /// (the native driver), so that the time a prepare or a view takes grows with the
    /// parent's data; None if it is not configured. Fixed for the host's life.
    pub fn copies_on_create(&self, name: &str) -> Option<bool> {
        self.slots.get(name).map(|s| s.copies)
    }

    /// How each configured snapshotter is served (with its plugins' settings as last
    /// reloaded).
    pub fn configs(&self) -> BTreeMap<String, SnapshotterConfig> {
        self.configs.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The root's content store.
    pub fn content(&self) -> &Arc<ContentStore> {
        &self.content
    }

    /// Layer operations (apply, diff, register) on `snapshotter`, with this root's
    /// content store and private mount points under `<root>/tmp/layers`.
    pub fn layers<'a>(
        &'a self,
        snapshotter: &'a Snapshotter,
    ) -> crate::layer::snapshot::Layers<'a> {
        crate::layer::snapshot::Layers::new(
            snapshotter,
            &self.content,
            &self.root.join("tmp/layers"),
        )
    }

    /// Imports the image at `path` (an OCI layout, or a tar of one or of `docker save`)
    /// into `snapshotter` and the content store (see [`crate::image::import`]).
    pub fn import_image(
        &self,
        ctx: &Ctx,
        snapshotter: &str,
        path: &Path,
        platform: Option<&str>,
        progress: &mut dyn FnMut(crate::image::Event<'_>),
    ) -> Result<crate::image::Imported> {
        let sn = self.snapshotter(snapshotter)?;
        let layers = self.layers(&sn);
        crate::image::import(&layers, &self.content, &self.leases(), ctx, path, platform, progress)
    }

    /// The lease manager.
    pub fn leases(&self) -> Leases {
        Leases::new(self.db.clone()).with_trigger(self.trigger.clone())
    }

    /// Deletes a lease; with `sync`, collects before returning, so what only the lease
    /// held is gone when this returns (containerd's synchronous delete), and the report
    /// says what went. A sync delete does not also wake the background collector, which
    /// could take first what the caller's own collection is to report; it is woken only
    /// if that collection fails or leaves something undone.
    pub fn delete_lease(&self, ctx: &Ctx, id: &str, sync: bool) -> Result<Option<GcReport>> {
        if !sync {
            return self.leases().delete(ctx, id).map(|()| None);
        }
        // Deleted under the collection lock: no collection, in the background or for
        // another caller, runs between the deletion and this one's mark.
        let leases = Leases::new(self.db.clone());
        let deleted = std::cell::Cell::new(false);
        let collected = self.collect_after(false, || {
            leases.delete(ctx, id)?;
            deleted.set(true);
            Ok(())
        });
        // What this collection could not finish is left to the background one, as a
        // plain delete would.
        let unfinished = match &collected {
            Ok(report) => !report.failed.is_empty(),
            Err(_) => deleted.get(),
        };
        if unfinished {
            crate::metadata::Changes::deletion(&*self.trigger);
        }
        collected.map(|report| Some(GcReport { deleted_lease: Some(id.to_owned()), ..report }))
    }

    /// Every configured snapshotter that opens; those that do not are reported.
    fn open_all(&self) -> (Vec<Arc<Snapshotter>>, Vec<(String, Error)>) {
        let mut open = Vec::new();
        let mut failed = Vec::new();
        for name in self.slots.keys() {
            match self.snapshotter(name) {
                Ok(s) => open.push(s),
                Err(e) => failed.push((format!("snapshotter {name:?}"), e)),
            }
        }
        (open, failed)
    }

    /// Runs one garbage collection over every snapshotter that can be opened here.
    pub fn collect(&self, dry_run: bool) -> Result<GcReport> {
        self.collect_after(dry_run, || Ok(()))
    }

    /// One collection, with `before` run first under the collection lock.
    fn collect_after(
        &self,
        dry_run: bool,
        before: impl FnOnce() -> Result<()>,
    ) -> Result<GcReport> {
        let (open, unavailable) = self.open_all();
        let mut report = self.collector.collect_after(&open, dry_run, before)?;
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
    /// records whose backend snapshot is missing. Changes nothing. A collection in
    /// progress is waited for (its swept records' backend snapshots are not orphans
    /// yet, only not pruned yet), and none starts until the check is done.
    pub fn check(&self) -> Result<Vec<CheckReport>> {
        let timeout = Duration::from_millis(self.collector.options().backend_timeout_ms);
        let (open, _) = self.open_all();
        self.collector.between_collections(|| {
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
        })
    }

    /// Calls `f` at the end of every garbage collection of this host, background or
    /// asked for (see [`Collector::observe`]: one observer per host).
    pub fn observe_collections(
        &self,
        f: impl Fn(&crate::gc::Collected<'_>) + Send + Sync + 'static,
    ) -> Result<()> {
        self.collector.observe(f)
    }

    /// Starts collecting in the background as the configuration's `[gc]` says, each
    /// collection after the `[[gc.prune]]` policies; collections stop when the returned
    /// scheduler is dropped.
    pub fn start_gc(self: &Arc<Self>) -> Result<Scheduler> {
        let host = Arc::downgrade(self);
        let opts = self.collector.options().clone();
        Scheduler::start(self.trigger.clone(), opts, move || match host.upgrade() {
            Some(h) => {
                h.apply_prune_policies();
                h.collect(false)
            }
            None => Err(Error::unavailable("host closed")),
        })
    }

    /// Bytes free (for an unprivileged user) on the root's filesystem.
    pub fn free_space(&self) -> Result<u64> {
        let st = rustix::fs::fstatvfs(&self.dir).context("statvfs of the root")?;
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }

    /// Prunes snapshotter `name` in `scope` by `policy` (see
    /// [`Snapshotter::prune_cache`]), min-free-space measured on the root's filesystem.
    pub fn prune_cache(
        &self,
        name: &str,
        scope: Scope<'_>,
        policy: &PrunePolicy,
        dry_run: bool,
        progress: &mut dyn FnMut(PruneProgress<'_>),
    ) -> Result<CachePruneReport> {
        let free = if policy.min_free_space > 0 { self.free_space()? } else { 0 };
        self.snapshotter(name)?.prune_cache(scope, policy, free, dry_run, progress)
    }

    /// Applies the configuration's `[[gc.prune]]` policies, in order, each to its
    /// snapshotters and namespaces; what went and what failed is logged. Returns the
    /// reports, per (policy index, snapshotter, namespace or `*`).
    pub fn apply_prune_policies(&self) -> Vec<(usize, String, String, Result<CachePruneReport>)> {
        let mut out = Vec::new();
        for (i, rule) in self.collector.options().prune.iter().enumerate() {
            let policy = match rule.policy() {
                Ok(p) => p,
                Err(e) => {
                    out.push((i, String::new(), String::new(), Err(e)));
                    continue;
                }
            };
            let names: Vec<String> = if rule.snapshotters.is_empty() {
                self.open_all().0.iter().map(|s| s.name().to_owned()).collect()
            } else {
                rule.snapshotters.clone()
            };
            for name in names {
                let namespaces: Vec<Option<&str>> = if rule.namespaces.is_empty() {
                    vec![None]
                } else {
                    rule.namespaces.iter().map(|n| Some(n.as_str())).collect()
                };
                for ns in namespaces {
                    let scope = ns.map_or(Scope::All, Scope::Namespace);
                    let r = self.prune_cache(&name, scope, &policy, false, &mut |_| {});
                    match &r {
                        Ok(r) if !r.removed.is_empty() || !r.failed.is_empty() => {
                            tracing::info!(policy = i, snapshotter = %name, namespace = ns.unwrap_or("*"),
                                removed = r.removed.len(), freed = r.freed, failed = r.failed.len(),
                                "prune policy")
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!(policy = i, snapshotter = %name, error = %e,
                            "prune policy failed; will retry"),
                    }
                    out.push((i, name.clone(), ns.unwrap_or("*").to_owned(), r));
                }
            }
        }
        out
    }

    /// The root, the snapshotters (with `selected` as the caller's choice), and what this
    /// machine supports.
    pub fn info(&self, selected: &str) -> HostInfo {
        let support = Support::probe(&self.root);
        let snapshotters = self
            .configs()
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

    /// Why the root's database refuses every write until it is reopened (a write failed
    /// on I/O: see `kv`), if it does. A daemon then stops, so that it is started again.
    pub fn database_broken(&self) -> Option<String> {
        self.db.db().broken()
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

/// What a reload did to one plugin.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReloadReport {
    /// The plugin: its snapshotter, and `/policy-<i>` for a policy.
    pub plugin: String,
    /// The `.wasm` it was (to be) loaded from.
    pub path: PathBuf,
    /// sha256 of the version serving before.
    pub from: String,
    /// sha256 of the version serving after.
    pub to: String,
    /// What happened.
    pub outcome: ReloadOutcome,
    /// Why it failed (or, for a snapshotter not open, why its new configuration was not
    /// taken).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// How a reload went for one plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReloadOutcome {
    /// The new version serves.
    Reloaded,
    /// Neither the file nor its settings changed.
    Unchanged,
    /// The old version keeps serving; see the error.
    Failed,
    /// The snapshotter is not open: it loads its plugins at first use.
    NotOpen,
}

/// Whether two configurations of a snapshotter differ at most in their plugins'
/// settings: what a reload can apply.
fn same_but_plugins(a: &SnapshotterConfig, b: &SnapshotterConfig) -> bool {
    let blank = |c: &SnapshotterConfig| {
        let mut c = c.clone();
        for p in &mut c.policies {
            *p = PluginConfig::new("");
        }
        if let DriverConfig::Wasm(p) = &mut c.driver {
            *p = PluginConfig::new("");
        }
        c
    };
    blank(a) == blank(b)
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

/// Makes `path` and what is missing above it (owner-only), each made one's name synced
/// into its parent. A parent this process may not read (write and search only) cannot
/// be synced: that is logged, not an error.
fn create_private_dir(path: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let missing: Vec<&Path> = path.ancestors().take_while(|p| !p.exists()).collect();
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(path)?;
    for made in missing.iter().rev() {
        match crate::fsutil::sync_parent(made) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                tracing::warn!(path = %made.display(), error = %e,
                    "cannot sync a new directory's name into its parent");
            }
            Err(e) => {
                let at = made.parent().unwrap_or(made).display().to_string();
                return Err(Error::from(e).context(format!("sync {at}")));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Labels;

    #[test]
    fn a_sync_lease_delete_collects_itself_and_wakes_no_background_collection() {
        // The background collector could take first what the caller's own collection
        // is to report: a sync delete does not wake it; a plain one does.
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let faults = Arc::new(Faults::new());
        let host = Host::open_with(dir.path(), faults.clone()).unwrap();
        let ctx = Ctx::new("default").unwrap();
        for (sync, woken) in [(false, 1), (true, 0), (false, 1)] {
            host.leases().create(&ctx, Some("l"), &Labels::new()).unwrap();
            let before = host.trigger.wakes();
            let report = host.delete_lease(&ctx, "l", sync).unwrap();
            assert_eq!(report.map(|r| r.deleted_lease), sync.then(|| Some("l".to_owned())));
            assert_eq!(host.trigger.wakes() - before, woken, "sync {sync}");
        }
        // A collection that fails after the deletion leaves the rest to the background.
        faults.arm("gc.before-prune", crate::fault::Action::Error);
        host.leases().create(&ctx, Some("l"), &Labels::new()).unwrap();
        let before = host.trigger.wakes();
        assert!(host.delete_lease(&ctx, "l", true).is_err());
        assert_eq!(host.trigger.wakes() - before, 1);
        assert!(host.leases().list(&ctx, &[]).unwrap().is_empty(), "the lease went");
        faults.disarm("gc.before-prune");
        // A lease that is not there: not found, with or without sync.
        let before = host.trigger.wakes();
        for sync in [false, true] {
            let err = host.delete_lease(&ctx, "l", sync).unwrap_err();
            assert_eq!(err.kind(), crate::error::ErrorKind::NotFound);
        }
        assert_eq!(host.trigger.wakes(), before, "nothing deleted, nothing woken");
    }

    /// A commit onto another parent is refused on a driver that stages its records in
    /// the root's database too (the commit's other path).
    #[test]
    fn a_staged_commit_onto_another_parent_is_refused() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let host = Host::open_with(dir.path(), Arc::new(Faults::new())).unwrap();
        let sn = host.snapshotter("native").unwrap();
        assert!(sn.backend().stages_records(), "the staged path is the one under test");
        let (ctx, none) = (Ctx::new("default").unwrap(), Labels::new());
        for base in ["base", "other"] {
            sn.prepare(&ctx, "a", None, &none).unwrap();
            sn.commit(&ctx, base, "a", &none).unwrap();
        }
        sn.prepare(&ctx, "top", Some("base"), &none).unwrap();
        let err = sn.commit_onto(&ctx, "layer", "top", Some("other"), &none).unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::NotImplemented, "{err}");
        assert_eq!(sn.stat(&ctx, "top").unwrap().kind, crate::Kind::Active);
        sn.commit_onto(&ctx, "layer", "top", Some("base"), &none).unwrap();
        assert_eq!(sn.stat(&ctx, "layer").unwrap().parent.as_deref(), Some("base"));
    }
}
