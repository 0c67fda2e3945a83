//! Fuzz targets for wasnap's boundaries, on stable Rust.
//!
//! Each [`Target`] takes bytes, as a `cargo fuzz` target does, and checks properties
//! of what the library makes of them. They run three ways:
//! - `cargo test -p wasnap-fuzz`: every corpus entry, then a short random run with a
//!   fixed seed (the same inputs every time);
//! - `wasnap-fuzz <target> --time SECS`: a long random run, saving any failing input
//!   into `corpus/<target>/`;
//! - `wasnap-fuzz run <target> FILE...`: chosen inputs again, to debug one.
//!
//! The targets: [`targets::filter`], [`targets::labels`], [`targets::grpc`],
//! [`targets::guest`], [`targets::records`].

pub mod engine;
pub mod input;
pub mod scratch;
pub mod targets;

pub use engine::{Budget, Options, Report, Target};

/// Every target, in the order the table lists them.
pub const TARGETS: &[&Target] = &[
    &targets::filter::TARGET,
    &targets::labels::TARGET,
    &targets::guest::TARGET,
    &targets::grpc::TARGET,
    &targets::records::TARGET,
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().copied().find(|t| t.name == name)
}
