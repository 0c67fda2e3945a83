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

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::driver::overlay::OverlayOptions;
use crate::error::{Error, Result};
use crate::gc::GcOptions;
use crate::host::DEFAULT_SNAPSHOTTER;

/// Which driver serves a snapshotter, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "driver", rename_all = "lowercase", deny_unknown_fields)]
pub enum DriverConfig {
    /// The copy-based native driver: any filesystem, no kernel features.
    Native,
    /// The overlayfs driver.
    Overlay(OverlayOptions),
    /// The btrfs driver: its directory must be on btrfs.
    Btrfs,
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The snapshotter used when a command names none.
    #[serde(default = "default_snapshotter")]
    pub default_snapshotter: String,
    /// Every snapshotter the root serves, by name.
    pub snapshotters: BTreeMap<String, DriverConfig>,
    /// Garbage collection: when it runs, how long it may hold writers, what it keeps.
    #[serde(default)]
    pub gc: GcOptions,
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
                ("native".to_owned(), DriverConfig::Native),
                ("overlay".to_owned(), DriverConfig::Overlay(OverlayOptions::default())),
                ("btrfs".to_owned(), DriverConfig::Btrfs),
            ]),
            gc: GcOptions::default(),
        }
    }
}

impl Config {
    /// Parses a configuration, checking that it names what it uses.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let config: Config = toml::from_str(text).map_err(|e| {
            // toml renders a multi-line snippet; a CLI error is one line: say where.
            let at = e.span().map(|span| {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!(" (line {line}, column {col})")
            });
            let msg = e.message().trim().replace('\n', "; ");
            Error::InvalidArgument(format!("config {origin}{}: {msg}", at.unwrap_or_default()))
        })?;
        if config.snapshotters.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "config {origin}: no [snapshotters.NAME] is configured"
            )));
        }
        if !config.snapshotters.contains_key(&config.default_snapshotter) {
            return Err(Error::InvalidArgument(format!(
                "config {origin}: default_snapshotter {:?} is not one of the configured snapshotters ({})",
                config.default_snapshotter,
                config.snapshotters.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        Ok(config)
    }

    /// Reads and parses the file at `path` (an edge: the caller names the path).
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::InvalidArgument(format!("config {}: {e}", path.display())))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// The configuration as TOML, e.g. to start a file from the defaults.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).map_err(|e| Error::internal("encode config", e))
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
    fn options_and_mistakes() {
        let c = Config::parse(
            "default_snapshotter = \"fast\"\n[snapshotters.fast]\ndriver = \"overlay\"\nvolatile = true\n",
            "t",
        )
        .unwrap();
        let DriverConfig::Overlay(o) = &c.snapshotters["fast"] else { panic!("{c:?}") };
        assert!(o.volatile && o.index_off, "unset options keep their defaults");
        for (bad, says) in [
            ("[snapshotters.x]\ndriver = \"zfs\"\n", "zfs"),
            ("[snapshotters.x]\ndriver = \"overlay\"\nvolatil = true\n", "volatil"),
            ("[snapshotters.x]\ndriver = \"native\"\n", "default_snapshotter \"native\""),
            ("default_snapshotter = \"x\"\nsnapshotters = {}\n", "no [snapshotters"),
            ("nonsense", "config t"),
        ] {
            let err = Config::parse(bad, "t").unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument);
            assert!(err.to_string().contains(says), "{bad:?} -> {err}");
        }
    }
}
