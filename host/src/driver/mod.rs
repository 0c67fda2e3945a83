//! Native drivers: backends that live in the host process.
//!
//! Architecture invariant: a driver keeps its own records in its own directory
//! ([`storage`]) and never opens the host's metadata database; it is handed a directory
//! capability at start-up and touches nothing outside it.

pub mod native;
pub mod storage;

pub use native::Native;
