//! What a plugin's store holds: the WASI context, the limits, the plugin's space on the
//! host, the call in progress and its clock. Host functions (`imports`) and the call
//! machinery (`instance`) both work on it; it depends on neither.

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, StoreLimits};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

pub use super::limits::Limits;
use super::output::GuestOutput;
use super::space::{CallId, Space};
use crate::backend::Backend;
use crate::snapshot::Mount;

/// How often the engine's epoch advances: the resolution of call deadlines.
pub const TICK: Duration = Duration::from_millis(5);

/// Most resources (open files, directories, streams) one instance may hold in its WASI
/// table: a guest that opens without end gets an error, not the host's descriptors.
pub(crate) const MAX_TABLE_ENTRIES: usize = 1024;

/// A store's limits: wasmtime's, each memory within the limit, and all of the
/// instance's memories together too (a component may define more than one; the pool
/// allows two).
pub(crate) struct MemoryLimits {
    inner: StoreLimits,
    /// Most bytes of all memories together.
    total: usize,
    /// Bytes of all memories now.
    used: usize,
}

impl MemoryLimits {
    /// At most `total` bytes of memory, however many memories hold them; growing past
    /// it traps.
    pub(crate) fn new(total: usize) -> Self {
        let inner = wasmtime::StoreLimitsBuilder::new()
            .memory_size(total)
            .trap_on_grow_failure(true)
            .build();
        MemoryLimits { inner, total, used: 0 }
    }
}

impl ResourceLimiter for MemoryLimits {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // A memory is counted from its creation (growing from 0), so `current` is in
        // `used` already.
        let after = self.used.saturating_sub(current).saturating_add(desired);
        if after > self.total {
            return Err(MemoryExceeded { after, total: self.total }.into());
        }
        let allowed = self.inner.memory_growing(current, desired, maximum)?;
        if allowed {
            self.used = after;
        }
        Ok(allowed)
    }
    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.inner.memory_grow_failed(error)
    }
    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.inner.table_growing(current, desired, maximum)
    }
    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.inner.table_grow_failed(error)
    }
    fn instances(&self) -> usize {
        self.inner.instances()
    }
    fn tables(&self) -> usize {
        self.inner.tables()
    }
    fn memories(&self) -> usize {
        self.inner.memories()
    }
}

/// The trap of a store whose memories would grow past its limit.
#[derive(Debug)]
pub(crate) struct MemoryExceeded {
    after: usize,
    total: usize,
}

impl std::fmt::Display for MemoryExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "growing a memory would make the plugin's memories {} bytes, more than its limit of {} bytes",
            self.after, self.total
        )
    }
}

impl std::error::Error for MemoryExceeded {}

/// A store's data: what host functions and WASI see of the world.
pub(crate) struct State {
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    pub(crate) limits: MemoryLimits,
    pub(crate) plugin: Arc<str>,
    pub(crate) space: Arc<Space>,
    pub(crate) next: Option<Arc<dyn Backend>>,
    /// The call in progress.
    pub(crate) call: CallId,
    /// Mounts the next snapshotter returned during the current call: a policy passes
    /// them on by index.
    pub(crate) next_mounts: Vec<Mount>,
    /// The errors the next snapshotter returned during the current call that name
    /// their plugin: a policy may pass one on as it is, and only those keep another
    /// plugin's name (see [`super::convert::error_from_guest`]).
    pub(crate) next_errors: Vec<String>,
    pub(crate) clock: CallClock,
    pub(crate) stderr: GuestOutput,
    pub(crate) stdout: GuestOutput,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// The time of the call in progress, minus time spent in the next snapshotter, and
/// the calls it made there.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CallClock {
    pub(crate) started: Instant,
    pub(crate) nested: Duration,
    pub(crate) budget: Duration,
    /// Calls made to the next snapshotter so far, and how many are allowed.
    pub(crate) next_calls: u32,
    pub(crate) max_next_calls: u32,
}

impl CallClock {
    pub(crate) fn new(budget: Duration, max_next_calls: u32) -> Self {
        CallClock {
            started: Instant::now(),
            nested: Duration::ZERO,
            budget,
            next_calls: 0,
            max_next_calls,
        }
    }

    pub(crate) fn used(&self) -> Duration {
        self.started.elapsed().saturating_sub(self.nested)
    }

    /// When the call's time runs out, as things stand: what bulk host work stops at.
    pub(crate) fn deadline(&self) -> Instant {
        self.started + self.nested + self.budget
    }
}

/// The error a call's epoch callback raises when its time is up.
#[derive(Debug)]
pub(crate) struct DeadlineExceeded;

impl std::fmt::Display for DeadlineExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("deadline exceeded")
    }
}

impl std::error::Error for DeadlineExceeded {}

/// `d` in epoch ticks, at least one.
pub(crate) fn ticks(d: Duration) -> u64 {
    (d.as_nanos() / TICK.as_nanos()).max(1) as u64
}

#[cfg(test)]
mod tests {
    use wasmtime::{Engine, Instance, Module, Store};

    use super::*;

    /// A core module with two memories of two 64 KiB pages each.
    const TWO_MEMORIES: &[u8] = b"\0asm\x01\0\0\0\x05\x05\x02\x00\x02\x00\x02";

    fn instantiate<L: ResourceLimiter + 'static>(limits: L) -> wasmtime::Result<Instance> {
        let engine = Engine::default();
        let module = Module::new(&engine, TWO_MEMORIES)?;
        let mut store = Store::new(&engine, limits);
        store.limiter(|l| l);
        Instance::new(&mut store, &module, &[])
    }

    #[test]
    fn the_memory_limit_counts_every_memory_together() {
        let per_memory = 2 << 16;
        // Each memory alone fits three pages: wasmtime's own limits let both through.
        let each = wasmtime::StoreLimitsBuilder::new().memory_size(3 << 16).build();
        assert!(instantiate(each).is_ok());
        // Together they are four pages: over a three-page limit, under a four-page one.
        let err = instantiate(MemoryLimits::new(3 << 16)).unwrap_err();
        assert!(format!("{err:#}").contains("more than its limit"), "{err:#}");
        let fits = MemoryLimits::new(2 * per_memory);
        assert!(instantiate(fits).is_ok());
    }
}
