//! What the integration tests share: roots on tmpfs, a stack over the native driver, and
//! backends that misbehave on purpose.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cap_std::ambient_authority;
use cap_std::fs::Dir;
use tempfile::TempDir;
use wasnap::Wrapper;
use wasnap::driver::Native;
use wasnap::fault::Faults;
use wasnap::metadata::MetaDb;
use wasnap::snapshot::LABEL_SNAPSHOT_REF;
use wasnap::{Backend, Ctx, Error, Filter, Info, Kind, Labels, Mount, Result, Snapshotter};

/// A fresh directory on tmpfs: these tests are about logic, not the disk.
pub fn tmp() -> TempDir {
    tempfile::Builder::new()
        .prefix("wasnap-test-")
        .tempdir_in("/dev/shm")
        .expect("tmpdir on /dev/shm")
}

/// A fresh directory on the real disk, for durability and crash tests (the CLI
/// package's, which share this file).
#[allow(dead_code)]
pub fn disk_tmp() -> TempDir {
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
    tempfile::Builder::new().prefix("wasnap-disk-").tempdir_in(base).expect("tmpdir on disk")
}

pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

pub fn ctx(ns: &str) -> Ctx {
    Ctx::new(ns).expect("valid namespace")
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Skips the rest of a test that needs root, saying why; under CI (`CI` set) a skip is
/// a failure, because CI runs as root and nothing may skip there.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::common::is_root() {
            if std::env::var_os("CI").is_some() {
                panic!("needs root, and CI must not skip");
            }
            eprintln!("skipped: needs root (mounts, chown, device nodes)");
            return;
        }
    };
}

/// The native driver in its own directory under `root`.
pub fn native(root: &Path, faults: Arc<Faults>) -> Arc<Native> {
    let path = root.join("native");
    std::fs::create_dir_all(&path).expect("mkdir");
    let dir = Dir::open_ambient_dir(&path, ambient_authority()).expect("open dir");
    Arc::new(Native::open(dir, path, faults).expect("open native"))
}

/// A metadata database in `root`.
pub fn metadb(root: &Path) -> Arc<MetaDb> {
    let dir = Dir::open_ambient_dir(root, ambient_authority()).expect("open dir");
    Arc::new(MetaDb::open(&dir).expect("open metadata"))
}

/// A metadata layer over `backend`.
pub struct Stack {
    pub dir: TempDir,
    pub faults: Arc<Faults>,
    pub sn: Snapshotter,
}

impl Stack {
    pub fn root(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

/// A stack over the native driver on tmpfs.
pub fn native_stack() -> Stack {
    let dir = tmp();
    let faults = Arc::new(Faults::new());
    let backend = native(dir.path(), faults.clone());
    let sn = Snapshotter::new(metadb(dir.path()), "native", backend, faults.clone());
    Stack { dir, faults, sn }
}

/// A stack over an arbitrary backend made from the native driver.
pub fn stack_with(wrap: impl FnOnce(Arc<Native>) -> Arc<dyn Backend>) -> Stack {
    let dir = tmp();
    let faults = Arc::new(Faults::new());
    let backend = wrap(native(dir.path(), faults.clone()));
    let sn = Snapshotter::new(metadb(dir.path()), "test", backend, faults.clone());
    Stack { dir, faults, sn }
}

/// All infos of a namespace, sorted by name.
pub fn list(sn: &Snapshotter, ctx: &Ctx, filters: &[&str]) -> Result<Vec<Info>> {
    let filters: Vec<String> = filters.iter().map(|s| s.to_string()).collect();
    let mut v = Vec::new();
    sn.walk(ctx, &filters, &mut |i| {
        v.push(i);
        Ok(())
    })?;
    v.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(v)
}

pub fn names(infos: &[Info]) -> Vec<String> {
    infos.iter().map(|i| i.name.clone()).collect()
}

/// Every snapshot the backend holds, by backend key.
pub fn backend_keys(b: &dyn Backend) -> Vec<Info> {
    let mut v = Vec::new();
    b.walk(&Filter::default(), &mut |i| {
        v.push(i);
        Ok(())
    })
    .expect("backend walk");
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// The host directory behind a bind mount the native driver returned.
pub fn source(mounts: &[Mount]) -> PathBuf {
    assert_eq!(mounts.len(), 1, "native returns one bind mount");
    assert_eq!(mounts[0].kind, "bind");
    PathBuf::from(&mounts[0].source)
}

/// A backend that forwards to the native driver but can be told to fail, after doing
/// part of the work or none of it, and that records what it was asked.
pub struct Flaky {
    pub inner: Arc<Native>,
    /// prepare does the backend work and then reports failure (a half-finished call).
    pub fail_prepare_after_work: AtomicBool,
    /// prepare fails before doing anything.
    pub fail_prepare: AtomicBool,
    pub fail_commit: AtomicBool,
    /// Labels each prepare was given.
    pub seen_labels: Mutex<Vec<Labels>>,
}

impl Flaky {
    pub fn new(inner: Arc<Native>) -> Arc<Self> {
        Arc::new(Flaky {
            inner,
            fail_prepare_after_work: AtomicBool::new(false),
            fail_prepare: AtomicBool::new(false),
            fail_commit: AtomicBool::new(false),
            seen_labels: Mutex::new(Vec::new()),
        })
    }
}

impl Wrapper for Flaky {
    fn inner(&self) -> &dyn Backend {
        &*self.inner
    }
    fn prepare(&self, key: &str, parent: Option<&str>, labels: &Labels) -> Result<Vec<Mount>> {
        self.seen_labels.lock().unwrap().push(labels.clone());
        if self.fail_prepare.load(Ordering::SeqCst) {
            return Err(Error::unavailable("flaky backend: prepare refused"));
        }
        let m = self.inner.prepare(key, parent, labels)?;
        if self.fail_prepare_after_work.load(Ordering::SeqCst) {
            // Like a backend that cleans up its own half-made snapshot before failing.
            self.inner.remove(key)?;
            return Err(Error::internal("flaky backend: failed mid-prepare"));
        }
        Ok(m)
    }
    fn commit(&self, name: &str, key: &str, labels: &Labels) -> Result<()> {
        if self.fail_commit.load(Ordering::SeqCst) {
            return Err(Error::internal("flaky backend: commit failed"));
        }
        self.inner.commit(name, key, labels)
    }
}

/// A backend that de-duplicates layers by `containerd.io/snapshot.ref`, as remote and
/// content-addressed snapshotters do: preparing with a target it already holds as a
/// committed snapshot (on the same parent) returns already-exists.
pub struct Dedup {
    pub inner: Arc<Native>,
}

impl Wrapper for Dedup {
    fn inner(&self) -> &dyn Backend {
        &*self.inner
    }
    fn prepare(&self, key: &str, parent: Option<&str>, labels: &Labels) -> Result<Vec<Mount>> {
        if let Some(target) = labels.get(LABEL_SNAPSHOT_REF) {
            let mut hit = false;
            self.inner.walk(&Filter::default(), &mut |i| {
                hit |= i.kind == Kind::Committed
                    && i.labels.get(LABEL_SNAPSHOT_REF) == Some(target)
                    && i.parent.as_deref() == parent;
                Ok(())
            })?;
            if hit {
                return Err(Error::already_exists(format!("target {target:?}")));
            }
        }
        self.inner.prepare(key, parent, labels)
    }
}
