//! containerd's snapshotter test suite (`core/snapshots/testsuite`), case by case.

use crate::harness::Case;

pub(crate) const CASES: &[Case] = &[];
