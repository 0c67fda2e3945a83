//! The CLI through a daemon (`--address`): the same commands give the same output as
//! embedded, errors stay one typed line, and the daemon's life: a second one on the
//! same root is refused, SIGTERM stops it cleanly, a restart serves the same snapshots.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use wasnap_test_util::process::DaemonProcess;

use crate::common::tmp;

/// A process this test started: killed by its pid and reaped when dropped, so that
/// nothing outlives a failing or hanging test.
struct Proc(Option<Child>);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `wasnap ARGS` with `envs` set, for at most two minutes.
pub(crate) fn wasnap_env(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_wasnap"))
        .args(args)
        .env_remove("WASNAP_NAMESPACE")
        .env_remove("WASNAP_ROOT")
        .env_remove("WASNAP_ADDRESS")
        .env_remove("WASNAP_CONFIG")
        .env_remove("WASNAP_SNAPSHOTTER")
        .env_remove("WASNAP_LEASE")
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut proc = Proc(Some(child));
    let child = proc.0.as_mut().unwrap();
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "{args:?} did not finish");
        std::thread::sleep(Duration::from_millis(5));
    };
    Output { status, stdout: stdout.join().unwrap(), stderr: stderr.join().unwrap() }
}

pub(crate) fn wasnap(args: &[&str]) -> Output {
    wasnap_env(args, &[])
}

pub(crate) fn ok(args: &[&str]) -> String {
    let out = wasnap(args);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// A failure: exit status 1 and one line `wasnap: ...` on stderr; returns that line.
pub(crate) fn fails(args: &[&str]) -> String {
    let out = wasnap(args);
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1), "{args:?} should fail: {err}");
    assert!(err.starts_with("wasnap: ") && err.lines().count() == 1, "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err.trim_end().to_owned()
}

pub(crate) const CONFIG: &str =
    "default_snapshotter = \"native\"\n[snapshotters.native]\ndriver = \"native\"\n";

pub(crate) fn daemon(dir: &Path) -> DaemonProcess {
    daemon_with(dir, CONFIG)
}

fn daemon_with(dir: &Path, config: &str) -> DaemonProcess {
    DaemonProcess::start(Path::new(env!("CARGO_BIN_EXE_wasnap")), dir, config).unwrap()
}

/// Output with what legitimately differs between two roots masked: the root's path,
/// times, and the sequence numbers in backend keys (each process that opens a root
/// reserves a block of them).
pub(crate) fn masked(text: &str, root: &Path) -> String {
    let times = regex::Regex::new(
        r"\d{4}-\d\d-\d\dT[0-9:.]+Z|\d+(\.\d+)? (µs|ms)|\d+\.\d+(e-?\d+)?|\{\s*\x22secs\x22[^}]*\}",
    )
    .unwrap();
    let text = text.replace(&root.display().to_string(), "<root>");
    let seq = regex::Regex::new(r"/\d+/").unwrap();
    let text = seq.replace_all(&text, "/<n>/");
    // Drivers number their snapshots' directories from blocks each process reserves.
    let ids = regex::Regex::new(r"snapshots/\d+").unwrap();
    let text = ids.replace_all(&text, "snapshots/<id>");
    // Tables pad to the longest cell: squeeze runs of spaces.
    let spaces = regex::Regex::new(r" {2,}").unwrap();
    spaces.replace_all(&times.replace_all(&text, "<t>"), "  ").into_owned()
}

/// Runs `script` in `format`, embedded on a fresh root and through a daemon on
/// another, both configured by `config`, and asserts that exit status, stdout and
/// stderr agree (masked). Returns the daemon (with its directories) for more checks.
fn same_both_ways(script: &[&[&str]], config: &str, format: &str) -> (DaemonProcess, TempDir) {
    let (embedded, remote) = (tmp(), tmp());
    let d = daemon_with(remote.path(), config);
    let config_path = embedded.path().join("wasnap.toml");
    std::fs::write(&config_path, config).unwrap();
    let (root, config_s) = (embedded.path().to_str().unwrap(), config_path.to_str().unwrap());
    let sock = d.socket().to_str().unwrap();
    for args in script {
        let mut local = vec!["--root", root, "--config", config_s, "--format", format];
        let mut through = vec!["--address", sock, "--format", format];
        local.extend_from_slice(args);
        through.extend_from_slice(args);
        let (a, b) = (wasnap(&local), wasnap(&through));
        let what = format!("{args:?} --format {format}");
        assert_eq!(a.status.code(), b.status.code(), "{what}: {a:?} {b:?}");
        let text = |s: &[u8], r: &Path| masked(&String::from_utf8_lossy(s), r);
        assert_eq!(
            text(&a.stdout, embedded.path()),
            text(&b.stdout, d.root()),
            "{what}: stdout embedded and through the daemon differ"
        );
        assert_eq!(
            text(&a.stderr, embedded.path()),
            text(&b.stderr, d.root()),
            "{what}: stderr embedded and through the daemon differ"
        );
    }
    (d, remote)
}

#[test]
fn every_command_gives_the_same_output_through_the_daemon() {
    let script: &[&[&str]] = &[
        &["prepare", "a", "-l", "k=v"],
        &["commit", "c", "a"],
        &["prepare", "b", "c"],
        &["view", "v", "c"],
        &["label", "c", "x=1", "k="],
        &["stat", "c"],
        &["ls"],
        &["ls", "--filter", "kind==active"],
        &["ls", "--filter", "labels.x==1", "--filter", "name==v"],
        &["tree"],
        &["usage"],
        &["usage", "c"],
        &["mounts", "b"],
        &["-s", "native", "mounts", "v"],
        &["lease", "create", "--id", "L1", "-l", "a=b"],
        &["lease", "ls"],
        &["lease", "ls", "--filter", "labels.a==b"],
        &["lease", "add", "L1", "c"],
        &["lease", "resources", "L1"],
        &["lease", "remove", "L1", "c"],
        &["--lease", "L1", "prepare", "held"],
        &["--lease", "L1", "commit", "c-held", "held"],
        &["lease", "resources", "L1"],
        &["lease", "rm", "--sync", "L1"],
        &["gc", "--dry-run"],
        &["gc", "--check"],
        &["-n", "other", "prepare", "o"],
        &["-n", "other", "ls"],
        &["info"],
        // Errors: the same one typed line either way.
        &["stat", "missing"],
        &["prepare", "b"],
        &["view", "v2", "b"],
        &["commit", "x", "missing"],
        &["rm", "m1", "m2"],
        &["rm", "c"],
        &["label", "c"],
        &["label", "c", "novalue"],
        &["ls", "--filter", "kind=="],
        &["lease", "rm", "nope"],
        &["lease", "add", "nope", "c"],
        &["-n", "bad/ns", "ls"],
        &["usage", "missing"],
        &["rm", "b", "v"],
    ];
    for format in ["table", "json"] {
        same_both_ways(script, CONFIG, format);
    }
}

#[test]
fn cleanup_through_the_daemon_prints_nothing_and_succeeds() {
    // The Cleanup RPC answers with nothing, so the client cannot show what went (the
    // daemon logs it); it prints nothing rather than an empty report it cannot vouch for.
    let dir = tmp();
    let d = daemon(dir.path());
    let sock = d.socket().to_str().unwrap();
    ok(&["--address", sock, "prepare", "a"]);
    assert_eq!(ok(&["--address", sock, "cleanup"]), "");
    assert_eq!(ok(&["--address", sock, "--format", "json", "cleanup"]), "");
    assert!(ok(&["--address", sock, "gc", "--check"]).contains("0 problems in 1 snapshotters"));
    assert!(ok(&["--address", sock, "ls"]).contains("a"));
}

#[test]
fn errors_through_the_daemon_are_one_typed_line() {
    let dir = tmp();
    let d = daemon(dir.path());
    let sock = d.socket().to_str().unwrap();
    assert_eq!(
        fails(&["--address", sock, "stat", "missing"]),
        "wasnap: snapshot \"missing\": not found"
    );
    // Flags that configure a root here are refused with --address, not ignored.
    for flags in [
        &["--root", "/x"][..],
        &["--config", "/x.toml"],
        &["--plugin", "/x.wasm"],
        &["--policy", "/x.wasm"],
    ] {
        let err = fails(&[&["--address", sock][..], flags, &["ls"]].concat());
        assert!(err.contains(flags[0]) && err.ends_with("invalid argument"), "{err}");
    }
    let out = wasnap_env(&["--address", sock, "ls"], &[("WASNAP_ROOT", "/x")]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("WASNAP_ROOT"), "{out:?}");
    let err = fails(&["--address", sock, "plugin", "compile", "/x.wasm"]);
    assert!(err.ends_with("invalid argument"), "{err}");
    // No daemon: unavailable, naming the socket.
    for cmd in ["ls", "status"] {
        let err = fails(&["--address", "/nonexistent/wasnap.sock", cmd]);
        assert!(err.contains("no wasnap daemon answers at /nonexistent/wasnap.sock"), "{err}");
        assert!(err.ends_with("unavailable"), "{err}");
    }
    // `status` without --address asks the default socket.
    if !Path::new(wasnap::config::DEFAULT_SOCKET).exists() {
        let err = fails(&["status"]);
        assert!(err.contains(wasnap::config::DEFAULT_SOCKET), "{err}");
    }
}

#[test]
fn wasnap_address_in_the_environment_selects_the_daemon() {
    let dir = tmp();
    let d = daemon(dir.path());
    let sock = d.socket().to_str().unwrap();
    let env = [("WASNAP_ADDRESS", sock)];
    assert!(wasnap_env(&["prepare", "from-env"], &env).status.success());
    let out = wasnap_env(&["ls"], &env);
    assert!(String::from_utf8_lossy(&out.stdout).contains("from-env"), "{out:?}");
    assert!(ok(&["--address", sock, "ls"]).contains("from-env"));
    let out = wasnap_env(&["status"], &env);
    assert!(String::from_utf8_lossy(&out.stdout).contains(sock), "{out:?}");
}

/// The daemon raises its soft limit on open files to the hard one, as Go's runtime
/// does for containerd: started under a soft limit of 256, it runs under the hard one.
#[test]
fn the_daemon_raises_its_open_file_limit() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tmp();
    let script = dir.path().join("low-limit");
    let exe = env!("CARGO_BIN_EXE_wasnap");
    std::fs::write(&script, format!("#!/bin/sh\nulimit -Sn 256\nexec '{exe}' \"$@\"\n")).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let d = DaemonProcess::start(&script, dir.path(), CONFIG).unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", d.pid().unwrap())).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (soft, hard) = (fields[3], fields[4]);
    assert_eq!(soft, hard, "{line}");
    assert_ne!(soft, "256", "{line}");
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
    assert!(text.contains(sock) && text.contains(&d.root().display().to_string()), "{text}");
    assert!(text.contains("requests  ") && text.contains("(1 failed, "), "{text}");
    assert!(text.contains(" each on average"), "{text}");
    assert!(text.contains("database  ") && text.contains(" commits ("), "{text}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["--address", sock, "--format", "json", "status"])).unwrap();
    // The root database's commits: the prepare's at least, each synced, none carrying
    // less than one operation.
    let db = &json["database"];
    let (commits, synced) = (db["commits"].as_u64().unwrap(), db["durable_commits"].as_u64());
    assert!(commits >= 1 && synced == Some(commits), "{json}");
    assert!(db["operations"].as_u64().unwrap() >= commits, "{json}");
    let busy = json["busy_micros"].as_u64().unwrap();
    assert!(busy > 0, "the calls so far took time: {json}");
    // One call at a time to a driver of the host's own: each ran on the worker that
    // received it.
    let in_place = json["served_in_place"].as_u64().unwrap();
    assert!(in_place >= 2, "{json}");
    ok(&["--address", sock, "prepare", "b"]);
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["--address", sock, "--format", "json", "status"])).unwrap();
    assert_eq!(json["database"]["commits"].as_u64(), Some(commits + 1), "a prepare is one commit");
    assert!(json["requests"].as_u64().unwrap() >= 2, "{json}");
    assert!(json["busy_micros"].as_u64().unwrap() > busy, "the prepare's time counts: {json}");
    assert!(json["served_in_place"].as_u64().unwrap() > in_place, "{json}");
    assert_eq!(json["failed_requests"], 1, "{json}");
    assert_eq!(json["root"], d.root().display().to_string());
    assert_eq!(json["socket"], sock);
    assert!(json["pid"].as_u64().unwrap() > 0);
    assert_eq!(json["snapshotters"][0]["name"], "native");
    assert_eq!(json["plugins"], serde_json::json!([]));
}

/// The path of test guest `name`'s `.wasm`, built on demand.
fn guest(name: &str) -> String {
    let p = wasnap_test_util::guests::path(name).unwrap_or_else(|e| panic!("{e}"));
    p.to_str().unwrap().to_owned()
}

/// A plugin's call alone in flight runs on the worker that received it, once that has
/// handed its share of the runtime over, and the guest's WASI works there: wasmtime
/// blocks on the runtime for a guest's output, which panics on a worker still holding
/// its share. The `chaos` policy writes a line to stderr, then traps, in every prepare.
#[test]
fn a_plugins_call_alone_hands_the_worker_over_and_its_wasi_output_works() {
    let config = format!(
        "default_snapshotter = \"copy\"\n[snapshotters.copy]\ndriver = \"wasm\"\npath = \"{}\"\n\
         [[snapshotters.copy.policies]]\npath = \"{}\"\n\
         config = {{ percent = 100, calls = [\"prepare\"], faults = [\"trap\"], when = \"before\" }}\n",
        guest("copy"),
        guest("chaos")
    );
    let dir = tmp();
    let d = daemon_with(dir.path(), &config);
    let sock = d.socket().to_str().unwrap();
    let out = wasnap(&["--address", sock, "prepare", "doomed"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    // The guest's own panic, with what it wrote before (a panic of the host's instead
    // would read "Prepare panicked", with nothing the guest wrote).
    assert!(
        err.starts_with(
            "wasnap: plugin \"chaos\": prepare: panicked; it wrote: chaos: dying of trap"
        ),
        "{err}"
    );
    let log = d.log_tail();
    assert!(
        log.contains("INFO wasnap::plugin::output: chaos: dying of trap in prepare"),
        "the guest's stderr reached the log: {log}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["--address", sock, "--format", "json", "status"])).unwrap();
    assert_eq!(json["served_in_place"], 0, "{json}");
    assert_eq!(json["served_handing_over"], 1, "the prepare: {json}");
    assert!(ok(&["--address", sock, "ls"]).lines().all(|l| !l.contains("doomed")));
}

#[test]
fn status_and_plugin_ls_show_the_daemons_plugins() {
    let config = format!(
        "default_snapshotter = \"copy\"\n[snapshotters.copy]\ndriver = \"wasm\"\npath = \"{}\"\n\
         [[snapshotters.copy.policies]]\npath = \"{}\"\nconfig = {{ max_active = 1 }}\n",
        guest("copy"),
        guest("quota")
    );
    // The policy's refusal is the same error either way.
    let script: &[&[&str]] = &[&["prepare", "one"], &["prepare", "two"], &["ls"], &["rm", "one"]];
    same_both_ways(script, &config, "json");
    let (d, _dir) = same_both_ways(script, &config, "table");

    let sock = d.socket().to_str().unwrap();
    let text = ok(&["--address", sock, "status"]);
    for want in ["copy (default)", "wasm", "backend", "policy", "MEAN", "quota.wasm"] {
        assert!(text.contains(want), "{want}: {text}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["--address", sock, "--format", "json", "status"])).unwrap();
    let plugins = json["plugins"].as_array().unwrap();
    assert_eq!(plugins.len(), 2, "{json}");
    // A plugin's calls, one at a time, run on the async worker that received them only
    // once it has handed its share of the runtime over (WASI blocks on the runtime).
    assert_eq!(json["served_in_place"], 0, "{json}");
    assert!(json["served_handing_over"].as_u64().unwrap() >= 3, "{json}");
    for p in plugins {
        assert!(p["counters"]["calls"].as_u64().unwrap() > 0, "{p}");
        assert!(p["counters"]["busy_micros"].as_u64().is_some(), "{p}");
    }
    // The policy refused `prepare two`.
    let policy = plugins.iter().find(|p| p["role"] == "policy").unwrap();
    assert!(policy["counters"]["errors"].as_u64().unwrap() >= 1, "{json}");
    let ls = ok(&["--address", sock, "plugin", "ls"]);
    assert!(ls.contains("COUNTERS (DAEMON)") && ls.contains("calls "), "{ls}");
    let ls: serde_json::Value =
        serde_json::from_str(&ok(&["--address", sock, "--format", "json", "plugin", "ls"]))
            .unwrap();
    assert_eq!(ls, json["plugins"], "plugin ls and status show a plugin alike");
}

#[test]
fn mount_through_the_daemon_mounts_here() {
    crate::require_root!();
    let dir = tmp();
    let d = daemon(dir.path());
    let sock = d.socket().to_str().unwrap();
    let (rw, ro) = (dir.path().join("rw"), dir.path().join("ro"));
    std::fs::create_dir_all(&rw).unwrap();
    std::fs::create_dir_all(&ro).unwrap();
    let (rw_s, ro_s) = (rw.to_str().unwrap(), ro.to_str().unwrap());
    ok(&["--address", sock, "prepare", "a"]);
    ok(&["--address", sock, "mount", "a", rw_s]);
    std::fs::write(rw.join("hello"), "from the client").unwrap();
    ok(&["--address", sock, "unmount", rw_s]);
    assert!(!rw.join("hello").exists(), "unmounted");
    ok(&["--address", sock, "commit", "c", "a"]);
    ok(&["--address", sock, "view", "v", "c"]);
    ok(&["--address", sock, "mount", "v", ro_s]);
    let read = std::fs::read_to_string(ro.join("hello"));
    ok(&["unmount", ro_s]);
    assert_eq!(read.unwrap(), "from the client");
    let err = fails(&["--address", sock, "mount", "missing", ro_s]);
    assert!(err.ends_with("not found"), "{err}");
}

#[test]
fn one_daemon_per_root_sigterm_stops_it_and_a_restart_serves_the_same_snapshots() {
    let dir = tmp();
    let mut d = daemon(dir.path());
    let sock = d.socket().to_str().unwrap().to_owned();
    ok(&["--address", &sock, "prepare", "kept"]);
    ok(&["--address", &sock, "commit", "kept-c", "kept"]);
    // A second daemon on the same root is refused, clearly, before it touches the socket.
    let other_sock = dir.path().join("other.sock");
    let second = wasnap(&[
        "--root",
        d.root().to_str().unwrap(),
        "daemon",
        "--socket",
        other_sock.to_str().unwrap(),
    ]);
    assert_eq!(second.status.code(), Some(1));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("in use by another process"), "{err}");
    assert!(!other_sock.exists(), "the refused daemon left no socket");
    // And a second daemon on the same socket (another root) too.
    let other = tmp();
    let third = wasnap(&["--root", other.path().to_str().unwrap(), "daemon", "--socket", &sock]);
    assert_eq!(third.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&third.stderr).contains("another daemon is serving"));
    // The first one still serves.
    assert!(ok(&["--address", &sock, "ls"]).contains("kept-c"));

    let before = ok(&["--address", &sock, "--format", "json", "stat", "kept-c"]);
    let started = Instant::now();
    let status = d.signal(rustix::process::Signal::TERM).unwrap();
    assert!(status.success(), "SIGTERM exits 0: {status}\n{}", d.log_tail());
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    assert!(!d.socket().exists(), "the socket is gone");
    assert!(d.log_tail().contains("stopped"), "{}", d.log_tail());
    let err = fails(&["--address", &sock, "ls"]);
    assert!(err.ends_with("unavailable"), "{err}");
    d.spawn().unwrap();
    assert_eq!(ok(&["--address", &sock, "--format", "json", "stat", "kept-c"]), before);
    assert!(ok(&["--address", &sock, "ls"]).contains("kept-c"));
}

/// `wasm` with a custom section appended: the same plugin under another digest.
fn variant(wasm: &[u8], tag: &str) -> Vec<u8> {
    let mut body = vec![4u8];
    body.extend_from_slice(b"test");
    body.extend_from_slice(tag.as_bytes());
    let mut out = wasm.to_vec();
    out.extend_from_slice(&[0, body.len() as u8]);
    out.extend_from_slice(&body);
    out
}

fn deploy(path: &Path, bytes: &[u8]) {
    let new = path.with_extension("new");
    std::fs::write(&new, bytes).unwrap();
    std::fs::rename(&new, path).unwrap();
}

fn status_plugin(sock: &str) -> serde_json::Value {
    let status: serde_json::Value =
        serde_json::from_str(&ok(&["--address", sock, "--format", "json", "status"])).unwrap();
    status["plugins"][0].clone()
}

#[test]
fn plugin_reload_and_sighup_swap_a_plugin_and_a_broken_one_keeps_the_old_serving() {
    let dir = tmp();
    let wasm = std::fs::read(wasnap_test_util::guests::path("copy").unwrap()).unwrap();
    let plugin = dir.path().join("copy.wasm");
    deploy(&plugin, &variant(&wasm, "1"));
    let config = format!(
        "default_snapshotter = \"c\"\n[snapshotters.c]\ndriver = \"wasm\"\npath = {:?}\n",
        plugin.display().to_string()
    );
    let d = daemon_with(dir.path(), &config);
    let sock = d.socket().to_str().unwrap().to_owned();
    ok(&["--address", &sock, "prepare", "before"]);
    let first = status_plugin(&sock);
    let digest = first["sha256"].as_str().unwrap().to_owned();
    assert_eq!(first["id"], "c");
    assert_eq!(first["reloads"], 0);
    assert!(first["reload_error"].is_null(), "{first}");

    let out = ok(&["--address", &sock, "plugin", "reload"]);
    assert!(out.contains("unchanged"), "{out}");

    // A new version, by `plugin reload`.
    deploy(&plugin, &variant(&wasm, "2"));
    let out = ok(&["--address", &sock, "plugin", "reload", "c"]);
    assert!(out.contains(&format!("reloaded: sha256:{}", &digest[..12])), "{out}");
    let second = status_plugin(&sock);
    assert_ne!(second["sha256"], first["sha256"]);
    assert_eq!(second["reloads"], 1);
    ok(&["--address", &sock, "commit", "before-c", "before"]);

    // A broken one, by SIGHUP: the reload is reported in status, the old one serves.
    deploy(&plugin, b"\0asm\x0d\0\x01\0not a component");
    d.send(rustix::process::Signal::HUP).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let failed = loop {
        let p = status_plugin(&sock);
        if !p["reload_error"].is_null() {
            break p;
        }
        assert!(Instant::now() < deadline, "no reload after SIGHUP:\n{}", d.log_tail());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(failed["sha256"], second["sha256"], "the old version serves");
    let why = failed["reload_error"]["error"].as_str().unwrap();
    assert!(why.contains("compile plugin"), "{why}");
    assert!(d.log_tail().contains("reload failed"), "{}", d.log_tail());
    let table = ok(&["--address", &sock, "status"]);
    assert!(table.contains("failed, the version above keeps serving"), "{table}");
    ok(&["--address", &sock, "view", "v", "before-c"]);
    let err = fails(&["--address", &sock, "plugin", "reload"]);
    assert!(err.contains("1 plugin(s) failed to reload"), "{err}");
    let err = fails(&["--address", &sock, "plugin", "reload", "nope"]);
    assert!(err.contains("configured: c"), "{err}");
}
