//! `wasnap-bench`: the workspace's benchmarks that need development tooling (a
//! containerd of our own, a `wasnap daemon` child, guests built on demand), kept out of
//! the shipped `wasnap bench`. It prints its tables as `wasnap bench` does.

mod daemon;

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
    /// The `wasnap` binary to run as the daemon [default: `wasnap` next to this executable]
    #[arg(long, value_name = "PATH")]
    wasnap: Option<PathBuf>,
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

fn run(cli: Cli, out: &mut dyn Write) -> Result<()> {
    match cli.command {
        Command::Daemon(args) => {
            let wasnap = wasnap_binary(args.wasnap.as_deref())?;
            let mut dirs = args.dirs;
            if dirs.is_empty() {
                let shm = Path::new("/dev/shm");
                dirs.push(if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() });
                if !args.smoke {
                    dirs.push(PathBuf::from("/var/tmp"));
                }
            }
            daemon::run(&dirs, args.copy_guest.as_deref(), &wasnap, args.smoke, out)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Logs (the daemon's log tail when a load fails) go to stderr; tables to stdout.
    let filter = EnvFilter::try_from_env("WASNAP_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    match run(cli, &mut std::io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
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
