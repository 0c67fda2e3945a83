//! The backend trait: what every snapshotter under the metadata layer implements.
//!
//! Native drivers implement it directly; the wasm adapter implements it by calling a
//! guest. The metadata layer and the CLI talk only to this trait.
//!
//! A backend sees backend keys only (`<ns>/<seq>/<key>` as the metadata layer makes
//! them), never a namespace. Calls are blocking: async callers (the daemon) run them on
//! a blocking thread pool, so a backend is free to do file I/O inline.

use crate::error::Result;
use crate::filter::Filter;
use crate::snapshot::{Info, Labels, Mount, Usage};

/// The fields of [`Info`] that [`Backend::update`] may change, parsed from
/// containerd's field paths (`labels`, `labels.<key>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldPath {
    /// Replace all labels.
    Labels,
    /// Set or (when absent from the new info) delete one label.
    Label(String),
}

impl FieldPath {
    /// Parses containerd's field paths; anything but labels is invalid-argument.
    pub fn parse(path: &str, snapshot: &str) -> Result<Self> {
        if path == "labels" {
            Ok(FieldPath::Labels)
        } else if let Some(key) = path.strip_prefix("labels.") {
            Ok(FieldPath::Label(key.to_owned()))
        } else {
            Err(crate::Error::invalid_argument(format!(
                "cannot update {path:?} field on snapshot {snapshot:?}"
            )))
        }
    }

    /// Parses a list; an empty list means "replace all labels".
    pub fn parse_all(paths: &[String], snapshot: &str) -> Result<Vec<Self>> {
        if paths.is_empty() {
            return Ok(vec![FieldPath::Labels]);
        }
        paths.iter().map(|p| Self::parse(p, snapshot)).collect()
    }

    /// Applies the update described by `paths` from `new` to `current`. A label set
    /// to an empty value is removed, as containerd removes it.
    pub fn apply(paths: &[FieldPath], current: &mut Labels, new: &Labels) {
        for p in paths {
            match p {
                FieldPath::Labels => {
                    *current = crate::snapshot::without_empty(new).into_owned();
                }
                FieldPath::Label(k) => match new.get(k).filter(|v| !v.is_empty()) {
                    Some(v) => {
                        current.insert(k.clone(), v.clone());
                    }
                    None => {
                        current.remove(k);
                    }
                },
            }
        }
    }
}

/// A snapshotter with containerd's semantics, addressed by backend keys.
///
/// The contract (the conformance suite checks it):
/// - `prepare` makes an active snapshot: writable, on `parent` if given, which must be
///   committed. `view` makes a read-only one. Both fail with already-exists if the key is
///   taken and not-found if the parent is missing.
/// - `commit` turns the active snapshot `key` into the committed snapshot `name`; `key`
///   stops existing. Committing a view fails with failed-precondition (or not-found).
/// - `remove` fails with failed-precondition while the snapshot has children.
/// - `mounts` of an active snapshot are writable, of a view read-only; paths in them are
///   absolute on the host.
/// - `walk` calls `f` for every snapshot matching `filter`, in any order; an error from
///   `f` stops the walk and is returned.
/// - `cleanup` reclaims space held by removed snapshots (may be slow); `close` releases
///   resources; every call after `close` may fail with unavailable.
pub trait Backend: Send + Sync {
    /// What is known about one snapshot.
    fn stat(&self, key: &str) -> Result<Info>;

    /// Changes the labels of `info.name` as `fieldpaths` say, returning the new info.
    fn update(&self, info: &Info, fieldpaths: &[FieldPath]) -> Result<Info>;

    /// Disk space used by the snapshot itself (not its parents).
    fn usage(&self, key: &str) -> Result<Usage>;

    /// The mounts that make `key` visible.
    fn mounts(&self, key: &str) -> Result<Vec<Mount>>;

    /// Creates an active (writable) snapshot.
    fn prepare(&self, key: &str, parent: Option<&str>, labels: &Labels) -> Result<Vec<Mount>>;

    /// Creates a view (read-only) snapshot.
    fn view(&self, key: &str, parent: Option<&str>, labels: &Labels) -> Result<Vec<Mount>>;

    /// Commits the active snapshot `key` as `name`.
    fn commit(&self, name: &str, key: &str, labels: &Labels) -> Result<()>;

    /// Removes a snapshot that has no children.
    fn remove(&self, key: &str) -> Result<()>;

    /// Visits every snapshot that matches `filter`.
    fn walk(&self, filter: &Filter, f: &mut dyn FnMut(Info) -> Result<()>) -> Result<()>;

    /// Reclaims space left by removed snapshots.
    fn cleanup(&self) -> Result<()>;

    /// Releases everything the backend holds. Calling it twice is not an error.
    fn close(&self) -> Result<()>;

    /// Snapshots whose data is missing or damaged though the backend has a record of
    /// them, with what is wrong: what `wasnap gc --check` and a starting daemon report.
    /// Changes nothing. A backend that cannot tell says nothing (the default).
    fn verify(&self) -> Result<Vec<(String, String)>> {
        Ok(Vec::new())
    }

    /// Makes the committed snapshot `name` that stacks `layers` (committed snapshots,
    /// bottom first), each standing for its own change from its parent only, later
    /// layers winning (buildkit's merge). The new snapshot can be the parent of
    /// `prepare` and `view`; it holds its layers as a child holds its parent, so
    /// `remove` of one of them fails while it exists.
    ///
    /// Optional: a backend that cannot stack layers without copying them says
    /// not-implemented (the default), and the host builds the merge by applying each
    /// layer's change into a new snapshot instead.
    fn merge(&self, name: &str, layers: &[String], labels: &Labels) -> Result<()> {
        let _ = (name, layers, labels);
        Err(crate::Error::not_implemented("this backend does not stack layers; merge by copying"))
    }

    /// Whether `prepare`, `view` and `commit` stage this backend's records for the
    /// caller's transaction ([`Db::staging`](crate::kv::Db::staging)) instead of
    /// committing them: only the host's own drivers that commit in place, with their
    /// records in the root's database, do. The metadata layer then writes its record
    /// and the backend's in one transaction, so a commit needs no intent. False by
    /// default, and for every wrapper: a call that reads back what it just made must
    /// find it.
    #[doc(hidden)]
    fn stages_records(&self) -> bool {
        false
    }

    /// The labels `stat` computes when it is asked, which no update sets (overlay's
    /// `containerd.io/snapshot/overlay.upperdir`, with `upperdir_label`). The metadata
    /// layer then asks the backend's `stat` for each snapshot it shows and adds these
    /// (only these) under its own labels, as containerd's metadata layer adds its
    /// backends' labels. None by default.
    fn computed_labels(&self) -> &'static [&'static str] {
        &[]
    }
}

/// A backend in front of another: every call goes to [`Wrapper::inner`] unless the
/// wrapper overrides it. Implement this (not [`Backend`]) for middleware such as
/// fault injection, admission checks or metrics, and override only what you change.
pub trait Wrapper: Send + Sync {
    /// The backend calls are passed to.
    fn inner(&self) -> &dyn Backend;

    /// See [`Backend::stat`].
    fn stat(&self, key: &str) -> Result<Info> {
        self.inner().stat(key)
    }
    /// See [`Backend::update`].
    fn update(&self, info: &Info, fieldpaths: &[FieldPath]) -> Result<Info> {
        self.inner().update(info, fieldpaths)
    }
    /// See [`Backend::usage`].
    fn usage(&self, key: &str) -> Result<Usage> {
        self.inner().usage(key)
    }
    /// See [`Backend::mounts`].
    fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        self.inner().mounts(key)
    }
    /// See [`Backend::prepare`].
    fn prepare(&self, key: &str, parent: Option<&str>, labels: &Labels) -> Result<Vec<Mount>> {
        self.inner().prepare(key, parent, labels)
    }
    /// See [`Backend::view`].
    fn view(&self, key: &str, parent: Option<&str>, labels: &Labels) -> Result<Vec<Mount>> {
        self.inner().view(key, parent, labels)
    }
    /// See [`Backend::commit`].
    fn commit(&self, name: &str, key: &str, labels: &Labels) -> Result<()> {
        self.inner().commit(name, key, labels)
    }
    /// See [`Backend::remove`].
    fn remove(&self, key: &str) -> Result<()> {
        self.inner().remove(key)
    }
    /// See [`Backend::walk`].
    fn walk(&self, filter: &Filter, f: &mut dyn FnMut(Info) -> Result<()>) -> Result<()> {
        self.inner().walk(filter, f)
    }
    /// See [`Backend::cleanup`].
    fn cleanup(&self) -> Result<()> {
        self.inner().cleanup()
    }
    /// See [`Backend::close`].
    fn close(&self) -> Result<()> {
        self.inner().close()
    }
    /// See [`Backend::verify`].
    fn verify(&self) -> Result<Vec<(String, String)>> {
        self.inner().verify()
    }
    /// See [`Backend::merge`].
    fn merge(&self, name: &str, layers: &[String], labels: &Labels) -> Result<()> {
        self.inner().merge(name, layers, labels)
    }
    /// See [`Backend::computed_labels`].
    fn computed_labels(&self) -> &'static [&'static str] {
        self.inner().computed_labels()
    }
}

impl<W: Wrapper> Backend for W {
    fn stat(&self, key: &str) -> Result<Info> {
        Wrapper::stat(self, key)
    }
    fn update(&self, info: &Info, fieldpaths: &[FieldPath]) -> Result<Info> {
        Wrapper::update(self, info, fieldpaths)
    }
    fn usage(&self, key: &str) -> Result<Usage> {
        Wrapper::usage(self, key)
    }
    fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        Wrapper::mounts(self, key)
    }
    fn prepare(&self, key: &str, parent: Option<&str>, labels: &Labels) -> Result<Vec<Mount>> {
        Wrapper::prepare(self, key, parent, labels)
    }
    fn view(&self, key: &str, parent: Option<&str>, labels: &Labels) -> Result<Vec<Mount>> {
        Wrapper::view(self, key, parent, labels)
    }
    fn commit(&self, name: &str, key: &str, labels: &Labels) -> Result<()> {
        Wrapper::commit(self, name, key, labels)
    }
    fn remove(&self, key: &str) -> Result<()> {
        Wrapper::remove(self, key)
    }
    fn walk(&self, filter: &Filter, f: &mut dyn FnMut(Info) -> Result<()>) -> Result<()> {
        Wrapper::walk(self, filter, f)
    }
    fn cleanup(&self) -> Result<()> {
        Wrapper::cleanup(self)
    }
    fn close(&self) -> Result<()> {
        Wrapper::close(self)
    }
    fn verify(&self) -> Result<Vec<(String, String)>> {
        Wrapper::verify(self)
    }
    fn merge(&self, name: &str, layers: &[String], labels: &Labels) -> Result<()> {
        Wrapper::merge(self, name, layers, labels)
    }
    fn computed_labels(&self) -> &'static [&'static str] {
        Wrapper::computed_labels(self)
    }
}
