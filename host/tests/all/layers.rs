//! Layers into and out of snapshots on every backend (native, overlay, btrfs, the `copy`
//! guest): registering layers by chain ID, whiteouts and opaque directories, metadata
//! kept through apply and diff, blob mapping, and refused tar entries.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::Instant;

use wasnap::config::Config;
use wasnap::digest::Digest;
use wasnap::fault::Faults;
use wasnap::layer::Compression;
use wasnap::layer::snapshot::chain_id;
use wasnap::{ErrorKind, Host, Labels};

use crate::common::*;
use crate::loopfs::Mounted;
use crate::{loop_btrfs, require_root};

/// One tar entry of a test layer.
pub(crate) enum E<'a> {
    Dir(&'a str, u32),
    File(&'a str, u32, &'a [u8]),
    Link(&'a str, &'a str),
    Sym(&'a str, &'a str),
}

/// A layer tar with fixed times, root ownership and, on `etc/passwd`, an xattr.
pub(crate) fn layer(entries: &[E<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_ustar();
        h.set_mtime(1_600_000_000);
        h.set_uid(0);
        h.set_gid(0);
        match e {
            E::Dir(p, mode) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                h.set_size(0);
                b.append_data(&mut h, p, &[][..]).unwrap();
            }
            E::File(p, mode, data) => {
                if *p == "etc/passwd" {
                    b.append_pax_extensions([("SCHILY.xattr.user.origin", &b"layer"[..])]).unwrap();
                    h.set_uid(1000);
                    h.set_gid(1000);
                }
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, *data).unwrap();
            }
            E::Link(p, target) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_link(&mut h, p, target).unwrap();
            }
            E::Sym(p, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, p, target).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

fn compress(c: Compression, data: &[u8]) -> Vec<u8> {
    let mut enc = c.encoder(Vec::new()).unwrap();
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

fn base_layer() -> Vec<u8> {
    layer(&[
        E::Dir("etc", 0o755),
        E::File("etc/passwd", 0o644, b"root:x:0:0"),
        E::Sym("etc/alt", "passwd"),
        E::Dir("bin", 0o755),
        E::File("bin/sh", 0o755, b"#!shell"),
        E::File("bin/su", 0o4755, b"setuid"),
        E::Link("bin/link", "bin/sh"),
        E::Dir("tmp", 0o1777),
        E::Dir("opq", 0o750),
        E::File("opq/a", 0o600, b"a"),
        E::File("opq/b", 0o600, b"b"),
        E::File("gone", 0o644, b"delete me"),
        E::Dir("dir-gone", 0o755),
        E::File("dir-gone/x", 0o644, b"x"),
    ])
}

fn upper_layer() -> Vec<u8> {
    layer(&[
        E::File(".wh.gone", 0o644, b""),
        E::File(".wh.dir-gone", 0o644, b""),
        E::Dir("opq", 0o750),
        E::File("opq/.wh..wh..opq", 0o644, b""),
        E::File("opq/c", 0o640, b"c"),
        E::Dir("etc", 0o755),
        E::File("etc/passwd", 0o644, b"root:x:0:0\nuser:x:1000"),
        E::File("bin/new", 0o755, b"new"),
    ])
}

/// What a tree holds: per path, its type, mode, owner, size or target, and content.
fn walk(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let m = std::fs::symlink_metadata(&path).unwrap();
            let what = if m.is_dir() {
                stack.push(path.clone());
                "dir".to_owned()
            } else if m.file_type().is_symlink() {
                format!("-> {}", std::fs::read_link(&path).unwrap().display())
            } else {
                let data = std::fs::read(&path).unwrap();
                format!("file {:?} links={}", String::from_utf8_lossy(&data), m.nlink())
            };
            let mode = m.permissions().mode() & 0o7777;
            let mode = if m.file_type().is_symlink() { 0 } else { mode };
            let mut line = format!("{what} mode={mode:o} owner={}:{}", m.uid(), m.gid());
            if rel == "etc/passwd" {
                let mut buf = [0u8; 64];
                let x = rustix::fs::lgetxattr(&path, "user.origin", &mut buf)
                    .ok()
                    .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned());
                line.push_str(&format!(" xattr={x:?}"));
            }
            if !m.is_dir() && !m.file_type().is_symlink() {
                line.push_str(&format!(" mtime={}", m.mtime()));
            }
            out.insert(rel, line);
        }
    }
    out
}

/// The tree both layers make, extracted in order with their whiteouts honoured.
fn expected() -> BTreeMap<String, String> {
    let f = |content: &str, links: u32, mode: u32| {
        format!("file {content:?} links={links} mode={mode:o} owner=0:0 mtime=1600000000")
    };
    let dir = |mode: u32| format!("dir mode={mode:o} owner=0:0");
    BTreeMap::from([
        ("etc".into(), dir(0o755)),
        (
            "etc/passwd".into(),
            "file \"root:x:0:0\\nuser:x:1000\" links=1 mode=644 owner=1000:1000 xattr=Some(\"layer\") mtime=1600000000".into(),
        ),
        ("etc/alt".into(), "-> passwd mode=0 owner=0:0".into()),
        ("bin".into(), dir(0o755)),
        ("bin/sh".into(), f("#!shell", 2, 0o755)),
        ("bin/link".into(), f("#!shell", 2, 0o755)),
        ("bin/su".into(), f("setuid", 1, 0o4755)),
        ("bin/new".into(), f("new", 1, 0o755)),
        ("tmp".into(), dir(0o1777)),
        ("opq".into(), dir(0o750)),
        ("opq/c".into(), "file \"c\" links=1 mode=640 owner=0:0 mtime=1600000000".to_owned()),
    ])
}

/// Registers both layers, checks the tree a view of the top shows, diffs the top back
/// into a layer and checks that registering that diff gives the same tree.
fn layers_round_trip(host: &Host, name: &str, scratch: &Path) {
    let sn = host.snapshotter(name).unwrap();
    let layers = host.layers(&sn);
    let c = ctx("default");
    let content = host.content();
    let base = compress(Compression::Gzip, &base_layer());
    let upper = compress(Compression::Zstd, &upper_layer());
    let base_blob = content.ingest(&c, &mut &base[..], None, &Labels::new()).unwrap().digest;
    let upper_blob = content.ingest(&c, &mut &upper[..], None, &Labels::new()).unwrap().digest;

    let r1 = layers.register(&c, &base_blob, None, None, &Labels::new()).unwrap();
    assert!(r1.created, "{name}");
    assert_eq!(r1.diff_id, Digest::of(&base_layer()), "{name}: diffID of the base");
    assert_eq!(r1.chain_id, r1.diff_id, "{name}: a bottom layer's chain ID is its diffID");
    let r2 = layers.register(&c, &upper_blob, None, Some(&r1.chain_id), &Labels::new()).unwrap();
    assert_eq!(r2.chain_id, chain_id(Some(&r1.chain_id), &Digest::of(&upper_layer())), "{name}");
    assert_eq!(sn.blob(&c, &r2.chain_id.to_string()).unwrap(), Some(upper_blob), "{name}");
    let own = sn.usage(&c, &r2.chain_id.to_string()).unwrap();
    let with_blob = layers.usage_with_blob(&c, &r2.chain_id.to_string()).unwrap();
    assert_eq!(with_blob.size, own.size + upper.len() as u64, "{name}: usage with the blob");

    // Registering an existing chain applies nothing.
    let t = Instant::now();
    let again = layers.register(&c, &upper_blob, None, Some(&r1.chain_id), &Labels::new()).unwrap();
    let took = t.elapsed();
    assert!(!again.created && again.applied.is_none(), "{name}");
    assert_eq!(again.chain_id, r2.chain_id);
    eprintln!("{name}: re-registering an existing chain took {took:?}");

    let check = |chain: &Digest, what: &str| {
        let view = format!("check-{what}");
        let mounts = sn.view(&c, &view, Some(&chain.to_string()), &Labels::new()).unwrap();
        let target = scratch.join(&view);
        std::fs::create_dir_all(&target).unwrap();
        {
            let m = Mounted::new(&mounts, &target);
            let found = walk(m.path());
            let want = expected();
            for (k, v) in &want {
                assert_eq!(found.get(k), Some(v), "{name} ({what}): {k}");
            }
            let extra: Vec<&String> = found.keys().filter(|k| !want.contains_key(*k)).collect();
            assert!(extra.is_empty(), "{name} ({what}): unexpected entries {extra:?}");
            let ino = |p: &str| std::fs::metadata(m.path().join(p)).unwrap().ino();
            assert_eq!(ino("bin/sh"), ino("bin/link"), "{name} ({what}): a hard link");
        }
        sn.remove(&c, &view).unwrap();
    };
    check(&r2.chain_id, "registered");

    // The top layer diffed back out, and registered again on the base: the same tree.
    for compression in [Compression::Gzip, Compression::None] {
        let d = layers.diff(&c, &r2.chain_id.to_string(), compression, &Labels::new()).unwrap();
        assert_eq!(d.media_type, compression.media_type());
        let again = layers.register(&c, &d.blob.digest, None, Some(&r1.chain_id), &Labels::new());
        let again = again.unwrap();
        assert_eq!(again.diff_id, d.diff_id, "{name}");
        check(&again.chain_id, &format!("diffed-{compression}"));
        if again.chain_id != r2.chain_id {
            sn.remove(&c, &again.chain_id.to_string()).unwrap();
        }
    }
    sn.remove(&c, &r2.chain_id.to_string()).unwrap();
    sn.remove(&c, &r1.chain_id.to_string()).unwrap();
}

pub(crate) fn host_with(root: &Path, snapshotters: &str) -> Host {
    let config = Config::parse(snapshotters, "test").unwrap();
    Host::open_config(root, Arc::new(Faults::new()), config).unwrap()
}

pub(crate) fn tmpfs_host(root: &Path) -> Host {
    host_with(
        root,
        &format!(
            r#"
default_snapshotter = "native"
[snapshotters.native]
driver = "native"
[snapshotters.overlay]
driver = "overlay"
[snapshotters.copy]
driver = "wasm"
path = "{}"
"#,
            crate::plugin::guest("copy").display()
        ),
    )
}

#[test]
fn layers_register_apply_and_diff_on_native_overlay_and_the_copy_guest() {
    require_root!();
    let dir = tmp();
    let root = dir.path().join("root");
    let host = tmpfs_host(&root);
    for name in ["native", "overlay", "copy"] {
        layers_round_trip(&host, name, dir.path());
    }
    host.close().unwrap();
}

#[test]
fn layers_register_apply_and_diff_on_btrfs() {
    require_root!();
    let fs = loop_btrfs!(256);
    let root = fs.mountpoint.join("root");
    let host = host_with(
        &root,
        "default_snapshotter = \"btrfs\"\n[snapshotters.btrfs]\ndriver = \"btrfs\"\n",
    );
    layers_round_trip(&host, "btrfs", &fs.scratch("mnt").unwrap());
    // A refused entry is refused through the private mount too, and nothing lands
    // outside the snapshot.
    let sn = host.snapshotter("btrfs").unwrap();
    let c = ctx("default");
    sn.prepare(&c, "slip", None, &Labels::new()).unwrap();
    let tar = raw_entry_tar("../../../../escaped-btrfs", None);
    let err = host.layers(&sn).apply(&c, "slip", &tar[..], None).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    sn.remove(&c, "slip").unwrap();
    assert!(!fs.mountpoint.join("escaped-btrfs").exists());
    assert!(!root.join("tmp/escaped-btrfs").exists());
    let leftover: Vec<_> = std::fs::read_dir(root.join("tmp/layers")).unwrap().collect();
    assert!(leftover.is_empty(), "private mount points are removed: {leftover:?}");
    host.close().unwrap();
}

#[test]
fn concurrent_registers_of_one_chain_make_it_once() {
    require_root!();
    let dir = tmp();
    let host = tmpfs_host(&dir.path().join("root"));
    let c = ctx("default");
    for name in ["overlay", "copy"] {
        let sn = host.snapshotter(name).unwrap();
        let blob = host.content().ingest(&c, &mut &base_layer()[..], None, &Labels::new());
        let blob = blob.unwrap().digest;
        let barrier = Barrier::new(4);
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let (host, sn, c, barrier) = (&host, &sn, &c, &barrier);
                    s.spawn(move || {
                        barrier.wait();
                        host.layers(sn).register(c, &blob, None, None, &Labels::new()).unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(results.iter().filter(|r| r.created).count(), 1, "{name}");
        let chain = results[0].chain_id.to_string();
        let keys = names(&list(&sn, &c, &[]).unwrap());
        assert_eq!(keys, vec![chain.clone()], "{name}: no extraction left behind");
        sn.remove(&c, &chain).unwrap();
    }
    host.close().unwrap();
}

/// A tar with one entry named `name` (raw bytes: the tar crate refuses `..`).
fn raw_entry_tar(name: &str, link: Option<&str>) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    {
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(l) = link {
            old.linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
    }
    h.set_entry_type(if link.is_some() { tar::EntryType::Link } else { tar::EntryType::Regular });
    h.set_mode(0o644);
    h.set_size(if link.is_some() { 0 } else { 4 });
    h.set_cksum();
    b.append(&h, &b"evil"[..if link.is_some() { 0 } else { 4 }]).unwrap();
    b.into_inner().unwrap()
}

#[test]
fn tar_slip_entries_are_refused_on_every_backend_and_nothing_lands_outside() {
    require_root!();
    let dir = tmp();
    let root = dir.path().join("root");
    let host = tmpfs_host(&root);
    let c = ctx("default");
    let outside = dir.path().join("outside");
    std::fs::write(&outside, b"keep").unwrap();
    let symlinked = layer(&[E::Sym("evil", "/"), E::File("evil/tmp/escaped", 0o644, b"x")]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("dot-dot", raw_entry_tar("../../../../escaped", None)),
        ("absolute", raw_entry_tar("/tmp/escaped", None)),
        ("through a symlink", symlinked),
        ("hard link out", raw_entry_tar("link", Some("../../../../outside"))),
    ];
    for name in ["native", "overlay", "copy"] {
        let sn = host.snapshotter(name).unwrap();
        for (what, tar) in &cases {
            let key = format!("slip-{}", what.replace(' ', "-"));
            sn.prepare(&c, &key, None, &Labels::new()).unwrap();
            let err = host.layers(&sn).apply(&c, &key, &tar[..], None).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{name} {what}: {err}");
            sn.remove(&c, &key).unwrap();
        }
    }
    assert!(!Path::new("/tmp/escaped").exists());
    assert!(!dir.path().join("escaped").exists());
    assert_eq!(std::fs::read(&outside).unwrap(), b"keep");
    assert_eq!(std::fs::metadata(&outside).unwrap().nlink(), 1, "no hard link to outside");
    host.close().unwrap();
}

#[test]
fn a_layer_goes_into_active_snapshots_only() {
    let dir = tmp();
    let host = host_with(
        &dir.path().join("root"),
        "default_snapshotter = \"native\"\n[snapshotters.native]\ndriver = \"native\"\n",
    );
    let sn = host.snapshotter("native").unwrap();
    let c = ctx("default");
    sn.prepare(&c, "a", None, &Labels::new()).unwrap();
    sn.commit(&c, "done", "a", &Labels::new()).unwrap();
    let tar = layer(&[E::File("f", 0o644, b"x")]);
    let err = host.layers(&sn).apply(&c, "done", &tar[..], None).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    let err = host.layers(&sn).apply(&c, "missing", &tar[..], None).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    let missing = Digest::of(b"nothing");
    let err = host.layers(&sn).register(&c, &missing, None, None, &Labels::new()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    host.close().unwrap();
}

/// This machine's architecture, as OCI names it.
fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Writes `bytes` as a blob of an OCI layout at `dir` and returns its descriptor.
fn put_blob(dir: &Path, media_type: &str, bytes: &[u8]) -> serde_json::Value {
    let d = Digest::of(bytes);
    let path = dir.join("blobs/sha256").join(d.hex());
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, bytes).unwrap();
    serde_json::json!({ "mediaType": media_type, "digest": d.to_string(), "size": bytes.len() })
}

/// An OCI image layout of both test layers (gzip and zstd) at `dir`, with an index
/// listing another platform's manifest first.
fn oci_layout(dir: &Path) {
    let diff_ids: Vec<String> =
        [base_layer(), upper_layer()].iter().map(|l| Digest::of(l).to_string()).collect();
    let config = serde_json::json!({
        "architecture": oci_arch(), "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    });
    let config = put_blob(
        dir,
        "application/vnd.oci.image.config.v1+json",
        &serde_json::to_vec(&config).unwrap(),
    );
    let l1 =
        put_blob(dir, Compression::Gzip.media_type(), &compress(Compression::Gzip, &base_layer()));
    let l2 =
        put_blob(dir, Compression::Zstd.media_type(), &compress(Compression::Zstd, &upper_layer()));
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config, "layers": [l1, l2],
    });
    let mt = "application/vnd.oci.image.manifest.v1+json";
    let m = put_blob(dir, mt, &serde_json::to_vec(&manifest).unwrap());
    let other = serde_json::json!({
        "mediaType": mt, "digest": Digest::of(b"elsewhere").to_string(), "size": 9,
        "platform": { "os": "linux", "architecture": "s390x" },
    });
    let mut ours = m.clone();
    ours["platform"] = serde_json::json!({ "os": "linux", "architecture": oci_arch() });
    ours["annotations"] = serde_json::json!({ "org.opencontainers.image.ref.name": "test:1" });
    let index = serde_json::json!({ "schemaVersion": 2, "manifests": [other, ours] });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

/// A `docker save` tarball of both test layers (uncompressed, by path).
fn docker_save() -> Vec<u8> {
    let diff_ids: Vec<String> =
        [base_layer(), upper_layer()].iter().map(|l| Digest::of(l).to_string()).collect();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": oci_arch(), "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    }))
    .unwrap();
    let config_name = format!("{}.json", Digest::of(&config).hex());
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": config_name, "RepoTags": ["test:1"], "Layers": ["l1/layer.tar", "l2/layer.tar"],
    }]))
    .unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, data).unwrap();
    };
    add("l1/layer.tar", &base_layer());
    add("l2/layer.tar", &upper_layer());
    add(&config_name, &config);
    add("manifest.json", &manifest);
    b.into_inner().unwrap()
}

/// What `tar -x` of the layers in order gives, with whiteouts honoured by hand: before
/// each layer is extracted, what its whiteouts name is removed (an opaque directory's
/// contents), and the markers themselves are removed after.
fn tar_oracle(layers: &[Vec<u8>], dir: &Path) {
    for layer in layers {
        let mut archive = tar::Archive::new(&layer[..]);
        let mut markers = Vec::new();
        for e in archive.entries().unwrap() {
            let name = e.unwrap().path().unwrap().to_string_lossy().into_owned();
            let (parent, base) = match name.rsplit_once('/') {
                Some((p, b)) => (dir.join(p), b.to_owned()),
                None => (dir.to_path_buf(), name.clone()),
            };
            if base == ".wh..wh..opq" {
                for child in std::fs::read_dir(&parent).into_iter().flatten() {
                    let p = child.unwrap().path();
                    if p.is_dir() && !p.is_symlink() {
                        std::fs::remove_dir_all(&p).unwrap();
                    } else {
                        std::fs::remove_file(&p).unwrap();
                    }
                }
                markers.push(parent.join(&base));
            } else if let Some(hidden) = base.strip_prefix(".wh.") {
                let p = parent.join(hidden);
                if p.is_dir() && !p.is_symlink() {
                    std::fs::remove_dir_all(&p).unwrap();
                } else if p.symlink_metadata().is_ok() {
                    std::fs::remove_file(&p).unwrap();
                }
                markers.push(parent.join(&base));
            }
        }
        let mut child = std::process::Command::new("tar")
            .args(["-x", "-p", "--xattrs", "--xattrs-include=*", "-C"])
            .arg(dir)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(layer).unwrap();
        assert!(child.wait().unwrap().success(), "tar -x");
        for m in markers {
            let _ = std::fs::remove_file(m);
        }
    }
}

#[test]
fn an_image_imports_from_an_oci_layout_or_docker_save_to_the_tree_tar_extraction_gives() {
    require_root!();
    let dir = tmp();
    let host = tmpfs_host(&dir.path().join("root"));
    let c = ctx("default");
    let oracle = dir.path().join("oracle");
    std::fs::create_dir_all(&oracle).unwrap();
    tar_oracle(&[base_layer(), upper_layer()], &oracle);
    let want = walk(&oracle);
    assert_eq!(want, expected(), "the oracle agrees with the model");

    let layout = dir.path().join("layout");
    oci_layout(&layout);
    let layout_tar = dir.path().join("layout.tar");
    {
        let mut b = tar::Builder::new(std::fs::File::create(&layout_tar).unwrap());
        b.append_dir_all(".", &layout).unwrap();
        b.finish().unwrap();
    }
    let docker = dir.path().join("docker.tar");
    std::fs::write(&docker, docker_save()).unwrap();

    for name in ["overlay", "native"] {
        let sn = host.snapshotter(name).unwrap();
        let mut seen = Vec::new();
        let imported = host
            .import_image(&c, name, &layout, None, &mut |e| seen.push(format!("{e:?}")))
            .unwrap();
        assert_eq!(imported.layers.len(), 2, "{name}");
        assert!(imported.layers.iter().all(|l| l.created), "{name}");
        assert_eq!(imported.references, vec!["test:1".to_owned()]);
        let top = imported.chain_id;
        assert_eq!(
            top,
            chain_id(Some(&Digest::of(&base_layer())), &Digest::of(&upper_layer())),
            "{name}"
        );
        // The same image again, as a tar of the layout and as docker save: the chains
        // exist, nothing is applied.
        for again in [&layout_tar, &docker] {
            let i = host.import_image(&c, name, again, None, &mut |_| {}).unwrap();
            assert_eq!(i.chain_id, top, "{name} {}", again.display());
            assert!(i.layers.iter().all(|l| !l.created), "{name} {}", again.display());
        }
        let mounts = sn.view(&c, "ctr", Some(&top.to_string()), &Labels::new()).unwrap();
        let target = dir.path().join(format!("ctr-{name}"));
        std::fs::create_dir_all(&target).unwrap();
        {
            let m = Mounted::new(&mounts, &target);
            assert_eq!(walk(m.path()), want, "{name}: the container sees what tar gives");
        }
        sn.remove(&c, "ctr").unwrap();
        // The import's own lease is gone, and a collection keeps what the chain holds.
        assert!(host.leases().list(&c, &[]).unwrap().is_empty(), "{name}");
        let r = host.collect(false).unwrap();
        assert!(r.removed.is_empty(), "{name}: {:?}", r.removed);
        assert!(sn.blob(&c, &top.to_string()).unwrap().is_some(), "{name}");
        sn.remove(&c, &top.to_string()).unwrap();
        sn.remove(&c, &Digest::of(&base_layer()).to_string()).unwrap();
    }
    // The platform must exist.
    let err =
        host.import_image(&c, "native", &layout, Some("linux/riscv64"), &mut |_| {}).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    host.close().unwrap();
}

/// An image directory's names reach nothing outside it: a layer or config named with
/// `..`, or found through a symlink leading out, is refused and nothing of it is stored.
#[test]
fn an_image_directory_names_nothing_outside_it() {
    let dir = tmp();
    let host = tmpfs_host(&dir.path().join("root"));
    let c = ctx("default");
    let secret = b"a secret outside the image".to_vec();
    std::fs::write(dir.path().join("secret.tar"), &secret).unwrap();
    std::fs::create_dir_all(dir.path().join("elsewhere")).unwrap();
    std::fs::write(dir.path().join("elsewhere/layer.tar"), &secret).unwrap();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": oci_arch(), "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": [Digest::of(&secret).to_string()] },
    }))
    .unwrap();
    let image = dir.path().join("image");
    std::fs::create_dir_all(&image).unwrap();
    std::fs::write(image.join("config.json"), &config).unwrap();
    std::os::unix::fs::symlink("../elsewhere", image.join("l1")).unwrap();
    for (config, layer) in [
        ("config.json", "../secret.tar"),
        ("config.json", "l1/layer.tar"),
        ("../image/config.json", "l1/layer.tar"),
    ] {
        let manifest = serde_json::json!([{ "Config": config, "Layers": [layer] }]);
        std::fs::write(image.join("manifest.json"), serde_json::to_vec(&manifest).unwrap())
            .unwrap();
        let err = host.import_image(&c, "native", &image, None, &mut |_| {}).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{config} {layer}: {err}");
        assert!(err.to_string().contains("outside"), "{config} {layer}: {err}");
        let stored = host.content().info(&c, &Digest::of(&secret));
        assert_eq!(stored.unwrap_err().kind(), ErrorKind::NotFound, "{config} {layer}");
    }
    host.close().unwrap();
}

/// The native driver's commit and the metadata's are one transaction: a register cut
/// short after the driver's step leaves nothing, and registering again works.
#[test]
fn a_register_cut_short_after_the_backend_commit_leaves_nothing_and_is_done_again() {
    let dir = tmp();
    let root = dir.path().join("root");
    let config = "default_snapshotter = \"native\"\n[snapshotters.native]\ndriver = \"native\"\n";
    let faults = Arc::new(Faults::new());
    let c = ctx("default");
    let blob = {
        let host = Host::open_config(&root, faults.clone(), Config::parse(config, "test").unwrap())
            .unwrap();
        let sn = host.snapshotter("native").unwrap();
        let blob = host.content().ingest(&c, &mut &base_layer()[..], None, &Labels::new());
        let blob = blob.unwrap().digest;
        faults.arm("metadata.commit.after-backend", wasnap::fault::Action::Error);
        let err = host.layers(&sn).register(&c, &blob, None, None, &Labels::new()).unwrap_err();
        assert!(err.to_string().contains("metadata.commit.after-backend"), "{err}");
        assert!(list(&sn, &c, &[]).unwrap().is_empty(), "the extraction snapshot went");
        host.close().unwrap();
        blob
    };
    let host = host_with(&root, config);
    let sn = host.snapshotter("native").unwrap();
    assert!(list(&sn, &c, &[]).unwrap().is_empty());
    for report in host.check().unwrap() {
        assert!(report.orphans.is_empty() && report.missing.is_empty(), "{report:?}");
    }
    let again = host.layers(&sn).register(&c, &blob, None, None, &Labels::new()).unwrap();
    assert!(again.created && again.applied.is_some(), "applied again: {again:?}");
    let chain = Digest::of(&base_layer());
    assert_eq!(again.chain_id, chain);
    assert_eq!(sn.blob(&c, &chain.to_string()).unwrap(), Some(blob), "mapped");
    let keys = names(&list(&sn, &c, &[]).unwrap());
    assert_eq!(keys, vec![chain.to_string()]);
    host.close().unwrap();
}
