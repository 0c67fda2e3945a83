//! An OCI image archive built offline from files on this machine: what `ctr image
//! import` reads. Layers are plain (uncompressed) tars; digests are sha256.

use std::path::Path;

use serde_json::json;
use sha2::{Digest, Sha256};

/// The image's name inside the archive (`io.containerd.image.name`).
pub const IMAGE: &str = "docker.io/library/wasnap-e2e:latest";
/// A file the second layer adds, and what it says.
pub const HELLO_PATH: &str = "/etc/wasnap-hello";
pub const HELLO: &str = "hello from a wasnap layer\n";

fn sha(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

struct Layer {
    tar: Vec<u8>,
}

fn header(path: &str, kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_path(path).unwrap();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h
}

fn dir(b: &mut tar::Builder<Vec<u8>>, path: &str) {
    let mut h = header(path, tar::EntryType::Directory, 0o755, 0);
    h.set_cksum();
    b.append(&h, std::io::empty()).unwrap();
}

fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, data: &[u8]) {
    let mut h = header(path, tar::EntryType::Regular, mode, data.len() as u64);
    h.set_cksum();
    b.append(&h, data).unwrap();
}

fn symlink(b: &mut tar::Builder<Vec<u8>>, path: &str, target: &str) {
    let mut h = header(path, tar::EntryType::Symlink, 0o777, 0);
    h.set_link_name(target).unwrap();
    h.set_cksum();
    b.append(&h, std::io::empty()).unwrap();
}

/// Layer 1: a static busybox as `/bin/busybox`, with `sh` and `cat` pointing at it.
fn busybox_layer(busybox: &Path) -> Layer {
    let mut b = tar::Builder::new(Vec::new());
    dir(&mut b, "bin/");
    file(&mut b, "bin/busybox", 0o755, &std::fs::read(busybox).unwrap());
    for applet in ["sh", "cat", "ls", "echo"] {
        symlink(&mut b, &format!("bin/{applet}"), "busybox");
    }
    for d in ["etc/", "tmp/", "proc/", "sys/", "dev/"] {
        dir(&mut b, d);
    }
    Layer { tar: b.into_inner().unwrap() }
}

/// Layer 2: one file.
fn hello_layer() -> Layer {
    let mut b = tar::Builder::new(Vec::new());
    dir(&mut b, "etc/");
    file(&mut b, HELLO_PATH.trim_start_matches('/'), 0o644, HELLO.as_bytes());
    Layer { tar: b.into_inner().unwrap() }
}

/// Writes the archive to `out`, built from `busybox` (a static binary).
pub fn build(busybox: &Path, out: &Path) {
    let layers = [busybox_layer(busybox), hello_layer()];
    let mut blobs: Vec<(String, Vec<u8>)> = Vec::new();
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for l in &layers {
        let d = sha(&l.tar);
        diff_ids.push(format!("sha256:{d}"));
        descs.push(json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": format!("sha256:{d}"),
            "size": l.tar.len(),
        }));
        blobs.push((d, l.tar.clone()));
    }
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Cmd": ["/bin/sh"], "Env": ["PATH=/bin"] },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    }))
    .unwrap();
    let config_digest = sha(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{config_digest}"),
            "size": config.len(),
        },
        "layers": descs,
    }))
    .unwrap();
    let manifest_digest = sha(&manifest);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_digest}"),
            "size": manifest.len(),
            "annotations": {
                "io.containerd.image.name": IMAGE,
                "org.opencontainers.image.ref.name": "latest",
            },
        }],
    }))
    .unwrap();
    blobs.push((config_digest, config));
    blobs.push((manifest_digest, manifest));

    let mut b = tar::Builder::new(Vec::new());
    file(&mut b, "oci-layout", 0o644, br#"{"imageLayoutVersion":"1.0.0"}"#);
    file(&mut b, "index.json", 0o644, &index);
    dir(&mut b, "blobs/");
    dir(&mut b, "blobs/sha256/");
    for (digest, bytes) in &blobs {
        file(&mut b, &format!("blobs/sha256/{digest}"), 0o644, bytes);
    }
    std::fs::write(out, b.into_inner().unwrap()).unwrap();
}
