//! WebAssembly plugins: backends and policies as sandboxed components.
//!
//! The threat model: a guest is hostile. It controls every byte it returns and every
//! file in its private directory, may run several instances that race each other, and
//! whoever mounts what it returned does so later, by path. So a guest holds
//! capabilities, never paths:
//! - its WASI preopen is its private [`Space`] directory, which no mount names;
//! - the directories mounts name are layers the host makes, clones and removes outside
//!   it ([`space`]); the guest names them by number and reaches their contents through
//!   host functions that resolve beneath them ([`beneath`], `layers`);
//! - mounts it returns name layers; the host writes the paths ([`mounts`]);
//! - its records live in the host's transactional key-value store ([`space`]);
//! - every call is bounded: deadline (epochs, and bulk host work), memory, table
//!   entries, error and log sizes; a trap ends that call with a typed error.
//!
//! Modules, leaves first: [`state`] (a store's data and limits) ← `imports` (what a
//! guest may call) ← [`runtime`] (the engine, the linker, the compile cache) ←
//! `component` ([`Plugin`]: a compiled, checked component) ← `instance` (one store, a
//! call under its deadline) ← `wasm` ([`WasmSnapshotter`], the [`Backend`](crate::Backend)
//! adapter and its instance pool).

pub mod beneath;
mod bindings;
mod component;
mod convert;
#[doc(hidden)]
pub mod fuzzing;
mod imports;
mod instance;
mod layers;
mod limits;
pub mod mounts;
mod output;
mod quota;
pub mod runtime;
pub mod space;
pub mod state;
mod timers;
mod wasm;

pub use component::{Plugin, PluginInfo, Role, WIT_PACKAGE};
pub use limits::Limits;
pub use runtime::{Counters, CountersSnapshot, Runtime};
pub use space::Space;
pub use wasm::{PoolUse, WasmSnapshotter};
