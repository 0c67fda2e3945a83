//! What every native driver shares: the layout of its directory and one crash-safe
//! protocol for building, installing, removing and reclaiming a snapshot's data,
//! whether that data is a directory tree (native, overlay) or a subvolume (btrfs).
//!
//! ```text
//! snapshots/<id>     one entry per snapshot: a tree or a subvolume
//! tmp/               entries being built or deleted; anything here after a crash is garbage
//! spare/             blank entries made ahead for creates (overlay); emptied at open
//! ```
//!
//! **Build.** An entry is built in `tmp/` under a name that is marked busy, then renamed
//! to `snapshots/<id>` (its id marked busy from before the rename), then recorded. If
//! the record cannot be written the entry is deleted. So at every moment an entry that
//! no record names is either busy or garbage.
//!
//! **Remove.** The record goes first; then the entry is deleted, or renamed into `tmp/`
//! for the background to delete. A crash in between leaves an entry no record names.
//!
//! **Reclaim.** Lists `snapshots/` and `tmp/`, then reads what is busy, then the ids the
//! records name, and deletes every entry that is neither. That order is what makes it
//! safe beside running creates: a busy mark is dropped only after its record is written,
//! so an entry missed as busy is seen as recorded.
//!
//! **Spares.** A driver whose new entry needs nothing of its parent to be made (overlay:
//! two empty directories, then the upper one given its parent's owner) has the
//! background thread keep a few of them made in `spare/`, so that a create renames one
//! into place instead of making it on the call's path (three `mkdir`s: ~40 µs on tmpfs,
//! 0.25–1 ms on this machine's ext4). A create finds the pool empty under load and
//! builds its entry as before. Only this process's pool names what is in `spare/`, and
//! reclaim never looks there: the directory is emptied when the layout opens, and its
//! pool deleted when it closes.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use cap_std::fs::Dir;

use crate::driver::storage::{Snap, Store};
use crate::error::{Context, Error, Result};
use crate::fault::Faults;
use crate::snapshot::{Info, Kind, Labels, Mount, Usage};

pub(crate) const SNAPSHOTS: &str = "snapshots";
/// Layers with more inodes than this are synced with one `syncfs` at commit.
const PER_FILE_SYNC_MAX: u64 = 256;
pub(crate) const TMP: &str = "tmp";
pub(crate) const SPARE: &str = "spare";
/// Blank entries the background thread keeps ready, refilling once half are taken:
/// enough for a burst of creates from several clients between its turns.
const SPARES: usize = 8;
/// How long the background thread waits before it tries again to make a spare, after
/// one failed (a full disk, say); creates meanwhile build their entries themselves and
/// meet the error, if it lasts.
const SPARE_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// Makes a blank entry `name` in a directory: one that needs nothing of a parent (see
/// the module documentation, "Spares").
pub(crate) type Blank = fn(&Dir, &str) -> Result<()>;

/// How a driver makes and unmakes the entry behind a snapshot.
pub(crate) trait Entries: Send + Sync + std::fmt::Debug {
    /// Deletes the entry `name` in `dir`, whatever it is (a tree, a subvolume, a stray
    /// file). Missing is not-found.
    fn delete(&self, dir: &Dir, name: &str) -> Result<()>;

    /// [`Entries::delete`], where gone already is fine.
    fn delete_if_there(&self, dir: &Dir, name: &str) -> Result<()> {
        match self.delete(dir, name) {
            Err(e) if !e.is_not_found() => Err(e),
            _ => Ok(()),
        }
    }

    /// Makes the entry `name` in `dir` read-only, once it is in place (a btrfs view or
    /// commit: the kernel renames only writable subvolumes). Nothing by default.
    fn seal(&self, _dir: &Dir, _name: &str) -> Result<()> {
        Ok(())
    }
}

/// A driver on this layout: only what differs between drivers. Every backend call is
/// answered for all of them alike, by [`on_layout!`], so a rule about records, kinds,
/// usage or removal is written once.
pub(crate) trait OnLayout: Send + Sync + std::fmt::Debug {
    /// Where a snapshot's tree is inside its entry: `""` (the entry itself) or the name
    /// of a subdirectory.
    const TREE: &'static str;

    /// Whether a commit only changes the record ([`Layout::commit_in_place`]), never
    /// moving the data ([`Layout::commit_moved`]): such a driver stages its records
    /// for the metadata's transaction ([`Backend::stages_records`]).
    ///
    /// [`Backend::stages_records`]: crate::backend::Backend::stages_records
    const COMMITS_IN_PLACE: bool;

    fn layout(&self) -> &Layout;

    /// Makes a new snapshot's entry as `tmp/<tmp>`: empty, or from its parent (the
    /// parent's key and record).
    fn build_entry(&self, tmp: &str, parent: Option<(&str, &Snap)>) -> Result<()>;

    /// Finishes the blank entry `name` in `dir` (made by the driver's [`Blank`], given
    /// to [`Layout::open`]) as a new snapshot's, on its parent if any. Only a driver
    /// with spares is asked.
    fn adopt(&self, _dir: &Dir, name: &str, _parent: Option<(&str, &Snap)>) -> Result<()> {
        Err(Error::internal(format!(
            "the {} driver keeps no blank entries, yet was given {SPARE}/{name}",
            self.layout().name
        )))
    }

    /// Whether an entry of this kind is sealed (made read-only) once in place.
    fn seals(&self, _kind: Kind) -> bool {
        false
    }

    /// The mounts of a recorded snapshot.
    fn mounts_for(&self, snap: &Snap) -> Result<Vec<Mount>>;

    /// Commits the active snapshot `key` (checked to be active) as `name`.
    fn commit_active(&self, name: &str, key: &str, active: &Snap, labels: &Labels) -> Result<()>;

    /// When a removed snapshot's data is deleted.
    fn deletion(&self) -> Deletion;

    /// A stored record as callers see it (overlay adds a computed label).
    fn present(&self, info: Info, _id: u64) -> Info {
        info
    }

    /// Labels that are computed by [`OnLayout::present`], never stored.
    fn computed_labels(&self) -> &'static [&'static str] {
        &[]
    }

    /// Whether [`OnLayout::present`] adds any of them, as configured.
    fn computes_labels(&self) -> bool {
        false
    }

    /// [`Backend::merge`](crate::backend::Backend::merge): not-implemented unless the
    /// driver stacks layers.
    fn merge(&self, _name: &str, _layers: &[String], _labels: &Labels) -> Result<()> {
        Err(Error::not_implemented(format!(
            "the {} driver does not stack layers; merge by copying",
            self.layout().name
        )))
    }
}

/// The backend calls every driver on this layout answers alike; [`on_layout!`] makes a
/// driver's `Backend` impl of them.
pub(crate) mod answer {
    use super::{Layout, OnLayout};
    use crate::backend::FieldPath;
    use crate::error::{Error, Result};
    use crate::filter::Filter;
    use crate::fsutil;
    use crate::snapshot::{Info, Kind, Labels, Mount, Usage};

    pub fn stat<D: OnLayout>(d: &D, key: &str) -> Result<Info> {
        let l = d.layout();
        l.check_open()?;
        let (info, snap) = l.store.get(key)?;
        Ok(d.present(info, snap.id))
    }

    pub fn update<D: OnLayout>(d: &D, info: &Info, fieldpaths: &[FieldPath]) -> Result<Info> {
        let l = d.layout();
        l.check_open()?;
        let mut info = info.clone();
        for label in d.computed_labels() {
            info.labels.remove(*label);
        }
        let (updated, id) = l.store.update(&info, fieldpaths)?;
        Ok(d.present(updated, id))
    }

    pub fn usage<D: OnLayout>(d: &D, key: &str) -> Result<Usage> {
        let l: &Layout = d.layout();
        l.usage(key, |id| {
            let entry = fsutil::open_dir_nofollow(&l.snapshots, &id.to_string())?;
            match D::TREE {
                "" => fsutil::disk_usage(&entry),
                tree => fsutil::disk_usage(&fsutil::open_dir_nofollow(&entry, tree)?),
            }
        })
    }

    pub fn create<D: OnLayout>(
        d: &D,
        kind: Kind,
        key: &str,
        parent: Option<&str>,
        labels: &Labels,
    ) -> Result<Vec<Mount>> {
        let l = d.layout();
        let snap = l.build(kind, key, parent, labels, d.seals(kind), |tmp, p| {
            if tmp.is_spare() {
                d.adopt(l.dir_of(tmp), tmp.name(), parent.zip(p))
            } else {
                d.build_entry(tmp.name(), parent.zip(p))
            }
        })?;
        // Mounts can fail (overlay may have to flatten a deep chain): then the create
        // fails whole, leaving nothing behind.
        d.mounts_for(&snap).inspect_err(|_| {
            let _ = d.layout().remove(key, super::Deletion::Now);
        })
    }

    pub fn mounts<D: OnLayout>(d: &D, key: &str) -> Result<Vec<Mount>> {
        let l = d.layout();
        l.check_open()?;
        let (_, snap) = l.store.get(key)?;
        d.mounts_for(&snap)
    }

    pub fn commit<D: OnLayout>(d: &D, name: &str, key: &str, labels: &Labels) -> Result<()> {
        let l = d.layout();
        l.check_open()?;
        let (info, snap) = l.store.get(key)?;
        if info.kind != Kind::Active {
            return Err(Error::failed_precondition(format!("snapshot {key:?} is not active")));
        }
        d.commit_active(name, key, &snap, labels)
    }

    pub fn walk<D: OnLayout>(
        d: &D,
        filter: &Filter,
        f: &mut dyn FnMut(Info) -> Result<()>,
    ) -> Result<()> {
        let l = d.layout();
        l.check_open()?;
        l.store.walk(&mut |info, id| {
            let info = d.present(info, id);
            if filter.matches(&info) { f(info) } else { Ok(()) }
        })
    }
}

/// Implements `Backend` for a driver from its [`OnLayout`] impl, with [`answer`]'s
/// calls. (A macro, not a blanket impl: that would overlap the one for `Wrapper`.)
macro_rules! on_layout {
    ($driver:ty) => {
        impl $crate::backend::Backend for $driver {
            fn stat(&self, key: &str) -> $crate::error::Result<$crate::snapshot::Info> {
                $crate::driver::layout::answer::stat(self, key)
            }
            fn update(
                &self,
                info: &$crate::snapshot::Info,
                paths: &[$crate::backend::FieldPath],
            ) -> $crate::error::Result<$crate::snapshot::Info> {
                $crate::driver::layout::answer::update(self, info, paths)
            }
            fn usage(&self, key: &str) -> $crate::error::Result<$crate::snapshot::Usage> {
                $crate::driver::layout::answer::usage(self, key)
            }
            fn mounts(&self, key: &str) -> $crate::error::Result<Vec<$crate::snapshot::Mount>> {
                $crate::driver::layout::answer::mounts(self, key)
            }
            fn prepare(
                &self,
                key: &str,
                parent: Option<&str>,
                l: &$crate::snapshot::Labels,
            ) -> $crate::error::Result<Vec<$crate::snapshot::Mount>> {
                $crate::driver::layout::answer::create(
                    self,
                    $crate::snapshot::Kind::Active,
                    key,
                    parent,
                    l,
                )
            }
            fn view(
                &self,
                key: &str,
                parent: Option<&str>,
                l: &$crate::snapshot::Labels,
            ) -> $crate::error::Result<Vec<$crate::snapshot::Mount>> {
                $crate::driver::layout::answer::create(
                    self,
                    $crate::snapshot::Kind::View,
                    key,
                    parent,
                    l,
                )
            }
            fn commit(
                &self,
                name: &str,
                key: &str,
                labels: &$crate::snapshot::Labels,
            ) -> $crate::error::Result<()> {
                $crate::driver::layout::answer::commit(self, name, key, labels)
            }
            fn remove(&self, key: &str) -> $crate::error::Result<()> {
                self.layout().remove(key, self.deletion())
            }
            fn walk(
                &self,
                filter: &$crate::filter::Filter,
                f: &mut dyn FnMut($crate::snapshot::Info) -> $crate::error::Result<()>,
            ) -> $crate::error::Result<()> {
                $crate::driver::layout::answer::walk(self, filter, f)
            }
            fn cleanup(&self) -> $crate::error::Result<()> {
                self.layout().reclaim()
            }
            fn close(&self) -> $crate::error::Result<()> {
                self.layout().close();
                Ok(())
            }
            fn verify(&self) -> $crate::error::Result<Vec<(String, String)>> {
                self.layout().verify(<$driver as $crate::driver::layout::OnLayout>::TREE)
            }
            fn merge(
                &self,
                name: &str,
                layers: &[String],
                labels: &$crate::snapshot::Labels,
            ) -> $crate::error::Result<()> {
                self.layout().check_open()?;
                <$driver as $crate::driver::layout::OnLayout>::merge(self, name, layers, labels)
            }
            fn stages_records(&self) -> bool {
                <$driver as $crate::driver::layout::OnLayout>::COMMITS_IN_PLACE
                    && self.layout().store.defers()
            }
            fn computed_labels(&self) -> &'static [&'static str] {
                use $crate::driver::layout::OnLayout;
                match <$driver as OnLayout>::computes_labels(self) {
                    true => <$driver as OnLayout>::computed_labels(self),
                    false => &[],
                }
            }
        }
    };
}
pub(crate) use on_layout;

/// When a removed snapshot's data is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Deletion {
    /// Before `remove` returns.
    Now,
    /// By a background thread, soon after `remove` returns.
    Background,
    /// By the next `cleanup` (containerd's asynchronous remove).
    AtCleanup,
}

/// A driver's directory, its records, its fault points and its busy marks.
#[derive(Debug)]
pub(crate) struct Layout {
    /// `snapshots/`, opened once.
    pub snapshots: Dir,
    /// `tmp/`, opened once.
    pub tmp: Dir,
    /// `spare/` and what makes its entries, for a driver that keeps spares.
    spare: Option<(Dir, Blank)>,
    /// The same directory as `dir`, as a host path: used only to build mount sources,
    /// which callers outside the process need.
    pub path: PathBuf,
    pub store: Store,
    entries: Arc<dyn Entries>,
    faults: Arc<Faults>,
    /// The driver's name, for messages and fault point names (`<name>.create.…`).
    pub name: &'static str,
    closed: AtomicBool,
    /// Sync a layer's data before its commit is recorded (see [`Layout::settle`]).
    sync_commits: AtomicBool,
    tmp_seq: AtomicU64,
    busy: Arc<Mutex<Busy>>,
    /// The background thread's work: entries renamed into `tmp/` by removes, to
    /// delete, and the pool of spares.
    doomed: Arc<Doomed>,
    /// The background thread, joined by [`Layout::close`] so that nothing uses the
    /// layout (its database among it) once that returns.
    deleter: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// This layout, for the deletion a staged remove leaves until its record's
    /// removal commits (set with the deleter).
    me: std::sync::OnceLock<std::sync::Weak<Layout>>,
}

/// A layout dropped without [`Layout::close`] still stops its deleter, which would
/// otherwise wait for work forever.
impl Drop for Layout {
    fn drop(&mut self) {
        self.stop_deleter();
    }
}

/// Names in `tmp/` and ids in `snapshots/` this process is working on right now.
#[derive(Debug, Default)]
struct Busy {
    tmp: HashSet<String>,
    ids: HashSet<u64>,
}

/// A busy mark, dropped when the work is done.
#[derive(Debug)]
pub(crate) struct Mark {
    what: Marked,
    busy: Arc<Mutex<Busy>>,
}

#[derive(Debug)]
enum Marked {
    Tmp(String),
    /// A spare in `spare/`, which reclaim never looks at: held, not marked busy.
    Spare(String),
    Id(u64),
}

impl Mark {
    /// The name in `tmp/` (or `spare/`) this mark holds (empty for an id mark).
    pub fn name(&self) -> &str {
        match &self.what {
            Marked::Tmp(n) | Marked::Spare(n) => n,
            Marked::Id(_) => "",
        }
    }

    /// Whether this is a blank entry in `spare/` (see [`Layout::dir_of`]).
    pub fn is_spare(&self) -> bool {
        matches!(self.what, Marked::Spare(_))
    }
}

impl std::fmt::Display for Mark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.what {
            Marked::Tmp(n) => write!(f, "{TMP}/{n}"),
            Marked::Spare(n) => write!(f, "{SPARE}/{n}"),
            Marked::Id(id) => write!(f, "{SNAPSHOTS}/{id}"),
        }
    }
}

impl Drop for Mark {
    fn drop(&mut self) {
        if self.is_spare() {
            return;
        }
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        match &self.what {
            Marked::Tmp(n) => busy.tmp.remove(n),
            Marked::Id(id) => busy.ids.remove(id),
            Marked::Spare(_) => false,
        };
    }
}

/// The background thread's work, and what it tells others.
#[derive(Debug, Default)]
struct Doomed {
    queue: Mutex<Queue>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct Queue {
    /// Entries waiting in `tmp/` to be deleted.
    doomed: Vec<Mark>,
    /// The layout is closed: the thread stops.
    closed: bool,
    /// The thread is deleting a batch it took (which [`Layout::reclaim`] waits for, so
    /// that what was removed before it is gone after it).
    deleting: bool,
    /// Blank entries ready in `spare/`, oldest first.
    spares: std::collections::VecDeque<Mark>,
}

/// How much nicer than the daemon the background deleter runs while it keeps up.
/// Deleting a removed tree is nobody's call: at the daemon's own priority the deleter,
/// woken by a remove just before that remove answers, took the free core first and
/// delayed the answer (perf sched: 38 µs of a ~200 µs remove at 1 client).
const DELETER_NICER: i32 = 10;

/// Removed entries waiting at once that mean the deleter is falling behind (the
/// machine busy with calls for a long while): it deletes them at the daemon's own
/// priority, so that space comes back, and is nicer again once it catches up.
const DELETER_BEHIND: usize = 256;

/// The niceness the deleter asks for with `backlog` entries to delete, when the
/// process runs at `base`.
fn deleter_nice(base: i32, backlog: usize) -> i32 {
    if backlog >= DELETER_BEHIND { base } else { (base + DELETER_NICER).min(19) }
}

/// Sets the calling thread's niceness (Linux: `setpriority` of a thread id acts on that
/// thread alone) once `want` differs from what it asked for last. Going back to the
/// process's niceness may be refused to an unprivileged process; then it stays nicer.
fn renice(asked: &mut Option<i32>, want: i32) {
    if *asked == Some(want) {
        return;
    }
    *asked = Some(want);
    if let Err(e) = rustix::process::setpriority_process(None, want) {
        tracing::debug!(nice = want, error = %e, "the background deleter keeps its priority");
    }
}

/// The background thread: deletes removed entries and keeps the pool of spares filled.
struct Worker {
    tmp: Dir,
    /// `spare/` and what makes its entries, for a driver that keeps spares.
    spare: Option<(Dir, Blank)>,
    entries: Arc<dyn Entries>,
    doomed: Arc<Doomed>,
    busy: Arc<Mutex<Busy>>,
    /// What this layout's spares are named with, and the number of the last one.
    prefix: String,
    seq: u64,
}

impl Worker {
    fn run(mut self) {
        let base = rustix::process::getpriority_process(None).unwrap_or(0);
        let mut asked = None;
        renice(&mut asked, deleter_nice(base, 0));
        let spares = self.spare.is_some();
        // After a spare could not be made, when to try again.
        let mut retry: Option<std::time::Instant> = None;
        loop {
            let (batch, refill) = {
                let mut q = self.doomed.queue.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    if q.closed {
                        return;
                    }
                    let low = spares && q.spares.len() <= SPARES / 2;
                    let now = std::time::Instant::now();
                    if !q.doomed.is_empty() || (low && retry.is_none_or(|at| now >= at)) {
                        break;
                    }
                    q = match retry.filter(|_| low) {
                        Some(at) => {
                            let wait = at.saturating_duration_since(now);
                            self.doomed
                                .wake
                                .wait_timeout(q, wait)
                                .unwrap_or_else(|e| e.into_inner())
                                .0
                        }
                        None => self.doomed.wake.wait(q).unwrap_or_else(|e| e.into_inner()),
                    };
                }
                q.deleting = !q.doomed.is_empty();
                let refill = spares && q.spares.len() <= SPARES / 2;
                (std::mem::take(&mut q.doomed), refill)
            };
            // Spares first: the next create waits for them, nobody for deletions.
            if refill {
                retry = self.fill_spares().err().map(|e| {
                    tracing::debug!(error = %e, "could not make a spare entry; creates make their own");
                    std::time::Instant::now() + SPARE_RETRY
                });
            }
            if !batch.is_empty() {
                renice(&mut asked, deleter_nice(base, batch.len()));
                self.delete_batch(batch);
                self.doomed.queue.lock().unwrap_or_else(|e| e.into_inner()).deleting = false;
                self.doomed.wake.notify_all();
            }
        }
    }

    fn closed(&self) -> bool {
        self.doomed.queue.lock().unwrap_or_else(|e| e.into_inner()).closed
    }

    /// Deletes each entry of `batch` from `tmp/`, until the layout closes.
    fn delete_batch(&self, batch: Vec<Mark>) {
        for mark in batch {
            if self.closed() {
                break;
            }
            if let Err(e) = self.entries.delete_if_there(&self.tmp, mark.name()) {
                tracing::warn!(path = %mark, error = %e,
                    "could not delete a removed snapshot; cleanup will retry");
            }
        }
    }

    /// Makes spares until [`SPARES`] wait in the pool, or the layout closes.
    fn fill_spares(&mut self) -> Result<()> {
        let Some((dir, blank)) = &self.spare else { return Ok(()) };
        loop {
            {
                let q = self.doomed.queue.lock().unwrap_or_else(|e| e.into_inner());
                if q.closed || q.spares.len() >= SPARES {
                    return Ok(());
                }
            }
            self.seq += 1;
            let mark = Mark {
                what: Marked::Spare(format!("{}-{}", self.prefix, self.seq)),
                busy: self.busy.clone(),
            };
            let made = blank(dir, mark.name());
            let mut q = self.doomed.queue.lock().unwrap_or_else(|e| e.into_inner());
            if made.is_ok() && !q.closed {
                q.spares.push_back(mark);
                continue;
            }
            // Half made, or too late for the pool, which close has emptied.
            drop(q);
            if let Err(e) = self.entries.delete_if_there(dir, mark.name()) {
                tracing::warn!(path = %mark, error = %e, "could not delete a spare entry");
            }
            return made.map_err(|e| e.context(format!("make {mark}")));
        }
    }
}

fn private_subdir(dir: &Dir, sub: &str, path: &std::path::Path) -> Result<Dir> {
    // Readable (not O_PATH): btrfs ioctls are issued on these descriptors. Its name is
    // synced: the entries synced into it must not lose it.
    crate::fsutil::make_dir_synced(dir, sub, 0o700)
        .with_context(|| format!("open {sub}/ in {}", path.display()))
}

/// Sets layouts started in this process apart, in the names of their spares.
static OPENED: AtomicU64 = AtomicU64::new(0);

impl Layout {
    /// Opens the layout in `dir`, creating what is missing. With `blank`, the
    /// background thread keeps spares made by it (see the module documentation); what
    /// `spare/` holds from before is deleted now.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        dir: Dir,
        path: PathBuf,
        store: Store,
        entries: Box<dyn Entries>,
        faults: Arc<Faults>,
        name: &'static str,
        blank: Option<Blank>,
    ) -> Result<Self> {
        let snapshots = private_subdir(&dir, SNAPSHOTS, &path)?;
        let tmp = private_subdir(&dir, TMP, &path)?;
        let spare = match blank {
            Some(blank) => {
                let spare = private_subdir(&dir, SPARE, &path)?;
                // An earlier pool (this process's, or one a crash left): nobody's now.
                // What cannot be deleted (still being made by a layout of this directory
                // dropped just now) is left for the next open: spares are never counted
                // on, so a stray one costs only its inodes.
                for entry in spare.entries().with_context(|| format!("read {SPARE}/"))? {
                    let entry = entry.with_context(|| format!("read {SPARE}/"))?;
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if let Err(e) = entries.delete_if_there(&spare, &name) {
                        tracing::warn!(path = %format!("{SPARE}/{name}"), error = %e,
                            "could not delete an earlier spare entry; the next open will");
                    }
                }
                Some((spare, blank))
            }
            None => None,
        };
        Ok(Layout {
            snapshots,
            tmp,
            spare,
            path,
            store,
            entries: entries.into(),
            faults,
            name,
            closed: AtomicBool::new(false),
            sync_commits: AtomicBool::new(true),
            tmp_seq: AtomicU64::new(0),
            busy: Arc::default(),
            doomed: Arc::default(),
            deleter: Mutex::new(None),
            me: std::sync::OnceLock::new(),
        })
    }

    /// Starts the background thread, which deletes removed entries and keeps the pool
    /// of spares (if the driver has them) filled; it stops when the layout is closed or
    /// dropped. Once closed, it deletes no further entry: what is still queued stays in
    /// `tmp/`, for the next [`Layout::reclaim`]. The thread holds nothing of the layout
    /// but its directories, so a layout dropped without [`Layout::close`] lets its
    /// database go at once.
    pub fn start_deleter(self: &Arc<Self>) -> Result<()> {
        let _ = self.me.set(Arc::downgrade(self));
        let spare = match &self.spare {
            Some((dir, blank)) => Some((dir.try_clone().context("open spare/ again")?, *blank)),
            None => None,
        };
        let worker = Worker {
            tmp: self.tmp.try_clone().context("open tmp/ again")?,
            spare,
            entries: self.entries.clone(),
            doomed: self.doomed.clone(),
            busy: self.busy.clone(),
            // Apart from the names of an earlier layout's spares in this process.
            prefix: format!("{}-{}", std::process::id(), OPENED.fetch_add(1, Ordering::Relaxed)),
            seq: 0,
        };
        let thread = std::thread::Builder::new()
            .name(format!("wasnap-{}-rm", self.name))
            .spawn(move || worker.run())
            .context("start the background deleter")?;
        *self.deleter.lock().unwrap_or_else(|e| e.into_inner()) = Some(thread);
        Ok(())
    }

    /// A spare from the pool, if one is ready; taking the one that leaves half the pool
    /// wakes the background thread to refill it.
    fn take_spare(&self) -> Option<Mark> {
        self.spare.as_ref()?;
        let mut q = self.doomed.queue.lock().unwrap_or_else(|e| e.into_inner());
        let spare = q.spares.pop_front();
        if spare.is_some() && q.spares.len() == SPARES / 2 {
            self.doomed.wake.notify_all();
        }
        spare
    }

    /// The directory the entry `mark` names is in: `spare/` for a spare, else `tmp/`.
    pub fn dir_of(&self, mark: &Mark) -> &Dir {
        match (&mark.what, &self.spare) {
            (Marked::Spare(_), Some((spare, _))) => spare,
            _ => &self.tmp,
        }
    }

    /// Deletes the entry `mark` names in `tmp/` or `spare/`, a failure logged and left
    /// to reclaim (or the next open, for `spare/`).
    fn discard(&self, mark: &Mark) {
        if let Err(e) = self.entries.delete_if_there(self.dir_of(mark), mark.name()) {
            tracing::warn!(path = %mark, error = %e, "could not delete an unused entry");
        }
    }

    /// Whether commits sync their layer's data before they are recorded (the default).
    pub fn set_sync_commits(&self, sync: bool) {
        self.sync_commits.store(sync, Ordering::Relaxed);
    }

    /// Whether commits sync their layer's data (see [`Layout::settle`]).
    pub fn syncs_commits(&self) -> bool {
        self.sync_commits.load(Ordering::Relaxed)
    }

    /// Measures a layer being committed (`layer`, inside the entry of snapshot `id`)
    /// and, unless turned off, makes its data durable first, so that no committed
    /// record ever names a layer a power cut could truncate (containerd#5854's class).
    /// A small layer is synced file by file; a large one with one `syncfs` of its
    /// filesystem, which is cheaper than thousands of `fsync`s. The name of the entry in
    /// `snapshots/` is synced too.
    pub fn settle(&self, layer: &Dir) -> Result<Usage> {
        let usage = crate::fsutil::disk_usage(layer)?;
        if !self.sync_commits.load(Ordering::Relaxed) {
            return Ok(usage);
        }
        if usage.inodes > PER_FILE_SYNC_MAX {
            rustix::fs::syncfs(layer).context("syncfs a committed layer")?;
        } else {
            crate::fsutil::measure_and_sync(layer)?;
        }
        rustix::fs::fsync(&self.snapshots).context("sync snapshots/")?;
        Ok(usage)
    }

    /// Unavailable once closed.
    pub fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::unavailable(format!("{} snapshotter is closed", self.name)));
        }
        Ok(())
    }

    /// Marks the driver closed; idempotent. Stops the background deleter and waits
    /// for the entry it is deleting, so that once this returns no thread holds the
    /// layout: a later open of the same root finds its database free.
    pub fn close(&self) {
        self.stop_deleter();
        let deleter = self.deleter.lock().unwrap_or_else(|e| e.into_inner()).take();
        // The deleter itself never closes the layout, but it may drop the last
        // reference to it, and a thread cannot wait for itself.
        if let Some(t) = deleter.filter(|t| t.thread().id() != std::thread::current().id()) {
            let _ = t.join();
        }
        // Nothing refills the pool now; a create still running keeps the spare it took.
        let spares =
            std::mem::take(&mut self.doomed.queue.lock().unwrap_or_else(|e| e.into_inner()).spares);
        for spare in spares {
            self.discard(&spare);
        }
    }

    fn stop_deleter(&self) {
        self.closed.store(true, Ordering::Release);
        self.doomed.queue.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        self.doomed.wake.notify_all();
    }

    /// Fails or aborts if the fault point `<driver>.<point>` is armed.
    pub fn fault(&self, point: &str) -> Result<()> {
        self.faults.hit(&format!("{}.{point}", self.name))
    }

    /// `snapshots/<id>`, relative to the driver's directory.
    pub fn entry(id: u64) -> String {
        format!("{SNAPSHOTS}/{id}")
    }

    /// The host path of `rel`, for mount sources.
    pub fn host_path(&self, rel: &str) -> String {
        self.path.join(rel).to_string_lossy().into_owned()
    }

    /// A fresh name in `tmp/`, spared by reclaim while the returned mark lives.
    pub fn tmp_name(&self, what: &str) -> Mark {
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let name = format!("{what}-{}-{n}", std::process::id());
        self.busy.lock().unwrap_or_else(|e| e.into_inner()).tmp.insert(name.clone());
        Mark { what: Marked::Tmp(name), busy: self.busy.clone() }
    }

    fn mark_id(&self, id: u64) -> Mark {
        self.busy.lock().unwrap_or_else(|e| e.into_inner()).ids.insert(id);
        Mark { what: Marked::Id(id), busy: self.busy.clone() }
    }

    /// Deletes `tmp/<name>`; gone already is fine.
    pub fn delete_tmp(&self, name: &str) -> Result<()> {
        self.entries.delete_if_there(&self.tmp, name)
    }

    /// Checks that `key` is free and `parent` (if any) is committed, before any entry is
    /// built for nothing. The record's write checks again.
    pub fn precheck(&self, key: &str, parent: Option<&str>) -> Result<Option<Snap>> {
        self.check_open()?;
        self.store.precheck(key, parent)
    }

    /// A prepare or view on this layout: checks `key` and `parent`, has `build` make the
    /// new entry as `tmp/<name>` (given its mark and the parent's record) or finish the
    /// spare it is given ([`Mark::is_spare`]), and installs it. A failed build leaves
    /// nothing behind.
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        &self,
        kind: Kind,
        key: &str,
        parent: Option<&str>,
        labels: &Labels,
        seal: bool,
        build: impl FnOnce(&Mark, Option<&Snap>) -> Result<()>,
    ) -> Result<Snap> {
        let parent_snap = self.precheck(key, parent)?;
        let id = self.store.next_id()?;
        let tmp = self.take_spare().unwrap_or_else(|| self.tmp_name("new"));
        if let Err(e) = build(&tmp, parent_snap.as_ref()) {
            self.discard(&tmp);
            return Err(e);
        }
        let p = parent_snap.as_ref();
        self.install(&tmp, id, seal, || self.store.create(id, kind, key, parent, p, labels))
    }

    /// A merge on this layout: checks `key`, has `build` make its entry as
    /// `tmp/<name>`, and installs it recorded as stacking `layers`.
    pub fn build_merge(
        &self,
        key: &str,
        layers: &[String],
        labels: &Labels,
        build: impl FnOnce(&str) -> Result<()>,
    ) -> Result<Snap> {
        self.precheck(key, None)?;
        let id = self.store.next_id()?;
        let tmp = self.tmp_name("merge");
        if let Err(e) = build(tmp.name()) {
            let _ = self.delete_tmp(tmp.name());
            return Err(e);
        }
        self.install(&tmp, id, false, || self.store.create_merge(id, key, layers, labels))
    }

    /// Moves the entry built at `tmp` (in `tmp/` or `spare/`) to `snapshots/<id>` (an id from
    /// [`Store::next_id`]), seals it if `seal`, and records it with `record`: on any
    /// failure the entry is deleted and nothing is recorded.
    pub fn install(
        &self,
        tmp: &Mark,
        id: u64,
        seal: bool,
        record: impl FnOnce() -> Result<Snap>,
    ) -> Result<Snap> {
        let _id = self.mark_id(id);
        let name = id.to_string();
        let placed = (|| {
            // Ids are never reused, so an entry already there is a crash's leftover.
            match self.entries.delete(&self.snapshots, &name) {
                Err(e) if !e.is_not_found() => return Err(e),
                _ => {}
            }
            self.fault("create.before-rename")?;
            self.dir_of(tmp)
                .rename(tmp.name(), &self.snapshots, &name)
                .with_context(|| format!("rename {tmp} to {SNAPSHOTS}/{name}"))
        })();
        if let Err(e) = placed {
            self.discard(tmp);
            return Err(e);
        }
        let recorded = (|| {
            if seal {
                self.entries.seal(&self.snapshots, &name)?;
            }
            self.fault("create.before-commit")?;
            record()
        })();
        let recorded = match recorded {
            Ok(snap) if self.store.staging() => {
                // Recorded by the caller's transaction (see `Store::staging`): the
                // entry stays busy until then, and goes if that never commits.
                let (entries, name) = (self.entries.clone(), name.clone());
                let undo = self.snapshots.try_clone().ok().map(|dir| {
                    Box::new(move || match entries.delete(&dir, &name) {
                        Ok(()) => {}
                        Err(e) if e.is_not_found() => {}
                        Err(e) => tracing::warn!(path = %Self::entry(id), error = %e,
                            "could not delete the data of a snapshot never recorded; cleanup will retry"),
                    }) as Box<dyn FnOnce() + Send>
                });
                self.store.hold_staged(undo, Box::new(_id)).map(|()| snap)
            }
            r => r,
        };
        if recorded.is_err() {
            let _ = self.entries.delete(&self.snapshots, &name);
        }
        recorded
    }

    /// Records the commit of the active snapshot `key` as `name` with the usage measured
    /// by the caller. Its entry stays where it is.
    pub fn commit_in_place(
        &self,
        name: &str,
        key: &str,
        usage: Usage,
        labels: &Labels,
    ) -> Result<()> {
        self.check_open()?;
        self.fault("commit.before-commit")?;
        self.store.commit(key, name, usage, labels, None).map(drop)
    }

    /// Records the commit of the active snapshot `key` (entry `old`) as `name`, whose
    /// entry the caller built at `tmp` and which becomes `snapshots/<new id>`, then
    /// deletes the old entry. On failure nothing changes.
    #[allow(clippy::too_many_arguments)]
    pub fn commit_moved(
        &self,
        tmp: &Mark,
        old: u64,
        new: u64,
        name: &str,
        key: &str,
        usage: Usage,
        labels: &Labels,
    ) -> Result<()> {
        let _id = self.mark_id(new);
        let entry = new.to_string();
        let placed = self.fault("commit.before-rename").and_then(|()| {
            self.dir_of(tmp)
                .rename(tmp.name(), &self.snapshots, &entry)
                .with_context(|| format!("rename {tmp} to {SNAPSHOTS}/{entry}"))
        });
        if let Err(e) = placed {
            self.discard(tmp);
            return Err(e);
        }
        let recorded = (|| {
            self.entries.seal(&self.snapshots, &entry)?;
            // The old entry is deleted once the record changes: the new one (made by a
            // snapshot, which a filesystem may keep in memory until its next commit)
            // and its name must be on disk first.
            if self.sync_commits.load(Ordering::Relaxed) {
                rustix::fs::syncfs(&self.snapshots).context("syncfs a committed snapshot")?;
            }
            self.fault("commit.before-commit")?;
            self.store.commit(key, name, usage, labels, Some(new))
        })();
        if let Err(e) = recorded {
            let _ = self.entries.delete(&self.snapshots, &entry);
            return Err(e);
        }
        // The commit is durable: failing now would lie. No record names the old entry,
        // so if this delete fails reclaim finds it.
        if let Err(e) = self
            .fault("commit.before-delete")
            .and_then(|()| self.entries.delete(&self.snapshots, &old.to_string()))
        {
            tracing::warn!(path = %Self::entry(old), error = %e, "could not delete a committed snapshot's old entry; cleanup will retry");
        }
        Ok(())
    }

    /// Usage of `key`: stored at commit for committed snapshots (so asking is O(1)),
    /// measured by `measure` for the others.
    pub fn usage(&self, key: &str, measure: impl FnOnce(u64) -> Result<Usage>) -> Result<Usage> {
        self.check_open()?;
        let (_, snap) = self.store.get(key)?;
        match snap.usage {
            Some(usage) => Ok(usage),
            None => measure(snap.id),
        }
    }

    /// Forgets `key`, then deletes its entry as `when` says; an entry not deleted now is
    /// first moved into `tmp/`.
    ///
    /// Inside the metadata layer's staging ([`Store::staging`]), the record's removal is
    /// staged for its transaction, and the entry is dealt with once that commits: a
    /// crash in between leaves an entry no record names, which reclaim deletes.
    pub fn remove(&self, key: &str, when: Deletion) -> Result<()> {
        self.check_open()?;
        self.fault("remove.before-commit")?;
        if self.store.staging() {
            // Never committed here: that would part the record from the caller's.
            let Some(me) = self.me.get().cloned() else {
                return Err(Error::internal("a staged remove needs the background deleter"));
            };
            let removed = Arc::new(Mutex::new(None));
            self.store.remove_staged(key, removed.clone())?;
            return self.store.after_commit(Box::new(move || {
                let id = *removed.lock().unwrap_or_else(|e| e.into_inner());
                if let (Some(id), Some(layout)) = (id, me.upgrade()) {
                    layout.delete_entry(id, when);
                }
            }));
        }
        let (id, _) = self.store.remove(key)?;
        self.delete_entry(id, when);
        Ok(())
    }

    /// Deletes the entry of the removed snapshot `id` as `when` says; a failure is
    /// logged and left to reclaim.
    fn delete_entry(&self, id: u64, when: Deletion) {
        let name = id.to_string();
        let deleted = self.fault("remove.before-delete").and_then(|()| {
            if when == Deletion::Now {
                return self.entries.delete(&self.snapshots, &name);
            }
            let doomed = self.tmp_name(&format!("rm-{id}"));
            match self.snapshots.rename(&name, &self.tmp, doomed.name()) {
                Ok(()) => {}
                // Its data is gone already: nothing is left to delete.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    tracing::debug!(path = %Self::entry(id), "a removed snapshot had no data");
                    return Ok(());
                }
                Err(e) => {
                    return Err(
                        Error::from(e).context(format!("move {SNAPSHOTS}/{name} to {doomed}"))
                    );
                }
            }
            if when == Deletion::Background {
                let mut q = self.doomed.queue.lock().unwrap_or_else(|e| e.into_inner());
                q.doomed.push(doomed);
                self.doomed.wake.notify_all();
            }
            Ok(())
        });
        match deleted {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => tracing::warn!(path = %Self::entry(id), error = %e,
                "could not delete a removed snapshot's data; cleanup will retry"),
        }
    }

    /// Records whose entry is missing (or whose `layer` inside it is), with why.
    pub fn verify(&self, layer: &str) -> Result<Vec<(String, String)>> {
        self.check_open()?;
        let mut bad = Vec::new();
        self.store.walk(&mut |info, id| {
            let rel = if layer.is_empty() { id.to_string() } else { format!("{id}/{layer}") };
            match rustix::fs::statat(
                &self.snapshots,
                rel.as_str(),
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            ) {
                Ok(_) => {}
                Err(rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR) => {
                    bad.push((info.name, format!("its data {SNAPSHOTS}/{rel} is gone")));
                }
                Err(e) => bad.push((info.name, format!("{SNAPSHOTS}/{rel}: {e}"))),
            }
            Ok(())
        })?;
        Ok(bad)
    }

    /// Deletes every entry in `tmp/` and every `snapshots/<id>` that is neither busy
    /// nor named by a record, while creates, commits and removes go on.
    pub fn reclaim(&self) -> Result<()> {
        self.check_open()?;
        // What the background deleter has not reached yet is deleted now, once the
        // batch it is deleting (busy, so the listing below would skip it) is done.
        let queued = {
            let mut q = self.doomed.queue.lock().unwrap_or_else(|e| e.into_inner());
            while q.deleting {
                q = self.doomed.wake.wait(q).unwrap_or_else(|e| e.into_inner());
            }
            std::mem::take(&mut q.doomed)
        };
        for mark in queued {
            self.delete_tmp(mark.name())?;
        }
        let list = |dir: &Dir, what: &str| -> Result<Vec<String>> {
            let mut names = Vec::new();
            for entry in dir.entries().with_context(|| format!("read {what}/"))? {
                let entry = entry.with_context(|| format!("read {what}/"))?;
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
            Ok(names)
        };
        // Listed, then busy, then recorded: see the module documentation.
        let in_snapshots = list(&self.snapshots, SNAPSHOTS)?;
        let in_tmp = list(&self.tmp, TMP)?;
        let (busy_tmp, busy_ids) = {
            let busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
            (busy.tmp.clone(), busy.ids.clone())
        };
        let ids = self.store.ids()?;
        let mut first_error = None;
        let mut delete = |dir: &Dir, what: &str, name: &str| match self.entries.delete(dir, name) {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => {
                // One that cannot go (a nested subvolume someone made inside a
                // container, say) does not keep the others.
                tracing::warn!(path = %format!("{what}/{name}"), error = %e, "cleanup: could not delete");
                first_error.get_or_insert(e);
            }
        };
        for name in in_snapshots {
            let id = name.parse::<u64>().ok();
            if id.is_some_and(|id| ids.contains(&id) || busy_ids.contains(&id)) {
                continue;
            }
            delete(&self.snapshots, SNAPSHOTS, &name);
        }
        for name in in_tmp {
            if !busy_tmp.contains(&name) {
                delete(&self.tmp, TMP, &name);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deleter_is_nicer_until_it_falls_behind() {
        assert_eq!(deleter_nice(0, 0), 10);
        assert_eq!(deleter_nice(0, DELETER_BEHIND - 1), 10);
        assert_eq!(deleter_nice(0, DELETER_BEHIND), 0);
        assert_eq!(deleter_nice(5, 1), 15);
        assert_eq!(deleter_nice(15, 1), 19, "never past the lowest priority");
        assert_eq!(deleter_nice(-5, DELETER_BEHIND + 1), -5);
    }
}
