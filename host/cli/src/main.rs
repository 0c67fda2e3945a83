//! The `wasnap` binary: the edge where errors become one line and an exit status.

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
mod api;
mod bench;
mod bench_daemon;
mod bench_plugins;
mod cli;
mod conformance;
mod daemon;
mod output;
mod plugin;

use cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
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
