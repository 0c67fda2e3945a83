//! The native driver: copy-based, like containerd's native snapshotter.
//!
//! Every snapshot is a full directory tree: prepare and view copy the parent's tree
//! (keeping mode, ownership, timestamps, xattrs, links and device nodes), and the mounts
//! are bind mounts of it. Slow for big layers, but it works on any filesystem and needs
//! no kernel support beyond bind mounts, which is why it is the default. Its directory
//! follows [`layout`](super::layout).

use std::path::PathBuf;
use std::sync::Arc;

use cap_std::fs::{Dir, Permissions, PermissionsExt};

use super::Trees;
use super::layout::{Deletion, Layout, OnLayout, TMP, on_layout};
use crate::driver::storage::{Snap, Store};
use crate::error::{Context, Result};
use crate::fault::Faults;
use crate::fsutil;
use crate::snapshot::{Kind, Labels, Mount};

/// The native copy-based driver.
#[derive(Debug)]
pub struct Native {
    layout: Arc<Layout>,
}

impl Native {
    /// Opens the driver in `dir` (which is `path` on the host) with records of its own
    /// in `dir`.
    pub fn open(dir: Dir, path: PathBuf, faults: Arc<Faults>) -> Result<Self> {
        let store = Store::open(&dir)?;
        Self::with_store(dir, path, store, faults)
    }

    /// Whether commits sync the layer's data before recording it (the default), or
    /// trust the page cache, as containerd's native snapshotter does.
    pub fn set_sync_commits(&self, sync: bool) {
        self.layout.set_sync_commits(sync);
    }

    /// Opens the driver in `dir` keeping its records in `store`.
    pub fn with_store(dir: Dir, path: PathBuf, store: Store, faults: Arc<Faults>) -> Result<Self> {
        let layout =
            Arc::new(Layout::open(dir, path, store, Box::new(Trees), faults, "native", None)?);
        layout.start_deleter()?;
        Ok(Native { layout })
    }
}

impl OnLayout for Native {
    const TREE: &'static str = "";
    const COMMITS_IN_PLACE: bool = true;

    fn layout(&self) -> &Layout {
        &self.layout
    }

    fn mounts_for(&self, snap: &Snap) -> Result<Vec<Mount>> {
        let mode = if snap.kind == Kind::Active { "rw" } else { "ro" };
        Ok(vec![Mount {
            kind: "bind".into(),
            source: self.layout.host_path(&Layout::entry(snap.id)),
            target: String::new(),
            options: vec!["rbind".into(), mode.into()],
        }])
    }

    fn build_entry(&self, tmp: &str, parent: Option<(&str, &Snap)>) -> Result<()> {
        let l = &self.layout;
        l.tmp.create_dir(tmp).with_context(|| format!("create {TMP}/{tmp}"))?;
        let dst = fsutil::open_dir_nofollow(&l.tmp, tmp)?;
        match parent {
            Some((_, p)) => {
                let src = fsutil::open_dir_nofollow(&l.snapshots, &p.id.to_string())?;
                fsutil::copy_tree(&src, &dst)
            }
            None => l
                .tmp
                .set_permissions(tmp, Permissions::from_mode(0o755))
                .with_context(|| format!("chmod {TMP}/{tmp}")),
        }
    }

    fn commit_active(&self, name: &str, key: &str, active: &Snap, labels: &Labels) -> Result<()> {
        // Measured once here, so the usage engines poll is O(1) afterwards.
        let l = &self.layout;
        let usage = l.settle(&fsutil::open_dir_nofollow(&l.snapshots, &active.id.to_string())?)?;
        l.commit_in_place(name, key, usage, labels)
    }

    fn deletion(&self) -> Deletion {
        Deletion::Background
    }
}

on_layout!(Native);
