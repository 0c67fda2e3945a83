//! The values every snapshotter speaks in, as idiomatic Rust types.
//!
//! These mirror the WIT `types` interface; [`convert`](crate::convert) turns them into the
//! generated types and back, in one place.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::layers::Layer;

/// Labels on a snapshot, ordered so that encodings and comparisons are stable.
pub type Labels = BTreeMap<String, String>;

/// Most bytes a label's key and value may use together (containerd's `labels.Validate`).
pub const MAX_LABEL_SIZE: usize = 4096;

/// The kind of a snapshot, as in containerd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Read-only, created by `view`; cannot be committed or be a parent.
    View,
    /// Writable, created by `prepare`; becomes committed by `commit`.
    Active,
    /// Immutable, created by `commit`; the only kind that can be a parent.
    Committed,
}

impl Kind {
    /// The lower-case name containerd uses (`view`, `active`, `committed`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "view" => Ok(Kind::View),
            "active" => Ok(Kind::Active),
            "committed" => Ok(Kind::Committed),
            other => Err(Error::InvalidArgument(format!("unknown snapshot kind {other:?}"))),
        }
    }
}

/// What is known about one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// The key (active, view) or name (committed) the snapshot is known by.
    pub name: String,
    /// The committed snapshot this one is based on.
    pub parent: Option<String>,
    /// Its kind.
    pub kind: Kind,
    /// Its labels.
    pub labels: Labels,
    /// When it was created (for a committed snapshot: when it was committed).
    pub created: SystemTime,
    /// When it was last changed.
    pub updated: SystemTime,
}

/// Disk space a snapshot uses on its own, not counting its parents.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Bytes of disk allocated, as `du` counts them.
    pub size: u64,
    /// Number of inodes.
    pub inodes: u64,
}

/// Options the host may add to an overlay mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OverlayFlags {
    /// `index=off`: a layer may be the lower layer of several upper layers (containerd
    /// sets it where the kernel has it; the default).
    pub index_off: bool,
    /// `userxattr`: overlay metadata in `user.*` xattrs (rootless kernels).
    pub userxattr: bool,
    /// `volatile`: no syncs to the upper layer (throwaway containers).
    pub volatile: bool,
}

impl Default for OverlayFlags {
    fn default() -> Self {
        OverlayFlags { index_off: true, userxattr: false, volatile: false }
    }
}

/// One mount that makes a snapshot visible. It names layers, never paths: the host
/// writes the real mount from its own paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mount {
    /// A bind mount of one layer.
    Bind {
        /// The layer.
        layer: Layer,
        /// Read-only (views and committed snapshots must be).
        readonly: bool,
    },
    /// An overlay of layers.
    Overlay {
        /// The lower layers, top (nearest parent) first.
        lowers: Vec<Layer>,
        /// The writable layer of an active snapshot; `None` for a read-only overlay.
        upper: Option<Layer>,
        /// Options the host adds.
        flags: OverlayFlags,
    },
    /// The mount at this index among those the next snapshotter returned during this
    /// call, passed on unchanged: what a policy returns when it forwards.
    Passed(u32),
}

impl Mount {
    /// A bind mount of `layer`: read-only or writable.
    pub fn bind(layer: Layer, readonly: bool) -> Mount {
        Mount::Bind { layer, readonly }
    }

    /// A writable overlay: `lowers` (nearest parent first) under `upper`, with
    /// `index=off`.
    pub fn overlay(lowers: Vec<Layer>, upper: Layer) -> Mount {
        Mount::Overlay { lowers, upper: Some(upper), flags: OverlayFlags::default() }
    }

    /// A read-only overlay of `lowers` (nearest parent first), with `index=off`. The
    /// kernel wants at least two lowers here; for one, use a read-only [`Mount::bind`],
    /// as containerd does.
    pub fn overlay_readonly(lowers: Vec<Layer>) -> Mount {
        Mount::Overlay { lowers, upper: None, flags: OverlayFlags::default() }
    }

    /// Whether this mount is read-only (a passed mount: unknown, so `false`).
    pub fn is_readonly(&self) -> bool {
        match self {
            Mount::Bind { readonly, .. } => *readonly,
            Mount::Overlay { upper, .. } => upper.is_none(),
            Mount::Passed(_) => false,
        }
    }
}

/// Checks one label against containerd's limit: a non-empty key, and key plus value at
/// most [`MAX_LABEL_SIZE`] bytes.
pub fn validate_label(key: &str, value: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::InvalidArgument("label key must not be empty".into()));
    }
    let len = key.len() + value.len();
    if len > MAX_LABEL_SIZE {
        let shown: String = key.chars().take(64).collect();
        return Err(Error::InvalidArgument(format!(
            "label {shown:?}: key and value length ({len} bytes) greater than maximum size ({MAX_LABEL_SIZE} bytes)"
        )));
    }
    Ok(())
}

/// Checks every label in a set with [`validate_label`].
pub fn validate_labels(labels: &Labels) -> Result<()> {
    labels.iter().try_for_each(|(k, v)| validate_label(k, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_name_layers() {
        let m = Mount::bind(Layer(7), false);
        assert!(!m.is_readonly());
        assert!(Mount::bind(Layer(7), true).is_readonly());
        let m = Mount::overlay(vec![Layer(2), Layer(1)], Layer(3));
        assert!(!m.is_readonly());
        assert!(Mount::overlay_readonly(vec![Layer(2), Layer(1)]).is_readonly());
        let Mount::Overlay { flags, .. } = m else { unreachable!() };
        assert!(flags.index_off);
    }

    #[test]
    fn labels_are_limited_like_containerd() {
        let key = "k";
        assert!(validate_label(key, &"v".repeat(MAX_LABEL_SIZE - 1)).is_ok());
        let e = validate_label(key, &"v".repeat(MAX_LABEL_SIZE)).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::InvalidArgument);
        assert!(validate_label("", "v").is_err());
    }
}
