//! The metadata layer's semantics, over the native driver and over backends that
//! misbehave on purpose.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cap_std::ambient_authority;
use cap_std::fs::Dir;
use wasnap::driver::storage::Store;
use wasnap::fault::Action;
use wasnap::metadata::MetaDb;
use wasnap::snapshot::{LABEL_SNAPSHOT_REF, MAX_LABEL_SIZE};
use wasnap::{Backend, ErrorKind, Filter, Info, Kind, Labels, Result, Snapshotter};

use crate::common::*;

fn none() -> Labels {
    Labels::new()
}

#[test]
fn the_same_key_lives_independently_in_two_namespaces() {
    let s = native_stack();
    let (a, b) = (ctx("tenant-a"), ctx("tenant-b"));
    let ma = s.sn.prepare(&a, "k", None, &labels(&[("who", "a")])).unwrap();
    let mb = s.sn.prepare(&b, "k", None, &labels(&[("who", "b")])).unwrap();
    assert_ne!(source(&ma), source(&mb), "two namespaces, two backend snapshots");
    assert_eq!(s.sn.stat(&a, "k").unwrap().labels["who"], "a");
    assert_eq!(s.sn.stat(&b, "k").unwrap().labels["who"], "b");
    assert_eq!(names(&list(&s.sn, &a, &[]).unwrap()), ["k"]);

    // Backend keys carry the namespace; the backend never sees the bare key.
    let bkeys: Vec<String> =
        backend_keys(s.sn.backend().as_ref()).into_iter().map(|i| i.name).collect();
    assert_eq!(bkeys.len(), 2);
    assert!(bkeys.iter().any(|k| k.starts_with("tenant-a/") && k.ends_with("/k")), "{bkeys:?}");
    assert!(bkeys.iter().any(|k| k.starts_with("tenant-b/") && k.ends_with("/k")), "{bkeys:?}");

    s.sn.remove(&a, "k").unwrap();
    assert_eq!(s.sn.stat(&a, "k").unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(s.sn.stat(&b, "k").unwrap().labels["who"], "b");
    assert!(source(&mb).is_dir(), "the other namespace's data is untouched");
    assert_eq!(backend_keys(s.sn.backend().as_ref()).len(), 1);
}

#[test]
fn kinds_parents_and_timestamps() {
    let s = native_stack();
    let c = ctx("default");
    s.sn.prepare(&c, "a", None, &none()).unwrap();
    let active = s.sn.stat(&c, "a").unwrap();
    assert_eq!((active.kind, active.parent.as_deref()), (Kind::Active, None));
    s.sn.commit(&c, "base", "a", &labels(&[("l", "1")])).unwrap();
    assert_eq!(
        s.sn.stat(&c, "a").unwrap_err().kind(),
        ErrorKind::NotFound,
        "commit consumes the key"
    );
    let base = s.sn.stat(&c, "base").unwrap();
    assert_eq!(base.kind, Kind::Committed);
    assert_eq!(base.labels, labels(&[("l", "1")]), "a commit carries the commit's labels");
    assert!(base.created >= active.created);

    s.sn.prepare(&c, "child", Some("base"), &none()).unwrap();
    s.sn.view(&c, "v", Some("base"), &none()).unwrap();
    assert_eq!(s.sn.stat(&c, "child").unwrap().parent.as_deref(), Some("base"));
    assert_eq!(s.sn.stat(&c, "v").unwrap().kind, Kind::View);
    s.sn.commit(&c, "top", "child", &none()).unwrap();
    assert_eq!(
        s.sn.stat(&c, "top").unwrap().parent.as_deref(),
        Some("base"),
        "commit keeps the parent"
    );
}

/// As containerd's snapshotters answer: only active snapshots and views have mounts,
/// and a view's usage is the zero it was made with (a native view is a whole copy).
#[test]
fn a_committed_snapshot_has_no_mounts_and_a_view_no_usage() {
    let s = native_stack();
    let c = ctx("default");
    let m = s.sn.prepare(&c, "a", None, &none()).unwrap();
    std::fs::write(source(&m).join("f"), vec![1u8; 64 << 10]).unwrap();
    s.sn.commit(&c, "base", "a", &none()).unwrap();
    let e = s.sn.mounts(&c, "base").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
    assert!(s.sn.usage(&c, "base").unwrap().size >= 64 << 10);

    let v = s.sn.view(&c, "v", Some("base"), &none()).unwrap();
    assert!(source(&v).join("f").is_file(), "the view shows the parent's data");
    assert_eq!(s.sn.mounts(&c, "v").unwrap(), v);
    assert_eq!(s.sn.usage(&c, "v").unwrap(), wasnap::Usage::default());
}

#[test]
fn commit_of_a_view_fails() {
    let s = native_stack();
    let c = ctx("default");
    s.sn.prepare(&c, "a", None, &none()).unwrap();
    s.sn.commit(&c, "base", "a", &none()).unwrap();
    s.sn.view(&c, "v", Some("base"), &none()).unwrap();
    let err = s.sn.commit(&c, "nope", "v", &none()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert_eq!(s.sn.stat(&c, "v").unwrap().kind, Kind::View, "the view is untouched");
    assert_eq!(s.sn.stat(&c, "nope").unwrap_err().kind(), ErrorKind::NotFound);
    // And a committed snapshot cannot be committed again either.
    assert_eq!(
        s.sn.commit(&c, "again", "base", &none()).unwrap_err().kind(),
        ErrorKind::FailedPrecondition
    );
}

#[test]
fn remove_with_children_fails_with_failed_precondition() {
    let s = native_stack();
    let c = ctx("default");
    s.sn.prepare(&c, "a", None, &none()).unwrap();
    s.sn.commit(&c, "base", "a", &none()).unwrap();
    s.sn.prepare(&c, "child", Some("base"), &none()).unwrap();
    let err = s.sn.remove(&c, "base").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert!(s.sn.stat(&c, "base").is_ok());
    s.sn.remove(&c, "child").unwrap();
    s.sn.remove(&c, "base").unwrap();
    assert!(list(&s.sn, &c, &[]).unwrap().is_empty());
    assert!(backend_keys(s.sn.backend().as_ref()).is_empty(), "backend emptied too");
    assert_eq!(s.sn.remove(&c, "base").unwrap_err().kind(), ErrorKind::NotFound);
}

#[test]
fn names_and_parents_are_checked() {
    let s = native_stack();
    let c = ctx("default");
    s.sn.prepare(&c, "a", None, &none()).unwrap();
    let kind = |r: wasnap::Result<_>| r.map(drop).unwrap_err().kind();
    assert_eq!(kind(s.sn.prepare(&c, "a", None, &none())), ErrorKind::AlreadyExists);
    assert_eq!(kind(s.sn.prepare(&c, "b", Some("missing"), &none())), ErrorKind::NotFound);
    assert_eq!(
        kind(s.sn.prepare(&c, "b", Some("a"), &none())),
        ErrorKind::InvalidArgument,
        "parent must be committed"
    );
    assert_eq!(kind(s.sn.prepare(&c, "", None, &none())), ErrorKind::InvalidArgument);
    s.sn.prepare(&c, "x", None, &none()).unwrap();
    s.sn.commit(&c, "done", "x", &none()).unwrap();
    assert_eq!(s.sn.commit(&c, "done", "a", &none()).unwrap_err().kind(), ErrorKind::AlreadyExists);
    assert_eq!(s.sn.commit(&c, "new", "missing", &none()).unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(wasnap::Ctx::new("bad/ns").unwrap_err().kind(), ErrorKind::InvalidArgument);
}

#[test]
fn labels_over_the_limit_are_rejected_everywhere() {
    let s = native_stack();
    let c = ctx("default");
    let key = "k".repeat(96);
    let fits = labels(&[(&key, &"v".repeat(MAX_LABEL_SIZE - key.len()))]);
    let over = labels(&[(&key, &"v".repeat(MAX_LABEL_SIZE - key.len() + 1))]);
    s.sn.prepare(&c, "ok", None, &fits).unwrap();

    let err = s.sn.prepare(&c, "big", None, &over).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(err.to_string().contains("4097"), "the message says how long: {err}");
    assert_eq!(s.sn.stat(&c, "big").unwrap_err().kind(), ErrorKind::NotFound, "nothing recorded");
    assert_eq!(s.sn.view(&c, "big", None, &over).unwrap_err().kind(), ErrorKind::InvalidArgument);

    s.sn.prepare(&c, "a", None, &none()).unwrap();
    assert_eq!(s.sn.commit(&c, "c", "a", &over).unwrap_err().kind(), ErrorKind::InvalidArgument);
    assert_eq!(s.sn.stat(&c, "a").unwrap().kind, Kind::Active, "the failed commit changed nothing");

    let mut info = s.sn.stat(&c, "a").unwrap();
    info.labels = over.clone();
    assert_eq!(s.sn.update(&c, &info, &[]).unwrap_err().kind(), ErrorKind::InvalidArgument);
    assert!(s.sn.stat(&c, "a").unwrap().labels.is_empty());
}

/// containerd 2 names the parent a layer is to be committed onto (a rebase): none here
/// can rebase, so another parent is refused and the active snapshot stays as it was;
/// its own parent, or none named, commits.
#[test]
fn a_commit_onto_another_parent_is_refused_and_changes_nothing() {
    let s = native_stack();
    let c = ctx("default");
    s.sn.prepare(&c, "base-active", None, &none()).unwrap();
    s.sn.commit(&c, "base", "base-active", &none()).unwrap();
    s.sn.prepare(&c, "other-active", None, &none()).unwrap();
    s.sn.commit(&c, "other", "other-active", &none()).unwrap();
    s.sn.prepare(&c, "top", Some("base"), &none()).unwrap();
    s.sn.prepare(&c, "lone", None, &none()).unwrap();
    let refused = |key: &str, parent: &str| {
        let err = s.sn.commit_onto(&c, "layer", key, Some(parent), &none()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotImplemented, "{err}");
        assert!(err.to_string().contains("rebasing is not supported"), "{err}");
        assert_eq!(s.sn.stat(&c, key).unwrap().kind, Kind::Active);
        assert_eq!(s.sn.stat(&c, "layer").unwrap_err().kind(), ErrorKind::NotFound);
    };
    refused("top", "other");
    refused("lone", "base");
    // Checked on the snapshot as it is when committed: "top" made again on "other".
    s.sn.remove(&c, "top").unwrap();
    s.sn.prepare(&c, "top", Some("other"), &none()).unwrap();
    refused("top", "base");
    s.sn.commit_onto(&c, "layer", "top", Some("other"), &none()).unwrap();
    assert_eq!(s.sn.stat(&c, "layer").unwrap().parent.as_deref(), Some("other"));
    s.sn.commit_onto(&c, "alone", "lone", None, &none()).unwrap();
    assert_eq!(s.sn.stat(&c, "alone").unwrap().parent, None);
}

#[test]
fn update_changes_labels_only() {
    let s = native_stack();
    let c = ctx("default");
    s.sn.prepare(&c, "a", None, &labels(&[("keep", "1"), ("drop", "2")])).unwrap();
    let before = s.sn.stat(&c, "a").unwrap();

    let mut info = before.clone();
    info.kind = Kind::Committed; // not a label: must be ignored or refused, never applied
    for bad in ["kind", "parent", "name", "created", "labels_x", ""] {
        let err = s.sn.update(&c, &info, &[bad.to_string()]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{bad}: {err}");
    }

    // labels.<k>: set one, delete one (absent from the new info), leave the rest.
    let mut info = before.clone();
    info.labels = labels(&[("new", "3")]);
    let after =
        s.sn.update(&c, &info, &["labels.new".to_string(), "labels.drop".to_string()]).unwrap();
    assert_eq!(after.labels, labels(&[("keep", "1"), ("new", "3")]));
    assert_eq!(after.kind, Kind::Active);
    assert_eq!(after.created, before.created);
    assert!(after.updated > before.updated);

    // `labels` and no field paths both replace the whole set.
    info.labels = labels(&[("only", "x")]);
    assert_eq!(s.sn.update(&c, &info, &["labels".to_string()]).unwrap().labels, info.labels);
    info.labels = labels(&[("other", "y")]);
    assert_eq!(s.sn.update(&c, &info, &[]).unwrap().labels, info.labels);
    assert_eq!(s.sn.stat(&c, "a").unwrap().labels, info.labels, "persisted");

    info.name = "missing".into();
    assert_eq!(s.sn.update(&c, &info, &[]).unwrap_err().kind(), ErrorKind::NotFound);
}

/// Updates of one snapshot's labels racing each other all succeed, each applied to the
/// record as the one before left it, as containerd's updates (one write at a time) are:
/// labels only the record keeps, and inherited ones the backend keeps too.
#[test]
fn racing_updates_of_one_snapshot_all_succeed() {
    let s = native_stack();
    let c = ctx("default");
    s.sn.prepare(&c, "a", None, &none()).unwrap();
    let label = |t: usize| {
        if t.is_multiple_of(2) { format!("l{t}") } else { format!("containerd.io/snapshot/l{t}") }
    };
    let barrier = std::sync::Barrier::new(8);
    std::thread::scope(|scope| {
        for t in 0..8 {
            let (s, c, barrier, label) = (&s, &c, &barrier, &label);
            scope.spawn(move || {
                barrier.wait();
                for round in 0..40 {
                    let mut info = s.sn.stat(c, "a").unwrap();
                    info.labels = labels(&[(&label(t), &round.to_string())]);
                    let after = s.sn.update(c, &info, &[format!("labels.{}", label(t))]).unwrap();
                    assert_eq!(after.labels[&label(t)], round.to_string());
                }
            });
        }
    });
    let mut want: Vec<(String, String)> = (0..8).map(|t| (label(t), "39".into())).collect();
    want.sort();
    let got: Vec<(String, String)> = s.sn.stat(&c, "a").unwrap().labels.into_iter().collect();
    assert_eq!(got, want);
    // The backend keeps the inherited ones, as last set.
    let inner = backend_keys(s.sn.backend().as_ref());
    let inherited: Vec<(String, String)> = inner[0].labels.clone().into_iter().collect();
    let want: Vec<_> = want.into_iter().filter(|(k, _)| k.starts_with("containerd.io/")).collect();
    assert_eq!(inherited, want);
}

#[test]
fn only_inherited_labels_reach_the_backend() {
    let mut flaky = None;
    let s = stack_with(|n| {
        let f = Flaky::new(n);
        flaky = Some(f.clone());
        f
    });
    let flaky = flaky.unwrap();
    let c = ctx("default");
    let all = labels(&[
        ("containerd.io/snapshot/remote.digest", "sha256:abc"),
        (LABEL_SNAPSHOT_REF, "layer-1"),
        ("containerd.io/gc.root", "x"),
        ("mine", "1"),
    ]);
    s.sn.prepare(&c, "a", None, &all).unwrap();
    let seen = flaky.seen_labels.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![labels(&[
            ("containerd.io/snapshot/remote.digest", "sha256:abc"),
            (LABEL_SNAPSHOT_REF, "layer-1")
        ])]
    );
    assert_eq!(s.sn.stat(&c, "a").unwrap().labels, all, "the metadata keeps them all");

    // Updating an inherited label updates the backend; others do not reach it.
    let bkey = backend_keys(s.sn.backend().as_ref())[0].name.clone();
    let mut info = s.sn.stat(&c, "a").unwrap();
    info.labels.insert("containerd.io/snapshot/remote.digest".into(), "sha256:def".into());
    info.labels.insert("mine".into(), "2".into());
    s.sn.update(&c, &info, &[]).unwrap();
    let inner = flaky.stat(&bkey).unwrap();
    assert_eq!(inner.labels["containerd.io/snapshot/remote.digest"], "sha256:def");
    assert!(!inner.labels.contains_key("mine"));
}

#[test]
fn filters_follow_containerd_syntax() {
    let s = native_stack();
    let c = ctx("default");
    s.sn.prepare(&c, "a", None, &labels(&[("a.b", "c"), ("team", "x")])).unwrap();
    s.sn.commit(&c, "base", "a", &labels(&[("a.b", "c")])).unwrap();
    s.sn.prepare(&c, "child-1", Some("base"), &labels(&[("team", "x")])).unwrap();
    s.sn.prepare(&c, "child-2", Some("base"), &labels(&[("team", "y")])).unwrap();
    s.sn.view(&c, "view-1", Some("base"), &none()).unwrap();
    s.sn.prepare(&c, "lonely", None, &none()).unwrap();
    let q = |f: &[&str]| names(&list(&s.sn, &c, f).unwrap());

    assert_eq!(q(&["kind==committed"]), ["base"]);
    assert_eq!(q(&["kind==view"]), ["view-1"]);
    assert_eq!(q(&["parent==base"]), ["child-1", "child-2", "view-1"]);
    assert_eq!(q(&[r#"labels."a.b"==c"#]), ["base"]);
    assert_eq!(q(&["name~=^child-"]), ["child-1", "child-2"]);
    assert_eq!(q(&["name~=/-[0-9]$/"]), ["child-1", "child-2", "view-1"]);
    assert_eq!(q(&["parent==base,labels.team==x"]), ["child-1"], "comma is and");
    assert_eq!(
        q(&["kind==committed", "labels.team==y"]),
        ["base", "child-2"],
        "several filters are alternatives"
    );
    assert_eq!(q(&["labels.team"]), ["child-1", "child-2"], "a bare field tests presence");
    assert_eq!(q(&["kind!=active"]), ["base", "view-1"]);
    assert_eq!(
        q(&["parent==\"\""]),
        ["base", "lonely"],
        "no parent compares as empty, as in containerd"
    );
    assert_eq!(q(&[]).len(), 5);

    for bad in ["kind==", "==x", "labels.\"unterminated", "name~=(", "kind==a,", "kind=x"] {
        let err = list(&s.sn, &c, &[bad]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{bad}: {err}");
    }
}

#[test]
fn an_existing_target_makes_prepare_return_already_exists() {
    let s = native_stack();
    let c = ctx("default");
    s.sn.prepare(&c, "extract-1", None, &none()).unwrap();
    s.sn.commit(&c, "sha256:layer", "extract-1", &none()).unwrap();
    let err =
        s.sn.prepare(&c, "extract-2", None, &labels(&[(LABEL_SNAPSHOT_REF, "sha256:layer")]))
            .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");
    assert!(err.to_string().contains("target"), "{err}");
    assert_eq!(
        s.sn.stat(&c, "extract-2").unwrap_err().kind(),
        ErrorKind::NotFound,
        "no active snapshot left behind"
    );
    assert_eq!(backend_keys(s.sn.backend().as_ref()).len(), 1);
}

#[test]
fn a_deduplicating_backend_shares_one_layer_between_namespaces() {
    let s = stack_with(|inner| Arc::new(Dedup { inner }));
    let (a, b) = (ctx("a"), ctx("b"));
    let target = labels(&[(LABEL_SNAPSHOT_REF, "sha256:shared")]);
    s.sn.prepare(&a, "extract", None, &target).unwrap();
    s.sn.commit(&a, "sha256:shared", "extract", &target).unwrap();

    // Namespace b unpacks the same layer: the backend already has it.
    let err = s.sn.prepare(&b, "extract", None, &target).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");
    let shared = s.sn.stat(&b, "sha256:shared").expect("the target is recorded in b");
    assert_eq!(shared.kind, Kind::Committed);
    assert_eq!(s.sn.stat(&b, "extract").unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(backend_keys(s.sn.backend().as_ref()).len(), 1, "one copy of the layer");
    let ma = s.sn.committed_mounts(&a, "sha256:shared").unwrap();
    let mb = s.sn.committed_mounts(&b, "sha256:shared").unwrap();
    assert_eq!(ma, mb, "both names mount the same data");

    // Removing it from one namespace keeps it for the other; the last removal frees it.
    s.sn.remove(&a, "sha256:shared").unwrap();
    assert_eq!(backend_keys(s.sn.backend().as_ref()).len(), 1);
    assert!(source(&ma).is_dir());
    s.sn.remove(&b, "sha256:shared").unwrap();
    assert!(backend_keys(s.sn.backend().as_ref()).is_empty());
}

/// Walks read in batches of 100, one transaction each, and resume after the last key
/// read: nothing is skipped or repeated across batches and namespaces, even when the
/// caller changes the records between batches.
#[test]
fn walks_in_batches_miss_nothing_and_repeat_nothing() {
    let s = native_stack();
    let (a, b, c) = (ctx("a"), ctx("b"), ctx("c"));
    for (ns, n) in [(&a, 150), (&b, 100), (&c, 1)] {
        for i in 0..n {
            s.sn.prepare(ns, &format!("k{i:03}"), None, &none()).unwrap();
        }
    }
    // Removing each snapshot as it is seen, and making one that sorts before it; the
    // first also makes one that sorts after every other, which a batch read after it
    // was made sees (one transaction for the whole walk would not).
    let mut seen = Vec::new();
    s.sn.walk(&a, &[], &mut |i| {
        s.sn.remove(&a, &i.name).unwrap();
        s.sn.prepare(&a, &format!("a-{}", i.name), None, &none()).unwrap();
        if i.name == "k000" {
            s.sn.prepare(&a, "z-late", None, &none()).unwrap();
        }
        seen.push(i.name);
        Ok(())
    })
    .unwrap();
    let mut want: Vec<String> = (0..150).map(|i| format!("k{i:03}")).collect();
    want.push("z-late".into());
    assert_eq!(seen, want);
    let mut all = Vec::new();
    s.sn.walk_all(&[], &mut |ns, i| {
        all.push(format!("{ns}/{}", i.name));
        Ok(())
    })
    .unwrap();
    let mut want: Vec<String> = (0..150).map(|i| format!("a/a-k{i:03}")).collect();
    want.push("a/a-z-late".into());
    want.extend((0..100).map(|i| format!("b/k{i:03}")));
    want.push("c/k000".into());
    assert_eq!(all, want);
    assert_eq!(list(&s.sn, &b, &["name~=k0"]).unwrap().len(), 100);
}

/// The `Dedup` backend, with each removal held until the test lets it go.
struct HeldRemovals {
    dedup: Dedup,
    removing: Mutex<std::sync::mpsc::Sender<String>>,
    go: Mutex<std::sync::mpsc::Receiver<()>>,
    adopting: AtomicBool,
    /// If set, the first walk (an adoption's) says so here once done, and waits for
    /// `resume`.
    walking: Mutex<Option<(std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>)>>,
}

impl wasnap::Wrapper for HeldRemovals {
    fn inner(&self) -> &dyn Backend {
        &self.dedup
    }
    fn remove(&self, key: &str) -> Result<()> {
        let _ = self.removing.lock().unwrap().send(key.to_owned());
        let _ = self.go.lock().unwrap().recv();
        Backend::remove(&self.dedup, key)
    }
    fn walk(&self, filter: &Filter, f: &mut dyn FnMut(Info) -> Result<()>) -> Result<()> {
        // Only an adoption walks the backend here: it has found the target.
        self.adopting.store(true, Ordering::SeqCst);
        let pause = self.walking.lock().unwrap().take();
        let walked = Backend::walk(&self.dedup, filter, f);
        // Paused after the adoption found the layer, before it is adopted.
        if let Some((walking, resume)) = pause {
            walking.send(()).unwrap();
            resume.recv().unwrap();
        }
        walked
    }
}

/// What pauses an adoption after its walk: told when it is there, waits to be resumed.
type Pause = (std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>);

/// What the adoption tests share: a stack over [`HeldRemovals`] (whose adoption walk
/// pauses if `walking` is set) with namespace a holding the committed layer
/// `sha256:shared` (32 KiB of data); the backend; the backend keys of removals as they
/// begin; and what lets each removal go on (dropped: all go straight through).
fn held_stack(
    walking: Option<Pause>,
) -> (Stack, Arc<HeldRemovals>, std::sync::mpsc::Receiver<String>, std::sync::mpsc::Sender<()>) {
    let (removing, removals) = std::sync::mpsc::channel();
    let (go, gate) = std::sync::mpsc::channel();
    let held = Arc::new(std::sync::OnceLock::new());
    let held2 = held.clone();
    let s = stack_with(move |inner| {
        let b = Arc::new(HeldRemovals {
            dedup: Dedup { inner },
            removing: Mutex::new(removing),
            go: Mutex::new(gate),
            adopting: AtomicBool::new(false),
            walking: Mutex::new(walking),
        });
        held2.set(b.clone()).ok();
        b
    });
    let held = held.get().unwrap().clone();
    let (a, target) = (ctx("a"), shared_target());
    s.sn.prepare(&a, "extract", None, &target).unwrap();
    fill(&s, &a, "extract", 32 << 10);
    s.sn.commit(&a, "sha256:shared", "extract", &target).unwrap();
    (s, held, removals, go)
}

fn shared_target() -> Labels {
    labels(&[(LABEL_SNAPSHOT_REF, "sha256:shared")])
}

/// Every snapshot of `c` names data that exists.
fn assert_every_snapshot_has_its_data(s: &Stack, c: &wasnap::Ctx) {
    for info in list(&s.sn, c, &[]).unwrap() {
        let mounts = match info.kind {
            Kind::Committed => s.sn.committed_mounts(c, &info.name),
            _ => s.sn.mounts(c, &info.name),
        };
        for m in mounts.unwrap() {
            assert!(source(&[m]).is_dir(), "{:?} names data that exists", info.name);
        }
    }
}

/// A create that adopts a deduplicated layer whose last record was just removed must
/// not record it and then have its data deleted by that removal: it waits for the
/// removal and makes the layer anew.
#[test]
fn a_layer_being_removed_is_never_adopted_by_a_create() {
    let (s, held, removals, go) = held_stack(None);
    let (a, b, target) = (ctx("a"), ctx("b"), shared_target());
    std::thread::scope(|scope| {
        // Namespace a removes the layer: its record goes, then its data, held here.
        let removal = scope.spawn(|| s.sn.remove(&a, "sha256:shared"));
        let bkey = removals.recv().unwrap();
        // Namespace b unpacks the same layer meanwhile: the backend still holds it.
        let create = scope.spawn(|| s.sn.prepare(&b, "extract", None, &target));
        while !held.adopting.load(Ordering::SeqCst) && !create.is_finished() {
            std::thread::sleep(Duration::from_millis(1));
        }
        // Time for an adoption to write its record, as one did before the fix.
        std::thread::sleep(Duration::from_millis(200));
        go.send(()).unwrap();
        removal.join().unwrap().unwrap();
        // The adoption found the layer being removed, waited, and made it anew.
        let made = create.join().unwrap().expect("made anew");
        assert!(!made.is_empty());
        assert!(
            backend_keys(s.sn.backend().as_ref()).iter().all(|i| i.name != bkey),
            "the removed layer is gone"
        );
    });
    assert_eq!(s.sn.stat(&b, "extract").unwrap().kind, Kind::Active);
    assert_eq!(s.sn.stat(&b, "sha256:shared").unwrap_err().kind(), ErrorKind::NotFound);
    assert_every_snapshot_has_its_data(&s, &b);
    // Nothing is held: the next removals go through.
    drop(go);
    s.sn.remove(&b, "extract").unwrap();
    assert!(backend_keys(s.sn.backend().as_ref()).is_empty());
}

/// As above, with the removal begun and ended between the backend's already-exists and
/// the adoption's record: the create finds the backend no longer holds the layer, and
/// makes it anew.
#[test]
fn a_layer_removed_between_its_discovery_and_its_adoption_is_made_anew() {
    let (walking, walked) = std::sync::mpsc::channel();
    let (resume, resumed) = std::sync::mpsc::channel();
    let (s, _held, removals, go) = held_stack(Some((walking, resumed)));
    let (a, b, target) = (ctx("a"), ctx("b"), shared_target());
    drop(go); // removals go straight through
    std::thread::scope(|scope| {
        let create = scope.spawn(|| s.sn.prepare(&b, "extract", None, &target));
        walked.recv().unwrap();
        // The create has its already-exists and has found the layer: it goes, whole.
        s.sn.remove(&a, "sha256:shared").unwrap();
        let bkey = removals.recv().unwrap();
        assert!(backend_keys(s.sn.backend().as_ref()).iter().all(|i| i.name != bkey));
        resume.send(()).unwrap();
        let made = create.join().unwrap().expect("made anew");
        assert!(!made.is_empty());
    });
    assert_eq!(s.sn.stat(&b, "extract").unwrap().kind, Kind::Active);
    assert_every_snapshot_has_its_data(&s, &b);
}

/// Writes a file of `bytes` bytes into the active snapshot `key` of `c`.
fn fill(s: &Stack, c: &wasnap::Ctx, key: &str, bytes: usize) {
    let m = s.sn.mounts(c, key).unwrap();
    std::fs::write(source(&m).join("data"), vec![b'x'; bytes]).unwrap();
}

/// containerd, through the daemon, checks a target among its own records before it
/// prepares under its own key: a record of another client named like the target does
/// not answer already-exists (containerd would then look for it in a walk, and fail the
/// unpack), where a prepare under any other key still finds it.
#[test]
fn a_target_named_by_another_clients_record_does_not_stop_containerds_prepare() {
    let s = native_stack();
    let c = ctx("default");
    s.sn.prepare(&c, "import", None, &none()).unwrap();
    s.sn.commit(&c, "sha256:abc", "import", &none()).unwrap();
    let target = labels(&[(LABEL_SNAPSHOT_REF, "sha256:abc")]);
    let err = s.sn.prepare(&c, "extract", None, &target).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");
    let key = "default/50/extract-1 sha256:abc";
    assert!(!s.sn.prepare(&c, key, None, &target).unwrap().is_empty());
    assert_eq!(s.sn.stat(&c, key).unwrap().kind, Kind::Active);
    // Another namespace's key of that shape is not containerd's here.
    let err = s.sn.prepare(&c, "k8s.io/50/extract-1 sha256:abc", None, &target).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");
}

/// The `Dedup` backend, whose walk adds labels a caller could not set or that decide
/// collection to every snapshot it shows.
struct Bragging(Dedup);

impl wasnap::Wrapper for Bragging {
    fn inner(&self) -> &dyn Backend {
        &self.0
    }
    fn walk(&self, filter: &Filter, f: &mut dyn FnMut(Info) -> Result<()>) -> Result<()> {
        Backend::walk(&self.0, filter, &mut |mut i| {
            i.labels.insert("containerd.io/gc.root".into(), "forever".into());
            i.labels.insert("containerd.io/gc.ref.content.l".into(), "sha256:00".into());
            i.labels.insert("containerd.io/snapshot/origin".into(), "remote".into());
            i.labels.insert("big".into(), "x".repeat(MAX_LABEL_SIZE + 1));
            f(i)
        })
    }
}

/// An adopted record keeps the backend's labels a caller could have set, but neither
/// one over the size limit nor one that decides collection: the backend says what it
/// holds, not what the host keeps.
#[test]
fn an_adopted_record_takes_only_the_backends_ordinary_labels() {
    let s = stack_with(|inner| Arc::new(Bragging(Dedup { inner })));
    let (a, b, target) = (ctx("a"), ctx("b"), shared_target());
    s.sn.prepare(&a, "extract", None, &target).unwrap();
    s.sn.commit(&a, "sha256:shared", "extract", &target).unwrap();
    let err = s.sn.prepare(&b, "extract", None, &target).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");
    let adopted = s.sn.stat(&b, "sha256:shared").unwrap().labels;
    let keys: Vec<&str> = adopted.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        ["containerd.io/snapshot.ref", "containerd.io/snapshot/origin"],
        "{adopted:?}"
    );
}

/// A prune frees the bytes of the data it removed, and only those: not those of a layer
/// another namespace's record still names, nor of one a create adopted between the
/// prune's removal of its record and the removal of its data.
#[test]
fn a_prune_counts_as_freed_only_the_data_that_went() {
    use wasnap::metadata::{PrunePolicy, Scope};
    let (s, _held, removals, go) = held_stack(None);
    let (a, b, c, target) = (ctx("a"), ctx("b"), ctx("c"), shared_target());
    // In a, a child of the shared layer, whose removal (the first: children go first)
    // is held while b adopts the layer.
    s.sn.prepare(&a, "child-active", Some("sha256:shared"), &none()).unwrap();
    fill(&s, &a, "child-active", 64 << 10);
    s.sn.commit(&a, "child", "child-active", &none()).unwrap();
    let prune_in = |scope: Scope<'_>, dry: bool| {
        let mut sizes = Vec::new();
        let mut progress = |p: wasnap::metadata::PruneProgress<'_>| match p {
            wasnap::metadata::PruneProgress::Planned { bytes, .. } => sizes.push(bytes),
            wasnap::metadata::PruneProgress::Removed { size, .. } => sizes.push(size),
        };
        let report = s.sn.prune_cache(scope, &PrunePolicy::default(), 0, dry, &mut progress);
        // The progress says what the report does: the plan's bytes, then each removal's.
        if let Ok(r) = &report
            && dry
        {
            assert_eq!(sizes[0], r.freed, "planned {sizes:?}: {r:?}");
        }
        if let Ok(r) = &report {
            assert_eq!(sizes[1..].iter().sum::<u64>(), r.freed, "removed {sizes:?}: {r:?}");
        }
        report
    };
    let prune = |ns: &wasnap::Ctx| prune_in(Scope::Namespace(ns.namespace()), false);
    let dry = |ns: &wasnap::Ctx| prune_in(Scope::Namespace(ns.namespace()), true);
    let report = std::thread::scope(|scope| {
        let pruning = scope.spawn(|| prune(&a));
        let first = removals.recv().unwrap();
        assert!(first.ends_with("/child"), "{first}");
        // The layer's record in a is gone; its data is not doomed yet: b adopts it.
        let err = s.sn.prepare(&b, "extract", None, &target).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");
        drop(go);
        pruning.join().unwrap().unwrap()
    });
    let gone: Vec<&str> = report.removed.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(gone, ["child", "sha256:shared"], "{report:?}");
    let child = report.removed[0].size.expect("the child's size");
    assert!(child >= 64 << 10, "{report:?}");
    assert_eq!(report.freed, child, "the adopted layer freed nothing: {report:?}");
    assert!(report.failed.is_empty(), "{report:?}");
    assert_eq!(s.sn.stat(&b, "sha256:shared").unwrap().kind, Kind::Committed);
    assert_every_snapshot_has_its_data(&s, &b);

    // c shares the layer too; pruning b then removes b's record and keeps the data.
    let err = s.sn.prepare(&c, "extract", None, &target).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");
    // Dry runs count it as the real ones do: not in b alone, once over both.
    let layer = dry(&c).unwrap().removed[0].size.expect("the layer's size");
    assert!(layer >= 32 << 10, "{layer}");
    let would = dry(&b).unwrap();
    assert_eq!((would.removed.len(), would.freed), (1, 0), "c still names the layer: {would:?}");
    let would = prune_in(Scope::All, true).unwrap();
    assert_eq!((would.removed.len(), would.freed), (2, layer), "counted once: {would:?}");
    let report = prune(&b).unwrap();
    assert_eq!(report.removed.len(), 1, "{report:?}");
    assert_eq!(report.freed, 0, "c still names the layer: {report:?}");
    assert_every_snapshot_has_its_data(&s, &c);
    // The last record's prune frees it, as its dry run says.
    assert_eq!(dry(&c).unwrap().freed, layer);
    let report = prune(&c).unwrap();
    assert!(report.removed[0].size.unwrap() >= 32 << 10, "{report:?}");
    assert_eq!(report.freed, report.removed[0].size.unwrap(), "{report:?}");
    assert!(backend_keys(s.sn.backend().as_ref()).is_empty(), "{report:?}");
}

/// The size limits count a layer two namespaces name once, and as gone only with its
/// last record (in one namespace's prune, not at all): keep-storage stops when the data
/// left fits, not when the records left would if each counted a copy of their own.
#[test]
fn size_limits_count_a_shared_layer_once() {
    use wasnap::metadata::{PrunePolicy, Scope};
    let (s, _held, _removals, go) = held_stack(None);
    drop(go); // removals go straight through
    let (a, b, target) = (ctx("a"), ctx("b"), shared_target());
    s.sn.prepare(&a, "child-active", Some("sha256:shared"), &none()).unwrap();
    fill(&s, &a, "child-active", 64 << 10);
    s.sn.commit(&a, "child", "child-active", &none()).unwrap();
    // b adopts the layer: a second record of the same data, used since (so it is the
    // most recently used record).
    let err = s.sn.prepare(&b, "extract", None, &target).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");
    s.sn.touch(&b, "sha256:shared").unwrap();
    let dry = |scope, keep_storage| {
        let policy = PrunePolicy { keep_storage, ..PrunePolicy::default() };
        s.sn.prune_cache(scope, &policy, 0, true, &mut |_| {}).unwrap()
    };
    let everything = dry(Scope::All, 1);
    let size = |key: &str| {
        let p = everything.removed.iter().find(|p| p.key == key).expect("planned");
        p.size.unwrap_or_else(|| panic!("the size of {key}: {everything:?}"))
    };
    let (layer, child) = (size("sha256:shared"), size("child"));
    assert!(layer >= 32 << 10 && child >= 64 << 10, "{everything:?}");
    assert_eq!(everything.removed.len(), 3, "{everything:?}");
    assert_eq!(everything.freed, layer + child, "{everything:?}");
    // Counted once over both namespaces; in one, not at all, since no removal there
    // frees it. So a limit b cannot meet by removals removes nothing there.
    assert_eq!(dry(Scope::All, u64::MAX).total, layer + child);
    assert_eq!(dry(Scope::Namespace("a"), u64::MAX).total, child);
    assert_eq!(dry(Scope::Namespace("b"), u64::MAX).total, 0);
    let in_b = dry(Scope::Namespace("b"), 1);
    assert!(in_b.removed.is_empty(), "nothing b removes frees anything: {in_b:?}");
    // With room for the layer and a quarter of the child, the child goes and the layer
    // fits. Counted per record, the layer's two records would be 2 x 32 KiB over the
    // limit, and a's record would go too, freeing nothing.
    let plan = dry(Scope::All, layer + child / 4);
    let gone: Vec<(&str, &str)> =
        plan.removed.iter().map(|p| (p.namespace.as_str(), p.key.as_str())).collect();
    assert_eq!(gone, [("a", "child")], "{plan:?}");
    assert_eq!(plan.freed, child, "{plan:?}");
    // The real prune does what its dry run said.
    let policy = PrunePolicy { keep_storage: layer + child / 4, ..PrunePolicy::default() };
    let done = s.sn.prune_cache(Scope::All, &policy, 0, false, &mut |_| {}).unwrap();
    assert_eq!((done.removed.len(), done.freed), (1, child), "{done:?}");
    assert_every_snapshot_has_its_data(&s, &a);
    assert_every_snapshot_has_its_data(&s, &b);
}

#[test]
fn a_backend_failing_mid_prepare_leaves_no_record() {
    let mut flaky = None;
    let s = stack_with(|n| {
        let f = Flaky::new(n);
        flaky = Some(f.clone());
        f
    });
    let flaky = flaky.unwrap();
    let c = ctx("default");
    flaky.fail_prepare_after_work.store(true, Ordering::SeqCst);
    let err = s.sn.prepare(&c, "a", None, &none()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Internal, "the backend's error comes back as it was: {err}");
    flaky.fail_prepare_after_work.store(false, Ordering::SeqCst);
    flaky.fail_prepare.store(true, Ordering::SeqCst);
    assert_eq!(s.sn.prepare(&c, "a", None, &none()).unwrap_err().kind(), ErrorKind::Unavailable);
    assert_eq!(s.sn.stat(&c, "a").unwrap_err().kind(), ErrorKind::NotFound);
    assert!(list(&s.sn, &c, &[]).unwrap().is_empty());
    assert!(backend_keys(flaky.as_ref()).is_empty());

    // The key is free again once the backend recovers.
    flaky.fail_prepare.store(false, Ordering::SeqCst);
    s.sn.prepare(&c, "a", None, &none()).unwrap();

    // A failing backend commit changes nothing either.
    flaky.fail_commit.store(true, Ordering::SeqCst);
    assert!(s.sn.commit(&c, "done", "a", &none()).is_err());
    assert_eq!(s.sn.stat(&c, "a").unwrap().kind, Kind::Active);
    assert_eq!(s.sn.stat(&c, "done").unwrap_err().kind(), ErrorKind::NotFound);
    flaky.fail_commit.store(false, Ordering::SeqCst);
    s.sn.commit(&c, "done", "a", &none()).unwrap();
}

#[test]
fn a_metadata_failure_after_the_backend_succeeded_cleans_the_backend_up() {
    let s = native_stack();
    let c = ctx("default");
    s.sn.prepare(&c, "a", None, &none()).unwrap();
    s.sn.commit(&c, "base", "a", &none()).unwrap();
    s.faults.arm("metadata.create.after-backend", Action::Error);
    for parent in [None, Some("base")] {
        let err = s.sn.prepare(&c, "child", parent, &none()).unwrap_err();
        assert!(err.to_string().contains("injected fault"), "{err}");
        let err = s.sn.view(&c, "view", parent, &none()).unwrap_err();
        assert!(err.to_string().contains("injected fault"), "{err}");
    }
    s.faults.disarm("metadata.create.after-backend");
    assert_eq!(names(&list(&s.sn, &c, &[]).unwrap()), ["base"]);
    let left: Vec<Info> = backend_keys(s.sn.backend().as_ref());
    assert_eq!(left.len(), 1, "the backend snapshots were removed again: {left:?}");
    // And the parent has no phantom child: it can be removed.
    s.sn.remove(&c, "base").unwrap();
}

/// An update whose record cannot be written after the backend took the new inherited
/// labels fails whole: the backend has its old labels back.
#[test]
fn a_failed_update_leaves_the_backends_labels_as_they_were() {
    let s = native_stack();
    let c = ctx("default");
    let label = "containerd.io/snapshot/origin";
    s.sn.prepare(&c, "a", None, &labels(&[(label, "1")])).unwrap();
    let backend = || backend_keys(s.sn.backend().as_ref()).remove(0).labels;
    assert_eq!(backend().get(label).map(String::as_str), Some("1"));
    let mut info = s.sn.stat(&c, "a").unwrap();
    info.labels = labels(&[(label, "2")]);
    let paths = [format!("labels.{label}")];
    s.faults.arm("metadata.update.after-backend", Action::Error);
    let e = s.sn.update(&c, &info, &paths).unwrap_err();
    assert!(e.to_string().contains("injected fault"), "{e}");
    s.faults.disarm("metadata.update.after-backend");
    assert_eq!(backend().get(label).map(String::as_str), Some("1"), "put back");
    assert_eq!(s.sn.stat(&c, "a").unwrap().labels.get(label).map(String::as_str), Some("1"));
    s.sn.update(&c, &info, &paths).unwrap();
    assert_eq!(backend().get(label).map(String::as_str), Some("2"));
}

/// Leaves a commit of "a" (holding file `f`) to "base" under way, as a failed write of
/// its record after the backend committed does: its intent holds the snapshot.
fn leave_a_commit_under_way(s: &Stack, c: &wasnap::Ctx) {
    let m = s.sn.prepare(c, "a", None, &none()).unwrap();
    std::fs::write(source(&m).join("f"), "data").unwrap();
    s.faults.arm("metadata.commit.after-backend", Action::Error);
    s.sn.commit(c, "base", "a", &labels(&[("l", "v")])).unwrap_err();
    s.faults.disarm("metadata.commit.after-backend");
    let e = s.sn.remove(c, "a").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "held by its intent: {e}");
}

/// The commit [`leave_a_commit_under_way`] left is finished: "base" is committed with
/// its labels and data, and "a" is gone.
fn assert_the_commit_finished(s: &Stack, c: &wasnap::Ctx) {
    let info = s.sn.stat(c, "base").unwrap();
    assert_eq!((info.kind, info.labels), (Kind::Committed, labels(&[("l", "v")])));
    assert_eq!(s.sn.stat(c, "a").unwrap_err().kind(), ErrorKind::NotFound);
    let m = s.sn.view(c, "v", Some("base"), &none()).unwrap();
    assert_eq!(std::fs::read_to_string(source(&m).join("f")).unwrap(), "data");
}

/// A backend whose records are in their own database commits apart from the metadata:
/// a commit cut short after the backend's step keeps its intent, which holds the
/// snapshot until recovery (at the next open, as here after a crash) finishes it.
#[test]
fn a_commit_cut_short_after_a_separate_backend_is_finished_by_recovery() {
    let s = native_stack();
    let c = ctx("default");
    assert!(!s.sn.backend().stages_records(), "its own database: nothing to stage into");
    leave_a_commit_under_way(&s, &c);
    let report = s.sn.recover().unwrap();
    assert_eq!(report.finished.len(), 1, "{report:?}");
    assert_the_commit_finished(&s, &c);
}

/// The same cut-short commit, left by a call that failed (the record's write failed
/// after the backend committed, as on a full disk) rather than by a crash: the next
/// prune finishes it, so the snapshot is not held until the process restarts.
#[test]
fn a_commit_a_failed_call_left_under_way_is_finished_by_the_next_prune() {
    let s = native_stack();
    let c = ctx("default");
    leave_a_commit_under_way(&s, &c);
    let report = s.sn.cleanup().unwrap();
    assert!(report.failed.is_empty(), "{report:?}");
    assert!(report.removed.is_empty(), "the committed data is named, not pruned: {report:?}");
    assert_the_commit_finished(&s, &c);
    assert!(s.sn.recover().unwrap().finished.is_empty(), "nothing is left for an open");
}

/// A backend whose commit does its work and then fails, and that cannot be asked about
/// a snapshot while `mute` is set.
struct Mute {
    inner: Arc<wasnap::driver::Native>,
    mute: AtomicBool,
    /// Questions it left unanswered.
    unanswered: std::sync::atomic::AtomicUsize,
}

impl wasnap::Wrapper for Mute {
    fn inner(&self) -> &dyn Backend {
        &*self.inner
    }
    fn commit(&self, name: &str, key: &str, labels: &Labels) -> wasnap::Result<()> {
        self.inner.commit(name, key, labels)?;
        Err(wasnap::Error::internal("mute backend: failed after committing"))
    }
    fn stat(&self, key: &str) -> wasnap::Result<Info> {
        if self.mute.load(Ordering::SeqCst) {
            self.unanswered.fetch_add(1, Ordering::SeqCst);
            return Err(wasnap::Error::unavailable("mute backend: no answer"));
        }
        self.inner.stat(key)
    }
}

/// A failed commit whose backend cannot say which key it holds keeps its intent; a
/// prune asks again each time, leaves it (and, after one unanswered question, the
/// others) while the backend still cannot answer, and finishes it once it can.
#[test]
fn a_prune_settles_a_failed_commit_once_the_backend_can_say_what_it_holds() {
    let mut mute = None;
    let s = stack_with(|n| {
        let m = Arc::new(Mute { inner: n, mute: AtomicBool::new(false), unanswered: 0.into() });
        mute = Some(m.clone());
        m
    });
    let mute = mute.unwrap();
    let c = ctx("default");
    s.sn.prepare(&c, "a", None, &none()).unwrap();
    s.sn.prepare(&c, "b", None, &none()).unwrap();
    mute.mute.store(true, Ordering::SeqCst);
    for (key, name) in [("a", "base"), ("b", "other")] {
        let e = s.sn.commit(&c, name, key, &none()).unwrap_err();
        assert!(e.to_string().contains("failed after committing"), "{e}");
        assert_eq!(s.sn.stat(&c, key).unwrap().kind, Kind::Active, "still marked committing");
        assert_eq!(s.sn.remove(&c, key).unwrap_err().kind(), ErrorKind::FailedPrecondition);
    }

    mute.unanswered.store(0, Ordering::SeqCst);
    let report = s.sn.settle_failed_commits(std::time::Duration::from_secs(10)).unwrap();
    assert!(report.finished.is_empty() && report.undone.is_empty(), "{report:?}");
    assert_eq!(mute.unanswered.load(Ordering::SeqCst), 1, "one question, then it waits");
    s.sn.cleanup().unwrap();
    assert_eq!(s.sn.stat(&c, "base").unwrap_err().kind(), ErrorKind::NotFound, "left alone");

    mute.mute.store(false, Ordering::SeqCst);
    let report = s.sn.cleanup().unwrap();
    assert!(report.failed.is_empty(), "{report:?}");
    for (key, name) in [("a", "base"), ("b", "other")] {
        assert_eq!(s.sn.stat(&c, name).unwrap().kind, Kind::Committed);
        assert_eq!(s.sn.stat(&c, key).unwrap_err().kind(), ErrorKind::NotFound);
        s.sn.remove(&c, name).unwrap();
    }
    assert!(backend_keys(s.sn.backend().as_ref()).is_empty());
}

/// A backend whose commit waits at a gate: the test sees the call inside it.
struct CommitGate {
    inner: Arc<wasnap::driver::Native>,
    entered: Mutex<std::sync::mpsc::Sender<()>>,
    go: Mutex<std::sync::mpsc::Receiver<()>>,
}

impl wasnap::Wrapper for CommitGate {
    fn inner(&self) -> &dyn Backend {
        &*self.inner
    }
    fn commit(&self, name: &str, key: &str, labels: &Labels) -> wasnap::Result<()> {
        self.entered.lock().unwrap().send(()).unwrap();
        self.go.lock().unwrap().recv().unwrap();
        self.inner.commit(name, key, labels)
    }
}

/// A prune while a commit is inside its backend leaves the commit's intent alone: the
/// call finishes its own commit.
#[test]
fn a_prune_leaves_a_commit_in_flight_alone() {
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let (go, go_rx) = std::sync::mpsc::channel();
    let s = Arc::new(stack_with(|n| {
        Arc::new(CommitGate { inner: n, entered: Mutex::new(entered_tx), go: Mutex::new(go_rx) })
    }));
    let c = ctx("default");
    s.sn.prepare(&c, "a", None, &none()).unwrap();
    let committing = {
        let (s, c) = (s.clone(), c.clone());
        std::thread::spawn(move || s.sn.commit(&c, "base", "a", &none()))
    };
    entered.recv().unwrap();
    let report = s.sn.settle_failed_commits(std::time::Duration::from_secs(10)).unwrap();
    assert!(
        report.finished.is_empty() && report.undone.is_empty() && report.lost.is_empty(),
        "the commit in flight is its caller's: {report:?}"
    );
    let pruned = s.sn.cleanup().unwrap();
    assert!(pruned.removed.is_empty() && pruned.failed.is_empty(), "{pruned:?}");
    go.send(()).unwrap();
    committing.join().unwrap().unwrap();
    assert_eq!(s.sn.stat(&c, "base").unwrap().kind, Kind::Committed);
    assert_eq!(s.sn.stat(&c, "a").unwrap_err().kind(), ErrorKind::NotFound);
}

/// Two handles on one snapshotter's records (a library caller may make them) do not
/// see each other's calls in flight: a prune through one can settle a commit the other
/// is making. That commit then reports the failure; it never claims a commit that was
/// undone under it.
#[test]
fn a_commit_settled_under_its_caller_reports_an_error_not_success() {
    let dir = tmp();
    let faults = Arc::new(wasnap::fault::Faults::new());
    let meta = metadb(dir.path());
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let (go, go_rx) = std::sync::mpsc::channel();
    let backend: Arc<dyn Backend> = Arc::new(CommitGate {
        inner: native(dir.path(), faults.clone()),
        entered: Mutex::new(entered_tx),
        go: Mutex::new(go_rx),
    });
    let one = Arc::new(Snapshotter::new(meta.clone(), "test", backend.clone(), faults.clone()));
    let other = Snapshotter::new(meta, "test", backend, faults);
    let c = ctx("default");
    one.prepare(&c, "a", None, &none()).unwrap();
    let committing = {
        let (one, c) = (one.clone(), c.clone());
        std::thread::spawn(move || one.commit(&c, "base", "a", &none()))
    };
    entered.recv().unwrap();
    let report = other.settle_failed_commits(std::time::Duration::from_secs(10)).unwrap();
    assert_eq!(report.undone.len(), 1, "the other handle undid it: {report:?}");
    go.send(()).unwrap();
    let e = committing.join().unwrap().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Internal, "{e}");
    assert!(e.to_string().contains("settled by another call"), "{e}");
    assert_eq!(one.stat(&c, "base").unwrap_err().kind(), ErrorKind::NotFound);
}

/// The native driver with its records in the metadata's database: each prepare and
/// commit writes both records in one transaction, and one that fails after the driver's
/// step leaves neither record nor data.
#[test]
fn a_driver_sharing_the_database_records_with_the_metadata_in_one_write() {
    let dir = tmp();
    let faults = Arc::new(wasnap::fault::Faults::new());
    let meta = metadb(dir.path());
    let path = dir.path().join("native");
    std::fs::create_dir_all(&path).unwrap();
    let d = Dir::open_ambient_dir(&path, ambient_authority()).unwrap();
    let store = Store::shared(meta.db().clone(), "native", &d).unwrap();
    let native =
        wasnap::driver::Native::with_store(d, path.clone(), store, faults.clone()).unwrap();
    let backend: Arc<dyn Backend> = Arc::new(native);
    assert!(backend.stages_records());
    let sn = Snapshotter::new(meta.clone(), "native", backend.clone(), faults.clone())
        .with_shared_db(true);
    let c = ctx("default");
    let commits = |meta: &MetaDb| meta.db().stats().commits;

    // The first create reserves blocks of sequence numbers and ids: a write each.
    sn.prepare(&c, "warm", None, &none()).unwrap();
    sn.remove(&c, "warm").unwrap();
    let before = commits(&meta);
    let m = sn.prepare(&c, "a", None, &none()).unwrap();
    std::fs::write(source(&m).join("f"), "data").unwrap();
    assert_eq!(commits(&meta) - before, 1, "a prepare is one write");
    let before = commits(&meta);
    sn.commit(&c, "base", "a", &none()).unwrap();
    assert_eq!(commits(&meta) - before, 1, "a commit is one write, with no intent");
    assert_eq!(backend.stat(&bkey_of(backend.as_ref(), "base")).unwrap().kind, Kind::Committed);

    let entries = || std::fs::read_dir(path.join("snapshots")).unwrap().count();
    assert_eq!(entries(), 1);
    // Failing after the driver's step: neither record is written, the data goes.
    faults.arm("metadata.create.after-backend", Action::Error);
    for parent in [None, Some("base")] {
        sn.prepare(&c, "child", parent, &none()).unwrap_err();
        sn.view(&c, "view", parent, &none()).unwrap_err();
    }
    faults.disarm("metadata.create.after-backend");
    assert_eq!(backend_keys(backend.as_ref()).len(), 1);
    assert_eq!(entries(), 1, "the data built for the failed creates is gone");
    // A commit failing after the driver's step leaves the active snapshot as it was.
    sn.prepare(&c, "b", Some("base"), &none()).unwrap();
    faults.arm("metadata.commit.after-backend", Action::Error);
    sn.commit(&c, "top", "b", &none()).unwrap_err();
    faults.disarm("metadata.commit.after-backend");
    assert_eq!(sn.stat(&c, "b").unwrap().kind, Kind::Active);
    assert_eq!(backend.stat(&bkey_of(backend.as_ref(), "b")).unwrap().kind, Kind::Active);
    sn.commit(&c, "top", "b", &none()).unwrap();
    // A remove refused by the metadata layer leaves the driver's record.
    let err = sn.remove_later(&c, "base").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert_eq!(backend_keys(backend.as_ref()).len(), 2);
    // A remove is one write: the driver's record goes with the metadata's, so nothing
    // is left for a background removal to do but delete the data.
    let before = commits(&meta);
    sn.remove_later(&c, "top").unwrap();
    assert_eq!(commits(&meta) - before, 1, "a remove is one write");
    assert_eq!(backend_keys(backend.as_ref()).len(), 1, "the driver's record went with it");
    assert_eq!(entries(), 1, "top's entry was moved out as the write committed");
    // Failing once both records are gone: the data is left for cleanup.
    faults.arm("metadata.remove.backend", Action::Error);
    sn.remove(&c, "base").unwrap();
    faults.disarm("metadata.remove.backend");
    assert!(backend_keys(backend.as_ref()).is_empty());
    assert_eq!(entries(), 1, "base's entry is left");
    sn.cleanup().unwrap();
    assert_eq!(entries(), 0);
}

/// The backend key of `key`.
fn bkey_of(b: &dyn Backend, key: &str) -> String {
    let end = format!("/{key}");
    let keys = backend_keys(b).into_iter().map(|i| i.name);
    keys.into_iter()
        .find(|n| n.ends_with(&end))
        .unwrap_or_else(|| panic!("no backend key for {key}"))
}

/// The native driver, with each commit held until the test lets it go.
struct HeldCommits {
    inner: Arc<wasnap::driver::Native>,
    entered: Mutex<std::sync::mpsc::Sender<()>>,
    go: Mutex<std::sync::mpsc::Receiver<()>>,
}

impl wasnap::Wrapper for HeldCommits {
    fn inner(&self) -> &dyn Backend {
        &*self.inner
    }
    fn commit(&self, name: &str, key: &str, labels: &Labels) -> Result<()> {
        let _ = self.entered.lock().unwrap().send(());
        let _ = self.go.lock().unwrap().recv();
        self.inner.commit(name, key, labels)
    }
}

/// Two unpacks of one layer under two leases, the second while the first's commit is
/// still in the backend: the second fails with already-exists and its lease holds the
/// name, so the layer outlives the first lease.
#[test]
fn a_commit_racing_one_under_way_to_its_name_leaves_its_lease_holding_it() {
    let dir = tmp();
    let faults = Arc::new(wasnap::fault::Faults::new());
    let meta = metadb(dir.path());
    let (entered, commits) = std::sync::mpsc::channel();
    let (go, gate) = std::sync::mpsc::channel();
    let backend = Arc::new(HeldCommits {
        inner: native(dir.path(), faults.clone()),
        entered: Mutex::new(entered),
        go: Mutex::new(gate),
    });
    let sn = Snapshotter::new(meta.clone(), "test", backend, faults.clone());
    let leases = wasnap::metadata::Leases::new(meta.clone());
    let c = ctx("default");
    for l in ["l1", "l2"] {
        leases.create(&c, Some(l), &none()).unwrap();
    }
    let (l1, l2) =
        (c.clone().with_lease(Some("l1".into())), c.clone().with_lease(Some("l2".into())));
    sn.prepare(&l1, "extract-1", None, &none()).unwrap();
    sn.prepare(&l2, "extract-2", None, &none()).unwrap();
    std::thread::scope(|scope| {
        let first = scope.spawn(|| sn.commit(&l1, "layer", "extract-1", &none()));
        commits.recv().unwrap();
        // The first commit's intent names "layer"; its record is not written yet.
        let err = sn.commit(&l2, "layer", "extract-2", &none()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");
        go.send(()).unwrap();
        first.join().unwrap().unwrap();
    });
    let held = leases.resources(&c, "l2").unwrap();
    assert!(held.contains(&wasnap::metadata::Resource::snapshot("test", "layer")), "{held:?}");
}

#[test]
fn cleanup_prunes_what_no_record_names_children_first() {
    let dir = tmp();
    let faults = Arc::new(wasnap::fault::Faults::new());
    let meta = metadb(dir.path());
    let backend = native(dir.path(), faults.clone());
    let sn = Snapshotter::new(meta.clone(), "native", backend, faults.clone());
    let s = Stack { dir, faults, sn };
    let c = ctx("default");
    s.sn.prepare(&c, "kept", None, &none()).unwrap();
    // Orphans made behind the metadata layer's back, as a crash would leave them.
    let b = s.sn.backend().clone();
    b.prepare("default/900/orphan", None, &none()).unwrap();
    b.commit("default/901/orphan-base", "default/900/orphan", &none()).unwrap();
    b.prepare("default/902/orphan-child", Some("default/901/orphan-base"), &none()).unwrap();
    let report = s.sn.cleanup().unwrap();
    assert_eq!(
        report.removed,
        ["default/902/orphan-child", "default/901/orphan-base"],
        "children first"
    );
    assert!(report.failed.is_empty());
    let left = backend_keys(b.as_ref());
    assert_eq!(left.len(), 1);
    assert!(left[0].name.ends_with("/kept"));
    assert_eq!(names(&list(&s.sn, &c, &[]).unwrap()), ["kept"]);
    // With nothing to prune, a cleanup writes nothing: containerd calls it after each
    // of its collections.
    let before = meta.db().stats();
    let report = s.sn.cleanup().unwrap();
    assert!(report.removed.is_empty() && report.failed.is_empty(), "{report:?}");
    assert_eq!(meta.db().stats(), before);
}

#[test]
fn concurrent_prepares_on_one_parent_all_land() {
    let s = Arc::new(native_stack());
    let c = ctx("default");
    s.sn.prepare(&c, "a", None, &none()).unwrap();
    s.sn.commit(&c, "base", "a", &none()).unwrap();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                let c = ctx("default");
                for i in 0..10 {
                    let key = format!("t{t}-{i}");
                    s.sn.prepare(&c, &key, Some("base"), &Labels::new()).unwrap();
                    s.sn.commit(&c, &format!("{key}-c"), &key, &Labels::new()).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(list(&s.sn, &c, &["parent==base"]).unwrap().len(), 80);
    assert_eq!(backend_keys(s.sn.backend().as_ref()).len(), 81);
}

/// Forwards to the native driver; `remove` waits until the gate opens.
struct Gated {
    inner: Arc<wasnap::driver::Native>,
    open: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
    removed: std::sync::Mutex<Vec<String>>,
}

impl wasnap::backend::Wrapper for Gated {
    fn inner(&self) -> &dyn Backend {
        &*self.inner
    }
    fn remove(&self, key: &str) -> wasnap::Result<()> {
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
        self.removed.lock().unwrap().push(key.to_owned());
        self.inner.remove(key)
    }
}

#[test]
fn a_removal_in_the_background_is_never_taken_for_an_orphan_and_goes_in_order() {
    let gate = std::sync::OnceLock::new();
    let s = stack_with(|native| {
        let g = Arc::new(Gated {
            inner: native,
            open: std::sync::Mutex::new(false),
            opened: std::sync::Condvar::new(),
            removed: std::sync::Mutex::new(Vec::new()),
        });
        gate.set(g.clone()).ok().unwrap();
        g
    });
    let gate = gate.get().unwrap();
    let c = ctx("default");
    let sn = &s.sn;
    sn.prepare(&c, "a", None, &none()).unwrap();
    sn.commit(&c, "parent", "a", &none()).unwrap();
    sn.prepare(&c, "child", Some("parent"), &none()).unwrap();
    let bkeys: Vec<String> = backend_keys(&**sn.backend()).into_iter().map(|i| i.name).collect();
    assert_eq!(bkeys.len(), 2);

    // Both records go at once; their backend snapshots wait at the gate.
    sn.remove_later(&c, "child").unwrap();
    sn.remove_later(&c, "parent").unwrap();
    assert!(list(sn, &c, &[]).unwrap().is_empty());
    assert_eq!(backend_keys(&**sn.backend()).len(), 2, "still in the backend");
    let limit = std::time::Duration::from_secs(60);
    assert_eq!(sn.orphans(limit).unwrap(), Vec::<String>::new(), "in flight, not orphans");
    let pruned = sn.prune(limit, false).unwrap();
    assert!(pruned.removed.is_empty(), "{pruned:?}");

    *gate.open.lock().unwrap() = true;
    gate.opened.notify_all();
    sn.settle();
    assert!(backend_keys(&**sn.backend()).is_empty());
    // The child (removed first) went before its parent.
    let removed = gate.removed.lock().unwrap().clone();
    let child = bkeys.iter().find(|k| k.ends_with("/child")).unwrap();
    assert_eq!(&removed[0], child, "{removed:?}");
    assert_eq!(removed.len(), 2, "{removed:?}");
}

#[test]
fn a_background_removal_that_fails_leaves_an_orphan_the_next_prune_takes() {
    let s = native_stack();
    let c = ctx("default");
    s.sn.prepare(&c, "a", None, &none()).unwrap();
    s.faults.arm("metadata.remove.backend", Action::Error);
    s.sn.remove_later(&c, "a").unwrap();
    s.sn.settle();
    s.faults.disarm("metadata.remove.backend");
    let limit = std::time::Duration::from_secs(60);
    assert_eq!(s.sn.orphans(limit).unwrap().len(), 1, "the record is gone, the data stays");
    assert_eq!(s.sn.prune(limit, false).unwrap().removed.len(), 1);
    assert!(backend_keys(&**s.sn.backend()).is_empty());
}

/// A commit over a plugin whose store is the root's database carries its intent in the
/// plugin's first write, once a commit has shown that the plugin writes there: two
/// writes in all (the plugin's, with the intent, then the committed record). If the
/// intent cannot be written there, the plugin's write fails with it, and nothing
/// changes anywhere.
#[test]
fn a_commit_over_a_plugin_carries_its_intent_in_the_plugins_write() {
    let dir = tmp();
    let faults = Arc::new(wasnap::fault::Faults::new());
    let config = wasnap::config::Config::parse(
        &format!(
            "default_snapshotter = \"copy\"\n[snapshotters.copy]\ndriver = \"wasm\"\npath = {:?}\n",
            crate::plugin::guest("copy").to_str().unwrap()
        ),
        "test",
    )
    .unwrap();
    let host = wasnap::Host::open_config(&dir.path().join("root"), faults.clone(), config).unwrap();
    let sn = host.snapshotter("copy").unwrap();
    let backend = sn.backend().clone();
    let c = ctx("default");
    let commits = || host.db().db().stats().commits;

    // The first create and commit reserve blocks of sequence numbers and layer ids, and
    // the first commit, its intent written first, shows that the plugin writes.
    sn.prepare(&c, "warm", None, &none()).unwrap();
    let before = commits();
    sn.commit(&c, "warmed", "warm", &none()).unwrap();
    assert_eq!(commits() - before, 3, "intent, the plugin's write, the record");
    sn.remove(&c, "warmed").unwrap();
    let m = sn.prepare(&c, "a", None, &none()).unwrap();
    std::fs::write(source(&m).join("f"), "data").unwrap();
    let before = commits();
    sn.commit(&c, "base", "a", &none()).unwrap();
    assert_eq!(commits() - before, 2, "the plugin's write carried the intent");
    assert_eq!(backend.stat(&bkey_of(backend.as_ref(), "base")).unwrap().kind, Kind::Committed);

    sn.prepare(&c, "b", Some("base"), &none()).unwrap();
    faults.arm("metadata.commit.intent", Action::Error);
    let err = sn.commit(&c, "top", "b", &none()).unwrap_err();
    faults.disarm("metadata.commit.intent");
    assert_eq!(err.kind(), ErrorKind::Internal, "{err}");
    assert_eq!(sn.stat(&c, "b").unwrap().kind, Kind::Active);
    assert_eq!(sn.stat(&c, "top").unwrap_err().kind(), ErrorKind::NotFound);
    // The plugin's write failed with the intent: it still holds `b` as it was.
    assert_eq!(backend.stat(&bkey_of(backend.as_ref(), "b")).unwrap().kind, Kind::Active);
    assert_eq!(backend_keys(backend.as_ref()).len(), 2, "base and b");
    sn.commit(&c, "top", "b", &none()).unwrap();
    assert_eq!(sn.stat(&c, "top").unwrap().kind, Kind::Committed);
    for report in host.check().unwrap() {
        assert!(report.orphans.is_empty() && report.missing.is_empty(), "{report:?}");
    }
    host.close().unwrap();
}

/// A backend that keeps its state outside our database, though declared as sharing it
/// (here the native driver with a store of its own): its commits never write there, so
/// each commit's intent is written, and on disk, before the backend is called, as it
/// must be for such a backend, and concurrent commits to one name leave one committed snapshot and the
/// others active and whole.
#[test]
fn a_commit_over_a_backend_that_writes_elsewhere_writes_its_intent_first() {
    let dir = tmp();
    let faults = Arc::new(wasnap::fault::Faults::new());
    let meta = metadb(dir.path());
    let backend: Arc<dyn Backend> = native(dir.path(), faults.clone());
    assert!(!backend.stages_records());
    let sn = Arc::new(
        Snapshotter::new(meta.clone(), "native", backend.clone(), faults).with_shared_db(true),
    );
    let c = ctx("default");
    for round in 0..2 {
        sn.prepare(&c, &format!("a{round}"), None, &none()).unwrap();
        let before = meta.db().stats();
        sn.commit(&c, &format!("c{round}"), &format!("a{round}"), &none()).unwrap();
        let after = meta.db().stats();
        assert_eq!(after.commits - before.commits, 2, "round {round}: intent, then record");
        // Both on disk when written: nothing of the backend's carries the intent there.
        assert_eq!(after.durable_commits - before.durable_commits, 2, "round {round}");
    }

    let keys: Vec<String> = (0..8).map(|i| format!("k{i}")).collect();
    for k in &keys {
        sn.prepare(&c, k, None, &none()).unwrap();
    }
    let start = Arc::new(std::sync::Barrier::new(keys.len()));
    let threads: Vec<_> = keys
        .iter()
        .map(|k| {
            let (sn, start, k) = (sn.clone(), start.clone(), k.clone());
            std::thread::spawn(move || {
                start.wait();
                sn.commit(&ctx("default"), "top", &k, &Labels::new())
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let won = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(won, 1, "{results:?}");
    for (k, r) in keys.iter().zip(&results) {
        if let Err(e) = r {
            assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{k}: {e}");
            assert_eq!(sn.stat(&c, k).unwrap().kind, Kind::Active, "{k}");
            assert_eq!(backend.stat(&bkey_of(backend.as_ref(), k)).unwrap().kind, Kind::Active);
        }
    }
    assert_eq!(sn.stat(&c, "top").unwrap().kind, Kind::Committed);
    assert!(sn.orphans(std::time::Duration::from_secs(10)).unwrap().is_empty());
    assert!(sn.missing(std::time::Duration::from_secs(10)).unwrap().is_empty());
}
