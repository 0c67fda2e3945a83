//! The `wasnap` command line as a library: the binary (`src/main.rs`) calls [`main`].
//!
//! The command modules are private; what the workspace's dev benchmark (`wasnap-bench`,
//! in `tests/bench`) shares with `wasnap bench` is public: [`output`] (its tables) and
//! [`stats`] (latency samples and their formatting). Nothing here is a stable API.

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

mod api;
mod bench;
mod bench_cache;
mod bench_deep;
mod bench_layers;
mod bench_merge;
mod bench_plugins;
mod cache;
mod cli;
mod conformance;
mod daemon;
mod global;
mod image;
mod layer;
pub mod output;
mod package;
mod plugin;
mod scaffold;
pub mod stats;
mod wasm;

/// The `wasnap` binary: parse the command line, set up logging, run the command; an
/// error becomes one line on stderr and a failing exit status.
pub fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    // Logs go to stderr so that stdout stays clean for tables and JSON.
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("WASNAP_LOG").unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, never into a journal or a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match cli::run(cli, &mut out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wasnap: {e}");
            ExitCode::FAILURE
        }
    }
}
