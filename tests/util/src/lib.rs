//! wasnap-test-util: what the workspace's tests and benchmarks share, and what no
//! shipped crate carries (as wasmtime's `test-util` and rust-analyzer's `test-utils`).
//!
//! - [`containerd`]: a containerd of our own, with wasnap daemons as proxy snapshotters.
//! - [`process`]: a `wasnap daemon` child process, stopped by its pid when dropped.
//! - [`guests`]: the workspace's wasm guests, built on demand, by package name.

pub mod containerd;
pub mod guests;
pub mod process;
