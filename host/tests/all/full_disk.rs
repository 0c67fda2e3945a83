//! A full disk: a root on a small loop-mounted ext4, filled by a ballast file while
//! snapshots are made, committed and removed. Every change either happens or fails
//! saying there is no space, and leaves nothing half made; the database keeps working
//! throughout (redb fails for good after one failed commit, so its file keeps a
//! reserve: `kv::RESERVE`); once space is back, everything works again.

use std::path::PathBuf;
use std::sync::Arc;

use wasnap::config::{Config, DriverConfig};
use wasnap::driver::overlay::OverlayOptions;
use wasnap::fault::Faults;
use wasnap::{Host, Mount, Snapshotter};
use wasnap_conformance::loopfs::Ballast;

use crate::common::{ctx, labels};

/// Where a snapshot's writes go: native's bind source, overlay's upper directory.
fn writable(mounts: &[Mount]) -> PathBuf {
    let m = &mounts[0];
    let upper = m.options.iter().find_map(|o| o.strip_prefix("upperdir=")).map(str::to_owned);
    upper.unwrap_or_else(|| m.source.clone()).into()
}

/// Whether `e` says the disk is full.
fn no_space(e: &wasnap::Error) -> bool {
    e.to_string().contains("No space left on device")
}

/// The host's check finds nothing wrong.
fn clean(host: &Host, when: &str) {
    for r in host.check().unwrap() {
        assert_eq!(r.problems(), 0, "{when}: {r:?}");
    }
}

/// Tries to make `key` from `parent` and commit it as `name`; each step either works
/// or fails with no space. Returns what exists afterwards.
fn attempt(sn: &Snapshotter, ns: &str, key: &str, name: &str, parent: &str) -> Vec<String> {
    let c = ctx(ns);
    match sn.prepare(&c, key, Some(parent), &labels(&[])) {
        Ok(mounts) => {
            // A file written by hand may fail too: the disk is full for everyone.
            let _ = std::fs::write(writable(&mounts).join(key), b"written on a full disk");
            match sn.commit(&c, name, key, &labels(&[])) {
                Ok(()) => vec![name.to_owned()],
                Err(e) => {
                    assert!(no_space(&e), "commit {name} on a full disk: {e}");
                    vec![key.to_owned()]
                }
            }
        }
        Err(e) => {
            assert!(no_space(&e), "prepare {key} on a full disk: {e}");
            Vec::new()
        }
    }
}

#[test]
fn a_full_disk_refuses_changes_loses_nothing_and_the_database_keeps_working() {
    let fs = crate::loop_fs!("ext4", 128);
    let root = fs.mountpoint.join("root");
    let mut config = Config { default_snapshotter: "native".into(), ..Config::default() };
    config.snapshotters.insert("native".into(), DriverConfig::Native.into());
    config
        .snapshotters
        .insert("overlay".into(), DriverConfig::Overlay(OverlayOptions::default()).into());
    let host = Host::open_config(&root, Arc::new(Faults::new()), config).unwrap();
    let c = ctx("ns");
    let content = vec![7u8; 256 << 10];
    for driver in ["native", "overlay"] {
        let sn = host.snapshotter(driver).unwrap();
        let mounts = sn.prepare(&c, "base-a", None, &labels(&[])).unwrap();
        std::fs::write(writable(&mounts).join("data"), &content).unwrap();
        sn.commit(&c, "base", "base-a", &labels(&[])).unwrap();
    }

    let ballast = Ballast::fill(&fs.mountpoint, "ballast").unwrap();
    let mut refused = 0;
    for driver in ["native", "overlay"] {
        let sn = host.snapshotter(driver).unwrap();
        for i in 0..8 {
            let (key, name) = (format!("full-{i}-a"), format!("full-{i}"));
            let made = attempt(&sn, "ns", &key, &name, "base");
            refused += usize::from(made.is_empty() || made[0] == key);
            clean(&host, &format!("{driver} after attempt {i} on a full disk"));
            // Whatever was made can be removed on the full disk: removal frees space.
            for k in made {
                sn.remove(&c, &k).unwrap_or_else(|e| panic!("remove {k} on a full disk: {e}"));
            }
        }
        // Reads, lists and label updates go on.
        assert_eq!(sn.stat(&c, "base").unwrap().kind, wasnap::Kind::Committed);
        let mut info = sn.stat(&c, "base").unwrap();
        info.labels.insert("while".into(), "full".into());
        sn.update(&c, &info, &[]).unwrap();
    }
    assert!(refused > 0, "the disk was never full: the ballast took {} bytes", ballast.bytes);
    host.collect(false).unwrap();
    clean(&host, "after a collection on a full disk");
    drop(ballast);

    // Space is back: everything works, and what was there is whole.
    for driver in ["native", "overlay"] {
        let sn = host.snapshotter(driver).unwrap();
        let made = attempt(&sn, "ns", "after-a", "after", "base");
        assert_eq!(made, ["after"], "{driver}");
        let view = sn.view(&c, "v", Some("after"), &labels(&[])).unwrap();
        let dir = match driver {
            "native" => writable(&view),
            _ => {
                // Overlay's view of a chain: the base's data is in its lower directory.
                let lower = view[0].options.iter().find_map(|o| o.strip_prefix("lowerdir="));
                let lower = lower.map(|l| l.split(':').next_back().unwrap_or(l).to_owned());
                lower.map(PathBuf::from).unwrap_or_else(|| writable(&view))
            }
        };
        assert_eq!(std::fs::read(dir.join("data")).unwrap(), content, "{driver}");
        sn.remove(&c, "v").unwrap();
        sn.remove(&c, "after").unwrap();
        assert_eq!(
            sn.stat(&c, "base").unwrap().labels.get("while").map(String::as_str),
            Some("full")
        );
    }
    host.collect(false).unwrap();
    clean(&host, "after space came back");
}
