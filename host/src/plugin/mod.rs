//! WebAssembly plugins: backends and policies as sandboxed components.
//!
//! - [`runtime`]: the one wasmtime `Engine` (pooling allocator, epoch interruption) and
//!   the on-disk cache of compiled components.
//! - [`Plugin`]: a compiled component, checked against this host's WIT, ready to
//!   instantiate (`InstancePre`). Shared by every snapshotter that uses it.
//! - [`WasmSnapshotter`]: a plugin bound to its own root directory, implementing the
//!   host's [`Backend`](crate::Backend) trait, so the metadata layer, GC and CLI
//!   treat it like a native driver. A policy is a `WasmSnapshotter` with a `next`.
//! - [`hostfs`] and [`mounts`]: what the host does for a guest inside its root, and how
//!   the mounts a guest returns are checked and resolved.
//!
//! Architecture invariant: a guest reaches nothing but its own root. Its WASI context
//! has one preopened directory and no environment, arguments, network or inherited
//! stdio; host functions act through a `cap_std::fs::Dir` of that root; mount paths it
//! returns are resolved beneath the root or refused.

mod bindings;
mod component;
mod convert;
pub mod hostfs;
mod imports;
mod instance;
pub mod mounts;
mod output;
pub mod runtime;
mod wasm;

pub use component::{Plugin, PluginInfo, Role, WIT_PACKAGE};
pub use instance::Limits;
pub use runtime::{Counters, CountersSnapshot, Runtime};
pub use wasm::WasmSnapshotter;
