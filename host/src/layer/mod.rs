//! Layers: OCI layer tar streams applied into a snapshot's tree and taken back out of one.
//!
//! - [`compression`]: detecting and (de)compressing gzip and zstd streams;
//! - [`apply`]: a tar stream written into a directory, confined beneath it, with
//!   whiteouts translated for the backend ([`Whiteouts`]);
//! - [`diff`]: a tree (an overlay upper directory, or two trees compared) written as a
//!   tar stream with whiteouts;
//! - [`snapshot`]: the same for snapshots of any backend, with blobs in the content
//!   store, and chain IDs (register);
//! - [`merge`]: merge and diff snapshots (buildkit's MergeOp and DiffOp) on any backend.
//!
//! `apply` and `diff` work on directory descriptors only; `snapshot` decides which
//! directory belongs to which snapshot.

pub mod apply;
pub mod compression;
pub mod diff;
pub mod merge;
pub mod snapshot;

pub use compression::Compression;

/// How deletions are represented in the tree a layer is applied into or diffed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whiteouts {
    /// The tree is the whole filesystem (native, btrfs, the `copy` guest): a whiteout
    /// deletes in place, and an opaque directory is emptied.
    Delete,
    /// The tree is an overlayfs upper directory: a whiteout is a 0:0 character device
    /// and an opaque directory carries the opaque xattr, `trusted.overlay.opaque` or,
    /// with `userxattr`, `user.overlay.opaque`.
    Overlay {
        /// The filesystem is mounted with `userxattr`.
        userxattr: bool,
    },
}

impl Whiteouts {
    /// The name of the xattr that marks an opaque directory, if this form has one.
    pub fn opaque_xattr(self) -> Option<&'static str> {
        match self {
            Whiteouts::Delete => None,
            Whiteouts::Overlay { userxattr: false } => Some("trusted.overlay.opaque"),
            Whiteouts::Overlay { userxattr: true } => Some("user.overlay.opaque"),
        }
    }
}

/// The prefix of a whiteout entry's name in a layer tar.
pub const WHITEOUT_PREFIX: &str = ".wh.";
/// The name of the entry that makes its directory opaque in a layer tar.
pub const WHITEOUT_OPAQUE: &str = ".wh..wh..opq";

#[cfg(test)]
mod roundtrip;
