//! Factories for any snapshotter configuration: a native driver with its options, a
//! backend plugin, policies in front of either. Each case's directory gets the stack
//! the configuration describes, opened by [`wasnap::stack::open`], the same code that
//! opens it in a host, so `wasnap conformance` checks exactly what a daemon would run.
//!
//! A policy may set labels on what it passes on; the next snapshotter stores them, and
//! the suite's backend cases, which call the stack directly, would see labels the case
//! never gave. [`StackFactory::ignoring_labels`] names those labels, and they are left
//! out of everything the stack returns, so the suite checks the rest exactly.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use wasnap::backend::{FieldPath, Wrapper};
use wasnap::config::{DriverConfig, PluginConfig, SnapshotterConfig};
use wasnap::driver::overlay::OverlayOptions;
use wasnap::fault::Faults;
use wasnap::stack::{Place, Plugins};
use wasnap::{Backend, Context, Filter, Info};

/// A [`crate::Factory`] that opens a snapshotter configuration in each case's
/// directory. Compiled plugins are kept for the whole run.
#[derive(Debug, Clone)]
pub struct StackFactory {
    config: SnapshotterConfig,
    plugins: Arc<Plugins>,
    ignored: Arc<Vec<String>>,
}

impl StackFactory {
    /// The stack `config` describes.
    pub fn new(config: SnapshotterConfig) -> Self {
        StackFactory { config, plugins: Arc::new(Plugins::new(None)), ignored: Arc::default() }
    }

    /// The native copy driver.
    pub fn native() -> Self {
        Self::new(DriverConfig::Native.into())
    }

    /// The overlay driver with `opts`.
    pub fn overlay(opts: OverlayOptions) -> Self {
        Self::new(DriverConfig::Overlay(opts).into())
    }

    /// The btrfs driver (each case's directory must be on btrfs).
    pub fn btrfs() -> Self {
        Self::new(DriverConfig::Btrfs.into())
    }

    /// The backend plugin at `path`, configured by `plugin`'s other fields.
    pub fn plugin(plugin: PluginConfig) -> Self {
        Self::new(DriverConfig::Wasm(plugin).into())
    }

    /// The same stack with `policies` in front (the first sees calls first).
    #[must_use]
    pub fn with_policies(mut self, policies: Vec<PluginConfig>) -> Self {
        self.config.policies = policies;
        self
    }

    /// The same stack, with labels matching `patterns` (a key, or a prefix ending in
    /// `*`) left out of what it returns: the labels a policy in it sets.
    #[must_use]
    pub fn ignoring_labels(mut self, patterns: Vec<String>) -> Self {
        self.ignored = Arc::new(patterns);
        self
    }

    /// The configuration it opens.
    pub fn config(&self) -> &SnapshotterConfig {
        &self.config
    }
}

fn stem(p: &Path) -> String {
    p.file_stem().and_then(|s| s.to_str()).unwrap_or("plugin").to_owned()
}

impl crate::Factory for StackFactory {
    fn name(&self) -> String {
        let mut parts: Vec<String> =
            self.config.policies.iter().map(|p| format!("policy {}", stem(&p.path))).collect();
        parts.push(match &self.config.driver {
            DriverConfig::Native => "native".into(),
            DriverConfig::Overlay(_) => "overlay".into(),
            DriverConfig::Btrfs => "btrfs".into(),
            DriverConfig::Wasm(p) => format!("plugin {}", stem(&p.path)),
        });
        parts.join(" -> ")
    }

    fn open(&self, dir: &Path) -> wasnap::Result<Arc<dyn Backend>> {
        let root: PathBuf =
            dir.canonicalize().with_context(|| format!("resolve {}", dir.display()))?;
        let cap = cap_std::fs::Dir::open_ambient_dir(&root, cap_std::ambient_authority())
            .with_context(|| format!("open {}", root.display()))?;
        let place = Place { root: &cap, root_path: &root, db: None };
        let faults = Arc::new(Faults::new());
        let backend = wasnap::stack::open("case", &self.config, &place, &faults, &self.plugins)?;
        if self.ignored.is_empty() {
            return Ok(backend.backend);
        }
        Ok(Arc::new(Ignoring { inner: backend.backend, patterns: self.ignored.clone() }))
    }
}

/// A stack whose answers leave out the labels matching `patterns`.
struct Ignoring {
    inner: Arc<dyn Backend>,
    patterns: Arc<Vec<String>>,
}

impl Ignoring {
    fn strip(&self, mut info: Info) -> Info {
        info.labels.retain(|k, _| {
            !self.patterns.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => k.starts_with(prefix),
                None => k == p,
            })
        });
        info
    }
}

impl Wrapper for Ignoring {
    fn inner(&self) -> &dyn Backend {
        self.inner.as_ref()
    }

    fn stat(&self, key: &str) -> wasnap::Result<Info> {
        self.inner.stat(key).map(|i| self.strip(i))
    }

    fn update(&self, info: &Info, fieldpaths: &[FieldPath]) -> wasnap::Result<Info> {
        self.inner.update(info, fieldpaths).map(|i| self.strip(i))
    }

    fn walk(
        &self,
        filter: &Filter,
        f: &mut dyn FnMut(Info) -> wasnap::Result<()>,
    ) -> wasnap::Result<()> {
        self.inner.walk(filter, &mut |i| f(self.strip(i)))
    }
}
