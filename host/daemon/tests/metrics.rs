#![allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is what it should do

//! The metrics endpoint of a daemon in process: calls, errors, latency, collections and
//! snapshot counts, scraped over HTTP and read with a Prometheus text parser.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use prometheus_parse::{Scrape, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tonic::Code;
use wasnap::gc::{GcOptions, GcReport};
use wasnap::root::{Config, DriverConfig};
use wasnap_daemon::client::{Client, request};
use wasnap_daemon::proto::admin::CollectRequest;
use wasnap_daemon::proto::leases as lpb;
use wasnap_daemon::proto::snapshots::*;
use wasnap_daemon::serve::{Options, Serving, serve_reporting};

/// Options for a daemon serving a native snapshotter in `dir`, with metrics on a free
/// port of loopback and no background collections (so that the test runs every one).
fn options(dir: &tempfile::TempDir, metrics: SocketAddr) -> Options {
    let mut config = Config {
        default_snapshotter: "native".into(),
        snapshotters: BTreeMap::from([("native".into(), DriverConfig::Native.into())]),
        gc: GcOptions {
            deletion_threshold: 0,
            mutation_threshold: 0,
            interval_secs: 0,
            ..GcOptions::default()
        },
        ..Config::default()
    };
    config.metrics.address = Some(metrics);
    let mut opts = Options::from_config(config);
    opts.root = dir.path().join("root");
    opts.socket = dir.path().join("run/wasnap.sock");
    opts.shutdown_timeout = Duration::from_secs(5);
    opts
}

fn temp_dir() -> tempfile::TempDir {
    let base = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm" } else { "/tmp" };
    tempfile::Builder::new().prefix("wasnap-metrics-").tempdir_in(base).unwrap()
}

/// A running daemon; `stop` ends it.
struct Daemon {
    _dir: tempfile::TempDir,
    serving: Serving,
    stop: oneshot::Sender<()>,
    done: tokio::task::JoinHandle<wasnap::Result<()>>,
}

impl Daemon {
    async fn start() -> Daemon {
        let dir = temp_dir();
        let opts = options(&dir, "127.0.0.1:0".parse().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let (tx, serving) = oneshot::channel();
        let done = tokio::spawn(serve_reporting(
            opts,
            async move {
                let _ = stopped.await;
            },
            Some(tx),
        ));
        let serving = match serving.await {
            Ok(s) => s,
            Err(_) => panic!("the daemon did not start: {:?}", done.await.unwrap()),
        };
        Daemon { _dir: dir, serving, stop, done }
    }

    fn metrics(&self) -> SocketAddr {
        self.serving.metrics.expect("the daemon reports its metrics address")
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.done.await.unwrap().unwrap();
    }
}

/// A plain HTTP/1.1 GET: the status code, the headers (names in lower case) and the body.
async fn get(
    addr: SocketAddr,
    path: &str,
    accept: Option<&str>,
) -> (u16, HashMap<String, String>, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let accept = accept.map(|a| format!("Accept: {a}\r\n")).unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{accept}Connection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect::<HashMap<_, _>>();
    assert!(!headers.contains_key("transfer-encoding"), "a scrape has a length: {headers:?}");
    (status, headers, body.to_owned())
}

/// A scrape, parsed, with the text kept for failure messages.
struct Metrics {
    text: String,
    scrape: Scrape,
}

impl Metrics {
    async fn scrape(addr: SocketAddr) -> Metrics {
        let (status, headers, text) = get(addr, "/metrics", None).await;
        assert_eq!(status, 200, "{text}");
        assert_eq!(headers["content-type"], "text/plain; version=0.0.4; charset=utf-8");
        let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
        // The parser skips what it cannot read: every sample line must have become a sample.
        let lines = text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')).count();
        let read: usize = scrape
            .samples
            .iter()
            .map(|s| match &s.value {
                Value::Histogram(buckets) => buckets.len(),
                _ => 1,
            })
            .sum();
        assert_eq!(read, lines, "lines the parser did not read, in\n{text}");
        Metrics { text, scrape }
    }

    /// The one sample of `metric` whose labels include `labels`.
    fn sample(&self, metric: &str, labels: &[(&str, &str)]) -> Option<&Value> {
        let found: Vec<_> = self
            .scrape
            .samples
            .iter()
            .filter(|s| s.metric == metric)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .collect();
        assert!(found.len() <= 1, "{metric} {labels:?} is not one series in\n{}", self.text);
        found.first().map(|s| &s.value)
    }

    /// The value of a counter, gauge or untyped sample (0 if it is absent).
    fn value(&self, metric: &str, labels: &[(&str, &str)]) -> f64 {
        match self.sample(metric, labels) {
            None => 0.0,
            Some(Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v)) => *v,
            Some(other) => panic!("{metric} {labels:?} is {other:?}"),
        }
    }

    /// A histogram's buckets as (upper bound, count), and its count.
    fn histogram(&self, metric: &str, labels: &[(&str, &str)]) -> (Vec<(f64, f64)>, f64) {
        let Some(Value::Histogram(buckets)) = self.sample(metric, labels) else {
            panic!("no histogram {metric} {labels:?} in\n{}", self.text)
        };
        let buckets = buckets.iter().map(|b| (b.less_than, b.count)).collect();
        (buckets, self.value(&format!("{metric}_count"), labels))
    }
}

fn prepare(snapshotter: &str, key: &str, parent: &str) -> PrepareSnapshotRequest {
    PrepareSnapshotRequest {
        snapshotter: snapshotter.into(),
        key: key.into(),
        parent: parent.into(),
        labels: HashMap::new(),
    }
}

fn stat(key: &str) -> StatSnapshotRequest {
    StatSnapshotRequest { snapshotter: "native".into(), key: key.into() }
}

async fn collect(c: &Client, dry_run: bool) -> GcReport {
    let json = c
        .admin()
        .collect(request(CollectRequest { dry_run, ..Default::default() }, None, None))
        .await
        .unwrap()
        .into_inner();
    serde_json::from_str(&json.json).unwrap()
}

async fn count(c: &Client, ns: &str) -> f64 {
    let req = ListSnapshotsRequest { snapshotter: "native".into(), filters: vec![] };
    let mut stream = c.snapshots().list(request(req, Some(ns), None)).await.unwrap().into_inner();
    let mut n = 0;
    while let Some(batch) = stream.message().await.unwrap() {
        n += batch.info.len();
    }
    n as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_counts_calls_errors_collections_and_snapshots() {
    let d = Daemon::start().await;
    let c = Client::connect(&d.serving.socket).await.unwrap();
    let mut s = c.snapshots();
    let ns = Some("metrics");

    // Two prepares naming the snapshotter, one naming none (the default), a commit.
    s.prepare(request(prepare("native", "a", ""), ns, None)).await.unwrap();
    let commit = CommitSnapshotRequest {
        snapshotter: "native".into(),
        name: "a-done".into(),
        key: "a".into(),
        ..Default::default()
    };
    s.commit(request(commit, ns, None)).await.unwrap();
    s.prepare(request(prepare("native", "b", "a-done"), ns, None)).await.unwrap();
    s.prepare(request(prepare("", "x", ""), Some("other"), None)).await.unwrap();
    s.stat(request(stat("a-done"), ns, None)).await.unwrap();
    // Failures: a missing key, and a snapshotter this daemon does not serve.
    assert_eq!(
        s.stat(request(stat("missing"), ns, None)).await.unwrap_err().code(),
        Code::NotFound
    );
    let unknown = s.prepare(request(prepare("nope", "y", ""), ns, None)).await.unwrap_err();
    assert_eq!(unknown.code(), Code::InvalidArgument);
    let remove = RemoveSnapshotRequest { snapshotter: "native".into(), key: "b".into() };
    s.remove(request(remove, ns, None)).await.unwrap();
    // A snapshot only a lease holds; once the lease goes, a collection removes it.
    let mut l = c.leases();
    l.create(request(lpb::CreateRequest { id: "l1".into(), labels: HashMap::new() }, ns, None))
        .await
        .unwrap();
    s.prepare(request(prepare("native", "held", ""), ns, Some("l1"))).await.unwrap();
    l.delete(request(lpb::DeleteRequest { id: "l1".into(), sync: false }, ns, None)).await.unwrap();
    // A dry run changes nothing and is no collection; the real one removes `held`.
    assert_eq!(collect(&c, true).await.removed.len(), 1);
    let report = collect(&c, false).await;
    assert_eq!(report.removed.len(), 1, "{report:?}");

    let m = Metrics::scrape(d.metrics()).await;
    let call =
        |service, op, snapshotter| [("service", service), ("op", op), ("snapshotter", snapshotter)];
    let native = |op| call("snapshots", op, "native");
    // Calls by operation and snapshotter; the default snapshotter's name stands for "".
    assert_eq!(m.value("wasnap_operations_total", &native("prepare")), 4.0, "{}", m.text);
    assert_eq!(m.value("wasnap_operations_total", &native("commit")), 1.0);
    assert_eq!(m.value("wasnap_operations_total", &native("stat")), 2.0);
    assert_eq!(m.value("wasnap_operations_total", &native("remove")), 1.0);
    assert_eq!(m.value("wasnap_operations_total", &native("list")), 0.0);
    assert_eq!(m.value("wasnap_operations_total", &call("snapshots", "prepare", "-")), 1.0);
    assert_eq!(m.value("wasnap_operations_total", &call("leases", "create", "")), 1.0);
    assert_eq!(m.value("wasnap_operations_total", &call("admin", "collect", "")), 2.0);
    // Errors by code.
    let errors = |op, snapshotter, code| {
        let [s, o, n] = call("snapshots", op, snapshotter);
        m.value("wasnap_operation_errors_total", &[s, o, n, ("code", code)])
    };
    assert_eq!(errors("stat", "native", "NotFound"), 1.0);
    assert_eq!(errors("prepare", "-", "InvalidArgument"), 1.0);
    assert_eq!(errors("prepare", "native", "InvalidArgument"), 0.0);
    assert!(m.sample("wasnap_operation_errors_total", &native("commit")).is_none());
    // Latency: every bucket, cumulative, the last one (+Inf) holding every call.
    let (buckets, n) = m.histogram("wasnap_operation_duration_seconds", &native("prepare"));
    assert_eq!(n, 4.0);
    assert_eq!(buckets.len(), 18, "{buckets:?}");
    assert_eq!(buckets.first().unwrap().0, 50e-6);
    assert_eq!(buckets[buckets.len() - 2].0, 10.0);
    assert!(buckets.last().unwrap().0.is_infinite() && buckets.last().unwrap().1 == 4.0);
    assert!(buckets.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1), "{buckets:?}");
    // Collections: the real one only.
    assert_eq!(m.value("wasnap_gc_runs_total", &[("result", "ok")]), 1.0, "{}", m.text);
    assert_eq!(m.value("wasnap_gc_runs_total", &[("result", "failed")]), 0.0);
    assert_eq!(m.histogram("wasnap_gc_duration_seconds", &[]).1, 1.0);
    assert_eq!(m.value("wasnap_gc_removed_snapshots_total", &[]), 1.0);
    assert_eq!(m.value("wasnap_gc_pruned_snapshots_total", &[]), report.pruned.len() as f64);
    // Snapshots per namespace: what a list shows.
    let snapshots =
        |ns| m.value("wasnap_snapshots", &[("snapshotter", "native"), ("namespace", ns)]);
    assert_eq!(snapshots("metrics"), count(&c, "metrics").await);
    assert_eq!(snapshots("metrics"), 1.0, "a-done: b was removed, held collected");
    assert_eq!(snapshots("other"), count(&c, "other").await);
    assert_eq!(snapshots("other"), 1.0);

    // The root database's commits: at least one operation for each of the nine writes
    // above (four prepares, a commit, a remove, a lease made and deleted, a collection),
    // and no commit without one.
    let commits = m.value("wasnap_database_commits_total", &[]);
    let operations = m.value("wasnap_database_operations_total", &[]);
    assert!(operations >= 9.0 && commits >= 1.0 && operations >= commits, "{}", m.text);
    assert!(m.value("wasnap_database_durable_commits_total", &[]) <= commits, "{}", m.text);

    // OpenMetrics for those who ask for it, as Prometheus does; nothing elsewhere.
    let om = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";
    let (status, headers, text) = get(d.metrics(), "/metrics", Some(om)).await;
    assert_eq!(status, 200);
    assert!(headers["content-type"].starts_with("application/openmetrics-text"), "{headers:?}");
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert!(text.contains("# TYPE wasnap_operations counter\n"), "{text}");
    assert_eq!(get(d.metrics(), "/", None).await.0, 404);
    assert_eq!(get(d.metrics(), "/metrics/x", None).await.0, 404);

    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metrics_address_in_use_stops_the_start_with_its_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = temp_dir();
    let opts = options(&dir, addr);
    let socket = opts.socket.clone();
    let (tx, serving) = oneshot::channel();
    let err = serve_reporting(opts, std::future::pending(), Some(tx)).await.unwrap_err();
    assert_eq!(err.kind(), wasnap::ErrorKind::Unavailable, "{err}");
    assert!(err.to_string().contains(&format!("metrics address {addr}")), "{err}");
    assert!(serving.await.is_err(), "a daemon that did not start reports no address");
    assert!(!socket.exists(), "the socket is not left behind: {}", socket.display());
    // The root was closed: a daemon without the endpoint starts on it.
    let mut opts = options(&dir, addr);
    opts.config.metrics.address = None;
    let (tx, serving) = oneshot::channel();
    let (stop, stopped) = oneshot::channel::<()>();
    let done = tokio::spawn(serve_reporting(
        opts,
        async move {
            let _ = stopped.await;
        },
        Some(tx),
    ));
    let serving: Serving = serving.await.unwrap();
    assert_eq!((serving.socket, serving.metrics), (PathBuf::from(&socket), None));
    let _ = stop.send(());
    done.await.unwrap().unwrap();
}
