//! What the fuzz targets (`tests/fuzz`, target `guest`) call: the conversions the
//! adapter applies to everything a guest returns, reached without a guest. Not a stable
//! API; hidden from the documentation.
//!
//! Each function is the crate's own code path (the adapter calls the same functions);
//! this module only makes it callable from outside the crate, with the WIT types.

use bytes::Bytes;
use wasmtime_wasi::p2::OutputStream;

pub use super::bindings::backend::wasnap::snapshotter::types as wit;
pub use super::output::{BUDGET_PER_CALL, LINES_PER_CALL};
use super::space::Space;
use crate::error::{Error, Result};
use crate::snapshot::{Info, Labels, Mount, Usage};

/// Most bytes of a guest's text the host keeps (before escaping).
pub const MAX_ERROR: usize = super::convert::MAX_ERROR;

/// A guest's error as the host reports it, `passed` being the errors its next
/// snapshotter returned in the call.
pub fn error_from_guest(plugin: &str, e: wit::Error, passed: &[String]) -> Error {
    super::convert::error_from_guest(plugin, e, passed)
}

/// A guest's text as the host repeats it: bounded, control characters escaped.
pub fn guest_text(text: &str) -> String {
    super::convert::guest_text(text)
}

/// A guest's text as one log line.
pub fn escape(text: &str) -> String {
    super::output::escape(text)
}

/// One info of a guest's walk page, stat or update.
pub fn info_from_wit(i: wit::Info) -> Info {
    super::convert::info_from_wit(i)
}

/// An info as a guest is given it.
pub fn info_to_wit(i: &Info) -> wit::Info {
    super::convert::info_to_wit(i)
}

/// A guest's labels.
pub fn labels_from_wit(l: wit::Labels) -> Labels {
    super::convert::labels_from_wit(l)
}

/// A guest's usage.
pub fn usage_from_wit(u: wit::UsageInfo) -> Usage {
    super::convert::usage_from_wit(u)
}

/// A fresh call id: layers a call makes are its own until [`settle`].
pub fn begin_call() -> u64 {
    super::space::next_call()
}

/// Ends `call`: the layers it made are registered and no longer its own.
pub fn settle(space: &Space, call: u64) -> Result<()> {
    space.settle(call)
}

/// Makes an empty layer during `call`, as the `layers.create` host function does.
pub fn create_layer(space: &Space, call: u64) -> Result<u64> {
    space.create_layer(call, None)
}

/// Removes a layer during `call`, as the `layers.remove` host function does.
pub fn remove_layer(space: &Space, call: u64, id: u64) -> Result<()> {
    space.remove_layer(call, id)
}

/// The mounts a guest returned during `call` as host mounts; `passed` are those the
/// next snapshotter returned during it.
pub fn resolve_mounts(
    space: &Space,
    call: u64,
    mounts: Vec<wit::Mount>,
    passed: &[Mount],
) -> Result<Vec<Mount>> {
    super::mounts::resolve(space, call, mounts, passed)
}

/// A guest's output stream (stdout or stderr) as the host keeps it.
#[derive(Debug)]
pub struct Output(super::output::GuestOutput);

impl Output {
    /// A stream of plugin `plugin`.
    pub fn new(plugin: &str) -> Self {
        Output(super::output::GuestOutput::new(plugin.into(), "stderr"))
    }

    /// What the guest writes.
    pub fn write(&mut self, bytes: &[u8]) {
        let _ = self.0.write(Bytes::copy_from_slice(bytes));
    }

    /// A `log` call's line, if the call's budget allows it.
    pub fn log(&self, message: &str) -> Option<String> {
        self.0.take_log_line(message)
    }

    /// Ends the call: the last lines written.
    pub fn end_call(&self) -> Vec<String> {
        self.0.end_call()
    }
}
