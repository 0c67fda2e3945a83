//! What the store keeps per snapshot.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::layers::Layer;
use crate::types::{Info, Kind, Labels};

/// One snapshot's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The key (active, view) or name (committed).
    pub name: String,
    /// The layer holding the snapshot's files (its own layer: for an overlay-style
    /// snapshotter, the upper or the committed layer). Commit keeps it.
    pub layer: Layer,
    /// Its kind.
    pub kind: Kind,
    /// The committed snapshot it is based on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Its labels.
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
    /// Creation time (commit sets it anew, as containerd does).
    #[serde(with = "nanos")]
    pub created: SystemTime,
    /// Last change.
    #[serde(with = "nanos")]
    pub updated: SystemTime,
    /// Anything else the plugin keeps about the snapshot; commit keeps it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

impl Record {
    /// The snapshot's info, as `stat` and `list` return it.
    pub fn info(&self) -> Info {
        Info {
            name: self.name.clone(),
            parent: self.parent.clone(),
            kind: self.kind,
            labels: self.labels.clone(),
            created: self.created,
            updated: self.updated,
        }
    }
}

/// Times as nanoseconds since the epoch: exact, and as compact as JSON gets.
mod nanos {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        s.serialize_u64(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        Ok(UNIX_EPOCH + Duration::from_nanos(u64::deserialize(d)?))
    }
}
