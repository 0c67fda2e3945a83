//! Write wasnap snapshotters and policies as WebAssembly components, in idiomatic Rust.
//!
//! A plugin is a `cdylib` crate built for `wasm32-wasip2`. It implements one trait and
//! names its type in one macro:
//!
//! - a **backend** (a snapshotter) implements [`Snapshotter`] and calls
//!   [`export_backend!`]; its component imports only the host interface (and WASI);
//! - a **policy** (middleware in front of the next snapshotter) implements [`Policy`],
//!   whose methods get a [`Next`] and forward by default, and calls [`export_policy!`].
//!
//! ```no_run
//! use wasnap_sdk::{Config, Info, Labels, Mount, Result, Snapshotter, Usage, store::Store};
//!
//! struct Mine {
//!     store: Store,
//! }
//!
//! impl Snapshotter for Mine {
//!     fn init(_config: Config) -> Result<Self> {
//!         Ok(Mine { store: Store::open("/meta")? })
//!     }
//!     fn stat(&self, key: &str) -> Result<Info> {
//!         self.store.stat(key)
//!     }
//!     // ... update, usage, mounts, prepare, view, commit, remove, list
//! #   fn update(&self, info: &Info, paths: &[String]) -> Result<Info> { self.store.update(info, paths) }
//! #   fn usage(&self, _: &str) -> Result<Usage> { Ok(Usage::default()) }
//! #   fn mounts(&self, _: &str) -> Result<Vec<Mount>> { Ok(vec![]) }
//! #   fn prepare(&self, _: &str, _: Option<&str>, _: &Labels) -> Result<Vec<Mount>> { Ok(vec![]) }
//! #   fn view(&self, _: &str, _: Option<&str>, _: &Labels) -> Result<Vec<Mount>> { Ok(vec![]) }
//! #   fn commit(&self, _: &str, _: &str, _: &Labels) -> Result<()> { Ok(()) }
//! #   fn remove(&self, _: &str) -> Result<()> { Ok(()) }
//! #   fn list(&self, after: Option<&str>, limit: u32) -> Result<Vec<Info>> { self.store.list(after, limit) }
//! }
//!
//! wasnap_sdk::export_backend!(Mine);
//! ```
//!
//! Around the traits: [`Config`] decodes the configuration the host passes to `init`,
//! [`fieldpath`] applies containerd's update field paths, [`host`] wraps what the host
//! does for a plugin (copying and removing trees, disk usage, ownership, modes, xattrs,
//! whiteouts), [`log`] writes to the host's log, [`Mount`] builds mounts with
//! root-relative paths, and [`store::Store`] keeps a plugin's snapshot records crash-safe
//! in files. [`wit`] has the raw generated bindings. The guide, from `cargo new` to a
//! passing `wasnap conformance` run, is the crate's README.

#![warn(missing_docs)]

mod backend;
mod config;
mod convert;
mod error;
pub mod fieldpath;
pub mod host;
mod instance;
pub mod log;
mod policy;
pub mod store;
mod types;
pub mod wit;

pub use backend::Snapshotter;
pub use config::Config;
pub use error::{Error, ErrorKind, Result};
pub use fieldpath::FieldPath;
pub use policy::{Next, Policy, WALK_PAGE};
pub use types::{
    Info, Kind, Labels, MAX_LABEL_SIZE, Mount, Usage, validate_label, validate_labels,
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
/// The component this makes imports `wasnap:snapshotter/host@0.1.0` and the WASI
/// interfaces the standard library uses, nothing else.
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
