//! Merge and diff snapshots on any backend (buildkit's MergeOp and DiffOp).
//!
//! What a merge or diff stacks is planned by the metadata layer
//! ([`Snapshotter::plan_merge`], [`Snapshotter::plan_diff`]). A backend that stacks
//! layers (overlay) makes it without copying. Any other (native, btrfs, WebAssembly
//! backends) gets a new snapshot on the longest bottom run of the layers that one
//! snapshot already shows (a btrfs subvolume snapshot, a native copy), and every layer
//! above it applied in order: each layer's change, read as [`Layers::diff`] reads it
//! (an overlay layer directly, other trees compared with their parent's), streamed as
//! a tar into the applier, so deletions and opaque directories are honoured exactly as
//! when a registry layer is applied. The diff and the apply are the code `wasnap layer
//! diff` and `layer apply` run. With hard links (native), a layer's stream is only
//! headers: one that fits in 16 MiB is written to memory (not hashed: nothing keeps it)
//! and applied on the calling thread, since the two threads and the pipe of a streamed
//! layer cost more than a small layer's entries (a merge of 200 small layers took twice
//! as long with them). Those streams are made on a second thread, up to two layers
//! ahead of the one being linked, from before the base is linked: reading a layer (its
//! records, its tree opened and listed, its headers) is half of what it costs. The
//! base is hard-linked too, not copied by the backend's prepare, where its tree is a
//! plain directory on the new snapshot's filesystem ([`fsutil::link_tree`]): the
//! merge's tree shares the inodes of every layer, which
//! only the applier writes to (by replacing files) before the commit makes it read-only.
//!
//! A diff whose lower is not an ancestor of its upper compares the two trees and keeps
//! the change as a snapshot of its own, deletions as overlay whiteouts; merged onto
//! another base it deletes what the upper had deleted.

use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd};

use super::apply::{self, ApplyOptions, LinkFrom};
use super::diff::{self, DiffOptions, Source};
use super::snapshot::{Layers, Scratch, Tree, Views, open_dir, scratch_labels};
use super::{Compression, Whiteouts};
use crate::error::{Error, Result};
use crate::fsutil;
use crate::kv::now_nanos;
use crate::metadata::{Ctx, MergePlan};
use crate::snapshot::{Info, Labels};

/// How a merge or diff snapshot was made.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Merged {
    /// The snapshot: the one made, or the existing one that is this merge already.
    pub info: Info,
    /// Its layers, bottom first (empty for a diff of unrelated trees, which is one).
    pub layers: Vec<String>,
    /// `reused` (an existing snapshot), `stacked` (the backend stacks the layers, no
    /// copying), `copied` (layers applied into a new snapshot) or `compared` (a diff
    /// of two unrelated trees).
    pub how: String,
    /// Layers applied by copying (for `copied`): those above the base.
    pub applied: usize,
}

/// How a merge that copies is made ([`Layers::make_with`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeOptions {
    /// Regular files are hard-linked from the layers' trees where the filesystem allows
    /// (buildkit's hardlink merge), copied elsewhere (another filesystem, a btrfs
    /// subvolume). False: every file is copied, as a layer applied from a registry.
    pub links: bool,
    /// Ask the backend to stack the layers (overlay does, without copying). False:
    /// build the merge by applying the layers whatever the backend, for comparison.
    pub stack: bool,
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions { links: true, stack: true }
    }
}

impl Layers<'_> {
    /// Merges the committed snapshots `inputs` as `name`, later inputs winning: their
    /// layers stacked in order, a merge input flattened to its own layers, a layer that
    /// comes twice kept at its uppermost place. An input that is already this merge,
    /// or an earlier merge of the same layers, is returned instead of making one (with
    /// its own name). The caller's lease holds the result.
    pub fn merge(
        &self,
        ctx: &Ctx,
        name: &str,
        inputs: &[String],
        labels: &Labels,
    ) -> Result<Merged> {
        let plan = self.snapshotter().plan_merge(ctx, inputs)?;
        self.make(ctx, name, &plan, labels)
    }

    /// Makes `name`, holding only what changes `lower` (none: empty) into `upper`,
    /// deletions included. When `lower`'s layers begin `upper`'s it is the layers
    /// between them, no tree walked; otherwise the two trees are compared.
    pub fn diff_snapshot(
        &self,
        ctx: &Ctx,
        name: &str,
        lower: Option<&str>,
        upper: &str,
        labels: &Labels,
    ) -> Result<Merged> {
        match self.snapshotter().plan_diff(ctx, lower, upper)? {
            Some(plan) => self.make(ctx, name, &plan, labels),
            None => {
                let lower =
                    lower.ok_or_else(|| Error::internal("a diff from nothing is a chain"))?;
                self.compare(ctx, name, lower, upper, labels)
            }
        }
    }

    /// Makes what `plan` says: reused, stacked by the backend, or copied.
    pub fn make(&self, ctx: &Ctx, name: &str, plan: &MergePlan, labels: &Labels) -> Result<Merged> {
        self.make_with(ctx, name, plan, labels, &MergeOptions::default())
    }

    /// [`Layers::make`], as `opts` says.
    pub fn make_with(
        &self,
        ctx: &Ctx,
        name: &str,
        plan: &MergePlan,
        labels: &Labels,
        opts: &MergeOptions,
    ) -> Result<Merged> {
        let sn = self.snapshotter();
        let layers = plan.keys();
        if let Some(existing) = &plan.existing {
            sn.hold(ctx, existing)?;
            let info = sn.stat(ctx, existing)?;
            let layers = match sn.layers(ctx, existing)? {
                own if own.is_empty() => layers,
                own => own,
            };
            return Ok(Merged { info, layers, how: "reused".into(), applied: 0 });
        }
        if opts.stack
            && let Some(info) = sn.merge_stacked(ctx, name, plan, labels)?
        {
            return Ok(Merged { info, layers, how: "stacked".into(), applied: 0 });
        }
        let (base, skip) = match &plan.base {
            Some((key, n)) => (Some(key.as_str()), *n),
            None => (None, 0),
        };
        let key = self.scratch_key("merge", name);
        // The new snapshot on its base, made while the first layers above are read.
        let on_base = || {
            let linked = match base {
                Some(base) if opts.links => self.on_linked_base(ctx, &key, base)?,
                _ => None,
            };
            match linked {
                Some(made) => Ok(made),
                None => {
                    sn.prepare(ctx, &key, base, &scratch_labels())?;
                    let made = Scratch::new(sn, ctx, key.clone());
                    let mounts = sn.mounts(ctx, &key)?;
                    Ok((made, Tree::writable(&mounts, self.scratch_dir())?))
                }
            }
        };
        let (mut made, tree) =
            self.apply_layers(ctx, name, &plan.layers[skip..], opts.links, on_base)?;
        drop(tree);
        // A merge made of its base alone (every layer above it deduplicated away) is
        // still recorded with its layers, so a later merge of them finds it.
        sn.commit_as(ctx, name, &key, None, labels, layers.clone(), plan.layers.clone())?;
        made.keep();
        let info = sn.stat(ctx, name)?;
        Ok(Merged { info, layers, how: "copied".into(), applied: plan.layers.len() - skip })
    }

    /// Makes the tree `on_base` returns (with what owns it), and applies `layers` (key,
    /// backend key) onto it, in order, each as its change read by
    /// [`Layers::open_change`] and streamed through [`pipe_apply`].
    ///
    /// With links, where a layer's stream is headers only, the layers are read on a
    /// second thread ([`AHEAD`] ahead at most: each opened, listed and its headers held
    /// in memory) while this one makes the tree and then applies them, linking each
    /// file: the reading is about half a layer's cost, and the two overlap. Only this
    /// thread writes the tree, in the layers' order; what a layer is read from is its
    /// own committed tree, which no earlier layer's applying touches.
    fn apply_layers<T>(
        &self,
        ctx: &Ctx,
        name: &str,
        layers: &[(String, String)],
        links: bool,
        on_base: impl FnOnce() -> Result<(T, Tree)>,
    ) -> Result<(T, Tree)> {
        let failed = |layer: &str| {
            let why = format!("merge {name:?}: apply layer {layer:?}");
            move |e: Error| e.context(why)
        };
        if !links || layers.len() < 2 {
            let (made, tree) = on_base()?;
            for (layer, _) in layers {
                self.with_change(ctx, layer, |source| pipe_apply(source, &tree, links))
                    .map_err(failed(layer))?;
            }
            return Ok((made, tree));
        }
        std::thread::scope(|s| {
            let (tx, rx) = std::sync::mpsc::sync_channel(AHEAD);
            let reading = std::thread::Builder::new()
                .name("wasnap-merge-read".into())
                .spawn_scoped(s, move || {
                    for (layer, _) in layers {
                        let read = self.open_change(ctx, layer).and_then(|change| {
                            let held = hold(change.source(), HELD_MAX)?;
                            Ok((change, held))
                        });
                        let stop = read.is_err();
                        // A send fails once the applying stopped: nothing more to read.
                        if tx.send(read.map_err(failed(layer))).is_err() || stop {
                            return;
                        }
                    }
                })
                .map_err(|e| Error::from(e).context("start the merge's reading thread"))?;
            let applied = on_base().and_then(|(made, tree)| {
                for (layer, _) in layers {
                    // The reader sends every layer, or stops after sending its failure.
                    let Ok(read) = rx.recv() else { break };
                    let (change, held) = read?;
                    match held {
                        Some(stream) => apply_held(change.source(), stream, &tree),
                        None => stream_apply(change.source(), &tree, true),
                    }
                    .map_err(failed(layer))?;
                }
                Ok((made, tree))
            });
            // Dropped, the receiver stops a reader still reading.
            drop(rx);
            reading.join().map_err(|_| Error::internal("the merge's reading thread panicked"))?;
            applied
        })
    }

    /// The merge's new snapshot `key` with the tree of the committed snapshot `base`
    /// hard-linked into it ([`fsutil::link_tree`]), where the backend's own prepare on
    /// `base` would copy every byte of it (the native driver); `None` where the trees
    /// are not plain directories of one filesystem (a btrfs subvolume, an overlay), whose
    /// prepare on `base` costs nothing, and nothing was made.
    ///
    /// The merge's tree then shares the base's inodes as it shares those of the layers
    /// above it, which is safe for the same reasons: `base` is committed, so nothing
    /// writes into its tree; the merge's tree is written only by the applier, which
    /// replaces files and never writes into one in place; and once committed, the
    /// merge is read-only too, each child or view of it getting its own copy.
    fn on_linked_base<'s>(
        &'s self,
        ctx: &'s Ctx,
        key: &str,
        base: &str,
    ) -> Result<Option<(Scratch<'s>, Tree)>> {
        let sn = self.snapshotter();
        let Ok(mounts) = sn.committed_mounts(ctx, base) else { return Ok(None) };
        let [m] = mounts.as_slice() else { return Ok(None) };
        if m.kind != "bind" {
            return Ok(None);
        }
        let base_dir = open_dir(&m.source)?;
        let dev = rustix::fs::fstat(&base_dir)
            .map_err(|e| Error::from(e).context(format!("stat {}", m.source)))?
            .st_dev;
        // The root of a filesystem of its own (a btrfs subvolume, a mount) is not linked
        // from: its backend's prepare on it is cheap, and links out of it cannot be made.
        match std::path::Path::new(&m.source).parent().map(rustix::fs::stat) {
            Some(Ok(parent)) if parent.st_dev == dev => {}
            _ => return Ok(None),
        }
        sn.prepare(ctx, key, None, &scratch_labels())?;
        let made = Scratch::new(sn, ctx, key.to_owned());
        let mounts = sn.mounts(ctx, key)?;
        let plain = matches!(mounts.as_slice(), [m] if m.kind == "bind");
        let tree = Tree::writable(&mounts, self.scratch_dir())?;
        let same_fs = rustix::fs::fstat(&tree.dir).is_ok_and(|st| st.st_dev == dev);
        if !plain || !same_fs {
            // Dropped, `made` removes the snapshot.
            return Ok(None);
        }
        fsutil::link_tree(&base_dir, &tree.dir)
            .map_err(|e| e.context(format!("link the tree of {base:?}")))?;
        Ok(Some((made, tree)))
    }

    /// A diff of two trees with no common layers: the change, deletions as overlay
    /// whiteouts, in a snapshot of its own that is its only layer.
    fn compare(
        &self,
        ctx: &Ctx,
        name: &str,
        lower: &str,
        upper: &str,
        labels: &Labels,
    ) -> Result<Merged> {
        let sn = self.snapshotter();
        let mut views = Views::new(sn, ctx);
        let lower_mounts = views.committed(lower)?;
        let upper_mounts = views.committed(upper)?;
        let mut mounted = Vec::new();
        let lower_fd = Tree::readable(&lower_mounts, self.scratch_dir(), &mut mounted)?;
        let upper_fd = Tree::readable(&upper_mounts, self.scratch_dir(), &mut mounted)?;
        let key = self.scratch_key("diff", name);
        sn.prepare(ctx, &key, None, &scratch_labels())?;
        let mut made = Scratch::new(sn, ctx, key.clone());
        let mounts = sn.mounts(ctx, &key)?;
        let mut tree = Tree::writable(&mounts, self.scratch_dir())?;
        // Kept as an overlay layer keeps them, whatever the backend: the deletions are
        // the point of a diff.
        tree.whiteouts = Whiteouts::Overlay { userxattr: false };
        tree.lowers.clear();
        let source = Source::Trees { lower: Some(lower_fd.as_fd()), upper: upper_fd.as_fd() };
        pipe_apply(source, &tree, false)
            .map_err(|e| e.context(format!("diff {lower:?} to {upper:?} as {name:?}")))?;
        drop(tree);
        drop((lower_fd, upper_fd));
        drop(mounted);
        views.remove_all();
        // The views held lower and upper while they were read.
        sn.commit_as(ctx, name, &key, None, labels, vec![name.to_owned()], Vec::new())?;
        made.keep();
        let info = sn.stat(ctx, name)?;
        Ok(Merged { info, layers: Vec::new(), how: "compared".into(), applied: 1 })
    }

    fn scratch_key(&self, what: &str, name: &str) -> String {
        format!("{what}-{}-{:08x} {name}", now_nanos(), crate::kv::nonce())
    }
}

/// Streams the change `source` describes into `tree` as a tar, through a pipe: the
/// diff writes on a thread of its own while the applier reads. With `links`, regular
/// files travel without their bytes and are hard-linked from the tree the diff reads
/// (copied from it where a link cannot be made): see [`apply::apply_linked`].
fn pipe_apply(source: Source<'_>, tree: &Tree, links: bool) -> Result<()> {
    pipe_apply_holding(source, tree, links, HELD_MAX)
}

/// [`pipe_apply`], keeping at most `held_max` bytes of a linked layer's stream in memory.
fn pipe_apply_holding(source: Source<'_>, tree: &Tree, links: bool, held_max: usize) -> Result<()> {
    // Without contents a layer's stream is its headers: one of a few thousand entries
    // is kept in memory and applied on this thread, which saves the two threads and
    // the pipe that cost more than a small layer's entries. A larger one streams.
    if links && let Some(stream) = hold(source, held_max)? {
        return apply_held(source, stream, tree);
    }
    stream_apply(source, tree, links)
}

/// How the applier writes into `tree`.
fn apply_options(tree: &Tree) -> ApplyOptions<'_> {
    let lowers: Vec<BorrowedFd<'_>> = tree.lowers.iter().map(AsFd::as_fd).collect();
    ApplyOptions { whiteouts: tree.whiteouts, compression: Some(Compression::None), lowers }
}

/// The tree a linked stream's regular files are linked from: the upper one the diff
/// reads.
fn link_from(source: Source<'_>) -> LinkFrom<'_> {
    match source {
        Source::Trees { upper, .. } => LinkFrom { tree: upper, overlay_layer: false },
        Source::Overlay { upper, .. } => LinkFrom { tree: upper, overlay_layer: true },
    }
}

/// The change `source` describes as a stream without file contents (headers only),
/// held in memory if it fits in `max` bytes; `None` if it does not.
fn hold(source: Source<'_>, max: usize) -> Result<Option<Vec<u8>>> {
    // Room for the headers of a few dozen files before the first growth, well under
    // what malloc would map afresh for each layer.
    let mut held = Held { bytes: Vec::with_capacity(HELD_FIRST.min(max)), max, over: false };
    match diff::diff_linked(source, &mut held) {
        Ok(_) => Ok(Some(held.bytes)),
        Err(_) if held.over => Ok(None),
        Err(e) => Err(e),
    }
}

/// Applies `stream`, held by [`hold`] from `source`, to `tree`, linking its files from
/// `source`.
fn apply_held(source: Source<'_>, stream: Vec<u8>, tree: &Tree) -> Result<()> {
    let opts = apply_options(tree);
    apply::apply_linked_bytes(tree.dir.as_fd(), stream, &opts, link_from(source)).map(drop)
}

/// Streams the change `source` describes into `tree` through a pipe: the diff writes
/// on a thread of its own while the applier reads.
fn stream_apply(source: Source<'_>, tree: &Tree, links: bool) -> Result<()> {
    let opts = apply_options(tree);
    let link_from = links.then(|| link_from(source));
    let diff_opts = DiffOptions { contents: link_from.is_none() };
    let (reader, writer) = std::io::pipe().map_err(|e| Error::from(e).context("make a pipe"))?;
    std::thread::scope(|s| {
        let writing = std::thread::Builder::new()
            .name("wasnap-merge-diff".into())
            .spawn_scoped(s, move || diff::diff_with(source, Compression::None, writer, &diff_opts))
            .map_err(|e| Error::from(e).context("start the diff thread"))?;
        // The reader is dropped when the apply ends, so a diff still writing stops.
        let reader = Box::new(reader) as Box<dyn Read + Send>;
        let applied = match link_from {
            Some(from) => apply::apply_linked(tree.dir.as_fd(), reader, &opts, from),
            None => apply::apply(tree.dir.as_fd(), reader, &opts),
        };
        let written =
            writing.join().map_err(|_| Error::internal("the diff thread of a merge panicked"))?;
        // The diff's failure first: an apply that read a stream cut short by it may
        // have ended without noticing.
        written?;
        applied.map(drop)
    })
}

/// The first room [`hold`] makes for a layer's headers.
const HELD_FIRST: usize = 32 << 10;

/// How many layers [`Layers::apply_layers`] reads ahead of the one it applies.
const AHEAD: usize = 2;

/// The most bytes of a layer's stream [`pipe_apply`] keeps in memory: the headers of
/// about ten thousand files.
const HELD_MAX: usize = 16 << 20;

/// A stream kept in memory up to `max` bytes; a write past it fails and says so.
struct Held {
    bytes: Vec<u8>,
    max: usize,
    over: bool,
}

impl std::io::Write for Held {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > self.max {
            self.over = true;
            return Err(std::io::Error::other("the layer's stream is too large to hold"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;

    use super::*;
    use crate::snapshot::Mount;

    fn tree(dir: &Path) -> Tree {
        let bind = Mount {
            kind: "bind".into(),
            source: dir.to_string_lossy().into_owned(),
            target: String::new(),
            options: vec!["rbind".into()],
        };
        Tree::writable(&[bind], dir).expect("open the target")
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut all: Vec<String> = walkdir(dir).into_iter().map(|(rel, _)| rel).collect();
        all.sort();
        all
    }

    fn walkdir(dir: &Path) -> Vec<(String, std::fs::Metadata)> {
        let mut out = Vec::new();
        let mut todo = vec![dir.to_path_buf()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).expect("read_dir") {
                let e = e.expect("entry");
                let meta = std::fs::symlink_metadata(e.path()).expect("lstat");
                if meta.is_dir() {
                    todo.push(e.path());
                }
                let rel =
                    e.path().strip_prefix(dir).expect("beneath").to_string_lossy().into_owned();
                out.push((rel, meta));
            }
        }
        out
    }

    #[test]
    fn a_linked_layer_too_large_to_hold_streams_to_the_same_tree() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let src = tmp.path().join("src");
        std::fs::create_dir_all(src.join("d/e")).expect("mkdir");
        for (i, rel) in ["a", "d/b", "d/e/c"].iter().enumerate() {
            std::fs::write(src.join(rel), vec![b'x'; 1000 * (i + 1)]).expect("write");
        }
        std::fs::hard_link(src.join("a"), src.join("d/a2")).expect("link");
        std::os::unix::fs::symlink("../a", src.join("d/s")).expect("symlink");
        let from: std::os::fd::OwnedFd = std::fs::File::open(&src).expect("open").into();
        // Held in memory (the default), and streamed through the pipe (nothing held).
        for held_max in [HELD_MAX, 0] {
            let to = tmp.path().join(format!("to-{held_max}"));
            std::fs::create_dir(&to).expect("mkdir");
            let source = Source::Trees { lower: None, upper: from.as_fd() };
            pipe_apply_holding(source, &tree(&to), true, held_max).expect("apply");
            assert_eq!(names(&to), names(&src), "held_max {held_max}");
            for (rel, meta) in walkdir(&src) {
                if meta.is_file() {
                    let linked = std::fs::metadata(to.join(&rel)).expect("stat");
                    assert_eq!(linked.ino(), meta.ino(), "{rel} is linked (held_max {held_max})");
                }
            }
        }
    }
}
