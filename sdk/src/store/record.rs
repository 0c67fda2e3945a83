//! What the store keeps per snapshot, and a create's reservation.

use std::fs;
use std::path::PathBuf;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::types::{Info, Kind, Labels};

/// One snapshot's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The key (active, view) or name (committed).
    pub name: String,
    /// A number unique to this snapshot for the life of the store: name its files by it.
    /// Commit keeps it.
    pub id: u64,
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
    /// Anything else the plugin keeps about the snapshot (see [`Store::set_data`](super::Store::set_data)); commit
    /// keeps it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    /// For a committed record: the key it was committed from, so that a commit cut short
    /// can be finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) committed_from: Option<String>,
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

/// A key checked free and an id allocated for it, before the plugin builds anything on
/// disk; [`Store::insert`](super::Store::insert) turns it into a record. While it lives, [`Store::inflight`](super::Store::inflight)
/// names its id, so a cleanup running in another instance spares what is being built.
#[derive(Debug)]
pub struct Reservation {
    /// The id the new snapshot will have.
    pub id: u64,
    /// The key the new snapshot will have.
    pub key: String,
    /// The parent's record, checked to be committed.
    pub parent: Option<Record>,
    pub(super) marker: PathBuf,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.marker);
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
