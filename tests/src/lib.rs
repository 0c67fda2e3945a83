//! wasnap-conformance: does a snapshotter behave like a containerd snapshotter?
//!
//! The suite holds, by meaning, every case of containerd's snapshotter test suite
//! (`core/snapshots/testsuite`), written fresh against wasnap's backend trait, plus cases
//! containerd lacks and cases for the metadata layer on top of any backend. File
//! contents are checked through real mounts, so most cases need root; without it they
//! are *skipped, with the reason*, never passed.
//!
//! Use it with a [`Factory`] that opens your backend in a directory:
//!
//! ```no_run
//! use std::sync::Arc;
//! use wasnap_conformance::{Factory, Options, cases, run};
//!
//! struct Native;
//! impl Factory for Native {
//!     fn name(&self) -> String { "native".into() }
//!     fn open(&self, dir: &std::path::Path) -> wasnap::Result<Arc<dyn wasnap::Backend>> {
//!         wasnap_conformance::open_native(dir)
//!     }
//! }
//! let report = run(&Native, &cases::all(), &Options::default());
//! assert_eq!(report.failed(), 0);
//! ```

pub mod cases;
mod factory;
mod fixture;
mod harness;
pub mod loopfs;
mod report;

pub use factory::StackFactory;
pub use fixture::{Op, apply, check_equal};
pub use harness::{Case, Env, Factory, Fail, Group, Options, Outcome, open_native, run};
pub use report::{CaseResult, Report};
