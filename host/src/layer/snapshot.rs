//! Layers into and out of snapshots, for every backend: applying a layer into an active
//! snapshot, diffing a snapshot against its parent into the content store, and
//! registering a layer as a committed snapshot named by its chain ID (moby's layer
//! store, containerd's unpacker).
//!
//! The tree a layer goes into is found from the snapshot's mounts, which for every
//! backend (plugins included) name host directories only:
//! - one `bind` mount: its source is the whole tree; whiteouts delete in place;
//! - an `overlay` mount with an `upperdir`: the layer goes into the upper directory,
//!   with overlay whiteouts, its lower directories consulted for missing parents;
//! - anything else (btrfs): the mounts are mounted on a private mount point under
//!   `<root>/tmp/layers` for the length of the call, and unmounted even on failure.
//!
//! A guest never parses a tar stream: the host writes into the directories it gives the
//! guest, confined beneath them ([`super::apply`]).

use std::io::{BufReader, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rustix::fs::{Mode, OFlags};
use serde::{Deserialize, Serialize};

use super::apply::{self, Applied, ApplyOptions};
use super::diff::{self, Source, Written};
use super::{Compression, Whiteouts};
use crate::content::{BlobInfo, ContentStore, Expected};
use crate::digest::Digest;
use crate::error::{Context, Error, Result};
use crate::kv::now_nanos;
use crate::metadata::lease::LABEL_GC_EXPIRE;
use crate::metadata::{Ctx, Snapshotter};
use crate::mount;
use crate::snapshot::{Kind, Labels, Mount};

/// A blob label: the digest of the blob's uncompressed tar stream (its diffID), as
/// containerd labels layer blobs.
pub const LABEL_UNCOMPRESSED: &str = "containerd.io/uncompressed";

/// How long a snapshot made for the length of one call (an extraction, a diff's view)
/// outlives a crash of the process that made it before garbage collection may take it.
const SCRATCH_EXPIRY: Duration = Duration::from_secs(3600);

/// Longest a register waits for another register's commit of the same chain to end.
const COMMIT_WAIT: Duration = Duration::from_secs(600);

/// The chain ID of a layer with diffID `diff_id` on the chain `parent` (moby's rule):
/// the bottom layer's is its diffID, every other's is
/// `sha256(<parent chain ID> + " " + <diffID>)`.
pub fn chain_id(parent: Option<&Digest>, diff_id: &Digest) -> Digest {
    match parent {
        None => *diff_id,
        Some(p) => Digest::of(format!("{p} {diff_id}").as_bytes()),
    }
}

/// The chain ID of layers with these diffIDs, bottom first.
pub fn chain_id_of(diff_ids: &[Digest]) -> Option<Digest> {
    diff_ids.iter().fold(None, |chain, d| Some(chain_id(chain.as_ref(), d)))
}

/// What a diff stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diffed {
    /// The blob, as the content store records it.
    pub blob: BlobInfo,
    /// Its media type.
    pub media_type: String,
    /// The digest of its uncompressed tar stream.
    pub diff_id: Digest,
    /// Its compression.
    pub compression: String,
    /// Tar entries written.
    pub entries: u64,
}

/// What a register did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    /// The committed snapshot's name: the layer's chain ID.
    pub chain_id: Digest,
    /// The layer's diffID.
    pub diff_id: Digest,
    /// The snapshot was made by this call (false: the chain existed already, and
    /// nothing was applied).
    pub created: bool,
    /// What the apply took, when it ran.
    pub applied: Option<AppliedSummary>,
}

/// What an apply wrote (see [`Applied`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedSummary {
    /// The uncompressed stream's digest.
    pub diff_id: Digest,
    /// Its compression.
    pub compression: String,
    /// Bytes of the uncompressed stream.
    pub size: u64,
    /// Tar entries.
    pub entries: u64,
}

impl From<&Applied> for AppliedSummary {
    fn from(a: &Applied) -> Self {
        AppliedSummary {
            diff_id: a.diff_id,
            compression: a.compression.as_str().to_owned(),
            size: a.size,
            entries: a.entries,
        }
    }
}

/// Layer operations on one snapshotter of a root.
#[derive(Debug)]
pub struct Layers<'a> {
    snapshotter: &'a Snapshotter,
    content: &'a ContentStore,
    /// Where private mount points are made.
    scratch: PathBuf,
}

impl<'a> Layers<'a> {
    /// Layer operations on `snapshotter`, storing blobs in `content`, with private mount
    /// points under `scratch` (created if missing).
    pub fn new(snapshotter: &'a Snapshotter, content: &'a ContentStore, scratch: &Path) -> Self {
        Layers { snapshotter, content, scratch: scratch.to_owned() }
    }

    /// The snapshotter these layers are on.
    pub fn snapshotter(&self) -> &'a Snapshotter {
        self.snapshotter
    }

    /// Where private mount points are made.
    pub(super) fn scratch_dir(&self) -> &Path {
        &self.scratch
    }

    /// Applies a layer (tar, gzip or zstd; detected from its bytes unless `compression`
    /// is given) into the active snapshot `key`. Returns what was applied, with the
    /// diffID. A refused entry stops the apply with nothing written outside the
    /// snapshot; what was written inside stays, and the caller removes the snapshot.
    pub fn apply(
        &self,
        ctx: &Ctx,
        key: &str,
        layer: impl Read + Send,
        compression: Option<Compression>,
    ) -> Result<Applied> {
        let info = self.snapshotter.stat(ctx, key)?;
        if info.kind != Kind::Active {
            return Err(Error::failed_precondition(format!(
                "snapshot {key:?} is a {} snapshot; a layer is applied into an active one",
                info.kind
            )));
        }
        let mounts = self.snapshotter.mounts(ctx, key)?;
        let tree = Tree::writable(&mounts, &self.scratch)?;
        let lowers: Vec<BorrowedFd<'_>> = tree.lowers.iter().map(AsFd::as_fd).collect();
        let opts = ApplyOptions { whiteouts: tree.whiteouts, compression, lowers };
        apply::apply(tree.dir.as_fd(), layer, &opts)
            .map_err(|e| e.context(format!("apply a layer into snapshot {key:?}")))
    }

    /// Writes the difference between `key` (active or committed) and its parent as a
    /// layer compressed with `compression`, stores it in the content store (held by the
    /// caller's lease, labelled with `labels` and its diffID) and returns it. An overlay
    /// snapshot's own layer directory is read directly; other backends' trees are
    /// compared with their parent's.
    pub fn diff(
        &self,
        ctx: &Ctx,
        key: &str,
        compression: Compression,
        labels: &Labels,
    ) -> Result<Diffed> {
        let mut w = self.content.writer()?;
        let written: Written = self
            .with_change(ctx, key, |source| diff::diff(source, compression, &mut w))
            .map_err(|e| e.context(format!("diff snapshot {key:?}")))?;
        let mut labels = labels.clone();
        labels.insert(LABEL_UNCOMPRESSED.to_owned(), written.diff_id.to_string());
        let expected = Expected { digest: written.digest, size: Some(written.size) };
        let blob = w.commit(ctx, Some(expected), &labels)?;
        Ok(Diffed {
            blob,
            media_type: written.media_type().to_owned(),
            diff_id: written.diff_id,
            compression: written.compression.as_str().to_owned(),
            entries: written.entries,
        })
    }

    /// Calls `f` with the change `key` (active or committed) makes to its parent, read
    /// where it is: see [`Layers::open_change`]. Views and private mounts made for it
    /// are gone when this returns.
    pub(super) fn with_change<R>(
        &self,
        ctx: &Ctx,
        key: &str,
        f: impl FnOnce(Source<'_>) -> Result<R>,
    ) -> Result<R> {
        f(self.open_change(ctx, key)?.source())
    }

    /// The change `key` (active or committed) makes to its parent, opened where it is:
    /// an overlay snapshot's own layer directory, a diff's tree (which is its change,
    /// whiteouts and all), or otherwise the trees of `key` and its parent, to be
    /// compared. What was made to reach them (views, private mounts) is undone when
    /// the [`Change`] is dropped.
    pub(super) fn open_change(&self, ctx: &Ctx, key: &str) -> Result<Change<'_>> {
        let (info, layers) = self.snapshotter.stat_with_layers(ctx, key)?;
        let mut views = Views::new(self.snapshotter, ctx);
        let upper = match info.kind {
            Kind::Active => self.snapshotter.mounts(ctx, key)?,
            Kind::Committed => views.committed(key)?,
            Kind::View => {
                return Err(Error::failed_precondition(format!(
                    "snapshot {key:?} is a view; diff an active or committed snapshot"
                )));
            }
        };
        let mut mounted = Vec::new();
        if layers == [key] {
            // A diff standing alone: its tree is the change, as an overlay layer.
            let tree = Tree::readable(&upper, &self.scratch, &mut mounted)?;
            return Ok(Change {
                lower: None,
                upper: tree,
                overlay: Some(false),
                _mounted: mounted,
                _views: views,
            });
        }
        let lower = match &info.parent {
            Some(p) => Some(views.committed(p)?),
            None => None,
        };
        let (lower, upper, overlay) = match overlay_own_layer(&upper, lower.as_deref()) {
            Some((dir, userxattr)) => (None, open_dir(&dir)?, Some(userxattr)),
            None => {
                let upper_fd = Tree::readable(&upper, &self.scratch, &mut mounted)?;
                let lower_fd = match &lower {
                    Some(m) => Some(Tree::readable(m, &self.scratch, &mut mounted)?),
                    None => None,
                };
                (lower_fd, upper_fd, None)
            }
        };
        Ok(Change { lower, upper, overlay, _mounted: mounted, _views: views })
    }

    /// Disk usage of `key` itself and, if it is mapped to a blob, the blob's size
    /// added (buildkit's usage with its blob).
    pub fn usage_with_blob(&self, ctx: &Ctx, key: &str) -> Result<crate::snapshot::Usage> {
        let mut usage = self.snapshotter.usage(ctx, key)?;
        if let Some(blob) = self.snapshotter.blob(ctx, key)? {
            usage.size = usage.size.saturating_add(self.content.info(ctx, &blob)?.size);
        }
        Ok(usage)
    }

    /// Makes the layer blob `blob` (in the caller's namespace's content) a committed
    /// snapshot named by its chain ID on the chain `parent`, mapped to the blob, with
    /// `labels`. An existing chain is reused without applying anything (its diffID is
    /// known from the blob's `containerd.io/uncompressed` label or `diff_id`), and
    /// concurrent registers of one chain make it once. The caller's lease, if any,
    /// holds the snapshot; without one it is kept until removed.
    pub fn register(
        &self,
        ctx: &Ctx,
        blob: &Digest,
        diff_id: Option<&Digest>,
        parent: Option<&Digest>,
        labels: &Labels,
    ) -> Result<Registered> {
        let info = self.content.info(ctx, blob)?;
        let labelled = match info.labels.get(LABEL_UNCOMPRESSED) {
            Some(v) => Some(Digest::parse(v).context("blob label containerd.io/uncompressed")?),
            None => None,
        };
        let known = diff_id.copied().or(labelled);
        if let (Some(given), Some(l)) = (diff_id, labelled)
            && *given != l
        {
            return Err(Error::failed_precondition(format!(
                "blob {blob} is labelled with diffID {l}, not {given}"
            )));
        }
        if let Some(d) = known {
            let chain = chain_id(parent, &d);
            if let Some(found) = self.existing_chain(ctx, &chain, blob)? {
                return Ok(Registered {
                    chain_id: chain,
                    diff_id: d,
                    created: false,
                    applied: found,
                });
            }
        }

        let key = format!("extract-{}-{:08x} {blob}", now_nanos(), crate::kv::nonce());
        let parent_key = parent.map(Digest::to_string);
        self.snapshotter.prepare(ctx, &key, parent_key.as_deref(), &scratch_labels())?;
        let mut extraction = Scratch { snapshotter: self.snapshotter, ctx, key: Some(key) };
        let key = extraction.key.clone().unwrap_or_default();

        let (_, file) = self.content.read(ctx, blob)?;
        let applied = self.apply(ctx, &key, BufReader::with_capacity(1 << 20, file), None)?;
        if let Some(d) = known
            && d != applied.diff_id
        {
            return Err(Error::failed_precondition(format!(
                "blob {blob}: its layer's diffID is {}, not the expected {d}",
                applied.diff_id
            )));
        }
        if labelled.is_none() {
            let mut labels = info.labels.clone();
            labels.insert(LABEL_UNCOMPRESSED.to_owned(), applied.diff_id.to_string());
            self.content.set_labels(ctx, blob, &labels)?;
        }
        let chain = chain_id(parent, &applied.diff_id);
        // Mapped before the commit, which carries the mapping over atomically: a crash
        // never leaves a registered chain without its blob.
        self.snapshotter.set_blob(ctx, &key, blob)?;
        let chain_key = chain.to_string();
        let waiting = std::time::Instant::now();
        let created = loop {
            match self.snapshotter.commit(ctx, &chain_key, &key, labels) {
                Ok(()) => {
                    extraction.key = None;
                    break true;
                }
                // Another register of the same chain got there first: use its snapshot
                // once its commit has ended, or commit ours if that one was undone.
                Err(e) if e.is_already_exists() => match self.snapshotter.stat(ctx, &chain_key) {
                    Ok(info) if info.kind == Kind::Committed => break false,
                    Ok(info) => {
                        return Err(Error::failed_precondition(format!(
                            "snapshot {chain} exists but is a {} snapshot, not a registered layer",
                            info.kind
                        )));
                    }
                    Err(s) if s.is_not_found() && waiting.elapsed() < COMMIT_WAIT => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(s) if s.is_not_found() => {
                        return Err(Error::unavailable(format!(
                            "another commit of chain {chain} has not ended in {COMMIT_WAIT:?}"
                        )));
                    }
                    Err(s) => return Err(s),
                },
                Err(e) => return Err(e),
            }
        };
        drop(extraction);
        if !created {
            self.map_blob(ctx, &chain, blob)?;
        }
        if !created {
            self.snapshotter.hold(ctx, &chain.to_string())?;
        }
        Ok(Registered {
            chain_id: chain,
            diff_id: applied.diff_id,
            created,
            applied: Some(AppliedSummary::from(&applied)),
        })
    }

    /// If the chain `chain` exists (committed), holds it for the caller's lease, maps it
    /// to `blob` if it has no blob yet, and says so.
    fn existing_chain(
        &self,
        ctx: &Ctx,
        chain: &Digest,
        blob: &Digest,
    ) -> Result<Option<Option<AppliedSummary>>> {
        match self.snapshotter.stat(ctx, &chain.to_string()) {
            Ok(info) if info.kind == Kind::Committed => {
                self.snapshotter.hold(ctx, &chain.to_string())?;
                self.map_blob(ctx, chain, blob)?;
                Ok(Some(None))
            }
            Ok(info) => Err(Error::failed_precondition(format!(
                "snapshot {chain} exists but is a {} snapshot, not a registered layer",
                info.kind
            ))),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Maps the chain's snapshot to `blob`, unless it is mapped to another blob already
    /// (the same layer compressed differently): the first mapping stays.
    fn map_blob(&self, ctx: &Ctx, chain: &Digest, blob: &Digest) -> Result<()> {
        match self.snapshotter.set_blob(ctx, &chain.to_string(), blob) {
            Err(e) if e.kind() == crate::ErrorKind::FailedPrecondition => {
                tracing::debug!(%chain, %blob, error = %e, "chain keeps its first blob");
                Ok(())
            }
            other => other,
        }
    }
}

/// Labels of a snapshot made for one call: collectable an hour after a crash left it.
pub(super) fn scratch_labels() -> Labels {
    let expires = SystemTime::now() + SCRATCH_EXPIRY;
    Labels::from([(LABEL_GC_EXPIRE.to_owned(), humantime::format_rfc3339(expires).to_string())])
}

/// A snapshot made for one call, removed when dropped unless `key` was taken.
pub(super) struct Scratch<'a> {
    snapshotter: &'a Snapshotter,
    ctx: &'a Ctx,
    key: Option<String>,
}

impl<'a> Scratch<'a> {
    pub(super) fn new(snapshotter: &'a Snapshotter, ctx: &'a Ctx, key: String) -> Self {
        Scratch { snapshotter, ctx, key: Some(key) }
    }

    /// The snapshot was taken (committed under another name): nothing to remove.
    pub(super) fn keep(&mut self) {
        self.key = None;
    }
}

impl Drop for Scratch<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take()
            && let Err(e) = self.snapshotter.remove(self.ctx, &key)
        {
            tracing::warn!(key, error = %e,
                "could not remove a snapshot made for one call; garbage collection will");
        }
    }
}

/// A snapshot's change, open for reading ([`Layers::open_change`]). Dropped, it closes
/// its trees, then unmounts what was mounted for them, then removes the views made for
/// them (the fields' order).
pub(super) struct Change<'a> {
    lower: Option<OwnedFd>,
    upper: OwnedFd,
    /// An overlay layer (with whether its whiteouts are `userxattr` ones), rather than
    /// two trees to compare.
    overlay: Option<bool>,
    _mounted: Vec<TempMount>,
    _views: Views<'a>,
}

impl Change<'_> {
    /// The change, as the diff reads it.
    pub(super) fn source(&self) -> Source<'_> {
        match self.overlay {
            Some(userxattr) => Source::Overlay { upper: self.upper.as_fd(), userxattr },
            None => Source::Trees {
                lower: self.lower.as_ref().map(AsFd::as_fd),
                upper: self.upper.as_fd(),
            },
        }
    }
}

/// Views made for a diff, removed when dropped.
pub(super) struct Views<'a> {
    snapshotter: &'a Snapshotter,
    ctx: Ctx,
    keys: Vec<String>,
}

impl<'a> Views<'a> {
    pub(super) fn new(snapshotter: &'a Snapshotter, ctx: &Ctx) -> Self {
        // Views of the caller's namespace, but not held by its lease: they are removed
        // at the end of the call, or collected after a crash.
        Views { snapshotter, ctx: ctx.clone().with_lease(None), keys: Vec::new() }
    }

    pub(super) fn view(&mut self, of: &str) -> Result<Vec<Mount>> {
        let key = format!("diff-{}-{:08x}-{}", now_nanos(), crate::kv::nonce(), self.keys.len());
        let mounts = self.snapshotter.view(&self.ctx, &key, Some(of), &scratch_labels())?;
        self.keys.push(key);
        Ok(mounts)
    }

    /// What the committed snapshot `of` shows: its own read-only mounts, read in place
    /// (a native snapshot's tree is not copied), or a view where the backend does not
    /// mount committed snapshots.
    pub(super) fn committed(&mut self, of: &str) -> Result<Vec<Mount>> {
        match self.snapshotter.committed_mounts(&self.ctx, of) {
            Ok(mounts) => Ok(mounts),
            Err(e) if e.is_not_found() => Err(e),
            Err(e) => {
                tracing::debug!(key = of, error = %e, "no mounts of a committed snapshot; a view instead");
                self.view(of)
            }
        }
    }

    pub(super) fn remove_all(&mut self) {
        for key in self.keys.drain(..).rev() {
            if let Err(e) = self.snapshotter.remove(&self.ctx, &key) {
                tracing::warn!(key, error = %e,
                    "could not remove a view made for a diff; garbage collection will");
            }
        }
    }
}

impl Drop for Views<'_> {
    fn drop(&mut self) {
        self.remove_all();
    }
}

/// If `upper` is an overlay whose own layer sits directly on `lower`'s layers, that
/// layer's directory (an overlay upper directory, whiteouts and all) and whether the
/// mount uses `userxattr`.
fn overlay_own_layer(upper: &[Mount], lower: Option<&[Mount]>) -> Option<(String, bool)> {
    let [m] = upper else { return None };
    if m.kind != "overlay" {
        return None;
    }
    let userxattr = m.options.iter().any(|o| o == "userxattr");
    let lowers = mount::overlay_lowerdirs(&m.options);
    let below: Vec<&str> = match lower {
        None => Vec::new(),
        Some([l]) if l.kind == "overlay" => mount::overlay_lowerdirs(&l.options),
        Some([l]) if l.kind == "bind" => vec![l.source.as_str()],
        Some(_) => return None,
    };
    if let Some(upperdir) = m.options.iter().find_map(|o| o.strip_prefix("upperdir=")) {
        // An active snapshot: its upper directory is its own layer.
        return (lowers == below).then(|| (upperdir.to_owned(), userxattr));
    }
    match lowers.split_first() {
        Some((own, rest)) if *rest == below[..] => Some(((*own).to_owned(), userxattr)),
        _ => None,
    }
}

pub(super) fn open_dir(path: &str) -> Result<OwnedFd> {
    rustix::fs::open(
        path,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
    )
    .map_err(|e| Error::from(std::io::Error::from(e)).context(format!("open directory {path}")))
}

/// A snapshot's tree, reachable through a directory descriptor.
pub(super) struct Tree {
    pub(super) dir: OwnedFd,
    pub(super) whiteouts: Whiteouts,
    pub(super) lowers: Vec<OwnedFd>,
    /// Dropped after `dir`, unmounting what was mounted for the call.
    _mounted: Option<TempMount>,
}

impl Tree {
    /// Where a layer goes, for an active snapshot's `mounts`.
    pub(super) fn writable(mounts: &[Mount], scratch: &Path) -> Result<Tree> {
        match mounts {
            [m] if m.kind == "bind" => Ok(Tree {
                dir: open_dir(&m.source)?,
                whiteouts: Whiteouts::Delete,
                lowers: Vec::new(),
                _mounted: None,
            }),
            [m] if m.kind == "overlay" => {
                let upper = m.options.iter().find_map(|o| o.strip_prefix("upperdir=")).ok_or_else(
                    || {
                        Error::failed_precondition(
                            "an overlay mount without an upperdir is read-only",
                        )
                    },
                )?;
                let lowers = mount::overlay_lowerdirs(&m.options)
                    .into_iter()
                    .map(open_dir)
                    .collect::<Result<Vec<_>>>()?;
                let userxattr = m.options.iter().any(|o| o == "userxattr");
                Ok(Tree {
                    dir: open_dir(upper)?,
                    whiteouts: Whiteouts::Overlay { userxattr },
                    lowers,
                    _mounted: None,
                })
            }
            _ => {
                let at = TempMount::new(mounts, scratch)?;
                let dir = open_dir(&at.path.to_string_lossy())?;
                Ok(Tree {
                    dir,
                    whiteouts: Whiteouts::Delete,
                    lowers: Vec::new(),
                    _mounted: Some(at),
                })
            }
        }
    }

    /// A descriptor of the whole tree `mounts` show, mounting them under `scratch` if
    /// they are not one bind mount (kept mounted while `mounted` lives).
    pub(super) fn readable(
        mounts: &[Mount],
        scratch: &Path,
        mounted: &mut Vec<TempMount>,
    ) -> Result<OwnedFd> {
        match mounts {
            [m] if m.kind == "bind" => open_dir(&m.source),
            _ => {
                let at = TempMount::new(mounts, scratch)?;
                let dir = open_dir(&at.path.to_string_lossy())?;
                mounted.push(at);
                Ok(dir)
            }
        }
    }
}

/// A private mount point with `mounts` on it, unmounted and removed when dropped.
#[derive(Debug)]
pub(super) struct TempMount {
    path: PathBuf,
}

impl TempMount {
    fn new(mounts: &[Mount], scratch: &Path) -> Result<TempMount> {
        std::fs::create_dir_all(scratch)
            .with_context(|| format!("create {}", scratch.display()))?;
        let path = scratch.join(format!("{}-{:08x}", now_nanos(), crate::kv::nonce()));
        std::fs::create_dir(&path).with_context(|| format!("create {}", path.display()))?;
        if let Err(e) = mount::mount_all(mounts, &path) {
            let _ = std::fs::remove_dir(&path);
            return Err(e);
        }
        Ok(TempMount { path })
    }
}

impl Drop for TempMount {
    fn drop(&mut self) {
        if let Err(e) = mount::unmount(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "unmount failed; detaching");
            let _ = mount::detach(&self.path);
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_moby() {
        let a = Digest::of(b"layer a");
        let b = Digest::of(b"layer b");
        assert_eq!(chain_id(None, &a), a);
        let ab = chain_id(Some(&a), &b);
        assert_eq!(ab, Digest::of(format!("{a} {b}").as_bytes()));
        assert_eq!(chain_id_of(&[a, b]), Some(ab));
        assert_eq!(chain_id_of(&[]), None);
    }

    fn overlay(opts: &[&str]) -> Mount {
        Mount {
            kind: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options: opts.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    fn bind(src: &str) -> Mount {
        Mount {
            kind: "bind".into(),
            source: src.into(),
            target: String::new(),
            options: vec!["rbind".into(), "ro".into()],
        }
    }

    #[test]
    fn an_overlay_layer_is_read_directly_only_when_it_sits_on_its_parent() {
        let view_x = [overlay(&["lowerdir=/l/x:/l/p"])];
        assert_eq!(
            overlay_own_layer(&view_x, Some(&[bind("/l/p")])),
            Some(("/l/x".to_owned(), false))
        );
        let view_p = [overlay(&["lowerdir=/l/p:/l/q"])];
        let view_x3 = [overlay(&["userxattr", "lowerdir=/l/x:/l/p:/l/q"])];
        assert_eq!(overlay_own_layer(&view_x3, Some(&view_p)), Some(("/l/x".to_owned(), true)));
        // Not the parent's layers below: compare trees.
        assert_eq!(overlay_own_layer(&view_x, Some(&[bind("/l/other")])), None);
        let active = [overlay(&["upperdir=/l/a/fs", "workdir=/l/a/work", "lowerdir=/l/p"])];
        assert_eq!(
            overlay_own_layer(&active, Some(&[bind("/l/p")])),
            Some(("/l/a/fs".to_owned(), false))
        );
        // A bind mount is a whole tree, never a layer.
        assert_eq!(overlay_own_layer(&[bind("/l/x")], None), None);
    }
}
