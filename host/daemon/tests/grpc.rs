#![allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is what it should do

//! The daemon's services in process, over a real unix socket: containerd's error
//! codes, namespaces from the header, containerd's unnamespaced collector calls,
//! streamed lists, leases, and a graceful stop that lets a call in flight finish.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::oneshot;
use tonic::Code;
use wasnap::root::{Config, DriverConfig};
use wasnap_daemon::client::{Client, request};
use wasnap_daemon::proto::admin as adm;
use wasnap_daemon::proto::leases as lpb;
use wasnap_daemon::proto::snapshots::*;
use wasnap_daemon::serve::{Options, serve};

/// A daemon serving a native snapshotter in a temp dir on tmpfs; stops when dropped.
struct Daemon {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<wasnap::Result<()>>>,
}

impl Daemon {
    async fn start() -> Daemon {
        Self::start_with(|_| {}).await
    }

    /// As [`Daemon::start`], with `tune` applied to the configuration.
    async fn start_with(tune: impl FnOnce(&mut Config)) -> Daemon {
        let base = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm" } else { "/tmp" };
        let dir = tempfile::Builder::new().prefix("wasnap-daemon-").tempdir_in(base).unwrap();
        let socket = dir.path().join("run/wasnap.sock");
        let mut config = Config {
            default_snapshotter: "native".into(),
            snapshotters: BTreeMap::from([("native".into(), DriverConfig::Native.into())]),
            ..Config::default()
        };
        tune(&mut config);
        let opts = Options {
            root: dir.path().join("root"),
            socket: socket.clone(),
            config,
            shutdown_timeout: Duration::from_secs(5),
            reconfigure: None,
        };
        let (tx, rx) = oneshot::channel();
        let done = tokio::spawn(serve(opts, async move {
            let _ = rx.await;
        }));
        for _ in 0..500 {
            if socket.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Daemon { _dir: dir, socket, stop: Some(tx), done: Some(done) }
    }

    async fn client(&self) -> Client {
        Client::connect(&self.socket).await.unwrap()
    }

    async fn stop(mut self) -> wasnap::Result<()> {
        let _ = self.stop.take().unwrap().send(());
        self.done.take().unwrap().await.unwrap()
    }
}

/// The code of a call that must fail.
fn code<T>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(_) => panic!("the call succeeded"),
        Err(s) => s.code(),
    }
}

fn prepare(key: &str, parent: &str) -> PrepareSnapshotRequest {
    PrepareSnapshotRequest {
        snapshotter: "native".into(),
        key: key.into(),
        parent: parent.into(),
        labels: HashMap::new(),
    }
}

fn commit(name: &str, key: &str) -> CommitSnapshotRequest {
    CommitSnapshotRequest {
        snapshotter: "native".into(),
        name: name.into(),
        key: key.into(),
        ..Default::default()
    }
}

fn stat(key: &str) -> StatSnapshotRequest {
    StatSnapshotRequest { snapshotter: "native".into(), key: key.into() }
}

fn remove(key: &str) -> RemoveSnapshotRequest {
    RemoveSnapshotRequest { snapshotter: "native".into(), key: key.into() }
}

async fn list(
    c: &Client,
    ns: Option<&str>,
    filters: &[&str],
) -> Result<Vec<String>, tonic::Status> {
    let req = ListSnapshotsRequest {
        snapshotter: "native".into(),
        filters: filters.iter().map(|f| f.to_string()).collect(),
    };
    let mut stream = c.snapshots().list(request(req, ns, None)).await?.into_inner();
    let mut names = Vec::new();
    while let Some(batch) = stream.message().await? {
        names.extend(batch.info.into_iter().map(|i| i.name));
    }
    Ok(names)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_carry_containerds_codes() {
    let d = Daemon::start().await;
    let c = d.client().await;
    let mut s = c.snapshots();
    let ns = Some("default");

    assert_eq!(code(s.stat(request(stat("missing"), ns, None)).await), Code::NotFound);
    s.prepare(request(prepare("a", ""), ns, None)).await.unwrap();
    assert_eq!(code(s.prepare(request(prepare("a", ""), ns, None)).await), Code::AlreadyExists);
    // Only committed snapshots may be parents (containerd: "parent is not committed").
    assert_eq!(code(s.prepare(request(prepare("b", "a"), ns, None)).await), Code::InvalidArgument);
    s.commit(request(commit("c", "a"), ns, None)).await.unwrap();
    s.prepare(request(prepare("b", "c"), ns, None)).await.unwrap();
    assert_eq!(code(s.remove(request(remove("c"), ns, None)).await), Code::FailedPrecondition);
    assert_eq!(code(list(&c, ns, &["kind=="]).await), Code::InvalidArgument);
    let bad_ns = s.stat(request(stat("a"), Some("not a namespace!"), None)).await;
    assert_eq!(code(bad_ns), Code::InvalidArgument);
    let unknown = StatSnapshotRequest { snapshotter: "nope".into(), key: "c".into() };
    let err = s.stat(request(unknown, ns, None)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("snapshotter not loaded: nope"), "{err:?}");
    // Messages end in the class, as containerd's errdefs write them.
    let err = s.stat(request(stat("missing"), ns, None)).await.unwrap_err();
    assert!(err.message().ends_with(": not found"), "{err:?}");
    // A commit onto another parent (containerd 2's rebase) is refused; onto its own, done.
    let rebase = CommitSnapshotRequest { parent: "a".into(), ..commit("d", "b") };
    assert_eq!(code(s.commit(request(rebase, ns, None)).await), Code::Unimplemented);
    assert_eq!(
        s.stat(request(stat("b"), ns, None)).await.unwrap().into_inner().info.unwrap().kind,
        Kind::Active as i32
    );
    let own = CommitSnapshotRequest { parent: "c".into(), ..commit("d", "b") };
    s.commit(request(own, ns, None)).await.unwrap();
    let d_info = s.stat(request(stat("d"), ns, None)).await.unwrap().into_inner().info.unwrap();
    assert_eq!(d_info.parent, "c");
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_come_from_the_header_and_containerds_collector_sees_only_its_own() {
    let d = Daemon::start().await;
    let c = d.client().await;
    let mut s = c.snapshots();
    // containerd's keys carry their namespace; a CLI user's do not.
    s.prepare(request(prepare("default/1/extract", ""), Some("default"), None)).await.unwrap();
    s.prepare(request(prepare("k8s.io/7/sha256:ab", ""), Some("k8s.io"), None)).await.unwrap();
    s.prepare(request(prepare("base", ""), Some("default"), None)).await.unwrap();
    s.prepare(request(prepare("other/1/x", ""), Some("default"), None)).await.unwrap();

    assert_eq!(
        list(&c, Some("default"), &[]).await.unwrap(),
        ["base", "default/1/extract", "other/1/x"]
    );
    assert_eq!(list(&c, Some("k8s.io"), &[]).await.unwrap(), ["k8s.io/7/sha256:ab"]);
    // No header: containerd's collector. It sees what containerd made, in every
    // namespace, and nothing else ("base", and a key naming another namespace).
    assert_eq!(list(&c, None, &[]).await.unwrap(), ["default/1/extract", "k8s.io/7/sha256:ab"]);
    // ... and may stat and remove by key.
    s.stat(request(stat("k8s.io/7/sha256:ab"), None, None)).await.unwrap();
    s.remove(request(remove("k8s.io/7/sha256:ab"), None, None)).await.unwrap();
    assert!(list(&c, Some("k8s.io"), &[]).await.unwrap().is_empty());
    // A key that names no namespace cannot be acted on without one.
    let err = s.remove(request(remove("base"), None, None)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("namespace is required"), "{err:?}");
    assert_eq!(list(&c, Some("default"), &[]).await.unwrap().len(), 3);
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_stream_in_batches_and_filter_and_updates_take_field_paths() {
    let d = Daemon::start().await;
    let c = d.client().await;
    let mut s = c.snapshots();
    let ns = Some("default");
    for i in 0..250 {
        s.prepare(request(prepare(&format!("a{i:03}"), ""), ns, None)).await.unwrap();
    }
    s.commit(request(commit("c", "a000"), ns, None)).await.unwrap();
    let req = ListSnapshotsRequest { snapshotter: "native".into(), filters: vec![] };
    let mut stream = c.snapshots().list(request(req, ns, None)).await.unwrap().into_inner();
    let mut batches = Vec::new();
    while let Some(b) = stream.message().await.unwrap() {
        batches.push(b.info.len());
    }
    assert_eq!(batches.iter().sum::<usize>(), 250);
    assert!(batches.len() >= 3, "{batches:?}");
    assert_eq!(list(&c, ns, &["kind==committed"]).await.unwrap(), ["c"]);

    // ctr's label: an Update with labels.KEY paths.
    let info = Info {
        name: "c".into(),
        labels: HashMap::from([("x".to_owned(), "1".to_owned())]),
        ..Default::default()
    };
    let update = UpdateSnapshotRequest {
        snapshotter: "native".into(),
        info: Some(info),
        update_mask: Some(prost_types::FieldMask { paths: vec!["labels.x".into()] }),
    };
    let got = s.update(request(update, ns, None)).await.unwrap().into_inner().info.unwrap();
    assert_eq!(got.labels.get("x").map(String::as_str), Some("1"));
    assert_eq!(got.kind, Kind::Committed as i32);
    let bad = UpdateSnapshotRequest {
        snapshotter: "native".into(),
        info: Some(Info { name: "c".into(), ..Default::default() }),
        update_mask: Some(prost_types::FieldMask { paths: vec!["parent".into()] }),
    };
    assert_eq!(s.update(request(bad, ns, None)).await.unwrap_err().code(), Code::InvalidArgument);
    d.stop().await.unwrap();
}

/// An admin report is one message, as large as what it reports: past tonic's default
/// limit of 4 MiB, the client still takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_report_larger_than_4_mib_reaches_the_client() {
    let d = Daemon::start().await;
    let c = d.client().await;
    let mut s = c.snapshots();
    let ns = Some("default");
    let description = "d".repeat(4000);
    for i in 0..1100 {
        let mut p = prepare(&format!("k{i:04}"), "");
        p.labels.insert(wasnap::metadata::usage::LABEL_DESCRIPTION.into(), description.clone());
        s.prepare(request(p, ns, None)).await.unwrap();
    }
    let du = adm::DuRequest { snapshotter: "native".into(), filters: vec![], verbose: false };
    let report = c.admin().du(request(du, ns, None)).await.unwrap().into_inner();
    assert!(report.json.len() > 4 << 20, "{} bytes", report.json.len());
    let du: wasnap::metadata::DiskUsage = serde_json::from_str(&report.json).unwrap();
    assert_eq!(du.records.len(), 1100);
    d.stop().await.unwrap();
}

/// A client that keeps a stream open and stops moving it holds the thread serving it no
/// longer than `stream_idle_secs`: an upload that sends nothing more fails and keeps no
/// blob, and a List whose client reads nothing ends with an error after what it had
/// sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_stands_still_fails_after_stream_idle_secs() {
    let d = Daemon::start_with(|c| c.daemon.stream_idle_secs = 1).await;
    let c = d.client().await;
    let ns = Some("default");

    let (tx, rx) = tokio::sync::mpsc::channel::<adm::ContentIngestRequest>(4);
    let start = adm::ContentIngestRequest {
        part: Some(adm::content_ingest_request::Part::Start(adm::ContentIngestStart::default())),
    };
    tx.send(start).await.unwrap();
    let data = adm::ContentIngestRequest {
        part: Some(adm::content_ingest_request::Part::Data(b"some".to_vec())),
    };
    tx.send(data).await.unwrap();
    let mut admin = c.admin();
    let started = std::time::Instant::now();
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let refused = tokio::time::timeout(
        Duration::from_secs(30),
        admin.content_ingest(request(stream, ns, None)),
    )
    .await
    .expect("the daemon ends the upload");
    let e = refused.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    assert!(e.message().contains("sent nothing for"), "{e}");
    assert!(started.elapsed() >= Duration::from_millis(900), "{:?}", started.elapsed());
    drop(tx);
    let listed = request(adm::ContentListRequest::default(), ns, None);
    let listed = c.admin().content_list(listed).await.unwrap().into_inner().json;
    assert_eq!(listed, "[]", "no blob kept");

    // More batches than the channel and HTTP/2's windows hold (~6 MB: the client's
    // stream window is 2 MiB), none of them read.
    let mut s = c.snapshots();
    let long = "l".repeat(4000);
    for i in 0..1500 {
        let mut p = prepare(&format!("k{i:04}"), "");
        p.labels.insert("l".into(), long.clone());
        s.prepare(request(p, ns, None)).await.unwrap();
    }
    let failed = || async {
        let s = c.admin().status(adm::StatusRequest {}).await.unwrap().into_inner();
        s.failed_requests
    };
    let before = failed().await;
    let req = ListSnapshotsRequest { snapshotter: "native".into(), filters: vec![] };
    let mut stream = c.snapshots().list(request(req, ns, None)).await.unwrap().into_inner();
    // Read nothing until the daemon has given up on the List.
    let mut waited = Duration::ZERO;
    while failed().await == before {
        assert!(waited < Duration::from_secs(60), "the List never ended");
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += Duration::from_millis(50);
    }
    let mut got = 0;
    let end = loop {
        match stream.message().await {
            Ok(Some(b)) => got += b.info.len(),
            Ok(None) => break None,
            Err(e) => break Some(e),
        }
    };
    let e = end.expect("the List ended with an error");
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    assert!(e.message().contains("took no batch"), "{e}");
    assert!(got < 1500, "{got}");
    // The daemon serves on; a List read as it comes is whole.
    assert_eq!(list(&c, ns, &[]).await.unwrap().len(), 1500);
    d.stop().await.unwrap();
}

/// A source that gives 100 bytes every 300 ms, ten times: a download piped in.
struct Trickle(usize);

impl std::io::Read for Trickle {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.0 == 0 {
            return Ok(0);
        }
        self.0 -= 1;
        std::thread::sleep(Duration::from_millis(300));
        let n = buf.len().min(100);
        buf[..n].fill(b'x');
        Ok(n)
    }
}

/// The client's upload sends what a slow source gives as it comes, not once it has a
/// whole chunk: an upload that takes longer than stream_idle_secs, from a source never
/// idle that long, succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_from_a_slow_source_is_not_idle() {
    let d = Daemon::start_with(|c| c.daemon.stream_idle_secs = 2).await;
    let socket = d.socket.clone();
    let started = std::time::Instant::now();
    let info = tokio::task::spawn_blocking(move || {
        let c = wasnap_daemon::client::Blocking::connect(&socket).unwrap();
        let h = wasnap_daemon::client::Headers { namespace: Some("default"), lease: None };
        c.content_ingest(h, adm::ContentIngestStart::default(), &mut Trickle(10))
    })
    .await
    .unwrap()
    .expect("the upload is never idle for 2 s");
    assert!(started.elapsed() >= Duration::from_secs(3), "{:?}", started.elapsed());
    assert_eq!(info.size, 1000);
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_hold_what_is_made_under_them() {
    let d = Daemon::start().await;
    let c = d.client().await;
    let mut l = c.leases();
    let ns = Some("default");
    let created = l
        .create(request(lpb::CreateRequest { id: "l1".into(), labels: HashMap::new() }, ns, None))
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    assert_eq!(created.id, "l1");
    c.snapshots().prepare(request(prepare("held", ""), ns, Some("l1"))).await.unwrap();
    let res = l
        .list_resources(request(lpb::ListResourcesRequest { id: "l1".into() }, ns, None))
        .await
        .unwrap()
        .into_inner()
        .resources;
    assert_eq!(res.len(), 1);
    assert_eq!((res[0].id.as_str(), res[0].r#type.as_str()), ("held", "snapshots/native"));
    // containerd's own lease header is not ours: ignored, the snapshot is a root.
    let mut req = request(prepare("containerds", ""), ns, None);
    req.metadata_mut().insert("containerd-lease", "theirs".parse().unwrap());
    c.snapshots().prepare(req).await.unwrap();
    // Deleting the lease with sync collects what only it held.
    l.delete(request(lpb::DeleteRequest { id: "l1".into(), sync: true }, ns, None)).await.unwrap();
    assert_eq!(list(&c, ns, &[]).await.unwrap(), ["containerds"]);
    let err = l.list(request(lpb::ListRequest { filters: vec![] }, None, None)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collection_that_deletes_a_lease_reports_what_only_it_held() {
    // The default collector runs in the background after every deletion: a sync lease
    // delete must not wake it, or it could take first what the report is to show.
    let d = Daemon::start().await;
    let c = d.client().await;
    let (mut l, mut a) = (c.leases(), c.admin());
    let ns = Some("default");
    let collect = |id: &str, dry_run: bool| {
        request(adm::CollectRequest { dry_run, delete_lease: id.into() }, ns, None)
    };
    for i in 0..20 {
        let (id, key) = (format!("l{i}"), format!("held{i}"));
        let create = lpb::CreateRequest { id: id.clone(), labels: HashMap::new() };
        l.create(request(create, ns, None)).await.unwrap();
        c.snapshots().prepare(request(prepare(&key, ""), ns, Some(&id))).await.unwrap();
        let json = a.collect(collect(&id, false)).await.unwrap().into_inner().json;
        let report: wasnap::gc::GcReport = serde_json::from_str(&json).unwrap();
        let removed: Vec<_> = report.removed.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(removed, [key.as_str()], "round {i}: {json}");
        assert!(list(&c, ns, &[]).await.unwrap().is_empty(), "round {i}");
    }
    // Not as a dry run (the lease stays), nor for a lease that is not there.
    let create = lpb::CreateRequest { id: "kept".into(), labels: HashMap::new() };
    l.create(request(create, ns, None)).await.unwrap();
    assert_eq!(code(a.collect(collect("kept", true)).await), Code::InvalidArgument);
    let listed = l.list(request(lpb::ListRequest { filters: vec![] }, ns, None)).await.unwrap();
    assert_eq!(listed.into_inner().leases.len(), 1);
    assert_eq!(code(a.collect(collect("nope", false)).await), Code::NotFound);
    d.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_refuses_new_connections_and_a_restart_serves_the_same_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    let opts = Options {
        root: dir.path().join("root"),
        socket: socket.clone(),
        config: Config {
            default_snapshotter: "native".into(),
            snapshotters: BTreeMap::from([("native".into(), DriverConfig::Native.into())]),
            ..Config::default()
        },
        shutdown_timeout: Duration::from_secs(5),
        reconfigure: None,
    };
    for round in 0..2 {
        let (tx, rx) = oneshot::channel::<()>();
        let done = tokio::spawn(serve(opts.clone(), async move {
            let _ = rx.await;
        }));
        let mut c = None;
        for _ in 0..500 {
            if let Ok(client) = Client::connect(&socket).await {
                c = Some(client);
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let c = c.expect("daemon answers");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777, 0o600);
        let mut s = c.snapshots();
        if round == 0 {
            s.prepare(request(prepare("kept", ""), Some("default"), None)).await.unwrap();
        } else {
            s.stat(request(stat("kept"), Some("default"), None)).await.unwrap();
        }
        tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), done).await.unwrap().unwrap().unwrap();
        assert!(!socket.exists(), "the socket is removed on stop");
        assert!(Client::connect(&socket).await.is_err());
    }
}

/// The daemon's count of calls whose work ran on the worker that received them.
async fn served_in_place(c: &Client) -> (u64, u64) {
    let s = c.admin().status(adm::StatusRequest {}).await.unwrap().into_inner();
    (s.served_in_place, s.requests)
}

/// The daemon's count of calls whose work ran on the worker that received them once it
/// had handed its share of the runtime over.
async fn served_handing_over(c: &Client) -> u64 {
    c.admin().status(adm::StatusRequest {}).await.unwrap().into_inner().served_handing_over
}

/// Stats `key` `n` times, one after the other.
async fn stats(c: &Client, key: &str, n: usize) {
    let mut s = c.snapshots();
    for _ in 0..n {
        s.stat(request(stat(key), Some("default"), None)).await.unwrap();
    }
}

/// A snapshot call alone in flight runs on the worker that received it (no hand-off to
/// the blocking pool); one that arrives while another call is in flight goes to the
/// pool, and is answered while that call still waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_alone_runs_in_place_and_one_beside_another_goes_to_the_pool() {
    let d = Daemon::start().await;
    let c = d.client().await;
    c.snapshots().prepare(request(prepare("a", ""), Some("default"), None)).await.unwrap();
    let (before, _) = served_in_place(&c).await;
    stats(&c, "a", 10).await;
    let (after, _) = served_in_place(&c).await;
    assert_eq!(after - before, 10, "ten calls one after the other, each alone");

    // Work that grows with the data runs in place alone only once the worker has handed
    // its share of the runtime over: a commit (it measures the layer and syncs it) and,
    // on native, a prepare (it copies the parent). A remove only drops the record.
    let (before, _) = served_in_place(&c).await;
    let over = served_handing_over(&c).await;
    let mut s = c.snapshots();
    s.commit(request(commit("a1", "a"), Some("default"), None)).await.unwrap();
    s.prepare(request(prepare("b", "a1"), Some("default"), None)).await.unwrap();
    s.remove(request(remove("b"), Some("default"), None)).await.unwrap();
    let (after, _) = served_in_place(&c).await;
    assert_eq!(after - before, 1, "only the remove ran in place as it came");
    assert_eq!(served_handing_over(&c).await - over, 2, "the commit and the prepare");
    s.prepare(request(prepare("a", "a1"), Some("default"), None)).await.unwrap();

    // An upload that has started and is not finished: a call in flight, on the pool.
    let (_, base) = served_in_place(&c).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<adm::ContentIngestRequest>(4);
    let start = adm::ContentIngestRequest {
        part: Some(adm::content_ingest_request::Part::Start(adm::ContentIngestStart::default())),
    };
    tx.send(start).await.unwrap();
    let mut admin = c.admin();
    let upload = tokio::spawn(async move {
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        admin.content_ingest(request(stream, Some("default"), None)).await
    });
    // Served once the daemon counts it: each status call counts itself, and the
    // upload one more.
    let mut started = false;
    for asked in 1..=500 {
        let (_, requests) = served_in_place(&c).await;
        if requests > base + asked {
            started = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(started, "the upload reached the daemon");
    let (before, _) = served_in_place(&c).await;
    let over = served_handing_over(&c).await;
    tokio::time::timeout(Duration::from_secs(10), async {
        stats(&c, "a", 5).await;
        let mut s = c.snapshots();
        s.commit(request(commit("a2", "a"), Some("default"), None)).await.unwrap();
    })
    .await
    .expect("calls beside a waiting one are answered");
    let (after, _) = served_in_place(&c).await;
    assert_eq!(after, before, "beside a call in flight, every call goes to the pool");
    assert_eq!(served_handing_over(&c).await, over, "the commit too");

    // The upload ends without its last message: refused, and the daemon keeps nothing.
    drop(tx);
    let refused = upload.await.unwrap();
    assert_eq!(code(refused), Code::Unavailable);
    let mut s = c.snapshots();
    s.prepare(request(prepare("a", "a2"), Some("default"), None)).await.unwrap();
    let (before, _) = served_in_place(&c).await;
    stats(&c, "a", 3).await;
    let (after, _) = served_in_place(&c).await;
    assert_eq!(after - before, 3, "alone again once the upload is over");
    d.stop().await.unwrap();
}

/// With one worker, a call running in place would hold up every other call until it
/// ends: every call's work goes to the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn with_one_worker_every_call_goes_to_the_pool() {
    let d = Daemon::start().await;
    let c = d.client().await;
    let mut s = c.snapshots();
    s.prepare(request(prepare("a", ""), Some("default"), None)).await.unwrap();
    stats(&c, "a", 10).await;
    s.commit(request(commit("a1", "a"), Some("default"), None)).await.unwrap();
    assert_eq!(served_in_place(&c).await.0, 0);
    assert_eq!(served_handing_over(&c).await, 0, "nor does a commit hand the worker over");
    d.stop().await.unwrap();
}

/// A call whose work grows with the data runs in place alone only once its worker has
/// handed its share of the runtime over, and holds up nobody: while a `Usage` of
/// 200,201 inodes runs so, a call from another connection is answered. (Run in place
/// as it came, it would hold its worker, and tokio does not hand that worker's I/O
/// driver to the other worker: the stat then waited for the usage in 10 to 16 of 30
/// runs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_walks_the_data_hands_its_worker_over_and_holds_up_no_other_connection() {
    let d = Daemon::start().await;
    let c = d.client().await;
    let mut s = c.snapshots();
    let mounts =
        s.prepare(request(prepare("big", ""), Some("default"), None)).await.unwrap().into_inner();
    s.prepare(request(prepare("small", ""), Some("default"), None)).await.unwrap();
    // Enough files that measuring them takes hundreds of times a stat's round trip.
    let dir = PathBuf::from(&mounts.mounts[0].source);
    let fill = dir.clone();
    tokio::task::spawn_blocking(move || {
        for d in 0..200 {
            let sub = fill.join(format!("d{d}"));
            std::fs::create_dir(&sub).unwrap();
            for f in 0..1000 {
                std::fs::File::create(sub.join(format!("f{f}"))).unwrap();
            }
        }
    })
    .await
    .unwrap();
    // The usage's first read of the directory marks its access time: the sign that it
    // runs, seen without a call to the daemon.
    if !reads_mark_atime(d._dir.path()) {
        eprintln!("skipped: {} does not update access times on reads", dir.display());
        return;
    }
    let (in_place, _) = served_in_place(&c).await;
    let over = served_handing_over(&c).await;
    let before = atime(&dir);
    let long = {
        let mut s = c.snapshots();
        let usage = UsageRequest { snapshotter: "native".into(), key: "big".into() };
        tokio::spawn(async move { s.usage(request(usage, Some("default"), None)).await })
    };
    let mut started = false;
    for _ in 0..10_000 {
        if atime(&dir) != before {
            started = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(started, "the usage read the snapshot");
    let other = d.client().await;
    other.snapshots().stat(request(stat("small"), Some("default"), None)).await.unwrap();
    assert!(!long.is_finished(), "the stat was answered while the usage still ran");
    let usage = long.await.unwrap().unwrap().into_inner();
    assert_eq!(usage.inodes, 200_201, "every file, every directory and the top one");
    let (after, _) = served_in_place(&c).await;
    assert_eq!(after - in_place, 0, "neither ran in place as it came");
    assert_eq!(
        served_handing_over(&c).await - over,
        1,
        "the usage, alone, ran once its worker had handed its share over; the stat, beside \
         it, on the pool"
    );
    d.stop().await.unwrap();
}

/// `p`'s access time.
fn atime(p: &std::path::Path) -> (i64, i64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).unwrap();
    (m.atime(), m.atime_nsec())
}

/// Whether reading a directory whose content changed since it was last read marks its
/// access time, in `dir`'s filesystem (not mounted `noatime`).
fn reads_mark_atime(dir: &std::path::Path) -> bool {
    let probe = tempfile::tempdir_in(dir).unwrap();
    std::thread::sleep(Duration::from_millis(10));
    std::fs::create_dir(probe.path().join("x")).unwrap();
    let before = atime(probe.path());
    std::fs::read_dir(probe.path()).unwrap().for_each(drop);
    atime(probe.path()) != before
}
