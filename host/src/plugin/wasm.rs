//! The adapter: a plugin bound to its root, as a [`Backend`].
//!
//! Calls go to an instance from a small pool: one call per instance at a time, at most
//! [`Limits::instances`] instances. An instance that traps (panic, memory limit,
//! deadline, a result the host refuses to lift) is dropped and the next call gets a
//! fresh one, initialised again; the failed call returns a typed error and nothing
//! else notices.
//!
//! A reload ([`WasmSnapshotter::reload`]) swaps the version new instances are made
//! from, after one instance of the new version has started (`init` included): idle
//! instances of the old version are dropped, busy ones finish their call and are
//! dropped when they come back. A version that does not start changes nothing.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::bindings::{Lifecycle, SnapshotterExports, types as wit};
use super::component::{Plugin, Role};
use super::convert::{info_from_wit, info_to_wit, labels_to_wit, usage_from_wit};
use super::instance::{CallError, Env, Instance};
use super::mounts;
use super::space::Space;
use super::state::{Limits, State};
use crate::backend::{Backend, FieldPath};
use crate::error::{Context, Error, Result};
use crate::filter::Filter;
use crate::snapshot::{Info, Labels, Mount, Usage};

/// An instance taken from the pool. Dropped, it goes back if the call left it
/// healthy, and is dropped (freeing its slot) otherwise: after a trap, and also if a
/// panic unwinds through the call, so a slot is never lost.
struct Checkout<'a> {
    owner: &'a WasmSnapshotter,
    inst: Option<Instance>,
    healthy: bool,
}

impl Drop for Checkout<'_> {
    fn drop(&mut self) {
        match self.inst.take() {
            Some(i) if self.healthy => self.owner.checkin(i),
            other => {
                drop(other);
                self.owner.discard();
            }
        }
    }
}

/// Infos asked for per page of a walk.
const PAGE: u32 = 1000;

/// A plugin serving as a backend snapshotter, or as a policy in front of `next`.
pub struct WasmSnapshotter {
    role: Role,
    space: Arc<Space>,
    next: Option<Arc<dyn Backend>>,
    pool: Mutex<Pool>,
    returned: Condvar,
}

impl std::fmt::Debug for WasmSnapshotter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmSnapshotter")
            .field("plugin", &self.current().plugin.name)
            .field("space", &self.space)
            .field("policy", &self.next.is_some())
            .finish()
    }
}

/// How a plugin's instance pool is used, at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PoolUse {
    /// Instances in a call (or being started).
    pub busy: u32,
    /// Instances waiting for a call.
    pub idle: u32,
    /// The most it may have ([`Limits::instances`]).
    pub limit: u32,
}

struct Pool {
    /// The version new instances are made from.
    current: Arc<Env>,
    /// Idle instances, all of the current version.
    idle: Vec<Instance>,
    /// Instances in existence or being created (idle, busy, starting), of any version.
    live: u32,
    closed: bool,
}

impl WasmSnapshotter {
    /// Binds `plugin` to its space (made with layers for a backend) and starts its first
    /// instance, so that a plugin that cannot start fails here, clearly. A backend takes
    /// no `next`; a policy requires one.
    pub fn open(
        plugin: Arc<Plugin>,
        space: Arc<Space>,
        next: Option<Arc<dyn Backend>>,
        limits: Limits,
        config: &serde_json::Value,
    ) -> Result<Self> {
        limits.check()?;
        match (plugin.role(), next.is_some()) {
            (Role::Backend, true) => {
                return Err(Error::invalid_argument(format!(
                    "plugin {:?} is a backend (world `backend`), not a policy: it cannot stand in front of another snapshotter",
                    plugin.name
                )));
            }
            (Role::Policy, false) => {
                return Err(Error::invalid_argument(format!(
                    "plugin {:?} is a policy (world `policy`): it needs a snapshotter behind it, it cannot be a backend",
                    plugin.name
                )));
            }
            _ => {}
        }
        let config = serde_json::to_string(config).with_context(|| "encode plugin config")?;
        if plugin.role() == Role::Backend && !space.has_layers() {
            return Err(Error::internal("a backend plugin's space must have layers"));
        }
        let role = plugin.role();
        let env =
            Env { plugin, space: space.clone(), next: next.clone(), limits, config, generation: 0 };
        let pool = Pool { current: Arc::new(env), idle: Vec::new(), live: 0, closed: false };
        let s =
            WasmSnapshotter { role, space, next, pool: Mutex::new(pool), returned: Condvar::new() };
        s.checkout()?.healthy = true;
        Ok(s)
    }

    /// Replaces the plugin new calls go to with `plugin`, told `config` and bound by
    /// `limits`, once one instance of it has started (its `init` included). Calls in
    /// flight finish on the version they started on. If the new version cannot start,
    /// nothing changes and the error says why. It must have the same role, and the same
    /// key-value budget (the store is shared by both versions).
    pub fn reload(
        &self,
        plugin: Arc<Plugin>,
        limits: Limits,
        config: &serde_json::Value,
    ) -> Result<()> {
        limits.check()?;
        let old = self.current();
        if plugin.role() != self.role {
            return Err(Error::invalid_argument(format!(
                "plugin {:?} is now a {}, but it serves as a {}: a reload cannot change a plugin's world",
                plugin.name,
                plugin.role(),
                self.role
            )));
        }
        if limits.kv_mib != old.limits.kv_mib {
            return Err(Error::invalid_argument(format!(
                "plugin {:?}: limits.kv_mib changed ({} to {}); the key-value budget applies from the next start",
                plugin.name, old.limits.kv_mib, limits.kv_mib
            )));
        }
        let config = serde_json::to_string(config).with_context(|| "encode plugin config")?;
        let env = Arc::new(Env {
            plugin,
            space: self.space.clone(),
            next: self.next.clone(),
            limits,
            config,
            generation: old.generation + 1,
        });
        // Started outside the pool: until it has, the old version serves as before.
        let first = Instance::new(&env)?;
        let retired = {
            let mut pool = self.lock();
            if pool.closed {
                return Err(Error::unavailable(format!("plugin {:?}: closed", env.plugin.name)));
            }
            let retired = std::mem::take(&mut pool.idle);
            pool.live = pool.live - retired.len() as u32 + 1;
            pool.idle.push(first);
            pool.current = env;
            retired
        };
        // The limits on disk change with the version: what the space holds stays, and
        // a write past a smaller budget is refused.
        self.space.set_limits(&self.current().limits);
        drop(retired);
        self.returned.notify_all();
        Ok(())
    }

    /// The version new calls go to.
    fn current(&self) -> Arc<Env> {
        self.lock().current.clone()
    }

    /// Opens `plugin` in the directory `dir` (host path `path`), in a space of its own
    /// there with a database of its own: what a plugin opened outside a host (a test, an
    /// embedder) uses.
    pub fn open_in(
        plugin: Arc<Plugin>,
        dir: &cap_std::fs::Dir,
        path: &std::path::Path,
        next: Option<Arc<dyn Backend>>,
        limits: Limits,
        config: &serde_json::Value,
    ) -> Result<Self> {
        let layers = plugin.role() == Role::Backend;
        let space = Space::open(plugin.name(), dir, path, None, layers, &limits)?;
        Self::open(plugin, space, next, limits, config)
    }

    /// The plugin new calls go to.
    pub fn plugin(&self) -> Arc<Plugin> {
        self.current().plugin.clone()
    }

    /// How many times it has been reloaded.
    pub fn reloads(&self) -> u64 {
        self.current().generation
    }

    /// How its instance pool is used now.
    pub fn pool(&self) -> PoolUse {
        let pool = self.lock();
        let idle = pool.idle.len() as u32;
        PoolUse { busy: pool.live.saturating_sub(idle), idle, limit: pool.current.limits.instances }
    }

    /// Calls the guest's `ping`: a round trip that does nothing.
    pub fn ping(&self) -> Result<()> {
        self.call("ping", |lc, _, st| lc.call_ping(st).map(Ok))
    }

    fn lock(&self) -> MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An idle instance, or a new one if the limit allows, or the next one returned
    /// (waiting at most one call's timeout: a guest blocked in a host wait holds its
    /// instance, and callers must not queue behind it forever).
    fn checkout(&self) -> Result<Checkout<'_>> {
        let mut pool = self.lock();
        let deadline = std::time::Instant::now() + pool.current.limits.timeout();
        loop {
            if pool.closed {
                let name = &pool.current.plugin.name;
                return Err(Error::unavailable(format!("plugin {name:?}: closed")));
            }
            if let Some(i) = pool.idle.pop() {
                return Ok(Checkout { owner: self, inst: Some(i), healthy: false });
            }
            let env = &pool.current;
            if pool.live < env.limits.instances {
                let env = env.clone();
                pool.live += 1;
                drop(pool);
                // The slot is the checkout's from here: if creating fails (or panics), its
                // drop gives the slot back.
                let mut checkout = Checkout { owner: self, inst: None, healthy: false };
                checkout.inst = Some(Instance::new(&env)?);
                return Ok(checkout);
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return Err(Error::unavailable(format!(
                    "plugin {:?}: all {} instance(s) busy for {} ms",
                    env.plugin.name, env.limits.instances, env.limits.timeout_ms
                )));
            }
            pool = self
                .returned
                .wait_timeout(pool, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn checkin(&self, i: Instance) {
        let mut pool = self.lock();
        // An instance of a version since replaced is not used again.
        let retired = if pool.closed || i.env().generation != pool.current.generation {
            pool.live -= 1;
            Some(i)
        } else {
            pool.idle.push(i);
            None
        };
        drop(pool);
        drop(retired);
        self.returned.notify_one();
    }

    fn discard(&self) {
        let mut pool = self.lock();
        pool.live = pool.live.saturating_sub(1);
        drop(pool);
        self.returned.notify_one();
    }

    fn call<R>(
        &self,
        op: &str,
        f: impl FnOnce(
            &Lifecycle,
            &SnapshotterExports,
            &mut wasmtime::Store<State>,
        ) -> wasmtime::Result<std::result::Result<R, wit::Error>>,
    ) -> Result<R> {
        self.call_then(op, f, |_, v| Ok(v))
    }

    /// As [`WasmSnapshotter::call`], with `then` run on the answer before the call ends
    /// (while the layers it made are still its own).
    fn call_then<R, T>(
        &self,
        op: &str,
        f: impl FnOnce(
            &Lifecycle,
            &SnapshotterExports,
            &mut wasmtime::Store<State>,
        ) -> wasmtime::Result<std::result::Result<R, wit::Error>>,
        then: impl FnOnce(&Instance, R) -> Result<T>,
    ) -> Result<T> {
        let mut checkout = self.checkout()?;
        let inst = checkout.inst.as_mut().ok_or_else(|| Error::internal("empty checkout"))?;
        let result = match inst.call(op, f) {
            Ok(v) => {
                checkout.healthy = true;
                then(inst, v)
            }
            Err(CallError::Guest(e)) => {
                checkout.healthy = true;
                Err(e)
            }
            // The checkout drops the instance: it must not be entered again.
            Err(e @ CallError::Trapped(_)) => Err(e.into_error()),
        };
        // A call that failed says why; one that succeeded fails if its layers could not
        // be registered.
        match (inst.finish(), result) {
            (Err(e), Ok(_)) => Err(e),
            (Err(e), Err(first)) => {
                tracing::warn!(error = %e, "after a failed call");
                Err(first)
            }
            (Ok(()), result) => result,
        }
    }

    fn mounts_call(
        &self,
        op: &str,
        f: impl FnOnce(
            &SnapshotterExports,
            &mut wasmtime::Store<State>,
        ) -> wasmtime::Result<std::result::Result<Vec<wit::Mount>, wit::Error>>,
    ) -> Result<Vec<Mount>> {
        self.call_then(
            op,
            |_, ex, st| f(ex, st),
            |inst, got| {
                mounts::resolve(inst.space(), inst.call_id(), got, inst.passed())
                    .map_err(|e| e.context(format!("plugin {:?}: {op}", inst.env().plugin.name)))
            },
        )
    }
}

fn paths_to_wit(paths: &[FieldPath]) -> Vec<String> {
    paths
        .iter()
        .map(|p| match p {
            FieldPath::Labels => "labels".to_owned(),
            FieldPath::Label(k) => format!("labels.{k}"),
        })
        .collect()
}

impl Backend for WasmSnapshotter {
    fn stat(&self, key: &str) -> Result<Info> {
        self.call("stat", |_, ex, st| ex.call_stat(st, key)).map(info_from_wit)
    }

    fn update(&self, info: &Info, fieldpaths: &[FieldPath]) -> Result<Info> {
        let (info, paths) = (info_to_wit(info), paths_to_wit(fieldpaths));
        self.call("update", |_, ex, st| ex.call_update(st, &info, &paths)).map(info_from_wit)
    }

    fn usage(&self, key: &str) -> Result<Usage> {
        self.call("usage", |_, ex, st| ex.call_usage(st, key)).map(usage_from_wit)
    }

    fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        self.mounts_call("mounts", |ex, st| ex.call_mounts(st, key))
    }

    fn prepare(&self, key: &str, parent: Option<&str>, labels: &Labels) -> Result<Vec<Mount>> {
        let labels = labels_to_wit(labels);
        self.mounts_call("prepare", |ex, st| ex.call_prepare(st, key, parent, &labels))
    }

    fn view(&self, key: &str, parent: Option<&str>, labels: &Labels) -> Result<Vec<Mount>> {
        let labels = labels_to_wit(labels);
        self.mounts_call("view", |ex, st| ex.call_view(st, key, parent, &labels))
    }

    fn commit(&self, name: &str, key: &str, labels: &Labels) -> Result<()> {
        let labels = labels_to_wit(labels);
        self.call("commit", |_, ex, st| ex.call_commit(st, name, key, &labels))
    }

    fn remove(&self, key: &str) -> Result<()> {
        self.call("remove", |_, ex, st| ex.call_remove(st, key))
    }

    fn walk(&self, filter: &Filter, f: &mut dyn FnMut(Info) -> Result<()>) -> Result<()> {
        let env = self.current();
        let name = &env.plugin.name;
        let bad = |why: String| Error::internal(format!("plugin {name:?}: list: {why}"));
        let mut after: Option<String> = None;
        let mut total: u64 = 0;
        loop {
            // No instance is held between pages: `f` may call back into this plugin.
            let page = self.call("list", |_, ex, st| ex.call_list(st, after.as_deref(), PAGE))?;
            if page.len() > PAGE as usize {
                return Err(bad(format!(
                    "returned {} snapshots for a page of at most {PAGE}",
                    page.len()
                )));
            }
            total += page.len() as u64;
            if total > env.limits.max_walk {
                return Err(bad(format!(
                    "walk passed {} snapshots (the plugin's max_walk limit); stopped as runaway",
                    env.limits.max_walk
                )));
            }
            let full = page.len() == PAGE as usize;
            let mut prev = after.take();
            for info in page {
                if prev.as_deref().is_some_and(|p| info.name.as_str() <= p) {
                    return Err(bad(format!(
                        "page out of order: {:?} after {:?} (names must ascend)",
                        info.name,
                        prev.unwrap_or_default()
                    )));
                }
                prev = Some(info.name.clone());
                let info = info_from_wit(info);
                if filter.matches(&info) {
                    f(info)?;
                }
            }
            if !full {
                return Ok(());
            }
            after = prev;
        }
    }

    fn cleanup(&self) -> Result<()> {
        self.call("cleanup", |_, ex, st| ex.call_cleanup(st))
    }

    fn close(&self) -> Result<()> {
        let idle = {
            let mut pool = self.lock();
            pool.closed = true;
            let idle = std::mem::take(&mut pool.idle);
            pool.live -= idle.len() as u32;
            idle
        };
        drop(idle);
        self.returned.notify_all();
        // A policy owns the rest of its chain: closing it closes what is behind it.
        match &self.next {
            Some(next) => next.close(),
            None => Ok(()),
        }
    }

    fn verify(&self) -> Result<Vec<(String, String)>> {
        let mut bad = self.space.verify()?;
        if let Some(next) = &self.next {
            bad.extend(next.verify()?);
        }
        Ok(bad)
    }
}
