//! Rust bindings generated from `wit/` for both worlds.
//!
//! The `policy` world reuses the `backend` world's types and its `kv` and `log`
//! interfaces, so a type or a host function exists once. Exports are reached through
//! the `backend` world's `exports::…::GuestIndices` for both roles: both worlds export
//! the same `lifecycle` and `snapshotter` interfaces.

pub(crate) mod backend {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "backend",
    });
}

pub(crate) mod policy {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "policy",
        with: {
            "wasnap:snapshotter/types": super::backend::wasnap::snapshotter::types,
            "wasnap:snapshotter/kv": super::backend::wasnap::snapshotter::kv,
            "wasnap:snapshotter/log": super::backend::wasnap::snapshotter::log,
        },
    });
}

pub(crate) use backend::exports::wasnap::snapshotter::lifecycle::Guest as Lifecycle;
pub(crate) use backend::exports::wasnap::snapshotter::lifecycle::GuestIndices as LifecycleIndices;
pub(crate) use backend::exports::wasnap::snapshotter::snapshotter::Guest as SnapshotterExports;
pub(crate) use backend::exports::wasnap::snapshotter::snapshotter::GuestIndices as SnapshotterIndices;
pub(crate) use backend::wasnap::snapshotter::{
    kv as kv_api, layers as layers_api, log as log_api, types,
};
pub(crate) use policy::wasnap::snapshotter::snapshotter as next_api;
