//! One instance of a plugin: its store (WASI context, limits, the guest's root) and
//! how a call into it is made, timed, bounded and, if it traps, reported.

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime::{Store, Trap, UpdateDeadline};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder};

use super::bindings::{Lifecycle, SnapshotterExports, types as wit};
use super::component::Plugin;
use super::convert::error_from_guest;
use super::output::GuestOutput;
use super::runtime::Outcome;
use super::space::{CallId, Space, next_call};
use super::state::{
    CallClock, DeadlineExceeded, Limits, MAX_TABLE_ENTRIES, MemoryExceeded, MemoryLimits, State,
    ticks,
};
use crate::backend::Backend;
use crate::error::{Context, Error, Result};
use crate::snapshot::Mount;

/// One version of a snapshotter's plugin: the component, where its instances run, and
/// how. A reload makes a new `Env` over the same space; each instance keeps the one it
/// was made from, so a call in flight finishes on the version it started on.
pub(crate) struct Env {
    pub(crate) plugin: Arc<Plugin>,
    pub(crate) space: Arc<Space>,
    pub(crate) next: Option<Arc<dyn Backend>>,
    pub(crate) limits: Limits,
    /// The plugin's configuration, as the JSON text `lifecycle.init` receives.
    pub(crate) config: String,
    /// Counts the versions a snapshotter has run: 0 for the one it opened with.
    pub(crate) generation: u64,
}

/// A live instance and its exports.
pub(crate) struct Instance {
    store: Store<State>,
    lifecycle: Lifecycle,
    exports: SnapshotterExports,
    env: Arc<Env>,
}

impl Instance {
    /// Instantiates `env`'s plugin and calls `lifecycle.init`.
    pub(crate) fn new(env: &Arc<Env>) -> Result<Self> {
        let plugin = &*env.plugin;
        let stdout = GuestOutput::new(plugin.name.clone(), "stdout");
        let stderr = GuestOutput::new(plugin.name.clone(), "stderr");
        let wasi = build_wasi(env.space.private(), &stdout, &stderr)
            .with_context(|| format!("plugin {:?}: set up WASI", plugin.name))?;
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_TABLE_ENTRIES);
        let limits = MemoryLimits::new((env.limits.memory_mib as usize) << 20);
        let state = State {
            wasi,
            table,
            limits,
            plugin: plugin.name.clone(),
            space: env.space.clone(),
            next: env.next.clone(),
            call: next_call(),
            next_mounts: Vec::new(),
            next_errors: Vec::new(),
            clock: CallClock::new(env.limits.timeout(), env.limits.next_calls),
            stdout,
            stderr,
        };
        let mut store = Store::new(plugin.pre.engine(), state);
        store.limiter(|s| &mut s.limits);
        // The deadline is checked against the call's own time (see CallClock), so a
        // policy waiting on a slow backend is not cut off for the backend's slowness.
        store.epoch_deadline_callback(|cx| {
            let clock = cx.data().clock;
            let used = clock.used();
            if used >= clock.budget {
                return Err(DeadlineExceeded.into());
            }
            Ok(UpdateDeadline::Continue(ticks(clock.budget - used)))
        });
        let mut inst = (|| -> Result<Instance> {
            start_call(&mut store);
            let instance = plugin.pre.instantiate(&mut store).map_err(|e| {
                Error::unavailable(format!("plugin {:?}: instantiate: {e:#}", plugin.name))
            })?;
            let lifecycle = plugin.lifecycle.load(&mut store, &instance).map_err(|e| {
                Error::from(e).context(format!("plugin {:?}: exports", plugin.name))
            })?;
            let exports = plugin.snapshotter.load(&mut store, &instance).map_err(|e| {
                Error::from(e).context(format!("plugin {:?}: exports", plugin.name))
            })?;
            Ok(Instance { store, lifecycle, exports, env: env.clone() })
        })()?;
        plugin.counters.instance_created();
        let config = env.config.clone();
        let init = inst.call("init", |lc, _, store| lc.call_init(store, &config));
        let settled = inst.finish();
        init.map_err(|e| e.context("init"))?;
        settled.map_err(|e| e.context("init"))?;
        Ok(inst)
    }

    /// The call in progress (or the last one).
    pub(crate) fn call_id(&self) -> CallId {
        self.store.data().call
    }

    /// The version of the plugin it runs.
    pub(crate) fn env(&self) -> &Arc<Env> {
        &self.env
    }

    /// The plugin's space.
    pub(crate) fn space(&self) -> &Arc<Space> {
        &self.store.data().space
    }

    /// What the next snapshotter returned during the call in progress.
    pub(crate) fn passed(&self) -> &[Mount] {
        &self.store.data().next_mounts
    }

    /// Ends the call in progress, however it went: the layers it made are registered
    /// and stop being pending, and what its next snapshotter returned is forgotten. An
    /// error (the layers could not be registered, and are gone) fails the call.
    pub(crate) fn finish(&mut self) -> Result<()> {
        let data = self.store.data_mut();
        data.next_mounts.clear();
        data.space.settle(data.call)
    }

    /// Calls into the guest with the call's deadline armed. `Err` with a trap means the
    /// instance must not be used again: the caller drops it.
    pub(crate) fn call<R>(
        &mut self,
        op: &str,
        f: impl FnOnce(
            &Lifecycle,
            &SnapshotterExports,
            &mut Store<State>,
        ) -> wasmtime::Result<std::result::Result<R, wit::Error>>,
    ) -> std::result::Result<R, CallError> {
        let plugin = &*self.env.plugin;
        start_call(&mut self.store);
        let result = f(&self.lifecycle, &self.exports, &mut self.store);
        let elapsed = self.store.data().clock.started.elapsed();
        let said = self.store.data().stderr.end_call();
        self.store.data().stdout.end_call();
        match result {
            Ok(Ok(v)) => {
                plugin.counters.record(elapsed, Outcome::Ok);
                Ok(v)
            }
            Ok(Err(e)) => {
                plugin.counters.record(elapsed, Outcome::Error);
                let passed = &self.store.data().next_errors;
                Err(CallError::Guest(error_from_guest(&plugin.name, e, passed)))
            }
            Err(trap) => {
                let budget = self.store.data().clock.budget;
                let err = describe_trap(&plugin.name, op, &trap, budget, &said);
                let timeout = err.kind() == crate::ErrorKind::Unavailable;
                plugin.counters.record(elapsed, Outcome::Trap { timeout });
                tracing::warn!(plugin = &*plugin.name, op, "{err}; replacing the instance");
                Err(CallError::Trapped(err))
            }
        }
    }
}

fn start_call(store: &mut Store<State>) {
    let data = store.data_mut();
    data.call = next_call();
    data.clock.started = Instant::now();
    data.clock.nested = Duration::ZERO;
    data.clock.next_calls = 0;
    data.next_errors.clear();
    let budget = data.clock.budget;
    store.set_epoch_deadline(ticks(budget));
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.env.plugin.counters.instance_dropped();
    }
}

/// How a call failed.
#[derive(Debug)]
pub(crate) enum CallError {
    /// The guest returned an error; the instance is fine.
    Guest(Error),
    /// The guest trapped or ran out of time; the instance is gone.
    Trapped(Error),
}

impl CallError {
    pub(crate) fn into_error(self) -> Error {
        match self {
            CallError::Guest(e) | CallError::Trapped(e) => e,
        }
    }

    pub(crate) fn context(self, c: &str) -> Error {
        self.into_error().context(c)
    }
}

/// A trap as an operator wants to read it: what happened, in which call, and the last
/// thing the guest wrote to stderr (a Rust panic's message).
fn describe_trap(
    plugin: &str,
    op: &str,
    trap: &wasmtime::Error,
    budget: Duration,
    stderr: &[String],
) -> Error {
    let head = format!("plugin {plugin:?}: {op}");
    if trap.downcast_ref::<DeadlineExceeded>().is_some()
        || trap.downcast_ref::<Trap>() == Some(&Trap::Interrupt)
    {
        return Error::unavailable(format!(
            "{head}: ran past its deadline of {} ms and was stopped",
            budget.as_millis()
        ));
    }
    let full = format!("{trap:?}");
    if full.contains("resource table has no free keys") {
        return Error::internal(format!(
            "{head}: held more than {MAX_TABLE_ENTRIES} open files, directories or streams at once, the limit of one instance, and was stopped"
        ));
    }
    // Ours (all memories together), or wasmtime's (one memory).
    if trap.downcast_ref::<MemoryExceeded>().is_some()
        || full.contains("forcing trap when growing memory")
    {
        return Error::internal(format!("{head}: exceeded its memory limit and was stopped"));
    }
    let what = match trap.downcast_ref::<Trap>() {
        Some(Trap::UnreachableCodeReached) if !stderr.is_empty() => "panicked".to_owned(),
        Some(t) => format!("trapped ({t})"),
        None => format!("failed ({})", full.lines().next().unwrap_or("unknown error")),
    };
    let said = if stderr.is_empty() {
        String::new()
    } else {
        format!("; it wrote: {}", stderr.join(" | "))
    };
    Error::internal(format!("{head}: {what}{said}"))
}

fn build_wasi(
    root: &std::path::Path,
    stdout: &GuestOutput,
    stderr: &GuestOutput,
) -> wasmtime::Result<WasiCtx> {
    // Nothing is inherited: no environment, no arguments, no stdin, no network (WASI
    // denies sockets unless allowed); stdout and stderr go to the log.
    let mut b = WasiCtxBuilder::new();
    b.stdout(stdout.clone())
        .stderr(stderr.clone())
        // Calls are synchronous already: do file I/O on this thread rather than hop to
        // a blocking pool for each operation.
        .allow_blocking_current_thread(true)
        .preopened_dir(root, "/", FsPerms::ReadWrite)?;
    Ok(b.build())
}
