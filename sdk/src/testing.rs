//! Running a guest's code natively, in `cargo test`: the host's `kv` and `layers` as an
//! in-memory store and directories under a temporary directory of the test's.
//!
//! A guest built for `wasm32-wasip2` talks to the host. Built natively (as `cargo test`
//! builds it), the same SDK calls land here instead, in a [`Harness`] the test makes and
//! enters. Nothing touches the real root filesystem, so a plugin's unit tests are safe
//! to run as root, and several threads entering one harness behave like several
//! instances of the plugin sharing one host.
//!
//! ```
//! use wasnap_sdk::layers::Layer;
//! use wasnap_sdk::testing::Harness;
//!
//! let harness = Harness::new_temp();
//! let _entered = harness.enter();
//! let layer = Layer::create().unwrap();
//! layer.write_file("hello", b"hi", 0o644).unwrap();
//! assert_eq!(std::fs::read(harness.layer_path(layer).join("hello")).unwrap(), b"hi");
//! ```
//!
//! What it does not do: owners and xattrs (set-owner and the xattr calls say not
//! implemented unless run as root), whiteouts, and the host's confinement of paths
//! (paths are checked lexically only). The conformance suite
//! (`wasnap conformance --plugin`) runs the real thing.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use crate::layers::Layer;

/// A stand-in for the host: a key-value store and a directory of layers.
#[derive(Debug, Clone)]
pub struct Harness {
    inner: Arc<Inner>,
}

/// The last revision handed out, and each key's revision and value.
#[derive(Debug, Default)]
struct Table {
    revision: u64,
    entries: BTreeMap<String, (u64, Vec<u8>)>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    kv: Mutex<Table>,
    layers: PathBuf,
    next_layer: AtomicU64,
    _temp: Option<tempfile::TempDir>,
}

thread_local! {
    static CURRENT: RefCell<Option<Arc<Inner>>> = const { RefCell::new(None) };
}

/// While it lives, SDK calls on this thread go to its harness.
#[derive(Debug)]
pub struct Entered {
    before: Option<Arc<Inner>>,
}

impl Drop for Entered {
    fn drop(&mut self) {
        CURRENT.with(|c| *c.borrow_mut() = self.before.take());
    }
}

impl Harness {
    /// A harness whose layers live in `dir/layers` (created).
    pub fn new(dir: impl AsRef<Path>) -> Harness {
        Self::make(dir.as_ref().join("layers"), None)
    }

    /// A harness in a temporary directory of its own, removed with the last clone.
    pub fn new_temp() -> Harness {
        let temp = tempfile::tempdir().expect("a temporary directory for the harness");
        Self::make(temp.path().join("layers"), Some(temp))
    }

    fn make(layers: PathBuf, temp: Option<tempfile::TempDir>) -> Harness {
        std::fs::create_dir_all(&layers).expect("create the harness's layer directory");
        Harness {
            inner: Arc::new(Inner {
                kv: Mutex::default(),
                layers,
                next_layer: AtomicU64::new(1),
                _temp: temp,
            }),
        }
    }

    /// Routes this thread's SDK calls here until the returned guard drops.
    pub fn enter(&self) -> Entered {
        let before = CURRENT.with(|c| c.borrow_mut().replace(self.inner.clone()));
        Entered { before }
    }

    /// Where `layer`'s contents are, for a test to look at.
    pub fn layer_path(&self, layer: Layer) -> PathBuf {
        self.inner.layers.join(layer.0.to_string())
    }

    /// Every key of the store, with its value: for a test to look at.
    pub fn kv_dump(&self) -> BTreeMap<String, Vec<u8>> {
        let kv = self.inner.kv.lock().unwrap_or_else(|e| e.into_inner());
        kv.entries.iter().map(|(k, (_, v))| (k.clone(), v.clone())).collect()
    }
}

fn current() -> crate::Result<Arc<Inner>> {
    CURRENT.with(|c| c.borrow().clone()).ok_or_else(|| {
        crate::Error::FailedPrecondition(
            "no host here: built natively, a guest's calls need a wasnap_sdk::testing::Harness entered on this thread".into(),
        )
    })
}

pub(crate) mod kv {
    use super::current;
    use crate::error::{Error, Result};
    use crate::kv::{Entry, Write};

    pub fn get(key: &str) -> Result<Option<Entry>> {
        let h = current()?;
        let kv = h.kv.lock().unwrap_or_else(|e| e.into_inner());
        Ok(kv
            .entries
            .get(key)
            .map(|(revision, value)| Entry { value: value.clone(), revision: *revision }))
    }

    pub fn range(start: &str, end: Option<&str>, limit: u32) -> Result<Vec<(String, Entry)>> {
        let h = current()?;
        let kv = h.kv.lock().unwrap_or_else(|e| e.into_inner());
        Ok(kv
            .entries
            .range(start.to_owned()..)
            .take_while(|(k, _)| end.is_none_or(|e| k.as_str() < e))
            .take(limit.min(10_000) as usize)
            .map(|(k, (revision, value))| {
                (k.clone(), Entry { value: value.clone(), revision: *revision })
            })
            .collect())
    }

    pub fn commit(checks: Vec<(String, Option<u64>)>, writes: Vec<Write>) -> Result<bool> {
        if writes.len() > 1024 {
            return Err(Error::InvalidArgument("a change has at most 1024 writes".into()));
        }
        let h = current()?;
        let mut kv = h.kv.lock().unwrap_or_else(|e| e.into_inner());
        for (k, rev) in &checks {
            if kv.entries.get(k).map(|(r, _)| *r) != *rev {
                return Ok(false);
            }
        }
        kv.revision += 1;
        let rev = kv.revision;
        for w in writes {
            match w {
                Write::Put(k, v) => {
                    kv.entries.insert(k, (rev, v));
                }
                Write::Delete(k) => {
                    kv.entries.remove(&k);
                }
            }
        }
        Ok(true)
    }
}

pub(crate) mod layers {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::path::{Component, Path, PathBuf};
    use std::sync::atomic::Ordering;

    use super::current;
    use crate::error::{Error, Result};
    use crate::types::Usage;

    fn io(what: String) -> impl FnOnce(std::io::Error) -> Error {
        move |e| Error::io(what, e)
    }

    fn root(layer: u64) -> Result<PathBuf> {
        let p = current()?.layers.join(layer.to_string());
        if !p.is_dir() {
            return Err(Error::NotFound(format!("layer {layer}")));
        }
        Ok(p)
    }

    /// `path` inside the layer, checked lexically (the host checks for real).
    fn at(layer: u64, path: &str) -> Result<PathBuf> {
        let mut p = root(layer)?;
        for c in Path::new(path).components() {
            match c {
                Component::Normal(part) => p.push(part),
                Component::CurDir => {}
                _ => return Err(Error::InvalidArgument(format!("path {path:?} leaves the layer"))),
            }
        }
        Ok(p)
    }

    pub fn create(owner_of: Option<u64>) -> Result<u64> {
        let h = current()?;
        if let Some(o) = owner_of {
            root(o)?;
        }
        let id = h.next_layer.fetch_add(1, Ordering::Relaxed);
        let p = h.layers.join(id.to_string());
        fs::create_dir(&p).map_err(io(format!("create {}", p.display())))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).map_err(io("chmod".into()))?;
        Ok(id)
    }

    fn copy(src: &Path, dst: &Path) -> std::io::Result<()> {
        let meta = fs::symlink_metadata(src)?;
        if meta.file_type().is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(src)?, dst)
        } else if meta.is_dir() {
            fs::create_dir(dst)?;
            for e in fs::read_dir(src)? {
                let e = e?;
                copy(&e.path(), &dst.join(e.file_name()))?;
            }
            fs::set_permissions(dst, meta.permissions())
        } else {
            fs::copy(src, dst).map(drop)
        }
    }

    pub fn clone(source: u64) -> Result<u64> {
        let src = root(source)?;
        let h = current()?;
        let id = h.next_layer.fetch_add(1, Ordering::Relaxed);
        let dst = h.layers.join(id.to_string());
        copy(&src, &dst).map_err(io(format!("copy layer {source}")))?;
        Ok(id)
    }

    pub fn remove(layer: u64) -> Result<()> {
        fs::remove_dir_all(root(layer)?).map_err(io(format!("remove layer {layer}")))
    }

    pub fn usage(layer: u64) -> Result<Usage> {
        fn walk(p: &Path, u: &mut Usage) -> std::io::Result<()> {
            let m = fs::symlink_metadata(p)?;
            u.inodes += 1;
            u.size += std::os::unix::fs::MetadataExt::blocks(&m) * 512;
            if m.is_dir() {
                for e in fs::read_dir(p)? {
                    walk(&e?.path(), u)?;
                }
            }
            Ok(())
        }
        let mut u = Usage::default();
        walk(&root(layer)?, &mut u).map_err(io(format!("usage of layer {layer}")))?;
        Ok(u)
    }

    pub fn list() -> Result<Vec<u64>> {
        let h = current()?;
        let mut ids: Vec<u64> = fs::read_dir(&h.layers)
            .map_err(io("list layers".into()))?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        ids.sort_unstable();
        Ok(ids)
    }

    pub fn read_dir(layer: u64, path: &str) -> Result<Vec<String>> {
        let p = at(layer, path)?;
        let mut names: Vec<String> = fs::read_dir(&p)
            .map_err(io(format!("read {path:?}")))?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
        names.sort();
        Ok(names)
    }

    pub fn read_file(layer: u64, path: &str) -> Result<Vec<u8>> {
        fs::read(at(layer, path)?).map_err(io(format!("read {path:?}")))
    }

    pub fn write_file(layer: u64, path: &str, contents: &[u8], mode: u32) -> Result<()> {
        let p = at(layer, path)?;
        fs::write(&p, contents).map_err(io(format!("write {path:?}")))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(mode))
            .map_err(io(format!("chmod {path:?}")))
    }

    pub fn make_dir(layer: u64, path: &str, mode: u32) -> Result<()> {
        let p = at(layer, path)?;
        fs::create_dir(&p).map_err(io(format!("make directory {path:?}")))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(mode))
            .map_err(io(format!("chmod {path:?}")))
    }

    pub fn symlink(layer: u64, path: &str, target: &str) -> Result<()> {
        std::os::unix::fs::symlink(target, at(layer, path)?)
            .map_err(io(format!("symlink {path:?}")))
    }

    pub fn remove_entry(layer: u64, path: &str) -> Result<()> {
        let p = at(layer, path)?;
        let r = match fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&p),
            Ok(_) => fs::remove_file(&p),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        };
        r.map_err(io(format!("remove {path:?}")))
    }

    pub fn set_mode(layer: u64, path: &str, mode: u32) -> Result<()> {
        fs::set_permissions(at(layer, path)?, fs::Permissions::from_mode(mode))
            .map_err(io(format!("chmod {path:?}")))
    }

    pub fn set_owner(layer: u64, path: &str, uid: u32, gid: u32) -> Result<()> {
        std::os::unix::fs::lchown(at(layer, path)?, Some(uid), Some(gid))
            .map_err(io(format!("chown {path:?}")))
    }

    pub fn set_xattr(_: u64, _: &str, _: &str, _: &[u8]) -> Result<()> {
        Err(Error::NotImplemented("xattrs in the native test harness".into()))
    }

    pub fn get_xattr(_: u64, _: &str, _: &str) -> Result<Option<Vec<u8>>> {
        Err(Error::NotImplemented("xattrs in the native test harness".into()))
    }

    pub fn make_whiteout(_: u64, _: &str) -> Result<()> {
        Err(Error::NotImplemented("whiteouts in the native test harness".into()))
    }
}
