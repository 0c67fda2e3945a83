//! What one plugin may use: [`Limits`], as its configuration names them.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What one plugin may use. Each snapshotter and each policy has its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Most linear memory one instance may have, in MiB. Growing past it traps the
    /// call (with an error saying so) and the instance is replaced.
    pub memory_mib: u64,
    /// Most time one call may run, in milliseconds; time spent in the next
    /// snapshotter of a chain does not count (but see `next_calls`). Past it the call
    /// fails as unavailable and the instance is replaced; bulk host work (copying,
    /// measuring, removing a layer) stops at it too.
    pub timeout_ms: u64,
    /// Instances that may serve calls at once. Each instance handles one call at a
    /// time; their records are shared through the key-value store, so any plugin built
    /// on it may run several.
    pub instances: u32,
    /// Most snapshots one walk may return before it is cut off as runaway.
    pub max_walk: u64,
    /// Most bytes (keys and values) the plugin's key-value store may hold, in MiB.
    pub kv_mib: u64,
    /// Most bytes the plugin's private directory (`state/`, its WASI preopen) may
    /// hold, in MiB, each file, directory or symlink counting 4 KiB besides its data
    /// (a write counts the blocks it touches; hard links are refused). A write past
    /// it fails with insufficient-space, as on a full disk.
    pub state_mib: u64,
    /// Space, in MiB, that the filesystem holding a backend's layers must keep free:
    /// while less is free (or fewer than 4096 inodes), the host functions that add to
    /// its layers (`create`, `clone`, `write-file`, `make-dir`, `symlink`, `set-xattr`,
    /// `make-whiteout`) fail with failed-precondition, and a clone stops where it
    /// reaches it (checked before each entry and each 64 MiB of a file, so each call
    /// in progress passes it by no more than that, or one write). 0 turns the floor
    /// off. What containers write into layers is not theirs to bound, as in
    /// containerd.
    pub keep_free_mib: u64,
    /// Most calls one call of a policy may make to its next snapshotter. Their time
    /// does not count against `timeout_ms`, so without this a policy calling its next
    /// snapshotter in a loop would never be stopped. Past it, each further call fails
    /// as unavailable.
    pub next_calls: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_mib: 256,
            timeout_ms: 60_000,
            instances: 1,
            max_walk: 10_000_000,
            kv_mib: 1024,
            state_mib: 1024,
            keep_free_mib: 256,
            next_calls: 100_000,
        }
    }
}

impl Limits {
    pub(crate) fn check(&self) -> Result<()> {
        let bad = |what: &str| Err(Error::invalid_argument(format!("plugin limit {what}")));
        if self.memory_mib == 0 || self.memory_mib > 4096 {
            return bad("memory_mib must be between 1 and 4096");
        }
        if self.timeout_ms == 0 {
            return bad("timeout_ms must be positive");
        }
        if self.instances == 0 || self.instances > 64 {
            return bad("instances must be between 1 and 64");
        }
        if self.max_walk == 0 {
            return bad("max_walk must be positive");
        }
        if self.kv_mib == 0 {
            return bad("kv_mib must be positive");
        }
        if self.state_mib == 0 {
            return bad("state_mib must be positive");
        }
        if self.next_calls == 0 {
            return bad("next_calls must be positive");
        }
        Ok(())
    }

    pub(crate) fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}
