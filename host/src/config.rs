//! The configuration file: which snapshotters a root serves, and how.
//!
//! ```toml
//! # Which snapshotter commands use when none is named (-s/--driver).
//! default_snapshotter = "native"
//!
//! [snapshotters.native]
//! driver = "native"
//!
//! [snapshotters.overlay]
//! driver = "overlay"
//! index_off = true        # add index=off to overlay mounts
//! userxattr = false       # keep overlay metadata in user.* xattrs (rootless kernels)
//! volatile = false        # no syncs to upper directories (throwaway containers)
//! upperdir_label = false  # report containerd.io/snapshot/overlay.upperdir
//! async_remove = false    # leave removed trees for `cleanup` to delete
//!
//! [snapshotters.btrfs]
//! driver = "btrfs"
//! ```
//!
//! Without a file, the three built-in drivers are served under their own names. A file
//! replaces that list: name each snapshotter you want.
//!
//! A WebAssembly plugin serves a snapshotter with `driver = "wasm"`, and any snapshotter
//! can have a chain of policy plugins in front of it, in the order calls pass through
//! them. Relative paths are relative to the file. `config` is handed to the plugin's
//! `init` as JSON; `limits` bound each plugin on its own (defaults shown):
//!
//! ```toml
//! [snapshotters.copy]
//! driver = "wasm"
//! path = "plugins/copy.wasm"
//! limits = { memory_mib = 256, timeout_ms = 60000, instances = 1, max_walk = 10000000, next_calls = 100000 }
//!
//! [[snapshotters.copy.policies]]
//! path = "plugins/label_policy.wasm"
//! config = { deny = ["containerd.io/snapshot/forbidden"] }
//!
//! [[snapshotters.copy.policies]]
//! path = "plugins/quota.wasm"
//! config = { max_active = 100 }
//! limits = { memory_mib = 64 }
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::driver::overlay::OverlayOptions;
use crate::error::{Error, Result};
use crate::gc::GcOptions;
use crate::plugin::Limits;

/// The snapshotter used when none is named: the one that works everywhere.
pub const DEFAULT_SNAPSHOTTER: &str = "native";

/// Which driver serves a snapshotter, and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "driver", rename_all = "lowercase", deny_unknown_fields)]
pub enum DriverConfig {
    /// The copy-based native driver: any filesystem, no kernel features.
    Native,
    /// The overlayfs driver.
    Overlay(OverlayOptions),
    /// The btrfs driver: its directory must be on btrfs.
    Btrfs,
    /// A WebAssembly plugin (world `backend`).
    Wasm(PluginConfig),
}

/// One snapshotter: its driver and the policies in front of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotterConfig {
    /// The driver that stores the snapshots.
    #[serde(flatten)]
    pub driver: DriverConfig,
    /// Policy plugins (world `policy`), in the order calls pass through them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<PluginConfig>,
    /// Native drivers: sync a layer's data before its commit is recorded, so that no
    /// committed snapshot names a layer a power cut could truncate [default: true].
    /// `false` trusts the page cache, as containerd's own snapshotters do.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub sync_commits: bool,
}

impl SnapshotterConfig {
    /// Whether a plugin serves it: a wasm driver, or a policy in front of the driver.
    pub fn has_plugins(&self) -> bool {
        !self.policies.is_empty() || matches!(self.driver, DriverConfig::Wasm(_))
    }
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

impl From<DriverConfig> for SnapshotterConfig {
    fn from(driver: DriverConfig) -> Self {
        SnapshotterConfig { driver, policies: Vec::new(), sync_commits: true }
    }
}

/// A WebAssembly plugin: where it is, what it is told, what it may use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// The component (`.wasm`, built for wasm32-wasip2).
    pub path: PathBuf,
    /// Handed to the plugin's `init`, as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<toml::Value>,
    /// Memory, time and concurrency limits.
    #[serde(default)]
    pub limits: Limits,
    /// The sha256 the `.wasm` must have (hex, optionally `sha256:`-prefixed): a file
    /// with another digest is refused, naming both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

impl PluginConfig {
    /// A plugin at `path` with no configuration and the default limits.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        PluginConfig { path: path.into(), config: None, limits: Limits::default(), sha256: None }
    }

    /// The pinned digest as 64 lowercase hex digits, if one is set; invalid-argument
    /// if it is not a sha256.
    pub fn pinned(&self) -> Result<Option<String>> {
        let Some(pin) = &self.sha256 else { return Ok(None) };
        let hex = pin.strip_prefix("sha256:").unwrap_or(pin).to_ascii_lowercase();
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::invalid_argument(format!(
                "plugin {}: sha256 {pin:?} is not 64 hex digits",
                self.path.display()
            )));
        }
        Ok(Some(hex))
    }

    /// The configuration as the JSON value `init` receives (`null` when there is none).
    pub fn config_json(&self) -> serde_json::Value {
        self.config
            .as_ref()
            .and_then(|c| serde_json::to_value(c).ok())
            .unwrap_or(serde_json::Value::Null)
    }
}

/// The daemon (`wasnap daemon`): where it listens and how it stops.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DaemonOptions {
    /// The unix socket it serves on; created owner-only (0600), its directory 0700 if
    /// the daemon creates it.
    pub socket: PathBuf,
    /// After SIGTERM or SIGINT, how long calls in flight may take to finish (seconds)
    /// before the daemon exits anyway.
    pub shutdown_timeout_secs: u64,
    /// Threads that serve the gRPC connections (the runtime's async workers; at least
    /// 1). They read, dispatch and answer; a call's work runs on a pool of its own,
    /// except a snapshot call that arrives while no other is in flight, which runs on
    /// the worker that received it (thread hand-offs saved) when there are two workers
    /// or more, so that another is always free for what arrives meanwhile; work that may
    /// take long (a walk of the data, a plugin's call) first hands the worker's share of
    /// the runtime to another thread. With 1, every call's work goes to the pool.
    /// More may serve many busy connections better on a large machine.
    pub async_workers: usize,
    /// How long a client may keep a stream open without moving it (seconds, at least
    /// 1): an upload from which no whole message arrives, or a List whose client takes
    /// no batch, for this long fails, and frees the thread serving it. wasnap's client
    /// sends uploads in messages of 1 MiB, so the default needs ~17 KiB/s of it.
    pub stream_idle_secs: u64,
}

/// Where the daemon listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/wasnap/wasnap.sock";

impl Default for DaemonOptions {
    fn default() -> Self {
        DaemonOptions {
            socket: PathBuf::from(DEFAULT_SOCKET),
            shutdown_timeout_secs: 10,
            async_workers: 2,
            stream_idle_secs: 60,
        }
    }
}

/// The Prometheus endpoint (`[metrics]`): off unless an address is set.
///
/// ```toml
/// [metrics]
/// address = "127.0.0.1:9464"
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsOptions {
    /// Where the daemon serves `GET /metrics` over plain HTTP, with no authentication:
    /// keep it on loopback or a private network. Port 0 takes a free port (the log says
    /// which). Unset: no endpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<SocketAddr>,
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The state directory (`--root` overrides it) [default: /var/lib/wasnap as root].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<PathBuf>,
    /// The snapshotter used when a command names none [default: the only one
    /// configured, else native].
    #[serde(default = "default_snapshotter")]
    pub default_snapshotter: String,
    /// Every snapshotter the root serves, by name.
    pub snapshotters: BTreeMap<String, SnapshotterConfig>,
    /// Garbage collection: when it runs, how long it may hold writers, what it keeps.
    #[serde(default)]
    pub gc: GcOptions,
    /// The daemon's socket and shutdown.
    #[serde(default)]
    pub daemon: DaemonOptions,
    /// The daemon's Prometheus endpoint.
    #[serde(default)]
    pub metrics: MetricsOptions,
}

/// Checks a snapshotter name. It names a directory under the root
/// (`snapshotters/<name>`, a plugin's whole world), so it is one plain path component:
/// letters, digits, `.`, `_`, `-`, not starting with `.` or `-`.
pub fn validate_name(name: &str) -> Result<()> {
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty()
        || name.len() > 128
        || name.starts_with(['.', '-'])
        || !name.chars().all(plain)
    {
        return Err(Error::invalid_argument(format!(
            "snapshotter name {name:?}: use 1 to 128 letters, digits, '.', '_' or '-', not starting with '.' or '-'"
        )));
    }
    Ok(())
}

fn default_snapshotter() -> String {
    DEFAULT_SNAPSHOTTER.to_owned()
}

impl Default for Config {
    /// The built-in drivers, each as a snapshotter of the same name.
    fn default() -> Self {
        Config {
            default_snapshotter: default_snapshotter(),
            snapshotters: BTreeMap::from([
                ("native".to_owned(), DriverConfig::Native.into()),
                ("overlay".to_owned(), DriverConfig::Overlay(OverlayOptions::default()).into()),
                ("btrfs".to_owned(), DriverConfig::Btrfs.into()),
            ]),
            gc: GcOptions::default(),
            daemon: DaemonOptions::default(),
            metrics: MetricsOptions::default(),
            root: None,
        }
    }
}

impl Config {
    /// Parses a configuration, checking that it names what it uses.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let mut config: Config = toml::from_str(text).map_err(|e| {
            // toml renders a multi-line snippet; a CLI error is one line: say where.
            let at = e.span().map(|span| {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!(" (line {line}, column {col})")
            });
            let msg = e.message().trim().replace('\n', "; ");
            Error::invalid_argument(format!("config {origin}{}: {msg}", at.unwrap_or_default()))
        })?;
        if config.snapshotters.is_empty() {
            return Err(Error::invalid_argument(format!(
                "config {origin}: no [snapshotters.NAME] is configured"
            )));
        }
        // A file that configures one snapshotter and names no default means that one.
        let raw: toml::Table = toml::from_str(text).unwrap_or_default();
        if !raw.contains_key("default_snapshotter")
            && let [only] = config.snapshotters.keys().collect::<Vec<_>>()[..]
        {
            config.default_snapshotter = only.clone();
        }
        if !config.snapshotters.contains_key(&config.default_snapshotter) {
            return Err(Error::invalid_argument(format!(
                "config {origin}: default_snapshotter {:?} is not one of the configured snapshotters ({}); set default_snapshotter = {:?} (or another of them) in the file",
                config.default_snapshotter,
                config.snapshotters.keys().cloned().collect::<Vec<_>>().join(", "),
                config.snapshotters.keys().next().map(String::as_str).unwrap_or_default(),
            )));
        }
        // serde lets a unit variant of a tagged enum ignore extra keys, so a misspelt
        // `policies` under a native or btrfs snapshotter would silently drop the policy
        // chain. Check those tables by hand.
        let tables = raw.get("snapshotters").and_then(|t| t.as_table());
        for (name, table) in tables.into_iter().flatten() {
            let Some(table) = table.as_table() else { continue };
            let driver = table.get("driver").and_then(|d| d.as_str());
            let extra = table
                .keys()
                .find(|k| !matches!(k.as_str(), "driver" | "policies" | "sync_commits"));
            if matches!(driver, Some("native" | "btrfs"))
                && let Some(key) = extra
            {
                return Err(Error::invalid_argument(format!(
                    "config {origin}: snapshotter {name:?}: unknown field {key:?} (driver {:?} takes only `policies` and `sync_commits`)",
                    driver.unwrap_or_default()
                )));
            }
        }
        for (name, s) in &config.snapshotters {
            validate_name(name).map_err(|e| e.context(format!("config {origin}")))?;
            let plugins = s.policies.iter().chain(match &s.driver {
                DriverConfig::Wasm(p) => Some(p),
                _ => None,
            });
            for p in plugins {
                p.limits
                    .check()
                    .and_then(|()| p.pinned().map(drop))
                    .map_err(|e| e.context(format!("config {origin}: snapshotter {name:?}")))?;
            }
        }
        for (i, rule) in config.gc.prune.iter().enumerate() {
            let at = |e: Error| e.context(format!("config {origin}: [[gc.prune]] #{}", i + 1));
            rule.policy().map_err(at)?;
            if let Some(name) =
                rule.snapshotters.iter().find(|n| !config.snapshotters.contains_key(*n))
            {
                return Err(at(Error::invalid_argument(format!(
                    "snapshotter {name:?} is not configured"
                ))));
            }
            for ns in &rule.namespaces {
                crate::metadata::Ctx::new(ns).map_err(at)?;
            }
        }
        Ok(config)
    }

    /// Reads and parses the file at `path` (an edge: the caller names the path).
    /// Relative plugin paths are taken relative to the file's directory.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::invalid_argument(format!("config {}: {e}", path.display())))?;
        let mut config = Self::parse(&text, &path.display().to_string())?;
        if let Some(base) = path.parent() {
            config.resolve_paths(base);
        }
        Ok(config)
    }

    /// Makes relative paths (plugins, the root, the socket) relative to `base`.
    pub fn resolve_paths(&mut self, base: &Path) {
        if let Some(root) = &mut self.root
            && root.is_relative()
        {
            *root = base.join(&*root);
        }
        if self.daemon.socket.is_relative() {
            self.daemon.socket = base.join(&self.daemon.socket);
        }
        for s in self.snapshotters.values_mut() {
            let driver = match &mut s.driver {
                DriverConfig::Wasm(p) => Some(p),
                _ => None,
            };
            for p in s.policies.iter_mut().chain(driver) {
                if p.path.is_relative() {
                    p.path = base.join(&p.path);
                }
            }
        }
    }

    /// The configuration as TOML, e.g. to start a file from the defaults.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).map_err(|e| Error::internal(format!("encode config: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_round_trips_and_the_documented_example_parses() {
        let d = Config::default();
        assert_eq!(Config::parse(&d.to_toml().unwrap(), "default").unwrap(), d);
        let doc = include_str!("config.rs");
        let example: String = doc
            .lines()
            .skip_while(|l| !l.starts_with("//! ```toml"))
            .skip(1)
            .take_while(|l| !l.starts_with("//! ```"))
            .map(|l| l.strip_prefix("//! ").unwrap_or("").to_owned() + "\n")
            .collect();
        assert_eq!(Config::parse(&example, "example").unwrap(), d);
    }

    #[test]
    fn the_daemon_example_parses() {
        let text = include_str!("../../examples/daemon/wasnap.toml");
        let c = Config::parse(text, "examples/daemon/wasnap.toml").unwrap();
        assert_eq!(c.default_snapshotter, "wasnap-overlay");
        assert_eq!(c.daemon.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(c.snapshotters["wasnap-copy"].policies.len(), 1);
    }

    #[test]
    fn plugins_and_policy_chains() {
        let doc = include_str!("config.rs");
        let example: String = doc
            .lines()
            .skip_while(|l| !l.starts_with("//! [snapshotters.copy]"))
            .take_while(|l| !l.starts_with("//! ```"))
            .map(|l| l.strip_prefix("//! ").unwrap_or("").to_owned() + "\n")
            .collect();
        let mut c =
            Config::parse(&format!("default_snapshotter = \"copy\"\n{example}"), "t").unwrap();
        c.resolve_paths(Path::new("/etc/wasnap"));
        let s = &c.snapshotters["copy"];
        let DriverConfig::Wasm(p) = &s.driver else { panic!("{s:?}") };
        assert_eq!(p.path, Path::new("/etc/wasnap/plugins/copy.wasm"));
        assert_eq!(p.limits, Limits::default());
        assert_eq!(s.policies.len(), 2);
        assert_eq!(
            s.policies[0].config_json(),
            serde_json::json!({"deny": ["containerd.io/snapshot/forbidden"]})
        );
        assert_eq!(s.policies[1].limits.memory_mib, 64);
        assert_eq!(s.policies[1].limits.timeout_ms, Limits::default().timeout_ms);
        assert_eq!(Config::parse(&c.to_toml().unwrap(), "again").unwrap(), c);

        for (bad, says) in [
            ("[snapshotters.x]\ndriver = \"wasm\"\n", "path"),
            (
                "[snapshotters.x]\ndriver = \"wasm\"\npath = \"a\"\nlimits = { memory_mb = 1 }\n",
                "memory_mb",
            ),
            (
                "[snapshotters.x]\ndriver = \"wasm\"\npath = \"a\"\nlimits = { timeout_ms = 0 }\n",
                "timeout_ms",
            ),
            (
                "[snapshotters.x]\ndriver = \"native\"\n[[snapshotters.x.policies]]\nconfig = 1\n",
                "path",
            ),
        ] {
            let err =
                Config::parse(&format!("default_snapshotter = \"x\"\n{bad}"), "t").unwrap_err();
            assert!(err.to_string().contains(says), "{bad:?} -> {err}");
        }
        // One snapshotter and no default: that one is the default.
        let one = Config::parse("[snapshotters.mine]\ndriver = \"native\"\n", "t").unwrap();
        assert_eq!(one.default_snapshotter, "mine");
    }

    #[test]
    fn the_metrics_endpoint_is_off_unless_an_address_is_set() {
        let base = "[snapshotters.native]\ndriver = \"native\"\n";
        assert_eq!(Config::parse(base, "t").unwrap().metrics.address, None);
        let c = Config::parse(&format!("{base}[metrics]\naddress = \"127.0.0.1:9464\"\n"), "t")
            .unwrap();
        assert_eq!(c.metrics.address, Some(SocketAddr::from(([127, 0, 0, 1], 9464))));
        assert_eq!(Config::parse(&c.to_toml().unwrap(), "again").unwrap(), c);
        let v6 = Config::parse(&format!("{base}[metrics]\naddress = \"[::1]:0\"\n"), "t").unwrap();
        assert_eq!(v6.metrics.address.map(|a| a.port()), Some(0));
        for (bad, says) in [
            ("address = \"localhost:9464\"", "address"),
            ("address = \"127.0.0.1\"", "address"),
            ("address = 9464", "address"),
            ("adress = \"127.0.0.1:9464\"", "unknown field `adress`"),
        ] {
            let err = Config::parse(&format!("{base}[metrics]\n{bad}\n"), "t").unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument);
            assert!(err.to_string().contains(says), "{bad:?} -> {err}");
        }
    }

    #[test]
    fn options_and_mistakes() {
        let c = Config::parse(
            "default_snapshotter = \"fast\"\n[snapshotters.fast]\ndriver = \"overlay\"\nvolatile = true\n",
            "t",
        )
        .unwrap();
        let DriverConfig::Overlay(o) = &c.snapshotters["fast"].driver else { panic!("{c:?}") };
        assert!(o.volatile && o.index_off, "unset options keep their defaults");
        for (bad, says) in [
            ("[snapshotters.x]\ndriver = \"zfs\"\n", "zfs"),
            ("[snapshotters.x]\ndriver = \"overlay\"\nvolatil = true\n", "volatil"),
            (
                "[snapshotters.x]\ndriver = \"native\"\n[snapshotters.y]\ndriver = \"native\"\n",
                "default_snapshotter \"native\" is not one of the configured snapshotters (x, y); set default_snapshotter = \"x\"",
            ),
            ("default_snapshotter = \"x\"\nsnapshotters = {}\n", "no [snapshotters"),
            ("nonsense", "config t"),
            (
                "default_snapshotter = \"x\"\n[snapshotters.x]\ndriver = \"native\"\n[[snapshotters.x.policy]]\npath = \"q.wasm\"\n",
                "unknown field \"policy\"",
            ),
            (
                "default_snapshotter = \"x\"\n[snapshotters.x]\ndriver = \"btrfs\"\nvolatile = true\n",
                "unknown field \"volatile\"",
            ),
            (
                "default_snapshotter = \"..\"\n[snapshotters.\"..\"]\ndriver = \"native\"\n",
                "snapshotter name \"..\"",
            ),
            (
                "default_snapshotter = \"a/b\"\n[snapshotters.\"a/b\"]\ndriver = \"native\"\n",
                "snapshotter name",
            ),
            (
                "default_snapshotter = \"\"\n[snapshotters.\"\"]\ndriver = \"native\"\n",
                "snapshotter name",
            ),
        ] {
            let err = Config::parse(bad, "t").unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument);
            assert!(err.to_string().contains(says), "{bad:?} -> {err}");
        }
    }
}
