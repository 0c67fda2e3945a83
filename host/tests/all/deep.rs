//! Chains deeper than one overlay mount stacks: the overlay driver mounts a flattened
//! tree of the bottom of the chain under the layers that fit, and the tree a mount shows
//! is exactly the one the whole chain defines, whiteouts and opaque directories deep in
//! it included. The flattened trees are made by the first mount that needs them, found
//! by later ones, made once under concurrent callers, cleaned up after a failure or a
//! crash, and deleted with their snapshot.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cap_std::ambient_authority;
use cap_std::fs::Dir;
use wasnap::driver::Overlay;
use wasnap::driver::overlay::OverlayOptions;
use wasnap::fault::{Action, Faults};
use wasnap::mount::{OVERLAY_MAX_LAYERS, mount_all, overlay_lowerdirs, unmount};
use wasnap::{Backend, Labels, Mount};

use crate::common::*;
use crate::require_root;

fn overlay(root: &Path, faults: Arc<Faults>) -> Overlay {
    let path = root.join("overlay");
    fs::create_dir_all(&path).unwrap();
    let dir = Dir::open_ambient_dir(&path, ambient_authority()).unwrap();
    Overlay::open(dir, path, faults, OverlayOptions::default()).unwrap()
}

fn none() -> Labels {
    Labels::new()
}

/// The directory a fresh active snapshot's layer is written in.
fn upper(mounts: &[Mount]) -> PathBuf {
    let m = &mounts[0];
    let upper = m.options.iter().find_map(|o| o.strip_prefix("upperdir=")).map(str::to_owned);
    upper.unwrap_or_else(|| m.source.clone()).into()
}

/// What a tree shows: every path below the root, with a directory or a file's content.
type Tree = BTreeMap<String, Option<String>>;

/// The tree under `root`, read through a mount.
fn read_tree(root: &Path) -> Tree {
    fn walk(root: &Path, rel: &str, out: &mut Tree) {
        let dir = if rel.is_empty() { root.to_path_buf() } else { root.join(rel) };
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            let rel = if rel.is_empty() { name } else { format!("{rel}/{name}") };
            let ty = e.file_type().unwrap();
            if ty.is_dir() {
                out.insert(rel.clone(), None);
                walk(root, &rel, out);
            } else {
                assert!(ty.is_file(), "{rel}: only files and directories are made here");
                out.insert(rel.clone(), Some(fs::read_to_string(root.join(&rel)).unwrap()));
            }
        }
    }
    let mut out = Tree::new();
    walk(root, "", &mut out);
    out
}

/// A whiteout in a layer: what overlay reads as "deleted below".
fn whiteout(layer: &Path, rel: &str) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        layer.join(rel),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::empty(),
        rustix::fs::makedev(0, 0),
    )
    .unwrap();
}

/// Writes layer `i` (1-based) of the test chain into `layer` and applies it to `model`:
/// it adds a file and changes a shared one; every 7th deletes a file 3 layers older
/// (a whiteout); layer 3 adds a directory that layer 300 deletes whole; files go into
/// `opq/` every 50 layers and every 250th layer makes `opq/` opaque with one file of
/// its own; layer 1 has a file with an owner, a mode and an xattr, and two hard links.
fn write_layer(i: usize, layer: &Path, model: &mut Tree) {
    let put = |rel: &str, content: String, model: &mut Tree| {
        if let Some((dir, _)) = rel.rsplit_once('/') {
            fs::create_dir_all(layer.join(dir)).unwrap();
            model.insert(dir.to_owned(), None);
        }
        fs::write(layer.join(rel), &content).unwrap();
        model.insert(rel.to_owned(), Some(content));
    };
    put(&format!("files/f{i}"), format!("file {i}"), model);
    put("top", i.to_string(), model);
    if i.is_multiple_of(7) {
        fs::create_dir_all(layer.join("files")).unwrap();
        whiteout(layer, &format!("files/f{}", i - 3));
        model.remove(&format!("files/f{}", i - 3));
    }
    if i == 1 {
        let owned = layer.join("meta/owned");
        put("meta/owned", "owned".into(), model);
        rustix::fs::chown(&owned, Some(rustix::fs::Uid::from_raw(1234)), None).unwrap();
        fs::set_permissions(&owned, fs::Permissions::from_mode(0o640)).unwrap();
        rustix::fs::setxattr(&owned, "user.wasnap", b"deep", rustix::fs::XattrFlags::empty())
            .unwrap();
        put("meta/hl-a", "linked".into(), model);
        fs::hard_link(layer.join("meta/hl-a"), layer.join("meta/hl-b")).unwrap();
        model.insert("meta/hl-b".into(), Some("linked".into()));
    }
    if i == 3 {
        put("gone/deep/x", "x".into(), model);
    }
    if i == 300 {
        whiteout(layer, "gone");
        model.retain(|k, _| k != "gone" && !k.starts_with("gone/"));
    }
    if i % 50 == 25 {
        put(&format!("opq/x{i}"), format!("hidden later {i}"), model);
    }
    if i.is_multiple_of(250) {
        fs::create_dir_all(layer.join("opq")).unwrap();
        rustix::fs::setxattr(
            layer.join("opq"),
            "trusted.overlay.opaque",
            b"y",
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
        model.retain(|k, _| !k.starts_with("opq/"));
        put(&format!("opq/only-{i}"), format!("opaque at {i}"), model);
    }
}

/// A committed chain of `depth` layers, bottom first: its names and ids, and what its
/// top shows.
struct Chain {
    layers: Vec<(String, u64)>,
    model: Tree,
}

impl Chain {
    fn build(b: &Overlay, depth: usize) -> Chain {
        let mut chain = Chain { layers: Vec::with_capacity(depth), model: Tree::new() };
        for i in 1..=depth {
            let key = format!("active-{i}");
            let parent = chain.layers.last().map(|(n, _)| n.as_str());
            let m = b.prepare(&key, parent, &none()).unwrap();
            let layer = upper(&m);
            write_layer(i, &layer, &mut chain.model);
            let name = format!("layer-{i}");
            b.commit(&name, &key, &none()).unwrap();
            let id =
                layer.parent().unwrap().file_name().unwrap().to_str().unwrap().parse().unwrap();
            chain.layers.push((name, id));
        }
        chain
    }

    fn top(&self) -> &str {
        &self.layers.last().unwrap().0
    }
}

/// Runs `f` as the daemon runs a call in place; also says how many times it met long
/// work ([`wasnap::long_work`]).
fn handed_over<T>(f: impl FnOnce() -> T) -> (T, usize) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    thread_local! {
        static LONG: AtomicUsize = const { AtomicUsize::new(0) };
    }
    fn count(work: &mut dyn FnMut()) {
        LONG.with(|n| n.fetch_add(1, Ordering::SeqCst));
        work()
    }
    let before = LONG.with(|n| n.load(Ordering::SeqCst));
    let out = wasnap::long_work::handing_over(count, f);
    (out, LONG.with(|n| n.load(Ordering::SeqCst)) - before)
}

/// The flattened trees under `root`'s overlay driver, by snapshot id.
fn flats(root: &Path) -> Vec<u64> {
    let mut ids: Vec<u64> = fs::read_dir(root.join("overlay/snapshots"))
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            e.path().join("flat").is_dir().then(|| e.file_name().to_str().unwrap().parse().unwrap())
        })
        .collect();
    ids.sort_unstable();
    ids
}

fn drop_flats(root: &Path) {
    for id in flats(root) {
        fs::remove_dir_all(root.join(format!("overlay/snapshots/{id}/flat"))).unwrap();
    }
}

/// What containerd 1.6's `mount.Mount` makes of an overlay record before mount(2): when
/// the options come near a page, `lowerdir` becomes names relative to the lowers'
/// common parent. Its length must stay under a page (mount(2) copies one, NUL included).
fn containerd_data_len(m: &Mount) -> usize {
    let lowers = overlay_lowerdirs(&m.options);
    let parent = |p: &str| Path::new(p).parent().unwrap().parent().unwrap().to_owned();
    let common = parent(lowers[0]);
    assert!(lowers.iter().all(|l| parent(l) == common), "every lower is in snapshots/");
    let rel: Vec<&str> = lowers
        .iter()
        .map(|l| Path::new(l).strip_prefix(&common).unwrap().to_str().unwrap())
        .collect();
    let flags = ["ro", "rw", "rbind", "bind", "nosuid", "nodev", "noexec"];
    let mut data: Vec<String> = m
        .options
        .iter()
        .filter(|o| !o.starts_with("lowerdir=") && !flags.contains(&o.as_str()))
        .cloned()
        .collect();
    data.push(format!("lowerdir={}", rel.join(":")));
    data.join(",").len()
}

/// Checks the shape of a mount record for a deep chain: it stacks what fits, with one
/// flattened tree at the bottom.
fn check_record(m: &[Mount]) {
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].kind, "overlay");
    let lowers = overlay_lowerdirs(&m[0].options);
    assert!(lowers.len() <= OVERLAY_MAX_LAYERS, "{} lowers", lowers.len());
    assert!(lowers.len() > OVERLAY_MAX_LAYERS / 2, "most layers are stacked: {}", lowers.len());
    assert!(lowers.last().unwrap().ends_with("/flat"), "a flattened tree at the bottom");
    assert!(lowers[..lowers.len() - 1].iter().all(|l| l.ends_with("/fs")));
    let len = containerd_data_len(&m[0]);
    assert!(len < 4096, "containerd's compacted options are {len} bytes");
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed())
}

/// Mounts `m` at `target`, reads the tree, unmounts.
fn mounted_tree(m: &[Mount], target: &Path) -> Tree {
    mount_all(m, target).unwrap();
    let tree = std::panic::catch_unwind(|| read_tree(target));
    unmount(target).unwrap();
    tree.unwrap()
}

#[test]
fn a_1000_layer_chain_mounts_over_a_flattened_bottom_and_shows_exactly_its_tree() {
    require_root!();
    let dir = tmp();
    let b = overlay(dir.path(), Arc::new(Faults::new()));
    let (chain, built) = timed(|| Chain::build(&b, 1000));
    let made_while_building = flats(dir.path()).len();
    let target = dir.path().join("mnt");
    fs::create_dir(&target).unwrap();

    // The first mount of a chain whose flattened trees do not exist yet pays for them,
    // as long work its runner is told of (the daemon hands its worker over then).
    drop_flats(dir.path());
    let (first, first_time) = timed(|| {
        let m = handed_over(|| b.view("view-0", Some(chain.top()), &none()).unwrap());
        assert!(m.1 >= 1, "the flattening ran as long work");
        mount_all(&m.0, &target).unwrap();
        m.0
    });
    let tree = std::panic::catch_unwind(|| read_tree(&target));
    unmount(&target).unwrap();
    let tree = tree.unwrap();
    check_record(&first);
    let made = flats(dir.path());
    assert!(!made.is_empty());
    assert_eq!(tree.len(), chain.model.len(), "as many entries as the chain defines");
    assert_eq!(tree, chain.model, "the mount shows exactly the chain's tree");

    // Later mounts find them, and meet no long work.
    let mut later = Vec::new();
    for rep in 1..=3 {
        let (m, t) = timed(|| {
            let (m, long) =
                handed_over(|| b.view(&format!("view-{rep}"), Some(chain.top()), &none()));
            assert_eq!(long, 0);
            let m = m.unwrap();
            mount_all(&m, &target).unwrap();
            unmount(&target).unwrap();
            m
        });
        assert_eq!(overlay_lowerdirs(&m[0].options), overlay_lowerdirs(&first[0].options));
        later.push(t);
    }
    assert_eq!(flats(dir.path()), made, "nothing more was flattened");
    assert_eq!(b.mounts("view-0").unwrap(), first, "the same record at every call");
    eprintln!(
        "1000-layer chain: built in {built:.2?} ({made_while_building} flattened trees made by its \
         prepares); first view+mount {first_time:.2?} (made {} flattened trees: {made:?}), later \
         {later:.2?}; {} lowers stacked",
        made.len(),
        overlay_lowerdirs(&first[0].options).len()
    );

    // What the flattened copy keeps: owner, mode, xattrs, hard links.
    mount_all(&first, &target).unwrap();
    let meta = (|| -> std::io::Result<_> {
        let owned = fs::symlink_metadata(target.join("meta/owned"))?;
        let xattr = rustix::fs::getxattr(target.join("meta/owned"), "user.wasnap", &mut [0u8; 16]);
        let a = fs::symlink_metadata(target.join("meta/hl-a"))?;
        let bl = fs::symlink_metadata(target.join("meta/hl-b"))?;
        Ok((owned.uid(), owned.mode() & 0o7777, xattr, a.ino() == bl.ino(), a.nlink()))
    })();
    unmount(&target).unwrap();
    let (uid, mode, xattr, same, nlink) = meta.unwrap();
    assert_eq!((uid, mode), (1234, 0o640));
    assert_eq!(xattr.ok(), Some(4), "the xattr is kept");
    assert!(same && nlink == 2, "the hard links stay one inode");

    // A writable snapshot on top: the same lowers under an upper directory.
    let m = b.prepare("rw", Some(chain.top()), &none()).unwrap();
    check_record(&m);
    mount_all(&m, &target).unwrap();
    let rw = (|| -> std::io::Result<String> {
        fs::write(target.join("files/new"), "new")?;
        fs::remove_file(target.join("files/f1"))?;
        fs::read_to_string(target.join("top"))
    })();
    unmount(&target).unwrap();
    assert_eq!(rw.unwrap(), "1000");
    let mut expected = chain.model.clone();
    expected.insert("files/new".into(), Some("new".into()));
    expected.remove("files/f1");
    b.commit("layer-1001", "rw", &none()).unwrap();
    let v = b.view("view-1001", Some("layer-1001"), &none()).unwrap();
    check_record(&v);
    assert_eq!(mounted_tree(&v, &target), expected, "a layer made on the deep chain");

    // Concurrent first mounts: every caller gets the same record, each tree is made once.
    drop_flats(dir.path());
    let records: Vec<Vec<Mount>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|t| {
                let b = &b;
                let top = chain.top();
                s.spawn(move || b.view(&format!("race-{t}"), Some(top), &none()).unwrap())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        records
            .iter()
            .all(|r| overlay_lowerdirs(&r[0].options) == overlay_lowerdirs(&first[0].options))
    );
    assert_eq!(flats(dir.path()), made, "the same trees, made once");
    assert_eq!(fs::read_dir(dir.path().join("overlay/tmp")).unwrap().count(), 0, "no copy left");
    assert_eq!(mounted_tree(&records[0], &target), chain.model);
}

#[test]
fn a_flattened_tree_is_cleaned_up_after_a_failure_and_goes_with_its_snapshot() {
    require_root!();
    let dir = tmp();
    let faults = Arc::new(Faults::new());
    let b = overlay(dir.path(), faults.clone());
    let chain = Chain::build(&b, 700);
    drop_flats(dir.path());
    let tmp_dir = dir.path().join("overlay/tmp");
    let count = |p: &Path| fs::read_dir(p).unwrap().count();

    // A failure between the copy and its rename leaves nothing, and the next call works.
    faults.arm("overlay.flatten.before-rename", Action::Error);
    let err = b.view("v", Some(chain.top()), &none()).unwrap_err();
    assert!(err.to_string().contains("flatten"), "{err}");
    faults.disarm("overlay.flatten.before-rename");
    assert!(b.stat("v").unwrap_err().is_not_found(), "the failed view left nothing");
    assert_eq!(count(&tmp_dir), 0, "the copy is deleted");
    assert!(flats(dir.path()).is_empty());
    // A copy a crash cut short (another process's name, no busy mark) is reclaimed.
    fs::create_dir_all(tmp_dir.join("flat-7-999999/files")).unwrap();
    fs::write(tmp_dir.join("flat-7-999999/files/half"), "half").unwrap();
    b.cleanup().unwrap();
    assert_eq!(count(&tmp_dir), 0, "cleanup took the half-made copy");
    let m = b.view("v", Some(chain.top()), &none()).unwrap();
    check_record(&m);
    let target = dir.path().join("mnt");
    fs::create_dir(&target).unwrap();
    assert_eq!(mounted_tree(&m, &target), chain.model);

    // The flattened tree lives in its snapshot's entry: removing the chain down to that
    // snapshot deletes it, and what is left mounts without one.
    let lowers = overlay_lowerdirs(&m[0].options);
    let flat = PathBuf::from(lowers.last().unwrap());
    let flat_id: u64 =
        flat.parent().unwrap().file_name().unwrap().to_str().unwrap().parse().unwrap();
    assert_eq!(flats(dir.path()), vec![flat_id]);
    let at = chain.layers.iter().position(|(_, id)| *id == flat_id).unwrap();
    b.remove("v").unwrap();
    for (name, _) in chain.layers[at..].iter().rev() {
        b.remove(name).unwrap();
    }
    b.cleanup().unwrap();
    assert!(!flat.exists(), "the flattened tree went with snapshot {flat_id}");
    assert!(!flat.parent().unwrap().exists());
    assert!(flats(dir.path()).is_empty());
    let below = &chain.layers[at - 1].0;
    let m = b.view("v2", Some(below), &none()).unwrap();
    assert!(overlay_lowerdirs(&m[0].options).iter().all(|l| l.ends_with("/fs")), "short again");
    assert_eq!(overlay_lowerdirs(&m[0].options).len(), at);
}
