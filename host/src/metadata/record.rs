//! How one snapshot's metadata is stored.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::kv::from_nanos;
use crate::snapshot::{Info, Kind, Labels};

/// The stored form of a snapshot's metadata. JSON, so that fields can be added with
/// `#[serde(default)]` without a migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Record {
    /// The key the backend knows this snapshot by.
    pub bkey: String,
    pub kind: Kind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
    /// Nanoseconds since the Unix epoch.
    pub created: u64,
    pub updated: u64,
    /// Created or committed under a lease: garbage collection may remove it once
    /// nothing holds it. Records made with no lease are kept until removed explicitly
    /// (containerd, as a proxy client, removes what its own collector collects).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub collectable: bool,
}

impl Record {
    pub fn encode(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(|e| Error::internal("encode snapshot record", e))
    }

    pub fn decode(bytes: &[u8], key: &str) -> Result<Self> {
        serde_json::from_slice(bytes)
            .map_err(|e| Error::internal(format!("corrupt metadata record for {key:?}"), e))
    }

    pub fn info(&self, name: &str) -> Info {
        Info {
            name: name.to_owned(),
            parent: self.parent.clone(),
            kind: self.kind,
            labels: self.labels.clone(),
            created: from_nanos(self.created),
            updated: from_nanos(self.updated),
        }
    }
}
