//! A 1,000-layer image under a real containerd, through wasnap's overlay driver as its
//! proxy snapshotter: twice the kernel's overlay stack limit. containerd imports and
//! unpacks it into wasnap, then runs containers on it: the shim mounts the root
//! filesystem from the record wasnap returned with containerd's own mount code (which
//! shortens a long `lowerdir` to names relative to their common parent and mounts from
//! there), and the container lists the tree it sees, which must be exactly the image's.
//! No mount is made by this test's code. (`ctr images mount` would be the direct way,
//! but containerd 1.6's reads `--snapshotter` as a global flag, which does not exist,
//! and always mounts from containerd's own overlayfs.)

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use sha2::{Digest, Sha256};

use wasnap_test_util::containerd::{self, Containerd};

use super::{Daemon, Scratch, ctr, eventually};

const IMAGE: &str = "docker.io/library/wasnap-deep:latest";
const DEPTH: usize = 1000;

/// What the image's tree shows under the names the layers write (`files`, `opq`,
/// `gone`, `top`; the busybox layer's are left out): every path, with `None` for a
/// directory and a file's content otherwise.
type Tree = BTreeMap<String, Option<String>>;

fn header(path: &str, kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_path(path).unwrap();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.set_cksum();
    h
}

struct Layer {
    b: tar::Builder<Vec<u8>>,
}

impl Layer {
    fn new() -> Layer {
        Layer { b: tar::Builder::new(Vec::new()) }
    }

    fn dir(&mut self, path: &str) {
        let h = header(&format!("{path}/"), tar::EntryType::Directory, 0o755, 0);
        self.b.append(&h, std::io::empty()).unwrap();
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        let h = header(path, tar::EntryType::Regular, mode, data.len() as u64);
        self.b.append(&h, data).unwrap();
    }

    fn symlink(&mut self, path: &str, target: &str) {
        let mut h = tar::Header::new_ustar();
        h.set_path(path).unwrap();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        h.set_mtime(1_700_000_000);
        h.set_link_name(target).unwrap();
        h.set_cksum();
        self.b.append(&h, std::io::empty()).unwrap();
    }

    /// A file, with its directory, in the layer and the model.
    fn put(&mut self, rel: &str, content: String, model: &mut Tree) {
        if let Some((dir, _)) = rel.rsplit_once('/') {
            let mut at = String::new();
            for part in dir.split('/') {
                at = if at.is_empty() { part.to_owned() } else { format!("{at}/{part}") };
                self.dir(&at);
                model.insert(at.clone(), None);
            }
        }
        self.file(rel, 0o644, content.as_bytes());
        model.insert(rel.to_owned(), Some(content));
    }

    fn into_tar(self) -> Vec<u8> {
        self.b.into_inner().unwrap()
    }
}

/// Layer `i` (1-based) as an OCI tar, applied to `model`: as tests/all/deep.rs's chain,
/// whiteouts and opaque directories written the OCI way (`.wh.` files). Layer 1 also
/// carries a static busybox.
fn layer(i: usize, busybox: &Path, model: &mut Tree) -> Vec<u8> {
    let mut l = Layer::new();
    if i == 1 {
        l.dir("bin");
        l.file("bin/busybox", 0o755, &std::fs::read(busybox).unwrap());
        for applet in ["sh", "cat"] {
            l.symlink(&format!("bin/{applet}"), "busybox");
        }
        for d in ["etc", "tmp", "proc", "sys", "dev"] {
            l.dir(d);
        }
    }
    l.put(&format!("files/f{i}"), format!("file {i}"), model);
    l.put("top", i.to_string(), model);
    if i.is_multiple_of(7) {
        l.file(&format!("files/.wh.f{}", i - 3), 0o644, b"");
        model.remove(&format!("files/f{}", i - 3));
    }
    if i == 3 {
        l.put("gone/deep/x", "x".into(), model);
    }
    if i == 300 {
        l.file(".wh.gone", 0o644, b"");
        model.retain(|k, _| k != "gone" && !k.starts_with("gone/"));
    }
    if i % 50 == 25 {
        l.put(&format!("opq/x{i}"), format!("hidden later {i}"), model);
    }
    if i.is_multiple_of(250) {
        l.dir("opq");
        l.file("opq/.wh..wh..opq", 0o644, b"");
        model.retain(|k, _| !k.starts_with("opq/"));
        l.put(&format!("opq/only-{i}"), format!("opaque at {i}"), model);
    }
    l.into_tar()
}

fn sha(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Writes the image archive to `out`; returns the tree its top shows (owned part).
fn build(busybox: &Path, out: &Path) -> Tree {
    let mut model = Tree::new();
    let mut blobs: Vec<(String, Vec<u8>)> = Vec::new();
    let (mut descs, mut diff_ids) = (Vec::new(), Vec::new());
    for i in 1..=DEPTH {
        let tar = layer(i, busybox, &mut model);
        let d = sha(&tar);
        diff_ids.push(format!("sha256:{d}"));
        descs.push(json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": format!("sha256:{d}"),
            "size": tar.len(),
        }));
        blobs.push((d, tar));
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
    let mut a = Layer::new();
    a.file("oci-layout", 0o644, br#"{"imageLayoutVersion":"1.0.0"}"#);
    a.file("index.json", 0o644, &index);
    a.dir("blobs");
    a.dir("blobs/sha256");
    for (digest, bytes) in &blobs {
        a.file(&format!("blobs/sha256/{digest}"), 0o644, bytes);
    }
    std::fs::write(out, a.into_tar()).unwrap();
    model
}

/// A shell script for the container: every path under the owned top-level names, as
/// `D <path>` or `F <path> <content>`.
const LIST: &str = "cd / && /bin/busybox find files opq gone top 2>/dev/null | \
    while read p; do \
    if [ -d \"$p\" ]; then echo \"D $p\"; else echo \"F $p $(cat \"$p\")\"; fi; \
    done";

/// The tree a container listed with [`LIST`].
fn parse_listing(out: &str) -> Tree {
    out.lines()
        .map(|l| match l.split_once(' ') {
            Some(("D", path)) => (path.to_owned(), None),
            Some(("F", rest)) => {
                let (path, content) = rest.split_once(' ').unwrap_or((rest, ""));
                (path.to_owned(), Some(content.to_owned()))
            }
            _ => panic!("unexpected listing line {l:?}"),
        })
        .collect()
}

/// The flattened trees in the daemon's overlay driver.
fn flat_dirs(d: &Daemon) -> Vec<std::path::PathBuf> {
    let snapshots = d.0.root().join("snapshotters/overlay/snapshots");
    std::fs::read_dir(snapshots)
        .map(|r| {
            r.filter_map(|e| Some(e.ok()?.path().join("flat"))).filter(|p| p.is_dir()).collect()
        })
        .unwrap_or_default()
}

fn flats(d: &Daemon) -> usize {
    flat_dirs(d).len()
}

/// Deletes the flattened trees, as if the chain's tips had never been mounted.
fn drop_flats(d: &Daemon) {
    for flat in flat_dirs(d) {
        std::fs::remove_dir_all(flat).unwrap();
    }
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed())
}

#[test]
fn containerd_imports_and_runs_a_1000_layer_image_through_the_proxy() {
    require_containerd!();
    let scratch = Scratch::new(false);
    let archive = scratch.path().join("deep.tar");
    let expected = build(Path::new("/bin/busybox"), &archive);
    let config =
        "default_snapshotter = \"overlay\"\n\n[snapshotters.overlay]\ndriver = \"overlay\"\n";
    let d = Daemon::start(scratch.path(), config);
    let cdir = scratch.path().join("containerd");
    std::fs::create_dir(&cdir).unwrap();
    let proxies = BTreeMap::from([("overlay".to_owned(), d.socket())]);
    let c = Containerd::start(&cdir, &proxies).unwrap();
    let sn = "overlay";

    // containerd unpacks 1,000 layers into wasnap: each prepare returns mounts, the deep
    // ones over a flattened bottom.
    let archive = archive.to_str().unwrap();
    let (_, import) = timed(|| ctr(&c, &d, &["image", "import", "--snapshotter", sn, archive]));
    let layers = ctr(&c, &d, &["snapshots", "--snapshotter", sn, "ls"]);
    assert_eq!(layers.lines().filter(|l| l.contains("Committed")).count(), DEPTH);
    let after_import = flats(&d);

    // What a container on the image gets: an overlay record with a flattened tree at the
    // bottom, whose options, as given, are longer than a page (containerd shortens them).
    let rows: Vec<Vec<&str>> =
        layers.lines().skip(1).map(|l| l.split_whitespace().collect()).collect();
    let parents: HashSet<&str> = rows.iter().filter_map(|r| r.get(1).copied()).collect();
    let top = rows.iter().find(|r| !parents.contains(r[0])).unwrap()[0];
    ctr(&c, &d, &["snapshots", "--snapshotter", sn, "prepare", "probe", top]);
    let mounts = ctr(&c, &d, &["snapshots", "--snapshotter", sn, "mounts", "/x", "probe"]);
    ctr(&c, &d, &["snapshots", "--snapshotter", sn, "rm", "probe"]);
    let options = mounts.split_whitespace().last().unwrap_or("");
    assert!(options.contains("/flat:") || options.ends_with("/flat"), "{mounts}");
    assert!(options.len() > 4096, "options longer than a page as given: {}", options.len());

    // Containers run on it: the shim mounts the root filesystem with containerd's own
    // mount code. The first start after the flattened trees are dropped makes them
    // again; later ones find them. One container lists the whole tree it sees.
    let run = |id: &str, script: &str| {
        ctr(&c, &d, &["run", "--rm", "--snapshotter", sn, IMAGE, id, "sh", "-c", script])
    };
    drop_flats(&d);
    let (out, first) = timed(|| run("deep-e2e-first", "cat /top"));
    assert_eq!(out, DEPTH.to_string(), "the top layer's file");
    let remade = flats(&d);
    let tree = parse_listing(&run("deep-e2e-list", LIST));
    assert_eq!(tree.len(), expected.len(), "as many entries as the image defines");
    assert_eq!(tree, expected, "the container sees exactly the image's tree");
    let later: Vec<Duration> =
        (0..3).map(|rep| timed(|| run(&format!("deep-e2e-{rep}"), "cat /top")).1).collect();
    assert_eq!(flats(&d), remade, "later starts flatten nothing");
    eprintln!(
        "containerd, 1000-layer image through the proxy: import {import:.2?} ({after_import} \
         flattened trees made while unpacking); ctr run, first {first:.2?} (made {remade} \
         flattened trees), later {later:.2?}"
    );

    // The image goes; containerd's collector removes the chain, flattened trees with it.
    ctr(&c, &d, &["image", "rm", "--sync", IMAGE]);
    let empty = eventually(Duration::from_secs(60), || d.keys(sn).is_empty());
    assert!(empty, "wasnap still holds {} snapshots\n{}", d.keys(sn).len(), d.log_tail());
    assert!(eventually(Duration::from_secs(30), || flats(&d) == 0), "flattened trees left");
    drop(c);
    drop(d);
}
