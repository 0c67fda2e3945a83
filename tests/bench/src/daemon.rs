//! `wasnap-bench daemon`: a load generator speaking containerd's snapshots gRPC API.
//! It runs the same cycles (prepare → commit → prepare a child → remove it → remove the
//! parent, under a lease) at 1 and 8 concurrent clients against containerd's own
//! overlayfs snapshotter, against wasnap's overlay driver and `copy` guest straight to
//! the wasnap daemon, and against wasnap overlay as containerd's proxy snapshotter, with
//! roots on tmpfs and on disk, all in one run, and prints cycles per second with each
//! target's ratio to containerd's own overlayfs measured in the same run.
//!
//! Cycles per second on a shared VM swing by a fifth between runs of one binary, and so
//! does CPU time. Two more figures come with them: the CPU time the serving processes
//! spent per cycle (from `/proc`, all their threads), compared as a ratio within one
//! run, and for targets served by wasnap, the root database's commits per cycle (from
//! the daemon's status), which the machine's noise does not move at all.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use wasnap::Context;
use wasnap::error::{Error, Result};
use wasnap_cli::output::table;
use wasnap_cli::stats::{Stats, fmt_d};
use wasnap_daemon::client::{Client, request};
use wasnap_daemon::convert;
use wasnap_daemon::proto::admin::StatusRequest;
use wasnap_daemon::proto::snapshots::*;
use wasnap_test_util::containerd::{self, Containerd};
use wasnap_test_util::process::DaemonProcess;

const NS: &str = "bench";

/// One thing the load goes to: a socket and a snapshotter name on it.
#[derive(Clone)]
struct Target {
    label: &'static str,
    socket: PathBuf,
    snapshotter: &'static str,
    /// containerd collects snapshots no lease holds, even active ones, at its next
    /// collection: calls through containerd carry a containerd lease, as its clients'
    /// do. (wasnap keeps what is made without a lease.)
    containerd_lease: bool,
    /// The processes that serve it: their CPU time is the target's cost.
    servers: Vec<u32>,
    /// The wasnap daemon's socket, if the target's calls reach it: its root database's
    /// commits are counted.
    wasnap: Option<PathBuf>,
}

impl Target {
    /// Its label as the start of the snapshot keys it makes.
    fn key_prefix(&self) -> String {
        self.label.replace([' ', '>'], "-")
    }
}

/// What each of the bench's client tasks returned, once all have ended; the first
/// failure otherwise.
async fn join_all<T: 'static>(mut tasks: tokio::task::JoinSet<Result<T>>) -> Result<Vec<T>> {
    let mut all = Vec::with_capacity(tasks.len());
    while let Some(r) = tasks.join_next().await {
        all.push(r.map_err(|e| Error::internal(format!("bench client: {e}")))??);
    }
    Ok(all)
}

/// The lease the load holds in containerd.
const LEASE: &str = "wasnap-bench";

/// `msg` as a request for `t`: under the load's lease, containerd's or wasnap's.
fn req<T>(t: &Target, msg: T) -> tonic::Request<T> {
    if !t.containerd_lease {
        return request(msg, Some(NS), Some(LEASE));
    }
    let mut r = request(msg, Some(NS), None);
    r.metadata_mut().insert("containerd-lease", tonic::metadata::MetadataValue::from_static(LEASE));
    r
}

/// What one target at one concurrency measured, over one block of cycles or several.
#[derive(Default)]
struct Measured {
    /// Cycles run, and the wall time the blocks that ran them took.
    cycles: usize,
    wall: Duration,
    /// Per operation of the cycle: prepare, commit, prepare child, remove child, remove.
    ops: [Vec<Duration>; 5],
    /// The serving processes' CPU time (None where `/proc` did not say).
    cpu: Option<Duration>,
    /// The wasnap daemon's counters over the load.
    wasnap: Option<Counters>,
}

/// What the wasnap daemon counts (its `status`): over a load, the difference.
#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    /// The root database's commits, and of those synced.
    commits: u64,
    durable: u64,
    /// The daemon's time serving calls (its calls' latencies summed, as it measured
    /// them), in microseconds.
    busy_micros: u64,
    /// Calls served, and of those, served on the worker that received them: as they
    /// came, or once it had handed its share of the runtime over.
    requests: u64,
    in_place: u64,
    handed_over: u64,
}

impl Counters {
    fn since(self, before: Counters) -> Counters {
        Counters {
            commits: self.commits.saturating_sub(before.commits),
            durable: self.durable.saturating_sub(before.durable),
            busy_micros: self.busy_micros.saturating_sub(before.busy_micros),
            requests: self.requests.saturating_sub(before.requests),
            in_place: self.in_place.saturating_sub(before.in_place),
            handed_over: self.handed_over.saturating_sub(before.handed_over),
        }
    }

    fn plus(self, o: Counters) -> Counters {
        Counters {
            commits: self.commits + o.commits,
            durable: self.durable + o.durable,
            busy_micros: self.busy_micros + o.busy_micros,
            requests: self.requests + o.requests,
            in_place: self.in_place + o.in_place,
            handed_over: self.handed_over + o.handed_over,
        }
    }
}

impl Measured {
    /// Adds another block of the same target at the same concurrency.
    fn absorb(&mut self, block: Measured) {
        let first = self.cycles == 0;
        self.cycles += block.cycles;
        self.wall += block.wall;
        for (all, some) in self.ops.iter_mut().zip(block.ops) {
            all.extend(some);
        }
        // A figure is known for the whole only if it is known for every block.
        self.cpu = if first { block.cpu } else { self.cpu.zip(block.cpu).map(|(a, b)| a + b) };
        self.wasnap = if first {
            block.wasnap
        } else {
            self.wasnap.zip(block.wasnap).map(|(a, b)| a.plus(b))
        };
    }

    fn per_cycle(&self) -> f64 {
        self.cycles.max(1) as f64
    }

    fn cycles_per_sec(&self) -> f64 {
        self.cycles as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    /// The serving processes' CPU time per cycle.
    fn cpu_per_cycle(&self) -> Option<Duration> {
        self.cpu.map(|c| c.div_f64(self.per_cycle()))
    }

    /// The wasnap root database's commits, and of those synced, per cycle.
    fn commits_per_cycle(&self) -> Option<(f64, f64)> {
        self.wasnap
            .map(|w| (w.commits as f64 / self.per_cycle(), w.durable as f64 / self.per_cycle()))
    }

    /// A cycle's wall time as one client saw it (its operations' latencies summed).
    fn latency_per_cycle(&self) -> Duration {
        self.ops.iter().flatten().sum::<Duration>().div_f64(self.per_cycle())
    }

    /// The wasnap daemon's time serving calls, per cycle.
    fn wasnap_per_cycle(&self) -> Option<Duration> {
        self.wasnap.map(|w| Duration::from_micros(w.busy_micros).div_f64(self.per_cycle()))
    }

    /// Of the calls the wasnap daemon served, the share it served in place, and the
    /// share it served in place handing the worker's share of the runtime over.
    fn in_place(&self) -> Option<(f64, f64)> {
        self.wasnap.map(|w| {
            let n = w.requests.max(1) as f64;
            (w.in_place as f64 / n, w.handed_over as f64 / n)
        })
    }
}

/// `p` (a fraction) as a whole percentage.
fn share(p: f64) -> String {
    format!("{:.0}%", p * 100.0)
}

/// CPU time (user and system, every thread) that process `pid` has used so far.
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command, which may itself hold spaces and parentheses:
    // the state is field 3, utime and stime fields 14 and 15.
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let per_sec = rustix::param::clock_ticks_per_second().max(1);
    Some(Duration::from_nanos(ticks.saturating_mul(1_000_000_000 / per_sec)))
}

/// The total CPU time of `pids`, if every one is known.
fn cpu_of(pids: &[u32]) -> Option<Duration> {
    pids.iter().map(|p| cpu_time(*p)).sum()
}

/// The wasnap daemon's counters so far.
async fn counters(socket: &Path) -> Result<Counters> {
    let c = Client::connect(socket).await?;
    let status = c.admin().status(request(StatusRequest {}, None, None)).await.map_err(st)?;
    let status = status.into_inner();
    let db = status.database.unwrap_or_default();
    Ok(Counters {
        commits: db.commits,
        durable: db.durable_commits,
        busy_micros: status.busy_micros,
        requests: status.requests,
        in_place: status.served_in_place,
        handed_over: status.served_handing_over,
    })
}

fn st(s: tonic::Status) -> Error {
    convert::error(&s)
}

const OPS: [&str; 5] = ["prepare", "commit", "prepare child", "remove child", "remove"];

/// One cycle: prepare → commit → prepare a child → remove the child → remove the
/// parent; returns each operation's latency.
async fn cycle(c: &Client, t: &Target, tag: &str) -> Result<[Duration; 5]> {
    let sn = t.snapshotter;
    let (key, name, child) = (format!("{tag}-a"), format!("{tag}-c"), format!("{tag}-b"));
    let mut s = c.snapshots();
    let mut took = [Duration::ZERO; 5];
    let mut clock = Instant::now();
    let mut lap = |i: usize| {
        took[i] = clock.elapsed();
        clock = Instant::now();
    };
    let prepare = PrepareSnapshotRequest {
        snapshotter: sn.into(),
        key: key.clone(),
        parent: String::new(),
        labels: HashMap::new(),
    };
    s.prepare(req(t, prepare)).await.map_err(st)?;
    lap(0);
    let commit = CommitSnapshotRequest {
        snapshotter: sn.into(),
        name: name.clone(),
        key,
        ..Default::default()
    };
    s.commit(req(t, commit)).await.map_err(st)?;
    lap(1);
    let prepare = PrepareSnapshotRequest {
        snapshotter: sn.into(),
        key: child.clone(),
        parent: name.clone(),
        labels: HashMap::new(),
    };
    s.prepare(req(t, prepare)).await.map_err(st)?;
    lap(2);
    let remove = RemoveSnapshotRequest { snapshotter: sn.into(), key: child };
    s.remove(req(t, remove)).await.map_err(st)?;
    lap(3);
    let remove = RemoveSnapshotRequest { snapshotter: sn.into(), key: name };
    s.remove(req(t, remove)).await.map_err(st)?;
    lap(4);
    Ok(took)
}

/// Runs `per_client` cycles on each of `clients` connections at once, their keys tagged
/// with `round`.
async fn load(t: &Target, clients: usize, per_client: usize, round: usize) -> Result<Measured> {
    let mut conns = Vec::with_capacity(clients);
    for _ in 0..clients {
        conns.push(Client::connect(&t.socket).await?);
    }
    let counters_before = match &t.wasnap {
        Some(socket) => Some(counters(socket).await?),
        None => None,
    };
    let cpu_before = cpu_of(&t.servers);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, c) in conns.into_iter().enumerate() {
        let t = t.clone();
        let tag = format!("{}-{clients}-{round}-{i}", t.key_prefix());
        tasks.spawn(async move {
            let mut samples = Vec::with_capacity(per_client);
            for n in 0..per_client {
                samples.push(cycle(&c, &t, &format!("{tag}-{n}")).await?);
            }
            Ok::<_, Error>(samples)
        });
    }
    let mut ops: [Vec<Duration>; 5] = Default::default();
    let mut cycles = 0usize;
    for samples in join_all(tasks).await? {
        for sample in samples {
            cycles += 1;
            for (all, one) in ops.iter_mut().zip(sample) {
                all.push(one);
            }
        }
    }
    let wall = started.elapsed();
    let cpu = cpu_of(&t.servers).zip(cpu_before).map(|(after, before)| after - before);
    let wasnap = match (&t.wasnap, counters_before) {
        (Some(socket), Some(before)) => Some(counters(socket).await?.since(before)),
        _ => None,
    };
    Ok(Measured { cycles, wall, ops, cpu, wasnap })
}

/// Makes `n` committed snapshots of `t`'s own on 8 connections at once, under the load's
/// lease, and keeps them: the load then runs in a store of that size, as an operator's
/// does (deeper trees in both servers' databases, a fuller `snapshots/`).
async fn populate(t: &Target, n: usize) -> Result<()> {
    const CONNS: usize = 8;
    let label = t.key_prefix();
    let mut tasks = tokio::task::JoinSet::new();
    for conn in 0..CONNS {
        let (t, label) = (t.clone(), label.clone());
        let c = Client::connect(&t.socket).await?;
        tasks.spawn(async move {
            let mut s = c.snapshots();
            for i in (conn..n).step_by(CONNS) {
                let key = format!("{label}-live-{i}");
                let prepare = PrepareSnapshotRequest {
                    snapshotter: t.snapshotter.into(),
                    key: key.clone(),
                    parent: String::new(),
                    labels: HashMap::new(),
                };
                s.prepare(req(&t, prepare)).await.map_err(st)?;
                let commit = CommitSnapshotRequest {
                    snapshotter: t.snapshotter.into(),
                    name: format!("{key}-c"),
                    key,
                    ..Default::default()
                };
                s.commit(req(&t, commit)).await.map_err(st)?;
            }
            Ok::<_, Error>(())
        });
    }
    join_all(tasks).await?;
    Ok(())
}

/// The floor under a target's cycle at `clients` clients: cycles of five `Stat` calls
/// (the API's cheapest call on a snapshot, one read) on one snapshot prepared for it,
/// `cycles` on each of `clients` connections at once, in cycles per second. The load's
/// cycle of five calls, from the same clients, cannot be answered faster than five of
/// these.
async fn floor(t: &Target, clients: usize, cycles: usize) -> Result<f64> {
    let c = Client::connect(&t.socket).await?;
    let mut s = c.snapshots();
    let key = format!("{}-floor-{clients}", t.key_prefix());
    let prepare = PrepareSnapshotRequest {
        snapshotter: t.snapshotter.into(),
        key: key.clone(),
        parent: String::new(),
        labels: HashMap::new(),
    };
    s.prepare(req(t, prepare)).await.map_err(st)?;
    let mut conns = Vec::with_capacity(clients);
    for _ in 0..clients {
        conns.push(Client::connect(&t.socket).await?);
    }
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in conns {
        let (t, key) = (t.clone(), key.clone());
        tasks.spawn(async move {
            let mut s = c.snapshots();
            for _ in 0..cycles * 5 {
                let stat =
                    StatSnapshotRequest { snapshotter: t.snapshotter.into(), key: key.clone() };
                s.stat(req(&t, stat)).await.map_err(st)?;
            }
            Ok::<_, Error>(())
        });
    }
    join_all(tasks).await?;
    let rate = (clients * cycles) as f64 / started.elapsed().as_secs_f64().max(1e-9);
    let remove = RemoveSnapshotRequest { snapshotter: t.snapshotter.into(), key };
    s.remove(req(t, remove)).await.map_err(st)?;
    Ok(rate)
}

/// The targets in the order the table shows them; containerd's own overlayfs first.
const COLUMNS: [&str; 4] =
    ["containerd overlayfs", "wasnap overlay", "containerd -> wasnap overlay", "wasnap copy guest"];

/// Starts a wasnap daemon and (if installed) a containerd proxying to it, roots under
/// `base`, and returns the targets with what keeps them running. The daemon serves the
/// `copy` guest (its `.wasm` and `limits.instances`) only if given one.
fn start(
    base: &Path,
    copy_guest: Option<(&Path, u32)>,
    wasnap: &Path,
) -> Result<(tempfile::TempDir, DaemonProcess, Option<Containerd>, Vec<Target>)> {
    let io = |e: std::io::Error| Error::from(e).context("bench");
    let tmp =
        tempfile::Builder::new().prefix("wasnap-bench-daemon-").tempdir_in(base).map_err(io)?;
    let mut config =
        "default_snapshotter = \"overlay\"\n[snapshotters.overlay]\ndriver = \"overlay\"\n"
            .to_owned();
    if let Some((guest, instances)) = copy_guest {
        config.push_str(&format!(
            "[snapshotters.copy]\ndriver = \"wasm\"\npath = {:?}\nlimits = {{ instances = {instances} }}\n",
            guest.display().to_string(),
        ));
    }
    let daemon = DaemonProcess::start(wasnap, tmp.path(), &config)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .with_context(|| "bench runtime")?;
    let lease =
        || wasnap_daemon::proto::leases::CreateRequest { id: LEASE.into(), labels: HashMap::new() };
    let wasnap_pid = rt.block_on(async {
        let client = Client::connect(daemon.socket()).await?;
        client.leases().create(request(lease(), Some(NS), None)).await.map_err(st)?;
        let status = client.admin().status(request(StatusRequest {}, None, None)).await;
        Ok::<_, Error>(status.map_err(st)?.into_inner().pid as u32)
    })?;
    let wasnap_target = |label, snapshotter| Target {
        label,
        socket: daemon.socket().to_path_buf(),
        snapshotter,
        containerd_lease: false,
        servers: vec![wasnap_pid],
        wasnap: Some(daemon.socket().to_path_buf()),
    };
    let mut targets = vec![wasnap_target(COLUMNS[1], "overlay")];
    if copy_guest.is_some() {
        targets.push(wasnap_target(COLUMNS[3], "copy"));
    }
    let peer = match containerd::binary() {
        None => None,
        Some(_) => {
            let dir = tmp.path().join("containerd");
            std::fs::create_dir(&dir).map_err(io)?;
            let proxies = BTreeMap::from([("overlay".to_owned(), daemon.socket().to_path_buf())]);
            let c = Containerd::start(&dir, &proxies)?;
            rt.block_on(async {
                let client = Client::connect(c.address()).await?;
                client.leases().create(request(lease(), Some(NS), None)).await.map_err(st)
            })?;
            let containerd_pid = c.pid().ok_or_else(|| Error::internal("containerd: no pid"))?;
            let through = |label, snapshotter, wasnap: bool| Target {
                label,
                socket: c.address().to_path_buf(),
                snapshotter,
                containerd_lease: true,
                servers: if wasnap {
                    vec![containerd_pid, wasnap_pid]
                } else {
                    vec![containerd_pid]
                },
                wasnap: wasnap.then(|| daemon.socket().to_path_buf()),
            };
            targets.insert(0, through(COLUMNS[0], "overlayfs", false));
            targets.insert(2, through(COLUMNS[2], "overlay", true));
            Some(c)
        }
    };
    Ok((tmp, daemon, peer, targets))
}

/// The `copy` guest the benchmark loads.
pub struct Copy {
    /// Its `.wasm` (None: the workspace's, built on demand).
    pub guest: Option<PathBuf>,
    /// Its `limits.instances`.
    pub instances: u32,
}

/// Runs the daemon benchmark: for each of `roots` (tmpfs, disk), starts a wasnap daemon
/// (the binary `wasnap`) and a containerd of its own there, loads each target, and
/// prints the tables. Skips (and says why) where it cannot run.
pub fn run(
    roots: &[PathBuf],
    copy: &Copy,
    wasnap: &Path,
    (smoke, live): (bool, usize),
    out: &mut dyn Write,
) -> Result<()> {
    let io = |e: std::io::Error| Error::from(e).context("bench");
    if !rustix::process::geteuid().is_root() {
        writeln!(out, "daemon: skipped (overlay and containerd need root)").map_err(io)?;
        return Ok(());
    }
    // WASNAP_BENCH_ONLY=LABEL[,LABEL…] runs only those targets (for profiling one
    // alone, or comparing two); the copy guest is then built and loaded only if named.
    let only = std::env::var("WASNAP_BENCH_ONLY").ok();
    let named =
        |label: &str| only.as_deref().is_none_or(|o| o.split(',').any(|l| l.trim() == label));
    let guest = match &copy.guest {
        _ if !named(COLUMNS[3]) => None,
        Some(g) => Some(g.to_path_buf()),
        None => match wasnap_test_util::guests::path("copy") {
            Ok(g) => Some(g),
            Err(why) => {
                writeln!(out, "daemon: skipped (no copy guest: {why})").map_err(io)?;
                return Ok(());
            }
        },
    };
    if containerd::binary().is_none() {
        writeln!(out, "daemon: containerd is not installed; wasnap alone, no ratios")
            .map_err(io)?;
    }
    // Cycles per client: enough for a steady rate at 1 client, about the same total at
    // 8; run in `rounds` blocks of a quarter each.
    let (one, eight, rounds) = if smoke { (5, 2, 1) } else { (1000, 256, 4) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .with_context(|| "bench runtime")?;
    // WASNAP_BENCH_CLIENTS=N runs only the load at N clients (1 or 8), for profiling.
    let at = std::env::var("WASNAP_BENCH_CLIENTS").ok();
    let loads: Vec<(usize, usize)> = [(1, one), (8, eight)]
        .into_iter()
        .filter(|(c, _)| at.as_deref().is_none_or(|a| a.trim() == c.to_string()))
        .collect();
    if loads.is_empty() {
        return Err(Error::invalid_argument(format!(
            "WASNAP_BENCH_CLIENTS={}: the loads are at 1 and 8 clients",
            at.unwrap_or_default()
        )));
    }
    let mut summary = Vec::new();
    let mut per_op = Vec::new();
    let mut cost = Vec::new();
    let mut bounds = Vec::new();
    let mut goals = Vec::new();
    for base in roots {
        let fs = wasnap::probe::filesystem_name(base);
        let copy_guest = guest.as_deref().map(|g| (g, copy.instances));
        let (tmp, daemon, peer, targets) = start(base, copy_guest, wasnap)?;
        let wanted: Vec<&Target> = COLUMNS
            .iter()
            .filter(|c| named(c))
            .filter_map(|c| targets.iter().find(|t| t.label == *c))
            .collect();
        if live > 0 {
            for t in &wanted {
                rt.block_on(populate(t, live)).map_err(|e| {
                    e.context(format!("make {live} snapshots of {} on {fs}", t.label))
                })?;
            }
        }
        let mut loaded = Loaded::new();
        for &(clients, per_client) in &loads {
            let mut row = vec![format!("{} ({fs})", base.display()), clients.to_string()];
            let mut baseline = None;
            let mut baseline_cpu = None;
            // The targets take turns in rounds, each round starting one target later, so
            // that a machine or disk slowing down for a while weighs on every target
            // alike, and so does what a target leaves running behind its block
            // (containerd's collections, the daemon's deleter).
            let mut measured: Vec<Measured> = wanted.iter().map(|_| Measured::default()).collect();
            for round in 0..rounds {
                for k in 0..wanted.len() {
                    let i = (k + round) % wanted.len();
                    let t = wanted[i];
                    let block = rt.block_on(load(t, clients, per_client / rounds, round));
                    let block = block.map_err(|e| {
                        tracing::error!("the daemon's log:\n{}", daemon.log_tail());
                        e.context(format!("{} on {fs}, {clients} clients", t.label))
                    })?;
                    measured[i].absorb(block);
                }
            }
            for column in COLUMNS {
                let Some(i) = wanted.iter().position(|t| t.label == column) else {
                    row.push("-".into());
                    continue;
                };
                let (t, m) = (wanted[i], std::mem::take(&mut measured[i]));
                let ratio = match baseline {
                    None if t.snapshotter == "overlayfs" => {
                        baseline = Some(m.cycles_per_sec());
                        String::new()
                    }
                    None => String::new(),
                    Some(b) => format!(" ({:.2}x)", m.cycles_per_sec() / f64::max(b, 1e-9)),
                };
                row.push(format!("{:.0}{ratio}", m.cycles_per_sec()));
                loaded.insert(
                    (clients, t.label),
                    (m.cycles_per_sec(), m.latency_per_cycle(), m.wasnap_per_cycle()),
                );
                let mut line = vec![fs.clone(), clients.to_string(), t.label.to_owned()];
                line.extend(m.ops.iter().map(|s| fmt_d(Stats::new(s.clone()).pct(0.5))));
                per_op.push(line);
                // Cycles per CPU second, as a ratio to containerd's: higher is better, as
                // in the cycles/s table.
                let cpu = match (m.cpu_per_cycle(), baseline_cpu) {
                    // Less than one clock tick (a smoke run): nothing to compare.
                    (None, _) => "-".to_owned(),
                    (Some(c), _) if c.is_zero() => "-".to_owned(),
                    (Some(c), _) if t.snapshotter == "overlayfs" => {
                        baseline_cpu = Some(c);
                        fmt_d(c)
                    }
                    (Some(c), None) => fmt_d(c),
                    (Some(c), Some(b)) => {
                        format!(
                            "{} ({:.2}x)",
                            fmt_d(c),
                            b.as_secs_f64() / c.as_secs_f64().max(1e-12)
                        )
                    }
                };
                let (commits, synced) = match m.commits_per_cycle() {
                    Some((c, d)) => (format!("{c:.2}"), format!("{d:.2}")),
                    None => ("-".into(), "-".into()),
                };
                cost.push(vec![
                    fs.clone(),
                    clients.to_string(),
                    t.label.to_owned(),
                    cpu,
                    commits,
                    synced,
                    m.wasnap_per_cycle().map_or("-".into(), fmt_d),
                    m.in_place().map_or("-".into(), |(here, _)| share(here)),
                    m.in_place().map_or("-".into(), |(_, over)| share(over)),
                ]);
            }
            summary.push(row);
        }
        for &(clients, per_client) in &loads {
            let (row, ceilings) = bounds_row(&fs, &rt, &targets, &loaded, (clients, per_client))?;
            bounds.push(row);
            goals.extend(goal_rows(&fs, clients, &loaded, ceilings));
        }
        drop(peer);
        drop(daemon);
        if std::env::var_os("WASNAP_BENCH_KEEP").is_some() {
            writeln!(out, "daemon: kept {}", tmp.keep().display()).map_err(io)?;
        }
    }
    writeln!(
        out,
        "daemon: cycles/s (prepare, commit, prepare child, remove child, remove; under a lease), \
         {one} cycles at 1 client, {eight} per client at 8, in {rounds} rounds the targets take \
         in turn; (ratio) to containerd's overlayfs; {}{}",
        match guest {
            Some(_) => format!("the copy guest with limits.instances = {}; ", copy.instances),
            None => String::new(),
        },
        match live {
            0 => "each target's store empty but for the load".to_owned(),
            n => format!("each target keeping {n} committed snapshots of its own beside the load"),
        }
    )
    .map_err(io)?;
    let mut header = vec!["ROOT", "CLIENTS"];
    header.extend(COLUMNS.map(|c| match c {
        "containerd -> wasnap overlay" => "CONTAINERD -> WASNAP (PROXY)",
        "containerd overlayfs" => "CONTAINERD OVERLAYFS",
        "wasnap overlay" => "WASNAP OVERLAY",
        _ => "COPY GUEST",
    }));
    table(out, &header, &summary)?;
    writeln!(out, "\ndaemon: p50 per operation of the cycle").map_err(io)?;
    let mut header = vec!["FS", "CLIENTS", "TARGET"];
    header.extend(OPS.map(|o| o));
    let header: Vec<String> = header.iter().map(|h| h.to_uppercase()).collect();
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    table(out, &header, &per_op)?;
    writeln!(
        out,
        "\ndaemon: cost per cycle: CPU time of the serving processes (containerd, the wasnap \
         daemon, both for the proxy), (ratio) cycles per CPU second to containerd's overlayfs; \
         the wasnap root database's commits, and of those synced; the wasnap daemon's time \
         serving the cycle's calls, and the shares of its calls it served in place (on the \
         worker that received them, not the blocking pool) as they came, and HANDING OVER \
         the worker's share of the runtime to another thread first (walks, plugins)"
    )
    .map_err(io)?;
    let header = [
        "FS",
        "CLIENTS",
        "TARGET",
        "CPU",
        "COMMITS",
        "SYNCED",
        "IN WASNAP",
        "IN PLACE",
        "HANDING OVER",
    ];
    table(out, &header, &cost)?;
    writeln!(
        out,
        "\ndaemon: what bounds the ratios. STAT FLOOR: cycles of five Stat calls (one read \
         each) per second from as many clients, the fastest a server answers five calls to \
         them; DIRECT CEILING: wasnap's floor over containerd's overlayfs cycles/s, the \
         ratio the direct targets would reach if every call cost no more than a Stat; at 1 \
         client, where a cycle's calls are serial, OUTSIDE WASNAP: a proxied cycle's \
         latency less wasnap's time serving it (containerd's own work and its gRPC \
         client), and PROXY CEILING: the proxy's ratio if wasnap took no time at all"
    )
    .map_err(io)?;
    table(
        out,
        &[
            "FS",
            "CLIENTS",
            "CONTAINERD STAT FLOOR",
            "WASNAP STAT FLOOR",
            "DIRECT CEILING",
            "OUTSIDE WASNAP",
            "PROXY CEILING",
        ],
        &bounds,
    )?;
    writeln!(
        out,
        "\ndaemon: the goals (ARCHITECTURE.md, \"The daemon beside containerd\") in this run: \
         each target's ratio to containerd's overlayfs, and the ceiling above, where known"
    )
    .map_err(io)?;
    table(out, &["FS", "CLIENTS", "TARGET", "GOAL", "RATIO", "CEILING", "VERDICT"], &goals)
}

/// What each target's load measured, by client count and target: cycles/s, a cycle's
/// latency, and wasnap's time in it.
type Loaded<'a> = HashMap<(usize, &'a str), (f64, Duration, Option<Duration>)>;

/// The ratios the direct targets and the proxy would reach at best (the bounds table),
/// where measured.
#[derive(Clone, Copy)]
struct Ceilings {
    direct: Option<f64>,
    proxy: Option<f64>,
}

/// The goals the daemon is held to, as ratios of cycles/s to containerd's overlayfs:
/// the target's column, the least ratio, and whether it holds on tmpfs too (the
/// proxy's goals are for a disk, where operators run it).
const GOALS: [(&str, usize, f64, bool); 6] = [
    (COLUMNS[1], 1, 2.0, true),
    (COLUMNS[1], 8, 2.0, true),
    (COLUMNS[2], 1, 0.8, false),
    (COLUMNS[2], 8, 1.0, false),
    (COLUMNS[3], 1, 1.0, true),
    (COLUMNS[3], 8, 1.0, true),
];

/// The rows of the goals table for one root at `clients` clients: each goal whose
/// target and containerd's overlayfs both ran, with the ceiling (direct, proxy) the
/// bounds table found for it.
fn goal_rows(
    fs: &str,
    clients: usize,
    loaded: &Loaded<'_>,
    ceilings: Ceilings,
) -> Vec<Vec<String>> {
    let Some(baseline) = loaded.get(&(clients, COLUMNS[0])).map(|l| l.0) else {
        return Vec::new();
    };
    GOALS
        .iter()
        .filter(|(_, c, _, on_tmpfs)| *c == clients && (*on_tmpfs || fs != "tmpfs"))
        .filter_map(|&(label, _, goal, _)| {
            let ratio = loaded.get(&(clients, label))?.0 / baseline.max(1e-9);
            let ceiling = match label {
                l if l == COLUMNS[2] => ceilings.proxy,
                _ => ceilings.direct,
            };
            let verdict = match (ratio >= goal, ceiling) {
                (true, _) => "met",
                (false, Some(c)) if c < goal => "not met (out of reach: the ceiling is below)",
                (false, _) => "not met",
            };
            Some(vec![
                fs.to_owned(),
                clients.to_string(),
                label.to_owned(),
                format!(">= {goal:.2}x"),
                format!("{ratio:.2}x"),
                ceiling.map_or("-".into(), |c| format!("{c:.2}x")),
                verdict.to_owned(),
            ])
        })
        .collect()
}

/// The row of the bounds table for one root at `clients` clients: the floors of
/// containerd and of the wasnap daemon (each measured, `cycles` a client, if its target
/// ran, that is, is in `loaded`), and the ceilings they and the loads in `loaded`
/// imply (also returned: direct, proxy). The proxy's ceiling only at 1 client: with
/// calls served at once, a cycle's latency less wasnap's time in it bounds nothing.
fn bounds_row(
    fs: &str,
    rt: &tokio::runtime::Runtime,
    targets: &[Target],
    loaded: &Loaded<'_>,
    (clients, cycles): (usize, usize),
) -> Result<(Vec<String>, Ceilings)> {
    let floor_of = |label: &str| -> Result<Option<f64>> {
        match targets.iter().find(|t| t.label == label && loaded.contains_key(&(clients, label))) {
            Some(t) => rt
                .block_on(floor(t, clients, cycles))
                .map(Some)
                .map_err(|e| e.context(format!("the floor of {label} on {fs}, {clients} clients"))),
            None => Ok(None),
        }
    };
    let containerd_floor = floor_of(COLUMNS[0])?;
    let wasnap_floor = floor_of(COLUMNS[1])?;
    let baseline = loaded.get(&(clients, COLUMNS[0])).map(|s| s.0);
    let rate = |r: Option<f64>| r.map_or("-".into(), |r| format!("{r:.0}"));
    let ratio = |r: Option<f64>| r.map_or("-".into(), |r| format!("{r:.2}x"));
    let direct_ceiling = wasnap_floor.zip(baseline).map(|(f, b)| f / b.max(1e-9));
    let outside = loaded
        .get(&(clients, COLUMNS[2]))
        .filter(|_| clients == 1)
        .and_then(|(_, latency, inside)| inside.map(|i| latency.saturating_sub(i)));
    let proxy_ceiling =
        outside.zip(baseline).map(|(o, b)| 1.0 / o.as_secs_f64().max(1e-9) / b.max(1e-9));
    let row = vec![
        fs.to_owned(),
        clients.to_string(),
        rate(containerd_floor),
        rate(wasnap_floor),
        ratio(direct_ceiling),
        outside.map_or("-".into(), fmt_d),
        ratio(proxy_ceiling),
    ];
    Ok((row, Ceilings { direct: direct_ceiling, proxy: proxy_ceiling }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A load of the targets named, at `clients`, at the rates given.
    fn loaded(clients: usize, rates: &[(&'static str, f64)]) -> Loaded<'static> {
        rates.iter().map(|&(l, r)| ((clients, l), (r, Duration::ZERO, None))).collect()
    }

    fn verdicts(rows: &[Vec<String>]) -> Vec<(String, String)> {
        rows.iter().map(|r| (r[2].clone(), r[6].clone())).collect()
    }

    #[test]
    fn goals_are_judged_against_containerd_and_the_ceilings() {
        let run = loaded(
            1,
            &[(COLUMNS[0], 100.0), (COLUMNS[1], 150.0), (COLUMNS[2], 85.0), (COLUMNS[3], 99.0)],
        );
        let on_disk = goal_rows("ext4", 1, &run, Ceilings { direct: Some(1.5), proxy: Some(0.9) });
        assert_eq!(
            verdicts(&on_disk),
            [
                (COLUMNS[1].into(), "not met (out of reach: the ceiling is below)".into()),
                (COLUMNS[2].into(), "met".into()),
                (COLUMNS[3].into(), "not met".into()),
            ]
        );
        assert_eq!(on_disk[0][4], "1.50x");
        // The proxy's goals are for a disk; without a ceiling, only met or not.
        let on_tmpfs = goal_rows("tmpfs", 1, &run, Ceilings { direct: None, proxy: None });
        assert_eq!(
            verdicts(&on_tmpfs),
            [(COLUMNS[1].into(), "not met".into()), (COLUMNS[3].into(), "not met".into())]
        );
        assert_eq!(on_tmpfs[0][5], "-");
    }

    #[test]
    fn goals_need_containerd_and_the_target_at_that_concurrency() {
        let none = Ceilings { direct: None, proxy: None };
        let without_containerd = loaded(8, &[(COLUMNS[1], 900.0)]);
        assert!(goal_rows("ext4", 8, &without_containerd, none).is_empty());
        let other_clients = loaded(1, &[(COLUMNS[0], 100.0), (COLUMNS[1], 300.0)]);
        assert!(goal_rows("ext4", 8, &other_clients, none).is_empty());
        let only_direct = loaded(8, &[(COLUMNS[0], 100.0), (COLUMNS[1], 200.0)]);
        assert_eq!(
            verdicts(&goal_rows("ext4", 8, &only_direct, none)),
            [(COLUMNS[1].into(), "met".into())]
        );
    }
}
