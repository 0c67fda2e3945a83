//! Native drivers: backends that live in the host process.
//!
//! Architecture invariant: a driver keeps its own records in its own directory
//! ([`storage`]) and never opens the host's metadata database; it is handed a directory
//! capability at start-up and touches nothing outside it.

pub mod btrfs;
mod layout;
pub mod native;
pub mod overlay;
pub mod storage;

pub use btrfs::Btrfs;
pub use native::Native;
pub use overlay::Overlay;
