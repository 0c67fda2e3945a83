//! Embedding wasnap as a library: open a root, make a layer, commit it, look at it.
//!
//! Run with `cargo run --example embed -- /tmp/wasnap-embed` (any writable directory).

use std::path::PathBuf;

use anyhow::Context;
use wasnap::root::{DEFAULT_SNAPSHOTTER, Host};
use wasnap::{Ctx, Labels};

fn main() -> anyhow::Result<()> {
    let root: PathBuf = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("wasnap-embed"));
    let host = Host::open(&root).with_context(|| format!("open {}", root.display()))?;
    let snapshots = host.snapshotter(DEFAULT_SNAPSHOTTER)?;
    let ctx = Ctx::new("example")?;

    // The native driver's mounts are bind mounts of a directory; write through it
    // directly here instead of mounting, so the example needs no privileges.
    let mounts = snapshots.prepare(&ctx, "layer-1-active", None, &Labels::new())?;
    std::fs::write(PathBuf::from(&mounts[0].source).join("hello.txt"), "hello from a layer\n")?;
    snapshots.commit(&ctx, "layer-1", "layer-1-active", &Labels::new())?;

    let info = snapshots.stat(&ctx, "layer-1")?;
    let usage = snapshots.usage(&ctx, "layer-1")?;
    println!(
        "{} is {} and uses {} bytes in {} inodes",
        info.name, info.kind, usage.size, usage.inodes
    );

    snapshots.remove(&ctx, "layer-1")?;
    host.close()?;
    Ok(())
}
