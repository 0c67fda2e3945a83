//! How one snapshot's metadata is stored.

use serde::{Deserialize, Serialize};

use crate::error::{Context, Result};
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
    /// An active snapshot being committed: the name it is being committed as. Remove,
    /// update and another commit of it wait for that commit to end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committing: Option<String>,
    /// The compressed layer blob this snapshot was made from or diffed into
    /// (`sha256:...`), in the namespace's content; set once (buildkit's blob mapping).
    /// The snapshot holds the blob against garbage collection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob: Option<String>,
    /// A merge or a diff (buildkit's MergeOp and DiffOp): the layers it stacks, bottom
    /// first, each a committed snapshot of the same namespace standing for its own
    /// change only (not its parents'). Empty for every other snapshot. A merge holds
    /// its layers: they cannot be removed before it, and collection keeps them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<String>,
    /// When the snapshot was last used (nanoseconds since the Unix epoch): prepared or
    /// viewed on, mounted, or touched. 0 means never since it was made.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub last_used: u64,
    /// How many times it was used, counted as `last_used` is set.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub use_count: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Record {
    pub fn encode(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self).with_context(|| "encode snapshot record")
    }

    pub fn decode(bytes: &[u8], key: &str) -> Result<Self> {
        serde_json::from_slice(bytes)
            .with_context(|| format!("corrupt metadata record for {key:?}"))
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

/// A commit under way: written before the backend commits, replaced by the committed
/// record after. After a crash, whichever of `bkey` and `bname` the backend holds says
/// whether the commit is finished or undone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Intent {
    /// The active snapshot's key.
    pub key: String,
    /// Its backend key.
    pub bkey: String,
    /// The backend key of the committed snapshot.
    pub bname: String,
    /// The committed snapshot's labels.
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
    /// The lease the commit runs under, which will hold the committed snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
    /// The layers the committed snapshot stacks, when it is a merge made by copying
    /// (see [`Record::layers`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<String>,
}

impl Intent {
    pub fn encode(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self).context("encode commit intent")
    }

    pub fn decode(bytes: &[u8], name: &str) -> Result<Self> {
        serde_json::from_slice(bytes).with_context(|| format!("corrupt commit intent for {name:?}"))
    }
}
