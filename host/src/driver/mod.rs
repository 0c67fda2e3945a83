//! Native drivers: backends that live in the host process.
//!
//! Architecture invariant: a driver keeps its records through its own [`storage::Store`]
//! (tables of its own, never the metadata's) and its data beneath the directory
//! capability it is handed at start-up; it touches nothing outside them. Every driver
//! builds, installs, removes and reclaims its data by the one protocol of [`layout`],
//! and says only what differs ([`layout::OnLayout`]: how an entry is built, mounted and
//! committed); the backend calls are answered for all of them by the same code.

pub mod btrfs;
mod layout;
pub mod native;
pub mod overlay;
pub mod storage;

pub use btrfs::Btrfs;
pub use native::Native;
pub use overlay::Overlay;

use cap_std::fs::Dir;

use crate::error::Result;

/// Entries that are directory trees (native, overlay).
#[derive(Debug)]
struct Trees;

impl layout::Entries for Trees {
    fn delete(&self, dir: &Dir, name: &str) -> Result<()> {
        crate::fsutil::remove_tree(dir, name)
    }
}
