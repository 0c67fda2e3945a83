//! Running cases: a fresh directory per case, mounts tracked and undone whatever
//! happens, panics caught, cases spread over worker threads.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use wasnap::fault::Faults;
use wasnap::metadata::{MetaDb, Snapshotter};
use wasnap::{Backend, Context, Mount};

use crate::report::{CaseResult, Report};

/// How a case ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Everything the case checks held.
    Passed,
    /// Something did not hold; the reason says what.
    Failed(String),
    /// The case could not run here (for example it mounts and we are not root).
    Skipped(String),
}

/// Why a case stopped early. `?` turns wasnap and I/O errors into failures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fail {
    /// A check did not hold.
    Failed(String),
    /// The case cannot run here.
    Skipped(String),
}

impl From<wasnap::Error> for Fail {
    fn from(e: wasnap::Error) -> Self {
        Fail::Failed(e.to_string())
    }
}

impl From<std::io::Error> for Fail {
    fn from(e: std::io::Error) -> Self {
        Fail::Failed(format!("I/O: {e}"))
    }
}

impl From<String> for Fail {
    fn from(e: String) -> Self {
        Fail::Failed(e)
    }
}

/// Which suite a case belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Group {
    /// A case of containerd's snapshotter test suite, by meaning.
    Containerd,
    /// A backend case containerd's suite lacks.
    Extra,
    /// A case for the metadata layer on top of the backend.
    Metadata,
}

impl Group {
    /// Its lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Group::Containerd => "containerd",
            Group::Extra => "extra",
            Group::Metadata => "metadata",
        }
    }
}

/// One conformance case.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    /// Its name; containerd's cases keep containerd's names.
    pub name: &'static str,
    /// Its suite.
    pub group: Group,
    /// What it checks, in a sentence.
    pub about: &'static str,
    /// The check itself.
    pub run: fn(&Env<'_>) -> Result<(), Fail>,
}

/// Opens the backend under test in a directory.
pub trait Factory: Send + Sync {
    /// A name for reports (`native`, `plugin copy.wasm`, ...).
    fn name(&self) -> String;
    /// Opens (creating if needed) a backend whose state lives in `dir`. Called with a
    /// fresh directory for each case, and again with the same one by cases that close
    /// and reopen.
    fn open(&self, dir: &Path) -> wasnap::Result<Arc<dyn Backend>>;
}

/// Opens wasnap's native driver in `dir`, as [`StackFactory::native`](crate::StackFactory::native)
/// does: for factories that wrap it.
pub fn open_native(dir: &Path) -> wasnap::Result<Arc<dyn Backend>> {
    crate::StackFactory::native().open(dir)
}

/// The harness is an edge like the CLI: it turns paths it was given into capabilities.
fn cap_dir(dir: &Path) -> wasnap::Result<cap_std::fs::Dir> {
    cap_std::fs::Dir::open_ambient_dir(dir, cap_std::ambient_authority())
        .with_context(|| format!("open {}", dir.display()))
}

/// How to run the suite.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where each case's temporary directory goes.
    pub base: PathBuf,
    /// How many cases run at once.
    pub jobs: usize,
    /// Run only cases whose name contains one of these (case-insensitive).
    pub patterns: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        let shm = Path::new("/dev/shm");
        Options {
            base: if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() },
            jobs: std::thread::available_parallelism().map_or(2, |n| n.get()),
            patterns: Vec::new(),
        }
    }
}

impl Options {
    /// Whether `case` is selected by the patterns.
    pub fn selects(&self, case: &Case) -> bool {
        let name = case.name.to_lowercase();
        self.patterns.is_empty() || self.patterns.iter().any(|p| name.contains(&p.to_lowercase()))
    }
}

/// What a case works in: its own directory, the factory, and a record of its mounts.
pub struct Env<'a> {
    factory: &'a dyn Factory,
    dir: PathBuf,
    mounts: Mutex<Vec<PathBuf>>,
    seq: AtomicUsize,
}

impl std::fmt::Debug for Env<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Env").field("dir", &self.dir).finish_non_exhaustive()
    }
}

/// A mount made by [`Env::mount`]; unmounted when dropped.
#[derive(Debug)]
pub struct Mounted<'e> {
    path: PathBuf,
    env: &'e Env<'e>,
}

impl Mounted<'_> {
    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unmounts now, reporting failure (dropping unmounts too, silently).
    pub fn unmount(self) -> Result<(), Fail> {
        let r = self.env.unmount(&self.path);
        std::mem::forget(self);
        r
    }
}

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        let _ = self.env.unmount(&self.path);
    }
}

/// Fails a case that needs root when not running as root, with the reason.
pub fn require_root() -> Result<(), Fail> {
    if rustix::process::geteuid().is_root() {
        Ok(())
    } else {
        Err(Fail::Skipped("needs root to mount snapshots".into()))
    }
}

impl<'a> Env<'a> {
    fn new(factory: &'a dyn Factory, dir: PathBuf) -> Self {
        Env { factory, dir, mounts: Mutex::new(Vec::new()), seq: AtomicUsize::new(0) }
    }

    /// The directory the backend keeps its state in.
    pub fn backend_dir(&self) -> PathBuf {
        self.dir.join("backend")
    }

    /// Opens the backend under test (again, if it was opened before).
    pub fn open(&self) -> Result<Arc<dyn Backend>, Fail> {
        let dir = self.backend_dir();
        std::fs::create_dir_all(&dir)?;
        self.factory.open(&dir).map_err(|e| Fail::Failed(format!("open backend: {e}")))
    }

    /// The metadata layer over `backend`, with its database in this case's directory.
    pub fn metadata(&self, backend: Arc<dyn Backend>) -> Result<Snapshotter, Fail> {
        let dir = self.dir.join("meta");
        std::fs::create_dir_all(&dir)?;
        let db = MetaDb::open(&cap_dir(&dir)?)?;
        Ok(Snapshotter::new(Arc::new(db), "under-test", backend, Arc::new(Faults::new())))
    }

    /// A fresh empty directory for the case's own use.
    pub fn scratch(&self, what: &str) -> Result<PathBuf, Fail> {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let p = self.dir.join("work").join(format!("{what}-{n}"));
        std::fs::create_dir_all(&p)?;
        Ok(p)
    }

    /// Performs `mounts` on a fresh directory; skips the case when not root.
    pub fn mount(&self, mounts: &[Mount]) -> Result<Mounted<'_>, Fail> {
        require_root()?;
        let target = self.scratch("mnt")?;
        wasnap::mount::mount_all(mounts, &target)
            .map_err(|e| Fail::Failed(format!("mount {mounts:?}: {e}")))?;
        self.lock().push(target.clone());
        Ok(Mounted { path: target, env: self })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<PathBuf>> {
        self.mounts.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn unmount(&self, path: &Path) -> Result<(), Fail> {
        self.lock().retain(|p| p != path);
        wasnap::mount::unmount(path).map_err(|e| Fail::Failed(format!("unmount: {e}")))
    }

    /// Undoes whatever a case left mounted (it panicked, or leaked a guard).
    fn unmount_all(&self) -> Vec<String> {
        let left: Vec<PathBuf> = self.lock().drain(..).rev().collect();
        left.iter()
            .filter_map(|p| {
                wasnap::mount::unmount(p).err().map(|e| format!("{}: {e}", p.display()))
            })
            .collect()
    }
}

/// Runs `cases` (those `opts` selects) against the backend `factory` opens.
pub fn run(factory: &dyn Factory, cases: &[Case], opts: &Options) -> Report {
    let selected: Vec<&Case> = cases.iter().filter(|c| opts.selects(c)).collect();
    let results: Mutex<Vec<Option<CaseResult>>> = Mutex::new(vec![None; selected.len()]);
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..opts.jobs.clamp(1, selected.len().max(1)) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(case) = selected.get(i) else { break };
                    let r = run_one(factory, case, opts);
                    results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(r);
                }
            });
        }
    });
    let results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    Report { backend: factory.name(), results: results.into_iter().flatten().collect() }
}

fn run_one(factory: &dyn Factory, case: &Case, opts: &Options) -> CaseResult {
    let start = Instant::now();
    let outcome = match tempfile::Builder::new()
        .prefix(&format!("wasnap-conformance-{}-", case.name))
        .tempdir_in(&opts.base)
    {
        Err(e) => Outcome::Failed(format!("create a directory in {}: {e}", opts.base.display())),
        Ok(tmp) => {
            let env = Env::new(factory, tmp.path().to_path_buf());
            let ran = catch_unwind(AssertUnwindSafe(|| (case.run)(&env)));
            let left = env.unmount_all();
            let mut outcome = match ran {
                Ok(Ok(())) => Outcome::Passed,
                Ok(Err(Fail::Failed(m))) => Outcome::Failed(m),
                Ok(Err(Fail::Skipped(m))) => Outcome::Skipped(m),
                Err(panic) => Outcome::Failed(format!("panicked: {}", panic_message(&panic))),
            };
            if !left.is_empty() && outcome == Outcome::Passed {
                outcome = Outcome::Failed(format!("could not unmount: {}", left.join("; ")));
            }
            remove(tmp);
            outcome
        }
    };
    CaseResult { name: case.name.to_owned(), group: case.group, outcome, duration: start.elapsed() }
}

/// Removes a case's directory even if it holds read-only trees.
fn remove(tmp: tempfile::TempDir) {
    let path = tmp.keep();
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else { return };
    if let Ok(parent) = cap_dir(parent) {
        let _ = wasnap::fsutil::remove_tree(&parent, name);
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}
