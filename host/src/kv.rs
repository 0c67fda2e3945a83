//! The root's database: one redb file holding the metadata's tables, each driver's
//! records and each plugin's key-value store, and the commit path they all share.
//!
//! **Group commit.** Every change goes through [`Db::write`] as an *operation*: a
//! closure that reads and writes inside a write transaction. Callers arriving while a
//! commit is under way queue their operations; the first of them then leads: it runs
//! every queued operation in one transaction and commits once, so one `fsync` serves
//! them all, and each caller is answered only when its change is as durable as it
//! asked. One caller alone pays one commit, on its own thread, with no hand-off.
//!
//! **Operations** must only touch the transaction (no files, no backends: those run
//! before or after), and must not fail after writing. If one fails anyway, the
//! transaction is dropped and the others run again in a fresh one, so a failed
//! operation never leaves half a change behind; that is why they are `FnMut`.
//!
//! **Durability.** [`Durability::Immediate`] returns once the change is on disk.
//! [`Durability::Deferred`] returns once it is committed and visible; it reaches the
//! disk with the next immediate commit. Drivers and plugin stores under the metadata
//! layer defer: every change they make is followed by an immediate metadata commit (or,
//! for removals, repaired by pruning if it is lost), so one fsync per operation covers
//! both. A crash loses a suffix of deferred commits, never a middle one.
//!
//! **Staging.** Fewer transactions beat cheaper ones: a redb commit costs more CPU than
//! the rest of a snapshot's record change. Inside [`Db::staging`], a driver's store
//! does not commit its deferred change: it checks and reads on a read transaction,
//! and stages the write; the caller (the metadata layer) runs it in its own next write,
//! so a prepare or a commit on the host's own drivers is one transaction, not two or
//! three. A staged write that is never committed is undone ([`Staged`]).
//!
//! **Carrying.** The reverse of staging, for a backend whose store is on this database
//! but whose writes the host does not drive (a plugin's): inside [`Db::carrying`], the
//! first write made on this thread runs the caller's write (a commit's intent) first, in
//! the same transaction, so the intent and the backend's first change commit together
//! (one transaction instead of two), and no backend change can commit before the write
//! it relies on. If the carried write fails there, that write fails with it, and so does
//! every later one of the scope: the backend cannot change its store without it. Only
//! for a backend known to write here: one whose state is elsewhere would change it
//! before the carried write, and unchecked by it.
//!
//! **A full disk.** redb treats a failed write as fatal: once a commit fails on I/O,
//! every later call fails until the file is closed and repaired. A full filesystem must
//! not do that to the root's one database, or the daemon could not even remove what
//! would free space. So every block of the database file is allocated, and room for
//! redb's next growth past its end ([`reserve_for`]: about the file's own size while it
//! is small, [`RESERVE`] once it is large), with `fallocate` and `FALLOC_FL_KEEP_SIZE`,
//! as etcd preallocates its log: redb writes pages only into blocks that are already the
//! file's, and grows the file into them; a full disk fails the callers' snapshots and layers, never a commit.
//! After each commit, the blocks are counted and topped up if some of the reserve is
//! gone. Should a write fail anyway (the reserve could not be kept, or the disk itself
//! failed), [`Db::broken`] says so, and the daemon stops so that its service manager
//! starts it again: reopening the file repairs it, and every recovery runs at start.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cap_std::fs::{Dir, OpenOptions};
use redb::ReadableDatabase;
use redb::backends::FileBackend;

use crate::error::{Context, Error, Result};

/// How durable a change must be when [`Db::write`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// On disk: survives a crash or power cut.
    Immediate,
    /// Committed and visible; on disk with the next immediate commit.
    Deferred,
}

type Op = Box<dyn FnMut(&redb::WriteTransaction) -> Result<()> + Send>;

/// Where a queued operation stands.
enum State {
    Queued,
    /// Its caller is to lead the next batch.
    Lead,
    Done(Result<()>),
}

struct Waiter {
    state: Mutex<State>,
    wake: Condvar,
}

impl Waiter {
    fn set(&self, state: State) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = state;
        self.wake.notify_one();
    }
}

struct Pending {
    op: Op,
    durability: Durability,
    waiter: Arc<Waiter>,
}

#[derive(Default)]
struct Group {
    queue: Vec<Pending>,
    leading: bool,
}

/// Counters of the commit path, for benchmarks and `status`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CommitStats {
    /// Write transactions committed.
    pub commits: u64,
    /// Of those, the ones that synced to disk.
    pub durable_commits: u64,
    /// Operations they carried.
    pub operations: u64,
}

/// The most bytes the database keeps allocated past its end, so that a full disk does
/// not fail its commits (see the [module documentation](self)); [`reserve_for`] says how
/// much a file of a given size keeps.
pub const RESERVE: u64 = 36 << 20;

/// redb's region (its default): it grows a smaller file by doubling it, a larger one by
/// at most two regions at a time.
const REGION: u64 = 16 << 20;

/// The bytes a database file of `len` bytes keeps allocated past its end: room for
/// redb's next growth, with a margin. A small store (a plugin's, a test's) keeps about
/// its own size, not the 36 MiB a large one needs (found when 200 plugin stores of one
/// test took 24 GiB of tmpfs).
pub fn reserve_for(len: u64) -> u64 {
    let growth = if len < REGION { len.max(1 << 20) } else { 2 * REGION };
    (growth + growth / 8).min(RESERVE)
}

/// The blocks allocated to the database file beyond what its data needs.
struct Reserve {
    file: std::fs::File,
    /// The last attempt failed (logged once until one succeeds).
    failing: bool,
    /// The filesystem does not support it: no more attempts.
    unsupported: bool,
}

impl Reserve {
    /// Allocates every block of the file and [`reserve_for`] its size past its end, when
    /// more than an eighth of that reserve is missing. The blocks allocated are counted,
    /// not remembered: redb leaves holes where it extends the file, and truncating it
    /// frees what was reserved past the new end (found by the soak's full-disk
    /// windows, when a reserve counted from the end alone was gone).
    fn keep(&mut self) {
        if self.unsupported {
            return;
        }
        let (len, allocated) = match rustix::fs::fstat(&self.file) {
            Ok(st) => (st.st_size as u64, st.st_blocks as u64 * 512),
            Err(e) => {
                tracing::warn!(error = %e, "the database's reserve: fstat");
                return;
            }
        };
        let reserve = reserve_for(len);
        if allocated + reserve / 8 >= len + reserve {
            return;
        }
        let flags = rustix::fs::FallocateFlags::KEEP_SIZE;
        match rustix::fs::fallocate(&self.file, flags, 0, len + reserve) {
            Ok(()) => {
                if std::mem::take(&mut self.failing) {
                    tracing::info!("the database's reserve past its end is whole again");
                }
            }
            Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS) => {
                self.unsupported = true;
                tracing::info!(
                    "the database's filesystem cannot preallocate: a full disk may fail its commits"
                );
            }
            Err(e) => {
                if !std::mem::replace(&mut self.failing, true) {
                    tracing::warn!(error = %e, reserve,
                        "cannot keep the database's reserve past its end (disk full?); its commits may fail if the disk stays full");
                }
            }
        }
    }
}

/// A redb database with group commit.
pub struct Db {
    db: redb::Database,
    reserve: Mutex<Reserve>,
    group: Mutex<Group>,
    stats: Mutex<CommitStats>,
    /// redb panicked (a damaged file can make it): it is not called again, since its
    /// locks are poisoned and every later call would panic too.
    panicked: std::sync::atomic::AtomicBool,
    /// Why redb refuses every write from now on (a write failed), if it does.
    broken: Mutex<Option<String>>,
}

/// Whether a redb storage error leaves the database refusing every later call until it
/// is reopened.
fn breaks(e: &redb::StorageError) -> bool {
    matches!(e, redb::StorageError::Io(_) | redb::StorageError::PreviousIo)
}

/// The error of every call once redb has panicked.
fn panicked() -> Error {
    Error::internal("the database panicked (is the file damaged?); it is closed to this process")
}

/// Runs `f`, which reads the database (through a table kept open, for example): a
/// panic in redb, which some damaged pages cause, is an internal error naming the file
/// as damaged, never unwound into the caller (see [`Db::read_with`]).
pub fn contained<R>(f: impl FnOnce() -> Result<R>) -> Result<R> {
    std::panic::catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|_| Err(Error::internal("a database read panicked (is the file damaged?)")))
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").finish_non_exhaustive()
    }
}

impl Db {
    /// Opens (creating if needed) the database `name` inside `dir`.
    ///
    /// A database held by another process (another wasnap on the same root) is reported
    /// as unavailable with a message that says so, not as a corrupt file.
    pub fn open(dir: &Dir, name: &str, what: &str) -> Result<Self> {
        let file = dir
            .open_with(name, OpenOptions::new().read(true).write(true).create(true))
            .with_context(|| format!("open {what} {name:?}"))?
            .into_std();
        // The file's name, synced before any commit synced into the file counts (also
        // when it was there: a crash may have come between its making and a sync).
        crate::fsutil::sync_dir(dir).with_context(|| format!("sync the name of {what}"))?;
        let mut reserve = Reserve {
            file: file.try_clone().with_context(|| format!("open {what} {name:?}"))?,
            failing: false,
            unsupported: false,
        };
        // Before redb writes anything: opening may repair the file, which writes.
        reserve.keep();
        let backend = FileBackend::new(file).map_err(|e| db_error(what, name, e))?;
        Db::on(backend, reserve, name, what)
    }

    /// The database on `backend`, whose file `reserve` keeps allocated.
    fn on(
        backend: impl redb::StorageBackend,
        mut reserve: Reserve,
        name: &str,
        what: &str,
    ) -> Result<Self> {
        // A damaged file can make redb panic while it checks or repairs it.
        let db = std::panic::catch_unwind(AssertUnwindSafe(|| {
            redb::Builder::new().create_with_backend(backend)
        }))
        .map_err(|_| panicked().context(format!("open {what} {name:?}")))?
        .map_err(|e| db_error(what, name, e))?;
        let panicked = std::sync::atomic::AtomicBool::new(false);
        reserve.keep();
        let reserve = Mutex::new(reserve);
        Ok(Db {
            db,
            reserve,
            group: Mutex::default(),
            stats: Mutex::default(),
            panicked,
            broken: Mutex::default(),
        })
    }

    /// A read transaction: a consistent view of every committed change, durable or not.
    /// Only through [`Db::read_with`], which contains what redb's reads may panic with.
    fn read(&self) -> Result<redb::ReadTransaction> {
        if self.panicked.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(panicked());
        }
        self.db.begin_read().context("begin a database read")
    }

    /// Runs `f` on a read transaction. redb panics, rather than failing, on some damaged
    /// pages: such a panic is contained here and answered as an internal error naming
    /// the file as damaged, never unwound into the caller.
    pub fn read_with<R>(&self, f: impl FnOnce(&redb::ReadTransaction) -> Result<R>) -> Result<R> {
        let txn = self.read()?;
        contained(|| f(&txn))
    }

    /// Makes every change committed so far durable.
    pub fn flush(&self) -> Result<()> {
        self.write(Durability::Immediate, |_| Ok(()))
    }

    /// Why the database refuses every write until it is reopened, if a write failed
    /// (redb's rule after an I/O error); None while it works.
    pub fn broken(&self) -> Option<String> {
        self.broken.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn note_broken(&self, why: String) {
        let mut b = self.broken.lock().unwrap_or_else(|e| e.into_inner());
        if b.is_none() {
            tracing::error!(error = %why,
                "the database failed a write: it refuses every write until it is reopened");
            *b = Some(why);
        }
    }

    /// The commit counters so far.
    pub fn stats(&self) -> CommitStats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `op` in a write transaction, possibly shared with other callers' operations,
    /// and returns its result once the change is as durable as `durability` asks. See
    /// the [module documentation](self) for what `op` may do.
    pub fn write<R: Send + 'static>(
        &self,
        durability: Durability,
        mut op: impl FnMut(&redb::WriteTransaction) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        let out: Arc<Mutex<Option<R>>> = Arc::new(Mutex::new(None));
        let slot = out.clone();
        let carry = self.carry()?;
        let mut durability = durability;
        if let Some(c) = &carry
            && c.lock().unwrap_or_else(|e| e.into_inner()).durability == Durability::Immediate
        {
            durability = Durability::Immediate;
        }
        let carried = carry.clone();
        let boxed: Op = Box::new(move |txn| {
            if let Some(cell) = &carried {
                let mut c = cell.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(op) = c.op.as_mut()
                    && let Err(e) = op(txn)
                {
                    c.failed = Some(e.clone());
                    return Err(e);
                }
            }
            let v = op(txn)?;
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(v);
            Ok(())
        });
        let waiter = Arc::new(Waiter { state: Mutex::new(State::Queued), wake: Condvar::new() });
        let lead = {
            let mut g = self.group.lock().unwrap_or_else(|e| e.into_inner());
            g.queue.push(Pending { op: boxed, durability, waiter: waiter.clone() });
            !std::mem::replace(&mut g.leading, true)
        };
        if lead {
            self.lead();
        }
        let result = {
            let mut st = waiter.state.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                match std::mem::replace(&mut *st, State::Queued) {
                    State::Done(r) => break r,
                    State::Lead => {
                        drop(st);
                        self.lead();
                        st = waiter.state.lock().unwrap_or_else(|e| e.into_inner());
                    }
                    State::Queued => {
                        st = waiter.wake.wait(st).unwrap_or_else(|e| e.into_inner());
                    }
                }
            }
        };
        if let Some(cell) = carry {
            let mut c = cell.lock().unwrap_or_else(|e| e.into_inner());
            match &result {
                // Committed with this write: spent.
                Ok(()) => c.op = None,
                Err(e) if c.failed.is_some() => {
                    c.op = None;
                    return Err(e.clone().context("a write this one depends on failed"));
                }
                // This write failed on its own: the next one carries it.
                Err(_) => {}
            }
        }
        result?;
        let v = out.lock().unwrap_or_else(|e| e.into_inner()).take();
        v.ok_or_else(|| Error::internal("a committed operation left no result"))
    }

    /// Runs every queued operation in one transaction, answers their callers, and hands
    /// the lead to the next queued caller (or gives it up).
    fn lead(&self) {
        let mut batch =
            std::mem::take(&mut self.group.lock().unwrap_or_else(|e| e.into_inner()).queue);
        // A panic in redb (a damaged file can make its allocator panic in a commit) must
        // not leave the group without a leader, or every later write would wait forever:
        // it fails this batch, and the lead passes on as after any batch.
        let results = match self.panicked.load(std::sync::atomic::Ordering::Relaxed) {
            false => std::panic::catch_unwind(AssertUnwindSafe(|| self.run(&mut batch))).ok(),
            true => None,
        };
        let results = results.unwrap_or_else(|| {
            self.panicked.store(true, std::sync::atomic::Ordering::Relaxed);
            batch.iter().map(|_| Err(panicked())).collect()
        });
        for (p, r) in batch.into_iter().zip(results) {
            p.waiter.set(State::Done(r));
        }
        let mut g = self.group.lock().unwrap_or_else(|e| e.into_inner());
        match g.queue.first() {
            Some(next) => next.waiter.set(State::Lead),
            None => g.leading = false,
        }
    }

    /// One batch: each operation's result. An operation that fails is left out and the
    /// rest run again in a fresh transaction, so nothing it wrote survives.
    fn run(&self, batch: &mut [Pending]) -> Vec<Result<()>> {
        let mut results: Vec<Option<Result<()>>> = (0..batch.len()).map(|_| None).collect();
        'attempt: loop {
            let live: Vec<usize> = (0..batch.len()).filter(|i| results[*i].is_none()).collect();
            if live.is_empty() {
                break;
            }
            let mut txn = match self.db.begin_write() {
                Ok(t) => t,
                Err(e) => {
                    if let redb::TransactionError::Storage(se) = &e
                        && breaks(se)
                    {
                        self.note_broken(format!("begin a write: {se}"));
                    }
                    let e = Error::from(e).context("begin a database write");
                    live.iter().for_each(|i| results[*i] = Some(Err(e.clone())));
                    break;
                }
            };
            let durable = live.iter().any(|i| batch[*i].durability == Durability::Immediate);
            if !durable && let Err(e) = txn.set_durability(redb::Durability::None) {
                let e = Error::from(e).context("defer a commit");
                live.iter().for_each(|i| results[*i] = Some(Err(e.clone())));
                break;
            }
            for &i in &live {
                let op = &mut batch[i].op;
                let r = std::panic::catch_unwind(AssertUnwindSafe(|| op(&txn)))
                    .unwrap_or_else(|_| Err(Error::internal("a database operation panicked")));
                if let Err(e) = r {
                    results[i] = Some(Err(e));
                    drop(txn); // aborts: the failed operation's writes, if any, go too
                    continue 'attempt;
                }
            }
            let committed = txn.commit().map_err(|e| {
                if let redb::CommitError::Storage(se) = &e
                    && breaks(se)
                {
                    self.note_broken(format!("commit: {se}"));
                }
                Error::from(e).context("commit")
            });
            {
                let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
                s.commits += 1;
                s.durable_commits += u64::from(durable);
                s.operations += live.len() as u64;
            }
            for &i in &live {
                results[i] = Some(committed.clone());
            }
            self.reserve.lock().unwrap_or_else(|e| e.into_inner()).keep();
            break;
        }
        results.into_iter().map(|r| r.unwrap_or(Ok(()))).collect()
    }
}

/// Writes staged on this thread by [`Db::staging`]: the database they are for (its
/// address) and what was staged so far.
struct Stage {
    db: usize,
    staged: Staged,
}

thread_local! {
    static STAGE: std::cell::RefCell<Option<Stage>> = const { std::cell::RefCell::new(None) };
}

/// Deferred writes a driver's store staged inside [`Db::staging`] instead of committing
/// them, with what is held for them: the caller runs them in its own next write, so
/// that both commit in one transaction, or drops them.
///
/// Dropped without [`Staged::committed`], the writes never happen: what was done on
/// disk for them is undone (an entry built for a record that will not be written is
/// deleted), then what was held for them is let go, and what was to follow their
/// commit never runs.
#[derive(Default)]
pub struct Staged {
    writes: Vec<Op>,
    undo: Vec<Box<dyn FnOnce() + Send>>,
    keep: Vec<Box<dyn std::any::Any + Send>>,
    after: Vec<Box<dyn FnOnce() + Send>>,
}

impl std::fmt::Debug for Staged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staged").field("writes", &self.writes.len()).finish_non_exhaustive()
    }
}

/// The writes of a [`Staged`], to run inside an operation of [`Db::write`].
#[derive(Default)]
pub struct StagedWrites(Vec<Op>);

impl std::fmt::Debug for StagedWrites {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StagedWrites({})", self.0.len())
    }
}

impl StagedWrites {
    /// Runs every staged write in `txn`, in order. Like any operation's, they may run
    /// again in a fresh transaction; each checks what it relies on before writing.
    pub fn run(&mut self, txn: &redb::WriteTransaction) -> Result<()> {
        self.0.iter_mut().try_for_each(|w| w(txn))
    }
}

impl Staged {
    /// Whether nothing was staged.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// The writes, to run in the caller's transaction ([`StagedWrites::run`]).
    pub fn take_writes(&mut self) -> StagedWrites {
        StagedWrites(std::mem::take(&mut self.writes))
    }

    /// The transaction that ran the writes committed: nothing is undone, what was to
    /// follow the commit runs (in the order staged), and what was held is let go.
    pub fn committed(mut self) {
        self.undo.clear();
        for after in std::mem::take(&mut self.after) {
            after();
        }
    }

    /// Drops what was to follow the commit, unrun: it is left to cleanup.
    pub fn skip_after(&mut self) {
        self.after.clear();
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        for undo in self.undo.drain(..).rev() {
            undo();
        }
    }
}

impl Db {
    /// Runs `f`, with the deferred writes that driver stores on this database make on
    /// this thread meanwhile staged rather than committed, and returns them with its
    /// result (see [`Staged`]). Writes of other threads, and immediate writes, are
    /// committed as usual.
    pub fn staging<R>(&self, f: impl FnOnce() -> R) -> (R, Staged) {
        /// Puts back the staging this one is inside (none, usually), even if `f`
        /// panics; returns this one's.
        struct Restore(Option<Option<Stage>>);
        impl Restore {
            fn restore(&mut self) -> Option<Stage> {
                let prev = self.0.take()?;
                STAGE.with(|s| std::mem::replace(&mut *s.borrow_mut(), prev))
            }
        }
        impl Drop for Restore {
            fn drop(&mut self) {
                // Dropped (so undone) outside the borrow: an undo may ask again.
                drop(self.restore());
            }
        }
        let me = Stage { db: self as *const Db as usize, staged: Staged::default() };
        let mut restore = Restore(Some(STAGE.with(|s| s.borrow_mut().replace(me))));
        let r = f();
        let mine = restore.restore();
        (r, mine.map(|s| s.staged).unwrap_or_default())
    }

    /// Whether a deferred write of this database made now, on this thread, is to be
    /// staged ([`Db::staging`]).
    pub(crate) fn is_staging(&self) -> bool {
        let me = self as *const Db as usize;
        STAGE.with(|s| s.borrow().as_ref().is_some_and(|s| s.db == me))
    }

    /// Stages `write` for the caller of [`Db::staging`]; false, with nothing staged, if
    /// no staging of this database is under way on this thread.
    pub(crate) fn stage(
        &self,
        write: impl FnMut(&redb::WriteTransaction) -> Result<()> + Send + 'static,
    ) -> bool {
        self.with_stage(|s| s.writes.push(Box::new(write)))
    }

    /// Has `after` run once the writes staged so far are committed (never, if they are
    /// dropped); false (`after` dropped unrun) if no staging of this database is under
    /// way on this thread.
    pub(crate) fn stage_after(&self, after: Box<dyn FnOnce() + Send>) -> bool {
        self.with_stage(|s| s.after.push(after))
    }

    fn with_stage(&self, f: impl FnOnce(&mut Staged)) -> bool {
        let me = self as *const Db as usize;
        STAGE.with(|s| match s.borrow_mut().as_mut() {
            Some(s) if s.db == me => {
                f(&mut s.staged);
                true
            }
            _ => false,
        })
    }

    /// Holds `keep` until the writes staged so far are committed or dropped, and has
    /// `undo` run first if they are dropped; false (`undo` not run, `keep` let go) if no
    /// staging of this database is under way on this thread.
    pub(crate) fn stage_hold(
        &self,
        undo: Option<Box<dyn FnOnce() + Send>>,
        keep: Box<dyn std::any::Any + Send>,
    ) -> bool {
        self.with_stage(|s| {
            s.undo.extend(undo);
            s.keep.push(keep);
        })
    }
}

/// A write carried by the next write of a database on one thread ([`Db::carrying`]).
struct CarryCell {
    /// The write, until a commit carried it or it failed.
    op: Option<Op>,
    durability: Durability,
    /// Why it failed, in the transaction of a write that carried it.
    failed: Option<Error>,
}

/// The carry armed on this thread: the database it is for (its address) and the cell.
struct CarrySlot {
    db: usize,
    cell: Arc<Mutex<CarryCell>>,
}

thread_local! {
    static CARRY: std::cell::RefCell<Option<CarrySlot>> = const { std::cell::RefCell::new(None) };
}

/// What became of a write [`Db::carrying`] carried.
pub enum Carried {
    /// It committed, in the transaction of the first write made in the scope.
    Committed,
    /// It failed in that transaction, which failed with it, as did every later write of
    /// the scope.
    Failed(Error),
    /// No write was made in the scope: here it is, to run in the caller's own write
    /// ([`StagedWrites::run`]).
    Unused(StagedWrites),
}

impl std::fmt::Debug for Carried {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Carried::Committed => write!(f, "Committed"),
            Carried::Failed(e) => write!(f, "Failed({e})"),
            Carried::Unused(_) => write!(f, "Unused"),
        }
    }
}

impl Db {
    /// Runs `f` with `write` carried by the first write of this database that this
    /// thread makes meanwhile: it runs first, in that write's transaction, which commits
    /// as durably as either asks (see the [module documentation](self)). Writes of
    /// other threads, and of other databases, carry nothing.
    ///
    /// Returns `f`'s result and what became of `write`. Like any operation, `write` may
    /// run again in a fresh transaction, and must only touch the transaction.
    pub fn carrying<R>(
        &self,
        durability: Durability,
        write: impl FnMut(&redb::WriteTransaction) -> Result<()> + Send + 'static,
        f: impl FnOnce() -> R,
    ) -> (R, Carried) {
        /// Puts back the carry this one is inside (none, usually), even if `f` panics.
        struct Restore(Option<Option<CarrySlot>>);
        impl Drop for Restore {
            fn drop(&mut self) {
                if let Some(prev) = self.0.take() {
                    CARRY.with(|c| *c.borrow_mut() = prev);
                }
            }
        }
        let cell =
            Arc::new(Mutex::new(CarryCell { op: Some(Box::new(write)), durability, failed: None }));
        let me = CarrySlot { db: self as *const Db as usize, cell: cell.clone() };
        let restore = Restore(Some(CARRY.with(|c| c.borrow_mut().replace(me))));
        let r = f();
        drop(restore);
        let mut c = cell.lock().unwrap_or_else(|e| e.into_inner());
        let carried = match (c.failed.take(), c.op.take()) {
            (Some(e), _) => Carried::Failed(e),
            (None, Some(op)) => Carried::Unused(StagedWrites(vec![op])),
            (None, None) => Carried::Committed,
        };
        (r, carried)
    }

    /// The carry a write of this database made now, on this thread, is to run first; an
    /// error if it failed already, so that no later write of its scope commits without it.
    fn carry(&self) -> Result<Option<Arc<Mutex<CarryCell>>>> {
        let me = self as *const Db as usize;
        let Some(cell) = CARRY.with(|c| {
            c.borrow().as_ref().filter(|slot| slot.db == me).map(|slot| slot.cell.clone())
        }) else {
            return Ok(None);
        };
        let c = cell.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = &c.failed {
            return Err(e.clone().context("a write this one depends on failed"));
        }
        let armed = c.op.is_some();
        drop(c);
        Ok(armed.then_some(cell))
    }
}

/// Deferred changes reach the disk when the database is closed, as they would with the
/// next immediate commit.
impl Drop for Db {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::error!(error = %e, "could not sync the database on close");
        }
        // redb commits as it closes, and a damaged file (or its poisoned locks, once it
        // panicked) can make that panic: it is closed with any panic caught, in place of
        // one that holds nothing.
        if let Ok(empty) =
            redb::Builder::new().create_with_backend(redb::backends::InMemoryBackend::new())
        {
            let db = std::mem::replace(&mut self.db, empty);
            let _ = std::panic::catch_unwind(AssertUnwindSafe(move || drop(db)));
        }
    }
}

fn db_error(what: &str, name: &str, e: redb::DatabaseError) -> Error {
    match e {
        redb::DatabaseError::DatabaseAlreadyOpen => Error::unavailable(format!(
            "{what} {name:?} is in use by another process (is a wasnap daemon running on this root?)"
        )),
        other => Error::from(other).context(format!("open {what} {name:?}")),
    }
}

// Timestamps are stored as nanoseconds since the Unix epoch.

/// 32 unpredictable bits (from the standard library's per-process random hasher keys),
/// to keep names made in the same nanosecond by different threads apart.
pub(crate) fn nonce() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now_nanos());
    h.finish() as u32
}

/// Nanoseconds since the Unix epoch, for storing.
pub(crate) fn now_nanos() -> u64 {
    to_nanos(SystemTime::now())
}

pub(crate) fn to_nanos(t: SystemTime) -> u64 {
    // Before 1970 or after 2554 cannot happen on a sane clock; clamp rather than fail.
    t.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

pub(crate) fn from_nanos(n: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(n)
}

/// Ids that are never handed out twice, even across crashes, taken without a write:
/// the counter `(owner, key)` of a `(&str, &str) -> u64` table is moved on by a block
/// at a time (one immediate commit), and ids are handed out from the block in memory.
/// A crash loses the rest of a block, never reuses an id.
pub(crate) struct IdBlocks {
    table: redb::TableDefinition<'static, (&'static str, &'static str), u64>,
    owner: String,
    key: &'static str,
    block: u64,
    /// The last id handed out and the end of the reserved block.
    next: std::sync::Mutex<(u64, u64)>,
}

impl std::fmt::Debug for IdBlocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdBlocks").field("owner", &self.owner).field("key", &self.key).finish()
    }
}

impl IdBlocks {
    pub(crate) fn new(
        table: redb::TableDefinition<'static, (&'static str, &'static str), u64>,
        owner: &str,
        key: &'static str,
        block: u64,
    ) -> Self {
        IdBlocks { table, owner: owner.to_owned(), key, block, next: std::sync::Mutex::new((0, 0)) }
    }

    /// A fresh id.
    pub(crate) fn next(&self, db: &Db) -> Result<u64> {
        let mut ids = self.next.lock().unwrap_or_else(|e| e.into_inner());
        if ids.0 >= ids.1 {
            let (table, owner, key, block) = (self.table, self.owner.clone(), self.key, self.block);
            let stored = db.write(Durability::Immediate, move |txn| {
                use redb::ReadableTable;
                let mut t = txn.open_table(table)?;
                let stored = t.get((owner.as_str(), key))?.map_or(0, |g| g.value());
                // Only a damaged record comes near the end: refuse rather than wrap.
                let end = stored.checked_add(block).ok_or_else(|| {
                    Error::internal(format!(
                        "ids of {owner:?} exhausted: the counter is at {stored}"
                    ))
                })?;
                t.insert((owner.as_str(), key), end)?;
                Ok((stored, end))
            })?;
            *ids = stored;
        }
        ids.0 += 1;
        Ok(ids.0)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use redb::TableDefinition;

    use super::*;

    const T: TableDefinition<'static, u64, u64> = TableDefinition::new("t");

    fn db() -> (tempfile::TempDir, Arc<Db>) {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let cap = Dir::open_ambient_dir(dir.path(), cap_std::ambient_authority()).unwrap();
        let db = Arc::new(Db::open(&cap, "t.db", "test database").unwrap());
        (dir, db)
    }

    #[test]
    fn a_panic_in_a_read_is_an_error_and_reads_go_on() {
        let (_dir, db) = db();
        db.write(Durability::Immediate, |txn| {
            txn.open_table(T)?.insert(1, 7)?;
            Ok(())
        })
        .unwrap();
        let r: Result<()> = db.read_with(|_| panic!("what a damaged page does to redb"));
        let e = r.expect_err("contained");
        assert_eq!(e.kind(), crate::ErrorKind::Internal);
        assert!(e.to_string().contains("damaged"), "{e}");
        assert_eq!(value(&db, 1), Some(7));
        let kept = contained(|| -> Result<u64> { panic!("through a kept table") });
        assert!(kept.is_err());
    }

    /// Bytes allocated to the file at `path` and its size.
    fn allocated(path: &std::path::Path) -> (u64, u64) {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).unwrap();
        (m.blocks() * 512, m.size())
    }

    #[test]
    fn every_block_and_a_reserve_stay_allocated_as_the_file_grows_and_shrinks() {
        let (dir, db) = db();
        let path = dir.path().join("t.db");
        let whole = |when: &str| {
            let (blocks, size) = allocated(&path);
            assert!(
                blocks + reserve_for(size) / 8 >= size + reserve_for(size),
                "{when}: {blocks} allocated for {size}"
            );
            size
        };
        let fresh = whole("after open");
        // A small store keeps about its own size, not what a large one needs.
        assert!(allocated(&path).0 <= 2 * fresh + (2 << 20), "{:?}", allocated(&path));
        const BIG: TableDefinition<'static, u64, &[u8]> = TableDefinition::new("big");
        let value = vec![7u8; 256 << 10];
        let grow = |from: u64, to: u64| {
            for k in from..to {
                let v = value.clone();
                db.write(Durability::Immediate, move |txn| {
                    txn.open_table(BIG)?.insert(k, &v[..])?;
                    Ok(())
                })
                .unwrap();
            }
        };
        // Past the reserve and past redb's first region, so that it grows by regions.
        let rounds = 3 * RESERVE / (256 << 10);
        grow(0, rounds);
        let grown = whole("grown");
        assert!(grown > 2 * RESERVE, "the file grew to {grown} only");
        // Emptied, redb shrinks the file, which frees what was reserved past its end;
        // growing again must not write into holes.
        for k in 0..rounds {
            db.write(Durability::Immediate, move |txn| {
                txn.open_table(BIG)?.remove(k)?;
                Ok(())
            })
            .unwrap();
            whole(&format!("after removing {k}"));
        }
        grow(rounds, rounds + rounds / 2);
        whole("grown again");
    }

    /// A file backend whose writes fail with "no space" while `full` is set.
    #[derive(Debug)]
    struct Filling {
        file: FileBackend,
        full: Arc<std::sync::atomic::AtomicBool>,
    }

    impl redb::StorageBackend for Filling {
        fn len(&self) -> std::io::Result<u64> {
            self.file.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
            self.file.read(offset, out)
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.file.set_len(len)
        }
        fn sync_data(&self) -> std::io::Result<()> {
            self.file.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            if self.full.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(std::io::Error::from_raw_os_error(28));
            }
            self.file.write(offset, data)
        }
    }

    /// A database in the new file `path` whose writes fail with "no space" while the
    /// flag returned is set (for other modules' tests of a failed write).
    pub(crate) fn filling(path: &std::path::Path) -> (Db, Arc<std::sync::atomic::AtomicBool>) {
        let file = std::fs::File::create_new(path).unwrap();
        let reserve =
            Reserve { file: file.try_clone().unwrap(), failing: false, unsupported: false };
        let full = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let backend = Filling { file: FileBackend::new(file).unwrap(), full: full.clone() };
        (Db::on(backend, reserve, "t.db", "test database").unwrap(), full)
    }

    #[test]
    fn a_write_that_fails_marks_the_database_broken_as_redb_keeps_it() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let (db, full) = filling(&dir.path().join("t.db"));
        let put = |k: u64| {
            db.write(Durability::Immediate, move |txn| {
                txn.open_table(T)?.insert(k, k)?;
                Ok(())
            })
        };
        put(1).unwrap();
        assert_eq!(db.broken(), None);
        full.store(true, std::sync::atomic::Ordering::Relaxed);
        let e = put(2).expect_err("the disk is full");
        assert!(e.to_string().contains("No space left"), "{e}");
        let why = db.broken().expect("a failed commit breaks redb");
        assert!(why.contains("No space left"), "{why}");
        // The disk has room again, but redb refuses every write until it is reopened.
        full.store(false, std::sync::atomic::Ordering::Relaxed);
        let e = put(3).expect_err("redb keeps refusing");
        assert!(e.to_string().contains("Previous I/O error"), "{e}");
        assert_eq!(db.broken(), Some(why));
    }

    fn value(db: &Db, k: u64) -> Option<u64> {
        let r = db.read().unwrap();
        let t = r.open_table(T).ok()?;
        t.get(k).unwrap().map(|g| g.value())
    }

    #[test]
    fn concurrent_writers_share_commits_and_each_gets_its_own_answer() {
        let (_dir, db) = db();
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let db = db.clone();
                std::thread::spawn(move || {
                    for i in 0..50u64 {
                        let k = t * 1000 + i;
                        let got = db
                            .write(Durability::Immediate, move |txn| {
                                txn.open_table(T)?.insert(k, k * 2)?;
                                Ok(k + 1)
                            })
                            .unwrap();
                        assert_eq!(got, k + 1);
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        for t in 0..8u64 {
            for i in 0..50u64 {
                assert_eq!(value(&db, t * 1000 + i), Some((t * 1000 + i) * 2));
            }
        }
        let s = db.stats();
        assert_eq!(s.operations, 400);
        assert!(s.commits <= 400, "{s:?}");
    }

    #[test]
    fn a_failing_operation_leaves_nothing_and_spares_the_others() {
        let (_dir, db) = db();
        // Queue three operations behind a slow leader so they share one batch.
        let slow = {
            let db = db.clone();
            std::thread::spawn(move || {
                db.write(Durability::Immediate, |txn| {
                    std::thread::sleep(Duration::from_millis(200));
                    txn.open_table(T)?.insert(0, 0)?;
                    Ok(())
                })
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        let ops: Vec<_> = [1u64, 2, 3]
            .into_iter()
            .map(|k| {
                let db = db.clone();
                std::thread::spawn(move || {
                    db.write(Durability::Deferred, move |txn| {
                        txn.open_table(T)?.insert(k, k)?;
                        // Writes, then fails: its write must not survive.
                        if k == 2 { Err(Error::failed_precondition("no")) } else { Ok(k) }
                    })
                })
            })
            .collect();
        let results: Vec<_> = ops.into_iter().map(|t| t.join().unwrap()).collect();
        slow.join().unwrap().unwrap();
        assert_eq!(results[0].as_ref().unwrap(), &1);
        assert_eq!(results[1].as_ref().unwrap_err().kind(), crate::ErrorKind::FailedPrecondition);
        assert_eq!(results[2].as_ref().unwrap(), &3);
        assert_eq!(value(&db, 1), Some(1));
        assert_eq!(value(&db, 2), None);
        assert_eq!(value(&db, 3), Some(3));
    }

    #[test]
    fn a_panicking_operation_is_an_error_not_a_dead_database() {
        let (_dir, db) = db();
        let e =
            db.write(Durability::Immediate, |_txn| -> Result<()> { panic!("boom") }).unwrap_err();
        assert!(e.to_string().contains("panicked"), "{e}");
        db.write(Durability::Immediate, |txn| {
            txn.open_table(T)?.insert(9, 9)?;
            Ok(())
        })
        .unwrap();
        assert_eq!(value(&db, 9), Some(9));
    }

    fn put(k: u64) -> impl FnMut(&redb::WriteTransaction) -> Result<()> + Send + 'static {
        move |txn| {
            txn.open_table(T)?.insert(k, k)?;
            Ok(())
        }
    }

    #[test]
    fn a_carried_write_commits_with_the_first_write_of_its_scope_on_this_thread() {
        let (_dir, db) = db();
        db.write(Durability::Immediate, put(0)).unwrap();
        let before = db.stats();
        let ((), carried) = db.carrying(Durability::Immediate, put(100), || {
            // Another thread's write carries nothing.
            let other = db.clone();
            std::thread::spawn(move || other.write(Durability::Deferred, put(1)))
                .join()
                .unwrap()
                .unwrap();
            assert_eq!(value(&db, 100), None);
            db.write(Durability::Deferred, put(2)).unwrap();
            assert_eq!(value(&db, 100), Some(100), "the first write of the scope carried it");
            db.write(Durability::Deferred, put(3)).unwrap();
        });
        assert!(matches!(carried, Carried::Committed), "{carried:?}");
        let after = db.stats();
        assert_eq!(after.commits - before.commits, 3, "no write of its own");
        // The carried write was durable: so was the commit that carried it, only that.
        assert_eq!(after.durable_commits - before.durable_commits, 1);
        assert_eq!([1, 2, 3].map(|k| value(&db, k)), [Some(1), Some(2), Some(3)]);
    }

    #[test]
    fn a_write_failing_on_its_own_leaves_the_carried_write_to_the_next() {
        let (_dir, db) = db();
        let ((), carried) = db.carrying(Durability::Deferred, put(100), || {
            let e = db
                .write(Durability::Deferred, |txn| -> Result<()> {
                    txn.open_table(T)?.insert(1, 1)?;
                    Err(Error::failed_precondition("no"))
                })
                .unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::FailedPrecondition, "{e}");
            assert_eq!((value(&db, 1), value(&db, 100)), (None, None));
            db.write(Durability::Deferred, put(2)).unwrap();
        });
        assert!(matches!(carried, Carried::Committed), "{carried:?}");
        assert_eq!((value(&db, 2), value(&db, 100)), (Some(2), Some(100)));
    }

    #[test]
    fn a_carried_write_that_fails_fails_every_write_of_its_scope_and_no_other() {
        let (_dir, db) = db();
        let refuse = |txn: &redb::WriteTransaction| -> Result<()> {
            txn.open_table(T)?.insert(100, 100)?;
            Err(Error::not_found("the snapshot"))
        };
        let (errors, carried) = db.carrying(Durability::Deferred, refuse, || {
            [db.write(Durability::Deferred, put(1)), db.write(Durability::Deferred, put(2))]
                .map(|r| r.unwrap_err())
        });
        for e in &errors {
            assert_eq!(e.kind(), crate::ErrorKind::NotFound, "{e}");
            assert!(e.message().contains("a write this one depends on failed"), "{e}");
        }
        let Carried::Failed(e) = carried else { panic!("{carried:?}") };
        assert_eq!(e.kind(), crate::ErrorKind::NotFound, "{e}");
        assert_eq!([1, 2, 100].map(|k| value(&db, k)), [None, None, None]);
        db.write(Durability::Deferred, put(3)).unwrap();
        assert_eq!(value(&db, 3), Some(3), "outside the scope, writes carry nothing");
    }

    #[test]
    fn a_carried_write_no_write_took_is_handed_back() {
        let (_dir, db) = db();
        let before = db.stats();
        let ((), carried) = db.carrying(Durability::Deferred, put(100), || {
            assert_eq!(value(&db, 100), None);
        });
        assert_eq!(db.stats(), before, "nothing was written");
        let Carried::Unused(mut w) = carried else { panic!("{carried:?}") };
        db.write(Durability::Immediate, move |txn| w.run(txn)).unwrap();
        assert_eq!(value(&db, 100), Some(100));
    }
}
