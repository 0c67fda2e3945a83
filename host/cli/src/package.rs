//! `wasnap plugin package` and `wasnap plugin install`: a plugin as an OCI artifact.
//!
//! A package is an OCI image layout (a directory, or its tar) holding one manifest
//! whose single layer is the component (`application/wasm`), with a small config
//! (`application/vnd.wasm.config.v0+json`, the CNCF Wasm artifact convention) and
//! annotations naming the world and WIT version it was built against. Any OCI tool
//! (`oras`, `skopeo`, `crane`) can push the layout to a registry and pull it back.
//!
//! Installing takes such a layout, its tar, or a bare `.wasm`; every digest and size
//! is checked against the bytes before anything is written, the component must run on
//! this host, and it lands in the root as `plugins/installed/<sha256>.wasm`, written
//! whole (temporary file, sync, rename). The output is the configuration that pins it.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use oci_spec::image::{
    Descriptor, DescriptorBuilder, ImageIndex, ImageIndexBuilder, ImageManifest,
    ImageManifestBuilder, MediaType, OciLayoutBuilder,
};
use sha2::{Digest, Sha256};
use wasnap::error::{Context, Error, Result};
use wasnap::plugin::{Plugin, WIT_PACKAGE};

/// The layer's media type: a WebAssembly binary.
const WASM: &str = "application/wasm";
/// The config's media type (the CNCF TAG Runtime's Wasm OCI artifact layout).
const CONFIG: &str = "application/vnd.wasm.config.v0+json";
/// Annotation keys the package carries.
const WORLD: &str = "dev.wasnap.plugin.world";
const WIT: &str = "dev.wasnap.plugin.wit";
const TITLE: &str = "org.opencontainers.image.title";
const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Largest blob read from a package (a plugin is a few MiB).
const MAX_BLOB: u64 = 256 << 20;

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn oci_err(e: oci_spec::OciSpecError) -> Error {
    Error::internal(format!("OCI: {e}"))
}

fn descriptor(media: &str, bytes: &[u8]) -> Result<Descriptor> {
    DescriptorBuilder::default()
        .media_type(MediaType::from(media))
        .digest(
            format!("sha256:{}", sha256_hex(bytes))
                .parse::<oci_spec::image::Digest>()
                .map_err(oci_err)?,
        )
        .size(bytes.len() as u64)
        .build()
        .map_err(oci_err)
}

/// The blobs of a package, by sha256, and its index.
struct Layout {
    index: Vec<u8>,
    blobs: Vec<(String, Vec<u8>)>,
}

/// Builds the package of `wasm` (checked to be a component of this host's WIT), tagged
/// `reference`.
fn build(wasm: &[u8], name: &str, reference: &str) -> Result<Layout> {
    let info = Plugin::inspect(wasm, None)?;
    info.compatible
        .as_ref()
        .map_err(|why| Error::failed_precondition(format!("plugin {name}: {why}")))?;
    let world = info.role.map(|r| r.to_string()).unwrap_or_default();
    let layer_digest = format!("sha256:{}", sha256_hex(wasm));
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "wasm",
        "os": "wasip2",
        "layerDigests": [layer_digest],
        "component": {
            "exports": info.exports,
            "imports": info.imports,
            "target": format!("{WIT_PACKAGE}/{world}"),
        },
    }))
    .context("encode config")?;
    let mut layer = descriptor(WASM, wasm)?;
    layer.set_annotations(Some(HashMap::from([(TITLE.to_owned(), format!("{name}.wasm"))])));
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .artifact_type(MediaType::from(WASM))
        .config(descriptor(CONFIG, &config)?)
        .layers(vec![layer])
        .annotations(HashMap::from([
            (WORLD.to_owned(), world),
            (WIT.to_owned(), WIT_PACKAGE.to_owned()),
            (TITLE.to_owned(), name.to_owned()),
        ]))
        .build()
        .map_err(oci_err)?;
    let manifest_bytes = manifest.to_string().map_err(oci_err)?.into_bytes();
    let mut entry = descriptor(MediaType::ImageManifest.to_string().as_str(), &manifest_bytes)?;
    entry.set_annotations(Some(HashMap::from([(REF_NAME.to_owned(), reference.to_owned())])));
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![entry])
        .build()
        .map_err(oci_err)?;
    Ok(Layout {
        index: index.to_string().map_err(oci_err)?.into_bytes(),
        blobs: vec![
            (sha256_hex(&config), config),
            (sha256_hex(wasm), wasm.to_vec()),
            (sha256_hex(&manifest_bytes), manifest_bytes),
        ],
    })
}

fn layout_marker() -> Result<Vec<u8>> {
    let layout =
        OciLayoutBuilder::default().image_layout_version("1.0.0").build().map_err(oci_err)?;
    Ok(layout.to_string().map_err(oci_err)?.into_bytes())
}

/// `wasnap plugin package`: writes the package of the plugin at `wasm` to `output`, a
/// directory (an OCI image layout) or, if it ends in `.tar`, a tar of one.
pub fn package(
    wasm_path: &Path,
    output: &Path,
    reference: &str,
    out: &mut dyn Write,
) -> Result<()> {
    let wasm =
        std::fs::read(wasm_path).with_context(|| format!("plugin {}", wasm_path.display()))?;
    let name = wasm_path.file_stem().and_then(|s| s.to_str()).unwrap_or("plugin").to_owned();
    let layout = build(&wasm, &name, reference)?;
    let mut files: Vec<(String, Vec<u8>)> =
        vec![("oci-layout".into(), layout_marker()?), ("index.json".into(), layout.index)];
    files.extend(layout.blobs.into_iter().map(|(hex, b)| (format!("blobs/sha256/{hex}"), b)));
    if output.extension().is_some_and(|e| e == "tar") {
        let tmp = output.with_extension("tar.tmp");
        let written = (|| -> std::io::Result<()> {
            let mut tar = tar::Builder::new(std::fs::File::create(&tmp)?);
            for (path, bytes) in &files {
                let mut header = tar::Header::new_gnu();
                header.set_size(bytes.len() as u64);
                header.set_mode(0o644);
                header.set_mtime(0);
                header.set_cksum();
                tar.append_data(&mut header, path, bytes.as_slice())?;
            }
            tar.into_inner()?.sync_all()?;
            std::fs::rename(&tmp, output)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written.with_context(|| format!("write {}", output.display()))?;
    } else {
        if output.exists() {
            return Err(Error::already_exists(format!(
                "{}: exists; package into a new directory or a .tar",
                output.display()
            )));
        }
        for (path, bytes) in &files {
            let p = output.join(path);
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("create {}", parent.display()))?;
            }
            std::fs::write(&p, bytes).with_context(|| format!("write {}", p.display()))?;
        }
    }
    writeln!(out, "packaged {} ({reference}) as {}", wasm_path.display(), output.display())
        .context("write")?;
    writeln!(out, "sha256 {}", sha256_hex(&wasm)).context("write")
}

/// Reads a package: its files by path, from a directory or a tar.
fn read_package(source: &Path) -> Result<HashMap<String, Vec<u8>>> {
    let mut files = HashMap::new();
    let mut take = |path: String, reader: &mut dyn Read, size: u64| -> Result<()> {
        if size > MAX_BLOB {
            return Err(Error::invalid_argument(format!(
                "{}: {path} is {size} bytes, more than a plugin package holds",
                source.display()
            )));
        }
        let mut bytes = Vec::with_capacity(size as usize);
        reader.take(MAX_BLOB).read_to_end(&mut bytes).context("read package")?;
        files.insert(path, bytes);
        Ok(())
    };
    if source.is_dir() {
        for path in ["oci-layout", "index.json"] {
            let p = source.join(path);
            let mut f = std::fs::File::open(&p).with_context(|| format!("{}", p.display()))?;
            let size = f.metadata().context("stat")?.len();
            take(path.to_owned(), &mut f, size)?;
        }
        let blobs = source.join("blobs/sha256");
        for entry in std::fs::read_dir(&blobs).with_context(|| format!("{}", blobs.display()))? {
            let entry = entry.context("list blobs")?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // Only plain files: never follow a link out of the package.
            if !entry.file_type().context("stat blob")?.is_file() {
                continue;
            }
            let mut f = std::fs::File::open(entry.path()).context("open blob")?;
            let size = f.metadata().context("stat")?.len();
            take(format!("blobs/sha256/{name}"), &mut f, size)?;
        }
    } else {
        let f = std::fs::File::open(source).with_context(|| format!("{}", source.display()))?;
        let mut tar = tar::Archive::new(f);
        for entry in tar.entries().context("read tar")? {
            let mut entry = entry.context("read tar")?;
            if entry.header().entry_type() != tar::EntryType::Regular {
                continue;
            }
            let path = entry.path().context("tar path")?.to_string_lossy().into_owned();
            let path = path.trim_start_matches("./").to_owned();
            let size = entry.size();
            take(path, &mut entry, size)?;
        }
    }
    Ok(files)
}

/// The blob `d` names, checked against its digest and size.
fn blob<'a>(files: &'a HashMap<String, Vec<u8>>, d: &Descriptor, what: &str) -> Result<&'a [u8]> {
    let hex = d.as_digest_sha256().ok_or_else(|| {
        Error::invalid_argument(format!("{what}: digest {} is not sha256", d.digest()))
    })?;
    let bytes = files
        .get(&format!("blobs/sha256/{hex}"))
        .ok_or_else(|| Error::invalid_argument(format!("{what}: blob sha256:{hex} is missing")))?;
    let actual = sha256_hex(bytes);
    if actual != hex || bytes.len() as u64 != d.size() {
        return Err(Error::invalid_argument(format!(
            "{what}: blob sha256:{hex} holds {} bytes with sha256:{actual}, not the {} bytes its descriptor names; the package is damaged or was tampered with",
            bytes.len(),
            d.size()
        )));
    }
    Ok(bytes)
}

/// The component a package holds, every digest on the way checked.
fn component_of(files: &HashMap<String, Vec<u8>>, reference: Option<&str>) -> Result<Vec<u8>> {
    let index = files
        .get("index.json")
        .ok_or_else(|| Error::invalid_argument("not an OCI image layout: no index.json"))?;
    let index = ImageIndex::from_reader(index.as_slice())
        .map_err(|e| Error::invalid_argument(format!("index.json: {e}")))?;
    let named = |d: &&Descriptor| {
        reference.is_none_or(|r| {
            d.annotations().as_ref().and_then(|a| a.get(REF_NAME)).is_some_and(|n| n == r)
        })
    };
    let entry = index.manifests().iter().find(named).ok_or_else(|| {
        Error::not_found(format!("no manifest {} in the package", reference.unwrap_or("at all")))
    })?;
    let manifest = ImageManifest::from_reader(blob(files, entry, "manifest")?)
        .map_err(|e| Error::invalid_argument(format!("manifest: {e}")))?;
    let wasm: Vec<&Descriptor> =
        manifest.layers().iter().filter(|l| l.media_type().to_string() == WASM).collect();
    let [layer] = wasm[..] else {
        return Err(Error::invalid_argument(format!(
            "the manifest has {} {WASM} layers; a plugin package has one",
            wasm.len()
        )));
    };
    blob(files, manifest.config(), "config")?;
    Ok(blob(files, layer, "the component")?.to_vec())
}

/// `wasnap plugin install`: checks the plugin at `source` (a package directory, its tar,
/// or a `.wasm`) and writes it whole into `dir` as `<sha256>.wasm`.
pub fn install(
    source: &Path,
    reference: Option<&str>,
    dir: &Path,
    out: &mut dyn Write,
) -> Result<PathBuf> {
    let is_wasm = source.extension().is_some_and(|e| e == "wasm");
    let wasm = if is_wasm {
        std::fs::read(source).with_context(|| format!("plugin {}", source.display()))?
    } else {
        component_of(&read_package(source)?, reference)?
    };
    let info = Plugin::inspect(&wasm, None)?;
    info.compatible
        .as_ref()
        .map_err(|why| Error::failed_precondition(format!("plugin {}: {why}", source.display())))?;
    let hex = sha256_hex(&wasm);
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let target = dir.join(format!("{hex}.wasm"));
    let tmp = dir.join(format!(".{hex}.{}.tmp", std::process::id()));
    let written = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&wasm)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &target)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.with_context(|| format!("write {}", target.display()))?;
    let world = info.role.map(|r| r.to_string()).unwrap_or_default();
    writeln!(out, "installed {world} plugin {}", target.display()).context("write")?;
    writeln!(out, "pin it in the configuration:\n  path = {:?}\n  sha256 = \"{hex}\"", target)
        .context("write")?;
    Ok(target)
}
