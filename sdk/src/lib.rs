//! Write wasnap snapshotters and policies as WebAssembly components, in idiomatic Rust.
//!
//! A plugin is a `cdylib` crate built for `wasm32-wasip2`. It implements one trait and
//! names its type in one macro:
//!
//! - a **backend** (a snapshotter) implements [`Snapshotter`] and calls
//!   [`export_backend!`];
//! - a **policy** (middleware in front of the next snapshotter) implements [`Policy`],
//!   whose methods get a [`Next`] and forward by default, and calls [`export_policy!`].
//!
//! A backend keeps each snapshot's files in a [`Layer`] the host owns, its records in a
//! [`store::Store`] (the host's transactional key-value store, [`kv`]), and returns
//! [`Mount`]s that name layers:
//!
//! ```no_run
//! use wasnap_sdk::store::Store;
//! use wasnap_sdk::{Config, Kind, Labels, Layer, Mount, Result, Snapshotter, Usage};
//!
//! struct Copying {
//!     store: Store,
//! }
//!
//! impl Snapshotter for Copying {
//!     fn init(_config: Config) -> Result<Self> {
//!         Ok(Copying { store: Store::new() })
//!     }
//!     fn store(&self) -> Option<&Store> {
//!         Some(&self.store) // stat, update and list come from it
//!     }
//!     fn prepare(&self, key: &str, parent: Option<&str>, labels: &Labels) -> Result<Vec<Mount>> {
//!         let rec = self.store.create(Kind::Active, key, parent, labels, |p| match p {
//!             Some(p) => Layer::clone_of(p.layer),
//!             None => Layer::create(),
//!         })?;
//!         Ok(vec![Mount::bind(rec.layer, false)])
//!     }
//!     // ... usage, mounts, view, commit, remove
//! #   fn usage(&self, key: &str) -> Result<Usage> { self.store.get(key)?.layer.usage() }
//! #   fn mounts(&self, _: &str) -> Result<Vec<Mount>> { Ok(vec![]) }
//! #   fn view(&self, _: &str, _: Option<&str>, _: &Labels) -> Result<Vec<Mount>> { Ok(vec![]) }
//! #   fn commit(&self, n: &str, k: &str, l: &Labels) -> Result<()> { self.store.commit(n, k, l).map(drop) }
//! #   fn remove(&self, k: &str) -> Result<()> { self.store.remove(k)?.layer.remove() }
//! }
//!
//! wasnap_sdk::export_backend!(Copying);
//! ```
//!
//! Around the traits: [`Config`] decodes the configuration the host passes to `init`,
//! [`fieldpath`] applies containerd's update field paths, [`layers`] makes layers and
//! reaches their contents, [`kv`] is the key-value store with transactions, [`log`]
//! writes to the host's log, and [`testing`] runs a plugin's code natively in `cargo
//! test`. [`wit`] has the raw generated bindings. The guide, from `cargo new` to a
//! passing `wasnap conformance` run, is the crate's README.

#![warn(missing_docs)]

mod backend;
mod config;
mod convert;
mod error;
pub mod fieldpath;
mod instance;
pub mod kv;
pub mod layers;
pub mod log;
mod policy;
pub mod store;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;
mod types;
pub mod wit;

pub use backend::Snapshotter;
pub use config::Config;
pub use error::{Error, ErrorKind, Result};
pub use fieldpath::FieldPath;
pub use layers::Layer;
pub use policy::{Next, Policy, WALK_PAGE};
/// serde, re-exported so a plugin can derive its configuration's `Deserialize` without
/// a dependency of its own: `#[derive(wasnap_sdk::serde::Deserialize)]`.
pub use serde;
pub use types::{
    Info, Kind, Labels, MAX_LABEL_SIZE, Mount, OverlayFlags, Usage, validate_label, validate_labels,
};

/// What the export macros expand to; not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use crate::backend::BackendGuest;
    pub use crate::policy::PolicyGuest;
}

/// Exports a [`Snapshotter`] as the plugin's `backend` world: `lifecycle` and
/// `snapshotter`. Call it once, at the top level of the plugin crate, with the type.
///
/// The component this makes imports what the plugin's code calls of
/// `wasnap:snapshotter/{layers,kv,log}@0.2.0` and the WASI interfaces the standard
/// library uses, nothing else.
#[macro_export]
macro_rules! export_backend {
    ($ty:ty) => {
        // The entry points wit-bindgen generates are `unsafe extern "C"` functions.
        #[allow(unsafe_code)]
        const _: () = {
            type __WasnapGuest = $crate::__private::BackendGuest<$ty>;
    $crate::wit::export_wit!(__WasnapGuest with_types_in $crate::wit);
        };
    };
}

/// Exports a [`Policy`] as the plugin's `policy` world: it exports `lifecycle` and
/// `snapshotter`, and imports the next `snapshotter` (and `host`). Call it once, at the
/// top level of the plugin crate, with the type.
#[macro_export]
macro_rules! export_policy {
    ($ty:ty) => {
        // The entry points wit-bindgen generates are `unsafe extern "C"` functions.
        #[allow(unsafe_code)]
        const _: () = {
            type __WasnapGuest = $crate::__private::PolicyGuest<$ty>;
    $crate::wit::export_wit!(__WasnapGuest with_types_in $crate::wit);
        };
    };
}
