//! The `policy` world: middleware in front of the next snapshotter, as one Rust trait.

use std::marker::PhantomData;

use crate::backend::check_page;
use crate::config::Config;
use crate::convert::{all, labels, wit_labels};
use crate::error::{Error, Result};
use crate::instance;
use crate::types::{Info, Labels, Mount, Usage};
use crate::wit::exports::wasnap::snapshotter::{lifecycle, snapshotter};
use crate::wit::wasnap::snapshotter::types as w;

/// Middleware in front of the next snapshotter in the chain (another policy or the
/// backend): admission, quotas, routing, rewriting labels. Export it with
/// [`export_policy!`](crate::export_policy).
///
/// Every method gets `next` and, unless overridden, passes the call on unchanged, so a
/// policy overrides only what it changes and calls `next` (or not) as it decides.
///
/// ```
/// use wasnap_sdk::{Config, Labels, Mount, Next, Policy, Result, Error};
///
/// /// Refuses snapshots without an owner label.
/// struct RequireOwner;
///
/// impl Policy for RequireOwner {
///     fn init(_: Config) -> Result<Self> {
///         Ok(RequireOwner)
///     }
///     fn prepare(&self, next: &Next, key: &str, parent: Option<&str>, labels: &Labels) -> Result<Vec<Mount>> {
///         if !labels.contains_key("containerd.io/snapshot/owner") {
///             return Err(Error::FailedPrecondition(format!("snapshot {key:?} has no owner")));
///         }
///         next.prepare(key, parent, labels)
///     }
/// }
/// wasnap_sdk::export_policy!(RequireOwner);
/// ```
pub trait Policy: Sized + 'static {
    /// Makes the policy from its configuration (see [`Config::parse`]). An error fails
    /// loading the plugin.
    fn init(config: Config) -> Result<Self>;

    /// See [`Snapshotter::stat`](crate::Snapshotter::stat).
    fn stat(&self, next: &Next, key: &str) -> Result<Info> {
        next.stat(key)
    }

    /// See [`Snapshotter::update`](crate::Snapshotter::update).
    fn update(&self, next: &Next, info: &Info, fieldpaths: &[String]) -> Result<Info> {
        next.update(info, fieldpaths)
    }

    /// See [`Snapshotter::usage`](crate::Snapshotter::usage).
    fn usage(&self, next: &Next, key: &str) -> Result<Usage> {
        next.usage(key)
    }

    /// See [`Snapshotter::mounts`](crate::Snapshotter::mounts).
    fn mounts(&self, next: &Next, key: &str) -> Result<Vec<Mount>> {
        next.mounts(key)
    }

    /// See [`Snapshotter::prepare`](crate::Snapshotter::prepare).
    fn prepare(
        &self,
        next: &Next,
        key: &str,
        parent: Option<&str>,
        labels: &Labels,
    ) -> Result<Vec<Mount>> {
        next.prepare(key, parent, labels)
    }

    /// See [`Snapshotter::view`](crate::Snapshotter::view).
    fn view(
        &self,
        next: &Next,
        key: &str,
        parent: Option<&str>,
        labels: &Labels,
    ) -> Result<Vec<Mount>> {
        next.view(key, parent, labels)
    }

    /// See [`Snapshotter::commit`](crate::Snapshotter::commit).
    fn commit(&self, next: &Next, name: &str, key: &str, labels: &Labels) -> Result<()> {
        next.commit(name, key, labels)
    }

    /// See [`Snapshotter::remove`](crate::Snapshotter::remove).
    fn remove(&self, next: &Next, key: &str) -> Result<()> {
        next.remove(key)
    }

    /// See [`Snapshotter::list`](crate::Snapshotter::list).
    fn list(&self, next: &Next, after: Option<&str>, limit: u32) -> Result<Vec<Info>> {
        next.list(after, limit)
    }

    /// See [`Snapshotter::cleanup`](crate::Snapshotter::cleanup).
    fn cleanup(&self, next: &Next) -> Result<()> {
        next.cleanup()
    }
}

/// The next snapshotter in the chain: the policy world's imported `snapshotter`, in the
/// SDK's types. Only a policy gets one.
#[derive(Debug)]
pub struct Next {
    _private: (),
}

/// How many snapshots [`Next::walk_all`] asks for per page.
pub const WALK_PAGE: u32 = 512;

#[cfg(target_arch = "wasm32")]
use crate::wit::wasnap::snapshotter::snapshotter as imp;

/// Stands in for the next snapshotter outside a wasm guest, with the same signatures.
#[cfg(not(target_arch = "wasm32"))]
mod imp {
    use crate::wit::wasnap::snapshotter::types::{Error, Info, Labels, Mount, UsageInfo};

    fn none<T>() -> Result<T, Error> {
        Err(Error::NotImplemented("the next snapshotter exists only inside a wasm guest".into()))
    }
    pub(super) fn stat(_: &str) -> Result<Info, Error> {
        none()
    }
    pub(super) fn update(_: &Info, _: &[String]) -> Result<Info, Error> {
        none()
    }
    pub(super) fn usage(_: &str) -> Result<UsageInfo, Error> {
        none()
    }
    pub(super) fn mounts(_: &str) -> Result<Vec<Mount>, Error> {
        none()
    }
    pub(super) fn prepare(_: &str, _: Option<&str>, _: &Labels) -> Result<Vec<Mount>, Error> {
        none()
    }
    pub(super) fn view(_: &str, _: Option<&str>, _: &Labels) -> Result<Vec<Mount>, Error> {
        none()
    }
    pub(super) fn commit(_: &str, _: &str, _: &Labels) -> Result<(), Error> {
        none()
    }
    pub(super) fn remove(_: &str) -> Result<(), Error> {
        none()
    }
    pub(super) fn list(_: Option<&str>, _: u32) -> Result<Vec<Info>, Error> {
        none()
    }
    pub(super) fn cleanup() -> Result<(), Error> {
        none()
    }
}

impl Next {
    pub(crate) const fn new() -> Self {
        Next { _private: () }
    }

    /// What the next snapshotter knows about `key`.
    pub fn stat(&self, key: &str) -> Result<Info> {
        Ok(imp::stat(key)?.into())
    }

    /// Updates labels in the next snapshotter.
    pub fn update(&self, info: &Info, fieldpaths: &[String]) -> Result<Info> {
        Ok(imp::update(&info.clone().into(), fieldpaths)?.into())
    }

    /// Disk space used by `key` in the next snapshotter.
    pub fn usage(&self, key: &str) -> Result<Usage> {
        Ok(imp::usage(key)?.into())
    }

    /// The next snapshotter's mounts for `key`.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        Ok(all(imp::mounts(key)?))
    }

    /// Prepares an active snapshot in the next snapshotter.
    pub fn prepare(&self, key: &str, parent: Option<&str>, labels: &Labels) -> Result<Vec<Mount>> {
        Ok(all(imp::prepare(key, parent, &wit_labels(labels))?))
    }

    /// Makes a view in the next snapshotter.
    pub fn view(&self, key: &str, parent: Option<&str>, labels: &Labels) -> Result<Vec<Mount>> {
        Ok(all(imp::view(key, parent, &wit_labels(labels))?))
    }

    /// Commits in the next snapshotter.
    pub fn commit(&self, name: &str, key: &str, labels: &Labels) -> Result<()> {
        Ok(imp::commit(name, key, &wit_labels(labels))?)
    }

    /// Removes `key` from the next snapshotter.
    pub fn remove(&self, key: &str) -> Result<()> {
        Ok(imp::remove(key)?)
    }

    /// One page of the next snapshotter's walk (see
    /// [`Snapshotter::list`](crate::Snapshotter::list)).
    pub fn list(&self, after: Option<&str>, limit: u32) -> Result<Vec<Info>> {
        Ok(all(imp::list(after, limit)?))
    }

    /// Calls `f` with every snapshot the next snapshotter has, in ascending order of
    /// name, fetching pages of [`WALK_PAGE`]. An error from `f` stops the walk; a page out
    /// of order is internal, since following it could loop forever.
    pub fn walk_all(&self, mut f: impl FnMut(Info) -> Result<()>) -> Result<()> {
        let mut after: Option<String> = None;
        loop {
            let page = self.list(after.as_deref(), WALK_PAGE)?;
            check_page(&page, after.as_deref(), WALK_PAGE)
                .map_err(|e| Error::Internal(format!("next snapshotter: {}", e.message())))?;
            let full = page.len() == WALK_PAGE as usize;
            for info in page {
                after = Some(info.name.clone());
                f(info)?;
            }
            if !full {
                return Ok(());
            }
        }
    }

    /// Asks the next snapshotter to reclaim space.
    pub fn cleanup(&self) -> Result<()> {
        Ok(imp::cleanup()?)
    }
}

/// The WIT exports, implemented by calling the policy value. Named by
/// [`export_policy!`](crate::export_policy); not for direct use.
#[doc(hidden)]
#[derive(Debug)]
pub struct PolicyGuest<T>(PhantomData<T>);

type R<T> = std::result::Result<T, w::Error>;

const NEXT: Next = Next::new();

fn call<T: Policy, X>(op: &str, f: impl FnOnce(&T, &Next) -> Result<X>) -> R<X> {
    instance::with(op, |p: &T| f(p, &NEXT)).map_err(w::Error::from)
}

impl<T: Policy> lifecycle::Guest for PolicyGuest<T> {
    fn init(config: String) -> R<()> {
        instance::init(|| T::init(Config::new(config))).map_err(w::Error::from)
    }

    fn ping() {}
}

impl<T: Policy> snapshotter::Guest for PolicyGuest<T> {
    fn stat(key: String) -> R<w::Info> {
        call("stat", |p: &T, n| p.stat(n, &key)).map(Into::into)
    }

    fn update(info: w::Info, fieldpaths: Vec<String>) -> R<w::Info> {
        let info = Info::from(info);
        call("update", |p: &T, n| p.update(n, &info, &fieldpaths)).map(Into::into)
    }

    fn usage(key: String) -> R<w::UsageInfo> {
        call("usage", |p: &T, n| p.usage(n, &key)).map(Into::into)
    }

    fn mounts(key: String) -> R<Vec<w::Mount>> {
        call("mounts", |p: &T, n| p.mounts(n, &key)).map(all)
    }

    fn prepare(key: String, parent: Option<String>, l: w::Labels) -> R<Vec<w::Mount>> {
        let l = labels(l);
        call("prepare", |p: &T, n| p.prepare(n, &key, parent.as_deref(), &l)).map(all)
    }

    fn view(key: String, parent: Option<String>, l: w::Labels) -> R<Vec<w::Mount>> {
        let l = labels(l);
        call("view", |p: &T, n| p.view(n, &key, parent.as_deref(), &l)).map(all)
    }

    fn commit(name: String, key: String, l: w::Labels) -> R<()> {
        let l = labels(l);
        call("commit", |p: &T, n| p.commit(n, &name, &key, &l))
    }

    fn remove(key: String) -> R<()> {
        call("remove", |p: &T, n| p.remove(n, &key))
    }

    fn list(after: Option<String>, limit: u32) -> R<Vec<w::Info>> {
        call("list", |p: &T, n| {
            let page = p.list(n, after.as_deref(), limit)?;
            check_page(&page, after.as_deref(), limit)?;
            Ok(page)
        })
        .map(all)
    }

    fn cleanup() -> R<()> {
        call("cleanup", |p: &T, n| p.cleanup(n))
    }
}
