//! WebAssembly plugins from the command line: inspect, compile, ls, `--plugin` and
//! `--policy` on every command, and the conformance suite against a guest.

use std::path::Path;
use std::process::{Command, Output};

use crate::common::*;

fn guest(name: &str) -> String {
    let p = wasnap_test_util::guests::path(name).unwrap_or_else(|e| panic!("{e}"));
    p.to_str().unwrap().to_owned()
}

fn run(root: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wasnap"))
        .arg("--root")
        .arg(root)
        .args(args)
        .env_remove("WASNAP_NAMESPACE")
        .env_remove("WASNAP_FAULTS")
        .env_remove("WASNAP_CONFIG")
        .output()
        .expect("run wasnap")
}

fn ok(root: &Path, args: &[&str]) -> String {
    let out = run(root, args);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn fails(root: &Path, args: &[&str]) -> (String, String) {
    let out = run(root, args);
    assert_eq!(out.status.code(), Some(1), "{args:?} should fail");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.starts_with("wasnap: ") && !err.contains("panicked"), "{err}");
    (String::from_utf8(out.stdout).unwrap(), err)
}

#[test]
fn inspect_says_what_a_plugin_is_and_whether_it_runs_here() {
    let dir = tmp();
    let out = ok(dir.path(), &["plugin", "inspect", &guest("copy")]);
    assert!(out.contains("backend (wasnap:snapshotter@0.2.0)"), "{out}");
    assert!(out.contains("runs here  yes"), "{out}");
    assert!(out.contains("wasnap:snapshotter/layers@0.2.0"), "{out}");
    assert!(out.contains("may        layers: make, clone and remove layers"), "{out}");
    assert!(out.contains("may        kv: its own transactional key-value store"), "{out}");
    let out = ok(dir.path(), &["plugin", "inspect", &guest("quota"), "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["role"], "policy");
    assert_eq!(v["compatible"], true);

    let (out, err) = fails(dir.path(), &["plugin", "inspect", &guest("wrong-version")]);
    assert!(out.contains("runs here  no"), "{out}");
    assert!(err.contains("built against wasnap:snapshotter@0.1.0"), "{err}");
    assert!(err.contains("this host speaks wasnap:snapshotter@0.2.0"), "{err}");
    let (_, err) = fails(dir.path(), &["plugin", "inspect", "/nonexistent.wasm"]);
    assert!(err.contains("no such file"), "{err}");
}

#[test]
fn compile_fills_the_cache_once() {
    let dir = tmp();
    let copy = guest("copy");
    assert!(ok(dir.path(), &["plugin", "compile", &copy]).contains("compiled"));
    assert!(ok(dir.path(), &["plugin", "compile", &copy]).contains("already cached"));
    let cached = std::fs::read_dir(dir.path().join("plugins/cache")).unwrap().count();
    assert_eq!(cached, 1);
}

#[test]
fn a_plugin_serves_the_snapshot_commands_and_policies_stand_in_front() {
    let dir = tmp();
    let r = dir.path();
    let copy = guest("copy");
    let mounts = ok(r, &["--plugin", &copy, "prepare", "a"]);
    assert!(mounts.contains("bind") && mounts.contains("snapshotters/copy"), "{mounts}");
    ok(r, &["--plugin", &copy, "commit", "c", "a"]);
    let ls = ok(r, &["--plugin", &copy, "ls"]);
    assert!(ls.contains("committed"), "{ls}");
    // The native driver's namespace of names is the same metadata, another snapshotter.
    assert!(!ok(r, &["ls"]).contains("committed"));
    // A plugin may not take over a configured snapshotter's name (and directory).
    let clash = r.join("native.wasm");
    std::fs::copy(&copy, &clash).unwrap();
    let (_, err) = fails(r, &["--plugin", clash.to_str().unwrap(), "ls"]);
    assert!(err.contains("already configured"), "{err}");

    // A policy from the command line, configured by a file: quota allows one active.
    let config = r.join("wasnap.toml");
    std::fs::write(
        &config,
        format!(
            "default_snapshotter = \"copy\"\n[snapshotters.copy]\ndriver = \"wasm\"\npath = \"{copy}\"\n\
             [[snapshotters.copy.policies]]\npath = \"{}\"\nconfig = {{ max_active = 1 }}\n",
            guest("quota")
        ),
    )
    .unwrap();
    let c = config.to_str().unwrap();
    ok(r, &["--config", c, "prepare", "one"]);
    let (_, err) = fails(r, &["--config", c, "prepare", "two"]);
    assert!(err.contains("quota") && err.contains("failed precondition"), "{err}");
    ok(r, &["--config", c, "rm", "one"]);
    ok(r, &["--config", c, "prepare", "two"]);

    let ls = ok(r, &["--config", c, "plugin", "ls"]);
    assert!(ls.contains("backend") && ls.contains("policy") && ls.contains("calls"), "{ls}");
    let info = ok(r, &["--config", c, "info"]);
    assert!(info.contains("WebAssembly plugin") && info.contains("1 policy plugin"), "{info}");
}

#[test]
fn conformance_runs_against_a_plugin() {
    let dir = tmp();
    let out = ok(
        dir.path(),
        &["conformance", "--plugin", &guest("copy"), "--run", "Basic", "--run", "Walk"],
    );
    assert!(out.contains("plugin copy: 3 passed, 0 failed"), "{out}");
    let out = ok(
        dir.path(),
        &["conformance", "-s", "native", "--policy", &guest("label-policy"), "--run", "Update"],
    );
    assert!(out.contains("policy label_policy -> native"), "{out}");
}

/// What a new plugin author hit: the config `--plugin` cannot pass, backend keys in a
/// plugin's errors, a default snapshotter the file does not configure.
#[test]
fn a_plugin_author_gets_config_through_user_keys_back_and_a_hint() {
    let dir = tmp();
    let r = dir.path();
    // The configuration reaches init: this mode refuses to initialise, saying so.
    let adversary = guest("adversary");
    let (_, err) =
        fails(r, &["--plugin", &adversary, "--plugin-config", r#"{"mode": "bad-init"}"#, "ls"]);
    assert!(err.contains("mode bad-init always refuses"), "{err}");
    let (_, err) = fails(r, &["--plugin", &adversary, "--plugin-config", "{not json", "ls"]);
    assert!(err.contains("--plugin-config"), "{err}");
    let out = run(r, &["--plugin-config", "{}", "ls"]);
    assert_eq!(out.status.code(), Some(2), "--plugin-config needs --plugin");

    // Errors from a plugin name the user's key, never the backend's `<ns>/<seq>/<key>`.
    let copy = guest("copy");
    ok(r, &["--plugin", &copy, "prepare", "a"]);
    let (_, err) = fails(r, &["--plugin", &copy, "prepare", "a"]);
    assert!(err.contains("snapshot \"a\"") && err.contains("already exists"), "{err}");
    assert!(!err.contains("default/"), "{err}");
    let (_, err) = fails(r, &["--plugin", &copy, "commit", "c", "missing"]);
    assert!(err.contains("\"missing\"") && !err.contains("default/"), "{err}");

    // The SDK README's config: one snapshotter and no default_snapshotter means that
    // one; with two and a default that is neither, the error says what to set.
    let config = r.join("mine.toml");
    let mine = format!("[snapshotters.mine]\ndriver = \"wasm\"\npath = {copy:?}\n");
    std::fs::write(&config, &mine).unwrap();
    ok(r, &["--config", config.to_str().unwrap(), "prepare", "in-mine"]);
    let ls = ok(r, &["--config", config.to_str().unwrap(), "ls"]);
    assert!(ls.contains("in-mine"), "{ls}");
    let ls = ok(r, &["--plugin", &copy, "ls"]);
    assert!(!ls.contains("in-mine"), "the file's default is mine, not copy: {ls}");
    std::fs::write(&config, format!("{mine}[snapshotters.other]\ndriver = \"native\"\n")).unwrap();
    let (_, err) = fails(r, &["--config", config.to_str().unwrap(), "ls"]);
    assert!(err.contains(r#"is not one of the configured snapshotters (mine, other)"#), "{err}");
    assert!(err.contains(r#"set default_snapshotter = "mine""#), "{err}");

    let help = ok(r, &["--help"]);
    assert!(!help.contains("later"), "{help}");
    assert!(help.contains("--address"), "{help}");
}

/// The sha256 `wasnap plugin inspect` reports for `plugin`.
fn sha256_of(root: &Path, plugin: &str) -> String {
    let info = ok(root, &["plugin", "inspect", plugin, "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    v["sha256"].as_str().unwrap_or_else(|| panic!("no sha256 in {info}")).to_owned()
}

/// A configuration can pin a plugin's sha256: the right file loads, another is refused
/// naming both digests, and a pin that is not a sha256 is a configuration error.
#[test]
fn a_pinned_digest_loads_only_that_plugin() {
    let dir = tmp();
    let r = dir.path();
    let copy = guest("copy");
    let digest = sha256_of(r, &copy);
    assert_eq!(digest.len(), 64, "{digest}");
    let config = r.join("pinned.toml");
    let write = |pin: &str| {
        std::fs::write(
            &config,
            format!("[snapshotters.c]\ndriver = \"wasm\"\npath = {copy:?}\nsha256 = {pin:?}\n"),
        )
        .unwrap();
    };
    let c = config.to_str().unwrap();

    write(&format!("sha256:{}", digest.to_uppercase()));
    ok(r, &["--config", c, "prepare", "pinned"]);
    assert!(ok(r, &["--config", c, "ls"]).contains("pinned"));

    let other = "0".repeat(64);
    write(&other);
    let (_, err) = fails(r, &["--config", c, "ls"]);
    assert!(err.contains(&format!("its sha256 is {digest}")), "{err}");
    assert!(err.contains(&format!("the configuration pins {other}")), "{err}");
    assert!(err.contains("failed precondition"), "{err}");

    write("abc");
    let (_, err) = fails(r, &["--config", c, "ls"]);
    assert!(err.contains("is not 64 hex digits") && err.contains("invalid argument"), "{err}");
}

/// A new author's loop is three commands: `plugin new`, `plugin build`, `plugin test`,
/// and the scaffold passes the suite as it is, as a backend and as a policy.
#[test]
fn a_new_plugin_builds_and_passes_the_suite_in_three_commands() {
    let workspace = wasnap_test_util::guests::workspace_root();
    for world in ["backend", "policy"] {
        let dir = tmp();
        let krate = dir.path().join("my-plug");
        let created = ok(
            dir.path(),
            &["plugin", "new", "my-plug", "--world", world, "--dir", krate.to_str().unwrap()],
        );
        assert!(created.contains(&format!("created {world} plugin my-plug")), "{created}");
        for file in ["Cargo.toml", "src/lib.rs", "wasnap.toml", "README.md"] {
            assert!(krate.join(file).is_file(), "{world}: no {file}");
        }
        // A second `new` into the same place refuses rather than overwrite.
        let again = run(
            dir.path(),
            &["plugin", "new", "my-plug", "--world", world, "--dir", krate.to_str().unwrap()],
        );
        assert_eq!(again.status.code(), Some(1));

        // The workspace's lock file and its guests' target directory: the build reuses
        // what the workspace compiled instead of fetching and compiling it again.
        std::fs::copy(workspace.join("Cargo.lock"), krate.join("Cargo.lock")).unwrap();
        let in_crate = |args: &[&str]| {
            Command::new(env!("CARGO_BIN_EXE_wasnap"))
                .arg("--root")
                .arg(dir.path().join("root"))
                .args(args)
                .current_dir(&krate)
                .env("CARGO_TARGET_DIR", workspace.join("target/guests"))
                .env_remove("WASNAP_CONFIG")
                .output()
                .expect("run wasnap")
        };
        let built = in_crate(&["plugin", "build"]);
        let stderr = String::from_utf8_lossy(&built.stderr);
        assert!(built.status.success(), "{world}: build: {stderr}");
        let wasm = String::from_utf8(built.stdout).unwrap();
        assert!(wasm.trim_end().ends_with("my_plug.wasm"), "{wasm}");
        assert!(std::path::Path::new(wasm.trim_end()).is_file(), "{wasm}");

        let tested = in_crate(&["plugin", "test"]);
        let report = String::from_utf8_lossy(&tested.stdout);
        assert!(
            tested.status.success(),
            "{world}: {report}{}",
            String::from_utf8_lossy(&tested.stderr)
        );
        let summary =
            if world == "policy" { "policy my_plug -> native: " } else { "plugin my_plug: " };
        assert!(
            report.contains(summary) && report.contains(" passed, 0 failed, 0 skipped"),
            "{report}"
        );
    }
}

/// A plugin packaged as an OCI image layout (a directory, or its tar) installs back
/// byte for byte, pinned; a package whose component blob was changed is refused.
#[test]
fn a_packaged_plugin_installs_back_pinned_and_a_tampered_one_is_refused() {
    let dir = tmp();
    let r = dir.path();
    let copy = guest("copy");
    let digest = sha256_of(r, &copy);
    let layout = r.join("layout");
    let tarball = r.join("copy.tar");
    let packaged = ok(r, &["plugin", "package", &copy, "-o", layout.to_str().unwrap()]);
    assert!(packaged.contains(&digest), "{packaged}");
    ok(r, &["plugin", "package", &copy, "-o", tarball.to_str().unwrap(), "--ref", "v1"]);

    // The layout is an OCI image layout: a marker, an index naming one manifest whose
    // layer is the component.
    assert!(std::fs::read_to_string(layout.join("oci-layout")).unwrap().contains("1.0.0"));
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest_digest = index["manifests"][0]["digest"].as_str().unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(layout.join("blobs/sha256").join(&manifest_digest[7..])).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["layers"][0]["mediaType"], "application/wasm");
    assert_eq!(manifest["layers"][0]["digest"], format!("sha256:{digest}"));
    assert_eq!(manifest["annotations"]["dev.wasnap.plugin.world"], "backend");
    assert_eq!(manifest["annotations"]["dev.wasnap.plugin.wit"], "wasnap:snapshotter@0.2.0");

    let installed = r.join("plugins/installed").join(format!("{digest}.wasm"));
    for (source, reference) in [(&layout, "latest"), (&tarball, "v1")] {
        let _ = std::fs::remove_file(&installed);
        let out = ok(r, &["plugin", "install", source.to_str().unwrap(), "--ref", reference]);
        assert!(out.contains(&format!("sha256 = \"{digest}\"")), "{out}");
        assert_eq!(std::fs::read(&installed).unwrap(), std::fs::read(&copy).unwrap());
    }
    let (_, err) = fails(r, &["plugin", "install", tarball.to_str().unwrap(), "--ref", "nope"]);
    assert!(err.contains("no manifest nope"), "{err}");

    // What install prints is a configuration that loads.
    let config = r.join("installed.toml");
    std::fs::write(
        &config,
        format!(
            "[snapshotters.c]\ndriver = \"wasm\"\npath = {:?}\nsha256 = \"{digest}\"\n",
            installed.to_str().unwrap()
        ),
    )
    .unwrap();
    ok(r, &["--config", config.to_str().unwrap(), "prepare", "from-a-package"]);

    // One byte of the component changed: its digest no longer matches the manifest.
    let blob = layout.join("blobs/sha256").join(&digest);
    let mut bytes = std::fs::read(&blob).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&blob, bytes).unwrap();
    let (_, err) = fails(r, &["plugin", "install", layout.to_str().unwrap()]);
    assert!(err.contains("damaged or was tampered with") && err.contains(&digest), "{err}");
}
