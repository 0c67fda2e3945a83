//! What the host gives a guest: WASI (one private directory, nothing else), `layers`
//! (backends), `kv`, `log` and, for a policy, the imported `snapshotter` (the next
//! snapshotter in its chain).

use std::time::Instant;

use wasmtime::component::{HasSelf, Linker};
use wasmtime_wasi::filesystem::WasiFilesystemCtxView;
use wasmtime_wasi::p2::bindings::sync::filesystem::types as wasi_fs;

use super::bindings::{kv_api, layers_api, log_api, next_api, policy, types as wit};
use super::convert::{PLUGIN_PREFIX, info_from_wit, info_to_wit, labels_from_wit, usage_to_wit};
use super::layers;
use super::quota::{Fs, Quota};
use super::space::{Check, Write};
use super::state::State;
use crate::backend::{Backend, FieldPath};
use crate::error::Result;
use crate::filter::Filter;
use crate::fsutil::deadline;
use crate::snapshot::validate_labels;

pub(crate) fn add_to_linker(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_sync(linker)?;
    // Timers that go off by the end of the call (WASI's would let a guest wait forever).
    super::timers::add_to_linker(linker)?;
    // Files whose writes are charged against the private directory's budget.
    linker.allow_shadowing(true);
    let fs = wasi_fs::add_to_linker::<State, Quota>(linker, |s| Fs {
        inner: WasiFilesystemCtxView { ctx: s.wasi.filesystem(), table: &mut s.table },
        quota: s.space.state_quota(),
        deadline: s.clock.deadline(),
    });
    linker.allow_shadowing(false);
    fs?;
    // The policy world is types, kv, log and the imported snapshotter; a backend adds
    // layers (and never imports the snapshotter).
    policy::Policy::add_to_linker::<State, HasSelf<State>>(linker, |s| s)?;
    layers_api::add_to_linker::<State, HasSelf<State>>(linker, |s| s)
}

impl wit::Host for State {}

type WitResult<T> = std::result::Result<T, wit::Error>;

/// Errors of the next snapshotter a policy may pass on as they are, in one call (the
/// latest).
const MAX_PASSED_ERRORS: usize = 16;

/// Distinct mounts a policy may collect from its next snapshotter in one call.
const MAX_PASSED_MOUNTS: usize = 1024;

impl State {
    fn answer<T>(&self, r: Result<T>) -> WitResult<T> {
        r.map_err(|e| {
            tracing::debug!(plugin = &*self.plugin, "host call refused: {e}");
            e.into()
        })
    }

    /// Runs bulk work under the call's deadline.
    fn bounded<T>(&mut self, f: impl FnOnce(&State) -> Result<T>) -> WitResult<T> {
        let r = deadline::within(Some(self.clock.deadline()), || f(self));
        self.answer(r)
    }

    /// As [`Self::in_layer`], for a function that adds to the layer: refused while
    /// the layers' filesystem has less free than the plugin must leave.
    fn adding_to_layer<T>(
        &mut self,
        id: u64,
        f: impl FnOnce(&std::os::fd::OwnedFd) -> Result<T>,
    ) -> WitResult<T> {
        let room = self.space.room_for_writes();
        self.answer(room)?;
        self.in_layer(id, f)
    }

    /// Runs `f` on layer `id`'s directory, opened for this call.
    fn in_layer<T>(
        &mut self,
        id: u64,
        f: impl FnOnce(&std::os::fd::OwnedFd) -> Result<T>,
    ) -> WitResult<T> {
        self.bounded(|s| {
            let fd = s.space.open_layer(s.call, id)?;
            f(&fd).map_err(|e| e.context(format!("layer {id}")))
        })
    }
}

impl layers_api::Host for State {
    fn create(&mut self, owner_of: Option<u64>) -> WitResult<u64> {
        self.bounded(|s| s.space.create_layer(s.call, owner_of))
    }
    fn clone(&mut self, source: u64) -> WitResult<u64> {
        self.bounded(|s| s.space.clone_layer(s.call, source))
    }
    fn remove(&mut self, layer: u64) -> WitResult<()> {
        self.bounded(|s| s.space.remove_layer(s.call, layer))
    }
    fn usage(&mut self, layer: u64) -> WitResult<wit::UsageInfo> {
        self.bounded(|s| s.space.layer_usage(s.call, layer)).map(usage_to_wit)
    }
    fn list(&mut self) -> WitResult<Vec<u64>> {
        let r = self.space.list_layers(self.call);
        self.answer(r)
    }
    fn read_dir(&mut self, layer: u64, path: String) -> WitResult<Vec<String>> {
        self.in_layer(layer, |fd| layers::read_dir(fd, &path))
    }
    fn read_file(&mut self, layer: u64, path: String) -> WitResult<Vec<u8>> {
        self.in_layer(layer, |fd| layers::read_file(fd, &path))
    }
    fn write_file(
        &mut self,
        layer: u64,
        path: String,
        contents: Vec<u8>,
        mode: u32,
    ) -> WitResult<()> {
        self.adding_to_layer(layer, |fd| layers::write_file(fd, &path, &contents, mode))
    }
    fn make_dir(&mut self, layer: u64, path: String, mode: u32) -> WitResult<()> {
        self.adding_to_layer(layer, |fd| layers::make_dir(fd, &path, mode))
    }
    fn symlink(&mut self, layer: u64, path: String, target: String) -> WitResult<()> {
        self.adding_to_layer(layer, |fd| layers::symlink(fd, &path, &target))
    }
    fn remove_entry(&mut self, layer: u64, path: String) -> WitResult<()> {
        self.in_layer(layer, |fd| layers::remove_entry(fd, &path))
    }
    fn set_mode(&mut self, layer: u64, path: String, mode: u32) -> WitResult<()> {
        self.in_layer(layer, |fd| layers::set_mode(fd, &path, mode))
    }
    fn set_owner(&mut self, layer: u64, path: String, uid: u32, gid: u32) -> WitResult<()> {
        self.in_layer(layer, |fd| layers::set_owner(fd, &path, uid, gid))
    }
    fn set_xattr(
        &mut self,
        layer: u64,
        path: String,
        name: String,
        value: Vec<u8>,
    ) -> WitResult<()> {
        self.adding_to_layer(layer, |fd| layers::set_xattr(fd, &path, &name, &value))
    }
    fn get_xattr(&mut self, layer: u64, path: String, name: String) -> WitResult<Option<Vec<u8>>> {
        self.in_layer(layer, |fd| layers::get_xattr(fd, &path, &name))
    }
    fn make_whiteout(&mut self, layer: u64, path: String) -> WitResult<()> {
        self.adding_to_layer(layer, |fd| layers::make_whiteout(fd, &path))
    }
}

impl kv_api::Host for State {
    fn get(&mut self, key: String) -> WitResult<Option<kv_api::Entry>> {
        let r = self.space.kv_get(&key);
        self.answer(r).map(|e| e.map(|(revision, value)| kv_api::Entry { value, revision }))
    }
    fn range(
        &mut self,
        start: String,
        end: Option<String>,
        limit: u32,
    ) -> WitResult<Vec<(String, kv_api::Entry)>> {
        let r = self.space.kv_range(&start, end.as_deref(), limit);
        self.answer(r).map(|v| {
            v.into_iter()
                .map(|(k, revision, value)| (k, kv_api::Entry { value, revision }))
                .collect()
        })
    }
    fn commit(
        &mut self,
        checks: Vec<kv_api::Check>,
        writes: Vec<kv_api::Write>,
    ) -> WitResult<bool> {
        let checks =
            checks.into_iter().map(|c| Check { key: c.key, revision: c.revision }).collect();
        let writes = writes
            .into_iter()
            .map(|w| match w {
                kv_api::Write::Put((k, v)) => Write::Put(k, v),
                kv_api::Write::Delete(k) => Write::Delete(k),
            })
            .collect();
        let r = self.space.kv_commit(self.call, checks, writes);
        self.answer(r)
    }
}

impl log_api::Host for State {
    fn log(&mut self, level: log_api::Level, message: String) {
        // Charged to the call's output budget like stderr, one line, and with control
        // characters escaped so a guest cannot forge other log lines.
        let Some(message) = self.stderr.take_log_line(&message) else { return };
        let plugin = &*self.plugin;
        match level {
            log_api::Level::Error => tracing::error!(plugin, "{message}"),
            log_api::Level::Warn => tracing::warn!(plugin, "{message}"),
            log_api::Level::Info => tracing::info!(plugin, "{message}"),
            log_api::Level::Debug => tracing::debug!(plugin, "{message}"),
            log_api::Level::Trace => tracing::trace!(plugin, "{message}"),
        }
    }
}

impl State {
    /// Runs `f` on the next snapshotter; its time is not charged to this call's
    /// deadline (the next snapshotter has its own).
    fn with_next<R>(&mut self, f: impl FnOnce(&dyn Backend) -> Result<R>) -> WitResult<R> {
        let Some(next) = self.next.clone() else {
            return Err(wit::Error::NotImplemented(
                "this plugin is a backend: it has no next snapshotter".into(),
            ));
        };
        // Bounded in number, since their time is not charged: a policy looping on its
        // next snapshotter would otherwise never reach its deadline.
        if self.clock.next_calls >= self.clock.max_next_calls {
            return Err(wit::Error::Unavailable(format!(
                "more than {} calls to the next snapshotter in one call (the plugin's next_calls limit)",
                self.clock.max_next_calls
            )));
        }
        self.clock.next_calls += 1;
        let started = Instant::now();
        let r = f(&*next);
        self.clock.nested += started.elapsed();
        r.map_err(|e| {
            let m = e.message();
            if m.starts_with(PLUGIN_PREFIX) && !self.next_errors.iter().any(|k| k == m) {
                if self.next_errors.len() >= MAX_PASSED_ERRORS {
                    self.next_errors.remove(0);
                }
                self.next_errors.push(m.to_owned());
            }
            e.into()
        })
    }

    /// Keeps what the next snapshotter returned, so the policy may pass it on, and hands
    /// the policy indexes into that list. Distinct mounts only, and a bounded number.
    fn passed_mounts(&mut self, mounts: Vec<crate::Mount>) -> WitResult<Vec<wit::Mount>> {
        let mut out = Vec::with_capacity(mounts.len());
        for m in mounts {
            let i = match self.next_mounts.iter().position(|k| *k == m) {
                Some(i) => i,
                None => {
                    if self.next_mounts.len() >= MAX_PASSED_MOUNTS {
                        return Err(wit::Error::FailedPrecondition(format!(
                            "more than {MAX_PASSED_MOUNTS} distinct mounts from the next snapshotter in one call"
                        )));
                    }
                    self.next_mounts.push(m);
                    self.next_mounts.len() - 1
                }
            };
            out.push(wit::Mount::Passed(i as u32));
        }
        Ok(out)
    }
}

impl next_api::Host for State {
    fn stat(&mut self, key: String) -> WitResult<wit::Info> {
        self.with_next(|n| n.stat(&key)).map(|i| info_to_wit(&i))
    }
    fn update(&mut self, info: wit::Info, fieldpaths: Vec<String>) -> WitResult<wit::Info> {
        let info = info_from_wit(info);
        validate_labels(&info.labels)?;
        let paths = FieldPath::parse_all(&fieldpaths, &info.name).map_err(wit::Error::from)?;
        self.with_next(|n| n.update(&info, &paths)).map(|i| info_to_wit(&i))
    }
    fn usage(&mut self, key: String) -> WitResult<wit::UsageInfo> {
        self.with_next(|n| n.usage(&key)).map(usage_to_wit)
    }
    fn mounts(&mut self, key: String) -> WitResult<Vec<wit::Mount>> {
        let m = self.with_next(|n| n.mounts(&key))?;
        self.passed_mounts(m)
    }
    fn prepare(
        &mut self,
        key: String,
        parent: Option<String>,
        labels: wit::Labels,
    ) -> WitResult<Vec<wit::Mount>> {
        // Checked as the metadata layer checks a caller's: the next snapshotter (a
        // native driver, say) stores what it is given.
        let labels = labels_from_wit(labels);
        validate_labels(&labels)?;
        let m = self.with_next(|n| n.prepare(&key, parent.as_deref(), &labels))?;
        self.passed_mounts(m)
    }
    fn view(
        &mut self,
        key: String,
        parent: Option<String>,
        labels: wit::Labels,
    ) -> WitResult<Vec<wit::Mount>> {
        let labels = labels_from_wit(labels);
        validate_labels(&labels)?;
        let m = self.with_next(|n| n.view(&key, parent.as_deref(), &labels))?;
        self.passed_mounts(m)
    }
    fn commit(&mut self, name: String, key: String, labels: wit::Labels) -> WitResult<()> {
        let labels = labels_from_wit(labels);
        validate_labels(&labels)?;
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
