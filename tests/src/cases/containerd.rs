//! containerd's snapshotter test suite (`core/snapshots/testsuite`), case by case.
//!
//! Every case keeps containerd's name and checks what containerd's case checks, written
//! against wasnap's backend trait. File contents are always checked through real mounts
//! of what the backend returns, never by looking into its directory, so the cases hold
//! for any backend (copying, overlay, btrfs, wasm guests).
//!
//! Like containerd, the cases pass the `containerd.io/gc.root` label on every prepare,
//! view and commit (backends keep labels exactly as given), and name snapshots after
//! paths in a work directory: keys are opaque strings that may contain slashes.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use wasnap::{Backend, ErrorKind, FieldPath, Filter, Info, Kind, Labels, Mount};

use super::helpers::{expect_any_err, expect_err, expected};
use crate::fixture::{Op, apply, check_equal};
use crate::harness::{Case, Env, Fail, Group, Mounted};

pub(crate) const CASES: &[Case] = &[
    Case {
        name: "Basic",
        group: Group::Containerd,
        about: "prepare, fill, commit, prepare a child, change it, commit, view: stat, walk and the mounted trees agree at every step; a parent with children cannot be removed",
        run: basic,
    },
    Case {
        name: "StatActive",
        group: Group::Containerd,
        about: "stat of a freshly prepared snapshot (mounted and written to) says active, no parent, its own key",
        run: stat_active,
    },
    Case {
        name: "StatCommitted",
        group: Group::Containerd,
        about: "stat of a snapshot committed from a written active one says committed, no parent, the new name",
        run: stat_committed,
    },
    Case {
        name: "Transitivity",
        group: Group::Containerd,
        about: "in A <- B, B's parent is A and the parent that stat of B names has no parent",
        run: transitivity,
    },
    Case {
        name: "PrepareView",
        group: Group::Containerd,
        about: "a key already used by an active snapshot or a view cannot be used again by prepare or view",
        run: prepare_view,
    },
    Case {
        name: "Update",
        group: Group::Containerd,
        about: "timestamps of new snapshots of every kind; update replaces or edits labels by field path, bumps updated, keeps created, kind, name and parent",
        run: update,
    },
    Case {
        name: "Remove",
        group: Group::Containerd,
        about: "a removed key can be reused by a view and by a prepare; a committed snapshot without children can be removed and its name reused by a commit",
        run: remove,
    },
    Case {
        name: "Walk",
        group: Group::Containerd,
        about: "walk with containerd filters (kind, name, parent, labels, alternatives) visits exactly the matching snapshots",
        run: walk,
    },
    Case {
        name: "LayerFileUpdate",
        group: Group::Containerd,
        about: "a file changed in an upper layer shows the new content and mode, five times over at different seconds (docker#21555)",
        run: layer_file_update,
    },
    Case {
        name: "RemoveDirectoryInLowerLayer",
        group: Group::Containerd,
        about: "a directory removed and recreated in an upper layer hides the lower layer's files (docker#25244)",
        run: remove_directory_in_lower_layer,
    },
    Case {
        name: "Chown",
        group: Group::Containerd,
        about: "ownership changed on directories and files of a lower layer shows in the upper layer (docker#20240, #24913, #28391)",
        run: chown,
    },
    Case {
        name: "DirectoryPermissionOnCommit",
        group: Group::Containerd,
        about: "owners of directories changed, removed and recreated across three layers survive commit (docker#27298)",
        run: directory_permission_on_commit,
    },
    Case {
        name: "RemoveIntermediateSnapshot",
        group: Group::Containerd,
        about: "a committed snapshot in the middle of a chain cannot be removed; top to bottom removal works",
        run: remove_intermediate_snapshot,
    },
    Case {
        name: "DeletedFilesInChildSnapshot",
        group: Group::Containerd,
        about: "a file deleted in a child layer stays deleted in the child and in a grandchild",
        run: deleted_files_in_child_snapshot,
    },
    Case {
        name: "MoveFileFromLowerLayer",
        group: Group::Containerd,
        about: "files moved (copied, hard linked, removed) out of a lower layer's directories show only at their new place",
        run: move_file_from_lower_layer,
    },
    Case {
        name: "ViewReadonly",
        group: Group::Containerd,
        about: "writing into a really mounted view fails (EROFS expected, any error accepted)",
        run: view_readonly,
    },
    Case {
        name: "StatInWalk",
        group: Group::Containerd,
        about: "stat called from inside the walk callback works (no deadlock) and agrees with what walk gave",
        run: stat_in_walk,
    },
    Case {
        name: "CloseTwice",
        group: Group::Containerd,
        about: "after some work, close succeeds twice in a row",
        run: close_twice,
    },
    Case {
        name: "RootPermission",
        group: Group::Containerd,
        about: "the root of a freshly prepared snapshot without parent, mounted, has mode 0755",
        run: root_permission,
    },
    Case {
        name: "Rename",
        group: Group::Containerd,
        about: "renames in an upper layer (a lower directory, a file over a lower file, a lower file) show right (docker#25409); the directory rename is skipped where the filesystem refuses it with EXDEV, as containerd skips it on overlayfs",
        run: rename,
    },
    Case {
        name: "128LayersMount",
        group: Group::Containerd,
        about: "128 stacked layers, each overwriting, adding and replacing files, mount right at every step and in a view of the top",
        run: layers_128_mount,
    },
];

// ---------------------------------------------------------------------------------------
// What the cases share.

/// containerd names most snapshots after paths in its work directory; so do we.
const WORK: &str = "/snapshot-suite/work";

fn key(name: &str) -> String {
    format!("{WORK}/{name}")
}

const GC_ROOT: &str = "containerd.io/gc.root";

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

/// The labels containerd's suite passes on every call: a gc root stamped with the time.
fn opt() -> Labels {
    labels(&[(GC_ROOT, &rfc3339(SystemTime::now(), false))])
}

/// `t` as an RFC 3339 UTC string, with nanoseconds if asked.
fn rfc3339(t: SystemTime, nanos: bool) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Days since the epoch to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let (era, doe) = (z.div_euclid(146_097), z.rem_euclid(146_097));
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s) = (rem / 3_600, rem % 3_600 / 60, rem % 60);
    if nanos {
        format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{:09}Z", d.subsec_nanos())
    } else {
        format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}Z")
    }
}

/// `t` rounded down to the whole second: time windows start there, so that a backend
/// that keeps timestamps at a coarser precision than the host clock still fits in them.
fn floor_second(t: SystemTime) -> SystemTime {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn within(t: SystemTime, from: SystemTime, to: SystemTime) -> bool {
    t >= floor_second(from) && t <= to
}

fn show_parent(p: &Option<String>) -> String {
    match p {
        Some(p) => format!("{p:?}"),
        None => "none".into(),
    }
}

/// Fails unless a create call returned at least one mount, as containerd requires.
fn nonempty(mounts: &[Mount], what: &str) -> Result<(), Fail> {
    ensure!(
        !mounts.is_empty(),
        "{what} returned no mounts; expected at least one to make the snapshot visible"
    );
    Ok(())
}

/// Prepares `key` on `parent` with containerd's labels and mounts it.
fn prepare_mounted<'e>(
    env: &'e Env<'_>,
    b: &dyn Backend,
    key: &str,
    parent: Option<&str>,
) -> Result<Mounted<'e>, Fail> {
    let what = format!("prepare {key:?} on {}", show_parent(&parent.map(str::to_owned)));
    let mounts =
        b.prepare(key, parent, &opt()).map_err(|e| Fail::Failed(format!("{what}: {e}")))?;
    nonempty(&mounts, &what)?;
    env.mount(&mounts)
}

/// Applies `ops` to a mounted snapshot, saying where it failed.
fn apply_in(root: &Path, ops: &[Op], what: &str) -> Result<(), Fail> {
    apply(root, ops)
        .map_err(|e| Fail::Failed(format!("applying changes to {what} through its mount: {e}")))
}

/// Fails unless the mounted tree at `actual` equals the tree at `want`; `what` says
/// what was expected of it.
fn same_tree(actual: &Path, want: &Path, what: &str) -> Result<(), Fail> {
    check_equal(actual, want).map_err(|e| Fail::Failed(format!("{what}, but: {e}")))
}

/// Checks kind, parent and name of `info` against what containerd's case expects.
fn check_stat(
    info: &Info,
    name: &str,
    kind: Kind,
    parent: Option<&str>,
    when: &str,
) -> Result<(), Fail> {
    ensure!(
        info.name == name,
        "{when}: stat of {name:?} names the snapshot {:?}; expected its own name",
        info.name
    );
    ensure!(info.kind == kind, "{when}: stat of {name:?} says kind {}, expected {kind}", info.kind);
    ensure!(
        info.parent.as_deref() == parent,
        "{when}: stat of {name:?} says parent {}, expected {}",
        show_parent(&info.parent),
        show_parent(&parent.map(str::to_owned))
    );
    Ok(())
}

/// The first field in which two infos of the same snapshot differ, containerd's
/// `checkInfo` order: kind, name, parent, labels, created, updated.
fn info_diff(want: &Info, got: &Info) -> Option<String> {
    if want.kind != got.kind {
        return Some(format!("kind {} vs {}", want.kind, got.kind));
    }
    if want.name != got.name {
        return Some(format!("name {:?} vs {:?}", want.name, got.name));
    }
    if want.parent != got.parent {
        return Some(format!(
            "parent {} vs {}",
            show_parent(&want.parent),
            show_parent(&got.parent)
        ));
    }
    if want.labels != got.labels {
        return Some(format!("labels {:?} vs {:?}", want.labels, got.labels));
    }
    if want.created != got.created {
        return Some(format!(
            "created {} vs {}",
            rfc3339(want.created, true),
            rfc3339(got.created, true)
        ));
    }
    if want.updated != got.updated {
        return Some(format!(
            "updated {} vs {}",
            rfc3339(want.updated, true),
            rfc3339(got.updated, true)
        ));
    }
    None
}

/// Names of the snapshots a walk with containerd filter strings `filters` visits, sorted.
fn walk_names(b: &dyn Backend, filters: &[&str]) -> Result<Vec<String>, Fail> {
    let filter = Filter::parse_all(filters)
        .map_err(|e| Fail::Failed(format!("parse filters {filters:?}: {e}")))?;
    let mut names = Vec::new();
    b.walk(&filter, &mut |info| {
        names.push(info.name);
        Ok(())
    })
    .map_err(|e| Fail::Failed(format!("walk with filters {filters:?}: {e}")))?;
    names.sort();
    Ok(names)
}

/// containerd's `checkSnapshots`: makes a chain of committed snapshots, layer `i` holding
/// `layers[i]`, and after each commit checks, through a mounted view of it, that it shows
/// exactly what applying the layers so far to a plain directory gives.
///
/// With `dir_rename_may_exdev`, a rename of a directory that the snapshot's filesystem
/// refuses with EXDEV (overlayfs without `redirect_dir`) is left out of the layer, both
/// in the snapshot and in the plain directory, as containerd leaves it out on overlayfs.
fn check_snapshots(
    env: &Env<'_>,
    b: &dyn Backend,
    tag: &str,
    layers: &[Vec<Op>],
    dir_rename_may_exdev: bool,
) -> Result<(), Fail> {
    let flat = env.scratch("flat")?;
    let n = layers.len();
    let mut parent: Option<String> = None;
    for (i, ops) in layers.iter().enumerate() {
        let which = format!("layer {} of {n}", i + 1);
        let name = format!("{tag}-{}", i + 1);
        let prepare = format!("{name}-prepare");

        // Create the layer through a mount of a prepared snapshot, then commit it.
        let m = prepare_mounted(env, b, &prepare, parent.as_deref())
            .map_err(|e| with_context(e, &which))?;
        let mut applied = Vec::with_capacity(ops.len());
        for op in ops {
            match apply(m.path(), std::slice::from_ref(op)) {
                Ok(()) => applied.push(op.clone()),
                Err(e) if dir_rename_may_exdev && refused_rename(op, &e) => {}
                Err(e) => {
                    return Err(Fail::Failed(format!(
                        "{which}: applying changes to active snapshot {prepare:?} through its mount: {e}"
                    )));
                }
            }
        }
        m.unmount()?;
        b.commit(&name, &prepare, &opt())
            .map_err(|e| Fail::Failed(format!("{which}: commit {prepare:?} as {name:?}: {e}")))?;

        // The same changes on a plain directory are what the snapshot must show.
        apply(&flat, &applied)?;

        let view = format!("{name}-view");
        let mounts = b
            .view(&view, Some(&name), &opt())
            .map_err(|e| Fail::Failed(format!("{which}: view {view:?} of {name:?}: {e}")))?;
        let m = env.mount(&mounts)?;
        let checked = check_equal(m.path(), &flat);
        m.unmount()?;
        checked.map_err(|e| {
            Fail::Failed(format!(
                "{which}: a view of committed snapshot {name:?} differs from the same changes applied to a plain directory: {e}"
            ))
        })?;
        b.remove(&view).map_err(|e| {
            Fail::Failed(format!("{which}: remove view {view:?} after checking it: {e}"))
        })?;
        parent = Some(name);
    }
    Ok(())
}

/// Whether applying `op` failed because the filesystem refuses the rename with EXDEV,
/// as overlayfs does for a directory from a lower layer without `redirect_dir`.
/// (`apply` keeps the error's kind but not its raw number.)
fn refused_rename(op: &Op, e: &std::io::Error) -> bool {
    matches!(op, Op::Rename(..))
        && (e.kind() == std::io::ErrorKind::CrossesDevices
            || e.raw_os_error() == Some(rustix::io::Errno::XDEV.raw_os_error()))
}

fn with_context(f: Fail, context: &str) -> Fail {
    match f {
        Fail::Failed(m) => Fail::Failed(format!("{context}: {m}")),
        skipped => skipped,
    }
}

// ---------------------------------------------------------------------------------------
// The cases, in containerd's order.

fn basic(env: &Env<'_>) -> Result<(), Fail> {
    let b = env.open()?;
    let b = b.as_ref();
    let initial = vec![
        Op::file("foo", "foo\n", 0o777),
        Op::dir("a", 0o755),
        Op::dir("a/b", 0o755),
        Op::dir("a/b/c", 0o755),
    ];
    let diff =
        vec![Op::file("bar", "bar\n", 0o777), Op::file("foo", "bar\n", 0o777), Op::remove("a/b")];

    let preparing = key("preparing");
    let m = prepare_mounted(env, b, &preparing, None)?;
    apply_in(m.path(), &initial, &format!("active snapshot {preparing:?}"))?;
    m.unmount()?;

    let committed = key("committed");
    b.commit(&committed, &preparing, &opt())?;
    let si = b.stat(&committed)?;
    check_stat(&si, &committed, Kind::Committed, None, "after the first commit")?;
    expect_any_err(
        b.stat(&preparing),
        &format!("stat of active key {preparing:?} after it was committed (the key must be gone)"),
    )?;

    let next = key("nextlayer");
    let m = prepare_mounted(env, b, &next, Some(&committed))?;
    let want = expected(env, &[&initial])?;
    same_tree(
        m.path(),
        &want,
        &format!("new active snapshot {next:?} on {committed:?} must show its parent's tree"),
    )?;
    apply_in(m.path(), &diff, &format!("active snapshot {next:?}"))?;
    m.unmount()?;

    let ni = b.stat(&next)?;
    check_stat(&ni, &next, Kind::Active, Some(&committed), "before the second commit")?;

    let next_committed = key("committed-next");
    b.commit(&next_committed, &next, &opt())?;
    let si2 = b.stat(&next_committed)?;
    check_stat(
        &si2,
        &next_committed,
        Kind::Committed,
        Some(&committed),
        "after the second commit",
    )?;
    expect_any_err(
        b.stat(&next),
        &format!("stat of active key {next:?} after it was committed (the key must be gone)"),
    )?;

    let mut walked: BTreeMap<String, Info> = BTreeMap::new();
    b.walk(&Filter::default(), &mut |i| {
        walked.insert(i.name.clone(), i);
        Ok(())
    })
    .map_err(|e| Fail::Failed(format!("walk without filter: {e}")))?;
    for want in [&si, &si2] {
        let Some(got) = walked.get(&want.name) else {
            return Err(Fail::Failed(format!(
                "walk without filter did not visit committed snapshot {:?}; it visited {:?}",
                want.name,
                walked.keys().collect::<Vec<_>>()
            )));
        };
        if let Some(d) = info_diff(want, got) {
            return Err(Fail::Failed(format!(
                "walk and stat disagree about {:?}: stat vs walk: {d}",
                want.name
            )));
        }
    }

    let nextnext = key("nextnextlayer");
    let mounts = b.view(&nextnext, Some(&next_committed), &opt())?;
    nonempty(&mounts, &format!("view {nextnext:?}"))?;
    let m = env.mount(&mounts)?;
    let want = expected(env, &[&initial, &diff])?;
    let checked = same_tree(
        m.path(),
        &want,
        &format!("view {nextnext:?} of {next_committed:?} must show both layers' changes"),
    );
    m.unmount()?;
    checked?;
    b.remove(&nextnext).map_err(|e| Fail::Failed(format!("remove view {nextnext:?}: {e}")))?;

    expect_any_err(
        b.remove(&committed),
        &format!("remove {committed:?}, which still has the child {next_committed:?}"),
    )?;
    b.remove(&next_committed)
        .map_err(|e| Fail::Failed(format!("remove {next_committed:?}: {e}")))?;
    b.remove(&committed).map_err(|e| {
        Fail::Failed(format!("remove {committed:?} once its child was removed: {e}"))
    })?;
    Ok(())
}

fn stat_active(env: &Env<'_>) -> Result<(), Fail> {
    let b = env.open()?;
    let preparing = key("preparing");
    let m = prepare_mounted(env, b.as_ref(), &preparing, None)?;
    std::fs::write(m.path().join("foo"), "foo\n")?;
    // Stat while it is still mounted, as containerd does.
    let si = b.stat(&preparing)?;
    check_stat(&si, &preparing, Kind::Active, None, "a prepared snapshot")?;
    m.unmount()
}

fn stat_committed(env: &Env<'_>) -> Result<(), Fail> {
    let b = env.open()?;
    let preparing = key("preparing");
    let m = prepare_mounted(env, b.as_ref(), &preparing, None)?;
    std::fs::write(m.path().join("foo"), "foo\n")?;
    // containerd commits while the active snapshot is still mounted.
    let committed = key("committed");
    b.commit(&committed, &preparing, &opt()).map_err(|e| {
        Fail::Failed(format!("commit {preparing:?} (still mounted) as {committed:?}: {e}"))
    })?;
    let si = b.stat(&committed)?;
    check_stat(&si, &committed, Kind::Committed, None, "a committed snapshot")?;
    m.unmount()
}

fn transitivity(env: &Env<'_>) -> Result<(), Fail> {
    let b = env.open()?;
    let b = b.as_ref();
    let preparing = key("preparing");
    let m = prepare_mounted(env, b, &preparing, None)?;
    std::fs::write(m.path().join("foo"), "foo\n")?;
    m.unmount()?;
    let snap_a = key("snapA");
    b.commit(&snap_a, &preparing, &opt())?;

    let next = key("next");
    let m = prepare_mounted(env, b, &next, Some(&snap_a))?;
    std::fs::write(m.path().join("foo"), "foo bar\n")?;
    m.unmount()?;
    let snap_b = key("snapB");
    b.commit(&snap_b, &next, &opt())?;

    let si_a = b.stat(&snap_a)?;
    let si_b = b.stat(&snap_b)?;
    let Some(parent_b) = si_b.parent.as_deref() else {
        return Err(Fail::Failed(format!(
            "stat of {snap_b:?} says it has no parent; expected parent {snap_a:?}"
        )));
    };
    let si_parent_b = b.stat(parent_b).map_err(|e| {
        Fail::Failed(format!("stat of {parent_b:?}, the parent stat of {snap_b:?} names: {e}"))
    })?;
    ensure!(
        si_a.parent.is_none(),
        "stat of {snap_a:?} says parent {}, expected none",
        show_parent(&si_a.parent)
    );
    ensure_eq!(si_b.parent.as_deref(), Some(snap_a.as_str()), "parent of {snap_b:?}");
    ensure!(
        si_parent_b.parent.is_none(),
        "stat of {parent_b:?} (the parent of {snap_b:?}) says parent {}, expected none",
        show_parent(&si_parent_b.parent)
    );
    Ok(())
}

fn prepare_view(env: &Env<'_>) -> Result<(), Fail> {
    let b = env.open()?;
    let b = b.as_ref();
    let preparing = key("preparing");
    let m = prepare_mounted(env, b, &preparing, None)?;
    m.unmount()?;
    let snap_a = key("snapA");
    b.commit(&snap_a, &preparing, &opt())?;

    let new_layer = key("newlayer");
    b.prepare(&new_layer, Some(&snap_a), &opt())?;
    expect_any_err(
        b.view(&new_layer, Some(&snap_a), &opt()),
        &format!("view with key {new_layer:?}, already taken by an active snapshot"),
    )?;

    let prep_layer = key("prepLayer");
    b.prepare(&prep_layer, Some(&snap_a), &opt())?;
    expect_any_err(
        b.prepare(&prep_layer, Some(&snap_a), &opt()),
        &format!("a second prepare with key {prep_layer:?}"),
    )?;

    let view_layer = key("viewLayer");
    b.view(&view_layer, Some(&snap_a), &opt())?;
    expect_any_err(
        b.view(&view_layer, Some(&snap_a), &opt()),
        &format!("a second view with key {view_layer:?}"),
    )?;
    Ok(())
}

/// containerd's `baseTestSnapshots`: c1 <- c2 committed, a1 on c2 and a2 without parent
/// active, v1 on c2 and v2 without parent views; all empty.
fn base_test_snapshots(b: &dyn Backend) -> wasnap::Result<()> {
    b.prepare("c1-a", None, &opt())?;
    b.commit("c1", "c1-a", &opt())?;
    b.prepare("c2-a", Some("c1"), &opt())?;
    b.commit("c2", "c2-a", &opt())?;
    b.prepare("a1", Some("c2"), &opt())?;
    b.prepare("a2", None, &opt())?;
    b.view("v1", Some("c2"), &opt())?;
    b.view("v2", None, &opt())?;
    Ok(())
}

fn update(env: &Env<'_>) -> Result<(), Fail> {
    let b = env.open()?;
    let b = b.as_ref();
    let t1 = SystemTime::now();
    base_test_snapshots(b).map_err(|e| Fail::Failed(format!("create the base snapshots: {e}")))?;
    let t2 = SystemTime::now();

    let cases: [(&str, Kind, Option<&str>); 6] = [
        ("c1", Kind::Committed, None),
        ("c2", Kind::Committed, Some("c1")),
        ("a1", Kind::Active, Some("c2")),
        ("a2", Kind::Active, None),
        ("v1", Kind::View, Some("c2")),
        ("v2", Kind::View, None),
    ];
    let paths = |p: &[&str], name: &str| -> Result<Vec<FieldPath>, Fail> {
        let owned: Vec<String> = p.iter().map(|s| (*s).to_owned()).collect();
        FieldPath::parse_all(&owned, name)
            .map_err(|e| Fail::Failed(format!("field paths {p:?}: {e}")))
    };
    for (name, kind, parent) in cases {
        let mut st = b.stat(name)?;
        ensure!(
            within(st.created, t1, t2),
            "({name}) created time {} is outside the time the snapshots were made ({} to {})",
            rfc3339(st.created, true),
            rfc3339(t1, true),
            rfc3339(t2, true)
        );
        ensure!(
            st.created == st.updated,
            "({name}) a snapshot that was never updated has updated time {}, expected its created time {}",
            rfc3339(st.updated, true),
            rfc3339(st.created, true)
        );
        check_stat(&st, name, kind, parent, &format!("({name}) before any update"))?;

        let created_at = st.created;
        let root_time = rfc3339(SystemTime::now(), false);
        let want = labels(&[("l1", "v1"), ("l2", "v2"), ("l3", "v3"), (GC_ROOT, &root_time)]);
        st.parent = Some("doesnotexist".into());
        st.labels = want.clone();
        let u1 = SystemTime::now();
        let mut st = b
            .update(&st, &paths(&[], name)?)
            .map_err(|e| Fail::Failed(format!("({name}) update without field paths: {e}")))?;
        let u2 = SystemTime::now();
        ensure!(
            st.created == created_at,
            "({name}) update changed the created time from {} to {}",
            rfc3339(created_at, true),
            rfc3339(st.created, true)
        );
        ensure!(
            within(st.updated, u1, u2),
            "({name}) update returned updated time {}, expected the time of the update ({} to {})",
            rfc3339(st.updated, true),
            rfc3339(u1, true),
            rfc3339(u2, true)
        );
        check_stat(
            &st,
            name,
            kind,
            parent,
            &format!(
                "({name}) after an update given parent \"doesnotexist\" (parent is immutable)"
            ),
        )?;
        ensure!(
            st.labels == want,
            "({name}) update without field paths must replace all labels: got {:?}, expected {want:?}",
            st.labels
        );

        let want = labels(&[("l1", "updated"), ("l3", "v3"), (GC_ROOT, &root_time)]);
        st.labels = labels(&[("l1", "updated"), ("l4", "v4")]);
        let mut st = b.update(&st, &paths(&["labels.l1", "labels.l2"], name)?).map_err(|e| {
            Fail::Failed(format!("({name}) update of labels.l1 and labels.l2: {e}"))
        })?;
        ensure!(
            st.labels == want,
            "({name}) update of labels.l1, labels.l2 given {{l1: updated, l4: v4}} must set l1, delete l2 and leave the rest: got {:?}, expected {want:?}",
            st.labels
        );

        let want = labels(&[("l4", "v4"), (GC_ROOT, &root_time)]);
        st.labels = want.clone();
        let st = b
            .update(&st, &paths(&["labels"], name)?)
            .map_err(|e| Fail::Failed(format!("({name}) update of labels: {e}")))?;
        ensure!(
            st.labels == want,
            "({name}) update of field path \"labels\" must replace all labels: got {:?}, expected {want:?}",
            st.labels
        );

        // The parent is immutable: asking to update it is an invalid argument. The trait
        // only carries label paths, so the refusal happens where field paths are parsed.
        expect_err(
            FieldPath::parse_all(&["parent".to_owned()], name),
            ErrorKind::InvalidArgument,
            &format!("({name}) update of field path \"parent\""),
        )?;
        let now = b.stat(name)?;
        check_stat(&now, name, kind, parent, &format!("({name}) after the updates"))?;
        ensure!(
            now.labels == want,
            "({name}) stat after the updates shows labels {:?}, expected {want:?}",
            now.labels
        );
    }
    Ok(())
}

fn remove(env: &Env<'_>) -> Result<(), Fail> {
    let b = env.open()?;
    let b = b.as_ref();
    let step =
        |what: &str, r: wasnap::Result<()>| r.map_err(|e| Fail::Failed(format!("{what}: {e}")));
    step("prepare \"committed-a\"", b.prepare("committed-a", None, &opt()).map(drop))?;
    step(
        "commit \"committed-a\" as \"committed-1\"",
        b.commit("committed-1", "committed-a", &opt()),
    )?;
    step(
        "prepare \"reuse-1\" on \"committed-1\"",
        b.prepare("reuse-1", Some("committed-1"), &opt()).map(drop),
    )?;
    step("remove active \"reuse-1\"", b.remove("reuse-1"))?;
    step(
        "view \"reuse-1\" on \"committed-1\" after the active snapshot of that key was removed",
        b.view("reuse-1", Some("committed-1"), &opt()).map(drop),
    )?;
    check_stat(&b.stat("reuse-1")?, "reuse-1", Kind::View, Some("committed-1"), "a reused key")?;
    step("remove view \"reuse-1\"", b.remove("reuse-1"))?;
    step(
        "prepare \"reuse-1\" without parent after the view of that key was removed",
        b.prepare("reuse-1", None, &opt()).map(drop),
    )?;
    check_stat(&b.stat("reuse-1")?, "reuse-1", Kind::Active, None, "a key reused again")?;
    step("remove \"committed-1\", whose children were all removed", b.remove("committed-1"))?;
    step(
        "commit \"reuse-1\" as \"committed-1\", a name freed by remove",
        b.commit("committed-1", "reuse-1", &opt()),
    )?;
    check_stat(&b.stat("committed-1")?, "committed-1", Kind::Committed, None, "a reused name")?;
    Ok(())
}

fn walk(env: &Env<'_>) -> Result<(), Fail> {
    let b = env.open()?;
    let b = b.as_ref();
    let root = labels(&[(GC_ROOT, "check-walk")]);
    let with_l = |l: &str| labels(&[("l", l), (GC_ROOT, "check-walk")]);
    let setup = || -> wasnap::Result<()> {
        b.prepare("a-np", None, &root)?;
        b.prepare("p-tmp", None, &root)?;
        b.commit("p", "p-tmp", &root)?;
        b.prepare("a", Some("p"), &root)?;
        b.view("v", Some("p"), &root)?;
        b.prepare("p-wl-tmp", None, &root)?;
        b.commit("p-wl", "p-wl-tmp", &with_l("1"))?;
        b.prepare("a-wl", Some("p-wl"), &with_l("2"))?;
        b.view("v-wl", Some("p-wl"), &with_l("3"))?;
        b.prepare("a-np-wl", None, &with_l("2"))?;
        Ok(())
    };
    setup().map_err(|e| Fail::Failed(format!("create the snapshots to walk: {e}")))?;

    let cases: &[(&[&str], &[&str])] = &[
        (
            &["a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"],
            &[r#"labels."containerd.io/gc.root"==check-walk"#],
        ),
        (
            &["a-np", "a", "a-wl", "a-np-wl"],
            &[r#"kind==active,labels."containerd.io/gc.root"==check-walk"#],
        ),
        (&["v", "v-wl"], &[r#"kind==view,labels."containerd.io/gc.root"==check-walk"#]),
        (&["p", "p-wl"], &[r#"kind==committed,labels."containerd.io/gc.root"==check-walk"#]),
        (&["p", "a-np-wl"], &["name==p", "name==a-np-wl"]),
        (&["a-wl"], &["name==a-wl,labels.l"]),
        (&["a", "v"], &["parent==p"]),
        (
            &["a", "v", "a-wl", "v-wl"],
            &[r#"parent!="",labels."containerd.io/gc.root"==check-walk"#],
        ),
        (&["p-wl", "a-wl", "v-wl", "a-np-wl"], &["labels.l"]),
        (&["a-wl", "a-np-wl"], &["labels.l==2"]),
    ];
    let mut wrong = Vec::new();
    for (matches, filters) in cases {
        let mut want: Vec<String> = matches.iter().map(|s| (*s).to_owned()).collect();
        want.sort();
        let got = walk_names(b, filters)?;
        if got != want {
            wrong.push(format!("filters {filters:?} visited {got:?}, expected {want:?}"));
        }
    }
    ensure!(wrong.is_empty(), "walk visited the wrong snapshots: {}", wrong.join("; "));
    Ok(())
}

fn layer_file_update(env: &Env<'_>) -> Result<(), Fail> {
    let b = env.open()?;
    let l1 = vec![
        Op::dir("etc", 0o700),
        Op::file("etc/hosts", "mydomain 10.0.0.1", 0o644),
        Op::file("etc/profile", "PATH=/usr/bin", 0o644),
    ];
    let l2 = vec![
        Op::file("etc/hosts", "mydomain 10.0.0.2", 0o644),
        Op::file("etc/profile", "PATH=/usr/bin", 0o666),
        Op::dir("root", 0o700),
        Op::file("root/.bashrc", "PATH=/usr/sbin:/usr/bin", 0o644),
    ];
    // Five runs, each starting in a new second: layers made within one second once
    // confused tools that compared files by size and mtime.
    for run in 1..=5 {
        check_snapshots(env, b.as_ref(), &format!("run{run}"), &[l1.clone(), l2.clone()], false)
            .map_err(|e| with_context(e, &format!("run {run} of 5")))?;
        if run < 5 {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
            std::thread::sleep(Duration::from_secs(now.as_secs() + 1) - now);
        }
    }
    Ok(())
}

fn remove_directory_in_lower_layer(env: &Env<'_>) -> Result<(), Fail> {
    let b = env.open()?;
    let l1 = vec![Op::dir("lib", 0o700), Op::file("lib/hidden", "", 0o644)];
    let l2 = vec![Op::remove("lib"), Op::dir("lib", 0o700), Op::file("lib/not-hidden", "", 0o644)];
    let l3 = vec![Op::file("lib/newfile", "", 0o644)];
    check_snapshots(env, b.as_ref(), "rmdir", &[l1, l2, l3], false)
}

fn chown(env: &Env<'_>) -> Result<(), Fail> {
    let b = env.open()?;
    let l1 = vec![
        Op::dir("opt", 0o700),
        Op::dir("opt/a", 0o700),
        Op::dir("opt/a/b", 0o700),
        Op::file("opt/a/b/file.txt", "hello", 0o644),
    ];
    let l2 = vec![
        Op::chown("opt", 1, 1),
        Op::chown("opt/a", 1, 1),
        Op::chown("opt/a/b", 1, 1),
        Op::chown("opt/a/b/file.txt", 1, 1),
    ];
    check_snapshots(env, b.as_ref(), "chown", &[l1, l2], false)
}

fn directory_permission_on_commit(env: &Env<'_>) -> Result<(), Fail> {
    let b = env.open()?;
    let l1 = vec![
        Op::dir("dir1", 0o700),
        Op::dir("dir2", 0o700),
        Op::dir("dir3", 0o700),
        Op::dir("dir4", 0o700),
        Op::file("dir4/f1", "...", 0o644),
        Op::dir("dir5", 0o700),
        Op::file("dir5/f1", "...", 0o644),
        Op::chown("dir1", 1, 1),
        Op::chown("dir2", 1, 1),
        Op::chown("dir3", 1, 1),
        Op::chown("dir5", 1, 1),
        Op::chown("dir5/f1", 1, 1),
    ];
    let l2 = vec![
        Op::chown("dir2", 0, 0),
        Op::remove("dir3"),
        Op::chown("dir4", 1, 1),
        Op::chown("dir4/f1", 1, 1),
    ];
    let l3 = vec![
        Op::dir("dir3", 0o700),
        Op::chown("dir3", 1, 1),
        Op::remove("dir5"),
        Op::dir("dir5", 0o700),
        Op::chown("dir5", 1, 1),
    ];
    check_snapshots(env, b.as_ref(), "dirperm", &[l1, l2, l3], false)
}

fn remove_intermediate_snapshot(env: &Env<'_>) -> Result<(), Fail> {
    let b = env.open()?;
    let b = b.as_ref();
    let base = key("base");
    let m = prepare_mounted(env, b, &base, None)?;
    m.unmount()?;
    let committed_base = key("committed-base");
    b.commit(&committed_base, &base, &opt())?;

    let intermediate = key("intermediate");
    b.prepare(&intermediate, Some(&committed_base), &opt())?;
    let committed_inter = key("committed-inter");
    b.commit(&committed_inter, &intermediate, &opt())?;

    let top = key("toplayer");
    b.prepare(&top, Some(&committed_inter), &opt())?;

    expect_any_err(
        b.remove(&committed_inter),
        &format!("remove intermediate {committed_inter:?}, which has the active child {top:?}"),
    )?;
    b.remove(&top).map_err(|e| Fail::Failed(format!("remove top layer {top:?}: {e}")))?;
    b.remove(&committed_inter).map_err(|e| {
        Fail::Failed(format!("remove {committed_inter:?} once its child was removed: {e}"))
    })?;
    b.remove(&committed_base).map_err(|e| {
        Fail::Failed(format!("remove {committed_base:?} once its child was removed: {e}"))
    })?;
    Ok(())
}

fn deleted_files_in_child_snapshot(env: &Env<'_>) -> Result<(), Fail> {
    let b = env.open()?;
    let l1 = vec![Op::file("foo", "foo\n", 0o777), Op::file("foobar", "foobar\n", 0o777)];
    let l2 = vec![Op::remove("foobar")];
    let l3 = vec![];
    check_snapshots(env, b.as_ref(), "deleted", &[l1, l2, l3], false)
}

fn move_file_from_lower_layer(env: &Env<'_>) -> Result<(), Fail> {
    let b = env.open()?;
    let l1 = vec![
        Op::dir("dir1", 0o700),
        Op::file("dir1/f1", "Hello", 0o644),
        Op::dir("dir2", 0o700),
        Op::file("dir2/f2", "...", 0o644),
    ];
    let l2 = vec![
        Op::dir("dir3", 0o700),
        Op::file("dir3/f1", "Hello", 0o644),
        Op::remove("dir1"),
        Op::link("dir2/f2", "dir3/f2"),
        Op::remove("dir2/f2"),
    ];
    check_snapshots(env, b.as_ref(), "move", &[l1, l2], false)
}

fn view_readonly(env: &Env<'_>) -> Result<(), Fail> {
    let b = env.open()?;
    let preparing = key("preparing");
    b.prepare(&preparing, None, &opt())?;
    let committed = key("committed");
    b.commit(&committed, &preparing, &opt())?;
    let view = key("view");
    let mounts = b.view(&view, Some(&committed), &opt())?;
    // The options alone prove nothing (containerd#1368): mount for real and write.
    let m = env.mount(&mounts)?;
    let written = std::fs::write(m.path().join("testfile"), "testcontent");
    m.unmount()?;
    if written.is_ok() {
        return Err(Fail::Failed(format!(
            "writing a file into mounted view {view:?} succeeded; a view must be mounted read-only (EROFS expected; mounts were {mounts:?})"
        )));
    }
    b.remove(&view).map_err(|e| Fail::Failed(format!("remove view {view:?}: {e}")))?;
    b.remove(&committed).map_err(|e| Fail::Failed(format!("remove {committed:?}: {e}")))?;
    Ok(())
}

/// containerd's `createNamedSnapshots`: `<p>c1` <- `<p>c2` committed, with the active
/// `<p>a1` and the view `<p>v1` on `<p>c2`.
fn create_named_snapshots(b: &dyn Backend, p: &str) -> wasnap::Result<Vec<String>> {
    let (c1, c2) = (format!("{p}c1"), format!("{p}c2"));
    b.prepare(&format!("{c1}-a"), None, &opt())?;
    b.commit(&c1, &format!("{c1}-a"), &opt())?;
    b.prepare(&format!("{c2}-a"), Some(&c1), &opt())?;
    b.commit(&c2, &format!("{c2}-a"), &opt())?;
    let (a1, v1) = (format!("{p}a1"), format!("{p}v1"));
    b.prepare(&a1, Some(&c2), &opt())?;
    b.view(&v1, Some(&c2), &opt())?;
    Ok(vec![c1, c2, a1, v1])
}

/// How long a walk whose callback stats may take before it counts as deadlocked.
const WALK_DEADLINE: Duration = Duration::from_secs(60);

fn stat_in_walk(env: &Env<'_>) -> Result<(), Fail> {
    let b = env.open()?;
    let prefix = "stats-in-walk-";
    let mut want = create_named_snapshots(b.as_ref(), prefix)
        .map_err(|e| Fail::Failed(format!("create the snapshots to walk: {e}")))?;
    want.sort();

    // The walk runs on its own thread so that a backend that deadlocks (holding a lock
    // across the callback that stat needs too) fails the case instead of hanging it.
    let (tx, rx) = std::sync::mpsc::channel();
    let backend = Arc::clone(&b);
    std::thread::spawn(move || {
        let mut problem: Option<String> = None;
        let mut seen = Vec::new();
        let r = backend.walk(&Filter::default(), &mut |si| {
            if !si.name.starts_with(prefix) {
                return Ok(());
            }
            seen.push(si.name.clone());
            match backend.stat(&si.name) {
                Ok(si2) => match info_diff(&si, &si2) {
                    None => Ok(()),
                    Some(d) => {
                        problem = Some(format!(
                            "stat inside the walk callback disagrees with walk about {:?}: walk vs stat: {d}",
                            si.name
                        ));
                        Err(wasnap::Error::failed_precondition("stop the walk"))
                    }
                },
                Err(e) => {
                    problem = Some(format!("stat of {:?} inside the walk callback failed: {e}", si.name));
                    Err(e)
                }
            }
        });
        let _ = tx.send((r, problem, seen));
    });
    let (r, problem, mut seen) = match rx.recv_timeout(WALK_DEADLINE) {
        Ok(v) => v,
        Err(_) => {
            return Err(Fail::Failed(format!(
                "walk did not finish within {}s when its callback called stat; the backend probably holds a lock across the callback that stat needs (deadlock)",
                WALK_DEADLINE.as_secs()
            )));
        }
    };
    if let Some(p) = problem {
        return Err(Fail::Failed(p));
    }
    r.map_err(|e| Fail::Failed(format!("walk whose callback calls stat: {e}")))?;
    seen.sort();
    ensure!(seen == want, "walk visited {seen:?} of this case's snapshots, expected {want:?}");
    Ok(())
}

fn close_twice(env: &Env<'_>) -> Result<(), Fail> {
    let b = env.open()?;
    let n = format!(
        "closeTwice-{}",
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().subsec_nanos()
    );
    let prepare = format!("{n}-prepare");
    // Some work first, so that there is internal state to release.
    b.prepare(&prepare, None, &opt())?;
    b.commit(&n, &prepare, &opt())?;
    b.remove(&n)?;
    b.close().map_err(|e| Fail::Failed(format!("the first close failed: {e}")))?;
    b.close().map_err(|e| {
        Fail::Failed(format!("the second close failed (closing twice must succeed): {e}"))
    })?;
    Ok(())
}

fn root_permission(env: &Env<'_>) -> Result<(), Fail> {
    let b = env.open()?;
    let preparing = key("preparing");
    let m = prepare_mounted(env, b.as_ref(), &preparing, None)?;
    let mode = std::fs::metadata(m.path())?.mode() & 0o777;
    m.unmount()?;
    ensure!(
        mode == 0o755,
        "the root directory of a new snapshot without parent has mode {mode:04o} when mounted, expected 0755"
    );
    Ok(())
}

fn rename(env: &Env<'_>) -> Result<(), Fail> {
    let b = env.open()?;
    let l1 = vec![
        Op::dir("dir1", 0o700),
        Op::dir("somefiles", 0o700),
        Op::file("somefiles/f1", "was here first!", 0o644),
        Op::file("somefiles/f2", "nothing interesting", 0o644),
    ];
    // containerd leaves the directory rename out on overlayfs, where renaming a lower
    // directory needs redirect_dir; here it is left out where the kernel says EXDEV.
    let l2 = vec![
        Op::rename("dir1", "dir2"),
        Op::file("somefiles/f1-overwrite", "new content 1", 0o644),
        Op::rename("somefiles/f1-overwrite", "somefiles/f1"),
        Op::rename("somefiles/f2", "somefiles/f3"),
    ];
    check_snapshots(env, b.as_ref(), "rename", &[l1, l2], true)
}

fn layers_128_mount(env: &Env<'_>) -> Result<(), Fail> {
    let b = env.open()?;
    let b = b.as_ref();
    let mut layers = vec![vec![
        Op::file("bottom", "way at the bottom\n", 0o777),
        Op::file("overwriteme", "FIRST!\n", 0o777),
        Op::dir("addhere", 0o755),
        Op::dir("onlyme", 0o755),
        Op::file("onlyme/bottom", "bye!\n", 0o777),
    ]];
    for i in 1..=127 {
        layers.push(vec![
            Op::file("overwriteme", format!("{i} WAS HERE!\n"), 0o777),
            Op::file(&format!("addhere/file-{i}"), "same\n", 0o755),
            Op::remove("onlyme"),
            Op::dir("onlyme", 0o755),
            Op::file(&format!("onlyme/file-{i}"), "only me!\n", 0o777),
        ]);
    }

    let flat = env.scratch("flat")?;
    let mut parent: Option<String> = None;
    for (i, ops) in layers.iter().enumerate() {
        let preparing = key(&format!("prepare-layer-{i}"));
        let m = prepare_mounted(env, b, &preparing, parent.as_deref())
            .map_err(|e| with_context(e, &format!("[layer {i}]")))?;
        check_equal(m.path(), &flat).map_err(|e| {
            Fail::Failed(format!(
                "[layer {i}] a new active snapshot on {} does not show its parent's tree: {e}",
                show_parent(&parent)
            ))
        })?;
        apply(&flat, ops)?;
        apply_in(m.path(), ops, &format!("[layer {i}] active snapshot {preparing:?}"))?;
        check_equal(m.path(), &flat).map_err(|e| {
            Fail::Failed(format!(
                "[layer {i}] after writing, the mounted active snapshot shows: {e}"
            ))
        })?;
        m.unmount()?;
        let name = key(&format!("committed-{i}"));
        b.commit(&name, &preparing, &opt())
            .map_err(|e| Fail::Failed(format!("[layer {i}] commit {preparing:?}: {e}")))?;
        parent = Some(name);
    }

    let view = key("fullview");
    let mounts = b
        .view(&view, parent.as_deref(), &opt())
        .map_err(|e| Fail::Failed(format!("view of the top of 128 layers: {e}")))?;
    let m =
        env.mount(&mounts).map_err(|e| with_context(e, "mount a view of the top of 128 layers"))?;
    let checked = check_equal(m.path(), &flat);
    m.unmount()?;
    checked.map_err(|e| Fail::Failed(format!("a view of the top of 128 layers shows: {e}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use wasnap::{Backend, Filter, Info, Labels, Mount, Wrapper};

    use super::CASES;
    use crate::harness::{Case, Factory, Options, Outcome, open_native, run};
    use crate::report::Report;

    struct NativeFactory;

    impl Factory for NativeFactory {
        fn name(&self) -> String {
            "native".into()
        }
        fn open(&self, dir: &Path) -> wasnap::Result<Arc<dyn Backend>> {
            open_native(dir)
        }
    }

    fn is_root() -> bool {
        rustix::process::geteuid().is_root()
    }

    fn show(report: &Report) {
        let _ = report.write_table(&mut std::io::stderr());
    }

    #[test]
    fn every_case_passes_against_the_native_driver() {
        let report = run(&NativeFactory, CASES, &Options::default());
        let ok = if is_root() { report.passed() == CASES.len() } else { report.failed() == 0 };
        show(&report);
        assert_eq!(CASES.len(), 21);
        assert!(ok, "{}", report.summary());
    }

    /// Rename's escape hatch recognises overlayfs's refusal to rename a lower directory
    /// without `redirect_dir`, as `fixture::apply` reports it.
    #[test]
    fn a_refused_directory_rename_on_overlayfs_is_recognised() {
        if !is_root() {
            eprintln!("skipped: needs root to mount overlayfs");
            return;
        }
        let tmp = tempfile::tempdir_in("/dev/shm").unwrap();
        let d = |n: &str| tmp.path().join(n);
        for n in ["lower/dir1", "upper", "work", "merged"] {
            std::fs::create_dir_all(d(n)).unwrap();
        }
        let opts = vec![
            format!("lowerdir={}", d("lower").display()),
            format!("upperdir={}", d("upper").display()),
            format!("workdir={}", d("work").display()),
            "redirect_dir=off".to_owned(),
        ];
        let m = Mount {
            kind: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options: opts,
        };
        if let Err(e) = wasnap::mount::mount_all(&[m], &d("merged")) {
            eprintln!("skipped: cannot mount overlayfs here: {e}");
            return;
        }
        let op = crate::fixture::Op::rename("dir1", "dir2");
        let r = crate::fixture::apply(&d("merged"), std::slice::from_ref(&op));
        wasnap::mount::unmount(&d("merged")).unwrap();
        let e = r.unwrap_err();
        assert!(super::refused_rename(&op, &e), "{e:?}");
    }

    /// Ways to break the native driver, each of which some case must notice.
    #[derive(Debug, Clone, Copy)]
    enum Breakage {
        /// Views are mounted read-write.
        RwViews,
        /// Walk visits everything, whatever the filter.
        WalkIgnoresFilters,
        /// Removing a snapshot with children "succeeds" (and does nothing).
        RemoveIgnoresChildren,
        /// Commit throws away what was written in the active snapshot.
        CommitLosesChanges,
        /// A new root snapshot's directory has mode 0700.
        PrivateRoot,
    }

    struct Broken {
        inner: Arc<dyn Backend>,
        how: Breakage,
    }

    impl Wrapper for Broken {
        fn inner(&self) -> &dyn Backend {
            &*self.inner
        }
        fn prepare(
            &self,
            key: &str,
            parent: Option<&str>,
            labels: &Labels,
        ) -> wasnap::Result<Vec<Mount>> {
            let mounts = self.inner.prepare(key, parent, labels)?;
            if let (Breakage::PrivateRoot, None) = (self.how, parent) {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&mounts[0].source, std::fs::Permissions::from_mode(0o700))
                    .unwrap();
            }
            Ok(mounts)
        }
        fn view(
            &self,
            key: &str,
            parent: Option<&str>,
            labels: &Labels,
        ) -> wasnap::Result<Vec<Mount>> {
            let mut mounts = self.inner.view(key, parent, labels)?;
            if let Breakage::RwViews = self.how {
                for m in &mut mounts {
                    m.options.retain(|o| o != "ro");
                    m.options.push("rw".into());
                }
            }
            Ok(mounts)
        }
        fn commit(&self, name: &str, key: &str, labels: &Labels) -> wasnap::Result<()> {
            if let Breakage::CommitLosesChanges = self.how {
                let info = self.inner.stat(key)?;
                self.inner.remove(key)?;
                self.inner.prepare(key, info.parent.as_deref(), &info.labels)?;
            }
            self.inner.commit(name, key, labels)
        }
        fn remove(&self, key: &str) -> wasnap::Result<()> {
            match (self.how, self.inner.remove(key)) {
                (Breakage::RemoveIgnoresChildren, Err(e))
                    if e.kind() == wasnap::ErrorKind::FailedPrecondition =>
                {
                    Ok(())
                }
                (_, r) => r,
            }
        }
        fn walk(
            &self,
            filter: &Filter,
            f: &mut dyn FnMut(Info) -> wasnap::Result<()>,
        ) -> wasnap::Result<()> {
            match self.how {
                Breakage::WalkIgnoresFilters => self.inner.walk(&Filter::default(), f),
                _ => self.inner.walk(filter, f),
            }
        }
    }

    struct BrokenFactory(Breakage);

    impl Factory for BrokenFactory {
        fn name(&self) -> String {
            format!("native, broken: {:?}", self.0)
        }
        fn open(&self, dir: &Path) -> wasnap::Result<Arc<dyn Backend>> {
            Ok(Arc::new(Broken { inner: open_native(dir)?, how: self.0 }))
        }
    }

    #[test]
    fn broken_backends_fail_the_case_that_checks_what_they_break() {
        if !is_root() {
            eprintln!("skipped: needs root to mount snapshots");
            return;
        }
        let expectations: &[(Breakage, &[&str])] = &[
            (Breakage::RwViews, &["ViewReadonly"]),
            (Breakage::WalkIgnoresFilters, &["Walk"]),
            (Breakage::RemoveIgnoresChildren, &["RemoveIntermediateSnapshot", "Basic"]),
            (
                Breakage::CommitLosesChanges,
                &["LayerFileUpdate", "DeletedFilesInChildSnapshot", "Basic"],
            ),
            (Breakage::PrivateRoot, &["RootPermission"]),
        ];
        for (how, names) in expectations {
            let cases: Vec<Case> =
                CASES.iter().filter(|c| names.contains(&c.name)).copied().collect();
            assert_eq!(cases.len(), names.len(), "{names:?}");
            let report = run(&BrokenFactory(*how), &cases, &Options::default());
            show(&report);
            for r in &report.results {
                assert!(
                    matches!(r.outcome, Outcome::Failed(_)),
                    "{how:?}: case {} should fail but ended {:?}",
                    r.name,
                    r.outcome
                );
            }
        }
    }
}
