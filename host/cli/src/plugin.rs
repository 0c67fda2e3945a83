//! `wasnap plugin inspect|compile|ls`.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use wasnap::Context;
use wasnap::Host;
use wasnap::error::{Error, Result};
use wasnap::plugin::{Plugin, PluginInfo, Runtime, WIT_PACKAGE};

use crate::output::{Format, table};
use crate::wasm::resolve;

/// `wasnap plugin` subcommands.
#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Show what a plugin is: its world, the capabilities it asks for, imports, exports,
    /// size, and whether this host can run it (exits non-zero, saying why, if not)
    Inspect {
        /// A `.wasm` component, or a guest crate's directory (built first)
        plugin: PathBuf,
    },
    /// Compile plugins into the root's cache, so that loading them later is fast
    Compile {
        /// `.wasm` components or guest crate directories
        #[arg(required = true)]
        plugins: Vec<PathBuf>,
    },
    /// List the configured plugins, start each, and show its counters
    #[command(alias = "list")]
    Ls,
    /// Create a plugin crate to start from: a backend (the SDK README's snapshotter) or
    /// a policy; it builds and passes the suite as it is
    New {
        /// The crate's name (lowercase letters, digits, '-', '_')
        name: String,
        /// What it is: a backend (stores snapshots) or a policy (in front of another
        /// snapshotter)
        #[arg(long, value_enum, default_value_t = World::Backend)]
        world: World,
        /// Where to create it [default: ./NAME]
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The wasnap-sdk crate to depend on [default: the sdk/ of the sources this
        /// wasnap was built from]
        #[arg(long, value_name = "PATH")]
        sdk: Option<PathBuf>,
    },
    /// Write a plugin as an OCI artifact: an image layout directory, or its tar when
    /// OUTPUT ends in .tar, which any OCI tool can push to a registry
    Package {
        /// A `.wasm` component, or a guest crate's directory (built first)
        plugin: PathBuf,
        /// The layout directory (new) or `.tar` to write
        #[arg(short, long)]
        output: PathBuf,
        /// The name the manifest is tagged with in the layout
        #[arg(long = "ref", default_value = "latest")]
        reference: String,
    },
    /// Install a plugin into the root (`plugins/installed/<sha256>.wasm`) from a
    /// package (layout directory or tar) or a `.wasm`, checking every digest, and print
    /// the configuration that pins it
    Install {
        /// The package or `.wasm`
        source: PathBuf,
        /// Which manifest of the package [default: the only one]
        #[arg(long = "ref")]
        reference: Option<String>,
    },
    /// Load new versions of a running daemon's plugins without stopping it (what SIGHUP
    /// does): the configuration is read again, and each plugin whose file or settings
    /// changed is swapped once its new version has started; calls in flight finish on
    /// the old one, and a version that fails keeps the old one serving (exits non-zero)
    Reload {
        /// Snapshotters whose plugins to reload [default: every one]
        snapshotters: Vec<String>,
    },
    /// Build a plugin crate for wasm32-wasip2 and print its component's path
    Build {
        /// The crate's directory
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
    /// Build a plugin crate and run the conformance suite against it: a backend on its
    /// own, a policy in front of the native driver
    Test {
        /// The crate's directory (or a built .wasm)
        #[arg(default_value = ".", value_name = "DIR")]
        plugin: PathBuf,
        #[command(flatten)]
        suite: crate::conformance::ConformanceArgs,
    },
}

/// The world a new plugin exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum World {
    /// A snapshotter that stores snapshots in layers.
    Backend,
    /// A snapshotter in front of another.
    Policy,
}

/// `wasnap plugin build`.
pub fn build(dir: &Path, out: &mut dyn Write) -> Result<()> {
    if !dir.join("Cargo.toml").is_file() {
        return Err(Error::invalid_argument(format!(
            "{}: not a plugin crate (no Cargo.toml); `wasnap plugin new NAME` makes one",
            dir.display()
        )));
    }
    let wasm = resolve(dir)?;
    writeln!(out, "{}", wasm.display()).with_context(|| "write")
}

/// `wasnap plugin test`: the suite against the plugin, in the place its role gives it.
pub fn test(
    dir: &Path,
    suite: &crate::conformance::ConformanceArgs,
    f: Format,
    out: &mut dyn Write,
) -> Result<()> {
    let wasm = resolve(dir)?;
    let info = Plugin::inspect(&read(&wasm)?, None)?;
    info.compatible
        .as_ref()
        .map_err(|why| Error::failed_precondition(format!("plugin {}: {why}", wasm.display())))?;
    let plugin =
        wasnap::config::PluginConfig::new(std::path::absolute(&wasm).with_context(|| "path")?);
    let role = info.role;
    crate::conformance::run_on(
        suite,
        f,
        || match role {
            Some(wasnap::plugin::Role::Policy) => {
                Ok(wasnap_conformance::StackFactory::native().with_policies(vec![plugin]))
            }
            _ => Ok(wasnap_conformance::StackFactory::plugin(plugin)),
        },
        out,
    )
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| Error::invalid_argument(format!("plugin {}: {e}", path.display())))
}

/// `wasnap plugin inspect`.
pub fn inspect(
    path: &Path,
    cache: Option<&cap_std::fs::Dir>,
    f: Format,
    out: &mut dyn Write,
) -> Result<()> {
    let path = resolve(path)?;
    let info = Plugin::inspect(&read(&path)?, cache)?;
    match f {
        Format::Json => {
            let v = serde_json::json!({
                "path": path,
                "host_wit": WIT_PACKAGE,
                "role": info.role,
                "size": info.size,
                "sha256": info.digest,
                "imports": info.imports,
                "exports": info.exports,
                "capabilities": info.capabilities,
                "compatible": info.compatible.is_ok(),
                "problem": info.compatible.as_ref().err(),
                "cached": info.cached,
                "load_micros": info.load_time.as_micros() as u64,
            });
            serde_json::to_writer_pretty(&mut *out, &v).with_context(|| "encode JSON")?;
            writeln!(out).with_context(|| "write")?;
        }
        _ => write_info(out, &path, &info)?,
    }
    info.compatible.map_err(|why| {
        Error::failed_precondition(format!(
            "plugin {} cannot run on this host: {why}",
            path.display()
        ))
    })
}

fn write_info(out: &mut dyn Write, path: &Path, info: &PluginInfo) -> Result<()> {
    let world = match info.role {
        Some(r) => format!("{r} ({WIT_PACKAGE})"),
        None => "none of this host's".to_owned(),
    };
    let fits = match &info.compatible {
        Ok(()) => "yes".to_owned(),
        Err(why) => format!("no: {why}"),
    };
    let how = if info.cached { "from the cache" } else { "compiled" };
    let mut rows = vec![
        vec!["plugin".into(), path.display().to_string()],
        vec!["world".into(), world],
        vec!["runs here".into(), fits],
        vec!["size".into(), format!("{} bytes", info.size)],
        vec!["sha256".into(), info.digest.clone()],
        vec!["load".into(), format!("{:.1} ms ({how})", info.load_time.as_secs_f64() * 1e3)],
    ];
    rows.extend(info.capabilities.iter().map(|c| vec!["may".into(), c.clone()]));
    rows.extend(info.imports.iter().map(|i| vec!["imports".into(), i.clone()]));
    rows.extend(info.exports.iter().map(|e| vec!["exports".into(), e.clone()]));
    table(out, &["", ""], &rows)
}

/// `wasnap plugin compile`: fills `host`'s cache.
pub fn compile(host: &Host, plugins: &[PathBuf], f: Format, out: &mut dyn Write) -> Result<()> {
    let cache = host.plugin_cache()?;
    let mut rows = Vec::new();
    for p in plugins {
        let path = resolve(p)?;
        let info = Plugin::inspect(&read(&path)?, Some(&cache))?;
        info.compatible.as_ref().map_err(|why| {
            Error::failed_precondition(format!("plugin {}: {why}", path.display()))
        })?;
        rows.push(vec![
            path.display().to_string(),
            if info.cached { "already cached".into() } else { "compiled".into() },
            format!("{:.1} ms", info.load_time.as_secs_f64() * 1e3),
        ]);
    }
    match f {
        Format::Json => {
            let v: Vec<_> = rows
                .iter()
                .map(|r| serde_json::json!({"plugin": r[0], "result": r[1], "time": r[2]}))
                .collect();
            serde_json::to_writer_pretty(&mut *out, &v).with_context(|| "encode JSON")?;
            writeln!(out).with_context(|| "write")
        }
        _ => table(out, &["PLUGIN", "RESULT", "TIME"], &rows),
    }
}

/// `wasnap plugin ls`: starts every snapshotter that uses a plugin and shows the
/// plugins with their counters (this process's: the daemon keeps them for its life).
pub fn ls(host: &Host, f: Format, out: &mut dyn Write) -> Result<()> {
    let names: Vec<String> = host.snapshotter_names().map(str::to_owned).collect();
    let mut failed = Vec::new();
    for name in &names {
        let c = &host.configs()[name];
        let uses_wasm =
            !c.policies.is_empty() || matches!(c.driver, wasnap::root::DriverConfig::Wasm(_));
        if uses_wasm && let Err(e) = host.snapshotter(name) {
            failed.push(vec![
                name.clone(),
                "-".into(),
                "-".into(),
                format!("failed to start: {e}"),
            ]);
        }
    }
    let loaded = host.loaded_plugins();
    for p in &loaded {
        // One round trip each: proves the instance answers, and shows in the counters.
        let _ = p.wasm.ping();
    }
    match f {
        Format::Json => {
            let v: Vec<_> = loaded
                .iter()
                .map(|p| {
                    serde_json::json!({
                        "snapshotter": p.snapshotter,
                        "role": p.role,
                        "path": p.config.path,
                        "size": p.wasm.plugin().info().size,
                        "sha256": p.wasm.plugin().info().digest,
                        "counters": p.wasm.plugin().counters().snapshot(),
                    })
                })
                .collect();
            serde_json::to_writer_pretty(&mut *out, &v).with_context(|| "encode JSON")?;
            writeln!(out).with_context(|| "write")?;
        }
        _ => {
            let _ = Runtime::get()?;
            let mut rows: Vec<Vec<String>> = loaded
                .iter()
                .map(|p| {
                    let c = p.wasm.plugin().counters().snapshot();
                    vec![
                        p.snapshotter.clone(),
                        p.role.to_string(),
                        p.config.path.display().to_string(),
                        format!(
                            "calls {} errors {} traps {} (timeouts {}) instances {}",
                            c.calls, c.errors, c.traps, c.timeouts, c.instances
                        ),
                    ]
                })
                .collect();
            rows.extend(failed.iter().cloned());
            if rows.is_empty() {
                writeln!(out, "no plugins configured (see `driver = \"wasm\"` and `policies` in the config file)")
                    .with_context(|| "write")?;
                return Ok(());
            }
            table(out, &["SNAPSHOTTER", "ROLE", "PLUGIN", "COUNTERS (THIS PROCESS)"], &rows)?;
        }
    }
    match failed.len() {
        0 => Ok(()),
        n => Err(Error::failed_precondition(format!(
            "{n} snapshotter(s) with plugins failed to start"
        ))),
    }
}

/// `wasnap plugin reload`: asks the daemon at `socket` to reload, and prints what each
/// plugin did.
pub fn reload(
    socket: &Path,
    snapshotters: &[String],
    f: Format,
    out: &mut dyn Write,
) -> Result<()> {
    use wasnap::root::{ReloadOutcome, ReloadReport};
    use wasnap_daemon::proto::admin as apb;
    let request = apb::ReloadRequest { snapshotters: snapshotters.to_vec() };
    let reply = wasnap_daemon::client::Blocking::connect(socket)?
        .call(|c| async move { c.admin().reload(request).await })?;
    let reports: Vec<ReloadReport> =
        serde_json::from_str(&reply.json).with_context(|| "decode the daemon's report")?;
    let short = |d: &str| d.get(..12).unwrap_or(d).to_owned();
    match f {
        Format::Json => {
            serde_json::to_writer_pretty(&mut *out, &reports).with_context(|| "encode JSON")?;
            writeln!(out).with_context(|| "write")?;
        }
        _ => {
            let rows: Vec<Vec<String>> = reports
                .iter()
                .map(|r| {
                    let what = match r.outcome {
                        ReloadOutcome::Reloaded => {
                            format!(
                                "reloaded: sha256:{} -> sha256:{}",
                                short(&r.from),
                                short(&r.to)
                            )
                        }
                        ReloadOutcome::Unchanged => format!("unchanged: sha256:{}", short(&r.from)),
                        ReloadOutcome::Failed if r.from.is_empty() => {
                            format!("failed: {}", r.error.as_deref().unwrap_or(""))
                        }
                        ReloadOutcome::Failed => format!(
                            "failed, sha256:{} keeps serving: {}",
                            short(&r.from),
                            r.error.as_deref().unwrap_or("")
                        ),
                        ReloadOutcome::NotOpen => {
                            "not open: it loads its plugins at first use".to_owned()
                        }
                    };
                    vec![r.plugin.clone(), what]
                })
                .collect();
            table(out, &["PLUGIN", "RELOAD"], &rows)?;
        }
    }
    match reports.iter().filter(|r| r.outcome == ReloadOutcome::Failed).count() {
        0 => Ok(()),
        n => Err(Error::failed_precondition(format!("{n} plugin(s) failed to reload"))),
    }
}

/// `wasnap plugin ls` through a daemon: its plugins and their counters since it started.
pub fn ls_remote(
    status: &wasnap_daemon::proto::admin::StatusResponse,
    f: Format,
    out: &mut dyn Write,
) -> Result<()> {
    match f {
        Format::Json => {
            let v: Vec<_> = status.plugins.iter().map(crate::output::plugin_json).collect();
            serde_json::to_writer_pretty(&mut *out, &v).with_context(|| "encode JSON")?;
            writeln!(out).with_context(|| "write")
        }
        _ => {
            let rows: Vec<Vec<String>> = status
                .plugins
                .iter()
                .map(|p| {
                    vec![
                        p.snapshotter.clone(),
                        p.role.clone(),
                        p.path.clone(),
                        format!(
                            "calls {} errors {} traps {} (timeouts {}) instances {}",
                            p.calls, p.errors, p.traps, p.timeouts, p.instances
                        ),
                    ]
                })
                .collect();
            if rows.is_empty() {
                writeln!(out, "no plugins configured (see `driver = \"wasm\"` and `policies` in the config file)")
                    .with_context(|| "write")?;
                return Ok(());
            }
            table(out, &["SNAPSHOTTER", "ROLE", "PLUGIN", "COUNTERS (DAEMON)"], &rows)
        }
    }
}
