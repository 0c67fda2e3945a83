//! The metadata layer on top of the backend under test: what wasnap adds (namespaces,
//! label rules, target de-duplication, filters, atomicity) must hold whatever the
//! backend. These cases need no mounts.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use wasnap::Wrapper;
use wasnap::metadata::Snapshotter;
use wasnap::snapshot::{LABEL_SNAPSHOT_REF, MAX_LABEL_SIZE};
use wasnap::{Backend, Ctx, Error, ErrorKind, Info, Kind, Labels, Mount};

use super::helpers::{expect_err, no_labels, walk_all};
use crate::harness::{Case, Env, Fail, Group};

pub(crate) const CASES: &[Case] = &[
    Case {
        name: "NamespaceIsolation",
        group: Group::Metadata,
        about: "the same key in two namespaces names two snapshots; removing one keeps the other",
        run: namespace_isolation,
    },
    Case {
        name: "LabelLimits",
        group: Group::Metadata,
        about: "a label of 4096 bytes fits, one byte more is invalid-argument everywhere, and nothing is recorded",
        run: label_limits,
    },
    Case {
        name: "UpdateFieldPaths",
        group: Group::Metadata,
        about: "updates change labels by field path; any other field path is invalid-argument, once the snapshot is found",
        run: update_field_paths,
    },
    Case {
        name: "TargetDeduplication",
        group: Group::Metadata,
        about: "a prepare naming an existing containerd.io/snapshot.ref target returns already-exists and creates nothing",
        run: target_deduplication,
    },
    Case {
        name: "Filters",
        group: Group::Metadata,
        about: "walk takes containerd's filter syntax; a malformed filter is invalid-argument",
        run: filters,
    },
    Case {
        name: "FailureAtomicity",
        group: Group::Metadata,
        about: "a backend failure leaves no record, and the key can be used again",
        run: failure_atomicity,
    },
    Case {
        name: "RemoveOrder",
        group: Group::Metadata,
        about: "removal with children is failed-precondition; children first empties the backend too",
        run: remove_order,
    },
];

fn ctx(ns: &str) -> Result<Ctx, Fail> {
    Ok(Ctx::new(ns)?)
}

fn stack(env: &Env<'_>) -> Result<(Snapshotter, Arc<dyn Backend>), Fail> {
    let b = env.open()?;
    Ok((env.metadata(b.clone())?, b))
}

fn list(sn: &Snapshotter, c: &Ctx, filters: &[&str]) -> Result<Vec<String>, Fail> {
    let filters: Vec<String> = filters.iter().map(|s| s.to_string()).collect();
    let mut v = Vec::new();
    sn.walk(c, &filters, &mut |i| {
        v.push(i.name);
        Ok(())
    })?;
    v.sort();
    Ok(v)
}

fn namespace_isolation(env: &Env<'_>) -> Result<(), Fail> {
    let (sn, b) = stack(env)?;
    let (a, z) = (ctx("tenant-a")?, ctx("tenant-z")?);
    let mut la = Labels::new();
    la.insert("who".into(), "a".into());
    let mut lz = Labels::new();
    lz.insert("who".into(), "z".into());
    sn.prepare(&a, "k", None, &la)?;
    sn.prepare(&z, "k", None, &lz)?;
    ensure_eq!(sn.stat(&a, "k")?.labels, la, "labels of k in tenant-a");
    ensure_eq!(sn.stat(&z, "k")?.labels, lz, "labels of k in tenant-z");
    ensure_eq!(list(&sn, &a, &[])?, ["k"], "tenant-a's snapshots");
    let backend = walk_all(b.as_ref(), "")?;
    ensure_eq!(backend.len(), 2, "backend snapshots for one key in two namespaces");
    ensure!(backend.iter().all(|i| i.name != "k"), "the backend saw a bare user key: {backend:?}");
    sn.remove(&a, "k")?;
    expect_err(sn.stat(&a, "k"), ErrorKind::NotFound, "k in tenant-a after removing it")?;
    ensure_eq!(sn.stat(&z, "k")?.labels, lz, "k in tenant-z after removing tenant-a's");
    ensure_eq!(walk_all(b.as_ref(), "")?.len(), 1, "backend snapshots after one removal");
    Ok(())
}

fn label_limits(env: &Env<'_>) -> Result<(), Fail> {
    let (sn, _b) = stack(env)?;
    let c = ctx("default")?;
    let key = "org.example/big";
    let mut fits = Labels::new();
    fits.insert(key.into(), "v".repeat(MAX_LABEL_SIZE - key.len()));
    let mut over = Labels::new();
    over.insert(key.into(), "v".repeat(MAX_LABEL_SIZE - key.len() + 1));
    sn.prepare(&c, "fits", None, &fits)?;
    expect_err(
        sn.prepare(&c, "over", None, &over),
        ErrorKind::InvalidArgument,
        "prepare with a 4097-byte label",
    )?;
    expect_err(
        sn.view(&c, "over", None, &over),
        ErrorKind::InvalidArgument,
        "view with a 4097-byte label",
    )?;
    expect_err(sn.stat(&c, "over"), ErrorKind::NotFound, "the rejected snapshot")?;
    expect_err(
        sn.commit(&c, "done", "fits", &over),
        ErrorKind::InvalidArgument,
        "commit with a 4097-byte label",
    )?;
    ensure_eq!(sn.stat(&c, "fits")?.kind, Kind::Active, "the snapshot whose commit was rejected");
    let mut info = sn.stat(&c, "fits")?;
    info.labels = over;
    expect_err(
        sn.update(&c, &info, &[]),
        ErrorKind::InvalidArgument,
        "update to a 4097-byte label",
    )?;
    ensure_eq!(sn.stat(&c, "fits")?.labels, fits, "labels after the rejected update");
    Ok(())
}

fn update_field_paths(env: &Env<'_>) -> Result<(), Fail> {
    let (sn, _b) = stack(env)?;
    let c = ctx("default")?;
    let mut labels = Labels::new();
    labels.insert("keep".into(), "1".into());
    labels.insert("drop".into(), "2".into());
    sn.prepare(&c, "a", None, &labels)?;
    let before = sn.stat(&c, "a")?;
    for bad in ["kind", "parent", "name", "created", "updated", "labelsx"] {
        expect_err(
            sn.update(&c, &before, &[bad.to_string()]),
            ErrorKind::InvalidArgument,
            &format!("update of field {bad:?}"),
        )?;
    }
    // A missing snapshot is not-found first, as containerd looks it up first.
    let missing = Info { name: "missing".into(), ..before.clone() };
    expect_err(
        sn.update(&c, &missing, &["parent".to_string()]),
        ErrorKind::NotFound,
        "update of field \"parent\" on a missing snapshot",
    )?;
    let mut info = before.clone();
    info.labels = Labels::from([("new".to_string(), "3".to_string())]);
    let after = sn.update(&c, &info, &["labels.new".into(), "labels.drop".into()])?;
    let want =
        Labels::from([("keep".to_string(), "1".to_string()), ("new".to_string(), "3".to_string())]);
    ensure_eq!(after.labels, want, "labels after setting `new` and removing `drop` by field path");
    ensure_eq!(after.created, before.created, "created after an update");
    ensure!(after.updated > before.updated, "updated did not move forward on update");
    info.labels = Labels::from([("only".to_string(), "x".to_string())]);
    ensure_eq!(
        sn.update(&c, &info, &["labels".into()])?.labels,
        info.labels,
        "labels after replacing all"
    );
    Ok(())
}

fn target_deduplication(env: &Env<'_>) -> Result<(), Fail> {
    let (sn, b) = stack(env)?;
    let c = ctx("default")?;
    sn.prepare(&c, "extract-1", None, &no_labels())?;
    sn.commit(&c, "sha256:layer", "extract-1", &no_labels())?;
    let target = Labels::from([(LABEL_SNAPSHOT_REF.to_string(), "sha256:layer".to_string())]);
    expect_err(
        sn.prepare(&c, "extract-2", None, &target),
        ErrorKind::AlreadyExists,
        "prepare naming an existing target",
    )?;
    expect_err(sn.stat(&c, "extract-2"), ErrorKind::NotFound, "the de-duplicated prepare's key")?;
    ensure_eq!(
        walk_all(b.as_ref(), "")?.len(),
        1,
        "backend snapshots after a de-duplicated prepare"
    );
    // A target that does not exist yet does not stop the prepare.
    let other = Labels::from([(LABEL_SNAPSHOT_REF.to_string(), "sha256:other".to_string())]);
    sn.prepare(&c, "extract-3", None, &other)?;
    Ok(())
}

fn filters(env: &Env<'_>) -> Result<(), Fail> {
    let (sn, _b) = stack(env)?;
    let c = ctx("default")?;
    let team = |t: &str| Labels::from([("org.example/team".to_string(), t.to_string())]);
    sn.prepare(&c, "a", None, &no_labels())?;
    sn.commit(&c, "base", "a", &team("core"))?;
    sn.prepare(&c, "child-1", Some("base"), &team("x"))?;
    sn.prepare(&c, "child-2", Some("base"), &team("y"))?;
    sn.view(&c, "view-1", Some("base"), &no_labels())?;
    let cases: [(&[&str], &[&str]); 7] = [
        (&["kind==committed"], &["base"]),
        (&["kind==view"], &["view-1"]),
        (&["parent==base"], &["child-1", "child-2", "view-1"]),
        (&[r#"labels."org.example/team"==x"#], &["child-1"]),
        (&["name~=^child-"], &["child-1", "child-2"]),
        (&["parent==base,kind==active"], &["child-1", "child-2"]),
        (&["kind==committed", "kind==view"], &["base", "view-1"]),
    ];
    for (f, want) in cases {
        ensure_eq!(list(&sn, &c, f)?, want, "walk with filters {f:?}");
    }
    for bad in ["kind==", "==x", "name~=(", "labels.\"open"] {
        let r = sn.walk(&c, &[bad.to_string()], &mut |_| Ok(()));
        expect_err(r, ErrorKind::InvalidArgument, &format!("walk with malformed filter {bad:?}"))?;
    }
    Ok(())
}

/// Forwards to the backend under test, refusing prepares while told to.
struct Refusing {
    inner: Arc<dyn Backend>,
    refuse: AtomicBool,
}

impl Wrapper for Refusing {
    fn inner(&self) -> &dyn Backend {
        &*self.inner
    }
    fn prepare(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: &Labels,
    ) -> wasnap::Result<Vec<Mount>> {
        if self.refuse.load(Ordering::SeqCst) {
            return Err(Error::unavailable("refused by the test"));
        }
        self.inner.prepare(key, parent, labels)
    }
}

fn failure_atomicity(env: &Env<'_>) -> Result<(), Fail> {
    let inner = env.open()?;
    let refusing = Arc::new(Refusing { inner: inner.clone(), refuse: AtomicBool::new(true) });
    let sn = env.metadata(refusing.clone())?;
    let c = ctx("default")?;
    expect_err(
        sn.prepare(&c, "a", None, &no_labels()),
        ErrorKind::Unavailable,
        "prepare the backend refuses",
    )?;
    expect_err(sn.stat(&c, "a"), ErrorKind::NotFound, "the refused snapshot")?;
    ensure_eq!(list(&sn, &c, &[])?, Vec::<String>::new(), "snapshots after a refused prepare");
    ensure_eq!(walk_all(inner.as_ref(), "")?.len(), 0, "backend snapshots after a refused prepare");
    refusing.refuse.store(false, Ordering::SeqCst);
    sn.prepare(&c, "a", None, &no_labels())?;
    ensure_eq!(list(&sn, &c, &[])?, ["a"], "snapshots once the backend accepts");
    Ok(())
}

fn remove_order(env: &Env<'_>) -> Result<(), Fail> {
    let (sn, b) = stack(env)?;
    let c = ctx("default")?;
    sn.prepare(&c, "a", None, &no_labels())?;
    sn.commit(&c, "base", "a", &no_labels())?;
    sn.prepare(&c, "b", Some("base"), &no_labels())?;
    sn.commit(&c, "mid", "b", &no_labels())?;
    sn.prepare(&c, "top", Some("mid"), &no_labels())?;
    expect_err(
        sn.remove(&c, "base"),
        ErrorKind::FailedPrecondition,
        "remove of base with a child",
    )?;
    expect_err(sn.remove(&c, "mid"), ErrorKind::FailedPrecondition, "remove of mid with a child")?;
    for key in ["top", "mid", "base"] {
        sn.remove(&c, key)?;
    }
    ensure_eq!(list(&sn, &c, &[])?, Vec::<String>::new(), "snapshots after removing all");
    ensure_eq!(walk_all(b.as_ref(), "")?.len(), 0, "backend snapshots after removing all");
    Ok(())
}
