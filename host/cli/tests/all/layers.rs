//! `wasnap layer ...` and `wasnap content ...`, on a root opened by each command and
//! through a daemon (`--address`), with the same output either way: blobs in, listed,
//! shown and out; layers registered, applied and diffed; refusals; and uploads cut
//! short, which keep nothing.

use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;
use wasnap::digest::Digest;
use wasnap::layer::Compression;
use wasnap::layer::snapshot::chain_id;
use wasnap_test_util::process::DaemonProcess;

use crate::common::tmp;
use crate::remote::{CONFIG, daemon, masked, wasnap};

/// Where the commands go.
enum Target {
    /// A root each command opens itself, configured by `config`.
    Embedded { dir: TempDir, config: PathBuf },
    /// A daemon (on a root of its own).
    Daemon { d: DaemonProcess, _dir: TempDir },
}

impl Target {
    fn embedded() -> Target {
        let dir = tmp();
        let config = dir.path().join("wasnap.toml");
        std::fs::write(&config, CONFIG).unwrap();
        Target::Embedded { dir, config }
    }

    fn daemon() -> Target {
        let dir = tmp();
        Target::Daemon { d: daemon(dir.path()), _dir: dir }
    }

    /// The state directory.
    fn root(&self) -> PathBuf {
        match self {
            Target::Embedded { dir, .. } => dir.path().join("root"),
            Target::Daemon { d, .. } => d.root().to_path_buf(),
        }
    }

    /// The flags that select this target.
    fn flags(&self) -> Vec<String> {
        match self {
            Target::Embedded { config, .. } => {
                let root = self.root().display().to_string();
                vec!["--root".into(), root, "--config".into(), config.display().to_string()]
            }
            Target::Daemon { d, .. } => vec!["--address".into(), d.socket().display().to_string()],
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        let flags = self.flags();
        let mut all: Vec<&str> = flags.iter().map(String::as_str).collect();
        all.extend_from_slice(args);
        wasnap(&all)
    }

    fn ok_bytes(&self, args: &[&str]) -> Vec<u8> {
        let out = self.run(args);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    }

    fn ok(&self, args: &[&str]) -> String {
        String::from_utf8(self.ok_bytes(args)).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.ok(&[&["--format", "json"], args].concat())).unwrap()
    }

    /// A failure: exit status 1 and one line `wasnap: ...`; returns that line.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?} should fail: {err}");
        assert!(err.starts_with("wasnap: ") && err.lines().count() == 1, "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        err.trim_end().to_owned()
    }

    /// Names in the root's `content/<sub>` directory.
    fn content_files(&self, sub: &str) -> Vec<String> {
        match std::fs::read_dir(self.root().join("content").join(sub)) {
            Ok(entries) => {
                entries.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => panic!("{e}"),
        }
    }
}

/// A tar entry of a test layer: a directory, or a file with its contents.
enum E<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8]),
}

/// A layer tar with fixed times and root ownership.
fn layer(entries: &[E<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_ustar();
        h.set_mtime(1_600_000_000);
        h.set_uid(0);
        h.set_gid(0);
        match e {
            E::Dir(p) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, p, &[][..]).unwrap();
            }
            E::File(p, data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, *data).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

fn base_layer() -> Vec<u8> {
    layer(&[
        E::Dir("etc"),
        E::File("etc/hello", b"hello\n"),
        E::Dir("bin"),
        E::File("bin/tool", b"#!/bin/sh\n"),
    ])
}

/// On top of the base: a file added, one deleted (a whiteout).
fn top_layer() -> Vec<u8> {
    layer(&[E::Dir("etc"), E::File("etc/added", b"added\n"), E::File("etc/.wh.hello", b"")])
}

/// `n` bytes that do not compress.
fn noise(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = Compression::Gzip.encoder(Vec::new()).unwrap();
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// The names of a tar's entries, without a trailing `/`.
fn entry_names(tar: impl Read) -> Vec<String> {
    let mut archive = tar::Archive::new(tar);
    let mut names: Vec<String> = archive
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().trim_end_matches('/').to_owned())
        .collect();
    names.sort();
    names
}

fn write(dir: &Path, name: &str, data: &[u8]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, data).unwrap();
    path.display().to_string()
}

/// The whole tour on `t`, with inputs in `files`. Returns what it printed that does not
/// depend on where it ran (masked), to compare the targets.
fn tour(t: &Target, files: &Path) -> Vec<String> {
    let mut seen = Vec::new();
    let root = t.root();
    let mut keep = |what: &str, text: &str| seen.push(format!("{what}\n{}", masked(text, &root)));

    // What these blobs are inspected after is held by a lease: garbage collection takes
    // blobs nothing holds.
    assert_eq!(t.ok(&["lease", "create", "--id", "tour"]).trim(), "tour");
    let lease: &[&str] = &["--lease", "tour"];

    // A blob of a few chunks in, then listed, shown and out again.
    let blob = noise(3 * (1 << 20) + 123);
    let digest = Digest::of(&blob).to_string();
    let blob_path = write(files, "blob.bin", &blob);
    let out = t.ok(&[lease, &["content", "ingest", &blob_path, "-l", "k=v"]].concat());
    assert_eq!(out.trim(), digest);
    keep("ingest", &out);
    let ls = t.ok(&["content", "ls"]);
    assert!(ls.contains(&digest) && ls.contains(&blob.len().to_string()), "{ls}");
    keep("ls", &ls);
    assert!(t.ok(&["content", "ls", "-f", "labels.k==v"]).contains(&digest));
    assert!(!t.ok(&["content", "ls", "-f", "labels.k==w"]).contains(&digest));
    let info = t.json(&["content", "info", &digest]);
    assert_eq!(info["digest"], digest.as_str());
    assert_eq!(info["size"], blob.len() as u64);
    assert_eq!(info["labels"]["k"], "v");
    assert_eq!(info["snapshots"], Value::Array(vec![]));
    keep("info json", &info.to_string());
    keep("info", &t.ok(&["content", "info", &digest]));
    assert!(t.ok_bytes(&["content", "cat", &digest]) == blob, "content cat: other bytes");
    // Ingesting what is there already answers with the same blob.
    assert_eq!(t.ok(&["content", "ingest", &blob_path, "--expect", &digest]).trim(), digest);

    // A blob that is not what --expect says is refused and not kept.
    let other_path = write(files, "other.bin", b"other bytes");
    let err = t.fails(&["content", "ingest", &other_path, "--expect", &digest]);
    assert!(err.contains("expected digest") && err.ends_with("failed precondition"), "{err}");
    keep("wrong expect", &err);
    let err = t.fails(&["content", "ingest", &other_path, "--expect", "sha256:nothex"]);
    assert!(err.ends_with("invalid argument"), "{err}");
    keep("bad expect", &err);
    assert!(!t.ok(&["content", "ls"]).contains(&Digest::of(b"other bytes").to_string()));

    // A layer registered from a file (no lease: the command holds the blob until its
    // snapshot does): its chain ID is its diffID (a bottom layer); again by the blob's
    // digest, the chain exists and nothing is applied.
    let base = base_layer();
    let diff_id = Digest::of(&base);
    let base_path = write(files, "base.tar", &base);
    let chain = t.ok(&["layer", "register", &base_path]);
    assert_eq!(chain.trim(), diff_id.to_string());
    keep("register", &chain);
    let again = t.json(&["layer", "register", &diff_id.to_string()]);
    assert_eq!(again["created"], false, "{again}");
    assert_eq!(again["chain_id"], diff_id.to_string());
    assert_eq!(again["applied"], Value::Null);
    keep("register again", &again.to_string());
    // A gzip layer on top of it, by --parent.
    let top = top_layer();
    let top_path = write(files, "top.tar.gz", &gzip(&top));
    let reg = t.json(&["layer", "register", &top_path, "--parent", &diff_id.to_string()]);
    let top_chain = chain_id(Some(&diff_id), &Digest::of(&top));
    assert_eq!(reg["chain_id"], top_chain.to_string(), "{reg}");
    assert_eq!(reg["created"], true);
    assert_eq!(reg["applied"]["compression"], "gzip");
    keep("register gzip", &reg.to_string());
    keep("ls after register", &t.ok(&["ls"]));

    // The layer's blob is mapped to its snapshot, which holds it.
    let info = t.ok(&["content", "info", &diff_id.to_string()]);
    assert!(info.contains(&format!("{diff_id} (native)")), "{info}");
    keep("info mapped", &info);
    let err = t.fails(&["content", "rm", &diff_id.to_string()]);
    assert!(
        err.contains("remove the snapshot first") && err.ends_with("failed precondition"),
        "{err}"
    );
    keep("rm mapped", &err);
    assert!(t.ok(&["content", "ls"]).contains(&diff_id.to_string()));

    // A layer applied into an active snapshot on the base, then diffed out of it.
    t.ok(&["prepare", "work", &diff_id.to_string()]);
    let top_tar = write(files, "top.tar", &top);
    let applied = t.ok(&["layer", "apply", "work", &top_tar]);
    assert_eq!(applied.trim(), Digest::of(&top).to_string());
    keep("apply", &applied);
    let out_tar = files.join("out.tar");
    let diffed = t.json(&[
        "--lease",
        "tour",
        "layer",
        "diff",
        "work",
        "-o",
        out_tar.to_str().unwrap(),
        "--compression",
        "none",
        "-l",
        "made=by-test",
    ]);
    let written = std::fs::read(&out_tar).unwrap();
    let names = entry_names(&written[..]);
    for want in ["etc/added", "etc/.wh.hello"] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
    assert!(!names.iter().any(|n| n.starts_with("bin")), "{names:?}");
    let written_digest = Digest::of(&written).to_string();
    assert_eq!(diffed["blob"]["digest"], written_digest, "{diffed}");
    assert_eq!(diffed["diff_id"], written_digest);
    assert_eq!(diffed["blob"]["labels"]["made"], "by-test");
    assert!(t.ok_bytes(&["content", "cat", &written_digest]) == written);
    // Compressed (gzip by default), with no lease: the same entries.
    let out_gz = files.join("out.tar.gz");
    let table = t.ok(&["layer", "diff", "work", "-o", out_gz.to_str().unwrap()]);
    assert!(table.starts_with("DIGEST") && table.contains("tar+gzip"), "{table}");
    let gz = std::fs::read(&out_gz).unwrap();
    let mut tar = Vec::new();
    Compression::Gzip.decoder(BufReader::new(&gz[..])).unwrap().read_to_end(&mut tar).unwrap();
    assert_eq!(entry_names(&tar[..]), names);
    assert!(table.contains(&Digest::of(&gz).to_string()), "{table}");
    assert!(table.contains(&Digest::of(&tar).to_string()), "{table}");
    // To standard output.
    let stdout = t.ok_bytes(&["layer", "diff", "work", "--compression", "none", "-o", "-"]);
    assert_eq!(entry_names(&stdout[..]), names);

    // Refusals, typed.
    let err = t.fails(&["layer", "apply", "missing", &top_tar]);
    assert!(err.ends_with("not found"), "{err}");
    keep("apply missing", &err);
    let err = t.fails(&["layer", "apply", &diff_id.to_string(), &top_tar]);
    assert!(err.ends_with("failed precondition"), "{err}");
    keep("apply committed", &err);
    let err = t.fails(&["layer", "apply", "work", &top_tar, "--compression", "lz4"]);
    assert!(err.ends_with("invalid argument"), "{err}");
    keep("apply compression", &err);
    let err = t.fails(&["layer", "register", "no-such-file-or-digest"]);
    assert!(err.ends_with("invalid argument"), "{err}");
    keep("register neither", &err);
    let err = t.fails(&["content", "cat", &Digest::of(b"never stored").to_string()]);
    assert!(err.ends_with("not found"), "{err}");
    keep("cat missing", &err);
    let err = t.fails(&["-n", "other", "content", "info", &digest]);
    assert!(err.ends_with("not found"), "{err}");
    keep("other namespace", &err);

    // A blob nothing maps is deleted; twice is not found.
    t.ok(&["content", "rm", &digest]);
    assert!(!t.ok(&["content", "ls"]).contains(&digest));
    let err = t.fails(&["content", "rm", &digest]);
    assert!(err.ends_with("not found"), "{err}");
    keep("rm twice", &err);
    assert!(t.content_files("ingest").is_empty(), "{:?}", t.content_files("ingest"));
    seen
}

#[test]
fn layer_and_content_commands_work_embedded_and_through_the_daemon_alike() {
    let files = tmp();
    let embedded = tour(&Target::embedded(), files.path());
    let through = tour(&Target::daemon(), files.path());
    assert_eq!(embedded.len(), through.len());
    for (a, b) in embedded.iter().zip(&through) {
        assert_eq!(a, b, "embedded and through the daemon differ");
    }
}

/// Spawning with no wasnap settings from the environment, and no output.
trait SpawnClean {
    fn spawn_clean(&mut self) -> std::process::Child;
}

impl SpawnClean for Command {
    fn spawn_clean(&mut self) -> std::process::Child {
        for var in ["NAMESPACE", "ROOT", "ADDRESS", "CONFIG", "SNAPSHOTTER", "LEASE"] {
            self.env_remove(format!("WASNAP_{var}"));
        }
        self.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap()
    }
}

/// Waits until `f` holds, for at most ten seconds.
fn eventually(what: &str, f: impl Fn() -> bool) {
    let started = Instant::now();
    while !f() {
        assert!(started.elapsed() < Duration::from_secs(10), "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_upload_cut_short_keeps_nothing() {
    let files = tmp();
    for t in [Target::embedded(), Target::daemon()] {
        // The input fails part way (a directory reads with EISDIR): no blob.
        let err = t.fails(&["content", "ingest", files.path().to_str().unwrap()]);
        assert!(err.contains("directory"), "{err}");
        assert_eq!(t.ok(&["content", "ls", "--format", "json"]).trim(), "[]");
        assert!(t.content_files("ingest").is_empty());
        assert!(t.content_files("blobs/sha256").is_empty());
    }

    // A client killed in the middle of an upload: the daemon keeps nothing of it, and
    // serves on.
    let t = Target::daemon();
    let flags = t.flags();
    let mut child = Command::new(env!("CARGO_BIN_EXE_wasnap"))
        .args(&flags)
        .args(["content", "ingest", "-"])
        .stdin(Stdio::piped())
        .spawn_clean();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&noise(3 << 20)).unwrap();
    stdin.flush().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap();
    child.wait().unwrap();
    drop(stdin);
    eventually("the cut-short ingest's file is removed", || t.content_files("ingest").is_empty());
    assert!(t.content_files("blobs/sha256").is_empty());
    assert_eq!(t.ok(&["content", "ls", "--format", "json"]).trim(), "[]");

    // Likewise a layer cut short: the apply fails (what it wrote stays in the snapshot,
    // as after any failed apply), and the daemon serves the next one.
    t.ok(&["prepare", "half"]);
    let big = layer(&[E::Dir("data"), E::File("data/big", &noise(8 << 20))]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_wasnap"))
        .args(&flags)
        .args(["layer", "apply", "half", "-"])
        .stdin(Stdio::piped())
        .spawn_clean();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&big[..3 << 20]).unwrap();
    stdin.flush().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap();
    child.wait().unwrap();
    drop(stdin);
    t.ok(&["prepare", "whole"]);
    let big_path = write(files.path(), "big.tar", &big);
    let applied = t.ok(&["layer", "apply", "whole", &big_path]);
    assert_eq!(applied.trim(), Digest::of(&big).to_string());
    assert!(t.ok(&["stat", "half"]).contains("active"));
}

/// A `docker save` tarball of the base and top layers.
fn docker_save() -> Vec<u8> {
    let diff_ids: Vec<String> =
        [base_layer(), top_layer()].iter().map(|l| Digest::of(l).to_string()).collect();
    let config = serde_json::to_vec(&serde_json::json!({
        "os": "linux", "rootfs": { "type": "layers", "diff_ids": diff_ids },
    }))
    .unwrap();
    let config_name = format!("{}.json", Digest::of(&config).hex());
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": config_name, "RepoTags": ["app:1"], "Layers": ["a/layer.tar", "b/layer.tar"],
    }]))
    .unwrap();
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in [
        ("a/layer.tar", base_layer()),
        ("b/layer.tar", top_layer()),
        (config_name.as_str(), config),
        ("manifest.json", manifest),
    ] {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, &data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

#[test]
fn image_import_works_embedded_and_through_the_daemon() {
    let files = tmp();
    let image = write(files.path(), "app.tar", &docker_save());
    let top = chain_id(Some(&Digest::of(&base_layer())), &Digest::of(&top_layer()));
    for t in [Target::embedded(), Target::daemon()] {
        assert_eq!(t.ok(&["image", "import", &image]).trim(), top.to_string());
        let again = t.json(&["image", "import", &image]);
        assert_eq!(again["chain_id"], top.to_string());
        assert_eq!(again["references"], serde_json::json!(["app:1"]));
        let created: Vec<bool> = again["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["created"].as_bool().unwrap())
            .collect();
        assert_eq!(created, [false, false], "a second import applies nothing");
        t.ok(&["prepare", "ctr", &top.to_string()]);
        let info = t.json(&["stat", &top.to_string()]);
        assert_eq!(info["kind"], "committed");
        let err = t.fails(&["image", "import", "/nonexistent/image.tar"]);
        assert!(err.contains("/nonexistent/image.tar"), "{err}");
    }
}

/// `wasnap merge` and `wasnap diff` on registered layers: what they print, what is
/// reused, and a merge's layers held; the same embedded and through the daemon.
fn merge_tour(t: &Target, files: &Path) -> Vec<String> {
    let mut seen = Vec::new();
    let root = t.root();
    let mut keep = |what: &str, text: &str| seen.push(format!("{what}\n{}", masked(text, &root)));
    let base = t.ok(&["layer", "register", &write(files, "m-base.tar", &base_layer())]);
    let base = base.trim().to_owned();
    let top_path = write(files, "m-top.tar", &top_layer());
    let top = t.ok(&["layer", "register", &top_path, "--parent", &base]).trim().to_owned();
    let other = layer(&[E::Dir("opt"), E::File("opt/other", b"other\n")]);
    let other = t.ok(&["layer", "register", &write(files, "m-other.tar", &other)]);
    let other = other.trim().to_owned();

    let m = t.json(&["merge", "m", &other, &top]);
    assert_eq!(m["info"]["name"], "m");
    assert_eq!(m["how"], "copied", "the native driver merges by copying");
    assert_eq!(m["layers"], serde_json::json!([other, base, top]));
    keep("merge", &t.ok(&["merge", "m-again", &other, &top]));
    let again = t.json(&["merge", "m-again", &other, &top]);
    assert_eq!((&again["how"], &again["info"]["name"]), (&"reused".into(), &"m".into()));
    let d = t.json(&["diff", "d", "--lower", &base, &top]);
    assert_eq!((&d["how"], &d["layers"]), (&"copied".into(), &serde_json::json!([top])));
    let rebuilt = t.json(&["merge", "top-on-other", &other, "d"]);
    assert_eq!(rebuilt["layers"], serde_json::json!([other, top]));
    keep("compared", &t.ok(&["diff", "d2", "--lower", &other, &top]));
    let err = t.fails(&["rm", &top]);
    assert!(err.contains("with child") && err.ends_with("failed precondition"), "{err}");
    keep("layer held", &err);
    let err = t.fails(&["merge", "m3", "no-such"]);
    assert!(err.ends_with("not found"), "{err}");
    keep("missing input", &err);
    t.ok(&["rm", "top-on-other", "d2", "d", "m"]);
    t.ok(&["rm", &top, &other]);
    t.ok(&["rm", &base]);
    seen
}

#[test]
fn merge_and_diff_commands_work_embedded_and_through_the_daemon_alike() {
    let files = tmp();
    let embedded = merge_tour(&Target::embedded(), files.path());
    let through = merge_tour(&Target::daemon(), files.path());
    assert_eq!(embedded, through, "embedded and through the daemon differ");
}
