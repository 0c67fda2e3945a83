//! `wasnap daemon`: serve the configured snapshotters over containerd's gRPC API.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use wasnap::Context;
use wasnap::error::{Error, Result};
use wasnap::root::{Config, default_root};

use crate::global::Global;

/// Options of `wasnap daemon`.
#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Unix socket to serve on [default: the config's daemon.socket, /run/wasnap/wasnap.sock]
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Print the default configuration (a starting point for --config) and exit
    #[arg(long)]
    pub print_default_config: bool,
}

/// The configuration with every default spelt out, commented.
pub fn default_config_text() -> Result<String> {
    let config = Config { root: Some(default_root()), ..Config::default() };
    // The metrics endpoint is off by default, so its one setting would not show: say
    // how to turn it on.
    let text = config.to_toml()?.replacen(
        "[metrics]\n",
        "[metrics]\n# Serve Prometheus metrics at http://ADDRESS/metrics (off when unset).\n\
         # address = \"127.0.0.1:9464\"\n",
        1,
    );
    Ok(format!(
        "# wasnap configuration: every setting at its default.\n\
         # Use it with `wasnap daemon --config FILE` (or any command's --config).\n\
         # Relative paths are relative to this file. See README.md, \"Running the daemon\".\n\n{text}"
    ))
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(args: &DaemonArgs, g: &Global, out: &mut dyn Write) -> Result<()> {
    if args.print_default_config {
        return write!(out, "{}", default_config_text()?).with_context(|| "write");
    }
    let (config, _) = g.config()?;
    let mut opts = wasnap_daemon::serve::Options::from_config(config);
    // A reload reads the configuration as the daemon did at start: the file again, with
    // the command line's --plugin and --policy.
    let again = g.clone();
    opts.reconfigure = Some(wasnap_daemon::server::Reconfigure(std::sync::Arc::new(move || {
        again.config().map(|(c, _)| c)
    })));
    if let Some(root) = &g.root {
        opts.root = root.clone();
    }
    if let Some(socket) = &args.socket {
        opts.socket = std::path::absolute(socket)
            .map_err(|e| Error::invalid_argument(format!("--socket {}: {e}", socket.display())))?;
    }
    wasnap_daemon::serve::run(opts)
}
