//! The values every snapshotter speaks in, as idiomatic Rust types.
//!
//! These mirror the WIT `types` interface; [`convert`](crate::convert) turns them into the
//! generated types and back, in one place.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::host::relative;

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

/// One mount that makes a snapshot visible, as containerd's `mount.Mount`.
///
/// Paths in it are relative to the plugin's root; build mounts with [`Mount::bind`],
/// [`Mount::overlay`] and [`Mount::overlay_readonly`], which take the same paths `std::fs`
/// takes inside the guest (`/snapshots/1`) and make them relative (`snapshots/1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The mount type: `bind` or `overlay`.
    pub kind: String,
    /// A root-relative path for `bind`; `overlay` for `overlay`.
    pub source: String,
    /// Where below the mount point this mount goes; empty for the mount point itself.
    pub target: String,
    /// Options in mount(8) form: `rbind`, `ro`, `lowerdir=a:b`, ...
    pub options: Vec<String>,
}

impl Mount {
    /// A recursive bind mount of `path`: read-only (`ro`) or writable (`rw`).
    pub fn bind(path: impl AsRef<Path>, readonly: bool) -> Result<Mount> {
        Ok(Mount {
            kind: "bind".into(),
            source: relative(path)?,
            target: String::new(),
            options: vec!["rbind".into(), if readonly { "ro" } else { "rw" }.into()],
        })
    }

    /// A writable overlay: `lowers` (nearest parent first) under `upper`, with the work
    /// directory `work` (on the same filesystem as `upper`).
    pub fn overlay<P: AsRef<Path>>(
        lowers: &[P],
        upper: impl AsRef<Path>,
        work: impl AsRef<Path>,
    ) -> Result<Mount> {
        let mut options = Vec::with_capacity(3);
        if !lowers.is_empty() {
            options.push(format!("lowerdir={}", lowerdirs(lowers)?));
        }
        options.push(format!("upperdir={}", overlay_path(upper)?));
        options.push(format!("workdir={}", overlay_path(work)?));
        Ok(Mount {
            kind: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options,
        })
    }

    /// A read-only overlay of `lowers` (nearest parent first), with no upper directory.
    /// The kernel wants at least two lowers here; for one, use a read-only
    /// [`Mount::bind`], as containerd does.
    pub fn overlay_readonly<P: AsRef<Path>>(lowers: &[P]) -> Result<Mount> {
        if lowers.is_empty() {
            return Err(Error::InvalidArgument(
                "a read-only overlay needs at least one lower directory".into(),
            ));
        }
        Ok(Mount {
            kind: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options: vec!["ro".into(), format!("lowerdir={}", lowerdirs(lowers)?)],
        })
    }

    /// Whether the options make this mount read-only.
    pub fn is_readonly(&self) -> bool {
        self.options.iter().any(|o| o == "ro")
    }
}

/// A path for an overlay option: root-relative, and free of the option syntax's own
/// separators.
fn overlay_path(path: impl AsRef<Path>) -> Result<String> {
    let rel = relative(path)?;
    if rel.contains([':', ',']) {
        return Err(Error::InvalidArgument(format!(
            "overlay path {rel:?} contains ':' or ',', which the option syntax cannot carry"
        )));
    }
    Ok(rel)
}

fn lowerdirs<P: AsRef<Path>>(lowers: &[P]) -> Result<String> {
    let parts: Vec<String> = lowers.iter().map(overlay_path).collect::<Result<_>>()?;
    Ok(parts.join(":"))
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
    fn mounts_use_root_relative_paths() {
        let m = Mount::bind("/snapshots/7", false).unwrap();
        assert_eq!(m.source, "snapshots/7");
        assert_eq!(m.options, ["rbind", "rw"]);
        assert!(!m.is_readonly());
        assert!(Mount::bind("snapshots/7", true).unwrap().is_readonly());

        let m = Mount::overlay(&["/s/2/fs", "/s/1/fs"], "/s/3/fs", "/s/3/work").unwrap();
        assert_eq!(m.options, ["lowerdir=s/2/fs:s/1/fs", "upperdir=s/3/fs", "workdir=s/3/work"]);
        let none: [&str; 0] = [];
        let m = Mount::overlay(&none, "/s/3/fs", "/s/3/work").unwrap();
        assert_eq!(m.options, ["upperdir=s/3/fs", "workdir=s/3/work"]);
        let m = Mount::overlay_readonly(&["/a", "/b"]).unwrap();
        assert_eq!(m.options, ["ro", "lowerdir=a:b"]);
        assert!(Mount::overlay_readonly(&none).is_err());
        assert!(Mount::overlay(&["/a:b"], "/u", "/w").is_err());
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
