//! The values every snapshotter speaks in: kinds, infos, usage, mounts, labels.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Labels on a snapshot. Ordered so that output and encodings are stable.
pub type Labels = BTreeMap<String, String>;

/// Most bytes a label's key and value may use together (containerd's `labels.Validate`).
pub const MAX_LABEL_SIZE: usize = 4096;

/// Labels with this prefix are passed down to the backend, which may act on them.
pub const INHERITED_LABEL_PREFIX: &str = "containerd.io/snapshot/";

/// Names a committed snapshot that, if it already exists, makes a prepare return
/// already-exists instead of unpacking again (containerd's `LabelSnapshotRef`).
pub const LABEL_SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";

/// The kind of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Read-only, created by `view`; can be neither committed nor a parent.
    View,
    /// Writable, created by `prepare`; becomes committed by `commit`.
    Active,
    /// Immutable; the only kind that can be a parent.
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
            other => Err(Error::invalid_argument(format!("unknown snapshot kind {other:?}"))),
        }
    }
}

/// What is known about one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    /// The key (active, view) or name (committed) the snapshot is known by.
    pub name: String,
    /// The committed snapshot this one is based on, if any.
    pub parent: Option<String>,
    /// Its kind.
    pub kind: Kind,
    /// Its labels.
    pub labels: Labels,
    /// When it was created.
    #[serde(with = "rfc3339")]
    pub created: SystemTime,
    /// When it was last changed.
    #[serde(with = "rfc3339")]
    pub updated: SystemTime,
}

impl Info {
    /// A fresh info with both timestamps set to now and no labels.
    pub fn new(name: impl Into<String>, parent: Option<String>, kind: Kind) -> Self {
        let now = SystemTime::now();
        Info { name: name.into(), parent, kind, labels: Labels::new(), created: now, updated: now }
    }
}

/// Disk space a snapshot uses on its own (not counting its parents).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Bytes of disk used (allocated blocks, like `du`).
    pub size: u64,
    /// Number of inodes.
    pub inodes: u64,
}

/// One mount that makes a snapshot visible at a target, as containerd's `mount.Mount`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// Filesystem type: `bind`, `overlay`, `btrfs`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// The source: a host path for `bind`, the fs name for `overlay`, a device for `btrfs`.
    pub source: String,
    /// Where below the mount point this mount goes; empty means the mount point itself.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub target: String,
    /// Options in `mount(8)` form (`rbind`, `ro`, `lowerdir=...`).
    pub options: Vec<String>,
}

/// Checks one label against containerd's limit.
pub fn validate_label(key: &str, value: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::invalid_argument("label key must not be empty"));
    }
    let len = key.len() + value.len();
    if len > MAX_LABEL_SIZE {
        let shown: String = key.chars().take(64).collect();
        return Err(Error::invalid_argument(format!(
            "label {shown:?}: key and value length ({len} bytes) greater than maximum size ({MAX_LABEL_SIZE} bytes)"
        )));
    }
    Ok(())
}

/// Checks every label in a set.
pub fn validate_labels(labels: &Labels) -> Result<()> {
    labels.iter().try_for_each(|(k, v)| validate_label(k, v))
}

/// `labels` without those whose value is empty. containerd stores no empty label (its
/// metadata writes skip them, so setting one to `""` removes it), and an empty
/// `containerd.io/gc.root` kept would hold its snapshot for ever.
pub fn without_empty(labels: &Labels) -> std::borrow::Cow<'_, Labels> {
    if labels.values().any(String::is_empty) {
        std::borrow::Cow::Owned(
            labels
                .iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )
    } else {
        std::borrow::Cow::Borrowed(labels)
    }
}

/// A `containerd.io/gc.expire` time: RFC 3339 with any UTC offset, as containerd
/// writes it (`time.RFC3339` in local time), or the same without an offset, read as
/// UTC.
pub fn parse_expiry(text: &str) -> std::result::Result<std::time::SystemTime, String> {
    match chrono::DateTime::parse_from_rfc3339(text) {
        Ok(t) => Ok(std::time::SystemTime::from(t)),
        Err(e) => humantime::parse_rfc3339_weak(text).map_err(|_| e.to_string()),
    }
}

/// The labels a backend gets to see: the inherited ones and the target reference.
pub fn inherited_labels(labels: &Labels) -> Labels {
    labels
        .iter()
        .filter(|(k, _)| k.starts_with(INHERITED_LABEL_PREFIX) || k.as_str() == LABEL_SNAPSHOT_REF)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Timestamps as RFC 3339 strings in JSON, so that `--format json` reads like `ctr`'s.
pub(crate) mod rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_nanos(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_rfc3339(&s).map_err(serde::de::Error::custom)
    }
}
