//! The btrfs driver against a real btrfs on a loop device (in progress).
