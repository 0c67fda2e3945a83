//! End to end with a real containerd (from the distribution's packages): containerd
//! with its own config, root, state and socket in a temp dir, and a wasnap daemon as
//! its proxy snapshotter, once with the overlay driver and once with the `copy`
//! WebAssembly guest. An image archive built here is imported, a container runs from
//! it, `ctr snapshots` labels, commits and removes, the image goes, and containerd's
//! collector must leave wasnap empty. Then the daemon is killed outright in the middle
//! of a stream of prepares and commits: nothing containerd was told exists may be lost.
//!
//! Every process started here is stopped by pid when its guard drops, and every mount
//! under the test's directory is undone, even when an assertion fails.

mod oci;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use wasnap_daemon::client::{Blocking, request};
use wasnap_daemon::proto::snapshots::ListSnapshotsRequest;
use wasnap_test_util::containerd::{self, Containerd};
use wasnap_test_util::process::DaemonProcess;

/// The containerd namespace the tests use.
const NS: &str = "wasnap-e2e";

/// Says why the test cannot run here and returns, or, under CI, fails.
macro_rules! require_containerd {
    () => {
        let why = if !crate::common::is_root() {
            Some("needs root (containerd, mounts)")
        } else if containerd::binary().is_none() || containerd::ctr_binary().is_none() {
            Some("needs containerd and ctr (apt-get install containerd runc)")
        } else if !Path::new("/bin/busybox").is_file() {
            Some("needs a static busybox (apt-get install busybox-static)")
        } else {
            None
        };
        if let Some(why) = why {
            if std::env::var_os("CI").is_some() {
                panic!("{why}, and CI must not skip");
            }
            eprintln!("skipped: {why}");
            return;
        }
    };
}

// After the macro, which it uses.
mod deep;

/// A wasnap daemon process (killed by pid when dropped), and what the tests ask it.
struct Daemon(DaemonProcess);

impl Daemon {
    fn start(dir: &Path, config: &str) -> Daemon {
        let exe = Path::new(env!("CARGO_BIN_EXE_wasnap"));
        Daemon(DaemonProcess::start(exe, dir, config).unwrap_or_else(|e| panic!("{e}")))
    }

    fn spawn(&mut self) {
        self.0.spawn().unwrap_or_else(|e| panic!("{e}"));
    }

    fn signal(&mut self, sig: rustix::process::Signal) -> std::process::ExitStatus {
        self.0.signal(sig).unwrap()
    }

    fn socket(&self) -> PathBuf {
        self.0.socket().to_path_buf()
    }

    fn log_tail(&self) -> String {
        self.0.log_tail()
    }

    /// The keys wasnap holds for `snapshotter` in the test's namespace.
    fn keys(&self, snapshotter: &str) -> Vec<String> {
        let c = Blocking::connect(self.0.socket()).unwrap();
        let req = ListSnapshotsRequest { snapshotter: snapshotter.into(), filters: vec![] };
        c.block_on(async {
            let mut s = c
                .client()
                .snapshots()
                .list(request(req, Some(NS), None))
                .await
                .unwrap()
                .into_inner();
            let mut keys = Vec::new();
            while let Some(b) = s.message().await.unwrap() {
                keys.extend(b.info.into_iter().map(|i| i.name));
            }
            keys
        })
    }
}

/// Undoes every mount below `dir` (deepest first) when dropped; removes the directory.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new(on_disk: bool) -> Scratch {
        let dir = if on_disk { crate::common::disk_tmp() } else { crate::common::tmp() };
        Scratch { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let base = self.dir.path().to_string_lossy().into_owned();
        let mut points: Vec<String> = info
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(|p| p.replace("\\040", " "))
            .filter(|p| p.starts_with(&base))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            let _ = rustix::mount::unmount(p.as_str(), rustix::mount::UnmountFlags::DETACH);
        }
    }
}

/// Runs ctr in the test's namespace; panics with the output and logs if it fails.
fn ctr(c: &Containerd, d: &Daemon, args: &[&str]) -> String {
    let out = ctr_try(c, args);
    if !out.status.success() {
        panic!(
            "ctr {args:?} failed: {}\n--- containerd log:\n{}\n--- wasnap log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            c.log_tail(),
            d.log_tail()
        );
    }
    String::from_utf8(out.stdout).unwrap()
}

fn ctr_try(c: &Containerd, args: &[&str]) -> Output {
    let mut full = vec!["--namespace", NS];
    full.extend_from_slice(args);
    c.ctr(&full).unwrap()
}

fn config(copy_guest: &Path) -> String {
    format!(
        "default_snapshotter = \"overlay\"\n\n[snapshotters.overlay]\ndriver = \"overlay\"\n\n\
         [snapshotters.copy]\ndriver = \"wasm\"\npath = {:?}\n",
        copy_guest.display().to_string()
    )
}

fn start(scratch: &Scratch) -> (Daemon, Containerd) {
    let guest = wasnap_test_util::guests::path("copy").unwrap();
    let daemon = Daemon::start(scratch.path(), &config(&guest));
    let cdir = scratch.path().join("containerd");
    std::fs::create_dir(&cdir).unwrap();
    let proxies = BTreeMap::from([
        ("overlay".to_owned(), daemon.socket()),
        ("copy".to_owned(), daemon.socket()),
    ]);
    let containerd = Containerd::start(&cdir, &proxies).unwrap();
    (daemon, containerd)
}

/// Polls `f` until it holds, for up to `limit`.
fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    loop {
        if f() {
            return true;
        }
        if started.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The whole life of an image on one wasnap snapshotter, through containerd.
fn image_lifecycle(c: &Containerd, d: &Daemon, archive: &Path, sn: &str) {
    let archive = archive.to_str().unwrap();
    ctr(c, d, &["image", "import", "--snapshotter", sn, archive]);
    // Two committed layers, unpacked into wasnap.
    let layers = ctr(c, d, &["snapshots", "--snapshotter", sn, "ls"]);
    assert_eq!(layers.lines().filter(|l| l.contains("Committed")).count(), 2, "{layers}");
    assert_eq!(d.keys(sn).len(), 2, "wasnap holds the two layers");

    // A container from the image reads a file from the top layer.
    let id = format!("e2e-{sn}");
    let out =
        ctr(c, d, &["run", "--rm", "--snapshotter", sn, oci::IMAGE, &id, "cat", oci::HELLO_PATH]);
    assert_eq!(out, oci::HELLO, "the container printed the file from the image");

    // ctr snapshots: prepare on the top layer, label, commit, remove.
    let top = layers
        .lines()
        .filter(|l| l.contains("Committed"))
        .find_map(|l| {
            let mut cols = l.split_whitespace();
            let (key, parent) = (cols.next()?, cols.next()?);
            parent.starts_with("sha256:").then(|| key.to_owned())
        })
        .expect("a layer with a parent");
    let mounts =
        ctr(c, d, &["snapshots", "--snapshotter", sn, "prepare", "--mounts", "work", &top]);
    assert!(mounts.contains("\"Source\""), "prepare --mounts shows the mounts: {mounts}");
    ctr(c, d, &["snapshots", "--snapshotter", sn, "label", "work", "e2e.wasnap.dev/who=ctr"]);
    let info = ctr(c, d, &["snapshots", "--snapshotter", sn, "info", "work"]);
    assert!(info.contains("e2e.wasnap.dev/who"), "{info}");
    ctr(c, d, &["snapshots", "--snapshotter", sn, "commit", "done", "work"]);
    let usage = ctr(c, d, &["snapshots", "--snapshotter", sn, "usage", "done"]);
    assert!(usage.contains("done"), "{usage}");
    let busy = ctr_try(c, &["snapshots", "--snapshotter", sn, "rm", &top]);
    assert!(!busy.status.success(), "a parent with children is refused");
    ctr(c, d, &["snapshots", "--snapshotter", sn, "rm", "done"]);

    // Remove the image; containerd's collector removes the layers through wasnap.
    ctr(c, d, &["image", "rm", "--sync", oci::IMAGE]);
    let empty = eventually(Duration::from_secs(20), || d.keys(sn).is_empty());
    assert!(
        empty,
        "garbage collection left {:?} in wasnap\n--- containerd log:\n{}\n--- wasnap log:\n{}",
        d.keys(sn),
        c.log_tail(),
        d.log_tail()
    );
}

#[test]
fn containerd_runs_an_image_on_wasnap_overlay_and_on_the_copy_guest() {
    require_containerd!();
    let scratch = Scratch::new(false);
    let archive = scratch.path().join("image.tar");
    oci::build(Path::new("/bin/busybox"), &archive);
    let (d, c) = start(&scratch);
    for sn in ["overlay", "copy"] {
        image_lifecycle(&c, &d, &archive, sn);
    }
    drop(c);
    drop(d);
}

/// What a stream of prepares and commits through containerd was told.
#[derive(Debug, Default)]
struct Told {
    /// Commits containerd reported done.
    committed: Vec<String>,
    /// Prepares containerd reported done, left active.
    active: Vec<String>,
    /// Keys whose commit failed (the daemon died during it): their state is unknown.
    uncertain: Vec<String>,
    /// Operations that succeeded.
    ok: usize,
}

/// Runs containerd's collector now: a lease deleted with --sync collects synchronously.
fn collect(c: &Containerd, d: &Daemon) {
    ctr(c, d, &["leases", "create", "--id", "e2e-gc"]);
    ctr(c, d, &["leases", "delete", "--sync", "e2e-gc"]);
}

#[test]
fn a_daemon_killed_mid_stream_loses_nothing_containerd_was_told_exists() {
    require_containerd!();
    // Durability: roots on the real disk.
    let scratch = Scratch::new(true);
    let (mut d, c) = start(&scratch);
    let sn = "overlay";
    let told = std::sync::Mutex::new(Told::default());
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        // The stream: ctr prepare/commit as fast as it goes, recording what it was told.
        let stream = s.spawn(|| {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (key, name) = (format!("k{i}"), format!("c{i}"));
                i += 1;
                if !ctr_try(&c, &["snapshots", "--snapshotter", sn, "prepare", &key])
                    .status
                    .success()
                {
                    std::thread::sleep(Duration::from_millis(50)); // down, or reconnecting
                    continue;
                }
                let mut t = told.lock().unwrap();
                t.ok += 1;
                if i % 3 == 0 {
                    t.active.push(key); // some stay active
                    continue;
                }
                drop(t);
                let done = ctr_try(&c, &["snapshots", "--snapshotter", sn, "commit", &name, &key]);
                let mut t = told.lock().unwrap();
                if done.status.success() {
                    t.ok += 1;
                    t.committed.push(name);
                } else {
                    t.uncertain.push(key);
                }
            }
        });
        let ops = || told.lock().unwrap().ok;
        assert!(eventually(Duration::from_secs(60), || ops() >= 20), "the stream never got going");
        // Kill the daemon outright while calls are in flight, and start it again.
        let status = d.signal(rustix::process::Signal::KILL);
        assert!(!status.success());
        let before = ops();
        d.spawn();
        // containerd reconnects by itself after a short delay; the stream goes on.
        let resumed = eventually(Duration::from_secs(60), || ops() >= before + 20);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        stream.join().unwrap();
        assert!(
            resumed,
            "containerd did not go on after the restart:\n{}\n{}",
            c.log_tail(),
            d.log_tail()
        );
    });
    let told = told.into_inner().unwrap();
    eprintln!(
        "told: {} committed, {} active, {} commits cut short",
        told.committed.len(),
        told.active.len(),
        told.uncertain.len()
    );
    // Everything containerd was told exists is in wasnap: usage and mounts ask the
    // backend through the daemon.
    for name in &told.committed {
        ctr(&c, &d, &["snapshots", "--snapshotter", sn, "usage", name]);
    }
    for key in &told.active {
        ctr(&c, &d, &["snapshots", "--snapshotter", sn, "mounts", "/mnt", key]);
    }
    // containerd goes on: it removes all of it.
    for key in told.active.iter().chain(&told.committed) {
        ctr(&c, &d, &["snapshots", "--snapshotter", sn, "rm", key]);
    }
    for key in &told.uncertain {
        let _ = ctr_try(&c, &["snapshots", "--snapshotter", sn, "rm", key]);
    }
    let left = ctr(&c, &d, &["snapshots", "--snapshotter", sn, "ls"]);
    assert_eq!(left.lines().count(), 1, "only the header is left: {left}");
    // A call the kill cut short may have made a snapshot containerd never recorded;
    // containerd's collector removes what it does not know, and wasnap lets it.
    collect(&c, &d);
    let empty = eventually(Duration::from_secs(20), || d.keys(sn).is_empty());
    assert!(empty, "wasnap still holds {:?}\n{}", d.keys(sn), d.log_tail());
    drop(c);
    drop(d);
}
