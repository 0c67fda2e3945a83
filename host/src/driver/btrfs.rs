//! The btrfs driver (in progress).

/// The btrfs driver.
#[derive(Debug)]
pub struct Btrfs;
