//! Logging to the host's log, where each line is tagged with the plugin's name.
//!
//! A guest has no stdout or stderr of its own worth reading; these go through the `log`
//! import. Outside a wasm guest (unit tests) they print to stderr.
//!
//! ```no_run
//! wasnap_sdk::log::info(format_args!("recovered {} snapshots", 3));
//! wasnap_sdk::log::warn("cleanup left a tree behind");
//! ```

use std::fmt::Display;

/// How much a log line matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Something failed.
    Error,
    /// Something looks wrong but the plugin goes on.
    Warn,
    /// What an operator wants to know.
    Info,
    /// What a plugin author wants to know.
    Debug,
    /// Everything.
    Trace,
}

/// Writes `message` to the host's log at `level`.
pub fn log(level: Level, message: impl Display) {
    write(level, &message.to_string());
}

#[cfg(target_arch = "wasm32")]
fn write(level: Level, message: &str) {
    use crate::wit::wasnap::snapshotter::log::{Level as L, log};
    let level = match level {
        Level::Error => L::Error,
        Level::Warn => L::Warn,
        Level::Info => L::Info,
        Level::Debug => L::Debug,
        Level::Trace => L::Trace,
    };
    log(level, message);
}

#[cfg(not(target_arch = "wasm32"))]
fn write(level: Level, message: &str) {
    eprintln!("[{level:?}] {message}");
}

/// Logs at [`Level::Error`].
pub fn error(message: impl Display) {
    log(Level::Error, message);
}

/// Logs at [`Level::Warn`].
pub fn warn(message: impl Display) {
    log(Level::Warn, message);
}

/// Logs at [`Level::Info`].
pub fn info(message: impl Display) {
    log(Level::Info, message);
}

/// Logs at [`Level::Debug`].
pub fn debug(message: impl Display) {
    log(Level::Debug, message);
}

/// Logs at [`Level::Trace`].
pub fn trace(message: impl Display) {
    log(Level::Trace, message);
}
