//! Running the suite against WebAssembly plugins: a backend plugin on its own, or
//! policy plugins in front of the native driver or of a backend plugin.

use std::path::Path;
use std::sync::Arc;

use wasnap::Snapshotter;
use wasnap::plugin::{Limits, Plugin, WasmSnapshotter};

/// One plugin in a stack, with what it is told and what it may use.
#[derive(Debug, Clone)]
pub struct Layer {
    /// The compiled plugin.
    pub plugin: Arc<Plugin>,
    /// Its limits.
    pub limits: Limits,
    /// What its `init` receives.
    pub config: serde_json::Value,
}

impl Layer {
    /// A plugin with default limits and no configuration.
    pub fn new(plugin: Arc<Plugin>) -> Self {
        Layer { plugin, limits: Limits::default(), config: serde_json::Value::Null }
    }

    /// Compiles the `.wasm` at `path` (using `cache` for compiled code if given).
    pub fn load(path: &Path, cache: Option<&cap_std::fs::Dir>) -> wasnap::Result<Self> {
        let wasm = std::fs::read(path)
            .map_err(|e| wasnap::Error::InvalidArgument(format!("{}: {e}", path.display())))?;
        let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("plugin");
        Ok(Layer::new(Plugin::load(name, &wasm, cache)?))
    }

    /// The same plugin, configured.
    pub fn with_config(mut self, config: serde_json::Value) -> Self {
        self.config = config;
        self
    }

    /// The same plugin, with other limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }
}

/// What stores the snapshots under a stack of policies.
#[derive(Clone)]
pub enum Backend {
    /// A backend plugin.
    Plugin(Layer),
    /// Any other backend, such as a native driver.
    Factory(Arc<dyn crate::Factory>),
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Plugin(l) => write!(f, "Plugin({})", l.plugin.name()),
            Backend::Factory(x) => write!(f, "Factory({})", x.name()),
        }
    }
}

/// A [`crate::Factory`] for a stack of plugins: `policies` (the first sees calls
/// first) in front of `backend`.
#[derive(Debug, Clone)]
pub struct PluginFactory {
    /// What stores the snapshots.
    pub backend: Backend,
    /// Policy plugins in front of it.
    pub policies: Vec<Layer>,
}

struct NativeFactory;

impl crate::Factory for NativeFactory {
    fn name(&self) -> String {
        "native".into()
    }
    fn open(&self, dir: &Path) -> wasnap::Result<Arc<dyn Snapshotter>> {
        crate::open_native(dir)
    }
}

impl PluginFactory {
    /// A backend plugin on its own.
    pub fn backend(layer: Layer) -> Self {
        PluginFactory { backend: Backend::Plugin(layer), policies: Vec::new() }
    }

    /// Policies in front of the native driver.
    pub fn policies_on_native(policies: Vec<Layer>) -> Self {
        PluginFactory { backend: Backend::Factory(Arc::new(NativeFactory)), policies }
    }
}

fn subdir(dir: &Path, name: &str) -> wasnap::Result<(cap_std::fs::Dir, std::path::PathBuf)> {
    let path = dir.join(name);
    std::fs::create_dir_all(&path)
        .map_err(|e| wasnap::Error::internal(format!("create {}", path.display()), e))?;
    let path = path
        .canonicalize()
        .map_err(|e| wasnap::Error::internal(format!("resolve {}", path.display()), e))?;
    let cap = cap_std::fs::Dir::open_ambient_dir(&path, cap_std::ambient_authority())
        .map_err(|e| wasnap::Error::internal(format!("open {}", path.display()), e))?;
    Ok((cap, path))
}

impl crate::Factory for PluginFactory {
    fn name(&self) -> String {
        let mut parts: Vec<String> =
            self.policies.iter().map(|l| format!("policy {}", l.plugin.name())).collect();
        parts.push(match &self.backend {
            Backend::Plugin(l) => format!("plugin {}", l.plugin.name()),
            Backend::Factory(f) => f.name(),
        });
        parts.join(" -> ")
    }

    fn open(&self, dir: &Path) -> wasnap::Result<Arc<dyn Snapshotter>> {
        let (cap, path) = subdir(dir, "backend")?;
        let mut s: Arc<dyn Snapshotter> = match &self.backend {
            Backend::Plugin(l) => Arc::new(WasmSnapshotter::open(
                l.plugin.clone(),
                cap,
                path,
                None,
                l.limits.clone(),
                &l.config,
            )?),
            Backend::Factory(f) => {
                drop(cap);
                f.open(&path)?
            }
        };
        for (i, l) in self.policies.iter().enumerate().rev() {
            let (cap, path) = subdir(dir, &format!("policy-{i}"))?;
            s = Arc::new(WasmSnapshotter::open(
                l.plugin.clone(),
                cap,
                path,
                Some(s),
                l.limits.clone(),
                &l.config,
            )?);
        }
        Ok(s)
    }
}
