//! The `backend` world: a snapshotter, as one Rust trait.

use std::marker::PhantomData;

use crate::config::Config;
use crate::convert::{all, labels};
use crate::error::{Error, Result};
use crate::instance;
use crate::types::{Info, Labels, Mount, Usage};
use crate::wit::exports::wasnap::snapshotter::{lifecycle, snapshotter};
use crate::wit::wasnap::snapshotter::types as w;

/// A snapshotter with containerd's semantics, addressed by backend keys: what a `backend`
/// plugin implements. Export it with [`export_backend!`](crate::export_backend).
///
/// The host's metadata layer sits above: it owns namespaces, user keys, leases and
/// garbage collection, validates labels, and calls the backend with opaque keys (which
/// contain `/`). Every method has the contract the WIT `snapshotter` interface states;
/// `wasnap conformance --plugin` checks it. [`Store`](crate::store::Store) does the
/// record-keeping part of it.
///
/// The host makes one value per instance with [`Snapshotter::init`] and calls the other
/// methods on it one at a time, so `&self` needs no locking; state that must outlive the
/// instance (and be seen by the host's other instances) belongs in the key-value store
/// ([`kv`](crate::kv), or the [`Store`](crate::store::Store) built on it).
///
/// A plugin that keeps its records in a [`Store`](crate::store::Store) returns it from
/// [`Snapshotter::store`] and gets `stat`, `update` and `list` from it.
pub trait Snapshotter: Sized + 'static {
    /// Makes the plugin from its configuration (see [`Config::parse`]). An error fails
    /// loading the plugin.
    fn init(config: Config) -> Result<Self>;

    /// The store holding the plugin's records, if it keeps them in one: the default
    /// `stat`, `update` and `list` answer from it.
    fn store(&self) -> Option<&crate::store::Store> {
        None
    }

    /// What is known about `key`; not-found if it does not exist.
    fn stat(&self, key: &str) -> Result<Info> {
        need_store(self.store(), "stat")?.stat(key)
    }

    /// Changes the labels of `info.name` as `fieldpaths` say (see
    /// [`fieldpath::apply`](crate::fieldpath::apply)) and returns the new info. Kind, name,
    /// parent and `created` never change; `updated` moves forward.
    fn update(&self, info: &Info, fieldpaths: &[String]) -> Result<Info> {
        need_store(self.store(), "update")?.update(info, fieldpaths)
    }

    /// Disk space used by `key` itself, not counting its parents.
    fn usage(&self, key: &str) -> Result<Usage>;

    /// The mounts that make `key` visible: writable for an active snapshot, read-only for
    /// a view and a committed one.
    fn mounts(&self, key: &str) -> Result<Vec<Mount>>;

    /// Creates the active snapshot `key` on the committed snapshot `parent` (or empty,
    /// with a root directory of mode 0755). already-exists if `key` is taken, not-found if
    /// `parent` is missing, failed-precondition or invalid-argument if it is not committed.
    fn prepare(&self, key: &str, parent: Option<&str>, labels: &Labels) -> Result<Vec<Mount>>;

    /// As [`Snapshotter::prepare`], but the snapshot is a read-only view.
    fn view(&self, key: &str, parent: Option<&str>, labels: &Labels) -> Result<Vec<Mount>>;

    /// Turns the active snapshot `key` into the committed snapshot `name` with `labels`;
    /// `key` stops existing. already-exists if `name` is taken, not-found if `key` is
    /// missing, failed-precondition if it is not active.
    fn commit(&self, name: &str, key: &str, labels: &Labels) -> Result<()>;

    /// Removes `key`; failed-precondition while another snapshot has it as parent.
    fn remove(&self, key: &str) -> Result<()>;

    /// One page of a walk over every snapshot in ascending byte order of name: at most
    /// `limit` infos with names strictly greater than `after`. A shorter page ends the walk.
    fn list(&self, after: Option<&str>, limit: u32) -> Result<Vec<Info>> {
        need_store(self.store(), "list")?.list(after, limit)
    }

    /// Reclaims space left by removed snapshots without touching live ones. Does nothing
    /// unless overridden.
    fn cleanup(&self) -> Result<()> {
        Ok(())
    }
}

fn need_store<'a>(
    store: Option<&'a crate::store::Store>,
    op: &str,
) -> Result<&'a crate::store::Store> {
    store.ok_or_else(|| {
        Error::NotImplemented(format!(
            "{op}: the plugin neither implements it nor returns a Store from Snapshotter::store"
        ))
    })
}

/// Checks a page before it leaves the plugin, so that an author sees a clear error here
/// rather than a refusal from the host.
pub(crate) fn check_page(page: &[Info], after: Option<&str>, limit: u32) -> Result<()> {
    if page.len() > limit as usize {
        return Err(Error::Internal(format!(
            "list returned {} snapshots, more than the limit {limit}",
            page.len()
        )));
    }
    let mut last = after;
    for info in page {
        if last.is_some_and(|l| info.name.as_str() <= l) {
            return Err(Error::Internal(format!(
                "list returned {:?} after {:?}: names must be strictly ascending and after {after:?}",
                info.name,
                last.unwrap_or_default()
            )));
        }
        last = Some(&info.name);
    }
    Ok(())
}

/// The WIT exports, implemented by calling the plugin value. Named by
/// [`export_backend!`](crate::export_backend); not for direct use.
#[doc(hidden)]
#[derive(Debug)]
pub struct BackendGuest<T>(PhantomData<T>);

type R<T> = std::result::Result<T, w::Error>;

fn call<T: Snapshotter, X>(op: &str, f: impl FnOnce(&T) -> Result<X>) -> R<X> {
    instance::with(op, f).map_err(w::Error::from)
}

impl<T: Snapshotter> lifecycle::Guest for BackendGuest<T> {
    fn init(config: String) -> R<()> {
        instance::init(|| T::init(Config::new(config))).map_err(w::Error::from)
    }

    fn ping() {}
}

impl<T: Snapshotter> snapshotter::Guest for BackendGuest<T> {
    fn stat(key: String) -> R<w::Info> {
        call("stat", |p: &T| p.stat(&key)).map(Into::into)
    }

    fn update(info: w::Info, fieldpaths: Vec<String>) -> R<w::Info> {
        let info = Info::from(info);
        call("update", |p: &T| p.update(&info, &fieldpaths)).map(Into::into)
    }

    fn usage(key: String) -> R<w::UsageInfo> {
        call("usage", |p: &T| p.usage(&key)).map(Into::into)
    }

    fn mounts(key: String) -> R<Vec<w::Mount>> {
        call("mounts", |p: &T| p.mounts(&key)).map(all)
    }

    fn prepare(key: String, parent: Option<String>, l: w::Labels) -> R<Vec<w::Mount>> {
        let l = labels(l);
        call("prepare", |p: &T| p.prepare(&key, parent.as_deref(), &l)).map(all)
    }

    fn view(key: String, parent: Option<String>, l: w::Labels) -> R<Vec<w::Mount>> {
        let l = labels(l);
        call("view", |p: &T| p.view(&key, parent.as_deref(), &l)).map(all)
    }

    fn commit(name: String, key: String, l: w::Labels) -> R<()> {
        let l = labels(l);
        call("commit", |p: &T| p.commit(&name, &key, &l))
    }

    fn remove(key: String) -> R<()> {
        call("remove", |p: &T| p.remove(&key))
    }

    fn list(after: Option<String>, limit: u32) -> R<Vec<w::Info>> {
        call("list", |p: &T| {
            let page = p.list(after.as_deref(), limit)?;
            check_page(&page, after.as_deref(), limit)?;
            Ok(page)
        })
        .map(all)
    }

    fn cleanup() -> R<()> {
        call("cleanup", |p: &T| p.cleanup())
    }
}
