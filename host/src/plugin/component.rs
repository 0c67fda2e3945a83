//! A compiled plugin: checked against this host's WIT, linked, ready to instantiate.

use std::sync::Arc;
use std::time::Duration;

use cap_std::fs::Dir;
use wasmtime::component::{Component, InstancePre};

use super::bindings::{LifecycleIndices, SnapshotterIndices};
use super::runtime::{Counters, Runtime, SharedCounters};
use super::state::State;
use crate::error::{Error, Result};

/// The WIT package (and version) this host speaks: `wit/snapshotter.wit`.
pub const WIT_PACKAGE: &str = "wasnap:snapshotter@0.2.0";
const NAMESPACE: &str = "wasnap:snapshotter/";
const VERSION: &str = "0.2.0";

/// Which world a plugin targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A snapshotter (`world backend`).
    Backend,
    /// Middleware in front of the next snapshotter (`world policy`).
    Policy,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Backend => "backend",
            Role::Policy => "policy",
        })
    }
}

/// What `wasnap plugin inspect` tells about a component.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PluginInfo {
    /// The world it targets, if it targets one of this host's.
    pub role: Option<Role>,
    /// Size of the `.wasm` in bytes.
    pub size: u64,
    /// sha256 of the `.wasm`, in hex.
    pub digest: String,
    /// Every interface (or function) it imports.
    pub imports: Vec<String>,
    /// Every interface (or function) it exports.
    pub exports: Vec<String>,
    /// What its imports let it do, in words: the capabilities it asks the host for.
    pub capabilities: Vec<String>,
    /// Whether this host can load it; if not, why.
    pub compatible: std::result::Result<(), String>,
    /// Whether the compiled code came from the cache.
    pub cached: bool,
    /// Time to compile or load it.
    #[serde(serialize_with = "micros")]
    pub load_time: Duration,
}

fn micros<S: serde::Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_micros() as u64)
}

/// A plugin ready to instantiate. Cheap to share: every snapshotter (and every
/// conformance case) using the same `.wasm` instantiates from one `Plugin`.
pub struct Plugin {
    pub(crate) name: Arc<str>,
    pub(crate) pre: InstancePre<State>,
    pub(crate) lifecycle: LifecycleIndices,
    pub(crate) snapshotter: SnapshotterIndices,
    pub(crate) counters: SharedCounters,
    info: PluginInfo,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin").field("name", &self.name).field("info", &self.info).finish()
    }
}

impl Plugin {
    /// Compiles (or loads from `cache`) and links `wasm`, failing with
    /// invalid-argument and a clear reason if this host cannot run it.
    pub fn load(name: &str, wasm: &[u8], cache: Option<&Dir>) -> Result<Arc<Plugin>> {
        let context = |e: Error| e.context(format!("plugin {name:?}"));
        let rt = Runtime::get()?;
        let (component, info) = inspect_component(rt, wasm, cache).map_err(context)?;
        if let Err(why) = &info.compatible {
            return Err(context(Error::invalid_argument(why.clone())));
        }
        let pre = rt.linker().instantiate_pre(&component).map_err(|e| {
            context(Error::invalid_argument(format!("cannot link against this host: {e:#}")))
        })?;
        let lifecycle = LifecycleIndices::new(&pre)
            .map_err(|e| context(Error::invalid_argument(format!("{e:#}"))))?;
        let snapshotter = SnapshotterIndices::new(&pre)
            .map_err(|e| context(Error::invalid_argument(format!("{e:#}"))))?;
        Ok(Arc::new(Plugin {
            name: name.into(),
            pre,
            lifecycle,
            snapshotter,
            counters: Arc::new(Counters::default()),
            info,
        }))
    }

    /// Describes `wasm` without requiring that it loads: its world, imports, exports,
    /// and whether (or why not) this host can run it.
    pub fn inspect(wasm: &[u8], cache: Option<&Dir>) -> Result<PluginInfo> {
        inspect_component(Runtime::get()?, wasm, cache).map(|(_, info)| info)
    }

    /// The name it was loaded under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its role (backend or policy).
    pub fn role(&self) -> Role {
        // `load` refuses a plugin whose role is unknown.
        self.info.role.unwrap_or(Role::Backend)
    }

    /// What is known about it.
    pub fn info(&self) -> &PluginInfo {
        &self.info
    }

    /// Its call counters, shared by every snapshotter using it.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }
}

fn inspect_component(
    rt: &Runtime,
    wasm: &[u8],
    cache: Option<&Dir>,
) -> Result<(Component, PluginInfo)> {
    let (component, loaded) = rt.load(wasm, cache)?;
    let ty = component.component_type();
    let imports: Vec<String> = ty.imports(rt.engine()).map(|(n, _)| n.to_owned()).collect();
    let exports: Vec<String> = ty.exports(rt.engine()).map(|(n, _)| n.to_owned()).collect();
    let (role, compatible) = check_world(&imports, &exports);
    let capabilities = capabilities(&imports);
    let info = PluginInfo {
        role,
        size: wasm.len() as u64,
        digest: loaded.digest,
        imports,
        exports,
        capabilities,
        compatible,
        cached: loaded.cached,
        load_time: loaded.elapsed,
    };
    Ok((component, info))
}

/// What a component's imports let it do, one line per capability, most powerful first.
fn capabilities(imports: &[String]) -> Vec<String> {
    let has = |prefix: &str| imports.iter().any(|n| n.starts_with(prefix));
    let mut out = Vec::new();
    if has("wasnap:snapshotter/layers") {
        out.push("layers: make, clone and remove layers, and change their contents".into());
    }
    if has("wasnap:snapshotter/snapshotter") {
        out.push("snapshotter: call the next snapshotter of its chain (a policy)".into());
    }
    if has("wasnap:snapshotter/kv") {
        out.push("kv: its own transactional key-value store".into());
    }
    if has("wasi:filesystem") {
        out.push("filesystem: its private directory only (preopened as /)".into());
    }
    if has("wasnap:snapshotter/log") {
        out.push("log: lines in the host's log, bounded per call".into());
    }
    if has("wasi:cli/std") || has("wasi:cli/terminal") {
        out.push("stdio: stdout and stderr into the host's log, bounded per call; no stdin".into());
    }
    if has("wasi:clocks") {
        out.push("clocks: read the time".into());
    }
    if has("wasi:random") {
        out.push("random: random bytes".into());
    }
    if has("wasi:sockets") {
        out.push("sockets: linked but denied: no network is given".into());
    }
    out
}

/// Decides the role from the names a component imports and exports, and whether this
/// host provides what it needs. Names carry the WIT version (`…@0.1.0`), so a plugin
/// built against another version of the contract is told so in plain words.
fn check_world(
    imports: &[String],
    exports: &[String],
) -> (Option<Role>, std::result::Result<(), String>) {
    let ours = |n: &String| n.starts_with(NAMESPACE);
    let other_version = imports.iter().chain(exports).filter(|n| ours(n)).find_map(|n| {
        let v = n.rsplit_once('@').map(|(_, v)| v).unwrap_or("none");
        (v != VERSION).then(|| v.to_owned())
    });
    if let Some(v) = other_version {
        return (
            None,
            Err(format!(
                "built against wasnap:snapshotter@{v}, but this host speaks {WIT_PACKAGE}: rebuild it with a wasnap-sdk (or WIT) of version {VERSION}"
            )),
        );
    }
    let name = |iface: &str| format!("{NAMESPACE}{iface}@{VERSION}");
    let missing: Vec<String> = ["lifecycle", "snapshotter"]
        .iter()
        .map(|i| name(i))
        .filter(|n| !exports.contains(n))
        .collect();
    if !missing.is_empty() {
        return (
            None,
            Err(format!(
                "does not export {}: it targets neither world of {WIT_PACKAGE} (backend or policy)",
                missing.join(" and ")
            )),
        );
    }
    let role = if imports.contains(&name("snapshotter")) { Role::Policy } else { Role::Backend };
    let foreign: Vec<&String> =
        imports.iter().filter(|n| !ours(n) && !n.starts_with("wasi:")).collect();
    if !foreign.is_empty() {
        let list: Vec<&str> = foreign.iter().map(|s| s.as_str()).collect();
        return (
            Some(role),
            Err(format!("imports {}, which this host does not provide", list.join(", "))),
        );
    }
    (Some(role), Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn worlds_and_versions() {
        let exports =
            s(&["wasnap:snapshotter/lifecycle@0.2.0", "wasnap:snapshotter/snapshotter@0.2.0"]);
        let backend = s(&[
            "wasi:cli/stdout@0.2.6",
            "wasnap:snapshotter/layers@0.2.0",
            "wasnap:snapshotter/kv@0.2.0",
        ]);
        assert_eq!(check_world(&backend, &exports), (Some(Role::Backend), Ok(())));
        let mut policy = s(&["wasnap:snapshotter/kv@0.2.0"]);
        policy.push("wasnap:snapshotter/snapshotter@0.2.0".into());
        assert_eq!(check_world(&policy, &exports), (Some(Role::Policy), Ok(())));
        let caps = capabilities(&backend);
        assert!(caps[0].starts_with("layers:"), "{caps:?}");
        assert!(caps.iter().any(|c| c.starts_with("kv:")), "{caps:?}");

        let old = s(&["wasnap:snapshotter/host@0.1.0"]);
        let old_exports =
            s(&["wasnap:snapshotter/lifecycle@0.1.0", "wasnap:snapshotter/snapshotter@0.1.0"]);
        let (role, why) = check_world(&old, &old_exports);
        assert_eq!(role, None);
        let why = why.unwrap_err();
        assert!(why.contains("built against wasnap:snapshotter@0.1.0"), "{why}");
        assert!(why.contains("this host speaks wasnap:snapshotter@0.2.0"), "{why}");

        let (_, why) = check_world(&backend, &exports[..1]);
        assert!(why.unwrap_err().contains("does not export wasnap:snapshotter/snapshotter@0.2.0"));

        let mut foreign = backend.clone();
        foreign.push("acme:net/socket".into());
        let (_, why) = check_world(&foreign, &exports);
        assert!(why.unwrap_err().contains("acme:net/socket"));
    }
}
