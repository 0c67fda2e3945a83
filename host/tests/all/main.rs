#![allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is what it should do

//! wasnap's integration tests: one binary, one module per concern, driving the real
//! metadata layer and the real native driver. The binary's tests live in host/cli.

mod btrfs;
mod cache;
mod common;
mod deep;
mod full_disk;
mod gc;
mod layers;
mod loopfs;
mod merge;
mod merge_links;
mod metadata;
mod native;
mod overlay;
mod plugin;
mod races;
