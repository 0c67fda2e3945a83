#![allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is what it should do

//! The `wasnap` binary as people and crashes meet it.

mod cache;
mod cli;
// The library's test helpers, shared rather than copied.
#[path = "../../../tests/all/common.rs"]
#[allow(dead_code)]
mod common;
mod durability;
mod e2e;
mod layers;
mod plugins;
mod remote;
