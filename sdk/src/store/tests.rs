//! The store on the build machine's filesystem, including what a crash leaves behind.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::ErrorKind;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

fn kind_of<T: std::fmt::Debug>(r: Result<T>) -> ErrorKind {
    r.expect_err("expected an error").kind()
}

/// A scratch directory. WASI has no `temp_dir()`: there (tests run under a wasm runtime
/// with a scratch root preopened) it is made in `/tmp`.
fn tempdir() -> tempfile::TempDir {
    if cfg!(target_os = "wasi") {
        tempfile::tempdir_in("/tmp").unwrap()
    } else {
        tempfile::tempdir().unwrap()
    }
}

fn open(dir: &Path) -> Store {
    Store::open(dir.join("meta")).unwrap()
}

/// A committed snapshot `name` without parent, made through an active one.
fn committed(s: &Store, name: &str, parent: Option<&str>) -> Record {
    let key = format!("{name}-active");
    s.create(&key, parent, Kind::Active, &Labels::new()).unwrap();
    s.commit(name, &key, &Labels::new()).unwrap()
}

fn names(s: &Store) -> Vec<String> {
    s.records().unwrap().into_iter().map(|r| r.name).collect()
}

#[test]
fn create_stat_and_the_checks_of_create() {
    let t = tempdir();
    let s = open(t.path());
    let a = s.create("ns/1/a", None, Kind::Active, &labels(&[("l", "v")])).unwrap();
    let info = s.stat("ns/1/a").unwrap();
    assert_eq!((info.kind, info.parent, info.labels), (Kind::Active, None, labels(&[("l", "v")])));
    assert_eq!(info.created, info.updated);

    assert_eq!(
        kind_of(s.create("ns/1/a", None, Kind::View, &Labels::new())),
        ErrorKind::AlreadyExists
    );
    assert_eq!(
        kind_of(s.create("x", Some("missing"), Kind::Active, &Labels::new())),
        ErrorKind::NotFound
    );
    assert_eq!(
        kind_of(s.create("x", Some("ns/1/a"), Kind::Active, &Labels::new())),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        kind_of(s.create("", None, Kind::Active, &Labels::new())),
        ErrorKind::InvalidArgument
    );
    assert_eq!(kind_of(s.stat("missing")), ErrorKind::NotFound);

    let base = committed(&s, "base", None);
    let v = s.create("v", Some("base"), Kind::View, &Labels::new()).unwrap();
    assert_eq!(
        kind_of(s.create("x", Some("v"), Kind::Active, &Labels::new())),
        ErrorKind::InvalidArgument
    );
    assert!(a.id < base.id && base.id < v.id);
    assert_eq!(s.stat("v").unwrap().parent.as_deref(), Some("base"));
}

#[test]
fn commit_moves_the_record_and_keeps_its_id() {
    let t = tempdir();
    let s = open(t.path());
    let base = committed(&s, "base", None);
    let a = s.create("a", Some("base"), Kind::Active, &Labels::new()).unwrap();
    s.set_data("a", Some(serde_json::json!({"upper": 7}))).unwrap();
    let c = s.commit("c", "a", &labels(&[("k", "v")])).unwrap();
    assert_eq!((c.id, c.kind, c.parent.as_deref()), (a.id, Kind::Committed, Some("base")));
    assert_eq!(c.data, Some(serde_json::json!({"upper": 7})));
    assert_eq!(s.stat("c").unwrap().labels, labels(&[("k", "v")]));
    assert_eq!(kind_of(s.stat("a")), ErrorKind::NotFound);
    assert_eq!(s.children("base").unwrap(), ["c"]);
    assert_eq!(base.id, s.get("base").unwrap().id);

    assert_eq!(kind_of(s.commit("x", "a", &Labels::new())), ErrorKind::NotFound);
    assert_eq!(kind_of(s.commit("x", "c", &Labels::new())), ErrorKind::FailedPrecondition);
    s.create("v", Some("base"), Kind::View, &Labels::new()).unwrap();
    assert_eq!(kind_of(s.commit("x", "v", &Labels::new())), ErrorKind::FailedPrecondition);
    s.create("b", None, Kind::Active, &Labels::new()).unwrap();
    assert_eq!(kind_of(s.commit("c", "b", &Labels::new())), ErrorKind::AlreadyExists);
    assert_eq!(s.stat("b").unwrap().kind, Kind::Active, "a failed commit changes nothing");
    assert!(
        fs::read_dir(s.dir().join(TMP)).unwrap().next().is_none(),
        "commits leave nothing in tmp/"
    );
}

#[test]
fn remove_refuses_parents_and_ids_are_never_reused() {
    let t = tempdir();
    let s = open(t.path());
    let base = committed(&s, "base", None);
    committed(&s, "mid", Some("base"));
    let top = s.create("top", Some("mid"), Kind::Active, &Labels::new()).unwrap();
    assert_eq!(kind_of(s.remove("base")), ErrorKind::FailedPrecondition);
    assert_eq!(kind_of(s.remove("mid")), ErrorKind::FailedPrecondition);
    assert_eq!(kind_of(s.remove("missing")), ErrorKind::NotFound);
    assert_eq!(s.remove("top").unwrap().id, top.id);
    assert_eq!(s.remove("mid").unwrap().parent.as_deref(), Some("base"));
    assert_eq!(s.remove("base").unwrap().id, base.id);
    assert!(names(&s).is_empty());

    let again = s.create("top", None, Kind::Active, &Labels::new()).unwrap();
    assert!(again.id > top.id);
    drop(s);
    let s = open(t.path());
    let after_reopen = s.create("other", None, Kind::Active, &Labels::new()).unwrap();
    assert!(after_reopen.id > again.id);
    assert_eq!(
        fs::read_dir(s.dir().join(IDS)).unwrap().count(),
        1,
        "only the highest id marker stays"
    );
}

#[test]
fn update_follows_field_paths_and_moves_updated_forward() {
    let t = tempdir();
    let s = open(t.path());
    committed(&s, "c1", None);
    let before = s.stat("c1").unwrap();
    let mut info = before.clone();
    info.labels = labels(&[("l1", "v1"), ("l2", "v2")]);
    info.parent = Some("doesnotexist".into());
    info.kind = Kind::Active;
    let after = s.update(&info, &[]).unwrap();
    assert_eq!(after.labels, info.labels);
    assert_eq!(
        (after.kind, after.parent.clone(), after.created),
        (Kind::Committed, None, before.created)
    );
    assert!(after.updated > before.updated);

    info.labels = labels(&[("l1", "new"), ("l3", "v3")]);
    let after = s.update(&info, &["labels.l1".into(), "labels.l2".into()]).unwrap();
    assert_eq!(after.labels, labels(&[("l1", "new")]));
    assert_eq!(kind_of(s.update(&info, &["parent".into()])), ErrorKind::InvalidArgument);
    assert_eq!(s.stat("c1").unwrap().labels, labels(&[("l1", "new")]));
    info.name = "missing".into();
    assert_eq!(kind_of(s.update(&info, &[])), ErrorKind::NotFound);
}

#[test]
fn list_pages_in_byte_order_of_name() {
    let t = tempdir();
    let s = open(t.path());
    let long = format!("ns/9/{}", "x".repeat(400));
    let mut keys: Vec<String> =
        ["b", "a/2", "a/10", "A", "a", "ä", "a b", ".dot", "%41", long.as_str()]
            .iter()
            .map(|k| (*k).to_owned())
            .collect();
    for k in &keys {
        s.create(k, None, Kind::Active, &Labels::new()).unwrap();
    }
    keys.sort();
    assert_eq!(names(&s), keys);
    assert_eq!(s.stat(&long).unwrap().name, long);

    for limit in 1..=4 {
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = s.list(after.as_deref(), limit).unwrap();
            assert!(page.len() <= limit as usize);
            seen.extend(page.iter().map(|i| i.name.clone()));
            if page.len() < limit as usize {
                break;
            }
            after = page.last().map(|i| i.name.clone());
        }
        assert_eq!(seen, keys, "walk with pages of {limit}");
    }
    assert!(s.list(None, 0).unwrap().is_empty());
    assert_eq!(
        s.list(Some("a"), 2).unwrap().iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
        ["a b", "a/10"]
    );
}

#[test]
fn leftover_temporary_files_are_ignored_then_removed() {
    let t = tempdir();
    let s = open(t.path());
    s.create("k", None, Kind::Active, &Labels::new()).unwrap();
    let tmp = s.dir().join(TMP);
    fs::write(tmp.join("new-dead-1"), b"{\"name\": \"half").unwrap();
    fs::write(tmp.join("commit-dead-2"), b"garbage").unwrap();
    fs::write(tmp.join("upd-dead-3"), b"").unwrap();
    // A stray in records/ (not a name the store makes) is not a snapshot either.
    fs::write(s.dir().join(RECORDS).join("not a record"), b"").unwrap();
    drop(s);

    let s = open(t.path());
    assert_eq!(names(&s), ["k"]);
    assert_eq!(fs::read_dir(&tmp).unwrap().count(), 3, "young leftovers may be another instance's");
    drop(s);
    let s = Store::open_with_grace(t.path().join("meta"), Duration::ZERO).unwrap();
    assert_eq!(fs::read_dir(&tmp).unwrap().count(), 0);
    assert_eq!(names(&s), ["k"]);
}

#[test]
fn a_commit_cut_short_is_finished_on_open() {
    let t = tempdir();
    let s = open(t.path());
    committed(&s, "base", None);
    let a = s.create("a", Some("base"), Kind::Active, &Labels::new()).unwrap();
    s.commit_until("c", "a", &Labels::new(), CommitStep::Linked).unwrap();
    // The crash: both records are there with one id.
    assert_eq!(s.get("a").unwrap().id, s.get("c").unwrap().id);
    drop(s);

    let s = open(t.path());
    assert_eq!(kind_of(s.stat("a")), ErrorKind::NotFound);
    let c = s.get("c").unwrap();
    assert_eq!((c.id, c.kind), (a.id, Kind::Committed));
    assert_eq!(s.children("base").unwrap(), ["c"]);
    assert_eq!(kind_of(s.remove("base")), ErrorKind::FailedPrecondition);
    s.remove("c").unwrap();
    s.remove("base").unwrap();
    assert!(fs::read_dir(s.dir().join(TMP)).unwrap().next().is_none());
}

#[test]
fn repair_keeps_the_committed_record_when_the_commit_marker_is_lost() {
    let t = tempdir();
    let s = open(t.path());
    let a = s.create("a", None, Kind::Active, &Labels::new()).unwrap();
    s.commit_until("c", "a", &Labels::new(), CommitStep::Linked).unwrap();
    for name in fsops::dir_names(&s.dir().join(TMP)).unwrap() {
        fs::remove_file(s.dir().join(TMP).join(name)).unwrap();
    }
    // An unrelated active snapshot with its own id is kept.
    s.create("b", None, Kind::Active, &Labels::new()).unwrap();
    s.repair().unwrap();
    assert_eq!(names(&s), ["b", "c"]);
    assert_eq!(s.get("c").unwrap().id, a.id);
}

#[test]
fn a_finished_commit_is_not_undone_when_its_key_is_used_again() {
    let t = tempdir();
    let s = open(t.path());
    committed(&s, "base", None);
    s.create("a", Some("base"), Kind::Active, &Labels::new()).unwrap();
    s.commit_until("c", "a", &Labels::new(), CommitStep::Linked).unwrap();
    s.finish_commit(&s.get("c").unwrap()).unwrap();
    // The key comes back as a new snapshot before the commit's marker is cleaned up.
    s.create("a", Some("base"), Kind::Active, &Labels::new()).unwrap();
    drop(s);
    let s = open(t.path());
    assert_eq!(names(&s), ["a", "base", "c"]);
    assert_eq!(s.children("base").unwrap(), ["a", "c"]);
}

#[test]
fn stale_child_markers_do_not_block_remove() {
    let t = tempdir();
    let s = open(t.path());
    committed(&s, "base", None);
    // A create that marked its child and died before writing the record.
    let r = s.reserve("ghost", Some("base")).unwrap();
    s.mark_child("base", "ghost").unwrap();
    drop(r);
    assert!(s.children("base").unwrap().is_empty());
    s.remove("base").unwrap();
}

#[test]
fn reservations_are_in_flight_until_inserted_or_dropped() {
    let t = tempdir();
    let s = open(t.path());
    let r = s.reserve("k", None).unwrap();
    let id = r.id;
    assert_eq!(s.inflight().unwrap(), BTreeSet::from([id]));
    assert!(s.ids().unwrap().is_empty());
    let rec = s.insert(r, Kind::View, &Labels::new()).unwrap();
    assert_eq!(rec.id, id);
    assert!(s.inflight().unwrap().is_empty());
    assert_eq!(s.ids().unwrap(), BTreeSet::from([id]));

    let r = s.reserve("j", None).unwrap();
    drop(r);
    assert!(s.inflight().unwrap().is_empty());

    // One a crash left behind is dropped once it is older than the grace period.
    let r = s.reserve("dead", None).unwrap();
    std::mem::forget(r);
    assert_eq!(s.inflight().unwrap().len(), 1);
    let s = Store::open_with_grace(s.dir(), Duration::ZERO).unwrap();
    assert!(s.inflight().unwrap().is_empty());
    assert_eq!(names(&s), ["k"]);
}

#[test]
fn an_insert_loses_cleanly_to_another_instance_that_took_the_key() {
    let t = tempdir();
    let s1 = open(t.path());
    let s2 = open(t.path());
    let r1 = s1.reserve("k", None).unwrap();
    let r2 = s2.reserve("k", None).unwrap();
    s2.insert(r2, Kind::Active, &Labels::new()).unwrap();
    assert_eq!(kind_of(s1.insert(r1, Kind::View, &Labels::new())), ErrorKind::AlreadyExists);
    assert_eq!(s1.stat("k").unwrap().kind, Kind::Active);
    assert!(s1.inflight().unwrap().is_empty());
}

#[test]
#[cfg_attr(target_os = "wasi", ignore = "wasm32-wasip2 has no threads")]
fn instances_sharing_the_directory_create_concurrently() {
    let t = tempdir();
    let base = {
        let s = open(t.path());
        committed(&s, "base", None)
    };
    let dir = Arc::new(t.path().to_owned());
    let threads: Vec<_> = (0..8)
        .map(|n| {
            let dir = dir.clone();
            std::thread::spawn(move || {
                let s = open(&dir);
                let mut ids = Vec::new();
                for i in 0..10 {
                    let key = format!("t{n}-{i}");
                    ids.push(
                        s.create(&key, Some("base"), Kind::Active, &Labels::new()).unwrap().id,
                    );
                    if i % 2 == 0 {
                        s.commit(&format!("{key}-c"), &key, &Labels::new()).unwrap();
                    }
                }
                let same = s.create("contended", None, Kind::Active, &Labels::new());
                (ids, same.is_ok())
            })
        })
        .collect();
    let mut all_ids = BTreeSet::new();
    let mut winners = 0;
    for th in threads {
        let (ids, won) = th.join().unwrap();
        winners += usize::from(won);
        for id in ids {
            assert!(all_ids.insert(id), "id {id} handed out twice");
        }
    }
    assert_eq!(winners, 1, "exactly one instance creates a contended key");
    let s = open(t.path());
    assert_eq!(s.children("base").unwrap().len(), 80);
    assert!(!all_ids.contains(&base.id));
    assert_eq!(s.records().unwrap().len(), 82);
}

#[test]
fn ancestors_nearest_first() {
    let t = tempdir();
    let s = open(t.path());
    committed(&s, "l1", None);
    committed(&s, "l2", Some("l1"));
    let top = s.create("top", Some("l2"), Kind::View, &Labels::new()).unwrap();
    let chain: Vec<String> = s.ancestors(&top).unwrap().into_iter().map(|r| r.name).collect();
    assert_eq!(chain, ["l2", "l1"]);
}
