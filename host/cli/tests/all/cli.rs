//! The `wasnap` binary as a person uses it.

use std::path::Path;
use std::process::{Command, Output};

use crate::common::*;

fn run(root: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wasnap"))
        .arg("--root")
        .arg(root)
        .args(args)
        .env_remove("WASNAP_NAMESPACE")
        .env_remove("WASNAP_FAULTS")
        .output()
        .expect("run wasnap")
}

fn ok(root: &Path, args: &[&str]) -> String {
    let out = run(root, args);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command that must fail, returning its one-line error.
fn fails(root: &Path, args: &[&str]) -> String {
    let out = run(root, args);
    assert!(!out.status.success(), "{args:?} should fail");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "one clear line, no panic: {err}");
    assert!(err.starts_with("wasnap: "), "{err}");
    err
}

#[test]
fn the_ctr_style_workflow() {
    let dir = tmp();
    let r = dir.path();
    let mounts = ok(r, &["prepare", "layer-1-active"]);
    assert!(mounts.contains("bind") && mounts.contains("rbind,rw"), "{mounts}");
    ok(r, &["commit", "layer-1", "layer-1-active", "--label", "origin=test"]);
    ok(r, &["prepare", "container", "layer-1"]);
    ok(r, &["view", "inspect", "layer-1"]);

    let ls = ok(r, &["ls"]);
    assert_eq!(
        ls.lines().next().unwrap().split_whitespace().collect::<Vec<_>>(),
        ["KEY", "PARENT", "KIND"]
    );
    assert!(ls.contains("layer-1") && ls.contains("committed") && ls.contains("view"), "{ls}");
    assert_eq!(ok(r, &["ls", "--filter", "kind==committed"]).lines().count(), 2);

    let tree = ok(r, &["tree"]);
    assert!(
        tree.contains("\\_ layer-1 (committed)") && tree.contains("  \\_ container (active)"),
        "{tree}"
    );

    let labels = ok(r, &["label", "container", "a=1", "b=2"]);
    assert!(labels.contains('a') && labels.contains('b'), "{labels}");
    let labels = ok(r, &["label", "container", "a="]);
    assert!(!labels.lines().any(|l| l.starts_with("a ")), "k= removes: {labels}");

    let stat: serde_json::Value =
        serde_json::from_str(&ok(r, &["--format", "json", "stat", "container"])).unwrap();
    assert_eq!(stat["kind"], "active");
    assert_eq!(stat["parent"], "layer-1");
    assert_eq!(stat["labels"]["b"], "2");

    let usage: serde_json::Value =
        serde_json::from_str(&ok(r, &["--format", "json", "usage"])).unwrap();
    assert_eq!(usage.as_array().unwrap().len(), 3);

    let mounts: serde_json::Value =
        serde_json::from_str(&ok(r, &["--format", "json", "mounts", "inspect"])).unwrap();
    assert_eq!(mounts[0]["type"], "bind");
    assert_eq!(mounts[0]["options"], serde_json::json!(["rbind", "ro"]));

    // Namespaces are separate worlds.
    assert_eq!(ok(r, &["-n", "other", "ls"]).lines().count(), 1);
    ok(r, &["-n", "other", "prepare", "container"]);

    ok(r, &["rm", "container", "inspect"]);
    ok(r, &["rm", "layer-1"]);
    assert_eq!(ok(r, &["ls"]).lines().count(), 1);
}

#[test]
fn errors_are_one_line_and_typed() {
    let dir = tmp();
    let r = dir.path();
    ok(r, &["prepare", "a"]);
    ok(r, &["commit", "base", "a"]);
    ok(r, &["prepare", "child", "base"]);
    assert!(fails(r, &["stat", "missing"]).contains("not found"));
    assert!(fails(r, &["prepare", "child"]).contains("already exists"));
    assert!(fails(r, &["rm", "base"]).contains("failed precondition"));
    assert!(fails(r, &["ls", "--filter", "kind=="]).contains("invalid argument"));
    assert!(fails(r, &["-n", "no/slash", "ls"]).contains("invalid argument"));
    let long = format!("k={}", "v".repeat(5000));
    assert!(fails(r, &["label", "child", &long]).contains("greater than maximum size"));
    assert!(fails(r, &["label", "child", "novalue"]).contains("expected KEY=VALUE"));
    assert!(fails(r, &["-s", "nonesuch", "ls"]).contains("snapshotter \"nonesuch\""));
    // rm tries every key and reports failures, removing what it can.
    assert!(fails(r, &["rm", "missing", "child"]).contains("not found"));
    assert!(ok(r, &["ls"]).lines().all(|l| !l.starts_with("child")));
}

#[test]
fn mount_and_unmount_from_the_cli() {
    crate::require_root!();
    let dir = tmp();
    let r = dir.path();
    ok(r, &["prepare", "a"]);
    let target = r.join("mnt");
    std::fs::create_dir(&target).unwrap();
    ok(r, &["mount", "a", target.to_str().unwrap()]);
    let wrote = std::fs::write(target.join("hello"), "world");
    ok(r, &["unmount", target.to_str().unwrap()]);
    wrote.unwrap();
    assert!(!target.join("hello").exists(), "unmounted");
    ok(r, &["commit", "base", "a"]);
    ok(r, &["view", "v", "base"]);
    ok(r, &["mount", "v", target.to_str().unwrap()]);
    let read = std::fs::read_to_string(target.join("hello"));
    ok(r, &["unmount", target.to_str().unwrap()]);
    assert_eq!(read.unwrap(), "world");
}

#[test]
fn bench_smoke_prints_its_tables() {
    let out = Command::new(env!("CARGO_BIN_EXE_wasnap"))
        .args(["bench", "--smoke", "--sizes", "10"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("CYCLES/S") && text.contains("STAT P50") && text.contains("tmpfs"),
        "{text}"
    );
}

#[test]
fn conformance_lists_runs_and_reports_in_three_formats() {
    let dir = tmp();
    let list = ok(dir.path(), &["conformance", "--list"]);
    for case in ["Basic", "128LayersMount", "ConcurrentPrepares", "NamespaceIsolation"] {
        assert!(list.contains(case), "--list shows {case}:\n{list}");
    }
    let base = dir.path().to_str().unwrap();
    let table = ok(
        dir.path(),
        &["conformance", "--dir", base, "--run", "ErrorClasses", "--run", "labellimits"],
    );
    assert!(table.contains("ErrorClasses") && table.contains("LabelLimits"), "{table}");
    assert!(table.trim_end().ends_with("native: 2 passed, 0 failed, 0 skipped"), "{table}");
    let json: serde_json::Value = serde_json::from_str(&ok(
        dir.path(),
        &["--format", "json", "conformance", "--dir", base, "--run", "Filters"],
    ))
    .unwrap();
    assert_eq!(json["passed"], 1);
    assert_eq!(json["cases"][0]["name"], "Filters");
    let xml =
        ok(dir.path(), &["--format", "junit", "conformance", "--dir", base, "--run", "Filters"]);
    assert!(
        xml.contains("<testsuite name=\"native\"") && xml.contains("name=\"Filters\""),
        "{xml}"
    );
    assert!(
        fails(dir.path(), &["conformance", "--run", "no-such-case"]).contains("no case matches")
    );
    assert!(fails(dir.path(), &["--format", "junit", "ls"]).contains("junit"));
}

#[test]
fn conformance_passes_for_overlay_and_btrfs() {
    crate::require_root!();
    let dir = tmp();
    for driver in ["overlay", "btrfs"] {
        // btrfs makes its own scratch btrfs on a loop device: /dev/shm is not btrfs.
        let report = ok(
            dir.path(),
            &["conformance", "--driver", driver, "--dir", dir.path().to_str().unwrap()],
        );
        let last = report.trim_end().lines().last().unwrap();
        assert!(
            last.starts_with(&format!("{driver}: ")) && last.contains(" 0 failed, 0 skipped"),
            "{report}"
        );
    }
}

#[test]
fn a_config_file_names_snapshotters_their_drivers_and_options() {
    let dir = tmp();
    let r = dir.path();
    let config = r.join("wasnap.toml");
    std::fs::write(
        &config,
        "default_snapshotter = \"fast\"\n[snapshotters.fast]\ndriver = \"overlay\"\nvolatile = true\n\
         [snapshotters.plain]\ndriver = \"native\"\n",
    )
    .unwrap();
    let c = config.to_str().unwrap();
    ok(r, &["--config", c, "prepare", "a"]);
    ok(r, &["--config", c, "commit", "base", "a"]);
    let mounts = ok(r, &["--config", c, "--format", "json", "prepare", "b", "base"]);
    assert!(
        mounts.contains("overlay") && mounts.contains("volatile"),
        "the default is the configured overlay: {mounts}"
    );
    assert_eq!(
        ok(r, &["--config", c, "-s", "plain", "ls"]).lines().count(),
        1,
        "each snapshotter is its own world"
    );
    assert!(fails(r, &["--config", c, "-s", "native", "ls"]).contains("configured: fast, plain"));
    std::fs::write(&config, "[snapshotters.x]\ndriver = \"overlay\"\nvolatil = true\n").unwrap();
    assert!(fails(r, &["--config", c, "ls"]).contains("volatil"));
}

#[test]
fn leases_and_collections_from_the_cli() {
    let dir = tmp();
    let r = dir.path();
    let generated = ok(r, &["lease", "create", "-l", "purpose=pull"]);
    assert!(!generated.trim().is_empty());
    ok(r, &["lease", "create", "--id", "pull", "--expire", "1h"]);
    assert!(fails(r, &["lease", "create", "--id", "pull"]).contains("already exists"));
    ok(r, &["--lease", "pull", "prepare", "extract"]);
    ok(r, &["--lease", "pull", "commit", "layer", "extract"]);
    ok(r, &["prepare", "mine"]);
    let res = ok(r, &["lease", "resources", "pull"]);
    assert!(
        res.contains("snapshots/native") && res.contains("layer") && !res.contains("extract"),
        "{res}"
    );
    let ls: serde_json::Value =
        serde_json::from_str(&ok(r, &["--format", "json", "lease", "ls", "--filter", "id==pull"]))
            .unwrap();
    assert_eq!(ls.as_array().unwrap().len(), 1);
    assert!(ls[0]["labels"]["containerd.io/gc.expire"].is_string());
    assert!(fails(r, &["--lease", "nonesuch", "prepare", "x"]).contains("lease \"nonesuch\""));

    let dry = ok(r, &["gc", "--dry-run"]);
    assert!(dry.starts_with("WHAT") && dry.contains("0 snapshots"), "the lease holds it: {dry}");
    ok(r, &["lease", "remove", "pull", "layer"]);
    let dry = ok(r, &["gc", "--dry-run"]);
    assert!(dry.contains("would remove") && dry.contains("layer"), "{dry}");
    assert!(ok(r, &["ls"]).contains("layer"), "a dry run changes nothing");
    ok(r, &["lease", "add", "pull", "layer"]);
    let gone = ok(r, &["lease", "rm", "--sync", "pull"]);
    assert!(gone.contains("removed") && gone.contains("layer"), "{gone}");
    let left = ok(r, &["ls"]);
    assert!(!left.contains("layer") && left.contains("mine"), "unleased snapshots stay: {left}");
    let report: serde_json::Value =
        serde_json::from_str(&ok(r, &["--format", "json", "gc"])).unwrap();
    assert_eq!(report["removed"].as_array().unwrap().len(), 0);
}
