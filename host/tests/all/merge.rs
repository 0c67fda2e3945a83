//! Merge and diff snapshots (buildkit's MergeOp and DiffOp) on every backend: contents
//! (later inputs win, whiteouts honoured), flattening, de-duplication, reuse, a merge
//! as a parent, diffs of ancestors and of unrelated trees, and what a merge holds.

use std::collections::BTreeMap;
use std::path::Path;

use wasnap::digest::Digest;
use wasnap::layer::merge::Merged;
use wasnap::layer::snapshot::Layers;
use wasnap::metadata::{Ctx, Snapshotter};
use wasnap::{ErrorKind, Host, Labels};

use crate::common::*;
use crate::layers::{E, host_with, layer, tmpfs_host};
use crate::loopfs::Mounted;
use crate::{loop_btrfs, require_root};

/// What the snapshot `key` shows, read through a view mounted under `scratch` (and
/// removed after): path -> "dir", a regular file's content, or another entry's type;
/// with `meta`, each prefixed by its mode and mtime.
pub(crate) fn tree_of(
    sn: &Snapshotter,
    c: &Ctx,
    key: &str,
    scratch: &Path,
    meta: bool,
) -> std::collections::BTreeMap<String, String> {
    use std::os::unix::fs::MetadataExt;
    let view = format!("tree-of-{key}");
    let mounts = sn.view(c, &view, Some(key), &Labels::new()).unwrap();
    let target = scratch.join(&view);
    std::fs::create_dir_all(&target).unwrap();
    let mut out = std::collections::BTreeMap::new();
    {
        let m = crate::loopfs::Mounted::new(&mounts, &target);
        let mut todo = vec![m.path().to_path_buf()];
        while let Some(dir) = todo.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                let rel = path.strip_prefix(m.path()).unwrap().to_string_lossy().into_owned();
                let md = std::fs::symlink_metadata(&path).unwrap();
                let what = if md.is_dir() {
                    todo.push(path.clone());
                    "dir".to_owned()
                } else if md.is_file() {
                    String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned()
                } else {
                    format!("{:?}", md.file_type())
                };
                let line = match meta {
                    true => format!("{:o} {}.{} {what}", md.mode(), md.mtime(), md.mtime_nsec()),
                    false => what,
                };
                out.insert(rel, line);
            }
        }
    }
    sn.remove(c, &view).unwrap();
    out
}

fn expect(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

/// Registers `tar` on `parent`; returns its chain ID as a key.
fn reg(host: &Host, layers: &Layers<'_>, c: &Ctx, tar: &[u8], parent: Option<&str>) -> String {
    let blob = host.content().ingest(c, &mut &tar[..], None, &Labels::new()).unwrap().digest;
    let parent = parent.map(|p| Digest::parse(p).unwrap());
    layers.register(c, &blob, None, parent.as_ref(), &Labels::new()).unwrap().chain_id.to_string()
}

fn merge(layers: &Layers<'_>, c: &Ctx, name: &str, inputs: &[&str]) -> Merged {
    let inputs: Vec<String> = inputs.iter().map(|s| (*s).to_owned()).collect();
    layers.merge(c, name, &inputs, &Labels::new()).unwrap()
}

/// Every property, on the snapshotter `name`; `stacks` says whether its backend stacks
/// layers (overlay) or merges by copying.
fn merges_and_diffs(host: &Host, name: &str, stacks: bool, scratch: &Path) {
    let sn = host.snapshotter(name).unwrap();
    let layers = host.layers(&sn);
    let c = ctx("default");
    let made = if stacks { "stacked" } else { "copied" };
    // Chain A: a1, a2 (a2 deletes `del` and makes d/ opaque). Chain B: b1, b2.
    let a1 = reg(
        host,
        &layers,
        &c,
        &layer(&[
            E::File("x", 0o644, b"a1"),
            E::File("y", 0o644, b"a1"),
            E::File("del", 0o644, b"a1"),
            E::Dir("d", 0o755),
            E::File("d/old", 0o644, b"a1"),
        ]),
        None,
    );
    let a2 = reg(
        host,
        &layers,
        &c,
        &layer(&[
            E::File("y", 0o644, b"a2"),
            E::File(".wh.del", 0o644, b""),
            E::Dir("d", 0o755),
            E::File("d/.wh..wh..opq", 0o644, b""),
            E::File("d/new", 0o644, b"a2"),
        ]),
        Some(&a1),
    );
    let b1 = reg(
        host,
        &layers,
        &c,
        &layer(&[
            E::File("x", 0o644, b"b1"),
            E::File("z", 0o644, b"b1"),
            E::File("del", 0o644, b"b1"),
            E::Dir("d", 0o755),
            E::File("d/old", 0o644, b"b1"),
        ]),
        None,
    );
    let b2 = reg(host, &layers, &c, &layer(&[E::File(".wh.z", 0o644, b"")]), Some(&b1));
    let c1 = reg(host, &layers, &c, &layer(&[E::File("w", 0o644, b"c1")]), None);
    let tree_a = expect(&[("x", "a1"), ("y", "a2"), ("d", "dir"), ("d/new", "a2")]);
    assert_eq!(tree_of(&sn, &c, &a2, scratch, false), tree_a, "{name}: chain A");

    // Later inputs win, and a later layer's whiteouts delete from earlier inputs.
    let m = merge(&layers, &c, "m", &[&a2, &b2]);
    assert_eq!(m.how, made, "{name}");
    assert_eq!(m.layers, vec![a1.clone(), a2.clone(), b1.clone(), b2.clone()], "{name}");
    let tree_m = expect(&[
        ("x", "b1"),
        ("y", "a2"),
        ("del", "b1"),
        ("d", "dir"),
        ("d/old", "b1"),
        ("d/new", "a2"),
    ]);
    assert_eq!(tree_of(&sn, &c, "m", scratch, false), tree_m, "{name}: merge of A and B");
    // The other way round: B's base is under A, whose whiteout and opaque dir win.
    let m_ba = merge(&layers, &c, "m-ba", &[&b2, &a2]);
    let tree_ba = expect(&[("x", "a1"), ("y", "a2"), ("d", "dir"), ("d/new", "a2")]);
    assert_eq!(tree_of(&sn, &c, "m-ba", scratch, false), tree_ba, "{name}: merge of B and A");
    assert_eq!(m_ba.how, made);

    // A merge input is flattened to its layers.
    let m2 = merge(&layers, &c, "m2", &["m", &c1]);
    assert_eq!(m2.layers, vec![a1.clone(), a2.clone(), b1.clone(), b2.clone(), c1.clone()]);
    let mut tree_m2 = tree_m.clone();
    tree_m2.insert("w".into(), "c1".into());
    assert_eq!(tree_of(&sn, &c, "m2", scratch, false), tree_m2, "{name}: flattened");

    // De-duplication and reuse: B, A, B is A then B, which "m" is already.
    let again = merge(&layers, &c, "m-again", &[&b2, &a2, &b2]);
    assert_eq!((again.how.as_str(), again.info.name.as_str()), ("reused", "m"), "{name}");
    assert!(sn.stat(&c, "m-again").unwrap_err().is_not_found(), "{name}: nothing new made");
    // A merge of one input is that input.
    let one = merge(&layers, &c, "one", &[&a2]);
    assert_eq!((one.how.as_str(), one.info.name.as_str()), ("reused", a2.as_str()), "{name}");

    // A merge is a parent of prepare, view and another merge.
    sn.prepare(&c, "on-m", Some("m"), &Labels::new()).unwrap();
    let mounts = sn.mounts(&c, "on-m").unwrap();
    let target = scratch.join(format!("{name}-on-m"));
    std::fs::create_dir_all(&target).unwrap();
    {
        let mnt = Mounted::new(&mounts, &target);
        std::fs::write(mnt.path().join("x"), "container").unwrap();
        std::fs::remove_file(mnt.path().join("y")).unwrap();
    }
    sn.commit(&c, "m-child", "on-m", &Labels::new()).unwrap();
    let mut tree_child = tree_m.clone();
    tree_child.insert("x".into(), "container".into());
    tree_child.remove("y");
    assert_eq!(tree_of(&sn, &c, "m-child", scratch, false), tree_child, "{name}: child of a merge");
    let m3 = merge(&layers, &c, "m3", &["m-child", &c1]);
    assert_eq!(m3.layers.len(), 6, "{name}: {:?}", m3.layers);
    let mut tree_m3 = tree_child.clone();
    tree_m3.insert("w".into(), "c1".into());
    assert_eq!(tree_of(&sn, &c, "m3", scratch, false), tree_m3, "{name}: merge of a merge's child");

    // A merge holds its layers: they cannot go before it.
    let err = sn.remove(&c, &b2).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{name}: {err}");

    // Diff of an ancestor: the layers between, no tree walked; applied on another base
    // with a merge it gives A's change there.
    let d = layers.diff_snapshot(&c, "d-a2", Some(&a1), &a2, &Labels::new()).unwrap();
    assert_eq!((d.how.as_str(), d.layers.clone()), (made, vec![a2.clone()]), "{name}");
    let on_b = merge(&layers, &c, "a2-on-b", &[&b2, "d-a2"]);
    assert_eq!(on_b.layers, vec![b1.clone(), b2.clone(), a2.clone()]);
    let tree_on_b = expect(&[("x", "b1"), ("y", "a2"), ("d", "dir"), ("d/new", "a2")]);
    assert_eq!(tree_of(&sn, &c, "a2-on-b", scratch, false), tree_on_b, "{name}: A's change on B");
    // A diff from nothing is the chain itself.
    let whole = layers.diff_snapshot(&c, "d-whole", None, &a2, &Labels::new()).unwrap();
    assert_eq!((whole.how.as_str(), whole.info.name.as_str()), ("reused", a2.as_str()));

    // Diff of unrelated trees: compared, deletions kept, so merging it onto the lower
    // gives the upper.
    let d2 = layers.diff_snapshot(&c, "b-to-a", Some(&b2), &a2, &Labels::new()).unwrap();
    assert_eq!(d2.how, "compared", "{name}");
    let rebuilt = merge(&layers, &c, "rebuilt-a", &[&b2, "b-to-a"]);
    assert_eq!(tree_of(&sn, &c, "rebuilt-a", scratch, false), tree_a, "{name}: B + diff(B, A) = A");
    assert_eq!(rebuilt.layers, vec![b1.clone(), b2.clone(), "b-to-a".to_owned()]);

    // Everything goes, top down; nothing is left in the backend.
    for key in ["rebuilt-a", "b-to-a", "a2-on-b", "d-a2", "m3", "m-child", "m2", "m-ba", "m"] {
        sn.remove(&c, key).unwrap_or_else(|e| panic!("{name}: remove {key}: {e}"));
    }
    for key in [&b2, &b1, &a2, &a1, &c1] {
        sn.remove(&c, key).unwrap();
    }
    assert!(list(&sn, &c, &[]).unwrap().is_empty(), "{name}");
    sn.settle();
    assert!(backend_keys(sn.backend().as_ref()).is_empty(), "{name}: backend emptied");
}

#[test]
fn merges_and_diffs_on_native_overlay_and_the_copy_guest() {
    require_root!();
    let dir = tmp();
    let host = tmpfs_host(&dir.path().join("root"));
    for (name, stacks) in [("overlay", true), ("native", false), ("copy", false)] {
        merges_and_diffs(&host, name, stacks, dir.path());
    }
    host.close().unwrap();
}

#[test]
fn merges_and_diffs_on_btrfs() {
    require_root!();
    let fs = loop_btrfs!(256);
    let root = fs.mountpoint.join("root");
    let host = host_with(
        &root,
        "default_snapshotter = \"btrfs\"\n[snapshotters.btrfs]\ndriver = \"btrfs\"\n",
    );
    merges_and_diffs(&host, "btrfs", false, &fs.scratch("mnt").unwrap());
    host.close().unwrap();
}

/// A merge made under a lease holds its layers once their own lease is gone; when the
/// merge's lease goes too, collection takes everything, in the backend as well.
#[test]
fn a_merge_holds_its_layers_against_collection() {
    require_root!();
    let dir = tmp();
    let host = tmpfs_host(&dir.path().join("root"));
    for name in ["overlay", "native"] {
        let sn = host.snapshotter(name).unwrap();
        let layers = host.layers(&sn);
        let plain = ctx("default");
        host.leases().create(&plain, Some("layers"), &Labels::new()).unwrap();
        host.leases().create(&plain, Some("merge"), &Labels::new()).unwrap();
        let under = |l: &str| plain.clone().with_lease(Some(l.to_owned()));
        let a = reg(&host, &layers, &under("layers"), &layer(&[E::File("a", 0o644, b"a")]), None);
        let b = reg(&host, &layers, &under("layers"), &layer(&[E::File("b", 0o644, b"b")]), None);
        let m = merge(&layers, &under("merge"), "m", &[&a, &b]);
        assert_eq!(m.layers, vec![a.clone(), b.clone()]);
        host.leases().delete(&plain, "layers").unwrap();
        let report = host.collect(false).unwrap();
        assert!(report.removed.is_empty(), "{name}: the merge holds its layers: {report:?}");
        assert_eq!(
            tree_of(&sn, &plain, "m", dir.path(), false),
            expect(&[("a", "a"), ("b", "b")]),
            "{name}"
        );
        host.leases().delete(&plain, "merge").unwrap();
        host.collect(false).unwrap();
        assert!(list(&sn, &plain, &[]).unwrap().is_empty(), "{name}: all collected");
        sn.settle();
        assert!(backend_keys(sn.backend().as_ref()).is_empty(), "{name}: backend emptied");
    }
    host.close().unwrap();
}

/// A host on `config` with its root in `dir`, and the faults it hits.
fn host_with_faults(dir: &Path, config: &str) -> (Host, std::sync::Arc<wasnap::fault::Faults>) {
    let faults = std::sync::Arc::new(wasnap::fault::Faults::new());
    let config = wasnap::config::Config::parse(config, "test").unwrap();
    (Host::open_config(&dir.join("root"), faults.clone(), config).unwrap(), faults)
}

/// A merge by copying whose record could not be written after the backend committed
/// holds its layers while its commit is under way: a collection (whose sweep comes
/// before the prune that settles the commit) keeps them once their own lease is gone,
/// and the settled merge has them.
#[test]
fn a_merge_being_committed_holds_its_layers_against_collection() {
    require_root!();
    let dir = tmp();
    let (host, faults) = host_with_faults(
        dir.path(),
        "default_snapshotter = \"native\"\n[snapshotters.native]\ndriver = \"native\"\n",
    );
    let sn = host.snapshotter("native").unwrap();
    let layers = host.layers(&sn);
    let plain = ctx("default");
    host.leases().create(&plain, Some("layers"), &Labels::new()).unwrap();
    host.leases().create(&plain, Some("merge"), &Labels::new()).unwrap();
    let under = |l: &str| plain.clone().with_lease(Some(l.to_owned()));
    let a = reg(&host, &layers, &under("layers"), &layer(&[E::File("a", 0o644, b"a")]), None);
    let b = reg(&host, &layers, &under("layers"), &layer(&[E::File("b", 0o644, b"b")]), None);
    faults.arm("metadata.commit.after-backend", wasnap::fault::Action::Error);
    let inputs = [a.clone(), b.clone()];
    let err = layers.merge(&under("merge"), "m", &inputs, &Labels::new()).unwrap_err();
    faults.disarm("metadata.commit.after-backend");
    assert!(err.to_string().contains("fault"), "{err}");
    host.leases().delete(&plain, "layers").unwrap();
    let report = host.collect(false).unwrap();
    assert!(report.removed.is_empty(), "the merge under way holds its layers: {report:?}");
    let left = names(&list(&sn, &plain, &[]).unwrap());
    for key in [&a, &b] {
        assert!(left.contains(key), "{key} in {left:?}");
    }
    // The collection's prune settled the commit: the merge is there, with its layers.
    assert_eq!(sn.stat(&plain, "m").unwrap().kind, wasnap::Kind::Committed);
    assert_eq!(tree_of(&sn, &plain, "m", dir.path(), false), expect(&[("a", "a"), ("b", "b")]));
    let err = sn.remove(&plain, &a).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "the merge holds it: {err}");
    host.leases().delete(&plain, "merge").unwrap();
    host.collect(false).unwrap();
    assert!(list(&sn, &plain, &[]).unwrap().is_empty(), "all collected");
    sn.settle();
    assert!(backend_keys(sn.backend().as_ref()).is_empty(), "backend emptied");
    host.close().unwrap();
}

/// A merge by copying reads its layers without holding them; a layer removed (here,
/// and made again under the same key) since the merge was planned fails the merge,
/// rather than record a merge of layers other than those it read.
#[test]
fn a_layer_removed_while_a_merge_copies_it_fails_the_merge() {
    require_root!();
    let dir = tmp();
    let host = host_with(
        &dir.path().join("root"),
        "default_snapshotter = \"native\"\n[snapshotters.native]\ndriver = \"native\"\n",
    );
    let sn = host.snapshotter("native").unwrap();
    let layers = host.layers(&sn);
    let c = ctx("default");
    let tar_b = layer(&[E::File("b", 0o644, b"b")]);
    let a = reg(&host, &layers, &c, &layer(&[E::File("a", 0o644, b"a")]), None);
    let b = reg(&host, &layers, &c, &tar_b, None);
    let plan = sn.plan_merge(&c, &[a.clone(), b.clone()]).unwrap();
    sn.remove(&c, &b).unwrap();
    assert_eq!(reg(&host, &layers, &c, &tar_b, None), b, "the same key, a new snapshot");
    let err = layers.make(&c, "m", &plan, &Labels::new()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert!(err.to_string().contains("removed while the merge read it"), "{err}");
    assert!(sn.stat(&c, "m").unwrap_err().is_not_found());
    assert_eq!(names(&list(&sn, &c, &[]).unwrap()).len(), 2, "only the layers are left");
    // Planned again, it is made.
    let plan = sn.plan_merge(&c, &[a.clone(), b.clone()]).unwrap();
    assert_eq!(layers.make(&c, "m", &plan, &Labels::new()).unwrap().how, "copied");
    host.close().unwrap();
}

/// A merge whose record cannot be stored (after the backend made it, or after the
/// copying) leaves nothing behind, and its layers can be removed afterwards.
#[test]
fn a_failed_merge_leaves_nothing() {
    require_root!();
    let dir = tmp();
    let (host, faults) = host_with_faults(
        dir.path(),
        "default_snapshotter = \"overlay\"\n[snapshotters.overlay]\ndriver = \"overlay\"\n[snapshotters.native]\ndriver = \"native\"\n",
    );
    let c = ctx("default");
    for (name, point) in
        [("overlay", "metadata.merge.after-backend"), ("native", "metadata.commit.before-backend")]
    {
        let sn = host.snapshotter(name).unwrap();
        let layers = host.layers(&sn);
        let a = reg(&host, &layers, &c, &layer(&[E::File("a", 0o644, b"a")]), None);
        let b = reg(&host, &layers, &c, &layer(&[E::File("b", 0o644, b"b")]), None);
        faults.arm(point, wasnap::fault::Action::Error);
        let inputs = [a.clone(), b.clone()];
        let err = layers.merge(&c, "m", &inputs, &Labels::new()).unwrap_err();
        faults.disarm(point);
        assert!(err.to_string().contains("fault"), "{name}: {err}");
        assert!(sn.stat(&c, "m").unwrap_err().is_not_found(), "{name}");
        let left: Vec<String> = names(&list(&sn, &c, &[]).unwrap());
        assert_eq!(left.len(), 2, "{name}: only the layers are left: {left:?}");
        sn.remove(&c, &b).unwrap();
        sn.remove(&c, &a).unwrap();
        sn.settle();
        host.collect(false).unwrap();
        assert!(backend_keys(sn.backend().as_ref()).is_empty(), "{name}: backend emptied");
    }
    host.close().unwrap();
}
