//! `grpc`: the daemon's request path, in process: bytes decoded as each request message
//! of the snapshots, leases and admin services (prost, as tonic decodes them), and
//! every message that decodes handed to the services over a fresh host with the native
//! driver on tmpfs, with the namespace and lease headers the input gives.
//!
//! An input is a sequence of calls (JSON, see [`Input`]; each body is the message's
//! protobuf bytes in hex), run in order against one host, so that a sequence can
//! prepare, commit, lease and remove what later calls name.
//!
//! Properties: decoding never panics, and what decodes encodes back to itself; every
//! call answers within [`CALL_TIMEOUT`] with a response or a status of one of the codes
//! the daemon maps errors to, never internal (a request cannot corrupt the host), never
//! a panic (a panic on the blocking pool is caught and counted too); and after the
//! sequence, `check` finds no orphan, missing or damaged snapshot. Only the cheap calls
//! are made: the rest (uploads, layers, merges, image import, reload) are decoded only.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use prost::Message;
use serde::{Deserialize, Serialize};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::{Code, Request, Response, Status};
use wasnap::root::{Config, DriverConfig};
use wasnap_daemon::client::{LEASE_HEADER, NAMESPACE_HEADER};
use wasnap_daemon::proto::admin as apb;
use wasnap_daemon::proto::admin::admin_server::Admin;
use wasnap_daemon::proto::leases as lpb;
use wasnap_daemon::proto::leases::leases_server::Leases;
use wasnap_daemon::proto::snapshots as spb;
use wasnap_daemon::proto::snapshots::snapshots_server::Snapshots;
use wasnap_daemon::server::{AdminService, LeasesService, Shared, SnapshotsService};

use crate::engine::{Mutator, Outcome, Target};
use crate::input::{below, decode, encode, one_in, pick, string};

/// The target.
pub const TARGET: Target = Target {
    name: "grpc",
    about: "request messages decoded and served in process (snapshots, leases, admin)",
    run,
    generate,
    mutate,
    seeds,
    dictionary: &["native", "default", "labels.", "containerd.io/gc.root", "\0", "é"],
    contained_panics: &[],
    known: &[],
    timeout: Duration::from_secs(120),
};

/// Longest one call may take to answer.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(20);
/// Most calls of one input that are run.
const MAX_CALLS: usize = 24;

/// One input: calls made in order against one fresh host.
#[derive(Debug, Clone, Default, Serialize, Deserialize, Arbitrary)]
pub struct Input {
    /// The calls.
    pub calls: Vec<Call>,
}

/// One call.
#[derive(Debug, Clone, Serialize, Deserialize, Arbitrary)]
pub struct Call {
    /// The method.
    pub method: Method,
    /// The `containerd-namespace` header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The `wasnap-lease` header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
    /// The request message's bytes, in hex.
    #[serde(default, with = "hex_bytes")]
    pub body: Vec<u8>,
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::engine::hex(b))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        crate::engine::unhex(&s).ok_or_else(|| serde::de::Error::custom("not hex"))
    }
}

/// Every request message of the three services, named by its call.
#[allow(missing_docs)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Arbitrary)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    Prepare,
    View,
    Mounts,
    Commit,
    Remove,
    Stat,
    Update,
    List,
    Usage,
    Cleanup,
    LeaseCreate,
    LeaseDelete,
    LeaseList,
    LeaseAddResource,
    LeaseDeleteResource,
    LeaseListResources,
    Status,
    Collect,
    Check,
    Du,
    Prune,
    Info,
    ContentList,
    ContentInfo,
    ContentDelete,
    // Decoded only: they upload, read files, or do heavy work.
    Reload,
    ContentIngest,
    ContentRead,
    LayerApply,
    LayerDiff,
    LayerRegister,
    Merge,
    DiffSnapshot,
    ImageImport,
}

/// A host and its services, on a fresh root.
struct Daemon {
    _dir: tempfile::TempDir,
    host: Arc<wasnap::Host>,
    snapshots: SnapshotsService,
    leases: LeasesService,
    admin: AdminService,
}

impl Daemon {
    fn start() -> Result<Daemon, String> {
        let dir = crate::scratch::tempdir("grpc-").map_err(|e| format!("setup: {e}"))?;
        let config = Config {
            default_snapshotter: "native".into(),
            snapshotters: [("native".to_owned(), DriverConfig::Native.into())].into(),
            ..Config::default()
        };
        let host = wasnap::Host::open_config(
            &dir.path().join("root"),
            Arc::new(wasnap::fault::Faults::new()),
            config,
        )
        .map_err(|e| format!("setup: open the host: {e}"))?;
        let host = Arc::new(host);
        let shared = Shared::new(host.clone(), PathBuf::from("/nonexistent/fuzz.sock"));
        Ok(Daemon {
            _dir: dir,
            host,
            snapshots: SnapshotsService::new(shared.clone()),
            leases: LeasesService::new(shared.clone()),
            admin: AdminService::new(shared),
        })
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("build the fuzz runtime")
    })
}

fn request<M>(msg: M, call: &Call) -> Request<M> {
    let mut req = Request::new(msg);
    // A value that is not a valid header could not have arrived over the wire.
    let header = |v: &Option<String>| {
        v.as_ref().and_then(|v| MetadataValue::<Ascii>::try_from(v.as_bytes()).ok())
    };
    if let Some(v) = header(&call.namespace) {
        req.metadata_mut().insert(NAMESPACE_HEADER, v);
    }
    if let Some(v) = header(&call.lease) {
        req.metadata_mut().insert(LEASE_HEADER, v);
    }
    req
}

/// The codes the daemon maps host errors to (`wasnap_daemon::convert::status`).
const CODES: &[Code] = &[
    Code::NotFound,
    Code::AlreadyExists,
    Code::FailedPrecondition,
    Code::InvalidArgument,
    Code::Unimplemented,
    Code::Unavailable,
];

fn check_status(method: Method, s: &Status) -> Result<String, String> {
    if s.message().contains("panicked") {
        return Err(format!("panic: {method:?} answered {:?}: {}", s.code(), s.message()));
    }
    if s.code() == Code::Internal {
        return Err(format!("internal: {method:?} answered internal: {}", s.message()));
    }
    if !CODES.contains(&s.code()) {
        return Err(format!("code: {method:?} answered {:?}: {}", s.code(), s.message()));
    }
    Ok(format!("{:?}", s.code()))
}

/// Decodes `body` as `M`: `None` if it is not one. What decodes must encode back to
/// the same message.
fn decoded<M: Message + Default + PartialEq + std::fmt::Debug>(
    body: &[u8],
) -> Result<Option<M>, String> {
    match M::decode(body) {
        Err(_) => Ok(None),
        Ok(m) => {
            let again = M::decode(m.encode_to_vec().as_slice())
                .map_err(|e| format!("round trip: a decoded message does not decode again: {e}"))?;
            if again != m {
                return Err(format!("round trip: {m:?} encodes to {again:?}"));
            }
            Ok(Some(m))
        }
    }
}

async fn unary<M, R, F, Fut>(call: &Call, f: F) -> Result<String, String>
where
    M: Message + Default + PartialEq + std::fmt::Debug,
    F: FnOnce(Request<M>) -> Fut,
    Fut: Future<Output = Result<Response<R>, Status>>,
{
    let Some(msg) = decoded::<M>(&call.body)? else { return Ok("undecodable".into()) };
    match tokio::time::timeout(CALL_TIMEOUT, f(request(msg, call))).await {
        Err(_) => Err(format!("hang: {:?} did not answer in {CALL_TIMEOUT:?}", call.method)),
        Ok(Ok(_)) => Ok("ok".into()),
        Ok(Err(s)) => check_status(call.method, &s),
    }
}

async fn list(d: &Daemon, call: &Call) -> Result<String, String> {
    let Some(msg) = decoded::<spb::ListSnapshotsRequest>(&call.body)? else {
        return Ok("undecodable".into());
    };
    let walk = async {
        let mut rx = match d.snapshots.list(request(msg, call)).await {
            Ok(r) => r.into_inner().into_inner(),
            Err(s) => return check_status(call.method, &s),
        };
        let mut n = 0;
        while let Some(item) = rx.recv().await {
            match item {
                Ok(batch) => n += batch.info.len(),
                Err(s) => return check_status(call.method, &s),
            }
        }
        Ok(format!("ok:{}", n.min(3)))
    };
    tokio::time::timeout(CALL_TIMEOUT, walk)
        .await
        .unwrap_or_else(|_| Err(format!("hang: List did not end in {CALL_TIMEOUT:?}")))
}

async fn one(d: &Daemon, call: &Call) -> Result<String, String> {
    let (s, l, a) = (&d.snapshots, &d.leases, &d.admin);
    match call.method {
        Method::Prepare => unary(call, |r| s.prepare(r)).await,
        Method::View => unary(call, |r| s.view(r)).await,
        Method::Mounts => unary(call, |r| s.mounts(r)).await,
        Method::Commit => unary(call, |r| s.commit(r)).await,
        Method::Remove => unary(call, |r| s.remove(r)).await,
        Method::Stat => unary(call, |r| s.stat(r)).await,
        Method::Update => unary(call, |r| s.update(r)).await,
        Method::List => list(d, call).await,
        Method::Usage => unary(call, |r| s.usage(r)).await,
        Method::Cleanup => unary(call, |r| s.cleanup(r)).await,
        Method::LeaseCreate => unary(call, |r| l.create(r)).await,
        Method::LeaseDelete => unary(call, |r| l.delete(r)).await,
        Method::LeaseList => unary(call, |r| l.list(r)).await,
        Method::LeaseAddResource => unary(call, |r| l.add_resource(r)).await,
        Method::LeaseDeleteResource => unary(call, |r| l.delete_resource(r)).await,
        Method::LeaseListResources => unary(call, |r| l.list_resources(r)).await,
        Method::Status => unary(call, |r| a.status(r)).await,
        Method::Collect => unary(call, |r| a.collect(r)).await,
        Method::Check => unary(call, |r| a.check(r)).await,
        Method::Du => unary(call, |r| a.du(r)).await,
        Method::Prune => unary(call, |r| a.prune(r)).await,
        Method::Info => unary(call, |r| a.info(r)).await,
        Method::ContentList => unary(call, |r| a.content_list(r)).await,
        Method::ContentInfo => unary(call, |r| a.content_info(r)).await,
        Method::ContentDelete => unary(call, |r| a.content_delete(r)).await,
        Method::Reload => only::<apb::ReloadRequest>(&call.body),
        Method::ContentIngest => only::<apb::ContentIngestRequest>(&call.body),
        Method::ContentRead => only::<apb::ContentReadRequest>(&call.body),
        Method::LayerApply => only::<apb::LayerApplyRequest>(&call.body),
        Method::LayerDiff => only::<apb::LayerDiffRequest>(&call.body),
        Method::LayerRegister => only::<apb::LayerRegisterRequest>(&call.body),
        Method::Merge => only::<apb::MergeRequest>(&call.body),
        Method::DiffSnapshot => only::<apb::DiffSnapshotRequest>(&call.body),
        Method::ImageImport => only::<apb::ImageImportRequest>(&call.body),
    }
}

fn only<M: Message + Default + PartialEq + std::fmt::Debug>(body: &[u8]) -> Result<String, String> {
    Ok(if decoded::<M>(body)?.is_some() { "decoded" } else { "undecodable" }.into())
}

fn run(bytes: &[u8]) -> Result<Outcome, String> {
    let input: Input = decode(bytes);
    let d = Daemon::start()?;
    let mut outcome = Vec::new();
    let result = runtime().block_on(async {
        for call in input.calls.iter().take(MAX_CALLS) {
            let o = one(&d, call).await?;
            outcome.push(format!("{:?}:{o}", call.method));
        }
        Ok::<_, String>(())
    });
    let checked = result.and_then(|()| {
        // Removals queued in the background end first: `check` run beside one can
        // report an orphan that is being removed (the walk sees the snapshot, the
        // removal ends and unmarks it, then the in-flight set is read). Found here;
        // see the crate's report.
        if let Ok(sn) = d.host.snapshotter("native") {
            sn.settle();
        }
        let reports = d.host.check().map_err(|e| format!("check: failed: {e}"))?;
        for r in reports {
            if r.problems() > 0 {
                return Err(format!("check: after the calls, {r:?}"));
            }
        }
        Ok(())
    });
    let closed = d.host.close().map_err(|e| format!("close: {e}"));
    checked?;
    closed?;
    Ok(outcome.join(" "))
}

// --- Making inputs ------------------------------------------------------------------

const SNAPSHOTTERS: &[&str] = &["native", "native", "native", "", "overlay", "nope", "../x"];
const KEYS: &[&str] = &[
    "a",
    "b",
    "c",
    "a",
    "b",
    "default/1/x",
    "default/2/y",
    "k8s.io/3/z",
    "",
    "a/b",
    "..",
    ".",
    "/",
    "x\0y",
    "é",
    "a b",
    "containerd.io/gc.root",
    "-",
    "a\nb",
];
const NAMESPACES: &[&str] = &["default", "default", "k8s.io", "", "bad ns", "a..b", "é", "-x"];
const LEASES: &[&str] = &["l1", "l2", "", "bad lease", "é"];
const LABEL_KEYS: &[&str] = &[
    "a",
    "team",
    "containerd.io/gc.root",
    "containerd.io/gc.ref.snapshot.native",
    "containerd.io/gc.ref.snapshot.native/1",
    "containerd.io/gc.expire",
    "containerd.io/gc.flat",
    "containerd.io/snapshot.ref",
    "containerd.io/snapshot/remote",
    "",
    "containerd.io/gc.bref.snapshot.native",
];
const LABEL_VALUES: &[&str] =
    &["", "x", "a", "b", "2000-01-01T00:00:00Z", "3000-01-01T00:00:00Z", "not a time"];
const FILTERS: &[&str] = &[
    "",
    "name==a",
    "kind==committed",
    "labels.team==blue",
    "labels.\"containerd.io/gc.root\"",
    "parent==b",
    "name~=^d",
    "name==",
    "bad filter",
    "id==l1",
    "labels.a",
    "digest==x",
];
const RESOURCE_TYPES: &[&str] =
    &["snapshots/native", "snapshots/nope", "content", "ingests", "", "bogus"];

fn labels(u: &mut Unstructured<'_>) -> HashMap<String, String> {
    (0..below(u, 3))
        .map(|_| {
            let k = string(u, LABEL_KEYS, 4096);
            let v = if one_in(u, 2) {
                pick(u, KEYS).to_owned()
            } else {
                pick(u, LABEL_VALUES).to_owned()
            };
            (k, v)
        })
        .collect()
}

fn key(u: &mut Unstructured<'_>) -> String {
    if one_in(u, 12) { string(u, KEYS, 5000) } else { pick(u, KEYS).to_owned() }
}

fn sn(u: &mut Unstructured<'_>) -> String {
    pick(u, SNAPSHOTTERS).to_owned()
}

fn filters(u: &mut Unstructured<'_>) -> Vec<String> {
    (0..below(u, 3)).map(|_| string(u, FILTERS, 0)).collect()
}

fn timestamp(u: &mut Unstructured<'_>) -> Option<prost_types::Timestamp> {
    match below(u, 4) {
        0 => None,
        1 => Some(prost_types::Timestamp { seconds: i64::MIN, nanos: i32::MIN }),
        2 => Some(prost_types::Timestamp { seconds: i64::MAX, nanos: i32::MAX }),
        _ => Some(prost_types::Timestamp {
            seconds: i64::arbitrary(u).unwrap_or(0),
            nanos: i32::arbitrary(u).unwrap_or(0),
        }),
    }
}

fn resource(u: &mut Unstructured<'_>) -> Option<lpb::Resource> {
    (!one_in(u, 8))
        .then(|| lpb::Resource { id: key(u), r#type: pick(u, RESOURCE_TYPES).to_owned() })
}

/// A well-formed message for `method`.
fn body(u: &mut Unstructured<'_>, method: Method) -> Vec<u8> {
    match method {
        Method::Prepare => spb::PrepareSnapshotRequest {
            snapshotter: sn(u),
            key: key(u),
            parent: if one_in(u, 2) { key(u) } else { String::new() },
            labels: labels(u),
        }
        .encode_to_vec(),
        Method::View => spb::ViewSnapshotRequest {
            snapshotter: sn(u),
            key: key(u),
            parent: if one_in(u, 2) { key(u) } else { String::new() },
            labels: labels(u),
        }
        .encode_to_vec(),
        Method::Mounts => spb::MountsRequest { snapshotter: sn(u), key: key(u) }.encode_to_vec(),
        Method::Commit => spb::CommitSnapshotRequest {
            snapshotter: sn(u),
            name: key(u),
            key: key(u),
            labels: labels(u),
            parent: if one_in(u, 4) { key(u) } else { String::new() },
        }
        .encode_to_vec(),
        Method::Remove => {
            spb::RemoveSnapshotRequest { snapshotter: sn(u), key: key(u) }.encode_to_vec()
        }
        Method::Stat => {
            spb::StatSnapshotRequest { snapshotter: sn(u), key: key(u) }.encode_to_vec()
        }
        Method::Update => spb::UpdateSnapshotRequest {
            snapshotter: sn(u),
            info: (!one_in(u, 8)).then(|| spb::Info {
                name: key(u),
                parent: if one_in(u, 3) { key(u) } else { String::new() },
                kind: below(u, 6) as i32 - 1,
                created_at: timestamp(u),
                updated_at: timestamp(u),
                labels: labels(u),
            }),
            update_mask: (!one_in(u, 3)).then(|| prost_types::FieldMask {
                paths: (0..below(u, 3))
                    .map(|_| {
                        string(
                            u,
                            &[
                                "labels",
                                "labels.a",
                                "labels.team",
                                "labels.",
                                "name",
                                "kind",
                                "labels.containerd.io/gc.root",
                            ],
                            0,
                        )
                    })
                    .collect(),
            }),
        }
        .encode_to_vec(),
        Method::List => {
            spb::ListSnapshotsRequest { snapshotter: sn(u), filters: filters(u) }.encode_to_vec()
        }
        Method::Usage => spb::UsageRequest { snapshotter: sn(u), key: key(u) }.encode_to_vec(),
        Method::Cleanup => spb::CleanupRequest { snapshotter: sn(u) }.encode_to_vec(),
        Method::LeaseCreate => {
            lpb::CreateRequest { id: pick(u, LEASES).to_owned(), labels: labels(u) }.encode_to_vec()
        }
        Method::LeaseDelete => {
            lpb::DeleteRequest { id: pick(u, LEASES).to_owned(), sync: one_in(u, 2) }
                .encode_to_vec()
        }
        Method::LeaseList => lpb::ListRequest { filters: filters(u) }.encode_to_vec(),
        Method::LeaseAddResource => {
            lpb::AddResourceRequest { id: pick(u, LEASES).to_owned(), resource: resource(u) }
                .encode_to_vec()
        }
        Method::LeaseDeleteResource => {
            lpb::DeleteResourceRequest { id: pick(u, LEASES).to_owned(), resource: resource(u) }
                .encode_to_vec()
        }
        Method::LeaseListResources => {
            lpb::ListResourcesRequest { id: pick(u, LEASES).to_owned() }.encode_to_vec()
        }
        Method::Status => apb::StatusRequest {}.encode_to_vec(),
        Method::Collect => apb::CollectRequest {
            dry_run: one_in(u, 2),
            delete_lease: if one_in(u, 4) { pick(u, LEASES).to_owned() } else { String::new() },
        }
        .encode_to_vec(),
        Method::Check => apb::CheckRequest {}.encode_to_vec(),
        Method::Du => {
            apb::DuRequest { snapshotter: sn(u), filters: filters(u), verbose: one_in(u, 2) }
                .encode_to_vec()
        }
        Method::Prune => apb::PruneRequest {
            snapshotter: sn(u),
            filters: filters(u),
            all: one_in(u, 2),
            dry_run: one_in(u, 2),
            keep_duration_ms: if one_in(u, 2) { 0 } else { u64::arbitrary(u).unwrap_or(0) },
            keep_storage: if one_in(u, 2) { 0 } else { u64::arbitrary(u).unwrap_or(0) },
            reserved_space: if one_in(u, 2) { 0 } else { u64::arbitrary(u).unwrap_or(0) },
            min_free_space: if one_in(u, 2) { 0 } else { u64::arbitrary(u).unwrap_or(0) },
        }
        .encode_to_vec(),
        Method::Info => apb::InfoRequest { snapshotter: sn(u) }.encode_to_vec(),
        Method::ContentList => apb::ContentListRequest { filters: filters(u) }.encode_to_vec(),
        Method::ContentInfo => {
            apb::ContentInfoRequest { digest: string(u, &["sha256:", "0", "a", "../"], 0) }
                .encode_to_vec()
        }
        Method::ContentDelete => {
            apb::ContentDeleteRequest { digest: string(u, &["sha256:", "0", "a", "../"], 0) }
                .encode_to_vec()
        }
        // Decoded only: any bytes will do.
        _ => {
            let n = below(u, 64);
            u.bytes(n).map(<[u8]>::to_vec).unwrap_or_default()
        }
    }
}

fn call(u: &mut Unstructured<'_>) -> Call {
    let method = Method::arbitrary(u).unwrap_or(Method::Stat);
    let namespace = if one_in(u, 6) { None } else { Some(pick(u, NAMESPACES).to_owned()) };
    let lease = if one_in(u, 4) { Some(pick(u, LEASES).to_owned()) } else { None };
    let body = body(u, method);
    Call { method, namespace, lease, body }
}

/// A call in the default namespace.
fn plain(method: Method, body: Vec<u8>) -> Call {
    Call { method, namespace: Some("default".into()), lease: None, body }
}

/// Prepare `a`, commit it as `b`, prepare `c` on `b`: something for later calls to find.
fn prelude() -> Vec<Call> {
    vec![
        plain(
            Method::Prepare,
            spb::PrepareSnapshotRequest {
                snapshotter: "native".into(),
                key: "a".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        plain(
            Method::Commit,
            spb::CommitSnapshotRequest {
                snapshotter: "native".into(),
                name: "b".into(),
                key: "a".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        plain(
            Method::Prepare,
            spb::PrepareSnapshotRequest {
                snapshotter: "native".into(),
                key: "c".into(),
                parent: "b".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
    ]
}

fn generate(u: &mut Unstructured<'_>) -> Vec<u8> {
    let mut calls = if one_in(u, 2) { prelude() } else { Vec::new() };
    calls.extend((0..1 + below(u, 8)).map(|_| call(u)));
    encode(&Input { calls })
}

fn mutate(bytes: &[u8], m: &mut Mutator<'_>) -> Vec<u8> {
    let mut input: Input = decode(bytes);
    let fresh = m.fresh(512);
    let mut u = Unstructured::new(&fresh);
    let n = input.calls.len();
    match m.rng.below(8) {
        0..=2 if n > 0 => {
            // The message's bytes: what the decoder is fuzzed with.
            let i = m.rng.below(n);
            let mut body = std::mem::take(&mut input.calls[i].body);
            m.bytes(&mut body);
            input.calls[i].body = body;
        }
        3 => input.calls.insert(m.rng.below(n + 1), call(&mut u)),
        4 if n > 0 => {
            input.calls.remove(m.rng.below(n));
        }
        5 if n > 0 => {
            let i = m.rng.below(n);
            let method = input.calls[i].method;
            input.calls[i].body = body(&mut u, method);
        }
        6 if n > 0 => {
            let i = m.rng.below(n);
            let mut ns = input.calls[i].namespace.take().unwrap_or_default();
            m.string(&mut ns);
            input.calls[i].namespace = Some(ns);
        }
        _ => {
            let mut raw = bytes.to_vec();
            m.bytes(&mut raw);
            return raw;
        }
    }
    encode(&input)
}

fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let with = |mut calls: Vec<Call>| {
        let mut all = prelude();
        all.append(&mut calls);
        Input { calls: all }
    };
    let stat = |key: &str| {
        plain(
            Method::Stat,
            spb::StatSnapshotRequest { snapshotter: "native".into(), key: key.into() }
                .encode_to_vec(),
        )
    };
    let lease = |id: &str| {
        plain(
            Method::LeaseCreate,
            lpb::CreateRequest { id: id.into(), labels: HashMap::new() }.encode_to_vec(),
        )
    };
    let inputs: Vec<(&'static str, Input)> = vec![
        ("prelude", with(vec![])),
        (
            "lifecycle",
            with(vec![
                stat("b"),
                plain(
                    Method::Mounts,
                    spb::MountsRequest { snapshotter: "native".into(), key: "c".into() }
                        .encode_to_vec(),
                ),
                plain(
                    Method::Usage,
                    spb::UsageRequest { snapshotter: "native".into(), key: "b".into() }
                        .encode_to_vec(),
                ),
                plain(
                    Method::List,
                    spb::ListSnapshotsRequest {
                        snapshotter: "native".into(),
                        filters: vec!["kind==committed".into(), "name==c".into()],
                    }
                    .encode_to_vec(),
                ),
                plain(
                    Method::Remove,
                    spb::RemoveSnapshotRequest { snapshotter: "native".into(), key: "b".into() }
                        .encode_to_vec(),
                ),
                plain(
                    Method::Remove,
                    spb::RemoveSnapshotRequest { snapshotter: "native".into(), key: "c".into() }
                        .encode_to_vec(),
                ),
                plain(
                    Method::Remove,
                    spb::RemoveSnapshotRequest { snapshotter: "native".into(), key: "b".into() }
                        .encode_to_vec(),
                ),
                plain(
                    Method::Cleanup,
                    spb::CleanupRequest { snapshotter: "native".into() }.encode_to_vec(),
                ),
            ]),
        ),
        (
            "update-labels",
            with(vec![plain(
                Method::Update,
                spb::UpdateSnapshotRequest {
                    snapshotter: "native".into(),
                    info: Some(spb::Info {
                        name: "b".into(),
                        labels: [("a".to_owned(), "1".to_owned())].into(),
                        created_at: Some(prost_types::Timestamp { seconds: i64::MIN, nanos: -1 }),
                        ..Default::default()
                    }),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["labels.a".into(), "kind".into()],
                    }),
                }
                .encode_to_vec(),
            )]),
        ),
        (
            "leases",
            with(vec![
                lease("l1"),
                lease("l1"),
                plain(
                    Method::LeaseAddResource,
                    lpb::AddResourceRequest {
                        id: "l1".into(),
                        resource: Some(lpb::Resource {
                            id: "b".into(),
                            r#type: "snapshots/native".into(),
                        }),
                    }
                    .encode_to_vec(),
                ),
                plain(
                    Method::LeaseList,
                    lpb::ListRequest { filters: vec!["id==l1".into()] }.encode_to_vec(),
                ),
                plain(
                    Method::LeaseListResources,
                    lpb::ListResourcesRequest { id: "l1".into() }.encode_to_vec(),
                ),
                plain(
                    Method::LeaseDelete,
                    lpb::DeleteRequest { id: "l1".into(), sync: true }.encode_to_vec(),
                ),
            ]),
        ),
        (
            "unnamespaced",
            Input {
                calls: vec![
                    Call {
                        method: Method::Prepare,
                        namespace: None,
                        lease: None,
                        body: spb::PrepareSnapshotRequest {
                            snapshotter: "native".into(),
                            key: "default/1/x".into(),
                            ..Default::default()
                        }
                        .encode_to_vec(),
                    },
                    Call {
                        method: Method::Stat,
                        namespace: None,
                        lease: None,
                        body: spb::StatSnapshotRequest {
                            snapshotter: "native".into(),
                            key: "base".into(),
                        }
                        .encode_to_vec(),
                    },
                    Call {
                        method: Method::List,
                        namespace: None,
                        lease: None,
                        body: spb::ListSnapshotsRequest::default().encode_to_vec(),
                    },
                ],
            },
        ),
        (
            "admin",
            with(vec![
                plain(Method::Status, Vec::new()),
                plain(
                    Method::Info,
                    apb::InfoRequest { snapshotter: "nope".into() }.encode_to_vec(),
                ),
                plain(
                    Method::Du,
                    apb::DuRequest { snapshotter: "native".into(), filters: vec![], verbose: true }
                        .encode_to_vec(),
                ),
                plain(Method::Check, Vec::new()),
                plain(
                    Method::Collect,
                    apb::CollectRequest { dry_run: true, ..Default::default() }.encode_to_vec(),
                ),
                plain(
                    Method::Prune,
                    apb::PruneRequest {
                        snapshotter: "native".into(),
                        all: true,
                        ..Default::default()
                    }
                    .encode_to_vec(),
                ),
                plain(Method::ContentList, Vec::new()),
                plain(
                    Method::ContentInfo,
                    apb::ContentInfoRequest { digest: "sha256:../../x".into() }.encode_to_vec(),
                ),
            ]),
        ),
        (
            "bad-headers",
            Input {
                calls: vec![
                    Call {
                        method: Method::Stat,
                        namespace: Some("bad ns".into()),
                        lease: Some("\u{7f}".into()),
                        body: stat("a").body,
                    },
                    Call {
                        method: Method::LeaseList,
                        namespace: Some(String::new()),
                        lease: None,
                        body: Vec::new(),
                    },
                ],
            },
        ),
        (
            "undecodable",
            Input {
                calls: vec![
                    plain(Method::Prepare, vec![0xff, 0xff, 0xff]),
                    plain(Method::Update, vec![0x12, 0x80]),
                    plain(Method::ContentIngest, vec![0x0a, 0x02, 0x0a]),
                    plain(Method::ImageImport, vec![0x12, 0x03, b'/', b'e', b't']),
                ],
            },
        ),
        ("long-key", with(vec![stat(&"k".repeat(70_000))])),
    ];
    inputs.into_iter().map(|(n, i)| (n, encode(&i))).collect()
}
