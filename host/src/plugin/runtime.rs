//! The one wasmtime engine of the process, and the on-disk cache of compiled plugins.
//!
//! One `Engine` serves every plugin: it owns the pooling allocator (instances come from
//! preallocated slots, memories are initialised copy-on-write), and one thread advances
//! its epoch every [`TICK`](super::state::TICK), which is how a call's deadline interrupts a guest that
//! does not return. Each store still caps its own memory and time (see
//! [`Limits`](super::Limits)).
//!
//! Compiling a component takes ~100 ms; loading a compiled one takes well under 1 ms.
//! Compiled code is cached as `<sha256 of the .wasm>-<engine hash>.cwasm`, where the
//! engine hash covers this wasmtime build and its settings
//! (`Engine::precompile_compatibility_hash`). Files are written to a temporary name
//! and renamed, so a reader sees a whole file or none. Deserializing runs native code
//! from the file, so it is done only from the host's own cache directory (private to
//! the host, under its root) and only for names this code wrote.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use cap_std::fs::Dir;
use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::state::{State, TICK};
use crate::error::{Context, Error, Result};

/// Instances that may exist at once in the process, over all plugins.
const POOL_INSTANCES: u32 = 512;

/// The process's plugin runtime: engine and linker.
pub struct Runtime {
    engine: Engine,
    linker: Linker<State>,
    hash: String,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").field("engine_hash", &self.hash).finish_non_exhaustive()
    }
}

static RUNTIME: OnceLock<std::result::Result<Runtime, String>> = OnceLock::new();

impl Runtime {
    /// The runtime, created (and its epoch thread started) on first use.
    pub fn get() -> Result<&'static Runtime> {
        RUNTIME
            .get_or_init(|| Runtime::new().map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| Error::internal(format!("start the plugin runtime: {e}")))
    }

    fn new() -> wasmtime::Result<Self> {
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(POOL_INSTANCES)
            .total_core_instances(POOL_INSTANCES * 8)
            .total_memories(POOL_INSTANCES)
            .total_tables(POOL_INSTANCES * 4)
            .max_core_instances_per_component(32)
            .max_memories_per_component(2)
            .max_tables_per_component(8)
            // Slots stay mapped after use: re-instantiating after a trap is cheap.
            .max_unused_warm_slots(32);
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .memory_init_cow(true)
            .concurrency_support(false)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config)?;
        let mut linker = Linker::new(&engine);
        super::imports::add_to_linker(&mut linker)?;

        let mut h = Sha256Hasher(Sha256::new());
        engine.precompile_compatibility_hash().hash(&mut h);
        let hash = hex(&h.0.finalize()[..8]);

        let ticker = engine.weak();
        std::thread::Builder::new().name("wasnap-epoch".into()).spawn(move || {
            while let Some(engine) = ticker.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(TICK);
            }
        })?;
        Ok(Runtime { engine, linker, hash })
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub(crate) fn linker(&self) -> &Linker<State> {
        &self.linker
    }

    /// Identifies this wasmtime build and settings: compiled code is valid only here.
    pub fn engine_hash(&self) -> &str {
        &self.hash
    }

    /// Compiles `wasm`, or loads it from `cache` if this engine compiled it before, and
    /// stores a fresh compilation there. Returns the component and how it was obtained.
    pub fn load(&self, wasm: &[u8], cache: Option<&Dir>) -> Result<(Component, Loaded)> {
        let started = Instant::now();
        let digest = hex(&Sha256::digest(wasm));
        let name = format!("{digest}-{}.cwasm", self.hash);
        if let Some(dir) = cache
            && dir.symlink_metadata(&name).is_ok_and(|m| m.is_file())
        {
            // Mapped, not read: the file is opened through the cache directory's
            // descriptor (its /proc link), so the capability still decides what is read.
            let path = format!("/proc/self/fd/{}/{name}", std::os::fd::AsRawFd::as_raw_fd(dir));
            // SAFETY: the file is in the host's private cache, written only by `store`
            // below (whole, by rename), under a name made of the hash of the source and of
            // this engine's compatibility; wasmtime still checks its header. The file
            // stays mapped while the component lives: it must be replaced (rename) or
            // unlinked, never rewritten in place, or the mapping faults.
            #[allow(unsafe_code)]
            let loaded = unsafe { Component::deserialize_file(&self.engine, &path) };
            match loaded {
                Ok(c) => {
                    return Ok((c, Loaded { cached: true, elapsed: started.elapsed(), digest }));
                }
                Err(e) => tracing::warn!("cached plugin {name} is unusable, recompiling: {e}"),
            }
        }
        if !wasmparser_is_component(wasm) {
            return Err(Error::invalid_argument(
                "not a WebAssembly component (a core module, or not wasm at all): build the plugin for wasm32-wasip2",
            ));
        }
        let component = Component::new(&self.engine, wasm)
            .map_err(|e| Error::invalid_argument(format!("compile plugin: {e:#}")))?;
        if let Some(dir) = cache
            && let Err(e) = store(dir, &name, &component)
        {
            tracing::warn!("could not cache compiled plugin {name}: {e}");
        }
        Ok((component, Loaded { cached: false, elapsed: started.elapsed(), digest }))
    }
}

/// How [`Runtime::load`] obtained a component.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// From the cache (true) or compiled now (false).
    pub cached: bool,
    /// Time taken.
    pub elapsed: Duration,
    /// sha256 of the `.wasm`, in hex.
    pub digest: String,
}

/// A component is a wasm binary whose version field says "component" (layer 1).
fn wasmparser_is_component(wasm: &[u8]) -> bool {
    wasm.len() >= 8 && wasm[..4] == *b"\0asm" && wasm[6..8] == [1, 0]
}

fn store(dir: &Dir, name: &str, component: &Component) -> Result<()> {
    use std::io::Write;
    let bytes = component.serialize().with_context(|| "serialize plugin")?;
    // Unique per process and per call: two threads may compile the same plugin at once.
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let tmp = format!(".{name}.{}.{seq}.tmp", std::process::id());
    let mut opts = cap_std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    let mut f = dir.open_with(&tmp, &opts).with_context(|| format!("create {name}"))?;
    let written =
        f.write_all(&bytes).and_then(|()| f.sync_all()).and_then(|()| dir.rename(&tmp, dir, name));
    if written.is_err() {
        let _ = dir.remove_file(&tmp);
    }
    written.with_context(|| format!("write {name}"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

struct Sha256Hasher(Sha256);

impl Hasher for Sha256Hasher {
    fn finish(&self) -> u64 {
        0 // unused: the digest is read from the inner hasher
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

/// Calls, failures and time of one plugin, since the process started.
#[derive(Debug, Default)]
pub struct Counters {
    calls: AtomicU64,
    errors: AtomicU64,
    traps: AtomicU64,
    timeouts: AtomicU64,
    instances: AtomicU64,
    live: AtomicU64,
    busy_nanos: AtomicU64,
}

/// A copy of [`Counters`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CountersSnapshot {
    /// Calls into the guest.
    pub calls: u64,
    /// Calls that returned an error from the guest.
    pub errors: u64,
    /// Calls that trapped (panic, memory limit, bad output) or timed out.
    pub traps: u64,
    /// Of the traps, those that ran past their deadline.
    pub timeouts: u64,
    /// Instances created (the first, and one for each replaced after a trap).
    pub instances: u64,
    /// Instances alive now. Each holds a slot of the engine's pool; a plugin that fails
    /// to open, or an instance that traps, gives its slot back.
    pub live: u64,
    /// Total time spent in calls, in microseconds.
    pub busy_micros: u64,
}

impl Counters {
    pub(crate) fn record(&self, elapsed: Duration, outcome: Outcome) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.busy_nanos.fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
        match outcome {
            Outcome::Ok => {}
            Outcome::Error => {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Trap { timeout } => {
                self.traps.fetch_add(1, Ordering::Relaxed);
                if timeout {
                    self.timeouts.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    pub(crate) fn instance_created(&self) {
        self.instances.fetch_add(1, Ordering::Relaxed);
        self.live.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn instance_dropped(&self) {
        self.live.fetch_sub(1, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> CountersSnapshot {
        CountersSnapshot {
            calls: self.calls.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            traps: self.traps.load(Ordering::Relaxed),
            timeouts: self.timeouts.load(Ordering::Relaxed),
            instances: self.instances.load(Ordering::Relaxed),
            live: self.live.load(Ordering::Relaxed),
            busy_micros: self.busy_nanos.load(Ordering::Relaxed) / 1000,
        }
    }
}

/// How a call ended, for [`Counters`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum Outcome {
    Ok,
    Error,
    Trap { timeout: bool },
}

/// Shared so that every snapshotter using a plugin adds to one set of counters.
pub(crate) type SharedCounters = Arc<Counters>;
