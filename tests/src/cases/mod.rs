//! The cases: containerd's suite by meaning, the extras, and the metadata layer's.

#[macro_use]
mod helpers;
mod containerd;
mod extra;
mod metadata;

use crate::harness::Case;

/// Every case, in the order reports list them.
pub fn all() -> Vec<Case> {
    let mut v = Vec::new();
    v.extend_from_slice(containerd::CASES);
    v.extend_from_slice(extra::CASES);
    v.extend_from_slice(metadata::CASES);
    v
}
