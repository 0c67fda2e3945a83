//! The targets, one module each.

pub mod filter;
pub mod grpc;
pub mod guest;
pub mod labels;
pub mod records;
