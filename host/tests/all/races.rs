//! Cleanup running beside creates, commits and removes, on every native driver, as a
//! host stacks them (records in the root's shared database): it must take nothing a
//! record names or a create is about to record.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use wasnap::config::DriverConfig;
use wasnap::driver::overlay::OverlayOptions;
use wasnap::fault::Faults;
use wasnap::metadata::MetaDb;
use wasnap::stack::{Place, Plugins};
use wasnap::{Kind, Labels, Snapshotter};

use crate::common::*;
use crate::loop_btrfs;

/// The snapshotter `driver` in `root`, opened the way a host opens it.
fn host_stack(root: &Path, driver: DriverConfig) -> Snapshotter {
    let root = root.canonicalize().unwrap();
    let cap = cap_std::fs::Dir::open_ambient_dir(&root, cap_std::ambient_authority()).unwrap();
    let db = Arc::new(MetaDb::open(&cap).unwrap());
    let faults = Arc::new(Faults::new());
    let place = Place { root: &cap, root_path: &root, db: Some(db.db()) };
    let stack =
        wasnap::stack::open("sn", &driver.into(), &place, &faults, &Plugins::default()).unwrap();
    Snapshotter::new(db, "sn", stack.backend, faults).with_shared_db(stack.shared_db)
}

/// Every record's data is on disk: the paths its mounts name exist (a btrfs mount names
/// a subvolume id, which `mounts` finds by opening the subvolume).
fn assert_data_present(sn: &Snapshotter) {
    let ctx = ctx("default");
    for info in list(sn, &ctx, &[]).unwrap() {
        let mounts = match info.kind {
            Kind::Committed => sn.committed_mounts(&ctx, &info.name),
            _ => sn.mounts(&ctx, &info.name),
        };
        let mounts = mounts.unwrap_or_else(|e| panic!("{}: {e}", info.name));
        for m in mounts {
            let paths: Vec<String> = match m.kind.as_str() {
                "bind" => vec![m.source.clone()],
                "overlay" => m
                    .options
                    .iter()
                    .filter_map(|o| o.split_once('='))
                    .filter(|(k, _)| matches!(*k, "lowerdir" | "upperdir" | "workdir"))
                    .flat_map(|(_, v)| v.split(':').map(str::to_owned).collect::<Vec<_>>())
                    .collect(),
                _ => vec![],
            };
            for p in paths {
                assert!(Path::new(&p).is_dir(), "{}: {p} is gone", info.name);
            }
        }
    }
    let missing = sn.missing(std::time::Duration::from_secs(10)).unwrap();
    assert!(missing.is_empty(), "records without data: {missing:?}");
}

/// `rounds` of prepare, commit and (every other one) remove, with cleanup looping
/// beside them the whole time.
fn cleanup_beside_creates(sn: &Snapshotter, rounds: usize) {
    let ctx = ctx("default");
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let cleaner = s.spawn(|| {
            let mut runs = 0;
            while !stop.load(Ordering::Relaxed) {
                sn.cleanup().unwrap();
                runs += 1;
            }
            runs
        });
        let work = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut parent: Option<String> = None;
            for i in 0..rounds {
                let (key, name) = (format!("a{i}"), format!("c{i}"));
                sn.prepare(&ctx, &key, parent.as_deref(), &Labels::new()).unwrap();
                sn.usage(&ctx, &key).unwrap();
                sn.commit(&ctx, &name, &key, &Labels::new()).unwrap();
                sn.view(&ctx, &format!("v{i}"), Some(&name), &Labels::new()).unwrap();
                if i % 2 == 0 {
                    sn.remove(&ctx, &format!("v{i}")).unwrap();
                } else {
                    parent = Some(name);
                }
            }
        }));
        // Stop the cleaner even when the work failed, or the scope would wait forever.
        stop.store(true, Ordering::Relaxed);
        if let Err(panic) = work {
            std::panic::resume_unwind(panic);
        }
        assert!(cleaner.join().unwrap() > 0);
    });
    assert_data_present(sn);
    sn.cleanup().unwrap();
    assert_data_present(sn);
}

#[test]
fn cleanup_beside_creates_takes_nothing_live_native() {
    let dir = tmp();
    cleanup_beside_creates(&host_stack(dir.path(), DriverConfig::Native), 300);
}

#[test]
fn cleanup_beside_creates_takes_nothing_live_overlay() {
    crate::require_root!();
    let dir = tmp();
    let sn = host_stack(dir.path(), DriverConfig::Overlay(OverlayOptions::default()));
    cleanup_beside_creates(&sn, 300);
}

#[test]
fn cleanup_beside_creates_takes_nothing_live_btrfs() {
    let fs = loop_btrfs!(512);
    let root = fs.mountpoint.join("root");
    std::fs::create_dir(&root).unwrap();
    cleanup_beside_creates(&host_stack(&root, DriverConfig::Btrfs), 100);
}

/// A native backend that, in the middle of a `prepare` on a parent, runs a hook (which
/// removes the parent) and then fails as native's copy does when the parent's files
/// vanish under it.
struct ParentVanishes {
    inner: Arc<wasnap::driver::Native>,
    hook: std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl wasnap::Wrapper for ParentVanishes {
    fn inner(&self) -> &dyn wasnap::Backend {
        &*self.inner
    }
    fn prepare(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: &Labels,
    ) -> wasnap::Result<Vec<wasnap::Mount>> {
        let hook = self.hook.lock().unwrap().take();
        match (hook, parent) {
            (Some(hook), Some(_)) => {
                hook();
                Err(wasnap::Error::internal(
                    "copy \"f.dat\": lstat: No such file or directory (os error 2)",
                ))
            }
            _ => wasnap::Backend::prepare(&*self.inner, key, parent, labels),
        }
    }
}

/// Found by the soak (`wasnap-bench soak --seed 2026 --duration 5m --kills 10`): a
/// prepare whose parent another client removed while the native driver copied it
/// failed with an internal error; the parent is simply not found any more.
#[test]
fn a_parent_removed_during_a_prepare_is_not_found_not_internal() {
    let dir = tmp();
    let faults = Arc::new(Faults::new());
    let backend = Arc::new(ParentVanishes {
        inner: native(dir.path(), faults.clone()),
        hook: std::sync::Mutex::new(None),
    });
    let sn = Arc::new(Snapshotter::new(metadb(dir.path()), "native", backend.clone(), faults));
    let c = ctx("default");
    sn.prepare(&c, "p-active", None, &Labels::new()).unwrap();
    sn.commit(&c, "p", "p-active", &Labels::new()).unwrap();
    let (remover, rc) = (sn.clone(), c.clone());
    *backend.hook.lock().unwrap() = Some(Box::new(move || remover.remove(&rc, "p").unwrap()));

    let e = sn.prepare(&c, "child", Some("p"), &Labels::new()).unwrap_err();
    assert!(e.is_not_found(), "{e}");
    assert!(e.to_string().contains("parent snapshot \"p\""), "{e}");
    assert!(list(&sn, &c, &[]).unwrap().is_empty(), "nothing is left");
}
