//! A btrfs filesystem on a loop device, made and removed by a test (in progress).
