//! The overlay driver: deep chains past containerd's practical limit, its options, and
//! every step of create, commit and remove interrupted.

use std::fs;
use std::path::Path;
use std::sync::Arc;

use cap_std::ambient_authority;
use cap_std::fs::Dir;
use wasnap::driver::Overlay;
use wasnap::driver::overlay::{OverlayOptions, UPPERDIR_LABEL};
use wasnap::fault::{Action, Faults};
use wasnap::mount::{OVERLAY_MAX_LAYERS, mount_all, overlay_lowerdirs, unmount};
use wasnap::{Backend, ErrorKind, Kind, Labels};

use crate::common::*;
use crate::require_root;

fn overlay(root: &Path, faults: Arc<Faults>, opts: OverlayOptions) -> Overlay {
    let path = root.join("overlay");
    fs::create_dir_all(&path).unwrap();
    let dir = Dir::open_ambient_dir(&path, ambient_authority()).unwrap();
    Overlay::open(dir, path, faults, opts).unwrap()
}

fn none() -> Labels {
    Labels::new()
}

/// The upper directory of an active snapshot, from its mounts.
fn upper(b: &Overlay, key: &str) -> std::path::PathBuf {
    let m = b.mounts(key).unwrap();
    let upper = m[0].options.iter().find_map(|o| o.strip_prefix("upperdir=")).map(str::to_owned);
    upper.unwrap_or_else(|| m[0].source.clone()).into()
}

#[test]
fn a_500_layer_chain_mounts_and_reads_and_a_deeper_one_stacks_a_flattened_bottom() {
    require_root!();
    let dir = tmp();
    let b = overlay(dir.path(), Arc::new(Faults::new()), OverlayOptions::default());
    let mut parent: Option<String> = None;
    for i in 1..=OVERLAY_MAX_LAYERS {
        let key = format!("active-{i}");
        b.prepare(&key, parent.as_deref(), &none()).unwrap();
        // Each layer adds its own file and overwrites a shared one.
        let up = upper(&b, &key);
        fs::write(up.join(format!("layer-{i}")), i.to_string()).unwrap();
        fs::write(up.join("top"), i.to_string()).unwrap();
        let name = format!("layer-{i}");
        b.commit(&name, &key, &none()).unwrap();
        parent = Some(name);
    }
    let top = parent.unwrap();
    let view = b.view("deep-view", Some(&top), &none()).unwrap();
    let lowers = overlay_lowerdirs(&view[0].options);
    assert_eq!(lowers.len(), OVERLAY_MAX_LAYERS);
    let option_bytes: usize = view[0].options.iter().map(String::len).sum();
    assert!(option_bytes > 4096, "this chain's options exceed one page ({option_bytes} bytes)");

    let target = dir.path().join("mnt");
    fs::create_dir(&target).unwrap();
    mount_all(&view, &target).unwrap();
    let read = (|| -> std::io::Result<(String, usize)> {
        let top = fs::read_to_string(target.join("top"))?;
        let n =
            (1..=OVERLAY_MAX_LAYERS).filter(|i| target.join(format!("layer-{i}")).exists()).count();
        Ok((top, n))
    })();
    unmount(&target).unwrap();
    let (top_content, files) = read.unwrap();
    assert_eq!(top_content, OVERLAY_MAX_LAYERS.to_string(), "the top layer wins");
    assert_eq!(files, OVERLAY_MAX_LAYERS, "every layer's file is visible");

    // A writable snapshot on the 500-layer chain: 500 lowers and an upper.
    let m = b.prepare("on-top", Some(&top), &none()).unwrap();
    assert_eq!(overlay_lowerdirs(&m[0].options).len(), OVERLAY_MAX_LAYERS);
    mount_all(&m, &target).unwrap();
    let rw = fs::read_to_string(target.join("layer-1")).and_then(|one| {
        fs::write(target.join("written-on-top"), "yes")?;
        Ok(one)
    });
    unmount(&target).unwrap();
    assert_eq!(rw.unwrap(), "1");
    b.commit("layer-501", "on-top", &none()).unwrap();

    // A 501st lower layer is not refused: the mounts stack a flattened tree of the
    // bottom of the chain instead (tests/all/deep.rs checks what they show).
    for m in [
        b.prepare("deeper", Some("layer-501"), &none()).unwrap(),
        b.view("deeper-view", Some("layer-501"), &none()).unwrap(),
    ] {
        let lowers = overlay_lowerdirs(&m[0].options);
        assert!(lowers.len() <= OVERLAY_MAX_LAYERS);
        assert!(lowers.last().unwrap().ends_with("/flat"), "{:?}", lowers.last());
        mount_all(&m, &target).unwrap();
        let read = fs::read_to_string(target.join("layer-1"));
        unmount(&target).unwrap();
        assert_eq!(read.unwrap(), "1");
    }
    // A hand-made mount record deeper than the limit is refused clearly, not with EINVAL.
    let mut deeper = view[0].clone();
    let extra: Vec<&str> = lowers.iter().chain(lowers.iter().take(1)).copied().collect();
    deeper.options = vec!["ro".into(), format!("lowerdir={}", extra.join(":"))];
    let err = mount_all(&[deeper], &target).unwrap_err();
    assert!(err.to_string().contains("at most 500"), "{err}");
}

#[test]
fn mounts_follow_containerd_shapes() {
    let dir = tmp();
    let b = overlay(dir.path(), Arc::new(Faults::new()), OverlayOptions::default());
    let m = b.prepare("a", None, &none()).unwrap();
    assert_eq!(
        (m[0].kind.as_str(), m[0].options.clone()),
        ("bind", vec!["rbind".into(), "rw".into()])
    );
    b.commit("l1", "a", &none()).unwrap();
    let v = b.view("v1", Some("l1"), &none()).unwrap();
    assert_eq!(
        (v[0].kind.as_str(), v[0].options.clone()),
        ("bind", vec!["rbind".into(), "ro".into()])
    );
    let m = b.prepare("b", Some("l1"), &none()).unwrap();
    assert_eq!(m[0].kind, "overlay");
    assert!(m[0].options.contains(&"index=off".to_string()));
    assert!(m[0].options.iter().any(|o| o.starts_with("upperdir=") && o.ends_with("/fs")));
    assert!(m[0].options.iter().any(|o| o.starts_with("workdir=") && o.ends_with("/work")));
    assert_eq!(overlay_lowerdirs(&m[0].options).len(), 1);
    b.commit("l2", "b", &none()).unwrap();
    let v = b.view("v2", Some("l2"), &none()).unwrap();
    assert_eq!(v[0].kind, "overlay");
    assert!(v[0].options.contains(&"ro".to_string()));
    let lowers = overlay_lowerdirs(&v[0].options);
    assert_eq!(lowers.len(), 2);
    assert!(lowers[0] != lowers[1]);
    assert_eq!(b.mounts("v2").unwrap(), v);
}

#[test]
fn options_userxattr_volatile_and_upperdir_label() {
    let dir = tmp();
    let opts = OverlayOptions {
        index_off: false,
        userxattr: true,
        volatile: true,
        upperdir_label: true,
        async_remove: false,
    };
    let b = overlay(dir.path(), Arc::new(Faults::new()), opts);
    b.prepare("a", None, &none()).unwrap();
    b.commit("l1", "a", &none()).unwrap();
    let m = b.prepare("b", Some("l1"), &none()).unwrap();
    let o = &m[0].options;
    assert!(
        o.contains(&"userxattr".into())
            && o.contains(&"volatile".into())
            && !o.contains(&"index=off".into()),
        "{o:?}"
    );
    let info = b.stat("b").unwrap();
    let upperdir = o.iter().find_map(|x| x.strip_prefix("upperdir=")).unwrap();
    assert_eq!(info.labels[UPPERDIR_LABEL], upperdir);
    let mut walked = Vec::new();
    b.walk(&wasnap::Filter::default(), &mut |i| {
        walked.push(i);
        Ok(())
    })
    .unwrap();
    assert!(walked.iter().all(|i| i.labels.contains_key(UPPERDIR_LABEL)));
    // The computed label is never stored: an update that replaces all labels keeps it.
    let mut update = info.clone();
    update.labels = Labels::from([("x".to_string(), "y".to_string())]);
    let after = b.update(&update, &[wasnap::FieldPath::Labels]).unwrap();
    assert_eq!(after.labels.get("x").map(String::as_str), Some("y"));
    assert_eq!(after.labels[UPPERDIR_LABEL], upperdir);
}

/// With `upperdir_label`, the label reaches the metadata layer's callers (the daemon's
/// Stat, List and Update, as containerd's metadata layer shows its backends' labels);
/// without it, nothing is added.
#[test]
fn the_upperdir_label_shows_through_the_metadata_layer() {
    for labelled in [true, false] {
        let dir = tmp();
        let opts = OverlayOptions { upperdir_label: labelled, ..OverlayOptions::default() };
        let b = Arc::new(overlay(dir.path(), Arc::new(Faults::new()), opts));
        let sn = wasnap::Snapshotter::new(
            metadb(dir.path()),
            "test",
            b.clone(),
            Arc::new(Faults::new()),
        );
        let c = ctx("default");
        sn.prepare(&c, "a", None, &none()).unwrap();
        sn.commit(&c, "l1", "a", &none()).unwrap();
        let m = sn.prepare(&c, "b", Some("l1"), &none()).unwrap();
        let upperdir = m[0].options.iter().find_map(|x| x.strip_prefix("upperdir=")).unwrap();
        let info = sn.stat(&c, "b").unwrap();
        assert_eq!(
            info.labels.get(UPPERDIR_LABEL).map(String::as_str),
            labelled.then_some(upperdir)
        );
        let listed = list(&sn, &c, &[]).unwrap();
        assert_eq!(listed.len(), 2);
        for i in &listed {
            assert_eq!(i.labels.contains_key(UPPERDIR_LABEL), labelled, "{i:?}");
        }
        let mut update = info.clone();
        update.labels = Labels::from([("x".to_string(), "y".to_string())]);
        let after = sn.update(&c, &update, &[]).unwrap();
        assert_eq!(after.labels.get("x").map(String::as_str), Some("y"));
        assert_eq!(after.labels.contains_key(UPPERDIR_LABEL), labelled, "{after:?}");
        // Only the computed label: another the backend holds (set there by another
        // namespace naming the same data, say) is not shown.
        let bkey = backend_keys(b.as_ref()).into_iter().find(|i| i.kind == Kind::Active).unwrap();
        let mut theirs = bkey.clone();
        theirs.labels.insert("containerd.io/snapshot/theirs".into(), "x".into());
        b.update(&theirs, &[wasnap::FieldPath::Labels]).unwrap();
        let info = sn.stat(&c, "b").unwrap();
        assert!(!info.labels.contains_key("containerd.io/snapshot/theirs"), "{info:?}");
    }
}

#[test]
fn async_remove_leaves_the_heavy_delete_to_cleanup() {
    let dir = tmp();
    let opts = OverlayOptions { async_remove: true, ..OverlayOptions::default() };
    let b = overlay(dir.path(), Arc::new(Faults::new()), opts);
    b.prepare("a", None, &none()).unwrap();
    fs::write(upper(&b, "a").join("big"), vec![1u8; 1 << 20]).unwrap();
    b.remove("a").unwrap();
    assert_eq!(b.stat("a").unwrap_err().kind(), ErrorKind::NotFound, "gone at once");
    let tmp_dir = dir.path().join("overlay/tmp");
    assert_eq!(fs::read_dir(&tmp_dir).unwrap().count(), 1, "its tree waits in tmp/");
    b.cleanup().unwrap();
    assert_eq!(fs::read_dir(&tmp_dir).unwrap().count(), 0, "cleanup deleted it");
}

#[test]
fn every_interrupted_step_leaves_no_visible_snapshot_and_cleanup_reclaims() {
    let dir = tmp();
    let faults = Arc::new(Faults::new());
    let b = overlay(dir.path(), faults.clone(), OverlayOptions::default());
    b.prepare("a", None, &none()).unwrap();
    b.commit("base", "a", &none()).unwrap();
    let snapshots = dir.path().join("overlay/snapshots");
    let count = |p: &Path| fs::read_dir(p).unwrap().count();
    for point in ["overlay.create.before-rename", "overlay.create.before-commit"] {
        faults.arm(point, Action::Error);
        assert!(b.prepare("child", Some("base"), &none()).is_err(), "{point}");
        faults.disarm(point);
        assert_eq!(b.stat("child").unwrap_err().kind(), ErrorKind::NotFound, "{point}");
        b.cleanup().unwrap();
        assert_eq!(count(&snapshots), 1, "{point}: only base's tree");
        assert_eq!(count(&dir.path().join("overlay/tmp")), 0, "{point}");
    }
    b.prepare("child", Some("base"), &none()).unwrap();
    faults.arm("overlay.commit.before-commit", Action::Error);
    assert!(b.commit("done", "child", &none()).is_err());
    faults.disarm("overlay.commit.before-commit");
    assert_eq!(
        b.stat("child").unwrap().kind,
        Kind::Active,
        "an interrupted commit changes nothing"
    );
    assert_eq!(b.stat("done").unwrap_err().kind(), ErrorKind::NotFound);
    faults.arm("overlay.remove.before-commit", Action::Error);
    assert!(b.remove("child").is_err());
    faults.disarm("overlay.remove.before-commit");
    assert!(b.stat("child").is_ok(), "an interrupted remove changes nothing");
    assert!(upper(&b, "child").is_dir(), "and the tree is back in place");
    b.remove("child").unwrap();
    b.cleanup().unwrap();
    assert_eq!(count(&snapshots), 1);
}

#[test]
fn a_remove_cut_short_keeps_the_record_or_leaves_only_garbage() {
    let dir = tmp();
    let faults = Arc::new(Faults::new());
    let b = overlay(dir.path(), faults.clone(), OverlayOptions::default());
    b.prepare("a", None, &none()).unwrap();
    let up = upper(&b, "a");
    fs::write(up.join("f"), "data").unwrap();
    // Cut before the record goes: the snapshot is whole.
    faults.arm("overlay.remove.before-commit", Action::Error);
    b.remove("a").unwrap_err();
    faults.disarm("overlay.remove.before-commit");
    b.cleanup().unwrap();
    assert_eq!(fs::read_to_string(up.join("f")).unwrap(), "data", "the tree is kept");
    // Cut after: the record is gone and its tree is garbage for cleanup.
    faults.arm("overlay.remove.before-delete", Action::Error);
    b.remove("a").unwrap();
    faults.disarm("overlay.remove.before-delete");
    assert!(b.stat("a").unwrap_err().is_not_found());
    assert!(up.exists(), "left for cleanup");
    b.cleanup().unwrap();
    assert!(!up.parent().unwrap().exists(), "cleanup took it");
}

/// The names in `dir` with their inode numbers.
fn inodes(dir: &Path) -> Vec<(String, u64)> {
    use std::os::unix::fs::MetadataExt;
    let mut all: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().to_string_lossy().into_owned(), e.metadata().unwrap().ino())
        })
        .collect();
    all.sort();
    all
}

/// Waits (up to a minute: a slow machine is not a failure) until the background thread
/// has made at least `n` spares; returns them.
fn spares_made(root: &Path, n: usize) -> Vec<(String, u64)> {
    let spare = root.join("overlay/spare");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let made = inodes(&spare);
        if made.len() >= n {
            return made;
        }
        assert!(std::time::Instant::now() < deadline, "no {n} spares within a minute: {made:?}");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn creates_take_blank_entries_made_ahead_and_finish_them_for_their_parent() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    require_root!();
    let dir = tmp();
    let b = overlay(dir.path(), Arc::new(Faults::new()), OverlayOptions::default());
    // The pool hands out its oldest first, and at least all but the last listed are in
    // it: the first two creates take two of these.
    let made = spares_made(dir.path(), 3);
    let entry_of = |key: &str| upper(&b, key).parent().unwrap().to_path_buf();
    let taken = |entry: &Path| {
        let ino = fs::metadata(entry).unwrap().ino();
        let (name, _) = made
            .iter()
            .find(|(_, i)| *i == ino)
            .unwrap_or_else(|| panic!("{} is not one of the spares {made:?}", entry.display()));
        assert!(!dir.path().join("overlay/spare").join(name).exists(), "{name} left spare/");
    };

    b.prepare("a", None, &none()).unwrap();
    taken(&entry_of("a"));
    fs::write(upper(&b, "a").join("f"), "a").unwrap();
    std::os::unix::fs::chown(upper(&b, "a"), Some(1234), Some(5678)).unwrap();
    b.commit("base", "a", &none()).unwrap();

    b.prepare("child", Some("base"), &none()).unwrap();
    let child = entry_of("child");
    taken(&child);
    let (fs_meta, work_meta) =
        (fs::metadata(child.join("fs")).unwrap(), fs::metadata(child.join("work")).unwrap());
    assert_eq!((fs_meta.uid(), fs_meta.gid()), (1234, 5678), "the parent layer's owner");
    assert_eq!(fs_meta.permissions().mode() & 0o7777, 0o755);
    assert_eq!(work_meta.permissions().mode() & 0o7777, 0o711);
    assert_eq!(fs::read_dir(child.join("fs")).unwrap().count(), 0, "an empty layer");
    assert_eq!(fs::read_dir(child.join("work")).unwrap().count(), 0);
    // Spares are nobody's snapshot: cleanup keeps them, as it keeps every entry busy.
    b.cleanup().unwrap();
    assert!(!inodes(&dir.path().join("overlay/spare")).is_empty());
    assert_eq!(fs::read_dir(dir.path().join("overlay/tmp")).unwrap().count(), 0);

    // Closing deletes the pool, whatever the background thread was doing.
    b.close().unwrap();
    assert_eq!(inodes(&dir.path().join("overlay/spare")), vec![], "close deletes the spares");
}

#[test]
fn what_spare_holds_when_the_driver_opens_is_deleted() {
    let dir = tmp();
    // A crash's leftovers: spares made by an earlier process, one of them half made.
    let spare = dir.path().join("overlay/spare");
    fs::create_dir_all(spare.join("1-0-7/fs/deep")).unwrap();
    fs::create_dir_all(spare.join("1-0-8/work")).unwrap();
    fs::write(spare.join("stray"), "x").unwrap();
    let b = overlay(dir.path(), Arc::new(Faults::new()), OverlayOptions::default());
    let left: Vec<_> = inodes(&spare).into_iter().filter(|(n, _)| n.starts_with("1-0-")).collect();
    assert_eq!(left, vec![], "an earlier process's spares are gone");
    assert!(!spare.join("stray").exists());
    b.prepare("a", None, &none()).unwrap();
    b.close().unwrap();
}

#[test]
fn a_driver_dropped_while_it_makes_spares_lets_its_directory_open_again_at_once() {
    // On the disk, where making the pool takes milliseconds: the background thread
    // must not keep the driver's database (which one opener holds) alive meanwhile,
    // nor may a spare it is still making fail the next open.
    let dir = disk_tmp();
    for round in 0..40 {
        let b = overlay(dir.path(), Arc::new(Faults::new()), OverlayOptions::default());
        b.prepare(&format!("a{round}"), None, &none()).unwrap();
        drop(b);
    }
    let b = overlay(dir.path(), Arc::new(Faults::new()), OverlayOptions::default());
    let mut keys = Vec::new();
    b.walk(&wasnap::Filter::default(), &mut |i| {
        keys.push(i.name);
        Ok(())
    })
    .unwrap();
    assert_eq!(keys.len(), 40, "{keys:?}");
    b.close().unwrap();
}
