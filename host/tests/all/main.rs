#![allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is what it should do

//! wasnap's integration tests: one binary, one module per concern, driving the real
//! metadata layer, the real native driver and the real `wasnap` binary.

mod cli;
mod common;
mod durability;
mod metadata;
mod native;
