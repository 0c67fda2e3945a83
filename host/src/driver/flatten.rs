//! Past the kernel's stack limit: the overlay driver's flattened lowers.
//!
//! A mount record stacks no more lower directories than both the kernel
//! ([`OVERLAY_MAX_LAYERS`]) and containerd mounting the record itself allow. containerd
//! 1.6 rewrites a `lowerdir=` option whose options come near a page to paths relative to
//! the lowers' common parent (here `snapshots/`, so each name is `<id>/fs`), mounts from
//! that directory, and refuses options still longer than a page; `wasnap mount` takes
//! layers one by one and has only the kernel's limit. So a record's lowers are the
//! most that keep containerd's compacted options under a page ([`Budget::Record`]).
//!
//! When a snapshot shows more layers than that, the bottom part of its stack is
//! replaced by one directory: the merged tree of a whole snapshot further down,
//! `snapshots/<id>/flat`, inside that snapshot's own entry, so it is deleted with it
//! (no snapshot above it can outlive it). It is made once, by the first call whose
//! mounts need it, and found by every later one.
//!
//! **Where to cut.** Only whole snapshots are flatten points
//! ([`Snap::whole`](crate::driver::storage::Snap::whole)): a merge's layers are not.
//! Among those that leave a stack that fits, the cut is at the highest snapshot whose
//! depth (the number of layers it shows) is a multiple of [`FLATTEN_STEP`], so that the
//! tips of one chain (each prepare while a deep image is unpacked, each container on
//! it) share a handful of flattened trees instead of each copying the bottom of the
//! chain again: a stack keeps all but at most `FLATTEN_STEP - 1` of the layers that
//! would fit. Without such a point (a short chain on a merge), the highest point that
//! fits. The cut depends on the records only, so a snapshot's mounts are the same at
//! every call.
//!
//! **Making one.** The snapshot's own stack (at most [`OVERLAY_MAX_LAYERS`], itself cut
//! at a flattened tree further down if it must be, made first) is mounted read-only as
//! a detached mount ([`crate::mount::overlay_detached`]: attached nowhere, gone when its
//! descriptor closes, so no error or crash leaves a mount behind). Its merged tree, in
//! which the kernel has already applied whiteouts and opaque directories and hides its
//! own attributes, is copied with [`fsutil::copy_tree`] (owners, modes, xattrs, hard
//! links, devices) into `tmp/` under a busy mark, synced as a commit's layer is
//! ([`Layout::settle`]), and renamed into place without replacing: a builder in another
//! process that loses that race deletes its copy and uses the winner's; builders in
//! this process wait for each other. A copy a crash cut short is a `tmp/` entry no mark
//! holds, which [`Layout::reclaim`] deletes. A kernel without `lowerdir+` (before
//! 6.8) cannot make the detached mount: a prepare or view that needs a flattened tree
//! there fails with that reason and leaves nothing behind.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cap_std::fs::{Dir, DirBuilder, DirBuilderExt};
use rustix::fs::{AtFlags, FileType, RenameFlags};
use rustix::io::Errno;

use crate::driver::layout::{Layout, SNAPSHOTS, TMP};
use crate::error::{Context, Error, Result};
use crate::fsutil;
use crate::mount::OVERLAY_MAX_LAYERS;
use crate::snapshot::Mount;

/// The name of a snapshot's flattened tree inside its entry.
pub const FLAT: &str = "flat";

/// Flattened trees are made at snapshots whose depth is a multiple of this, when one
/// fits (see the module documentation).
pub const FLATTEN_STEP: usize = 100;

/// One directory a mount stacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lower {
    /// A snapshot's own layer, `snapshots/<id>/fs`.
    Layer(u64),
    /// A snapshot's flattened tree, `snapshots/<id>/flat`.
    Flat(u64),
}

impl Lower {
    /// The path relative to the driver's directory.
    pub fn rel(self) -> String {
        match self {
            Lower::Layer(id) => format!("{SNAPSHOTS}/{id}/fs"),
            Lower::Flat(id) => format!("{SNAPSHOTS}/{id}/{FLAT}"),
        }
    }
}

/// The length of `<id>/fs` (or `<id>/flat`), the name containerd's compaction gives.
fn name_len(id: u64, flat: bool) -> usize {
    id.checked_ilog10().unwrap_or(0) as usize + 1 + if flat { 1 + FLAT.len() } else { 3 }
}

/// How many lower directories a stack may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// A mount record others mount: at most [`OVERLAY_MAX_LAYERS`], and containerd's
    /// data string (the `other` bytes of the record's other non-flag options, then
    /// `lowerdir=` with names relative to `snapshots/`) shorter than `page`.
    Record {
        /// Bytes of the other options as containerd joins them (flags left out).
        other: usize,
        /// The page size: the most the kernel copies of mount(2)'s data, with its NUL.
        page: usize,
    },
    /// A mount the host makes itself, one `lowerdir+` per layer: the kernel's limit.
    Kernel,
}

impl Budget {
    /// Whether `count` lowers whose relative names total `names` bytes fit.
    pub fn fits(self, count: usize, names: usize) -> bool {
        if count > OVERLAY_MAX_LAYERS {
            return false;
        }
        match self {
            Budget::Kernel => true,
            Budget::Record { other, page } => {
                let lowerdir = "lowerdir=".len() + names + count.saturating_sub(1);
                other + usize::from(other > 0) + lowerdir < page
            }
        }
    }
}

/// What a mount stacks for a list of layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// The first `stacked` layers are stacked as they are.
    pub stacked: usize,
    /// Then the flattened tree of this snapshot, which shows the rest.
    pub flat: Option<u64>,
}

/// What to stack to show `layers` (top first) within `budget`, given `whole` (`(i, id)`:
/// `layers[i..]` is everything snapshot `id` shows; nearest first).
pub fn plan(layers: &[u64], whole: &[(usize, u64)], budget: Budget) -> Result<Plan> {
    let mut names = Vec::with_capacity(layers.len() + 1);
    names.push(0usize);
    for (i, id) in layers.iter().enumerate() {
        names.push(names[i] + name_len(*id, false));
    }
    if budget.fits(layers.len(), names[layers.len()]) {
        return Ok(Plan { stacked: layers.len(), flat: None });
    }
    let (mut aligned, mut any) = (None, None);
    for &(i, id) in whole {
        if i >= layers.len() || !budget.fits(i + 1, names[i] + name_len(id, true)) {
            continue;
        }
        if (layers.len() - i).is_multiple_of(FLATTEN_STEP) {
            aligned = aligned.max(Some((i, id)));
        }
        any = any.max(Some((i, id)));
    }
    let (stacked, id) = aligned.or(any).ok_or_else(|| {
        Error::failed_precondition(format!(
            "{} layers do not fit in one overlay mount and none of them begins a whole snapshot to flatten",
            layers.len()
        ))
    })?;
    Ok(Plan { stacked, flat: Some(id) })
}

/// The directories of `plan` for `layers`, top first.
pub fn lowers(layers: &[u64], plan: Plan) -> Vec<Lower> {
    let mut out: Vec<Lower> = layers[..plan.stacked].iter().map(|id| Lower::Layer(*id)).collect();
    out.extend(plan.flat.map(Lower::Flat));
    out
}

/// Builders of flattened trees in this process, one per snapshot at a time.
#[derive(Debug, Default)]
pub struct Builders(Mutex<HashMap<u64, Arc<Mutex<()>>>>);

/// Makes flattened trees on one driver's layout.
#[derive(Debug)]
pub struct Flattener<'a> {
    /// The driver's layout.
    pub layout: &'a Layout,
    /// The overlay options every stack of this driver's layers is read with
    /// (`index=off`, `userxattr`).
    pub options: Vec<String>,
    /// Who is building what here.
    pub builders: &'a Builders,
}

impl Flattener<'_> {
    /// Plans the stack for `layers` (see [`plan`]) and makes the flattened tree it
    /// names if it is not there yet.
    pub fn stack(
        &self,
        layers: &[u64],
        whole: &[(usize, u64)],
        budget: Budget,
    ) -> Result<Vec<Lower>> {
        let p = plan(layers, whole, budget)?;
        if let Some(id) = p.flat {
            let below: Vec<(usize, u64)> = whole
                .iter()
                .filter(|(i, _)| *i > p.stacked)
                .map(|(i, w)| (i - p.stacked, *w))
                .collect();
            self.ensure(id, &layers[p.stacked..], &below)?;
        }
        Ok(lowers(layers, p))
    }

    fn exists(&self, id: u64) -> Result<bool> {
        let rel = format!("{id}/{FLAT}");
        match rustix::fs::statat(&self.layout.snapshots, rel.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => Ok(true),
            Ok(_) => Err(Error::internal(format!("{SNAPSHOTS}/{rel} is not a directory"))),
            Err(Errno::NOENT) => Ok(false),
            Err(e) => {
                Err(Error::from(std::io::Error::from(e)).context(format!("stat {SNAPSHOTS}/{rel}")))
            }
        }
    }

    /// Makes `snapshots/<id>/flat`, the merged tree of `layers` (what snapshot `id`
    /// shows; `whole` as for [`plan`], relative to them), unless it exists.
    fn ensure(&self, id: u64, layers: &[u64], whole: &[(usize, u64)]) -> Result<()> {
        if self.exists(id)? {
            return Ok(());
        }
        let lock = {
            let mut all = self.builders.0.lock().unwrap_or_else(|e| e.into_inner());
            all.entry(id).or_default().clone()
        };
        // A copy of the bottom of the chain, or a wait for another call's: long, if the
        // call's runner must know.
        let built = crate::long_work::long(|| {
            let _one = lock.lock().unwrap_or_else(|e| e.into_inner());
            if self.exists(id)? { Ok(()) } else { self.build(id, layers, whole) }
        });
        let mut all = self.builders.0.lock().unwrap_or_else(|e| e.into_inner());
        // Ours and the map's: nobody else waits on it.
        if Arc::strong_count(&lock) == 2 {
            all.remove(&id);
        }
        built
    }

    fn build(&self, id: u64, layers: &[u64], whole: &[(usize, u64)]) -> Result<()> {
        let l = self.layout;
        let started = std::time::Instant::now();
        // The stack read from is cut at a deeper flattened tree if it must be.
        let stack = self.stack(layers, whole, Budget::Kernel)?;
        let tmp = l.tmp_name(&format!("flat-{id}"));
        let made = (|| {
            let mut b = DirBuilder::new();
            b.mode(0o755);
            l.tmp.create_dir_with(tmp.name(), &b).with_context(|| format!("create {tmp}"))?;
            let dst = fsutil::open_dir_nofollow(&l.tmp, tmp.name())?;
            let mut options = self.options.clone();
            options.push("ro".into());
            let paths: Vec<String> = stack.iter().map(|d| l.host_path(&d.rel())).collect();
            options.push(format!("lowerdir={}", paths.join(":")));
            let m = Mount {
                kind: "overlay".into(),
                source: "overlay".into(),
                target: String::new(),
                options,
            };
            {
                // Detached: the overlay goes when this descriptor closes, here.
                let root = crate::mount::overlay_detached(&m)?;
                let src = Dir::from_std_file(std::fs::File::from(root));
                fsutil::copy_tree(&src, &dst)
                    .with_context(|| format!("flatten {} layers into {tmp}", layers.len()))?;
            }
            let usage = l.settle(&dst)?;
            l.fault("flatten.before-rename")?;
            let to = format!("{id}/{FLAT}");
            match rustix::fs::renameat_with(
                &l.tmp,
                tmp.name(),
                &l.snapshots,
                to.as_str(),
                RenameFlags::NOREPLACE,
            ) {
                Ok(()) => {}
                // Another process made it first: use that one.
                Err(Errno::EXIST | Errno::NOTEMPTY) => {
                    let _ = l.delete_tmp(tmp.name());
                    return Ok(None);
                }
                Err(e) => {
                    return Err(Error::from(std::io::Error::from(e))
                        .context(format!("rename {tmp} to {SNAPSHOTS}/{to}")));
                }
            }
            if l.syncs_commits() {
                let entry = fsutil::open_dir_nofollow(&l.snapshots, &id.to_string())?;
                rustix::fs::fsync(&entry).with_context(|| format!("sync {SNAPSHOTS}/{id}"))?;
            }
            Ok(Some(usage))
        })();
        match made {
            Ok(usage) => {
                tracing::info!(
                    snapshot = id,
                    layers = layers.len(),
                    stacked = stack.len(),
                    inodes = usage.map(|u| u.inodes),
                    elapsed = ?started.elapsed(),
                    "flattened the bottom of a chain deeper than one overlay mount stacks"
                );
                Ok(())
            }
            Err(e) => {
                let _ = l.delete_tmp(tmp.name());
                Err(e.context(format!("flatten snapshot {id}'s {} layers in {TMP}/", layers.len())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain chain of `n` layers with ids `start..`, top first, and its whole points.
    fn chain(n: usize, start: u64) -> (Vec<u64>, Vec<(usize, u64)>) {
        let layers: Vec<u64> = (0..n as u64).map(|i| start + n as u64 - 1 - i).collect();
        let whole = layers.iter().enumerate().map(|(i, id)| (i, *id)).collect();
        (layers, whole)
    }

    fn record(other: usize) -> Budget {
        Budget::Record { other, page: 4096 }
    }

    /// containerd 1.6's data string for lowers named relative to `snapshots/`.
    fn compacted(other: usize, lowers: &[Lower]) -> usize {
        let names: Vec<String> =
            lowers.iter().map(|l| l.rel().strip_prefix("snapshots/").unwrap().to_owned()).collect();
        other + usize::from(other > 0) + format!("lowerdir={}", names.join(":")).len()
    }

    #[test]
    fn what_fits_is_stacked_whole() {
        let (layers, whole) = chain(300, 1);
        assert_eq!(plan(&layers, &whole, record(200)).unwrap(), Plan { stacked: 300, flat: None });
        let (layers, whole) = chain(OVERLAY_MAX_LAYERS, 1);
        let p = plan(&layers, &whole, Budget::Kernel).unwrap();
        assert_eq!(p, Plan { stacked: OVERLAY_MAX_LAYERS, flat: None });
    }

    #[test]
    fn a_deep_chain_is_cut_at_an_aligned_whole_snapshot_under_a_page() {
        for (n, start, other) in
            [(1000, 1, 150), (1000, 10_000, 300), (520, 99_000, 10), (2000, 5, 0)]
        {
            let (layers, whole) = chain(n, start);
            let p = plan(&layers, &whole, record(other)).unwrap();
            let id = p.flat.expect("flattened");
            assert_eq!((n - p.stacked) % FLATTEN_STEP, 0, "{n}: cut at a multiple of the step");
            assert_eq!(whole[p.stacked].1, id, "the flat shows exactly what is below the stack");
            let stack = lowers(&layers, p);
            assert!(stack.len() <= OVERLAY_MAX_LAYERS);
            assert!(compacted(other, &stack) < 4096, "{n}: under a page");
            // One step more would not fit: at most FLATTEN_STEP - 1 layers given away.
            let higher = p.stacked + FLATTEN_STEP;
            if higher >= n {
                continue;
            }
            let more = lowers(&layers, Plan { stacked: higher, flat: Some(whole[higher].1) });
            assert!(
                more.len() > OVERLAY_MAX_LAYERS || compacted(other, &more) >= 4096,
                "{n}: the highest aligned cut"
            );
        }
    }

    #[test]
    fn the_cut_of_a_chain_is_shared_by_its_tips() {
        let (layers, whole) = chain(1000, 1);
        let flat = |from: usize| {
            let w: Vec<(usize, u64)> =
                whole.iter().filter(|(i, _)| *i >= from).map(|(i, id)| (i - from, *id)).collect();
            plan(&layers[from..], &w, record(150)).unwrap().flat
        };
        let cuts: std::collections::BTreeSet<_> = (0..40).map(flat).collect();
        assert!(cuts.len() <= 2, "40 neighbouring tips use {cuts:?}");
    }

    #[test]
    fn without_an_aligned_point_the_highest_fitting_one_and_none_is_an_error() {
        // 480 merged layers (no whole point among them) under 7 snapshots.
        let layers: Vec<u64> = (1..=487).rev().collect();
        let mut whole: Vec<(usize, u64)> = (0..7).map(|i| (i, 487 - i as u64)).collect();
        whole.push((7, 9999)); // the merge
        let p = plan(&layers, &whole, record(1000)).unwrap();
        assert_eq!(p, Plan { stacked: 7, flat: Some(9999) }, "the highest that fits");
        // The merge alone, mounted: only itself to flatten.
        let p = plan(&layers[7..], &[(0, 9999)], record(1000)).unwrap();
        assert_eq!(p, Plan { stacked: 0, flat: Some(9999) });
        let err = plan(&layers, &[], record(1000)).unwrap_err();
        assert!(err.to_string().contains("487 layers"), "{err}");
    }

    #[test]
    fn kernel_budget_counts_layers_only() {
        assert!(Budget::Kernel.fits(OVERLAY_MAX_LAYERS, usize::MAX / 2));
        assert!(!Budget::Kernel.fits(OVERLAY_MAX_LAYERS + 1, 0));
        assert!(record(0).fits(2, 4096 - 9 - 2));
        assert!(!record(0).fits(2, 4096 - 9 - 1));
        assert_eq!(name_len(1, false), "1/fs".len());
        assert_eq!(name_len(12_345, true), "12345/flat".len());
        assert_eq!(name_len(0, false), "0/fs".len());
    }
}
