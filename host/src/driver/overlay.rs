//! The overlay driver: the job of containerd's overlayfs snapshotter.
//!
//! Each snapshot is `snapshots/<id>/fs` (its layer: the upper directory while active)
//! and `snapshots/<id>/work` (overlay's work directory), in the layout shared with the
//! native driver ([`layout`](super::layout)). Mounts:
//!
//! - active, no parent: a writable bind mount of `fs`;
//! - active on a parent: `overlay` with the parent chain as `lowerdir` (nearest first),
//!   `fs` as `upperdir`;
//! - view of one layer: a read-only bind mount of that layer; of several: a read-only
//!   `overlay` of them.
//!
//! Mount records list lowers as containerd's do (`lowerdir=/a/fs:/b/fs`). `wasnap
//! mount` and the harness mount them with one `lowerdir+` per layer, so only the
//! kernel's limit ([`OVERLAY_MAX_LAYERS`]) applies; containerd mounting a record itself
//! shortens a long `lowerdir` to names relative to `snapshots/` and needs the result
//! under a page. A record stacks as many layers as both allow (about 400 to 500,
//! depending on the length of the ids); a chain deeper than that is mounted with its
//! bottom part replaced by one flattened tree, `snapshots/<id>/flat` of a whole
//! snapshot lower down, made by the first call whose mounts need it, reused by later
//! ones and deleted with that snapshot ([`flatten`]). So chains of any depth mount.

use std::path::PathBuf;
use std::sync::Arc;

use cap_std::fs::{Dir, DirBuilder, DirBuilderExt, MetadataExt};

use super::Trees;
use super::layout::{Deletion, Layout, OnLayout, TMP, on_layout};
// A child of this module kept beside it: only the overlay driver flattens.
#[path = "flatten.rs"]
pub(crate) mod flatten;
use crate::driver::storage::{Snap, Store};
use crate::error::{Context, Error, Result};
use crate::fault::Faults;
use crate::fsutil;
use crate::mount::OVERLAY_MAX_LAYERS;
use crate::snapshot::{Info, Kind, Labels, Mount};
use flatten::{Budget, Builders, Flattener, Lower};

/// The label that, with [`OverlayOptions::upperdir_label`], shows an active snapshot's
/// upper directory (containerd's `containerd.io/snapshot/overlay.upperdir`).
pub const UPPERDIR_LABEL: &str = "containerd.io/snapshot/overlay.upperdir";

/// How the overlay driver mounts and removes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OverlayOptions {
    /// Add `index=off` to overlay mounts (containerd does when the kernel supports it),
    /// so a layer can be mounted under several upper directories.
    pub index_off: bool,
    /// Add `userxattr`: overlay keeps its metadata in `user.overlay.*`, as it must in a
    /// user namespace (rootless).
    pub userxattr: bool,
    /// Add `volatile` to writable overlay mounts: no syncs to the upper directory; the
    /// container's writes may be lost on a crash, which is fine for throwaway containers.
    pub volatile: bool,
    /// Report each snapshot's upper directory in the [`UPPERDIR_LABEL`] label.
    pub upperdir_label: bool,
    /// Leave removed trees in `tmp/` for [`Backend::cleanup`] to delete, like
    /// containerd's asynchronous remove, instead of deleting them in `remove`.
    pub async_remove: bool,
}

impl Default for OverlayOptions {
    fn default() -> Self {
        OverlayOptions {
            index_off: true,
            userxattr: false,
            volatile: false,
            upperdir_label: false,
            async_remove: false,
        }
    }
}

/// The overlay driver.
#[derive(Debug)]
pub struct Overlay {
    layout: Arc<Layout>,
    opts: OverlayOptions,
    /// Flattened trees being made in this process.
    flattening: Builders,
}

impl Overlay {
    /// Opens the driver in `dir` (which is `path` on the host) with records of its own
    /// in `dir`.
    pub fn open(
        dir: Dir,
        path: PathBuf,
        faults: Arc<Faults>,
        opts: OverlayOptions,
    ) -> Result<Self> {
        let store = Store::open(&dir)?;
        Self::with_store(dir, path, store, faults, opts)
    }

    /// Whether commits sync the layer's data before recording it (the default).
    pub fn set_sync_commits(&self, sync: bool) {
        self.layout.set_sync_commits(sync);
    }

    /// Opens the driver in `dir` keeping its records in `store`.
    pub fn with_store(
        dir: Dir,
        path: PathBuf,
        store: Store,
        faults: Arc<Faults>,
        opts: OverlayOptions,
    ) -> Result<Self> {
        if !crate::probe::Support::overlay_available() {
            return Err(Error::failed_precondition(
                "this kernel has no overlayfs (not in /proc/filesystems); use the native driver",
            ));
        }
        let layout = Arc::new(Layout::open(
            dir,
            path,
            store,
            Box::new(Trees),
            faults,
            "overlay",
            Some(blank),
        )?);
        layout.start_deleter()?;
        Ok(Overlay { layout, opts, flattening: Builders::default() })
    }

    fn fs(&self, id: u64) -> String {
        self.layout.host_path(&format!("{}/fs", Layout::entry(id)))
    }

    fn lowerdir(&self, lowers: &[Lower]) -> String {
        lowers.iter().map(|d| self.layout.host_path(&d.rel())).collect::<Vec<_>>().join(":")
    }

    /// The options every overlay of this driver's layers is mounted with.
    fn base_options(&self) -> Vec<String> {
        let mut options = Vec::new();
        if self.opts.index_off {
            options.push("index=off".to_string());
        }
        if self.opts.userxattr {
            options.push("userxattr".to_string());
        }
        options
    }

    /// The lower directories of a mount record with `options` (all but `lowerdir`)
    /// that shows `layers`: flattened below what fits (see [`flatten`]).
    fn record_lowers(
        &self,
        options: &[String],
        layers: &[u64],
        whole: &[(usize, u64)],
    ) -> Result<Vec<Lower>> {
        let budget = Budget::Record {
            other: crate::mount::parse_options(options).data.len(),
            page: rustix::param::page_size(),
        };
        let flattener = Flattener {
            layout: &self.layout,
            options: self.base_options(),
            builders: &self.flattening,
        };
        flattener.stack(layers, whole, budget)
    }

    fn with_upperdir(&self, mut info: Info, id: u64) -> Info {
        if self.opts.upperdir_label {
            info.labels.insert(UPPERDIR_LABEL.into(), self.fs(id));
        }
        info
    }
}

impl OnLayout for Overlay {
    const TREE: &'static str = "fs";
    const COMMITS_IN_PLACE: bool = true;

    fn layout(&self) -> &Layout {
        &self.layout
    }

    fn mounts_for(&self, snap: &Snap) -> Result<Vec<Mount>> {
        let bind = |source: String, mode: &str| Mount {
            kind: "bind".into(),
            source,
            target: String::new(),
            options: vec!["rbind".into(), mode.into()],
        };
        let overlay = |options: Vec<String>| Mount {
            kind: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options,
        };
        // The layers below the upper directory (all of them, for a read-only mount), top
        // first, and where in them whole snapshots begin: a committed snapshot shows its
        // own layer too; a merge's own entry holds nothing, and a merge is whole.
        let (layers, whole) = match (snap.kind, snap.merge) {
            (Kind::Committed, false) => {
                let mut layers = Vec::with_capacity(snap.parent_ids.len() + 1);
                layers.push(snap.id);
                layers.extend(&snap.parent_ids);
                let mut whole = vec![(0, snap.id)];
                whole.extend(snap.whole.iter().map(|(i, id)| (i + 1, *id)));
                (layers, whole)
            }
            (_, true) => {
                let mut whole = vec![(0, snap.id)];
                whole.extend(&snap.whole);
                (snap.parent_ids.clone(), whole)
            }
            _ => (snap.parent_ids.clone(), snap.whole.clone()),
        };
        let mut options = self.base_options();
        Ok(match (snap.kind, layers.as_slice()) {
            (Kind::Active, []) => vec![bind(self.fs(snap.id), "rw")],
            (Kind::Active, _) => {
                let dir = Layout::entry(snap.id);
                if self.opts.volatile {
                    options.push("volatile".into());
                }
                options.push(format!("workdir={}", self.layout.host_path(&format!("{dir}/work"))));
                options.push(format!("upperdir={}", self.layout.host_path(&format!("{dir}/fs"))));
                let lowers = self.record_lowers(&options, &layers, &whole)?;
                options.push(format!("lowerdir={}", self.lowerdir(&lowers)));
                vec![overlay(options)]
            }
            (_, []) => vec![bind(self.fs(snap.id), "ro")],
            (_, [only]) => vec![bind(self.fs(*only), "ro")],
            (_, _) => {
                options.push("ro".into());
                match self.record_lowers(&options, &layers, &whole)?.as_slice() {
                    // One flattened tree: whiteouts are applied in it already.
                    [only] => vec![bind(self.layout.host_path(&only.rel()), "ro")],
                    lowers => {
                        options.push(format!("lowerdir={}", self.lowerdir(lowers)));
                        vec![overlay(options)]
                    }
                }
            }
        })
    }

    fn build_entry(&self, tmp: &str, parent: Option<(&str, &Snap)>) -> Result<()> {
        let l = &self.layout;
        blank(&l.tmp, tmp).with_context(|| format!("make {TMP}/{tmp}"))?;
        self.adopt(&l.tmp, tmp, parent)
    }

    fn adopt(&self, dir: &Dir, name: &str, parent: Option<(&str, &Snap)>) -> Result<()> {
        // No depth is refused: past what one mount stacks, the mounts stack a flattened
        // tree of the bottom of the chain (see `flatten`).
        // The upper directory becomes the root of the mount: give it the owner of the
        // layer below, as containerd does, or a chowned image root is lost.
        if let Some((_, p)) = parent {
            let l = &self.layout;
            let top = if p.merge { p.parent_ids.first().copied().unwrap_or(p.id) } else { p.id };
            let below = fsutil::open_dir_nofollow(&l.snapshots, &top.to_string())?
                .symlink_metadata("fs")
                .context("stat the parent's layer")?;
            let entry = fsutil::open_dir_nofollow(dir, name)?;
            // Already its owner (the daemon's own, as most image roots are): a chown would
            // only dirty the inode, which the commit's `fsync` would then have to write.
            let new = entry.symlink_metadata("fs").context("stat the new layer")?;
            if (new.uid(), new.gid()) != (below.uid(), below.gid()) {
                rustix::fs::chownat(
                    &entry,
                    "fs",
                    Some(rustix::fs::Uid::from_raw(below.uid())),
                    Some(rustix::fs::Gid::from_raw(below.gid())),
                    rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
                )
                .context("chown new layer")?;
            }
        }
        Ok(())
    }

    fn commit_active(&self, name: &str, key: &str, active: &Snap, labels: &Labels) -> Result<()> {
        // Usage is measured and stored here, so the usage engines poll is O(1).
        let l = &self.layout;
        let entry = fsutil::open_dir_nofollow(&l.snapshots, &active.id.to_string())?;
        let usage = l.settle(&fsutil::open_dir_nofollow(&entry, Self::TREE)?)?;
        l.commit_in_place(name, key, usage, labels)
    }

    fn deletion(&self) -> Deletion {
        if self.opts.async_remove { Deletion::AtCleanup } else { Deletion::Background }
    }

    fn present(&self, info: Info, id: u64) -> Info {
        self.with_upperdir(info, id)
    }

    fn computed_labels(&self) -> &'static [&'static str] {
        // The upper directory label is computed, never stored.
        &[UPPERDIR_LABEL]
    }

    fn computes_labels(&self) -> bool {
        self.opts.upperdir_label
    }

    /// A merge stacks the layers' own directories: nothing is copied. Its entry is an
    /// empty `fs` (never mounted) beside the records that name the layers.
    fn merge(&self, name: &str, layers: &[String], labels: &Labels) -> Result<()> {
        if layers.len() > OVERLAY_MAX_LAYERS {
            tracing::info!(
                name,
                layers = layers.len(),
                "a merge of more layers than overlay stacks ({OVERLAY_MAX_LAYERS}) is made by copying"
            );
            return Err(Error::not_implemented(format!(
                "overlay stacks at most {OVERLAY_MAX_LAYERS} layers, this merge has {}",
                layers.len()
            )));
        }
        let l = &self.layout;
        l.build_merge(name, layers, labels, |tmp| {
            let mut b = DirBuilder::new();
            b.mode(0o755);
            l.tmp.create_dir_with(tmp, &b).with_context(|| format!("create {TMP}/{tmp}"))?;
            let entry = fsutil::open_dir_nofollow(&l.tmp, tmp)?;
            entry.create_dir_with("fs", &b).with_context(|| format!("create {TMP}/{tmp}/fs"))?;
            Ok(())
        })
        .map(drop)
    }
}

/// A new snapshot's entry before it has a parent: `fs` (the layer, 0755) and `work`
/// (overlay's work directory, 0711), both empty. Made ahead of time as spares (see
/// [`layout`](super::layout)), or by a create that finds none.
fn blank(dir: &Dir, name: &str) -> Result<()> {
    let mut b = DirBuilder::new();
    b.mode(0o755);
    dir.create_dir_with(name, &b).context("create the entry")?;
    let entry = fsutil::open_dir_nofollow(dir, name)?;
    entry.create_dir_with("fs", &b).context("create fs")?;
    b.mode(0o711);
    entry.create_dir_with("work", &b).context("create work")?;
    Ok(())
}

on_layout!(Overlay);
