//! The `wasnap` command line.
//!
//! Verbs and argument order follow `ctr snapshots` (`prepare KEY [PARENT]`,
//! `view KEY PARENT`, `commit NAME KEY`, `rm KEY...`, `label KEY k=v...`), so people who
//! know containerd feel at home. The command tree is parsed once here; commands run
//! against [`Api`]: a [`Host`] opened in this process, or the daemon at `--address`.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

use std::sync::Arc;
use wasnap::Context;
use wasnap::error::{Error, Result};

use wasnap::config::DEFAULT_SOCKET;
use wasnap::fault::Faults;
use wasnap::metadata::lease::LABEL_GC_EXPIRE;
use wasnap::metadata::{Ctx, Resource};
use wasnap::root::{Host, default_root};
use wasnap::snapshot::{Info, Labels};

use crate::api::{Api, Local, Remote};
use crate::global::Global;
use crate::output::Format;

/// wasnap: a container snapshotter host with containerd's semantics.
#[derive(Debug, Parser)]
#[command(name = "wasnap", version, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// `wasnap lease` subcommands, after containerd's lease API.
#[derive(Debug, Subcommand)]
pub enum LeaseCommand {
    /// Create a lease and print its id
    Create {
        /// Its id [default: generated]
        #[arg(long)]
        id: Option<String>,
        /// Label to set, KEY=VALUE (repeatable)
        #[arg(short, long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// Expire after this long (e.g. 10m, 24h): sets containerd.io/gc.expire
        #[arg(long, value_parser = humantime::parse_duration)]
        expire: Option<std::time::Duration>,
    },
    /// List leases, optionally filtered (fields id, labels.<key>)
    #[command(alias = "list")]
    Ls {
        #[arg(long = "filter", short = 'f')]
        filters: Vec<String>,
    },
    /// Delete leases; with --sync, collect before returning
    #[command(alias = "delete")]
    Rm {
        #[arg(required = true)]
        ids: Vec<String>,
        #[arg(long)]
        sync: bool,
    },
    /// Add snapshots (by key, of the selected snapshotter) to a lease
    Add {
        id: String,
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// Remove snapshots from a lease
    Remove {
        id: String,
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// List what a lease holds
    Resources { id: String },
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create an active (writable) snapshot KEY, on PARENT if given
    Prepare {
        key: String,
        parent: Option<String>,
        /// Label to set, KEY=VALUE (repeatable)
        #[arg(short, long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
    },
    /// Create a read-only view KEY of the committed snapshot PARENT
    View {
        key: String,
        parent: String,
        /// Label to set, KEY=VALUE (repeatable)
        #[arg(short, long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
    },
    /// Commit the active snapshot KEY as NAME
    Commit {
        name: String,
        key: String,
        /// Label to set on the committed snapshot, KEY=VALUE (repeatable)
        #[arg(short, long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
    },
    /// Merge committed snapshots into NAME, each input over those before it
    /// (buildkit's MergeOp); prints the snapshot made, or the one that is this merge
    /// already
    Merge {
        name: String,
        /// Committed snapshots, bottom first
        #[arg(required = true)]
        inputs: Vec<String>,
        /// Label to set, KEY=VALUE (repeatable)
        #[arg(short, long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
    },
    /// Make NAME: what changes LOWER into UPPER, deletions included (buildkit's DiffOp)
    Diff {
        name: String,
        /// The snapshot before (omit: from nothing)
        #[arg(long)]
        lower: Option<String>,
        /// The snapshot after
        upper: String,
        /// Label to set, KEY=VALUE (repeatable)
        #[arg(short, long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
    },
    /// Remove snapshots (children first)
    #[command(alias = "remove", alias = "delete", alias = "del")]
    Rm {
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// Show one snapshot
    Stat { key: String },
    /// List snapshots, optionally filtered (containerd filter syntax, e.g. kind==committed)
    #[command(alias = "list")]
    Ls {
        /// Filter; several are alternatives (OR)
        #[arg(long = "filter", short = 'f')]
        filters: Vec<String>,
    },
    /// Show snapshots as a tree of parents and children
    Tree,
    /// Disk usage of snapshots (all if no KEY is given)
    Usage { keys: Vec<String> },
    /// Show the mounts of active snapshot or view KEY (a committed one: view it first)
    Mounts { key: String },
    /// Set labels on KEY (KEY=VALUE; KEY= removes the label)
    Label {
        key: String,
        #[arg(value_name = "KEY=VALUE")]
        labels: Vec<String>,
    },
    /// Mount active snapshot or view KEY at DIR
    Mount { key: String, dir: PathBuf },
    /// Unmount everything at DIR
    #[command(alias = "umount")]
    Unmount { dir: PathBuf },
    /// Remove backend data no snapshot record names, and reclaim space
    Cleanup,
    /// Show the root, the snapshotters, and what this kernel supports
    Info,
    /// Manage leases
    #[command(subcommand)]
    Lease(LeaseCommand),
    /// Apply layers into snapshots, diff snapshots into layers, register layers by
    /// chain ID
    #[command(subcommand)]
    Layer(crate::layer::LayerCommand),
    /// List, show, ingest, print and delete the content store's blobs
    #[command(subcommand)]
    Content(crate::layer::ContentCommand),
    /// Import images (an OCI layout or a docker save tarball) as chains of snapshots
    #[command(subcommand)]
    Image(crate::image::ImageCommand),
    /// Collect garbage now and print what went and how long each step took
    Gc {
        /// List what would be removed; change nothing
        #[arg(long)]
        dry_run: bool,
        /// List backend snapshots no record names and records whose backend snapshot is
        /// missing, for every snapshotter; change nothing
        #[arg(long, conflicts_with = "dry_run")]
        check: bool,
    },
    /// Show snapshots as a build cache: size, last use, use count, in use, shared,
    /// reclaimable (buildkit's du)
    Du(crate::cache::DuArgs),
    /// Remove unused snapshots, least recently used first, by buildkit's prune knobs;
    /// never one in use, held by a lease or gc.root, or referred to by one kept
    Prune(crate::cache::PruneArgs),
    /// Measure the host's hot paths and print a table
    Bench(crate::bench::BenchArgs),
    /// Check a backend against the conformance suite (containerd's snapshotter tests)
    Conformance(crate::conformance::ConformanceArgs),
    /// Make, build, test, inspect, compile and list WebAssembly plugins
    #[command(subcommand)]
    Plugin(crate::plugin::PluginCommand),
    /// Serve the snapshotters over containerd's snapshots and leases gRPC API on a
    /// unix socket, until SIGTERM or SIGINT
    Daemon(crate::daemon::DaemonArgs),
    /// Show a running daemon's uptime, snapshotters and plugins with their counters
    /// (the daemon at --address, or at /run/wasnap/wasnap.sock)
    Status,
}

/// Parses `KEY=VALUE` arguments.
pub fn parse_labels(args: &[String]) -> Result<Labels> {
    args.iter()
        .map(|a| {
            a.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| Error::invalid_argument(format!("label {a:?}: expected KEY=VALUE")))
        })
        .collect()
}

/// Runs a parsed command line, writing results to `out`.
pub fn run(cli: Cli, out: &mut dyn Write) -> Result<()> {
    let g = &cli.global;
    if let Command::Unmount { dir } = &cli.command {
        return wasnap::mount::unmount(dir);
    }
    if let Command::Conformance(args) = &cli.command {
        return crate::conformance::run(args, g, out);
    }
    match &cli.command {
        Command::Plugin(crate::plugin::PluginCommand::Inspect { plugin }) => {
            return crate::plugin::inspect(plugin, None, g.format, out);
        }
        Command::Plugin(crate::plugin::PluginCommand::New { name, world, dir, sdk }) => {
            let policy = *world == crate::plugin::World::Policy;
            return crate::scaffold::new(name, policy, dir.as_deref(), sdk.as_deref(), out);
        }
        Command::Plugin(crate::plugin::PluginCommand::Package { plugin, output, reference }) => {
            let wasm = crate::wasm::resolve(plugin)?;
            return crate::package::package(&wasm, output, reference, out);
        }
        Command::Plugin(crate::plugin::PluginCommand::Install { source, reference }) => {
            let root = g.root.clone().unwrap_or_else(default_root);
            let dir = root.join("plugins/installed");
            return crate::package::install(source, reference.as_deref(), &dir, out).map(drop);
        }
        Command::Plugin(crate::plugin::PluginCommand::Build { dir }) => {
            return crate::plugin::build(dir, out);
        }
        Command::Plugin(crate::plugin::PluginCommand::Test { plugin, suite }) => {
            return crate::plugin::test(plugin, suite, g.format, out);
        }
        _ => {}
    }
    if g.format == Format::Junit {
        return Err(Error::invalid_argument("--format junit is for `wasnap conformance` only"));
    }
    if let Command::Bench(args) = &cli.command {
        return crate::bench::run(args, out);
    }
    if let Command::Daemon(args) = &cli.command {
        // --address is for clients. From the environment (a shell that exported
        // WASNAP_ADDRESS for its CLI), it does not concern the daemon; given on the
        // daemon's own command line, it is a mistake for --socket.
        let from_env = std::env::var_os("WASNAP_ADDRESS").map(PathBuf::from);
        if g.address.is_some() && g.address != from_env {
            return Err(Error::invalid_argument(
                "daemon: --address is for clients; the daemon takes --socket",
            ));
        }
        return crate::daemon::run(args, g, out);
    }
    if let Command::Status = &cli.command {
        let socket = g.address.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
        return crate::output::status(out, g.format, &Remote::status(&socket)?);
    }
    if let Command::Plugin(crate::plugin::PluginCommand::Reload { snapshotters }) = &cli.command {
        let socket = g.address.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
        return crate::plugin::reload(&socket, snapshotters, g.format, out);
    }
    if let Some(socket) = &g.address {
        return run_remote(socket, &cli.command, g, out);
    }
    let root = g.root.clone().unwrap_or_else(default_root);
    let (config, snapshotter) = g.config()?;
    let host = Host::open_config(&root, Arc::new(Faults::from_env()?), config)?;
    let result = match &cli.command {
        Command::Plugin(crate::plugin::PluginCommand::Compile { plugins }) => {
            Some(crate::plugin::compile(&host, plugins, g.format, out))
        }
        Command::Plugin(crate::plugin::PluginCommand::Ls) => {
            Some(crate::plugin::ls(&host, g.format, out))
        }
        _ => None,
    };
    if let Some(result) = result {
        return result.and(host.close());
    }
    let ctx = Ctx::new(&g.namespace)?.with_lease(g.lease.clone());
    let result = run_on(&Local::new(&host, &snapshotter, ctx), g, &cli.command, out);
    let closed = host.close();
    result.and(closed)
}

/// Runs a command through the daemon at `socket`.
fn run_remote(socket: &Path, command: &Command, g: &Global, out: &mut dyn Write) -> Result<()> {
    let local_only = [
        ("--root (or WASNAP_ROOT)", g.root.is_some()),
        ("--config (or WASNAP_CONFIG)", g.config.is_some()),
        ("--plugin", g.plugin.is_some()),
        ("--policy", !g.policies.is_empty()),
    ];
    if let Some((flag, _)) = local_only.iter().find(|(_, set)| *set) {
        return Err(Error::invalid_argument(format!(
            "{flag} configures a root opened in this process; with --address the daemon's own configuration applies"
        )));
    }
    match command {
        Command::Plugin(crate::plugin::PluginCommand::Ls) => {
            return crate::plugin::ls_remote(&Remote::status(socket)?, g.format, out);
        }
        Command::Plugin(crate::plugin::PluginCommand::Compile { .. }) => {
            return Err(Error::invalid_argument(
                "plugin compile fills this process's cache; the daemon compiles its plugins when it starts",
            ));
        }
        _ => {}
    }
    let api = Remote::connect(socket, g.snapshotter.as_deref(), &g.namespace, g.lease.clone())?;
    run_on(&api, g, command, out)
}

fn run_lease(api: &dyn Api, g: &Global, cmd: &LeaseCommand, out: &mut dyn Write) -> Result<()> {
    match cmd {
        LeaseCommand::Create { id, labels, expire } => {
            let mut labels = parse_labels(labels)?;
            if let Some(d) = expire {
                let at = std::time::SystemTime::now() + *d;
                labels.insert(
                    LABEL_GC_EXPIRE.into(),
                    humantime::format_rfc3339_seconds(at).to_string(),
                );
            }
            let lease = api.lease_create(id.as_deref(), &labels)?;
            writeln!(out, "{}", lease.id).with_context(|| "write output")
        }
        LeaseCommand::Ls { filters } => {
            crate::output::leases(out, g.format, &api.lease_list(filters)?)
        }
        LeaseCommand::Rm { ids, sync } => {
            for id in ids {
                if let Some(report) = api.lease_delete(id, *sync)? {
                    crate::output::gc(out, g.format, &report)?;
                }
            }
            Ok(())
        }
        LeaseCommand::Add { id, keys } => {
            let snapshotter = api.snapshotter()?;
            keys.iter().try_for_each(|k| api.lease_add(id, &Resource::snapshot(&snapshotter, k)))
        }
        LeaseCommand::Remove { id, keys } => {
            let snapshotter = api.snapshotter()?;
            keys.iter().try_for_each(|k| api.lease_remove(id, &Resource::snapshot(&snapshotter, k)))
        }
        LeaseCommand::Resources { id } => {
            crate::output::resources(out, g.format, &api.lease_resources(id)?)
        }
    }
}

/// Runs a command through `api`.
fn run_on(api: &dyn Api, g: &Global, command: &Command, out: &mut dyn Write) -> Result<()> {
    let fmt = g.format;
    match command {
        Command::Info => crate::output::host_info(out, fmt, &api.info()?),
        Command::Lease(cmd) => run_lease(api, g, cmd, out),
        Command::Gc { dry_run: false, check: true } => {
            crate::output::check(out, fmt, &api.check()?)
        }
        Command::Gc { dry_run, .. } => crate::output::gc(out, fmt, &api.collect(*dry_run)?),
        Command::Du(args) => crate::cache::du(api, args, fmt, out),
        Command::Prune(args) => crate::cache::prune(api, args, fmt, out),
        Command::Prepare { key, parent, labels } => {
            let mounts = api.prepare(key, parent.as_deref(), &parse_labels(labels)?)?;
            crate::output::mounts(out, fmt, &mounts)
        }
        Command::View { key, parent, labels } => {
            let mounts = api.view(key, Some(parent), &parse_labels(labels)?)?;
            crate::output::mounts(out, fmt, &mounts)
        }
        Command::Commit { name, key, labels } => api.commit(name, key, &parse_labels(labels)?),
        Command::Merge { name, inputs, labels } => {
            crate::output::merged(out, fmt, &api.merge(name, inputs, &parse_labels(labels)?)?)
        }
        Command::Diff { name, lower, upper, labels } => {
            let made = api.diff_snapshot(name, lower.as_deref(), upper, &parse_labels(labels)?)?;
            crate::output::merged(out, fmt, &made)
        }
        Command::Rm { keys } => {
            // Like `ctr snapshots rm`: try each, report each failure, fail if any did.
            let mut failed = Vec::new();
            for key in keys {
                if let Err(e) = api.remove(key) {
                    failed.push(e);
                }
            }
            match failed.len() {
                0 => Ok(()),
                1 => Err(failed.remove(0)),
                n => {
                    let kind = failed[0].kind();
                    let msgs: Vec<String> = failed.iter().map(ToString::to_string).collect();
                    Err(Error::new(kind, format!("{n} removals failed: {}", msgs.join("; "))))
                }
            }
        }
        Command::Stat { key } => crate::output::info(out, fmt, &api.stat(key)?),
        Command::Ls { filters } => crate::output::list(out, fmt, &api.list(filters)?),
        Command::Tree => crate::output::tree(out, fmt, &api.list(&[])?),
        Command::Usage { keys } => {
            let keys: Vec<String> = if keys.is_empty() {
                api.list(&[])?.into_iter().map(|i: Info| i.name).collect()
            } else {
                keys.clone()
            };
            let mut rows = Vec::new();
            for k in keys {
                let u = api.usage(&k)?;
                rows.push((k, u));
            }
            crate::output::usage(out, fmt, &rows)
        }
        Command::Mounts { key } => crate::output::mounts(out, fmt, &api.mounts(key)?),
        Command::Label { key, labels } => {
            let labels = parse_labels(labels)?;
            if labels.is_empty() {
                return Err(Error::invalid_argument("label: give at least one KEY=VALUE"));
            }
            let mut info = api.stat(key)?;
            let mut paths = Vec::new();
            info.labels.clear();
            for (k, v) in labels {
                paths.push(format!("labels.{k}"));
                // `k=` removes: an absent label under a `labels.k` path is a delete.
                if !v.is_empty() {
                    info.labels.insert(k, v);
                }
            }
            let info = api.update(&info, &paths)?;
            crate::output::labels(out, fmt, &info.labels)
        }
        Command::Mount { key, dir } => wasnap::mount::mount_all(&api.mounts(key)?, dir),
        Command::Layer(cmd) => crate::layer::run_layer(api, cmd, fmt, out),
        Command::Content(cmd) => crate::layer::run_content(api, cmd, fmt, out),
        Command::Image(cmd) => crate::image::run_image(api, cmd, fmt, out),
        Command::Cleanup => match api.cleanup()? {
            Some(report) => crate::output::prune(out, fmt, &report),
            // The daemon's Cleanup answers with nothing; its log says what went.
            None => Ok(()),
        },
        Command::Unmount { .. }
        | Command::Bench(_)
        | Command::Conformance(_)
        | Command::Plugin(_)
        | Command::Daemon(_)
        | Command::Status => unreachable_command(),
    }
}

fn unreachable_command() -> Result<()> {
    Err(Error::internal("command dispatched twice"))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    #[test]
    fn the_command_tree_is_consistent() {
        // Catches clashing flags (a global one and a subcommand's) at test time.
        Cli::command().debug_assert();
    }
}
