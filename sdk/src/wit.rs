//! The raw bindings that `wit-bindgen` generates from `wit/snapshotter.wit`.
//!
//! Most plugins never need these: the [`Snapshotter`](crate::Snapshotter) and
//! [`Policy`](crate::Policy) traits, [`Next`](crate::Next) and [`host`](crate::host) speak
//! the same operations in idiomatic types. They are here for what the SDK does not wrap.
//!
//! One `generate!` for the `policy` world serves both roles. It is the larger world (the
//! `backend` world plus the imported `snapshotter`), and `wit-component` drops every import
//! the core module does not call: a backend never calls [`Next`](crate::Next), so its
//! component imports `host` (and WASI) only, while a policy's imports the next
//! `snapshotter` too. The export macro is public so that the SDK's own `export_backend!` and
//! `export_policy!` can use it from the plugin's crate.

// Generated code: `unsafe` glue for the canonical ABI, and items without docs.
#![allow(unsafe_code, missing_docs, missing_debug_implementations, clippy::all)]

wit_bindgen::generate!({
    path: "../wit/snapshotter.wit",
    world: "wasnap:snapshotter/sdk",
    pub_export_macro: true,
    export_macro_name: "export_wit",
    default_bindings_module: "wasnap_sdk::wit",
});
