//! The options every command takes ([`Global`]), and the configuration they make: the
//! configuration file or the defaults, with `--plugin` and `--policy` applied.
//!
//! The command tree (`cli.rs`) flattens [`Global`] into itself; the commands receive it.

use std::path::PathBuf;

use clap::Args;

use wasnap::error::{Error, Result};
use wasnap::metadata::DEFAULT_NAMESPACE;
use wasnap::root::Config;

use crate::output::Format;

/// Options every command takes.
#[derive(Debug, Clone, Args)]
pub struct Global {
    /// State directory [default: /var/lib/wasnap as root, else $XDG_DATA_HOME/wasnap]
    #[arg(long, global = true, env = "WASNAP_ROOT")]
    pub root: Option<PathBuf>,
    /// Namespace of the snapshots
    #[arg(short = 'n', long, global = true, env = "WASNAP_NAMESPACE", default_value = DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// Configuration file naming the snapshotters and their drivers [default: the
    /// built-in drivers native, overlay and btrfs]
    #[arg(long, global = true, env = "WASNAP_CONFIG")]
    pub config: Option<PathBuf>,
    /// Backend to use: a built-in driver (native, overlay, btrfs) or a configured name
    /// [default: the configuration's default_snapshotter, native]
    #[arg(short = 's', long, visible_alias = "driver", global = true, env = "WASNAP_SNAPSHOTTER")]
    pub snapshotter: Option<String>,
    /// Output format
    #[arg(long, global = true, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Lease in effect: snapshots created or committed are added to it (and may be
    /// collected once nothing holds them)
    #[arg(long, global = true, env = "WASNAP_LEASE")]
    pub lease: Option<String>,
    /// Serve snapshots with this WebAssembly backend plugin (a .wasm, or a guest crate's
    /// directory, built first): a snapshotter named after the file, selected unless
    /// -s names another
    #[arg(long, global = true, value_name = "PLUGIN")]
    pub plugin: Option<PathBuf>,
    /// The configuration `--plugin`'s `init` receives, as JSON (what `config = {...}`
    /// under a `driver = "wasm"` snapshotter gives it)
    #[arg(long, global = true, value_name = "JSON", requires = "plugin")]
    pub plugin_config: Option<String>,
    /// Put this policy plugin in front of the selected snapshotter (repeatable; the
    /// first given sees calls first)
    #[arg(long = "policy", global = true, value_name = "POLICY")]
    pub policies: Vec<PathBuf>,
    /// Go through the wasnap daemon listening on this unix socket instead of opening
    /// the root in this process (same commands, same output)
    #[arg(long, global = true, env = "WASNAP_ADDRESS", value_name = "SOCKET")]
    pub address: Option<PathBuf>,
}

impl Global {
    /// The configuration file (or the defaults), with `--plugin` and `--policy` applied;
    /// returns it with the snapshotter commands use.
    pub fn config(&self) -> Result<(Config, String)> {
        let mut config = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        let mut selected = self.snapshotter.clone();
        if let Some(p) = &self.plugin {
            let path = absolute(&crate::wasm::resolve(p)?)?;
            let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("").to_owned();
            wasnap::config::validate_name(&name)
                .map_err(|e| e.context(format!("--plugin {}: the file's name", p.display())))?;
            if config.snapshotters.contains_key(&name) {
                // Its root would be that snapshotter's directory, with another driver's data.
                return Err(Error::already_exists(format!(
                    "--plugin {}: a snapshotter named {name:?} is already configured; rename the .wasm",
                    p.display()
                )));
            }
            let mut plugin = wasnap::root::PluginConfig::new(path);
            if let Some(json) = &self.plugin_config {
                plugin.config = plugin_config(json)?;
            }
            let driver = wasnap::root::DriverConfig::Wasm(plugin);
            config.snapshotters.insert(name.clone(), driver.into());
            selected.get_or_insert(name);
        }
        let selected = selected.unwrap_or_else(|| config.default_snapshotter.clone());
        if !self.policies.is_empty() {
            let s = config.snapshotters.get_mut(&selected).ok_or_else(|| {
                Error::not_found(format!("snapshotter {selected:?} (for --policy)"))
            })?;
            for p in &self.policies {
                let path = absolute(&crate::wasm::resolve(p)?)?;
                s.policies.push(wasnap::root::PluginConfig::new(path));
            }
        }
        Ok((config, selected))
    }
}

/// `--plugin-config`: JSON, kept as the TOML value a configuration file would hold
/// (`null` is no configuration).
fn plugin_config(json: &str) -> Result<Option<toml::Value>> {
    let bad = |e: &dyn std::fmt::Display| {
        Error::invalid_argument(format!("--plugin-config {json:?}: {e}"))
    };
    let value: serde_json::Value = serde_json::from_str(json).map_err(|e| bad(&e))?;
    if value.is_null() {
        return Ok(None);
    }
    toml::Value::try_from(value).map(Some).map_err(|e| bad(&e))
}

fn absolute(p: &std::path::Path) -> Result<PathBuf> {
    std::path::absolute(p).map_err(|e| Error::invalid_argument(format!("{}: {e}", p.display())))
}
