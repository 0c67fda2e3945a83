//! `wasnap image import`: an image tarball or OCI layout into the content store and a
//! chain of snapshots, with progress bars on a terminal and plain lines otherwise.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};

use crate::api::Api;
use crate::output::Format;
use wasnap::Context;
use wasnap::error::Result;
use wasnap::image::Event;

/// Images.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Import an OCI image layout (a directory or a tar of one) or a `docker save`
    /// tarball: store its blobs, register its layers bottom-up as a chain of committed
    /// snapshots (chains already present are skipped), and print the top chain ID, on
    /// which `view` or `prepare` starts a container filesystem
    Import {
        path: PathBuf,
        /// The manifest to take from a multi-platform image, os/arch[/variant]
        /// (default: this machine's)
        #[arg(long)]
        platform: Option<String>,
    },
}

/// Shows an import's progress on stderr: bars for a person at a terminal, one line per
/// step otherwise.
struct Shown {
    bar: Option<ProgressBar>,
    terminal: bool,
}

impl Shown {
    fn event(&mut self, e: Event<'_>) {
        match e {
            Event::Ingesting { name, size } if self.terminal => {
                let bar = match size {
                    Some(n) => ProgressBar::new(n).with_style(
                        ProgressStyle::with_template(
                            "{msg:40!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                    ),
                    None => ProgressBar::new_spinner(),
                };
                bar.set_message(name.to_owned());
                self.bar = Some(bar);
            }
            Event::Progress { done } => {
                if let Some(bar) = &self.bar {
                    bar.set_position(done);
                }
            }
            Event::Ingested { name, digest, size } => match self.bar.take() {
                Some(bar) => bar.finish_and_clear(),
                None => eprintln!("stored {name} ({size} bytes) as {digest}"),
            },
            Event::Registered { index, count, registered } => {
                let how = if registered.created { "registered" } else { "already present" };
                eprintln!("layer {}/{count}: {} {how}", index + 1, registered.chain_id);
            }
            Event::Ingesting { .. } | Event::Registering { .. } => {}
        }
    }
}

/// Runs an image command through `api`.
pub fn run_image(
    api: &dyn Api,
    cmd: &ImageCommand,
    fmt: Format,
    out: &mut dyn Write,
) -> Result<()> {
    match cmd {
        ImageCommand::Import { path, platform } => {
            let mut shown = Shown { bar: None, terminal: std::io::stderr().is_terminal() };
            let imported = api.image_import(path, platform.as_deref(), &mut |e| shown.event(e))?;
            match fmt {
                Format::Json => {
                    serde_json::to_writer_pretty(&mut *out, &imported).context("encode JSON")?;
                    writeln!(out).context("write output")
                }
                _ => writeln!(out, "{}", imported.chain_id).context("write output"),
            }
        }
    }
}
