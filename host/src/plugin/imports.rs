//! What the host gives a guest: WASI (one directory, nothing else), the `host`
//! interface (file work inside the guest's root) and, for a policy, the imported
//! `snapshotter` (the next snapshotter in its chain).

use std::time::Instant;

use wasmtime::component::{HasSelf, Linker};

use super::bindings::{host_api, next_api, policy, types as wit};
use super::convert::{info_from_wit, info_to_wit, labels_from_wit, mount_to_wit, usage_to_wit};
use super::hostfs;
use super::instance::State;
use crate::backend::{Backend, FieldPath};
use crate::error::Error;
use crate::filter::Filter;

pub(crate) fn add_to_linker(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_sync(linker)?;
    // The policy world is the backend world plus the imported snapshotter; a backend
    // simply never imports it.
    policy::Policy::add_to_linker::<State, HasSelf<State>>(linker, |s| s)
}

impl wit::Host for State {}

type WitResult<T> = std::result::Result<T, wit::Error>;

/// Distinct mounts a policy may collect from its next snapshotter in one call.
const MAX_PASSED_MOUNTS: usize = 1024;

fn tag(plugin: &str, e: Error) -> wit::Error {
    tracing::debug!(plugin, "host call failed: {e}");
    e.into()
}

impl host_api::Host for State {
    fn copy_tree(&mut self, src: String, dst: String) -> WitResult<()> {
        hostfs::copy_tree(&self.root, &src, &dst).map_err(|e| tag(&self.plugin, e))
    }
    fn remove_tree(&mut self, path: String) -> WitResult<()> {
        hostfs::remove_tree(&self.root, &path).map_err(|e| tag(&self.plugin, e))
    }
    fn disk_usage(&mut self, path: String) -> WitResult<wit::UsageInfo> {
        hostfs::disk_usage(&self.root, &path).map(usage_to_wit).map_err(|e| tag(&self.plugin, e))
    }
    fn chown(&mut self, path: String, uid: u32, gid: u32) -> WitResult<()> {
        hostfs::chown(&self.root, &path, uid, gid).map_err(|e| tag(&self.plugin, e))
    }
    fn chmod(&mut self, path: String, mode: u32) -> WitResult<()> {
        hostfs::chmod(&self.root, &path, mode).map_err(|e| tag(&self.plugin, e))
    }
    fn set_xattr(&mut self, path: String, name: String, value: Vec<u8>) -> WitResult<()> {
        hostfs::set_xattr(&self.root, &path, &name, &value).map_err(|e| tag(&self.plugin, e))
    }
    fn get_xattr(&mut self, path: String, name: String) -> WitResult<Option<Vec<u8>>> {
        hostfs::get_xattr(&self.root, &path, &name).map_err(|e| tag(&self.plugin, e))
    }
    fn list_xattrs(&mut self, path: String) -> WitResult<Vec<String>> {
        hostfs::list_xattrs(&self.root, &path).map_err(|e| tag(&self.plugin, e))
    }
    fn remove_xattr(&mut self, path: String, name: String) -> WitResult<()> {
        hostfs::remove_xattr(&self.root, &path, &name).map_err(|e| tag(&self.plugin, e))
    }
    fn make_whiteout(&mut self, path: String) -> WitResult<()> {
        hostfs::make_whiteout(&self.root, &path).map_err(|e| tag(&self.plugin, e))
    }
    fn log(&mut self, level: host_api::Level, message: String) {
        // Charged to the call's output budget like stderr, one line, and with control
        // characters escaped so a guest cannot forge other log lines.
        let Some(message) = self.stderr.take_log_line(&message) else { return };
        let plugin = &*self.plugin;
        match level {
            host_api::Level::Error => tracing::error!(plugin, "{message}"),
            host_api::Level::Warn => tracing::warn!(plugin, "{message}"),
            host_api::Level::Info => tracing::info!(plugin, "{message}"),
            host_api::Level::Debug => tracing::debug!(plugin, "{message}"),
            host_api::Level::Trace => tracing::trace!(plugin, "{message}"),
        }
    }
}

impl State {
    /// Runs `f` on the next snapshotter; its time is not charged to this call's
    /// deadline (the next snapshotter has its own).
    fn with_next<R>(&mut self, f: impl FnOnce(&dyn Backend) -> crate::Result<R>) -> WitResult<R> {
        let Some(next) = self.next.clone() else {
            return Err(wit::Error::NotImplemented(
                "this plugin is a backend: it has no next snapshotter".into(),
            ));
        };
        let started = Instant::now();
        let r = f(&*next);
        self.clock.nested += started.elapsed();
        r.map_err(Into::into)
    }

    /// Remembers what the next snapshotter returned, so the policy may pass it on. The
    /// list lives in host memory, outside the guest's cap: it keeps distinct mounts only,
    /// and at most a bounded number of them.
    fn passed_mounts(&mut self, mounts: &[crate::Mount]) -> WitResult<Vec<wit::Mount>> {
        for m in mounts {
            if !self.next_mounts.contains(m) {
                if self.next_mounts.len() >= MAX_PASSED_MOUNTS {
                    return Err(wit::Error::FailedPrecondition(format!(
                        "more than {MAX_PASSED_MOUNTS} distinct mounts from the next snapshotter in one call"
                    )));
                }
                self.next_mounts.push(m.clone());
            }
        }
        Ok(mounts.iter().map(mount_to_wit).collect())
    }
}

impl next_api::Host for State {
    fn stat(&mut self, key: String) -> WitResult<wit::Info> {
        self.with_next(|n| n.stat(&key)).map(|i| info_to_wit(&i))
    }
    fn update(&mut self, info: wit::Info, fieldpaths: Vec<String>) -> WitResult<wit::Info> {
        let info = info_from_wit(info);
        let paths = FieldPath::parse_all(&fieldpaths, &info.name)?;
        self.with_next(|n| n.update(&info, &paths)).map(|i| info_to_wit(&i))
    }
    fn usage(&mut self, key: String) -> WitResult<wit::UsageInfo> {
        self.with_next(|n| n.usage(&key)).map(usage_to_wit)
    }
    fn mounts(&mut self, key: String) -> WitResult<Vec<wit::Mount>> {
        let m = self.with_next(|n| n.mounts(&key))?;
        self.passed_mounts(&m)
    }
    fn prepare(
        &mut self,
        key: String,
        parent: Option<String>,
        labels: wit::Labels,
    ) -> WitResult<Vec<wit::Mount>> {
        let labels = labels_from_wit(labels);
        let m = self.with_next(|n| n.prepare(&key, parent.as_deref(), &labels))?;
        self.passed_mounts(&m)
    }
    fn view(
        &mut self,
        key: String,
        parent: Option<String>,
        labels: wit::Labels,
    ) -> WitResult<Vec<wit::Mount>> {
        let labels = labels_from_wit(labels);
        let m = self.with_next(|n| n.view(&key, parent.as_deref(), &labels))?;
        self.passed_mounts(&m)
    }
    fn commit(&mut self, name: String, key: String, labels: wit::Labels) -> WitResult<()> {
        let labels = labels_from_wit(labels);
        self.with_next(|n| n.commit(&name, &key, &labels))
    }
    fn remove(&mut self, key: String) -> WitResult<()> {
        self.with_next(|n| n.remove(&key))
    }
    fn list(&mut self, after: Option<String>, limit: u32) -> WitResult<Vec<wit::Info>> {
        // The next snapshotter walks with a callback; a page is its `limit` smallest
        // names above `after`, kept in a bounded map while the walk goes by.
        let limit = limit.clamp(1, 100_000) as usize;
        let page = self.with_next(|n| {
            let mut page = std::collections::BTreeMap::new();
            n.walk(&Filter::default(), &mut |info| {
                if after.as_deref().is_none_or(|a| info.name.as_str() > a) {
                    page.insert(info.name.clone(), info);
                    if page.len() > limit {
                        page.pop_last();
                    }
                }
                Ok(())
            })?;
            Ok(page)
        })?;
        Ok(page.values().map(info_to_wit).collect())
    }
    fn cleanup(&mut self) -> WitResult<()> {
        self.with_next(|n| n.cleanup())
    }
}
