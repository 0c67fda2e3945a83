//! wasnap: a container snapshotter host.
//!
//! The crate is both the library (embed it to serve snapshots from your own program)
//! and the `wasnap` binary (daemon and CLI). See ARCHITECTURE.md at the repository root
//! for the map.

pub mod backend;
pub mod config;
pub mod content;
pub mod digest;
pub mod driver;
pub mod error;
pub mod fault;
pub mod filter;
pub mod fsutil;
pub mod gc;
pub mod image;
pub mod kv;
pub mod layer;
pub mod long_work;
pub mod metadata;
pub mod mount;
pub mod plugin;
pub mod probe;
pub mod root;
pub mod snapshot;
pub mod stack;

pub use backend::{Backend, FieldPath, Wrapper};
pub use error::Context;
pub use error::{Error, ErrorKind, Result};
pub use filter::Filter;
pub use metadata::{Ctx, Snapshotter};
pub use root::Host;
pub use snapshot::{Info, Kind, Labels, Mount, Usage};
