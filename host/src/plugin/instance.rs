//! One instance of a plugin: its store (WASI context, limits, the guest's root) and
//! how a call into it is made, timed, bounded and, if it traps, reported.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cap_std::fs::Dir;
use serde::{Deserialize, Serialize};
use wasmtime::component::ResourceTable;
use wasmtime::{Store, StoreLimits, StoreLimitsBuilder, Trap, UpdateDeadline};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::bindings::{Lifecycle, SnapshotterExports, types as wit};
use super::component::Plugin;
use super::convert::error_from_guest;
use super::output::GuestOutput;
use super::runtime::{Outcome, TICK};
use crate::backend::Backend;
use crate::error::{Context, Error, Result};
use crate::snapshot::Mount;

/// What one plugin may use. Each snapshotter and each policy has its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Most linear memory one instance may have, in MiB. Growing past it traps the
    /// call (with an error saying so) and the instance is replaced.
    pub memory_mib: u64,
    /// Most time one call may run, in milliseconds; time spent in the next
    /// snapshotter of a chain does not count. Past it the call fails as unavailable
    /// and the instance is replaced.
    pub timeout_ms: u64,
    /// Instances that may serve calls at once. Each instance handles one call at a
    /// time; more than one is safe only for a plugin that keeps no state in memory.
    pub instances: u32,
    /// Most snapshots one walk may return before it is cut off as runaway.
    pub max_walk: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { memory_mib: 256, timeout_ms: 60_000, instances: 1, max_walk: 10_000_000 }
    }
}

impl Limits {
    pub(crate) fn check(&self) -> Result<()> {
        let bad = |what: &str| Err(Error::invalid_argument(format!("plugin limit {what}")));
        if self.memory_mib == 0 || self.memory_mib > 4096 {
            return bad("memory_mib must be between 1 and 4096");
        }
        if self.timeout_ms == 0 {
            return bad("timeout_ms must be positive");
        }
        if self.instances == 0 || self.instances > 64 {
            return bad("instances must be between 1 and 64");
        }
        if self.max_walk == 0 {
            return bad("max_walk must be positive");
        }
        Ok(())
    }

    pub(crate) fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

/// Where and how instances of one snapshotter's plugin run.
pub(crate) struct Env {
    pub(crate) root: Arc<Dir>,
    pub(crate) root_path: std::path::PathBuf,
    pub(crate) next: Option<Arc<dyn Backend>>,
    pub(crate) limits: Limits,
    /// The plugin's configuration, as the JSON text `lifecycle.init` receives.
    pub(crate) config: String,
}

/// A store's data: what host functions and WASI see of the world.
pub(crate) struct State {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    pub(crate) plugin: Arc<str>,
    pub(crate) root: Arc<Dir>,
    pub(crate) next: Option<Arc<dyn Backend>>,
    /// Mounts the next snapshotter returned during the current call: a policy may pass
    /// these on as they are.
    pub(crate) next_mounts: Vec<Mount>,
    pub(crate) clock: CallClock,
    pub(crate) stderr: GuestOutput,
    stdout: GuestOutput,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// The time of the call in progress, minus time spent in the next snapshotter.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CallClock {
    started: Instant,
    pub(crate) nested: Duration,
    budget: Duration,
}

impl CallClock {
    fn used(&self) -> Duration {
        self.started.elapsed().saturating_sub(self.nested)
    }
}

/// The error a call's epoch callback raises when its time is up.
#[derive(Debug)]
struct DeadlineExceeded;

impl std::fmt::Display for DeadlineExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("deadline exceeded")
    }
}

impl std::error::Error for DeadlineExceeded {}

/// A live instance and its exports.
pub(crate) struct Instance {
    store: Store<State>,
    lifecycle: Lifecycle,
    exports: SnapshotterExports,
}

fn ticks(d: Duration) -> u64 {
    (d.as_nanos() / TICK.as_nanos()).max(1) as u64
}

impl Instance {
    /// Instantiates `plugin` for `env` and calls `lifecycle.init`.
    pub(crate) fn new(plugin: &Plugin, env: &Env) -> Result<Self> {
        let stdout = GuestOutput::new(plugin.name.clone(), "stdout");
        let stderr = GuestOutput::new(plugin.name.clone(), "stderr");
        let wasi = build_wasi(&env.root_path, &stdout, &stderr)
            .with_context(|| format!("plugin {:?}: set up WASI", plugin.name))?;
        let limits = StoreLimitsBuilder::new()
            .memory_size((env.limits.memory_mib as usize) << 20)
            .trap_on_grow_failure(true)
            .build();
        let state = State {
            wasi,
            table: ResourceTable::new(),
            limits,
            plugin: plugin.name.clone(),
            root: env.root.clone(),
            next: env.next.clone(),
            next_mounts: Vec::new(),
            clock: CallClock {
                started: Instant::now(),
                nested: Duration::ZERO,
                budget: env.limits.timeout(),
            },
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
            Ok(Instance { store, lifecycle, exports })
        })()?;
        plugin.counters.instance_created();
        let config = env.config.clone();
        inst.call(plugin, "init", |lc, _, store| lc.call_init(store, &config))
            .map_err(|e| e.context("init"))?;
        Ok(inst)
    }

    /// Calls into the guest with the call's deadline armed. `Err` with a trap means the
    /// instance must not be used again: the caller drops it.
    pub(crate) fn call<R>(
        &mut self,
        plugin: &Plugin,
        op: &str,
        f: impl FnOnce(
            &Lifecycle,
            &SnapshotterExports,
            &mut Store<State>,
        ) -> wasmtime::Result<std::result::Result<R, wit::Error>>,
    ) -> std::result::Result<R, CallError> {
        start_call(&mut self.store);
        let result = f(&self.lifecycle, &self.exports, &mut self.store);
        let elapsed = self.store.data().clock.started.elapsed();
        let said = self.store.data().stderr.end_call();
        self.store.data().stdout.end_call();
        self.store.data_mut().next_mounts.clear();
        match result {
            Ok(Ok(v)) => {
                plugin.counters.record(elapsed, Outcome::Ok);
                Ok(v)
            }
            Ok(Err(e)) => {
                plugin.counters.record(elapsed, Outcome::Error);
                Err(CallError::Guest(error_from_guest(&plugin.name, e)))
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
    let clock = &mut store.data_mut().clock;
    clock.started = Instant::now();
    clock.nested = Duration::ZERO;
    let budget = clock.budget;
    store.set_epoch_deadline(ticks(budget));
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
    let full = format!("{trap:#}");
    if full.contains("forcing trap when growing memory") {
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
    root: &Path,
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
