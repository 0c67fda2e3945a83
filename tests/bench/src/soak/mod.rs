//! `wasnap-bench soak`: a long concurrent run against one real `wasnap daemon`, with
//! faults, and an invariant checker (issue 14). It prints a table; it asserts no times.
//!
//! N clients ([`ops`]) run a seeded random mix of containerd's snapshot operations
//! (prepare, view, commit, remove, stat, label updates, List with and without filters,
//! usage, mounts) and lease operations (create, delete, leases that expire) across
//! three namespaces and the snapshotters `native`, `overlay` and the `copy` guest
//! behind the `label-policy` guest, writing a file of random bytes into every active
//! snapshot and reading every layer's files back through views and mounts. The daemon
//! collects on a short schedule and on demand.
//!
//! Meanwhile the driver ([`run`]) kills the daemon (`kill -9`) at random moments and
//! starts some lives with one fault point armed to abort ([`faults`]); after each death
//! it restarts the daemon on the same root and runs the checker ([`check`]) before any
//! client goes on, then again at intervals and at the end. What a client was told
//! succeeded must survive; what a lost reply may have done may go either way, but never
//! half way. Violations are listed and make the command exit 1.
//!
//! The root is on a real disk by default (`/var/tmp`): kill and crash durability is
//! what is checked.

mod check;
mod faults;
mod model;
mod ops;
mod proc;
mod rng;

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedRwLockWriteGuard, RwLock, watch};
use wasnap::Context;
use wasnap::error::{Error, Result};
use wasnap_cli::output::table;
use wasnap_cli::stats::{Stats, fmt_d};
use wasnap_daemon::client::Client;

use self::faults::{Fault, Plan};
use self::model::{Model, SnapId};
use self::ops::Outcome;
use self::proc::{Daemon, Exit, Sample};
use self::rng::Rng;

/// What `wasnap-bench soak` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    pub clients: usize,
    pub duration: Duration,
    pub dir: PathBuf,
    pub seed: u64,
    pub kills: u32,
    /// Chance in percent that a restarted life arms a fault point.
    pub arm_percent: u64,
    /// Chance in percent that a change on `copy` dies in the `chaos` guest.
    pub guest_faults: u64,
    /// Full-disk windows (0: none, and the root is in `dir` itself).
    pub full_disk: u32,
    pub check_every: Duration,
    pub copy_guest: Option<PathBuf>,
    pub max_fds: u64,
    pub max_threads: u64,
    pub max_rss_mib: u64,
    pub keep: bool,
}

/// The daemon's connection as the clients see it: `None` while it is down. Each death
/// and each start bumps the generation, so a client can tell whether its call met one.
#[derive(Debug, Clone, Default)]
pub struct Conn {
    pub generation: u64,
    pub client: Option<Client>,
}

/// What clients and the checker share.
pub struct Shared {
    model: Mutex<Model>,
    /// Clients hold it for reading during each step; the checker and restarts for
    /// writing, so they see no call in flight.
    pub pause: Arc<RwLock<()>>,
    pub conn: watch::Receiver<Conn>,
    pub stop: AtomicBool,
    /// On-demand collections running now.
    pub gc_running: AtomicUsize,
    pub namespaces: Vec<String>,
    pub snapshotters: Vec<String>,
    /// `copy` sits behind the `label-policy` guest.
    pub policy: bool,
    /// `copy` sits behind the `chaos` guest too: its changes may fail with a guest's
    /// death, which must leave nothing changed.
    pub chaos: bool,
    /// The driver's ballast fills the disk now.
    pub disk_full: AtomicBool,
    tally: Mutex<Tally>,
    reported: Mutex<HashSet<SnapId>>,
}

#[derive(Debug, Default)]
struct Tally {
    /// ok, refused as expected, lost.
    ops: BTreeMap<&'static str, [u64; 3]>,
    latency: Vec<Duration>,
    latency_gc: Vec<Duration>,
    violations: Vec<String>,
    collections: u64,
    collected: u64,
    /// Changes that failed because the `chaos` guest died in them.
    guest_deaths: u64,
    /// Calls that failed saying the disk was full.
    no_space: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub fn model(&self) -> MutexGuard<'_, Model> {
        lock(&self.model)
    }

    /// Records an invariant violation (and logs it at once).
    pub fn violation(&self, what: String) {
        tracing::error!("violation: {what}");
        lock(&self.tally).violations.push(what);
    }

    /// Whether `id` has not been reported yet (a survivor is reported once).
    pub fn first_report(&self, id: &SnapId) -> bool {
        lock(&self.reported).insert(id.clone())
    }

    pub fn count(&self, op: &'static str, outcome: Outcome, latency: Option<(Duration, bool)>) {
        let mut t = lock(&self.tally);
        let i = match outcome {
            Outcome::Ok => 0,
            Outcome::Refused => 1,
            Outcome::Lost => 2,
        };
        t.ops.entry(op).or_default()[i] += 1;
        if let Some((d, under_gc)) = latency {
            t.latency.push(d);
            if under_gc {
                t.latency_gc.push(d);
            }
        }
    }

    /// A call failed saying the disk was full.
    pub fn no_space(&self) {
        lock(&self.tally).no_space += 1;
    }

    /// A change failed because the `chaos` guest died in it.
    pub fn guest_died(&self) {
        lock(&self.tally).guest_deaths += 1;
    }

    pub fn gc_done(&self, r: &wasnap::gc::GcReport) {
        let mut t = lock(&self.tally);
        t.collections += 1;
        t.collected += r.removed.len() as u64;
    }

    fn violations(&self) -> usize {
        lock(&self.tally).violations.len()
    }
}

/// The guests of the soak's `copy` snapshotter.
struct Guests {
    copy: PathBuf,
    /// `label-policy`, in front of it, if found.
    policy: Option<PathBuf>,
    /// `chaos`, in front of it behind `label-policy`, if found.
    chaos: Option<PathBuf>,
}

/// The guests: the copy guest and, if found, the policies in front of it.
fn guests(copy: Option<&Path>) -> std::result::Result<Guests, String> {
    match copy {
        Some(c) => {
            let beside = |f: &str| Some(c.with_file_name(f)).filter(|p| p.is_file());
            Ok(Guests {
                copy: c.to_path_buf(),
                policy: beside("label_policy.wasm"),
                chaos: beside("chaos.wasm"),
            })
        }
        None => Ok(Guests {
            copy: wasnap_test_util::guests::path("copy")?,
            policy: wasnap_test_util::guests::path("label-policy").ok(),
            chaos: wasnap_test_util::guests::path("chaos").ok(),
        }),
    }
}

/// The calls of `copy` the `chaos` guest may kill. Not `remove`: collections remove
/// through the chain too, and a collection failed in part is a violation of its own.
const CHAOS_CALLS: &str = r#"["prepare", "view", "commit", "update"]"#;

fn config(guests: Option<&Guests>, overlay: bool, opts: &Options) -> String {
    let mut c = String::from(
        "default_snapshotter = \"native\"\n\n[snapshotters.native]\ndriver = \"native\"\n",
    );
    if overlay {
        c.push_str("\n[snapshotters.overlay]\ndriver = \"overlay\"\n");
    }
    if let Some(g) = guests {
        c.push_str(&format!(
            "\n[snapshotters.copy]\ndriver = \"wasm\"\npath = {:?}\n",
            g.copy.display().to_string()
        ));
        if let Some(p) = &g.policy {
            c.push_str(&format!(
                "\n[[snapshotters.copy.policies]]\npath = {:?}\nconfig = {{ deny = [\"{}*\"] }}\n",
                p.display().to_string(),
                ops::FORBIDDEN
            ));
        }
        if let (Some(p), true) = (&g.chaos, opts.guest_faults > 0) {
            // The checker's own views (keys `chk-…`) are spared; a hang costs 2 s.
            c.push_str(&format!(
                "\n[[snapshotters.copy.policies]]\npath = {:?}\n\
                 config = {{ percent = {}, seed = {}, calls = {CHAOS_CALLS}, spare = \"/chk-\" }}\n\
                 limits = {{ timeout_ms = 2000, memory_mib = 32 }}\n",
                p.display().to_string(),
                opts.guest_faults,
                opts.seed,
            ));
        }
    }
    // Collections on their own often: after removals, after changes, and every 5 s.
    c.push_str(
        "\n[gc]\ninterval_secs = 5\ndeletion_threshold = 20\nmutation_threshold = 400\n\
         max_time_share_percent = 20\n",
    );
    c
}

/// Peaks of the daemon's resources after each life's warm-up.
#[derive(Debug, Default, Clone, Copy)]
struct Peaks {
    fds: u64,
    threads: u64,
    rss_kib: u64,
}

/// The size of the root's filesystem when the soak fills it.
const FULL_DISK_MIB: u64 = 1024;

/// Longest a check may take (the final one reads every snapshot's files).
const CHECK_TIMEOUT: Duration = Duration::from_secs(600);

/// How long a life runs before its resources count.
const WARM_UP: Duration = Duration::from_secs(5);

struct Driver {
    sh: Arc<Shared>,
    conn: watch::Sender<Conn>,
    daemon: Daemon,
    rng: Rng,
    plan: Plan,
    opts: Options,
    generation: u64,
    /// What the running life has armed.
    armed: Option<Fault>,
    /// The root filesystem's top, where a ballast fills it (with `--full-disk`).
    ballast_dir: Option<PathBuf>,
    life_started: Instant,
    /// Random kills survived, and deaths at armed points.
    kills: u64,
    aborts: u64,
    /// Per fault kind: (injected, hit).
    faults: BTreeMap<String, (u64, u64)>,
    checks: u64,
    covered: check::Covered,
    counter: u64,
    peaks: Peaks,
    over: HashSet<&'static str>,
}

impl Driver {
    fn bump(&mut self, client: Option<Client>) {
        self.generation += 1;
        self.conn.send_replace(Conn { generation: self.generation, client });
    }

    /// Starts a life, arming what the plan says unless `quiet`.
    async fn start(&mut self, quiet: bool) -> Result<Client> {
        let fault = if quiet { None } else { self.plan.next_life(&mut self.rng, false) };
        let spec = fault.as_ref().and_then(faults::spec);
        if let Some(f) = &fault {
            self.faults.entry(f.kind()).or_default().0 += 1;
        }
        self.armed = fault;
        let client = self.daemon.start(spec.as_deref()).await?;
        self.life_started = Instant::now();
        self.bump(Some(client.clone()));
        Ok(client)
    }

    /// Accounts for a death (`exit`), `ours` if we sent the SIGKILL.
    fn died(&mut self, exit: &Exit, ours: bool) {
        let point = self.daemon.last_abort_point();
        match (&self.armed, exit.aborted()) {
            (Some(Fault::AbortAt(p)), true) if point.as_deref() == Some(p.as_str()) => {
                self.aborts += 1;
                self.faults.entry(Fault::AbortAt(p.clone()).kind()).or_default().1 += 1;
            }
            _ if ours && exit.killed() => {
                self.kills += 1;
                self.faults.entry(Fault::Kill.kind()).or_default().1 += 1;
            }
            _ => self.sh.violation(format!(
                "the daemon died on its own ({:?}, armed {:?}):\n{}",
                exit.status,
                self.armed,
                self.daemon.log_tail()
            )),
        }
        self.armed = None;
    }

    /// After a death: clients paused, restart (arming a point unless `quiet`), check;
    /// again while the check meets a death.
    async fn recover(&mut self, guard: &OwnedRwLockWriteGuard<()>, quiet: bool) -> Result<()> {
        loop {
            let client = self.start(quiet).await?;
            if self.run_check(guard, &client, "after a restart", 20).await? {
                return Ok(());
            }
        }
    }

    /// One check; false if the daemon died during it (accounted for; restart needed).
    async fn run_check(
        &mut self,
        _paused: &OwnedRwLockWriteGuard<()>,
        client: &Client,
        stage: &str,
        sample: usize,
    ) -> Result<bool> {
        self.checks += 1;
        // A death during the check ends it at once: calls to a dead daemon may wait on
        // the connection instead of failing.
        let checked = tokio::time::timeout(
            CHECK_TIMEOUT,
            check::check(client, &self.sh, stage, sample, &mut self.rng, &mut self.counter),
        );
        let r = tokio::select! {
            r = checked => r,
            exit = self.daemon.exited() => {
                self.bump(None);
                self.died(&exit, false);
                return Ok(false);
            }
        };
        let Ok(r) = r else {
            self.sh.violation(format!("check ({stage}): no end within {CHECK_TIMEOUT:?}"));
            return Ok(true);
        };
        match r {
            Ok(c) => {
                self.covered.snapshots += c.snapshots;
                self.covered.contents += c.contents;
                Ok(true)
            }
            Err(f) => {
                // Was it a death? The waiting thread reports one at once.
                let exit = tokio::time::timeout(Duration::from_secs(5), self.daemon.exited()).await;
                match exit {
                    Ok(exit) => {
                        self.bump(None);
                        self.died(&exit, false);
                        Ok(false)
                    }
                    Err(_) => {
                        self.sh.violation(format!(
                            "check ({stage}): {} failed on a live daemon: {:?} {}",
                            f.what,
                            f.status.code(),
                            f.status.message()
                        ));
                        Ok(true)
                    }
                }
            }
        }
    }

    /// A full-disk window: the ballast takes every free block for [`faults::FULL_FOR`]
    /// while the clients go on; then, with the clients paused, it goes and the checker
    /// runs.
    async fn fill_disk(&mut self) -> Result<()> {
        let Some(dir) = self.ballast_dir.clone() else { return Ok(()) };
        self.faults.entry(Fault::DiskFull.kind()).or_default().0 += 1;
        self.sh.disk_full.store(true, Ordering::Release);
        let filled = tokio::task::spawn_blocking(move || {
            wasnap_conformance::loopfs::Ballast::fill(&dir, "soak-ballast")
        })
        .await;
        let ballast = match filled {
            Ok(Ok(b)) => Some(b),
            Ok(Err(e)) => {
                self.sh.violation(format!("could not fill the disk: {e}"));
                None
            }
            Err(e) => {
                self.sh.violation(format!("could not fill the disk: {e}"));
                None
            }
        };
        let died = tokio::select! {
            _ = tokio::time::sleep(faults::FULL_FOR) => None,
            exit = self.daemon.exited() => Some(exit),
        };
        // Every call made on the full disk ends before the disk has room again.
        let pause = self.sh.pause.clone().write_owned();
        tokio::pin!(pause);
        let (guard, died) = match died {
            Some(exit) => {
                self.bump(None);
                (pause.await, Some(exit))
            }
            None => tokio::select! {
                guard = &mut pause => (guard, None),
                exit = self.daemon.exited() => {
                    self.bump(None);
                    (pause.await, Some(exit))
                }
            },
        };
        drop(ballast);
        self.sh.disk_full.store(false, Ordering::Release);
        if let Some(exit) = died {
            self.died(&exit, false);
            return self.recover(&guard, false).await;
        }
        let client = self.sh.conn.borrow().client.clone();
        if let Some(client) = client
            && !self.run_check(&guard, &client, "after a full disk", 20).await?
        {
            self.recover(&guard, false).await?;
        }
        Ok(())
    }

    fn sample(&mut self) {
        let Some(s) = self.daemon.sample() else { return };
        if self.life_started.elapsed() < WARM_UP {
            return;
        }
        let Sample { fds, threads, rss_kib } = s;
        self.peaks.fds = self.peaks.fds.max(fds);
        self.peaks.threads = self.peaks.threads.max(threads);
        self.peaks.rss_kib = self.peaks.rss_kib.max(rss_kib);
        let bounds = [
            ("fds", fds, self.opts.max_fds),
            ("threads", threads, self.opts.max_threads),
            ("RSS MiB", rss_kib / 1024, self.opts.max_rss_mib),
        ];
        for (what, v, max) in bounds {
            if v > max && self.over.insert(what) {
                self.sh.violation(format!("the daemon's {what} reached {v}, over the bound {max}"));
            }
        }
    }
}

/// Runs the soak and prints its tables; returns whether it found no violation.
pub fn run(opts: &Options, wasnap: &Path, out: &mut dyn Write) -> Result<bool> {
    let io = |e: std::io::Error| Error::from(e).context("soak");
    let root_user = rustix::process::geteuid().is_root();
    let guests = match guests(opts.copy_guest.as_deref()) {
        Ok(g) => Some(g),
        Err(why) => {
            writeln!(out, "soak: no copy guest ({why}); native and overlay only").map_err(io)?;
            None
        }
    };
    let mut snapshotters = vec!["native".to_owned()];
    if root_user {
        snapshotters.push("overlay".into());
    } else {
        writeln!(out, "soak: not root; no overlay snapshotter").map_err(io)?;
    }
    if guests.is_some() {
        snapshotters.push("copy".into());
    }
    let policy = guests.as_ref().is_some_and(|g| g.policy.is_some());
    let chaos = opts.guest_faults > 0 && guests.as_ref().is_some_and(|g| g.chaos.is_some());
    let tmp = tempfile::Builder::new().prefix("wasnap-soak-").tempdir_in(&opts.dir).map_err(io)?;
    // With full-disk windows the root is on a small filesystem of its own, which the
    // ballast can fill; the log, socket and config stay beside it.
    let loopfs = match opts.full_disk {
        0 => None,
        _ if !root_user => {
            writeln!(out, "soak: not root; no full-disk windows").map_err(io)?;
            None
        }
        _ => Some(
            wasnap_conformance::loopfs::LoopFs::try_new_of("ext4", FULL_DISK_MIB, &opts.dir)
                .map_err(|why| Error::internal(format!("soak: a filesystem to fill: {why}")))?,
        ),
    };
    let root = match &loopfs {
        Some(l) => l.mountpoint.join("wasnap-root"),
        None => tmp.path().join("wasnap-root"),
    };
    let fs = match &loopfs {
        Some(_) => format!(
            "a {FULL_DISK_MIB} MiB loop ext4 on {}",
            wasnap::probe::filesystem_name(&opts.dir)
        ),
        None => wasnap::probe::filesystem_name(&opts.dir).to_string(),
    };
    writeln!(
        out,
        "soak: seed {}, {} clients for {}, {} kills, {} full-disk windows, root {} ({fs}), snapshotters {}{}{}",
        opts.seed,
        opts.clients,
        humantime::format_duration(opts.duration),
        opts.kills,
        if loopfs.is_some() { opts.full_disk } else { 0 },
        root.display(),
        snapshotters.join(", "),
        if policy { " (copy behind label-policy)" } else { "" },
        if chaos {
            format!(" (and behind chaos: {}% of its changes die)", opts.guest_faults)
        } else {
            String::new()
        },
    )
    .map_err(io)?;
    out.flush().map_err(io)?;
    let daemon = Daemon::new(wasnap, tmp.path(), &root, &config(guests.as_ref(), root_user, opts))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .with_context(|| "soak runtime")?;
    let started = Instant::now();
    let ballast_dir = loopfs.as_ref().map(|l| l.mountpoint.clone());
    let result = rt.block_on(drive(opts, daemon, snapshotters, policy, chaos, ballast_dir));
    let wall = started.elapsed();
    let (sh, d) = result?;
    report(opts, &sh, &d, wall, out)?;
    let clean = sh.violations() == 0;
    // The daemon goes before its filesystem is unmounted.
    drop(d);
    if opts.keep {
        writeln!(out, "soak: kept {}", tmp.keep().display()).map_err(io)?;
        if let Some(l) = loopfs {
            writeln!(out, "soak: kept the root's filesystem mounted at {}", l.mountpoint.display())
                .map_err(io)?;
            std::mem::forget(l);
        }
    }
    Ok(clean)
}

async fn drive(
    opts: &Options,
    mut daemon: Daemon,
    snapshotters: Vec<String>,
    policy: bool,
    chaos: bool,
    ballast_dir: Option<PathBuf>,
) -> Result<(Arc<Shared>, Driver)> {
    let (tx, rx) = watch::channel(Conn::default());
    let first = daemon.start(None).await?;
    let sh = Arc::new(Shared {
        model: Mutex::new(Model::default()),
        pause: Arc::new(RwLock::new(())),
        conn: rx,
        stop: AtomicBool::new(false),
        gc_running: AtomicUsize::new(0),
        namespaces: (0..3).map(|i| format!("soak{i}")).collect(),
        snapshotters,
        policy,
        chaos,
        disk_full: AtomicBool::new(false),
        tally: Mutex::new(Tally::default()),
        reported: Mutex::new(HashSet::new()),
    });
    let end = Instant::now() + opts.duration;
    let mut d = Driver {
        sh: sh.clone(),
        conn: tx,
        daemon,
        rng: Rng::new(opts.seed),
        plan: Plan::new(
            opts.kills,
            if ballast_dir.is_some() { opts.full_disk } else { 0 },
            end,
            opts.arm_percent,
        ),
        opts: opts.clone(),
        generation: 0,
        armed: None,
        ballast_dir,
        life_started: Instant::now(),
        kills: 0,
        aborts: 0,
        faults: BTreeMap::new(),
        checks: 0,
        covered: check::Covered::default(),
        counter: 0,
        peaks: Peaks::default(),
        over: HashSet::new(),
    };
    d.bump(Some(first));
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..opts.clients {
        clients.spawn(ops::run(sh.clone(), i, opts.seed));
    }
    let mut next_kill = d.plan.next_kill(&mut d.rng, Instant::now());
    let mut next_full = d.plan.next_full(&mut d.rng, Instant::now());
    let mut next_check = Instant::now() + opts.check_every;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let end_at = tokio::time::Instant::from_std(end);
    loop {
        let kill_at =
            tokio::time::Instant::from_std(next_kill.unwrap_or(end + Duration::from_secs(3600)));
        let full_at =
            tokio::time::Instant::from_std(next_full.unwrap_or(end + Duration::from_secs(3600)));
        tokio::select! {
            exit = d.daemon.exited() => {
                d.bump(None);
                d.died(&exit, false);
                let guard = sh.pause.clone().write_owned().await;
                d.recover(&guard, false).await?;
            }
            _ = tokio::time::sleep_until(kill_at), if next_kill.is_some() => {
                d.bump(None);
                d.faults.entry(Fault::Kill.kind()).or_default().0 += 1;
                if d.daemon.running() {
                    // It may have died at an armed point just now: the exit tells which.
                    let _ = d.daemon.kill();
                    let exit = d.daemon.exited().await;
                    d.died(&exit, true);
                }
                d.plan.killed();
                let guard = sh.pause.clone().write_owned().await;
                d.recover(&guard, false).await?;
                next_kill = d.plan.next_kill(&mut d.rng, Instant::now());
            }
            _ = tokio::time::sleep_until(full_at), if next_full.is_some() => {
                d.fill_disk().await?;
                d.plan.filled();
                next_full = d.plan.next_full(&mut d.rng, Instant::now());
                next_check = Instant::now() + opts.check_every;
            }
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(next_check)) => {
                // Clients finish their calls before the pause is ours; a death meanwhile
                // must be seen now, or clients waiting to learn of it hold the pause.
                let pause = sh.pause.clone().write_owned();
                tokio::pin!(pause);
                let (guard, exit) = tokio::select! {
                    guard = &mut pause => (guard, None),
                    exit = d.daemon.exited() => {
                        d.bump(None);
                        (pause.await, Some(exit))
                    }
                };
                if let Some(exit) = exit {
                    d.died(&exit, false);
                    d.recover(&guard, false).await?;
                } else if let Some(client) = sh.conn.borrow().client.clone()
                    && !d.run_check(&guard, &client, "interval", 20).await?
                {
                    d.recover(&guard, false).await?;
                }
                next_check = Instant::now() + opts.check_every;
            }
            _ = tick.tick() => d.sample(),
            _ = tokio::time::sleep_until(end_at) => break,
        }
    }
    sh.stop.store(true, Ordering::Release);
    let stopped = tokio::time::timeout(Duration::from_secs(300), async {
        while clients.join_next().await.is_some() {}
    })
    .await;
    if stopped.is_err() {
        sh.violation("clients did not stop within 5 minutes of the end".into());
        clients.abort_all();
    }
    // The final check: every snapshot's content, with nothing armed.
    let guard = sh.pause.clone().write_owned().await;
    if d.armed.is_some() {
        d.bump(None);
        d.faults.entry(Fault::Kill.kind()).or_default().0 += 1;
        let _ = d.daemon.kill();
        let exit = d.daemon.exited().await;
        d.died(&exit, true);
        d.recover(&guard, true).await?;
    }
    loop {
        let Some(client) = sh.conn.borrow().client.clone() else { break };
        if d.run_check(&guard, &client, "final", usize::MAX).await? {
            break;
        }
        let client = d.start(true).await?;
        drop(client);
    }
    d.sample();
    drop(guard);
    Ok((sh, d))
}

fn report(
    opts: &Options,
    sh: &Shared,
    d: &Driver,
    wall: Duration,
    out: &mut dyn Write,
) -> Result<()> {
    let io = |e: std::io::Error| Error::from(e).context("soak");
    let t = lock(&sh.tally);
    writeln!(out, "\nsoak: operations (ok / refused as expected / reply lost to a death)")
        .map_err(io)?;
    let mut rows = Vec::new();
    let mut total = [0u64; 3];
    for op in ops::OPS {
        let c = t.ops.get(op).copied().unwrap_or_default();
        for i in 0..3 {
            total[i] += c[i];
        }
        rows.push(vec![op.to_string(), c[0].to_string(), c[1].to_string(), c[2].to_string()]);
    }
    rows.push(vec![
        "total".into(),
        total[0].to_string(),
        total[1].to_string(),
        total[2].to_string(),
    ]);
    table(out, &["OPERATION", "OK", "REFUSED", "LOST"], &rows)?;

    writeln!(out, "\nsoak: faults").map_err(io)?;
    let rows: Vec<Vec<String>> = d
        .faults
        .iter()
        .map(|(k, (injected, hit))| vec![k.clone(), injected.to_string(), hit.to_string()])
        .collect();
    table(out, &["FAULT", "INJECTED", "DIED OF IT"], &rows)?;

    if sh.chaos {
        let log = d.daemon.log_text();
        let deaths = faults::guest_deaths(&log);
        writeln!(out, "\nsoak: the chaos guest's deaths in copy's changes (from the daemon's log)")
            .map_err(io)?;
        let rows: Vec<Vec<String>> = deaths
            .iter()
            .map(|((fault, when), n)| vec![fault.clone(), when.clone(), n.to_string()])
            .collect();
        table(out, &["DIED OF", "WHEN", "COUNT"], &rows)?;
        let repaired = [
            ("changes failed as the guest died (refused, nothing changed)", t.guest_deaths),
            (
                "commits finished after the guest died (the backend had committed)",
                faults::count_lines(&log, faults::FINISHED_COMMIT),
            ),
            (
                "backend snapshots removed after a failed create",
                faults::count_lines(&log, faults::DISCARDED),
            ),
        ];
        let rows: Vec<Vec<String>> =
            repaired.iter().map(|(what, n)| vec![(*what).to_owned(), n.to_string()]).collect();
        table(out, &["WHAT THE HOST DID", "COUNT"], &rows)?;
    }

    let all = Stats::new(t.latency.clone());
    let gc = Stats::new(t.latency_gc.clone());
    let completed: u64 = total[0] + total[1];
    let rows = vec![
        vec![
            "clients x duration".into(),
            format!("{} x {}", opts.clients, humantime::format_duration(opts.duration)),
        ],
        vec!["wall time (with restarts and checks)".into(), format!("{:.1} s", wall.as_secs_f64())],
        vec!["operations completed".into(), completed.to_string()],
        vec!["replies lost to deaths (settled by the checker)".into(), total[2].to_string()],
        vec!["calls refused saying the disk was full".into(), t.no_space.to_string()],
        vec![
            "kills survived (kill -9 / abort at a fault point)".into(),
            format!("{} ({} / {})", d.kills + d.aborts, d.kills, d.aborts),
        ],
        vec![
            "checks (snapshots compared, contents read)".into(),
            format!("{} ({}, {})", d.checks, d.covered.snapshots, d.covered.contents),
        ],
        vec![
            "collections asked for (snapshots collected)".into(),
            format!("{} ({})", t.collections, t.collected),
        ],
        vec!["invariant violations".into(), t.violations.len().to_string()],
        vec![
            "peak RSS after warm-up".into(),
            format!("{:.1} MiB", d.peaks.rss_kib as f64 / 1024.0),
        ],
        vec!["peak fds after warm-up".into(), d.peaks.fds.to_string()],
        vec!["peak threads after warm-up".into(), d.peaks.threads.to_string()],
        vec![
            "latency p50 / p99".into(),
            format!("{} / {}", fmt_d(all.pct(0.5)), fmt_d(all.pct(0.99))),
        ],
        vec![
            format!("latency p50 / p99 during an on-demand GC ({} calls)", t.latency_gc.len()),
            format!("{} / {}", fmt_d(gc.pct(0.5)), fmt_d(gc.pct(0.99))),
        ],
    ];
    writeln!(out, "\nsoak: seed {}", opts.seed).map_err(io)?;
    table(out, &["FIGURE", "VALUE"], &rows)?;
    if !t.violations.is_empty() {
        writeln!(out, "\nsoak: {} VIOLATIONS", t.violations.len()).map_err(io)?;
        for v in &t.violations {
            writeln!(out, "- {v}").map_err(io)?;
        }
    }
    Ok(())
}
