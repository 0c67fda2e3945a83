//! A guest's monotonic clock, whose timers all go off by the end of the call that set
//! them.
//!
//! The epoch deadline stops a guest only while its own code runs. A guest waiting in
//! the host — `std::thread::sleep`, or `wasi:io/poll` on a timer it subscribed to —
//! runs none, so the stock clock would let it hold its instance, and the thread serving
//! the call, for as long as it asked (`u64::MAX` nanoseconds is "never" to WASI). Here
//! every subscription is cut to the time the call has left when it is made. A timer
//! kept for a later call has gone off by then. A guest that waits out its whole budget
//! comes back to code that the epoch deadline stops at its next check.
//!
//! Every other pollable a guest can hold is ready at once: its stdout and stderr, its
//! files, its empty stdin, and sockets, which it cannot connect (WASI denies the network
//! here).

use std::time::Duration;

use wasmtime::component::{HasSelf, Linker, Resource};
use wasmtime_wasi::clocks::WasiClocksCtxView;
use wasmtime_wasi::p2::DynPollable;
use wasmtime_wasi::p2::bindings::clocks::monotonic_clock::{
    self, Duration as WasiDuration, Host, Instant,
};

use super::state::State;

/// Puts this clock in place of WASI's, which `linker` already holds.
pub(crate) fn add_to_linker(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let added = monotonic_clock::add_to_linker::<State, HasSelf<State>>(linker, |s| s);
    linker.allow_shadowing(false);
    added
}

impl State {
    /// WASI's own clock, for reading it and for its timers.
    fn wasi_clock(&mut self) -> WasiClocksCtxView<'_> {
        WasiClocksCtxView { ctx: self.wasi.clocks(), table: &mut self.table }
    }

    /// A timer for `wait` from now, or for what the call has left if that is sooner.
    fn timer(&mut self, wait: Duration) -> wasmtime::Result<Resource<DynPollable>> {
        let left = self.clock.budget.saturating_sub(self.clock.used());
        let nanos = u64::try_from(wait.min(left).as_nanos()).unwrap_or(u64::MAX);
        self.wasi_clock().subscribe_duration(nanos)
    }
}

impl Host for State {
    fn now(&mut self) -> wasmtime::Result<Instant> {
        self.wasi_clock().now()
    }

    fn resolution(&mut self) -> wasmtime::Result<WasiDuration> {
        self.wasi_clock().resolution()
    }

    fn subscribe_instant(&mut self, when: Instant) -> wasmtime::Result<Resource<DynPollable>> {
        let now = self.wasi_clock().now()?;
        self.timer(Duration::from_nanos(when.saturating_sub(now)))
    }

    fn subscribe_duration(
        &mut self,
        duration: WasiDuration,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        self.timer(Duration::from_nanos(duration))
    }
}
