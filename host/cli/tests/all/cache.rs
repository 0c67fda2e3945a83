//! `wasnap du` and `wasnap prune` as people meet them (tables, JSON, the same through
//! the daemon), and a prune killed at each of its fault points losing nothing still
//! referenced (on the real disk).

use std::path::Path;
use std::process::{Command, Output};

use wasnap::metadata::{CachePruneReport, DiskUsage};
use wasnap::{Host, Kind, Labels};

use crate::common::*;
use crate::remote::{daemon, masked, wasnap as wasnap_plain};

fn wasnap(root: &Path, faults: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wasnap"));
    cmd.arg("--root")
        .arg(root)
        .args(args)
        .env_remove("WASNAP_FAULTS")
        .env_remove("WASNAP_ROOT")
        .env_remove("WASNAP_ADDRESS")
        .env_remove("WASNAP_NAMESPACE")
        .env_remove("WASNAP_CONFIG")
        .env_remove("WASNAP_SNAPSHOTTER")
        .env_remove("WASNAP_LEASE");
    if let Some(f) = faults {
        cmd.env("WASNAP_FAULTS", f);
    }
    cmd.output().expect("run wasnap")
}

fn ok(root: &Path, args: &[&str]) -> String {
    let out = wasnap(root, None, args);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// A chain of committed snapshots `<name>0..<name>{depth-1}` made through the CLI.
fn chain(root: &Path, name: &str, depth: usize) {
    let mut parent: Option<String> = None;
    for d in 0..depth {
        let (key, layer) = (format!("{name}-a{d}"), format!("{name}{d}"));
        let mut args = vec!["prepare", key.as_str()];
        if let Some(p) = &parent {
            args.push(p);
        }
        ok(root, &args);
        // Some data, as a build step would leave: through the mount's source.
        let mounts: serde_json::Value =
            serde_json::from_str(&ok(root, &["mounts", &key, "--format", "json"])).unwrap();
        let source = Path::new(mounts[0]["source"].as_str().unwrap());
        std::fs::write(source.join(format!("{layer}.bin")), vec![b'x'; 16 << 10]).unwrap();
        ok(root, &["commit", &layer, &key]);
        parent = Some(layer);
    }
}

#[test]
fn du_and_prune_show_tables_and_json() {
    let dir = tmp();
    let root = dir.path();
    chain(root, "img", 2);
    chain(root, "old", 2);
    ok(root, &["prepare", "ctr", "img1"]);
    ok(
        root,
        &[
            "label",
            "old1",
            "wasnap.io/description=an old build",
            "wasnap.io/record-type=source.local",
        ],
    );
    ok(root, &["mounts", "ctr"]);

    let table = ok(root, &["du"]);
    let header = table.lines().next().unwrap();
    for col in ["KEY", "KIND", "SIZE", "LAST USED", "USES", "FLAGS"] {
        assert!(header.contains(col), "{table}");
    }
    let row = |key: &str| {
        table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(key))
            .unwrap_or_else(|| panic!("{key}: {table}"))
            .to_owned()
    };
    assert!(row("img1").contains("in-use"), "{table}");
    assert!(row("old1").contains("reclaimable") && row("old1").contains("never"), "{table}");
    assert!(row("img0").contains("s ago"), "used by img1's prepare: {table}");
    for total in ["Shared:", "Private:", "Reclaimable:", "Total:"] {
        assert!(table.contains(total), "{table}");
    }
    let verbose = ok(root, &["du", "--verbose", "--filter", "type==source.local"]);
    assert!(
        verbose.contains("Key:          old1") && verbose.contains("an old build"),
        "{verbose}"
    );
    assert!(verbose.contains("Reclaimable:  true"), "{verbose}");
    let du: DiskUsage = serde_json::from_str(&ok(root, &["du", "--format", "json"])).unwrap();
    assert_eq!(du.records.len(), 5);
    assert!(du.reclaimable > 0 && du.total >= du.reclaimable);

    let listed = ok(root, &["ls"]);
    let dry = ok(root, &["prune", "--dry-run"]);
    assert!(dry.contains("old1") && dry.contains("old0"), "{dry}");
    assert!(dry.contains("Would remove 2 snapshots"), "{dry}");
    assert_eq!(ok(root, &["ls"]), listed, "a dry run changes nothing");
    let r: CachePruneReport =
        serde_json::from_str(&ok(root, &["prune", "--dry-run", "--format", "json"])).unwrap();
    assert!(r.dry_run && r.removed.len() == 2 && r.freed > 0, "{r:?}");
    let kept = ok(root, &["prune", "--keep-duration", "1h"]);
    assert!(kept.contains("Removed 0 snapshots"), "everything is recent: {kept}");
    // old0 matches, but old1 on it does not: neither goes.
    let filtered = ok(root, &["prune", "--filter", "type==regular,name==old0"]);
    assert!(filtered.contains("Removed 0 snapshots"), "{filtered}");
    let filtered = ok(root, &["prune", "--filter", "type==source.local"]);
    assert!(filtered.contains("Removed 1 snapshot,") && filtered.contains("old1"), "{filtered}");
    let done = ok(root, &["prune", "--keep-storage", "0", "--reserved-space", "1KB"]);
    assert!(done.contains("old0"), "{done}");
    assert!(!ok(root, &["ls"]).contains("old"));

    for (bad, says) in [
        (vec!["prune", "--keep-storage", "lots"], "lots"),
        (vec!["prune", "--keep-duration", "soon"], "soon"),
        (vec!["du", "--filter", "kind=="], "kind"),
    ] {
        let out = wasnap(root, None, &bad);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{bad:?}: {err}");
    }
}

#[test]
fn du_and_prune_say_the_same_through_the_daemon() {
    let (embedded, remote) = (tmp(), tmp());
    let d = daemon(remote.path());
    let sock = d.socket().to_str().unwrap().to_owned();
    let script: &[&[&str]] = &[
        &["prepare", "a"],
        &["commit", "base", "a"],
        &["prepare", "b", "base"],
        &["commit", "top", "b"],
        &["prepare", "c", "base"],
        &["commit", "other", "c"],
        &["view", "v", "top"],
        &["du", "--format", "json"],
        &["du", "--filter", "inuse", "--format", "json"],
        &["prune", "--dry-run", "--all", "--format", "json"],
        &["prune", "--all", "--format", "json"],
        &["rm", "v"],
        &["prune", "--all"],
        &["du"],
        &["prune", "--keep-storage", "nonsense"],
        &["-n", "bad/ns", "du"],
    ];
    let config = embedded.path().join("wasnap.toml");
    std::fs::write(&config, crate::remote::CONFIG).unwrap();
    let ago = regex::Regex::new(r"\d+s ago").unwrap();
    for args in script {
        let mut local =
            vec!["--root", embedded.path().to_str().unwrap(), "--config", config.to_str().unwrap()];
        let mut through = vec!["--address", sock.as_str()];
        local.extend_from_slice(args);
        through.extend_from_slice(args);
        let (a, b) = (wasnap_plain(&local), wasnap_plain(&through));
        assert_eq!(a.status.code(), b.status.code(), "{args:?}: {a:?} {b:?}");
        // Sizes are the same data's, times differ: mask the times.
        let text = |s: &[u8], r: &Path| {
            let t = masked(&String::from_utf8_lossy(s), r);
            ago.replace_all(&t, "<ago>").into_owned()
        };
        assert_eq!(text(&a.stdout, embedded.path()), text(&b.stdout, d.root()), "{args:?}");
        assert_eq!(text(&a.stderr, embedded.path()), text(&b.stderr, d.root()), "{args:?}");
    }
}

/// What must outlive any crash of a prune: a container on a two-layer chain, a leased
/// snapshot, a gc.root; and 150 unused snapshots (more than one batch of records) that
/// prune is removing.
fn doomed_and_kept(root: &Path) {
    let host = Host::open(root).unwrap();
    let sn = host.snapshotter("native").unwrap();
    let c = ctx("default");
    let m = sn.prepare(&c, "a", None, &Labels::new()).unwrap();
    std::fs::write(source(&m).join("f"), "kept").unwrap();
    sn.commit(&c, "base", "a", &Labels::new()).unwrap();
    sn.prepare(&c, "b", Some("base"), &Labels::new()).unwrap();
    sn.commit(&c, "top", "b", &Labels::new()).unwrap();
    sn.prepare(&c, "container", Some("top"), &Labels::new()).unwrap();
    let lease = host.leases().create(&c, Some("keep"), &Labels::new()).unwrap();
    let leased = c.clone().with_lease(Some(lease.id));
    sn.prepare(&leased, "l", None, &Labels::new()).unwrap();
    sn.commit(&leased, "leased", "l", &Labels::new()).unwrap();
    sn.prepare(&c, "r", None, &Labels::new()).unwrap();
    sn.commit(&c, "rooted", "r", &labels(&[("containerd.io/gc.root", "1")])).unwrap();
    for i in 0..75 {
        let (p, t) = (format!("junk{i}-0"), format!("junk{i}-1"));
        let m = sn.prepare(&c, "j", None, &Labels::new()).unwrap();
        std::fs::write(source(&m).join("junk"), "x").unwrap();
        sn.commit(&c, &p, "j", &Labels::new()).unwrap();
        sn.prepare(&c, "j", Some(&p), &Labels::new()).unwrap();
        sn.commit(&c, &t, "j", &Labels::new()).unwrap();
    }
    host.close().unwrap();
}

const KEPT: [&str; 5] = ["base", "container", "leased", "rooted", "top"];

/// Every kept snapshot is there with its data, every record has its backend snapshot.
fn assert_kept_whole(root: &Path, point: &str) -> usize {
    let host = Host::open(root).unwrap();
    let sn = host.snapshotter("native").unwrap();
    let c = ctx("default");
    let left = names(&list(&sn, &c, &[]).unwrap());
    for k in KEPT {
        assert!(left.iter().any(|l| l == k), "{point}: {k} lost: {left:?}");
    }
    assert_eq!(sn.stat(&c, "container").unwrap().kind, Kind::Active);
    let m = sn.mounts(&c, "container").unwrap();
    assert_eq!(std::fs::read_to_string(source(&m).join("f")).unwrap(), "kept", "{point}");
    for report in host.check().unwrap() {
        assert!(report.missing.is_empty(), "{point}: a record lost its data: {report:?}");
    }
    // Every junk record left still has its parent.
    for info in list(&sn, &c, &[]).unwrap() {
        if let Some(p) = &info.parent {
            sn.stat(&c, p).unwrap_or_else(|e| panic!("{point}: parent of {}: {e}", info.name));
        }
    }
    host.close().unwrap();
    left.len()
}

#[test]
fn a_prune_killed_at_any_step_loses_nothing_still_referenced() {
    for point in ["prune.before-records", "prune.after-records", "prune.backend.remove"] {
        let dir = disk_tmp();
        let root = dir.path();
        doomed_and_kept(root);
        let out = wasnap(root, Some(&format!("{point}=abort")), &["prune", "--all"]);
        assert!(
            out.status.code().is_none(),
            "{point}: expected an abort, got {:?}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let left = assert_kept_whole(root, point);
        match point {
            "prune.before-records" => {
                assert_eq!(left, KEPT.len() + 150, "{point}: nothing went yet")
            }
            _ => assert!(left < KEPT.len() + 150, "{point}: a batch of records went"),
        }
        // A collection takes the backend snapshots whose records went; a prune then
        // finishes the job.
        ok(root, &["gc"]);
        let check = ok(root, &["gc", "--check"]);
        assert!(check.contains("0 problems"), "{point}: {check}");
        ok(root, &["prune", "--all"]);
        assert_eq!(assert_kept_whole(root, point), KEPT.len(), "{point}");
        let check = ok(root, &["gc", "--check"]);
        assert!(check.contains("0 problems"), "{point}: {check}");
    }
}
