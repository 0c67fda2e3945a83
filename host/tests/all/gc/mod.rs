//! Leases and the garbage collector: every rule of `wasnap::gc` (roots, references,
//! expiry, flat leases, retention), the lease manager's API, dry runs and `check`, a
//! backend that hangs, a crash at each step of a collection, and the scheduler.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use wasnap::Wrapper;
use wasnap::driver::Native;
use wasnap::driver::overlay::OverlayOptions;
use wasnap::fault::{Action, Faults};
use wasnap::gc::{Collector, GcOptions, GcReport, Retention};
use wasnap::metadata::{Leases, Resource};
use wasnap::root::{Config, DriverConfig, Host};
use wasnap::snapshot::LABEL_SNAPSHOT_REF;
use wasnap::{Backend, Ctx, ErrorKind, Labels, Result, Snapshotter};

use crate::common::*;

mod content;
mod leases;
mod robustness;
mod rules;

const ROOT: &str = "containerd.io/gc.root";
const EXPIRE: &str = "containerd.io/gc.expire";
const FLAT: &str = "containerd.io/gc.flat";
const REF_NATIVE: &str = "containerd.io/gc.ref.snapshot.native";
const BREF_NATIVE: &str = "containerd.io/gc.bref.snapshot.native";
const PAST: &str = "2001-02-03T04:05:06Z";
const FUTURE: &str = "2999-01-01T00:00:00Z";

fn none() -> Labels {
    Labels::new()
}

fn config(drivers: &[&str], gc: GcOptions) -> Config {
    let snapshotters = drivers
        .iter()
        .map(|d| {
            let driver = match *d {
                "native" => DriverConfig::Native,
                "overlay" => DriverConfig::Overlay(OverlayOptions::default()),
                other => panic!("no driver {other} in these tests"),
            };
            (d.to_string(), driver.into())
        })
        .collect();
    Config { default_snapshotter: drivers[0].to_owned(), snapshotters, gc, ..Config::default() }
}

/// A host over `drivers` in a fresh root.
struct Env {
    dir: TempDir,
    faults: Arc<Faults>,
    host: Host,
}

impl Env {
    fn new(dir: TempDir, drivers: &[&str], gc: GcOptions) -> Self {
        let faults = Arc::new(Faults::new());
        let host = Host::open_config(dir.path(), faults.clone(), config(drivers, gc)).unwrap();
        Env { dir, faults, host }
    }

    fn native(gc: GcOptions) -> Self {
        Env::new(tmp(), &["native"], gc)
    }

    fn sn(&self, name: &str) -> Arc<Snapshotter> {
        self.host.snapshotter(name).unwrap()
    }

    /// Creates lease `id` in `ns` and returns a context that calls under it.
    fn lease(&self, ns: &str, id: &str, l: &[(&str, &str)]) -> Ctx {
        self.host.leases().create(&ctx(ns), Some(id), &labels(l)).unwrap();
        ctx(ns).with_lease(Some(id.to_owned()))
    }

    fn drop_lease(&self, ns: &str, id: &str) {
        assert!(self.host.delete_lease(&ctx(ns), id, false).unwrap().is_none());
    }

    fn collect(&self) -> GcReport {
        let r = self.host.collect(false).unwrap();
        assert!(r.failed.is_empty(), "{:?}", r.failed);
        r
    }

    fn lease_ids(&self, ns: &str) -> Vec<String> {
        self.host.leases().list(&ctx(ns), &[]).unwrap().into_iter().map(|l| l.id).collect()
    }
}

/// Prepares `<name>-active` on `parent` and commits it as `name` with `l`.
fn commit(sn: &Snapshotter, c: &Ctx, name: &str, parent: Option<&str>, l: &[(&str, &str)]) {
    let active = format!("{name}-active");
    sn.prepare(c, &active, parent, &none()).unwrap();
    sn.commit(c, name, &active, &labels(l)).unwrap();
}

/// The keys of a namespace, sorted.
fn keys(sn: &Snapshotter, ns: &str) -> Vec<String> {
    names(&list(sn, &ctx(ns), &[]).unwrap())
}

/// What a report says was removed, as `snapshotter/namespace/key`, sorted.
fn removed(r: &GcReport) -> Vec<String> {
    r.removed.iter().map(|s| format!("{}/{}/{}", s.snapshotter, s.namespace, s.key)).collect()
}

/// What a report says was pruned from the backends, as `snapshotter:bkey`, in order.
fn pruned(r: &GcReport) -> Vec<String> {
    r.pruned.iter().map(|(s, k)| format!("{s}:{k}")).collect()
}

/// The backend's keys, sorted.
fn bkeys(sn: &Snapshotter) -> Vec<String> {
    backend_keys(sn.backend().as_ref()).into_iter().map(|i| i.name).collect()
}

/// The backend key (`<ns>/<seq>/<key>`) of the record `key` in `ns`.
fn bkey(sn: &Snapshotter, ns: &str, key: &str) -> String {
    let found: Vec<String> = bkeys(sn)
        .into_iter()
        .filter(|b| {
            let mut parts = b.splitn(3, '/');
            parts.next() == Some(ns)
                && parts.next().is_some_and(|s| s.parse::<u64>().is_ok())
                && parts.next() == Some(key)
        })
        .collect();
    assert_eq!(found.len(), 1, "backend key of {ns}/{key}: {found:?}");
    found.into_iter().next().unwrap()
}

fn set<I: IntoIterator<Item = S>, S: Into<String>>(items: I) -> BTreeSet<String> {
    items.into_iter().map(Into::into).collect()
}

/// Sets (`Some`) or deletes (`None`) one label of `key`.
fn set_label(sn: &Snapshotter, c: &Ctx, key: &str, label: &str, value: Option<&str>) {
    let mut info = sn.stat(c, key).unwrap();
    match value {
        Some(v) => info.labels.insert(label.to_owned(), v.to_owned()),
        None => info.labels.remove(label),
    };
    sn.update(c, &info, &[format!("labels.{label}")]).unwrap();
}
