//! The snapshots as a build cache (buildkit's cache manager) on every backend (native,
//! overlay, btrfs, the `copy` guest): usage records (last use, use count) kept by
//! prepare, view, mounts and touch; `du`'s sizes and flags; prune's order, limits,
//! filters, `--all` and dry run; what prune never removes; prune racing with prepares;
//! the configuration's policies applied by the scheduler. Roots on tmpfs (btrfs on its
//! loop device): these are about logic. The crash tests are the CLI's
//! (host/cli/tests/all/cache.rs).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasnap::gc::LABEL_GC_ROOT;
use wasnap::metadata::usage::{LABEL_DESCRIPTION, LABEL_RECORD_TYPE};
use wasnap::metadata::{CachePruneReport, DiskUsage, PrunePolicy, Scope};
use wasnap::{Ctx, Host, Info, Kind, Labels, Snapshotter};

use crate::common::*;
use crate::layers::{E, host_with, layer, tmpfs_host};
use crate::{loop_btrfs, require_root};

/// A committed snapshot `name` on `parent` holding one file of `bytes` bytes.
fn layer_of(
    host: &Host,
    sn: &Snapshotter,
    c: &Ctx,
    name: &str,
    parent: Option<&str>,
    bytes: usize,
    labels: &Labels,
) {
    let key = format!("{name}-active");
    sn.prepare(c, &key, parent, &Labels::new()).unwrap();
    let data = vec![b'x'; bytes];
    let tar = layer(&[E::File(&format!("{name}.bin"), 0o644, &data)]);
    host.layers(sn).apply(c, &key, &tar[..], None).unwrap();
    sn.commit(c, name, &key, labels).unwrap();
}

fn du(sn: &Snapshotter, c: &Ctx) -> DiskUsage {
    sn.du(c, &[], false).unwrap()
}

fn record<'a>(du: &'a DiskUsage, key: &str) -> &'a wasnap::metadata::UsageRecord {
    du.records.iter().find(|r| r.key == key).unwrap_or_else(|| panic!("{key} in {du:#?}"))
}

fn keys(infos: &[Info]) -> BTreeSet<String> {
    infos.iter().map(|i| i.name.clone()).collect()
}

fn prune(host: &Host, name: &str, c: &Ctx, policy: PrunePolicy, dry_run: bool) -> CachePruneReport {
    host.prune_cache(name, Scope::Namespace(c.namespace()), &policy, dry_run, &mut |_| {}).unwrap()
}

fn removed(r: &CachePruneReport) -> Vec<&str> {
    r.removed.iter().map(|s| s.key.as_str()).collect()
}

/// Every check of this file on one snapshotter of `host`.
fn cache_semantics(host: &Host, name: &str) {
    usage_records(host, name);
    du_flags(host, name);
    prune_order_and_limits(host, name);
    prune_filters_all_and_protection(host, name);
    prune_keep_duration(host, name);
    prune_racing_with_prepares(host, name, 300);
    // Nothing prune did left a record without data or data without a record.
    host.collect(false).unwrap();
    for report in host.check().unwrap() {
        if report.snapshotter == name {
            assert!(report.missing.is_empty() && report.orphans.is_empty(), "{name}: {report:?}");
        }
    }
}

/// prepare, view, mounts and touch count as uses; an update racing with uses keeps
/// both.
fn usage_records(host: &Host, name: &str) {
    let sn = host.snapshotter(name).unwrap();
    let c = ctx("usage");
    layer_of(host, &sn, &c, "base", None, 4096, &Labels::new());
    let fresh = du(&sn, &c);
    assert_eq!(record(&fresh, "base").use_count, 0, "{name}");
    assert_eq!(record(&fresh, "base").last_used, None, "{name}: never used");
    sn.prepare(&c, "child", Some("base"), &Labels::new()).unwrap();
    sn.view(&c, "look", Some("base"), &Labels::new()).unwrap();
    let after = du(&sn, &c);
    let base = record(&after, "base");
    assert_eq!(base.use_count, 2, "{name}: prepare and view on it");
    assert!(base.last_used.is_some(), "{name}");
    sn.mounts(&c, "child").unwrap();
    sn.mounts(&c, "child").unwrap();
    sn.touch(&c, "base").unwrap();
    let after = du(&sn, &c);
    assert_eq!(record(&after, "child").use_count, 2, "{name}: two mounts");
    assert_eq!(record(&after, "base").use_count, 3, "{name}: and a touch");
    assert!(record(&after, "base").last_used > base.last_used, "{name}");
    assert_eq!(sn.touch(&c, "missing").unwrap_err().kind(), wasnap::ErrorKind::NotFound);
    // Labels updated while the snapshot is used all along: no update fails, no use is lost.
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let toucher = s.spawn(|| {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                sn.touch(&c, "base").unwrap();
                n += 1;
            }
            n
        });
        for i in 0..200 {
            let mut info = sn.stat(&c, "base").unwrap();
            info.labels.insert("round".into(), i.to_string());
            sn.update(&c, &info, &["labels.round".to_owned()]).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        let touches = toucher.join().unwrap();
        let last = du(&sn, &c);
        assert_eq!(record(&last, "base").use_count, 3 + touches, "{name}: every use counted");
    });
    assert_eq!(sn.stat(&c, "base").unwrap().labels["round"], "199");
    sn.remove(&c, "look").unwrap();
    sn.remove(&c, "child").unwrap();
}

/// Sizes, in use, shared, reclaimable, description and type, and du's filters.
fn du_flags(host: &Host, name: &str) {
    let sn = host.snapshotter(name).unwrap();
    let c = ctx("flags");
    let described = labels(&[(LABEL_DESCRIPTION, "the base"), (LABEL_RECORD_TYPE, "internal")]);
    layer_of(host, &sn, &c, "base", None, 64 << 10, &described);
    layer_of(host, &sn, &c, "img1", Some("base"), 16 << 10, &Labels::new());
    layer_of(host, &sn, &c, "img2", Some("base"), 16 << 10, &Labels::new());
    sn.prepare(&c, "ctr", Some("img1"), &Labels::new()).unwrap();
    layer_of(host, &sn, &c, "rooted", None, 4096, &labels(&[(LABEL_GC_ROOT, "x")]));
    let lease = host.leases().create(&c, Some("hold"), &Labels::new()).unwrap();
    let leased = c.clone().with_lease(Some(lease.id.clone()));
    layer_of(host, &sn, &leased, "leased", None, 4096, &Labels::new());

    let d = du(&sn, &c);
    let base = record(&d, "base");
    assert!(base.size.unwrap() >= 64 << 10, "{name}: {base:?}");
    assert_eq!(base.description.as_deref(), Some("the base"));
    assert_eq!(base.record_type, "internal");
    assert!(base.shared, "{name}: under two images");
    assert!(!base.in_use && !base.reclaimable, "{name}: {base:?}");
    let img1 = record(&d, "img1");
    assert!(img1.in_use && !img1.shared && !img1.reclaimable, "{name}: {img1:?}");
    let img2 = record(&d, "img2");
    assert!(!img2.in_use && !img2.shared && img2.reclaimable, "{name}: {img2:?}");
    assert_eq!(img2.record_type, "regular");
    let ctr = record(&d, "ctr");
    assert!(ctr.in_use && ctr.kind == Kind::Active && ctr.size.is_none(), "{name}: {ctr:?}");
    assert!(!record(&d, "rooted").reclaimable && !record(&d, "leased").reclaimable);
    assert_eq!(d.total, d.shared + d.private);
    assert_eq!(d.reclaimable, img2.size.unwrap(), "{name}: only img2 could go");
    // Measured, active snapshots have a size too.
    let v = sn.du(&c, &["kind==active".to_owned()], true).unwrap();
    assert_eq!(v.records.len(), 1);
    assert!(v.records[0].size.is_some(), "{name}: measured");
    let only = |f: &str| -> BTreeSet<String> {
        sn.du(&c, &[f.to_owned()], false).unwrap().records.into_iter().map(|r| r.key).collect()
    };
    assert_eq!(only("inuse"), set(&["ctr", "img1"]));
    assert_eq!(only("shared"), set(&["base"]));
    assert_eq!(only("type==internal"), set(&["base"]));
    assert_eq!(only("description~=base"), set(&["base"]));
    assert_eq!(only("immutable,parent==base"), set(&["img1", "img2"]));
    assert!(sn.du(&c, &["kind==".to_owned()], false).is_err(), "a bad filter is an error");
    // Nothing of this namespace shows in another.
    assert!(du(&sn, &ctx("empty")).records.is_empty());

    sn.remove(&c, "ctr").unwrap();
    host.leases().delete(&c, "hold").unwrap();
    prune(host, name, &c, PrunePolicy { all: true, ..PrunePolicy::default() }, false);
    let mut info = sn.stat(&c, "rooted").unwrap();
    info.labels.clear();
    sn.update(&c, &info, &["labels".to_owned()]).unwrap();
    prune(host, name, &c, PrunePolicy { all: true, ..PrunePolicy::default() }, false);
    assert!(du(&sn, &c).records.is_empty(), "{name}: {:?}", du(&sn, &c));
}

fn set(keys: &[&str]) -> BTreeSet<String> {
    keys.iter().map(|k| k.to_string()).collect()
}

/// Least recently used first; keep-storage stops as soon as the total fits; a dry run
/// says the same and changes nothing; a leaf gone frees its parent in the same run.
fn prune_order_and_limits(host: &Host, name: &str) {
    let sn = host.snapshotter(name).unwrap();
    let c = ctx("order");
    for i in 0..6 {
        layer_of(host, &sn, &c, &format!("s{i}"), None, 32 << 10, &Labels::new());
    }
    for i in [3, 0, 5, 1, 4, 2] {
        sn.touch(&c, &format!("s{i}")).unwrap();
    }
    let before = du(&sn, &c);
    let sizes: Vec<u64> = (0..6).map(|i| record(&before, &format!("s{i}")).size.unwrap()).collect();
    let largest = *sizes.iter().max().unwrap();
    // Room for a bit under 3.5 of them: the 3 least recently used go.
    let keep = before.private - 2 * largest - largest / 2;
    let policy = PrunePolicy { keep_storage: keep, ..PrunePolicy::default() };
    let listed = keys(&list(&sn, &c, &[]).unwrap());
    let backend = backend_keys(sn.backend().as_ref()).len();
    let dry = prune(host, name, &c, policy.clone(), true);
    assert!(dry.dry_run);
    assert_eq!(removed(&dry), ["s3", "s0", "s5"], "{name}: {dry:?}");
    assert_eq!(dry.freed, sizes[3] + sizes[0] + sizes[5]);
    assert_eq!(keys(&list(&sn, &c, &[]).unwrap()), listed, "{name}: a dry run changes nothing");
    assert_eq!(backend_keys(sn.backend().as_ref()).len(), backend);
    let done = prune(host, name, &c, policy.clone(), false);
    assert_eq!(removed(&done), removed(&dry), "{name}");
    assert_eq!(done.freed, dry.freed);
    assert!(du(&sn, &c).private <= keep, "{name}");
    assert_eq!(keys(&list(&sn, &c, &[]).unwrap()), set(&["s1", "s2", "s4"]));
    assert!(prune(host, name, &c, policy, false).removed.is_empty(), "{name}: it fits now");
    // min-free-space is met here (tmpfs has room): nothing goes for it.
    let plenty = PrunePolicy { min_free_space: 1 << 20, ..PrunePolicy::default() };
    assert!(prune(host, name, &c, plenty, true).removed.is_empty(), "{name}");
    // More free space than the disk has: all the cache may go, oldest first.
    let more = PrunePolicy { min_free_space: u64::MAX / 2, ..PrunePolicy::default() };
    assert_eq!(removed(&prune(host, name, &c, more.clone(), true)), ["s1", "s4", "s2"]);
    // ... but never below the reserve.
    let reserve = PrunePolicy { reserved_space: before.private, ..more };
    assert!(prune(host, name, &c, reserve, true).removed.is_empty(), "{name}");

    // A chain of three unused layers goes top first, in one run.
    layer_of(host, &sn, &c, "p", None, 4096, &Labels::new());
    layer_of(host, &sn, &c, "q", Some("p"), 4096, &Labels::new());
    layer_of(host, &sn, &c, "r", Some("q"), 4096, &Labels::new());
    sn.touch(&c, "r").unwrap();
    sn.touch(&c, "q").unwrap();
    let r = prune(host, name, &c, PrunePolicy::default(), false);
    let order = removed(&r);
    let at =
        |k: &str| order.iter().position(|o| *o == k).unwrap_or_else(|| panic!("{k}: {order:?}"));
    assert!(at("r") < at("q") && at("q") < at("p"), "{name}: children first: {order:?}");
    assert!(list(&sn, &c, &[]).unwrap().is_empty(), "{name}");
}

/// Filters, `--all` (shared and internal records), and what is never removed: in use,
/// leased, gc.root, referred to by a kept snapshot's label.
fn prune_filters_all_and_protection(host: &Host, name: &str) {
    let sn = host.snapshotter(name).unwrap();
    let c = ctx("rules");
    let typed = |t: &str| labels(&[(LABEL_RECORD_TYPE, t)]);
    layer_of(host, &sn, &c, "internal", None, 4096, &typed("internal"));
    layer_of(host, &sn, &c, "local", None, 4096, &typed("source.local"));
    layer_of(host, &sn, &c, "plain", None, 4096, &Labels::new());
    layer_of(host, &sn, &c, "base", None, 4096, &Labels::new());
    layer_of(host, &sn, &c, "x1", Some("base"), 4096, &Labels::new());
    layer_of(host, &sn, &c, "x2", Some("base"), 4096, &Labels::new());
    // Kept whatever the policy: a container's chain, a view's parent, a leased
    // snapshot and what its label refers to, a gc.root.
    layer_of(host, &sn, &c, "run-base", None, 4096, &Labels::new());
    layer_of(host, &sn, &c, "run-top", Some("run-base"), 4096, &Labels::new());
    sn.prepare(&c, "container", Some("run-top"), &Labels::new()).unwrap();
    layer_of(host, &sn, &c, "seen", None, 4096, &Labels::new());
    sn.view(&c, "view", Some("seen"), &Labels::new()).unwrap();
    layer_of(host, &sn, &c, "target", None, 4096, &Labels::new());
    let lease = host.leases().create(&c, Some("rules"), &Labels::new()).unwrap();
    let leased = c.clone().with_lease(Some(lease.id));
    let ref_label = format!("containerd.io/gc.ref.snapshot.{name}");
    let refers = labels(&[(ref_label.as_str(), "target")]);
    layer_of(host, &sn, &leased, "leased", None, 4096, &refers);
    layer_of(host, &sn, &c, "rooted", None, 4096, &labels(&[(LABEL_GC_ROOT, "1")]));
    let kept =
        set(&["run-base", "run-top", "container", "seen", "view", "target", "leased", "rooted"]);

    let filtered =
        PrunePolicy { filters: vec!["type==source.local".into()], ..PrunePolicy::default() };
    assert_eq!(removed(&prune(host, name, &c, filtered, false)), ["local"], "{name}");
    let plain = prune(host, name, &c, PrunePolicy::default(), false);
    assert_eq!(
        removed(&plain).into_iter().collect::<BTreeSet<_>>(),
        ["plain", "x1", "x2"].into_iter().collect(),
        "{name}: not internal, not shared (base is under two)"
    );
    let all = prune(host, name, &c, PrunePolicy { all: true, ..PrunePolicy::default() }, false);
    assert_eq!(
        removed(&all).into_iter().collect::<BTreeSet<_>>(),
        ["internal", "base"].into_iter().collect(),
        "{name}"
    );
    assert_eq!(keys(&list(&sn, &c, &[]).unwrap()), kept, "{name}");
    // Let go, they go.
    sn.remove(&c, "container").unwrap();
    sn.remove(&c, "view").unwrap();
    host.leases().delete(&c, "rules").unwrap();
    let rest = prune(host, name, &c, PrunePolicy { all: true, ..PrunePolicy::default() }, false);
    assert_eq!(removed(&rest).len(), 5, "{name}: {rest:?}");
    assert_eq!(keys(&list(&sn, &c, &[]).unwrap()), set(&["rooted"]));
}

/// keep-duration keeps what was used (or made) within it.
fn prune_keep_duration(host: &Host, name: &str) {
    let sn = host.snapshotter(name).unwrap();
    let c = ctx("duration");
    layer_of(host, &sn, &c, "old-used", None, 4096, &Labels::new());
    layer_of(host, &sn, &c, "old-unused", None, 4096, &Labels::new());
    layer_of(host, &sn, &c, "touched", None, 4096, &Labels::new());
    sn.touch(&c, "old-used").unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    layer_of(host, &sn, &c, "new", None, 4096, &Labels::new());
    sn.touch(&c, "touched").unwrap();
    let policy = PrunePolicy { keep_duration: Duration::from_secs(1), ..PrunePolicy::default() };
    let r = prune(host, name, &c, policy, false);
    assert_eq!(
        removed(&r).into_iter().collect::<BTreeSet<_>>(),
        ["old-unused", "old-used"].into_iter().collect(),
        "{name}"
    );
    prune(host, name, &c, PrunePolicy::default(), false);
}

/// Prepares on the chains a prune is removing: a prepare either fails (its parent
/// went first) or its snapshot keeps its parent, whatever the interleaving.
fn prune_racing_with_prepares(host: &Host, name: &str, rounds: usize) {
    let sn = host.snapshotter(name).unwrap();
    let c = ctx("race");
    let chain = |i: usize| {
        let (base, top) = (format!("base{i}"), format!("top{i}"));
        for (k, p) in [(&base, None), (&top, Some(base.as_str()))] {
            if sn.stat(&c, k).is_err() {
                // Made again if pruned; a prune racing with this may take it at once.
                let key = format!("{k}-{}", rand_suffix());
                if sn.prepare(&c, &key, p, &Labels::new()).is_ok() {
                    let _ = sn.commit(&c, k, &key, &Labels::new());
                    let _ = sn.remove(&c, &key);
                }
            }
        }
    };
    let stop = AtomicBool::new(false);
    let pruned = Mutex::new(0usize);
    std::thread::scope(|s| {
        s.spawn(|| {
            let all = PrunePolicy { all: true, ..PrunePolicy::default() };
            while !stop.load(Ordering::Relaxed) {
                // A backend removal may fail here (a prepare that read the parent
                // before its record went is building on it): the collection below
                // takes what is left.
                let r = prune(host, name, &c, all.clone(), false);
                *pruned.lock().unwrap() += r.removed.len();
            }
        });
        let mut live: Vec<(String, String)> = Vec::new();
        for round in 0..rounds {
            let i = round % 4;
            chain(i);
            let parent = if round % 3 == 0 { format!("base{i}") } else { format!("top{i}") };
            let key = format!("ctr{round}");
            // A prepare whose parent a prune takes meanwhile fails, cleanly.
            if sn.prepare(&c, &key, Some(&parent), &Labels::new()).is_ok() {
                live.push((key, parent));
            }
            if live.len() > 6 {
                let (k, _) = live.remove(0);
                sn.remove(&c, &k).unwrap();
            }
            for (k, p) in &live {
                let info = sn.stat(&c, k).unwrap();
                assert_eq!(info.parent.as_deref(), Some(p.as_str()));
                let parent =
                    sn.stat(&c, p).unwrap_or_else(|e| panic!("{name}: parent of {k}: {e}"));
                if let Some(gp) = parent.parent {
                    sn.stat(&c, &gp).unwrap_or_else(|e| panic!("{name}: {gp} under {k}: {e}"));
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        for (k, _) in &live {
            // Its data is whole: the backend has it and mounts it.
            sn.mounts(&c, k).unwrap();
        }
    });
    assert!(*pruned.lock().unwrap() > 0, "{name}: the prunes raced with something");
    for report in host.check().unwrap() {
        if report.snapshotter == name {
            assert!(report.missing.is_empty(), "{name}: {report:?}");
        }
    }
    // Clean up for the next checks.
    for info in list(&sn, &c, &["kind==active"]).unwrap() {
        sn.remove(&c, &info.name).unwrap();
    }
    prune(host, name, &c, PrunePolicy { all: true, ..PrunePolicy::default() }, false);
    assert!(list(&sn, &c, &[]).unwrap().is_empty(), "{name}");
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
}

#[test]
fn cache_usage_and_prune_on_native_overlay_and_the_copy_guest() {
    require_root!();
    let dir = tmp();
    let host = tmpfs_host(&dir.path().join("root"));
    for name in ["native", "overlay", "copy"] {
        cache_semantics(&host, name);
    }
    host.close().unwrap();
}

#[test]
fn cache_usage_and_prune_on_btrfs() {
    require_root!();
    let fs = loop_btrfs!(512);
    let root = fs.mountpoint.join("root");
    let host = host_with(
        &root,
        "default_snapshotter = \"btrfs\"\n[snapshotters.btrfs]\ndriver = \"btrfs\"\n",
    );
    cache_semantics(&host, "btrfs");
    host.close().unwrap();
}

#[test]
fn a_merge_holds_its_layers_against_prune() {
    let dir = tmp();
    let host = host_with(&dir.path().join("root"), "[snapshotters.native]\ndriver = \"native\"\n");
    let sn = host.snapshotter("native").unwrap();
    let c = ctx("merge");
    layer_of(&host, &sn, &c, "a", None, 4096, &Labels::new());
    layer_of(&host, &sn, &c, "b", None, 4096, &Labels::new());
    host.layers(&sn).merge(&c, "m", &["a".to_owned(), "b".to_owned()], &Labels::new()).unwrap();
    sn.prepare(&c, "on-merge", Some("m"), &Labels::new()).unwrap();
    let d = du(&sn, &c);
    assert_eq!(record(&d, "m").layers, ["a", "b"]);
    assert!(!record(&d, "a").reclaimable && !record(&d, "b").reclaimable, "{d:#?}");
    let all = PrunePolicy { all: true, ..PrunePolicy::default() };
    assert!(prune(&host, "native", &c, all.clone(), false).removed.is_empty());
    sn.remove(&c, "on-merge").unwrap();
    let r = prune(&host, "native", &c, all, false);
    assert_eq!(removed(&r)[0], "m", "the merge before its layers: {r:?}");
    assert_eq!(r.removed.len(), 3);
    host.close().unwrap();
}

/// What containerd made through the daemon (keys `<namespace>/<number>/...` in the
/// namespace they name) is containerd's to collect: prune, even with `--all` and over
/// every namespace, never removes it nor what it stands on, and `du` calls it not
/// reclaimable. A key of that shape naming another namespace is not containerd's.
#[test]
fn prune_leaves_containerds_snapshots_to_containerd() {
    let dir = tmp();
    let host = host_with(&dir.path().join("root"), "[snapshotters.native]\ndriver = \"native\"\n");
    let sn = host.snapshotter("native").unwrap();
    let c = ctx("k8s.io");
    let (base, top) = ("k8s.io/7/sha256:base", "k8s.io/8/sha256:top");
    let commit = |name: &str, parent: Option<&str>| {
        let key = format!("{name} extract");
        sn.prepare(&c, &key, parent, &Labels::new()).unwrap();
        sn.commit(&c, name, &key, &Labels::new()).unwrap();
    };
    commit("wasnap-base", None);
    commit(base, Some("wasnap-base"));
    commit(top, Some(base));
    commit("mine", None);
    commit("default/9/sha256:elsewhere", None);
    let d = du(&sn, &c);
    for key in [top, base, "wasnap-base"] {
        assert!(!record(&d, key).reclaimable, "{key}: {d:#?}");
    }
    assert!(record(&d, "mine").reclaimable, "{d:#?}");
    let all = PrunePolicy { all: true, ..PrunePolicy::default() };
    for scope in [Scope::Namespace("k8s.io"), Scope::All] {
        let r = host.prune_cache("native", scope, &all, true, &mut |_| {}).unwrap();
        assert_eq!(set(&removed(&r)), set(&["mine", "default/9/sha256:elsewhere"]), "{r:?}");
    }
    let r = prune(&host, "native", &c, all, false);
    assert_eq!(r.removed.len(), 2, "{r:?}");
    assert_eq!(keys(&list(&sn, &c, &[]).unwrap()), set(&[top, base, "wasnap-base"]));
    host.close().unwrap();
}

const POLICIES: &str = r#"
default_snapshotter = "native"
[snapshotters.native]
driver = "native"
[gc]
deletion_threshold = 1
interval_secs = 0
max_time_share_percent = 0

[[gc.prune]]
namespaces = ["build"]
filters = ["type==source.local"]

[[gc.prune]]
snapshotters = ["native"]
namespaces = ["build"]
keep_storage = "1GB"
"#;

#[test]
fn configured_policies_apply_in_order_before_each_scheduled_collection() {
    let dir = tmp();
    let host = Arc::new(host_with(&dir.path().join("root"), POLICIES));
    let sn = host.snapshotter("native").unwrap();
    let c = ctx("build");
    let local = labels(&[(LABEL_RECORD_TYPE, "source.local")]);
    layer_of(&host, &sn, &c, "context", None, 4096, &local);
    layer_of(&host, &sn, &c, "kept", None, 4096, &Labels::new());
    layer_of(&host, &sn, &ctx("other"), "context", None, 4096, &local);
    let reports = host.apply_prune_policies();
    let seen: Vec<(usize, &str, &str, Vec<&str>)> = reports
        .iter()
        .map(|(i, s, n, r)| (*i, s.as_str(), n.as_str(), removed(r.as_ref().unwrap())))
        .collect();
    assert_eq!(seen, [(0, "native", "build", vec!["context"]), (1, "native", "build", vec![])]);
    assert_eq!(keys(&list(&sn, &ctx("other"), &[]).unwrap()), set(&["context"]));

    // The scheduler applies them before it collects: a removal calls for a collection.
    layer_of(&host, &sn, &c, "context", None, 4096, &local);
    let _gc = host.start_gc().unwrap();
    sn.prepare(&c, "x", None, &Labels::new()).unwrap();
    sn.remove(&c, "x").unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    while sn.stat(&c, "context").is_ok() {
        assert!(Instant::now() < until, "the scheduler never pruned");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(sn.stat(&c, "kept").is_ok());
}

#[test]
fn prune_policies_in_the_configuration_are_checked() {
    let base = "[snapshotters.native]\ndriver = \"native\"\n";
    let ok = wasnap::config::Config::parse(
        &format!("{base}[[gc.prune]]\nkeep_duration = \"48h\"\nkeep_storage = \"10GB\"\nmin_free_space = 1024\n"),
        "t",
    )
    .unwrap();
    let policy = ok.gc.prune[0].policy().unwrap();
    assert_eq!(policy.keep_duration, Duration::from_secs(48 * 3600));
    assert_eq!(policy.keep_storage, 10 << 30);
    assert_eq!(policy.min_free_space, 1024);
    let again = wasnap::config::Config::parse(&ok.to_toml().unwrap(), "again").unwrap();
    assert_eq!(again, ok);
    for (bad, says) in [
        ("keep_bytes = 1", "keep_bytes"),
        ("keep_storage = \"lots\"", "lots"),
        ("keep_duration = \"a while\"", "a while"),
        ("filters = [\"type==\"]", "filters"),
        ("snapshotters = [\"zfs\"]", "\"zfs\" is not configured"),
        ("namespaces = [\"a/b\"]", "namespace"),
    ] {
        let err = wasnap::config::Config::parse(&format!("{base}[[gc.prune]]\n{bad}\n"), "t")
            .unwrap_err();
        assert_eq!(err.kind(), wasnap::ErrorKind::InvalidArgument, "{bad}");
        assert!(err.to_string().contains(says), "{bad} -> {err}");
    }
}

#[test]
fn sizes_a_plugin_makes_up_saturate_du_and_prune() {
    // A guest reports `u64::MAX` bytes for every snapshot: sums saturate, never panic
    // (overflow checks are on in tests) nor wrap to a small total that prunes nothing.
    let dir = tmp();
    let host = host_with(
        &dir.path().join("root"),
        &format!(
            "default_snapshotter = \"liar\"\n[snapshotters.liar]\ndriver = \"wasm\"\npath = \"{}\"\nconfig = {{ mode = \"huge-usage\" }}\n",
            crate::plugin::guest("adversary").display()
        ),
    );
    let sn = host.snapshotter("liar").unwrap();
    let c = ctx("huge");
    for name in ["a", "b", "c"] {
        let key = format!("{name}-active");
        sn.prepare(&c, &key, None, &Labels::new()).unwrap();
        sn.commit(&c, name, &key, &Labels::new()).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    let d = du(&sn, &c);
    assert_eq!(record(&d, "a").size, Some(u64::MAX), "{d:?}");
    assert_eq!(d.total, u64::MAX, "{d:?}");
    let policy = PrunePolicy { keep_storage: 1 << 30, ..PrunePolicy::default() };
    let dry = prune(&host, "liar", &c, policy.clone(), true);
    assert_eq!((dry.total, dry.freed), (u64::MAX, u64::MAX), "{dry:?}");
    assert_eq!(removed(&dry), ["a"], "one removal frees all there is, by its own account");
    let done = prune(&host, "liar", &c, policy, false);
    assert_eq!(removed(&done), ["a"], "{done:?}");
    assert_eq!(keys(&list(&sn, &c, &[]).unwrap()), set(&["b", "c"]));
    host.close().unwrap();
}
