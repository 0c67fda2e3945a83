//! `wasnap-bench daemon`: a load generator speaking containerd's snapshots gRPC API,
//! running the same workloads at 1 and 8 concurrent clients against containerd's own
//! overlayfs snapshotter (through containerd's snapshots service), against wasnap's
//! overlay driver and `copy` guest (straight to the wasnap daemon), and against wasnap
//! overlay as containerd's proxy snapshotter (the proxy hop's cost), all in one run.

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
}

/// The lease the load holds in containerd.
const LEASE: &str = "wasnap-bench";

/// `msg` as a request for `t`.
fn req<T>(t: &Target, msg: T) -> tonic::Request<T> {
    let mut r = request(msg, Some(NS), None);
    if t.containerd_lease {
        r.metadata_mut()
            .insert("containerd-lease", tonic::metadata::MetadataValue::from_static(LEASE));
    }
    r
}

/// What one workload at one concurrency measured.
struct Measured {
    ops_per_sec: f64,
    latency: Stats,
}

fn st(s: tonic::Status) -> Error {
    convert::error(&s)
}

/// One prepare → commit → remove cycle; returns its latency.
async fn cycle(c: &Client, t: &Target, tag: &str) -> Result<Duration> {
    let sn = t.snapshotter;
    let started = Instant::now();
    let (key, name) = (format!("{tag}-a"), format!("{tag}-c"));
    let mut s = c.snapshots();
    let prepare = PrepareSnapshotRequest {
        snapshotter: sn.into(),
        key: key.clone(),
        parent: String::new(),
        labels: HashMap::new(),
    };
    s.prepare(req(t, prepare)).await.map_err(st)?;
    let commit = CommitSnapshotRequest {
        snapshotter: sn.into(),
        name: name.clone(),
        key,
        ..Default::default()
    };
    s.commit(req(t, commit)).await.map_err(st)?;
    let remove = RemoveSnapshotRequest { snapshotter: sn.into(), key: name };
    s.remove(req(t, remove)).await.map_err(st)?;
    Ok(started.elapsed())
}

async fn stat(c: &Client, t: &Target, key: &str) -> Result<Duration> {
    let started = Instant::now();
    let msg = StatSnapshotRequest { snapshotter: t.snapshotter.into(), key: key.into() };
    c.snapshots().stat(req(t, msg)).await.map_err(st)?;
    Ok(started.elapsed())
}

/// Runs `per_client` operations on each of `clients` connections at once.
async fn load(t: &Target, clients: usize, per_client: usize, workload: &str) -> Result<Measured> {
    let mut conns = Vec::with_capacity(clients);
    for _ in 0..clients {
        conns.push(Client::connect(&t.socket).await?);
    }
    // A committed snapshot for stat to look at.
    let target = format!("{}-stat-{clients}", t.label.replace(' ', "-"));
    if workload == "stat" {
        let c = &conns[0];
        let mut s = c.snapshots();
        let key = format!("{target}-a");
        let prepare = PrepareSnapshotRequest {
            snapshotter: t.snapshotter.into(),
            key: key.clone(),
            ..Default::default()
        };
        s.prepare(req(t, prepare)).await.map_err(st)?;
        let commit = CommitSnapshotRequest {
            snapshotter: t.snapshotter.into(),
            name: target.clone(),
            key,
            ..Default::default()
        };
        s.commit(req(t, commit)).await.map_err(st)?;
    }
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, c) in conns.into_iter().enumerate() {
        let (workload, target) = (workload.to_owned(), target.clone());
        let t = t.clone();
        let tag = format!("{}-{clients}-{i}", t.label.replace(' ', "-"));
        tasks.spawn(async move {
            let mut samples = Vec::with_capacity(per_client);
            for n in 0..per_client {
                samples.push(match workload.as_str() {
                    "stat" => stat(&c, &t, &target).await?,
                    _ => cycle(&c, &t, &format!("{tag}-{n}")).await?,
                });
            }
            Ok::<_, Error>(samples)
        });
    }
    let mut samples = Vec::new();
    while let Some(r) = tasks.join_next().await {
        samples.extend(r.map_err(|e| Error::internal(format!("bench client: {e}")))??);
    }
    let wall = started.elapsed();
    if workload == "stat" {
        let remove = RemoveSnapshotRequest { snapshotter: t.snapshotter.into(), key: target };
        let c = Client::connect(&t.socket).await?;
        c.snapshots().remove(req(t, remove)).await.map_err(st)?;
    }
    Ok(Measured {
        ops_per_sec: samples.len() as f64 / wall.as_secs_f64().max(1e-9),
        latency: Stats::new(samples),
    })
}

/// Runs the daemon benchmark: starts a wasnap daemon (the binary `wasnap`) and a
/// containerd of its own under `base`, loads each target, prints the table. Skips (and
/// says why) where it cannot run.
pub fn run(
    base: &Path,
    copy_guest: Option<&Path>,
    wasnap: &Path,
    smoke: bool,
    out: &mut dyn Write,
) -> Result<()> {
    let io = |e: std::io::Error| Error::from(e).context("bench");
    if !rustix::process::geteuid().is_root() {
        writeln!(out, "daemon: skipped (overlay and containerd need root)").map_err(io)?;
        return Ok(());
    }
    let guest = match copy_guest {
        Some(g) => g.to_path_buf(),
        None => match wasnap_test_util::guests::path("copy") {
            Ok(g) => g,
            Err(why) => {
                writeln!(out, "daemon: skipped (no copy guest: {why})").map_err(io)?;
                return Ok(());
            }
        },
    };
    let tmp =
        tempfile::Builder::new().prefix("wasnap-bench-daemon-").tempdir_in(base).map_err(io)?;
    let config = format!(
        "default_snapshotter = \"overlay\"\n[snapshotters.overlay]\ndriver = \"overlay\"\n\
         [snapshotters.copy]\ndriver = \"wasm\"\npath = {:?}\n",
        guest.display().to_string()
    );
    let daemon = DaemonProcess::start(wasnap, tmp.path(), &config)?;
    let mut targets = Vec::new();
    let peer = match containerd::binary() {
        None => {
            writeln!(out, "daemon: containerd is not installed; wasnap alone, no ratios")
                .map_err(io)?;
            None
        }
        Some(_) => {
            let dir = tmp.path().join("containerd");
            std::fs::create_dir(&dir).map_err(io)?;
            let proxies = BTreeMap::from([("overlay".to_owned(), daemon.socket().to_path_buf())]);
            let c = Containerd::start(&dir, &proxies)?;
            let lease = wasnap_daemon::proto::leases::CreateRequest {
                id: LEASE.into(),
                labels: HashMap::new(),
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .with_context(|| "bench runtime")?;
            rt.block_on(async {
                let client = Client::connect(c.address()).await?;
                client.leases().create(request(lease, Some(NS), None)).await.map_err(st)
            })?;
            targets.push(Target {
                label: "containerd overlayfs",
                socket: c.address().to_path_buf(),
                snapshotter: "overlayfs",
                containerd_lease: true,
            });
            targets.push(Target {
                label: "containerd -> wasnap overlay",
                socket: c.address().to_path_buf(),
                snapshotter: "overlay",
                containerd_lease: true,
            });
            Some(c)
        }
    };
    targets.push(Target {
        label: "wasnap overlay",
        socket: daemon.socket().to_path_buf(),
        snapshotter: "overlay",
        containerd_lease: false,
    });
    targets.push(Target {
        label: "wasnap copy guest",
        socket: daemon.socket().to_path_buf(),
        snapshotter: "copy",
        containerd_lease: false,
    });
    writeln!(
        out,
        "daemon: the snapshots gRPC API under load, 1 and 8 clients; roots in {} ({})",
        base.display(),
        wasnap::probe::filesystem_name(base)
    )
    .map_err(io)?;

    let (cycles, stats): (usize, usize) = if smoke { (5, 20) } else { (200, 2000) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .with_context(|| "bench runtime")?;
    let mut rows = Vec::new();
    for (workload, per_client) in [("prepare+commit+remove", cycles), ("stat", stats)] {
        for clients in [1usize, 8] {
            let mut baseline = None;
            for t in &targets {
                let per = if clients == 1 { per_client } else { per_client.div_ceil(4) };
                let m = rt.block_on(load(t, clients, per, workload)).map_err(|e| {
                    tracing::error!("the daemon's log:\n{}", daemon.log_tail());
                    e.context(format!("{} ({workload}, {clients} clients)", t.label))
                })?;
                if t.snapshotter == "overlayfs" {
                    baseline = Some(m.ops_per_sec);
                }
                rows.push(vec![
                    workload.to_owned(),
                    clients.to_string(),
                    t.label.to_owned(),
                    format!("{:.0}", m.ops_per_sec),
                    fmt_d(m.latency.pct(0.5)),
                    fmt_d(m.latency.pct(0.99)),
                    baseline.map_or("-".into(), |b| format!("{:.2}x", m.ops_per_sec / b.max(1e-9))),
                ]);
            }
        }
    }
    table(out, &["WORKLOAD", "CLIENTS", "TARGET", "OPS/S", "P50", "P99", "VS CONTAINERD"], &rows)?;
    drop(peer);
    drop(daemon);
    Ok(())
}
