//! Merges by hard links (buildkit's hardlink merge) on the native driver: the tree is
//! the one copying makes, changing a child of the merge never reaches a layer, and a
//! merged file is the layer's own inode (committed layers are read in place). The
//! figures are `wasnap bench --merge-only`'s.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use wasnap::layer::merge::MergeOptions;
use wasnap::layer::snapshot::Layers;
use wasnap::metadata::Ctx;
use wasnap::{Host, Labels};

use crate::common::*;
use crate::layers::{E, host_with, layer};
use crate::loopfs::Mounted;
use crate::merge::tree_of;
use crate::require_root;

fn native_host(root: &Path) -> Host {
    host_with(
        root,
        "default_snapshotter = \"native\"\n[snapshotters.native]\ndriver = \"native\"\n",
    )
}

/// Registers a layer of `files` (name, contents) as a chain of its own; its chain ID.
fn reg(host: &Host, layers: &Layers<'_>, c: &Ctx, files: &[(String, Vec<u8>)]) -> String {
    let entries: Vec<E<'_>> =
        files.iter().map(|(name, data)| E::File(name.as_str(), 0o644, data.as_slice())).collect();
    let tar = layer(&entries);
    let blob = host.content().ingest(c, &mut &tar[..], None, &Labels::new()).unwrap().digest;
    layers.register(c, &blob, None, None, &Labels::new()).unwrap().chain_id.to_string()
}

/// Merges `inputs` as `name`, with or without links; how long it took.
fn merge(layers: &Layers<'_>, c: &Ctx, name: &str, inputs: &[String], links: bool) -> Duration {
    let plan = layers.snapshotter().plan_merge(c, inputs).unwrap();
    layers.snapshotter().settle();
    let started = Instant::now();
    let merged = layers
        .make_with(
            c,
            name,
            &plan,
            &Labels::new(),
            &MergeOptions { links, ..MergeOptions::default() },
        )
        .unwrap();
    let took = started.elapsed();
    assert_eq!(merged.how, "copied");
    took
}

/// A regular file: inode, link count, contents.
type Found = (u64, u64, Vec<u8>);

/// Every regular file below `dir` by name.
fn files_below(dir: &Path, out: &mut HashMap<String, Vec<Found>>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let m = std::fs::symlink_metadata(&path).unwrap();
        if m.is_dir() {
            files_below(&path, out);
        } else if m.is_file() {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            out.entry(name).or_default().push((m.ino(), m.nlink(), std::fs::read(&path).unwrap()));
        }
    }
}

/// Two layers, `a` and `b`, each a chain of its own, with a file both have.
fn two_layers(host: &Host, layers: &Layers<'_>, c: &Ctx) -> [String; 2] {
    let file = |name: &str, data: &str| (name.to_owned(), data.as_bytes().to_vec());
    let a = reg(host, layers, c, &[file("shared", "a"), file("only-in-a", "a")]);
    let b = reg(host, layers, c, &[file("shared", "b"), file("only-in-b", "b")]);
    [a, b]
}

#[test]
fn native_merge_by_links_is_the_merge_by_copies() {
    require_root!();
    let dir = tmp();
    let root = dir.path().join("root");
    let host = native_host(&root);
    let sn = host.snapshotter("native").unwrap();
    let layers = host.layers(&sn);
    let c = ctx("default");
    let inputs = two_layers(&host, &layers, &c);

    // The same tree either way, to the mode and the nanosecond.
    let scratch = dir.path().join("mnt");
    merge(&layers, &c, "linked", &inputs, true);
    let tree = tree_of(&sn, &c, "linked", &scratch, true);
    assert_eq!(tree.len(), 3, "{tree:?}");
    assert!(tree["shared"].ends_with(" b"), "{tree:?}");
    sn.remove(&c, "linked").unwrap();
    merge(&layers, &c, "copied", &inputs, false);
    assert_eq!(tree, tree_of(&sn, &c, "copied", &scratch, true));
    sn.remove(&c, "copied").unwrap();

    // A child of a merge by links is a copy: writing it never reaches a layer.
    merge(&layers, &c, "linked", &inputs, true);
    sn.prepare(&c, "child", Some("linked"), &Labels::new()).unwrap();
    let mounts = sn.mounts(&c, "child").unwrap();
    let target = scratch.join("child");
    std::fs::create_dir_all(&target).unwrap();
    {
        // Written in place (the same inode, truncated): a file of the base (`a`, whose
        // tree the merge links too) and one of the layer above it.
        let m = Mounted::new(&mounts, &target);
        for name in ["only-in-a", "only-in-b"] {
            let mut f =
                std::fs::OpenOptions::new().write(true).truncate(true).open(m.path().join(name));
            std::io::Write::write_all(f.as_mut().unwrap(), b"changed").unwrap();
        }
    }
    sn.commit(&c, "child-done", "child", &Labels::new()).unwrap();
    sn.settle();
    let mut files = HashMap::new();
    files_below(&root, &mut files);
    for name in ["only-in-a", "only-in-b"] {
        let datas: Vec<&[u8]> = files[name].iter().map(|(_, _, d)| d.as_slice()).collect();
        assert_eq!(datas.iter().filter(|d| **d == b"changed").count(), 1, "{name}: {datas:?}");
    }
    assert_eq!(tree_of(&sn, &c, "linked", &scratch, true), tree);

    // An input cannot go while the merge holds it (its tree's files are the merge's
    // too, which would keep them whatever became of the input's tree).
    let err = sn.remove(&c, &inputs[0]).unwrap_err();
    assert_eq!(err.kind(), wasnap::ErrorKind::FailedPrecondition, "{err}");
    assert_eq!(tree_of(&sn, &c, "linked", &scratch, true), tree);

    // Everything goes, top down; nothing is left.
    for key in ["child-done", "linked", &inputs[1], &inputs[0]] {
        sn.remove(&c, key).unwrap();
    }
    sn.settle();
    assert!(backend_keys(sn.backend().as_ref()).is_empty());
    host.close().unwrap();
}

#[test]
fn native_merge_links_files() {
    require_root!();
    let dir = tmp();
    let root = dir.path().join("root");
    let host = native_host(&root);
    let sn = host.snapshotter("native").unwrap();
    let layers = host.layers(&sn);
    let c = ctx("default");
    let inputs = two_layers(&host, &layers, &c);
    merge(&layers, &c, "linked", &inputs, true);
    sn.settle();
    // Each file is in its layer's tree and the merge's: one inode, with two links. `a`
    // is the merge's base, whose tree is linked rather than copied too.
    let mut files = HashMap::new();
    files_below(&root, &mut files);
    for (name, data) in [("only-in-a", b"a"), ("only-in-b", b"b"), ("shared", b"b")] {
        let found: Vec<&Found> = files[name].iter().filter(|(_, _, d)| d == data).collect();
        assert_eq!(found.len(), 2, "{name}: {found:?}");
        assert_eq!(found[0].0, found[1].0, "{name}: {found:?}");
        assert!(found.iter().all(|(_, nlink, _)| *nlink == 2), "{name}: {found:?}");
    }
    host.close().unwrap();
}

/// With links, the layers above the base are read on a second thread while the first
/// applies them. A layer that cannot be read midway fails the merge, naming that layer,
/// and leaves nothing: no merge, no scratch snapshot, no thread. With the layer back,
/// the same merge is the one copying makes.
#[test]
fn a_layer_unreadable_midway_fails_a_merge_by_links_and_leaves_nothing() {
    require_root!();
    let dir = tmp();
    let host = native_host(&dir.path().join("root"));
    let sn = host.snapshotter("native").unwrap();
    let layers = host.layers(&sn);
    let c = ctx("default");
    let file = |name: &str, data: &str| (name.to_owned(), data.as_bytes().to_vec());
    let inputs: Vec<String> = (0..6)
        .map(|i| {
            let files = [file("shared", &format!("{i}")), file(&format!("only-{i}"), "x")];
            reg(&host, &layers, &c, &files)
        })
        .collect();
    let plan = sn.plan_merge(&c, &inputs).unwrap();
    let links = MergeOptions { links: true, ..MergeOptions::default() };

    // The fourth layer's tree is moved away, so opening it fails.
    let mounts = sn.committed_mounts(&c, &inputs[3]).unwrap();
    let tree = std::path::PathBuf::from(&mounts[0].source);
    let away = tree.with_extension("away");
    std::fs::rename(&tree, &away).unwrap();
    let err = layers.make_with(&c, "m", &plan, &Labels::new(), &links).unwrap_err();
    assert!(err.to_string().contains(&format!("apply layer {:?}", inputs[3])), "{err}");
    assert!(sn.stat(&c, "m").unwrap_err().is_not_found());
    sn.settle();
    assert_eq!(names(&list(&sn, &c, &[]).unwrap()).len(), inputs.len(), "only the inputs");
    assert_eq!(backend_keys(sn.backend().as_ref()).len(), inputs.len(), "no scratch left");

    std::fs::rename(&away, &tree).unwrap();
    let scratch = dir.path().join("mnt");
    merge(&layers, &c, "linked", &inputs, true);
    let linked = tree_of(&sn, &c, "linked", &scratch, true);
    assert_eq!(linked.len(), 7, "{linked:?}");
    assert!(linked["shared"].ends_with(" 5"), "the last input wins: {linked:?}");
    // Removed first, or the same layers' merge would be found and reused.
    sn.remove(&c, "linked").unwrap();
    merge(&layers, &c, "copied", &inputs, false);
    assert_eq!(linked, tree_of(&sn, &c, "copied", &scratch, true));
    host.close().unwrap();
}
