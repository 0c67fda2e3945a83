//! The CLI through a daemon (`--address`): the same commands give the same output as
//! embedded, errors stay one typed line, and the daemon's life: a second one on the
//! same root is refused, SIGTERM stops it cleanly, a restart serves the same snapshots.

use std::path::Path;
use std::process::{Command, Output};

use wasnap_daemon::process::DaemonProcess;

use crate::common::tmp;

fn wasnap(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wasnap"))
        .args(args)
        .env_remove("WASNAP_NAMESPACE")
        .env_remove("WASNAP_ROOT")
        .env_remove("WASNAP_ADDRESS")
        .env_remove("WASNAP_CONFIG")
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = wasnap(args);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

const CONFIG: &str =
    "default_snapshotter = \"native\"\n[snapshotters.native]\ndriver = \"native\"\n";

fn daemon(dir: &Path) -> DaemonProcess {
    DaemonProcess::start(Path::new(env!("CARGO_BIN_EXE_wasnap")), dir, CONFIG).unwrap()
}

/// Output with what legitimately differs between two roots masked: the root's path,
/// times, and the sequence numbers in backend keys (each process that opens a root
/// reserves a block of them).
fn masked(text: &str, root: &Path) -> String {
    let times = regex::Regex::new(
        r"\d{4}-\d\d-\d\dT[0-9:.]+Z|\d+(\.\d+)? (µs|ms)|\d+\.\d+(e-?\d+)?|\{\s*\x22secs\x22[^}]*\}",
    )
    .unwrap();
    let text = text.replace(&root.display().to_string(), "<root>");
    let seq = regex::Regex::new(r"/\d+/").unwrap();
    let text = seq.replace_all(&text, "/<n>/");
    // Tables pad to the longest cell: squeeze runs of spaces.
    let spaces = regex::Regex::new(r" {2,}").unwrap();
    spaces.replace_all(&times.replace_all(&text, "<t>"), "  ").into_owned()
}

#[test]
fn every_command_gives_the_same_output_through_the_daemon() {
    let (embedded, remote) = (tmp(), tmp());
    let d = daemon(remote.path());
    let sock = d.socket().to_str().unwrap().to_owned();
    let root = embedded.path().to_str().unwrap().to_owned();
    let config = embedded.path().join("wasnap.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let config = config.to_str().unwrap().to_owned();
    let script: &[&[&str]] = &[
        &["prepare", "a", "-l", "k=v"],
        &["commit", "c", "a"],
        &["prepare", "b", "c"],
        &["view", "v", "c"],
        &["label", "c", "x=1", "k="],
        &["stat", "c"],
        &["ls"],
        &["ls", "--filter", "kind==active"],
        &["tree"],
        &["usage"],
        &["usage", "c"],
        &["mounts", "b"],
        &["lease", "create", "--id", "L1", "-l", "a=b"],
        &["lease", "ls"],
        &["lease", "add", "L1", "c"],
        &["lease", "resources", "L1"],
        &["lease", "remove", "L1", "c"],
        &["--lease", "L1", "prepare", "held"],
        &["lease", "rm", "--sync", "L1"],
        &["gc", "--dry-run"],
        &["gc", "--check"],
        &["rm", "b", "v"],
        &["-n", "other", "ls"],
        &["info"],
    ];
    for args in script {
        for format in ["table", "json"] {
            let mut local = vec!["--root", &root, "--config", &config, "--format", format];
            let mut through = vec!["--address", sock.as_str(), "--format", format];
            local.extend_from_slice(args);
            through.extend_from_slice(args);
            let (a, b) = (wasnap(&local), wasnap(&through));
            assert_eq!(a.status.code(), b.status.code(), "{args:?}: {a:?} {b:?}");
            let text = |o: &Output, r: &Path| masked(&String::from_utf8_lossy(&o.stdout), r);
            assert_eq!(
                text(&a, embedded.path()),
                text(&b, d.root()),
                "{args:?} --format {format}: embedded and through the daemon differ"
            );
        }
    }
}

#[test]
fn errors_through_the_daemon_are_one_typed_line() {
    let dir = tmp();
    let d = daemon(dir.path());
    let sock = d.socket().to_str().unwrap();
    let out = wasnap(&["--address", sock, "stat", "missing"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("wasnap: ") && err.trim_end().ends_with("not found"), "{err}");
    let out = wasnap(&["--address", sock, "--root", "/x", "ls"]);
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("--root") && err.contains("invalid argument"), "{err}");
    let out = wasnap(&["--address", "/nonexistent/wasnap.sock", "ls"]);
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("no wasnap daemon answers at /nonexistent/wasnap.sock"), "{err}");
    assert!(err.trim_end().ends_with("unavailable"), "{err}");
}

#[test]
fn status_shows_the_daemon_and_its_counters() {
    let dir = tmp();
    let d = daemon(dir.path());
    let sock = d.socket().to_str().unwrap();
    ok(&["--address", sock, "prepare", "a"]);
    let _ = wasnap(&["--address", sock, "stat", "missing"]);
    let text = ok(&["--address", sock, "status"]);
    assert!(text.contains("native (default)") && text.contains("open"), "{text}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["--address", sock, "--format", "json", "status"])).unwrap();
    assert!(json["requests"].as_u64().unwrap() >= 3, "{json}");
    assert!(json["failed_requests"].as_u64().unwrap() >= 1, "{json}");
    assert_eq!(json["root"], d.root().display().to_string());
}

#[test]
fn one_daemon_per_root_sigterm_stops_it_and_a_restart_serves_the_same_snapshots() {
    let dir = tmp();
    let mut d = daemon(dir.path());
    let sock = d.socket().to_str().unwrap().to_owned();
    ok(&["--address", &sock, "prepare", "kept"]);
    // A second daemon on the same root is refused, clearly, before it touches the socket.
    let second = wasnap(&[
        "--root",
        d.root().to_str().unwrap(),
        "daemon",
        "--socket",
        dir.path().join("other.sock").to_str().unwrap(),
    ]);
    assert_eq!(second.status.code(), Some(1));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("in use by another process"), "{err}");
    // And a second daemon on the same socket (another root) too.
    let other = tmp();
    let third = wasnap(&["--root", other.path().to_str().unwrap(), "daemon", "--socket", &sock]);
    assert_eq!(third.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&third.stderr).contains("another daemon is serving"));

    let started = std::time::Instant::now();
    let status = d.signal(rustix::process::Signal::TERM).unwrap();
    assert!(status.success(), "SIGTERM exits 0: {status}\n{}", d.log_tail());
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert!(!d.socket().exists(), "the socket is gone");
    assert!(d.log_tail().contains("stopped"), "{}", d.log_tail());
    d.spawn().unwrap();
    assert!(ok(&["--address", &sock, "ls"]).contains("kept"));
}
