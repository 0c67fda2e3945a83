//! `wasnap layer ...` and `wasnap content ...`: layers into and out of snapshots, and the
//! content store's blobs, through [`Api`] (a root opened in this process, or the daemon).

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use clap::Subcommand;
use serde::Serialize;

use wasnap::Context;
use wasnap::content::{BlobInfo, Expected};
use wasnap::digest::Digest;
use wasnap::error::{Error, Result};
use wasnap::layer::Compression;
use wasnap::layer::snapshot::Diffed;
use wasnap::metadata::lease::LABEL_GC_EXPIRE;
use wasnap::snapshot::Labels;

use crate::api::Api;
use crate::cli::parse_labels;
use crate::output::{Format, table};

/// Layers into and out of snapshots.
#[derive(Debug, Subcommand)]
pub enum LayerCommand {
    /// Apply a layer (tar, tar+gzip or tar+zstd, detected from its bytes) into the
    /// active snapshot KEY, and print its diffID
    Apply {
        key: String,
        /// The layer file; `-` reads standard input
        file: PathBuf,
        /// Take the stream as compressed this way instead of detecting it
        #[arg(long, value_name = "none|gzip|zstd")]
        compression: Option<String>,
    },
    /// Write the difference between snapshot KEY and its parent as a layer, store it in
    /// the content store, and print its digest, size and diffID. The blob is held by
    /// --lease; with none, garbage collection may take it once the command is done
    Diff {
        key: String,
        /// Also write the layer to FILE (`-`: standard output)
        #[arg(short, long)]
        output: Option<PathBuf>,
        #[arg(long, value_name = "none|gzip|zstd", default_value = "gzip")]
        compression: String,
        /// Label to set on the blob, KEY=VALUE (repeatable)
        #[arg(short, long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
    },
    /// Make a layer a committed snapshot named by its chain ID, on the chain PARENT:
    /// LAYER is a blob's digest in the content store or a file to ingest first. An
    /// existing chain is reused without applying anything. Prints the chain ID
    Register {
        layer: String,
        /// The chain ID of the layer below (none: a bottom layer)
        #[arg(long)]
        parent: Option<String>,
        /// The layer's diffID, if known (checked against what is applied)
        #[arg(long)]
        diff_id: Option<String>,
        /// Label to set on the committed snapshot, KEY=VALUE (repeatable)
        #[arg(short, long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
    },
}

/// The content store's blobs.
#[derive(Debug, Subcommand)]
pub enum ContentCommand {
    /// List the namespace's blobs, optionally filtered (digest, size, labels.<k>)
    #[command(alias = "list")]
    Ls {
        #[arg(long = "filter", short = 'f')]
        filters: Vec<String>,
    },
    /// Store FILE (`-`: standard input) as a blob and print its digest. The blob is held
    /// by --lease (or a containerd.io/gc.root label); with neither, garbage collection
    /// may take it
    Ingest {
        file: PathBuf,
        /// Refuse the blob unless it has this digest
        #[arg(long)]
        expect: Option<String>,
        /// Label to set, KEY=VALUE (repeatable)
        #[arg(short, long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
    },
    /// Write a blob to standard output
    Cat { digest: String },
    /// Show a blob's record and the snapshots mapped to it
    Info { digest: String },
    /// Delete blobs from the namespace (a blob a snapshot is mapped to is refused)
    #[command(alias = "remove", alias = "delete")]
    Rm {
        #[arg(required = true)]
        digests: Vec<String>,
    },
}

fn open_input(file: &Path) -> Result<Box<dyn Read + Send>> {
    if file == Path::new("-") {
        return Ok(Box::new(std::io::stdin()));
    }
    let f = File::open(file).with_context(|| format!("open {}", file.display()))?;
    Ok(Box::new(f))
}

/// How long a lease made for one command ([`holding`]) lasts should the command die
/// before deleting it.
const COMMAND_LEASE: Duration = Duration::from_secs(3600);

/// Runs `f` with what it stores in the content store held until it returns: by the
/// command's lease (`--lease`), or else by a lease made for the command and deleted
/// afterwards. Garbage collection takes a blob that nothing holds, so without it a blob
/// could go between two calls of one command (a diff and reading its layer).
fn holding<T>(api: &dyn Api, f: impl FnOnce(&dyn Api) -> Result<T>) -> Result<T> {
    if api.lease().is_some() {
        return f(api);
    }
    let expire = humantime::format_rfc3339_seconds(SystemTime::now() + COMMAND_LEASE);
    let labels = Labels::from([(LABEL_GC_EXPIRE.to_owned(), expire.to_string())]);
    let lease = api.lease_create(None, &labels)?;
    let result = f(&*api.with_lease(&lease.id));
    let deleted = api.lease_delete(&lease.id, false);
    let value = result?;
    deleted.map_err(|e| e.context(format!("delete the command's lease {}", lease.id)))?;
    Ok(value)
}

fn write_json<T: Serialize>(out: &mut dyn Write, v: &T) -> Result<()> {
    serde_json::to_writer_pretty(&mut *out, v).context("encode JSON")?;
    writeln!(out).context("write output")
}

/// Runs a layer command on the snapshotter `api` acts on.
pub fn run_layer(
    api: &dyn Api,
    cmd: &LayerCommand,
    fmt: Format,
    out: &mut dyn Write,
) -> Result<()> {
    match cmd {
        LayerCommand::Apply { key, file, compression } => {
            let compression = compression.as_deref().map(Compression::parse).transpose()?;
            let applied = api.layer_apply(key, &mut open_input(file)?, compression)?;
            match fmt {
                Format::Json => write_json(out, &applied),
                _ => writeln!(out, "{}", applied.diff_id).context("write output"),
            }
        }
        LayerCommand::Diff { key, output, compression, labels } => {
            let compression = Compression::parse(compression)?;
            let labels = parse_labels(labels)?;
            let Some(path) = output else {
                let diffed = api.layer_diff(key, compression, &labels)?;
                return show_diffed(&diffed, fmt, out);
            };
            // The blob is held until it is written out.
            let diffed = holding(api, |api| {
                let diffed = api.layer_diff(key, compression, &labels)?;
                if path == Path::new("-") {
                    api.content_read(&diffed.blob.digest, out)?;
                    return Ok(None);
                }
                let mut f =
                    File::create(path).with_context(|| format!("create {}", path.display()))?;
                api.content_read(&diffed.blob.digest, &mut f)
                    .map_err(|e| e.context(format!("write {}", path.display())))?;
                f.sync_all().with_context(|| format!("write {}", path.display()))?;
                Ok(Some(diffed))
            })?;
            match diffed {
                Some(diffed) => show_diffed(&diffed, fmt, out),
                None => Ok(()),
            }
        }
        LayerCommand::Register { layer, parent, diff_id, labels } => {
            let parent = parent.as_deref().map(Digest::parse).transpose()?;
            let diff_id = diff_id.as_deref().map(Digest::parse).transpose()?;
            let labels = parse_labels(labels)?;
            // Under the command's own lease (none: the snapshot is kept until removed).
            let register = |blob: &Digest| {
                api.layer_register(blob, diff_id.as_ref(), parent.as_ref(), &labels)
            };
            let reg = match Digest::parse(layer) {
                Ok(blob) => register(&blob)?,
                // The blob is held from its ingest until its snapshot is mapped to it.
                Err(_) if Path::new(layer).exists() => holding(api, |leased| {
                    let mut input = open_input(Path::new(layer))?;
                    register(&leased.content_ingest(&mut input, None, &Labels::new())?.digest)
                })?,
                Err(e) => {
                    return Err(e.context(format!("{layer:?} is neither a digest nor a file")));
                }
            };
            match fmt {
                Format::Json => write_json(out, &reg),
                _ => writeln!(out, "{}", reg.chain_id).context("write output"),
            }
        }
    }
}

fn show_diffed(diffed: &Diffed, fmt: Format, out: &mut dyn Write) -> Result<()> {
    match fmt {
        Format::Json => write_json(out, diffed),
        _ => table(
            out,
            &["DIGEST", "SIZE", "DIFFID", "MEDIA TYPE", "ENTRIES"],
            &[vec![
                diffed.blob.digest.to_string(),
                diffed.blob.size.to_string(),
                diffed.diff_id.to_string(),
                diffed.media_type.clone(),
                diffed.entries.to_string(),
            ]],
        ),
    }
}

/// A blob with the snapshots mapped to it.
#[derive(Debug, Serialize)]
struct BlobReport {
    #[serde(flatten)]
    blob: BlobInfo,
    /// (snapshotter, key) of each snapshot mapped to it.
    snapshots: Vec<(String, String)>,
}

/// Runs a content command on the content store `api` acts on.
pub fn run_content(
    api: &dyn Api,
    cmd: &ContentCommand,
    fmt: Format,
    out: &mut dyn Write,
) -> Result<()> {
    match cmd {
        ContentCommand::Ls { filters } => {
            let blobs = api.content_list(filters)?;
            match fmt {
                Format::Json => write_json(out, &blobs),
                _ => {
                    let rows: Vec<Vec<String>> = blobs
                        .iter()
                        .map(|b| {
                            let labels: Vec<String> =
                                b.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                            vec![b.digest.to_string(), b.size.to_string(), labels.join(",")]
                        })
                        .collect();
                    table(out, &["DIGEST", "SIZE", "LABELS"], &rows)
                }
            }
        }
        ContentCommand::Ingest { file, expect, labels } => {
            let expected = expect
                .as_deref()
                .map(Digest::parse)
                .transpose()?
                .map(|digest| Expected { digest, size: None });
            let mut input = open_input(file)?;
            let blob = api.content_ingest(&mut input, expected, &parse_labels(labels)?)?;
            match fmt {
                Format::Json => write_json(out, &blob),
                _ => writeln!(out, "{}", blob.digest).context("write output"),
            }
        }
        ContentCommand::Cat { digest } => api.content_read(&Digest::parse(digest)?, out),
        ContentCommand::Info { digest } => {
            let digest = Digest::parse(digest)?;
            let (blob, snapshots) = api.content_info(&digest)?;
            let report = BlobReport { blob, snapshots };
            match fmt {
                Format::Json => write_json(out, &report),
                _ => {
                    let mut rows = vec![
                        vec!["digest".into(), report.blob.digest.to_string()],
                        vec!["size".into(), report.blob.size.to_string()],
                    ];
                    for (k, v) in &report.blob.labels {
                        rows.push(vec![format!("label {k}"), v.clone()]);
                    }
                    for (sn, key) in &report.snapshots {
                        rows.push(vec!["snapshot".into(), format!("{key} ({sn})")]);
                    }
                    table(out, &["", ""], &rows)
                }
            }
        }
        ContentCommand::Rm { digests } => {
            let mut failed = Vec::new();
            for d in digests {
                if let Err(e) = Digest::parse(d).and_then(|d| api.content_delete(&d)) {
                    failed.push(e);
                }
            }
            match failed.len() {
                0 => Ok(()),
                1 => Err(failed.remove(0)),
                n => {
                    let msgs: Vec<String> = failed.iter().map(ToString::to_string).collect();
                    Err(Error::new(
                        failed[0].kind(),
                        format!("{n} deletions failed: {}", msgs.join("; ")),
                    ))
                }
            }
        }
    }
}
