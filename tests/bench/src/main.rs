//! `wasnap-bench`: the workspace's benchmarks that need development tooling (a
//! containerd of our own, a `wasnap daemon` child, guests built on demand), kept out of
//! the shipped `wasnap bench`. It prints its tables as `wasnap bench` does.

mod daemon;
mod kv;
mod soak;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use wasnap::error::{Error, Result};

/// wasnap's dev benchmarks (not shipped).
#[derive(Debug, Parser)]
#[command(name = "wasnap-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The snapshots gRPC API under load at 1 and 8 clients, side by side: containerd's
    /// own overlayfs, wasnap as containerd's proxy snapshotter, and the wasnap daemon
    /// (overlay driver, `copy` guest)
    Daemon(DaemonArgs),
    /// The floor under every mutating call: one durable write transaction of the root
    /// database changing 1, 4 or 7 tables, or an overlay prepare's rows (as they are and
    /// with its indexes folded into one table, in a store of a few snapshots and of
    /// 2,000), beside a read, in-process
    Kv(KvArgs),
    /// A long concurrent run against one `wasnap daemon` with kill -9s and aborts at
    /// fault points, and an invariant checker; prints a table, exits 1 on a violation
    Soak(SoakArgs),
}

/// Options of `wasnap-bench soak`.
#[derive(Debug, Args)]
struct SoakArgs {
    /// The CI mode: 75 s of load at 8 clients with 4 random kills (well under 3 minutes)
    #[arg(long)]
    smoke: bool,
    /// Concurrent clients
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// How long the load runs (humantime: 30s, 5m, 1h) [default: 30s; 75s with --smoke]
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<std::time::Duration>,
    /// Where the daemon's root goes (a real disk: kill durability is what is checked)
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// The seed of every random choice [default: from the clock; printed]
    #[arg(long)]
    seed: Option<u64>,
    /// Random kill -9s of the daemon, spread over the run [default: 3; 4 with --smoke]
    #[arg(long)]
    kills: Option<u32>,
    /// Chance in percent that a restarted daemon arms one fault point to abort
    #[arg(long, default_value_t = 50)]
    arm_percent: u64,
    /// How often the checker runs besides after each restart and at the end
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    check_every: std::time::Duration,
    /// The daemon's file descriptors may not exceed this after warm-up
    #[arg(long, default_value_t = 512)]
    max_fds: u64,
    /// ... nor its threads
    #[arg(long, default_value_t = 256)]
    max_threads: u64,
    /// ... nor its resident memory, in MiB
    #[arg(long, default_value_t = 1024)]
    max_rss_mib: u64,
    /// Keep the root afterwards (its path is printed)
    #[arg(long)]
    keep: bool,
    /// Times the root's filesystem is filled (by a ballast file, for a few seconds, while
    /// the clients go on); the root is then on a small loop-mounted ext4 of its own, which
    /// needs root [default: 2 with --smoke, else 0]
    #[arg(long)]
    full_disk: Option<u32>,
    /// Chance in percent that a prepare, view, commit or update of the `copy` snapshotter
    /// dies in its guest chain: the `chaos` policy traps, hangs or runs out of memory,
    /// before or after `copy` did the call (0: never)
    #[arg(long, default_value_t = 2)]
    guest_faults: u64,
    /// The `copy` guest's `.wasm` (`label_policy.wasm` and `chaos.wasm` beside it are put
    /// in front)
    /// [default: the workspace's guests, built on demand]
    #[arg(long = "copy-guest", value_name = "WASM")]
    copy_guest: Option<PathBuf>,
    /// The `wasnap` binary to run as the daemon [default: `wasnap` next to this executable]
    #[arg(long, value_name = "PATH")]
    wasnap: Option<PathBuf>,
}

/// Options of `wasnap-bench daemon`.
#[derive(Debug, Args)]
struct DaemonArgs {
    /// A seconds-long run that only proves the benchmark works (CI)
    #[arg(long)]
    smoke: bool,
    /// Directories to create the benchmark's roots in, one run each (repeatable)
    /// [default: /dev/shm (tmpfs) and /var/tmp (disk); only /dev/shm with --smoke]
    #[arg(long = "dir", value_name = "DIR")]
    dirs: Vec<PathBuf>,
    /// The `copy` guest's `.wasm` [default: the workspace's guests/copy, built on demand]
    #[arg(long = "copy-guest", value_name = "WASM")]
    copy_guest: Option<PathBuf>,
    /// The `copy` guest's `limits.instances`: calls it serves at once. It keeps its
    /// records in the key-value store, so it may run several; with 1 its calls queue
    #[arg(long = "copy-instances", value_name = "N", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    copy_instances: u32,
    /// The `wasnap` binary to run as the daemon [default: `wasnap` next to this executable]
    #[arg(long, value_name = "PATH")]
    wasnap: Option<PathBuf>,
    /// Committed snapshots each target keeps beside the load, made before it: the load
    /// then runs in a store of that size, as an operator's does
    #[arg(long, value_name = "N", default_value_t = 0)]
    live: usize,
}

/// Options of `wasnap-bench kv`.
#[derive(Debug, Args)]
struct KvArgs {
    /// A short run that only proves the benchmark works (CI)
    #[arg(long)]
    smoke: bool,
    /// Directories to put the database in, one run each (repeatable)
    /// [default: /dev/shm (tmpfs) and /var/tmp (disk); only /dev/shm with --smoke]
    #[arg(long = "dir", value_name = "DIR")]
    dirs: Vec<PathBuf>,
}

/// `given`, or the benchmarks' default roots: tmpfs, and the disk unless `smoke`.
fn bench_dirs(given: Vec<PathBuf>, smoke: bool) -> Vec<PathBuf> {
    if !given.is_empty() {
        return given;
    }
    let shm = Path::new("/dev/shm");
    let mut dirs = vec![if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() }];
    if !smoke {
        dirs.push(PathBuf::from("/var/tmp"));
    }
    dirs
}

/// The `wasnap` binary: the one given, or the one beside this executable (where cargo
/// puts both when it builds the workspace).
fn wasnap_binary(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(exe) = given {
        if !exe.is_file() {
            return Err(Error::not_found(format!("--wasnap {}", exe.display())));
        }
        return Ok(exe.to_path_buf());
    }
    let me = std::env::current_exe()
        .map_err(|e| Error::internal(format!("where this executable is: {e}")))?;
    let beside = me.with_file_name("wasnap");
    if !beside.is_file() {
        return Err(Error::not_found(format!(
            "the wasnap binary {} (looked for next to this executable; build it with \
             `cargo build -p wasnap-cli`, or pass --wasnap PATH)",
            beside.display()
        )));
    }
    Ok(beside)
}

fn run(cli: Cli, out: &mut dyn Write) -> Result<bool> {
    match cli.command {
        Command::Soak(args) => {
            let wasnap = wasnap_binary(args.wasnap.as_deref())?;
            let seed = args.seed.unwrap_or_else(|| {
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
                now.map(|d| d.as_nanos() as u64).unwrap_or(1) % 1_000_000
            });
            let default_duration = if args.smoke { 75 } else { 30 };
            let opts = soak::Options {
                clients: args.clients,
                duration: args.duration.unwrap_or(std::time::Duration::from_secs(default_duration)),
                dir: args.dir,
                seed,
                kills: args.kills.unwrap_or(if args.smoke { 4 } else { 3 }),
                arm_percent: args.arm_percent.min(100),
                guest_faults: args.guest_faults.min(100),
                full_disk: args.full_disk.unwrap_or(if args.smoke { 2 } else { 0 }),
                check_every: args.check_every,
                copy_guest: args.copy_guest,
                max_fds: args.max_fds,
                max_threads: args.max_threads,
                max_rss_mib: args.max_rss_mib,
                keep: args.keep,
            };
            soak::run(&opts, &wasnap, out)
        }
        Command::Daemon(args) => {
            let wasnap = wasnap_binary(args.wasnap.as_deref())?;
            let dirs = bench_dirs(args.dirs, args.smoke);
            let copy = daemon::Copy { guest: args.copy_guest, instances: args.copy_instances };
            daemon::run(&dirs, &copy, &wasnap, (args.smoke, args.live), out).map(|()| true)
        }
        Command::Kv(args) => {
            kv::run(&bench_dirs(args.dirs, args.smoke), args.smoke, out).map(|()| true)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Logs (the daemon's log tail when a load fails) go to stderr; tables to stdout.
    let filter = EnvFilter::try_from_env("WASNAP_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    match run(cli, &mut std::io::stdout().lock()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("wasnap-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    #[test]
    fn the_command_tree_is_consistent() {
        Cli::command().debug_assert();
    }
}
