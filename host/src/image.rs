//! Image import: an OCI image layout (a directory or a tar of one) or a `docker save`
//! tarball, into the content store and a chain of committed snapshots named by chain ID.
//!
//! Blobs are ingested (verified against their digests where the source names them)
//! under a temporary lease, so a collection cannot take them mid-import; layers are then
//! registered bottom-up ([`Layers::register`]), each with the diffID the image's config
//! gives, so chains that exist already cost nothing. The registered snapshots are held
//! the way the caller's context says (its lease, or kept until removed), each holds its
//! layer blob, and the temporary lease is deleted at the end.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::content::{ContentStore, Expected};
use crate::digest::Digest;
use crate::error::{Context, Error, Result};
use crate::layer::snapshot::{Layers, Registered};
use crate::metadata::lease::LABEL_GC_EXPIRE;
use crate::metadata::{Ctx, Leases};
use crate::snapshot::Labels;

/// Files of an image that are read into memory (indexes, manifests, configs): at most
/// this large.
const MAX_DOCUMENT: u64 = 8 << 20;
/// How long the import's own lease holds what it ingested if the import dies.
const IMPORT_LEASE_EXPIRY: Duration = Duration::from_secs(3600);

const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// What an import reports as it goes.
#[derive(Debug)]
pub enum Event<'a> {
    /// A blob is being stored (`size` when known).
    Ingesting { name: &'a str, size: Option<u64> },
    /// Bytes of the current blob stored so far.
    Progress { done: u64 },
    /// A blob was stored.
    Ingested { name: &'a str, digest: Digest, size: u64 },
    /// A layer is being registered (0-based, of `count`).
    Registering { index: usize, count: usize, blob: Digest },
    /// A layer was registered.
    Registered { index: usize, count: usize, registered: &'a Registered },
}

/// What an import did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Imported {
    /// The chain ID of the top layer: `view` or `prepare` on it starts a container's
    /// filesystem.
    pub chain_id: Digest,
    /// The image's config blob.
    pub config: Digest,
    /// The names the source gave the image (`RepoTags`, or the index's
    /// `org.opencontainers.image.ref.name`).
    pub references: Vec<String>,
    /// Each layer, bottom first.
    pub layers: Vec<Registered>,
}

/// Imports the image at `path` (an OCI layout directory, or a tar of an OCI layout or
/// of `docker save`) into `layers`' snapshotter and `content`. `platform`
/// (`os/arch[/variant]`) picks a manifest from a multi-platform index; by default the
/// one for this machine.
pub fn import(
    layers: &Layers<'_>,
    content: &ContentStore,
    leases: &Leases,
    ctx: &Ctx,
    path: &Path,
    platform: Option<&str>,
    progress: &mut dyn FnMut(Event<'_>),
) -> Result<Imported> {
    // The import's own lease, unless the caller runs under one.
    let (ingest_ctx, _lease) = match ctx.lease() {
        Some(_) => (ctx.clone(), None),
        None => {
            let expires = SystemTime::now() + IMPORT_LEASE_EXPIRY;
            let labels = Labels::from([(
                LABEL_GC_EXPIRE.to_owned(),
                humantime::format_rfc3339(expires).to_string(),
            )]);
            let lease = leases.create(ctx, None, &labels)?;
            let guard = LeaseGuard { leases, ctx: ctx.clone(), id: lease.id.clone() };
            (ctx.clone().with_lease(Some(lease.id)), Some(guard))
        }
    };
    let mut source = Source::open(path, content, &ingest_ctx, progress)?;
    let image = resolve(&mut source, platform)?;
    let count = image.layers.len();
    let mut parent: Option<Digest> = None;
    let mut done = Vec::with_capacity(count);
    for (index, (layer, diff_id)) in image.layers.iter().zip(&image.diff_ids).enumerate() {
        let blob = source.blob(layer, content, &ingest_ctx, progress)?;
        progress(Event::Registering { index, count, blob });
        let registered = layers
            .register(ctx, &blob, Some(diff_id), parent.as_ref(), &Labels::new())
            .map_err(|e| e.context(format!("layer {} of {count} ({layer})", index + 1)))?;
        progress(Event::Registered { index, count, registered: &registered });
        parent = Some(registered.chain_id);
        done.push(registered);
    }
    let chain_id = parent.ok_or_else(|| Error::invalid_argument("the image has no layers"))?;
    Ok(Imported { chain_id, config: image.config, references: image.references, layers: done })
}

/// Deletes the import's lease when dropped.
struct LeaseGuard<'a> {
    leases: &'a Leases,
    ctx: Ctx,
    id: String,
}

impl Drop for LeaseGuard<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.leases.delete(&self.ctx, &self.id) {
            tracing::warn!(lease = %self.id, error = %e, "could not delete the import's lease; it expires on its own");
        }
    }
}

/// Where a layer comes from: a path inside the image.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct LayerRef {
    path: String,
    /// The digest the source names it by, if any.
    digest: Option<Digest>,
    size: Option<u64>,
}

impl std::fmt::Display for LayerRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.digest {
            Some(d) => write!(f, "{d}"),
            None => f.write_str(&self.path),
        }
    }
}

/// An image's parts, resolved from its manifest and config.
struct Image {
    config: Digest,
    references: Vec<String>,
    layers: Vec<LayerRef>,
    diff_ids: Vec<Digest>,
}

/// The files of an image: read in place (a directory), or taken in one pass (a tar),
/// small documents kept in memory and everything else ingested as it streams past.
enum Source {
    /// The directory, and its path for messages. Its files are read beneath it only:
    /// a name the image gives never reaches a file outside, by `..` or by a symlink.
    Dir(cap_std::fs::Dir, PathBuf),
    Tar {
        documents: HashMap<String, Vec<u8>>,
        blobs: HashMap<String, Digest>,
    },
}

/// `name`, a path the image gives, if it stays beneath the image's directory; a `..`
/// (or anything else that would leave it) is the image's fault.
fn beneath(name: &str) -> Result<&str> {
    use std::path::Component;
    let outside = Path::new(name).components().any(|c| !matches!(c, Component::Normal(_)));
    if outside || name.is_empty() {
        return Err(Error::invalid_argument(format!(
            "the image names {name:?}, a path outside its directory"
        )));
    }
    Ok(name)
}

/// A file of an image directory that could not be read. cap-std refuses a name that
/// leads outside the directory (through a symlink) as permission denied: the image's
/// fault, not the daemon's.
fn read_error(name: &str, e: std::io::Error, path: &Path) -> Error {
    if e.kind() == std::io::ErrorKind::PermissionDenied {
        return Error::invalid_argument(format!(
            "the image names {name:?}, which leads outside its directory or cannot be read: {e}"
        ));
    }
    Error::from(e).context(format!("read {}", path.display()))
}

fn clean(name: &str) -> String {
    name.trim_start_matches("./").trim_start_matches('/').to_owned()
}

/// The digest a path `blobs/sha256/<hex>` names.
fn blob_path_digest(path: &str) -> Option<Digest> {
    path.strip_prefix("blobs/sha256/").and_then(Digest::from_hex)
}

fn is_document(path: &str, size: u64) -> bool {
    size <= MAX_DOCUMENT
        && (path.ends_with(".json")
            || path == "oci-layout"
            || path == "repositories"
            || path.ends_with("/json")
            || path.ends_with("/VERSION")
            || blob_path_digest(path).is_some())
}

impl Source {
    fn open(
        path: &Path,
        content: &ContentStore,
        ctx: &Ctx,
        progress: &mut dyn FnMut(Event<'_>),
    ) -> Result<Source> {
        let meta = std::fs::metadata(path).with_context(|| format!("open {}", path.display()))?;
        if meta.is_dir() {
            let dir = cap_std::fs::Dir::open_ambient_dir(path, cap_std::ambient_authority())
                .with_context(|| format!("open {}", path.display()))?;
            return Ok(Source::Dir(dir, path.to_owned()));
        }
        let file = File::open(path).with_context(|| format!("open {}", path.display()))?;
        let mut archive = tar::Archive::new(BufReader::with_capacity(1 << 20, file));
        let mut documents = HashMap::new();
        let mut blobs = HashMap::new();
        let read_err = |e: std::io::Error| {
            Error::invalid_argument(format!("{}: not a readable tar: {e}", path.display()))
        };
        for entry in archive.entries().map_err(read_err)? {
            let mut entry = entry.map_err(read_err)?;
            if entry.header().entry_type() != tar::EntryType::Regular {
                continue;
            }
            let name = clean(&entry.path().map_err(read_err)?.to_string_lossy());
            let size = entry.size();
            let digest = blob_path_digest(&name);
            if is_document(&name, size) {
                let mut buf = Vec::with_capacity(size as usize);
                entry.read_to_end(&mut buf).map_err(read_err)?;
                if let Some(d) = digest
                    && Digest::of(&buf) != d
                {
                    return Err(Error::failed_precondition(format!(
                        "{name} in {}: its content does not match its digest",
                        path.display()
                    )));
                }
                documents.insert(name, buf);
                continue;
            }
            let d = ingest(&name, &mut entry, digest, Some(size), content, ctx, progress)?;
            blobs.insert(name, d);
        }
        Ok(Source::Tar { documents, blobs })
    }

    /// A small file of the image.
    fn document(&mut self, name: &str) -> Result<Option<Vec<u8>>> {
        match self {
            Source::Dir(dir, root) => {
                let path = root.join(beneath(name)?);
                match dir.metadata(name) {
                    Ok(m) if m.len() > MAX_DOCUMENT => Err(Error::invalid_argument(format!(
                        "{name}: {} bytes, more than an image document may have",
                        m.len()
                    ))),
                    Ok(_) => {
                        let bytes =
                            dir.read(name).with_context(|| format!("read {}", path.display()))?;
                        if let Some(d) = blob_path_digest(name)
                            && Digest::of(&bytes) != d
                        {
                            return Err(Error::failed_precondition(format!(
                                "{name}: its content does not match its digest"
                            )));
                        }
                        Ok(Some(bytes))
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(read_error(name, e, &path)),
                }
            }
            Source::Tar { documents, .. } => Ok(documents.get(name).cloned()),
        }
    }

    fn json<T: for<'de> Deserialize<'de>>(&mut self, name: &str) -> Result<T> {
        let bytes = self
            .document(name)?
            .ok_or_else(|| Error::invalid_argument(format!("the image has no {name}")))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| Error::invalid_argument(format!("{name}: not what an image holds: {e}")))
    }

    /// The layer `layer`, in the content store.
    fn blob(
        &mut self,
        layer: &LayerRef,
        content: &ContentStore,
        ctx: &Ctx,
        progress: &mut dyn FnMut(Event<'_>),
    ) -> Result<Digest> {
        match self {
            Source::Dir(dir, root) => {
                let path = root.join(beneath(&layer.path)?);
                let file = dir
                    .open(&layer.path)
                    .map_err(|e| read_error(&layer.path, e, &path))?
                    .into_std();
                let mut r = BufReader::with_capacity(1 << 20, file);
                ingest(&layer.path, &mut r, layer.digest, layer.size, content, ctx, progress)
            }
            Source::Tar { blobs, documents } => {
                if let Some(d) = blobs.get(&layer.path) {
                    return Ok(*d);
                }
                // A layer small enough to have been kept as a document.
                match documents.get(&layer.path) {
                    Some(bytes) => {
                        let bytes = bytes.clone();
                        ingest(
                            &layer.path,
                            &mut &bytes[..],
                            layer.digest,
                            layer.size,
                            content,
                            ctx,
                            progress,
                        )
                    }
                    None => Err(Error::invalid_argument(format!(
                        "the image names layer {} but holds no {}",
                        layer, layer.path
                    ))),
                }
            }
        }
    }
}

/// Stores `r` as a blob, checked against `digest` and `size` where known.
fn ingest(
    name: &str,
    r: &mut dyn Read,
    digest: Option<Digest>,
    size: Option<u64>,
    content: &ContentStore,
    ctx: &Ctx,
    progress: &mut dyn FnMut(Event<'_>),
) -> Result<Digest> {
    progress(Event::Ingesting { name, size });
    let mut w = content.writer()?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::from(e).context(format!("read {name}"))),
        };
        std::io::Write::write_all(&mut w, &buf[..n]).with_context(|| format!("store {name}"))?;
        progress(Event::Progress { done: w.written() });
    }
    let expected = digest.map(|digest| Expected { digest, size });
    let info = w.commit(ctx, expected, &Labels::new()).map_err(|e| e.context(name.to_owned()))?;
    progress(Event::Ingested { name, digest: info.digest, size: info.size });
    Ok(info.digest)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    platform: Option<Platform>,
    #[serde(default)]
    annotations: HashMap<String, String>,
}

#[derive(Deserialize)]
struct Platform {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

#[derive(Deserialize)]
struct Index {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Manifest {
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Config {
    rootfs: RootFs,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// One entry of `docker save`'s `manifest.json`.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifest {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

fn parse_digest(s: &str, what: &str) -> Result<Digest> {
    Digest::parse(s).map_err(|e| e.context(what.to_owned()))
}

/// This machine's platform, as OCI names it.
fn this_platform() -> (String, String) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    ("linux".to_owned(), arch.to_owned())
}

fn resolve(source: &mut Source, platform: Option<&str>) -> Result<Image> {
    if let Some(bytes) = source.document("manifest.json")? {
        let manifests: Vec<DockerManifest> = serde_json::from_slice(&bytes).map_err(|e| {
            Error::invalid_argument(format!("manifest.json: not a docker save manifest: {e}"))
        })?;
        let m = match manifests.as_slice() {
            [m] => m,
            [] => return Err(Error::invalid_argument("manifest.json lists no image")),
            _ => {
                return Err(Error::invalid_argument(format!(
                    "manifest.json lists {} images; import one image at a time",
                    manifests.len()
                )));
            }
        };
        let config_bytes = source
            .document(&clean(&m.config))?
            .ok_or_else(|| Error::invalid_argument(format!("the image has no {}", m.config)))?;
        let config = Digest::of(&config_bytes);
        let parsed: Config = serde_json::from_slice(&config_bytes).map_err(|e| {
            Error::invalid_argument(format!("{}: not an image config: {e}", m.config))
        })?;
        let layers: Vec<LayerRef> = m
            .layers
            .iter()
            .map(|p| {
                let path = clean(p);
                LayerRef { digest: blob_path_digest(&path), path, size: None }
            })
            .collect();
        return finish(config, m.repo_tags.clone().unwrap_or_default(), layers, parsed);
    }

    let index: Index = source.json("index.json")?;
    let mut references = Vec::new();
    let manifest = pick(source, index, platform, &mut references, 0)?;
    let config_path = blob_path(&manifest.config.digest)?;
    let config = parse_digest(&manifest.config.digest, "the manifest's config")?;
    let parsed: Config = source.json(&config_path)?;
    let layers = manifest
        .layers
        .iter()
        .map(|l| {
            Ok(LayerRef {
                path: blob_path(&l.digest)?,
                digest: Some(parse_digest(&l.digest, "a layer of the manifest")?),
                size: l.size,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    finish(config, references, layers, parsed)
}

fn blob_path(digest: &str) -> Result<String> {
    let d = parse_digest(digest, "a descriptor")?;
    Ok(format!("blobs/sha256/{}", d.hex()))
}

fn finish(
    config: Digest,
    references: Vec<String>,
    layers: Vec<LayerRef>,
    parsed: Config,
) -> Result<Image> {
    let diff_ids = parsed
        .rootfs
        .diff_ids
        .iter()
        .map(|d| parse_digest(d, "the config's rootfs.diff_ids"))
        .collect::<Result<Vec<_>>>()?;
    if diff_ids.len() != layers.len() {
        return Err(Error::invalid_argument(format!(
            "the image has {} layers but its config lists {} diffIDs",
            layers.len(),
            diff_ids.len()
        )));
    }
    Ok(Image { config, references, layers, diff_ids })
}

/// The manifest of an index for `platform` (nested indexes followed).
fn pick(
    source: &mut Source,
    index: Index,
    platform: Option<&str>,
    references: &mut Vec<String>,
    depth: usize,
) -> Result<Manifest> {
    if depth > 4 {
        return Err(Error::invalid_argument("image indexes nest more than 4 deep"));
    }
    let (want_os, want_arch, want_variant) = match platform {
        Some(p) => {
            let mut parts = p.split('/');
            let os = parts.next().unwrap_or_default().to_owned();
            let arch = parts.next().unwrap_or_default().to_owned();
            if os.is_empty() || arch.is_empty() {
                return Err(Error::invalid_argument(format!(
                    "platform {p:?}: expected os/arch[/variant]"
                )));
            }
            (os, arch, parts.next().map(str::to_owned))
        }
        None => {
            let (os, arch) = this_platform();
            (os, arch, None)
        }
    };
    let matches = |d: &Descriptor| match &d.platform {
        None => true,
        Some(p) => {
            p.os == want_os
                && p.architecture == want_arch
                && want_variant.as_ref().is_none_or(|v| p.variant.as_ref() == Some(v))
        }
    };
    let candidates: Vec<&Descriptor> = index.manifests.iter().filter(|d| matches(d)).collect();
    let chosen = match candidates.as_slice() {
        [] => {
            return Err(Error::not_found(format!(
                "no manifest for {want_os}/{want_arch} in the image (try --platform)"
            )));
        }
        [one, ..] => *one,
    };
    if let Some(name) = chosen.annotations.get("org.opencontainers.image.ref.name") {
        references.push(name.clone());
    }
    let path = blob_path(&chosen.digest)?;
    if chosen.media_type == MT_OCI_INDEX || chosen.media_type == MT_DOCKER_LIST {
        let nested: Index = source.json(&path)?;
        return pick(source, nested, platform, references, depth + 1);
    }
    source.json(&path)
}
