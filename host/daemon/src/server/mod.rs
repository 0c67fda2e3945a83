//! The services, over one open [`Host`].
//!
//! **Where a call's work runs.** The metadata layer, the drivers and the plugin runtime
//! are synchronous, so a call's work runs on tokio's blocking pool (`spawn_blocking`),
//! unless it arrives while no other call is being served (on a runtime of two workers
//! or more). Then it runs on the async worker that received it:
//! - as it is ([`Run::HereIfAlone`]), if it goes to a snapshotter no plugin serves and
//!   its work takes a bounded time (records only, or a snapshot made without copying a
//!   parent; see `snapshots::Work`); long work such a call meets all the same (overlay
//!   flattening the bottom of a deep chain at its first mount) hands the worker's share
//!   over first, as below ([`wasnap::long_work`]);
//! - else after the worker hands its share of the runtime to another thread
//!   (`block_in_place`, [`Run::HandOverIfAlone`]): a walk of the data (Commit, Usage,
//!   Cleanup, a native Prepare that copies its parent) and every call a plugin serves.
//!   wasmtime's WASI blocks on the runtime for a guest's I/O, which an async worker
//!   must not, but a worker that has handed its share over may.
//!
//! The hand-off to the pool costs two thread wake-ups a call (to the pool and back): on
//! a 2-core machine, a third of the daemon's time for a serial cycle of five calls (1.4–1.9 ms
//! with it, 1.0–1.1 ms without, overlay on tmpfs). Only where it cannot hold other
//! calls up for long: the runtime has two workers or more, and a call runs in place
//! only when it is the only call in flight. Even so, while it runs its worker serves
//! nothing else, and tokio does not hand that worker's share of the runtime (the I/O
//! driver, if the worker held it last) to another worker, so a call from another
//! connection may wait for it to end. Hence bounded work only: a `Usage` of 200,201
//! inodes run in place held a `Stat` from another connection until it ended in 10–16
//! of 30 runs. `block_in_place`, which does hand the worker over, cost a sixth of the
//! rate at 1 client where it replaced running in place, but beats the pool where it
//! replaces that (the eighth session, ARCHITECTURE.md: on tmpfs at 1 client, the copy
//! guest 5% faster, and overlay's time a cycle in the daemon 7% less, its commit
//! handed over instead of pooled). A call decides at once, without yielding first to
//! count the calls already readable on other connections: tokio's `yield_now` made the
//! worker hand work to the other worker, ~3 futex wakes a call (`perf`), for 7% more
//! daemon CPU a serial cycle and no gain at 8 clients; a call readable but not yet read
//! is read by the other worker meanwhile, if it is awake, or else once this one ends.
//!
//! **Namespaces.** A call's namespace comes from the `containerd-namespace` header.
//! containerd's collector walks and removes with no namespace: such a call sees
//! exactly the snapshots whose key has the shape containerd gives its keys,
//! `<namespace>/<number>/…`, in that namespace, and a call naming a key of that shape
//! acts in the namespace the key names. Snapshotter made by other clients (the wasnap
//! CLI, say, with keys like `base`) are never visible to an unnamespaced call, so
//! containerd's collector cannot remove what it did not create.
//!
//! **Leases.** `wasnap-lease` names a wasnap lease for the call. containerd's own
//! `containerd-lease` header names containerd's leases, which wasnap does not keep; it
//! is ignored, and what containerd creates is held until containerd removes it.

mod admin;
mod content;
mod leases;
mod snapshots;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};
use tracing::Instrument;
use wasnap::Host;
use wasnap::{Ctx, Error, Result, Snapshotter};

pub use admin::{AdminService, Reconfigure, reload};
pub use content::CHUNK;
pub use leases::LeasesService;
pub use snapshots::SnapshotsService;

use crate::client::{LEASE_HEADER, NAMESPACE_HEADER, REQUEST_ID_HEADER};
use crate::metrics::Metrics;

/// What the services share: the host, counters for `status`, and the metrics if the
/// daemon serves them.
#[derive(Debug)]
pub struct Shared {
    host: Arc<Host>,
    started: Instant,
    socket: PathBuf,
    next_id: AtomicU64,
    requests: AtomicU64,
    failed: AtomicU64,
    /// Microseconds spent serving calls, summed over calls (see [`Shared::call`]).
    busy_micros: AtomicU64,
    /// Calls being served now (see [`Run::HereIfAlone`]).
    in_flight: AtomicUsize,
    /// Of the calls served, those whose work ran on the worker that received them.
    in_place: AtomicU64,
    /// Of the calls served, those whose work ran on the worker that received them once
    /// it had handed its share of the runtime over ([`Run::HandOverIfAlone`]).
    handed_over: AtomicU64,
    metrics: OnceLock<Arc<Metrics>>,
    /// How long a stream may stand still (milliseconds; see
    /// `DaemonOptions::stream_idle_secs`).
    stream_idle_ms: AtomicU64,
}

impl Shared {
    /// State for services over `host`, serving on `socket`.
    pub fn new(host: Arc<Host>, socket: PathBuf) -> Arc<Shared> {
        Arc::new(Shared {
            host,
            started: Instant::now(),
            socket,
            next_id: AtomicU64::new(1),
            requests: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            busy_micros: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            in_place: AtomicU64::new(0),
            handed_over: AtomicU64::new(0),
            metrics: OnceLock::new(),
            stream_idle_ms: AtomicU64::new(60_000),
        })
    }

    /// How long an upload may send nothing, and a List's client take no batch, before
    /// the call fails (60 s unless set).
    pub fn set_stream_idle(&self, idle: Duration) {
        let ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX).max(1);
        self.stream_idle_ms.store(ms, Ordering::Relaxed);
    }

    pub(crate) fn stream_idle(&self) -> Duration {
        Duration::from_millis(self.stream_idle_ms.load(Ordering::Relaxed))
    }

    /// Counts every call in `metrics` from now on. Once: later metrics are ignored
    /// (false).
    pub fn set_metrics(&self, metrics: Arc<Metrics>) -> bool {
        self.metrics.set(metrics).is_ok()
    }

    /// The `snapshotter` label of a call whose request names `name`, if metrics are
    /// kept (see [`Metrics::snapshotter_label`]).
    pub(crate) fn snapshotter_label(&self, name: &str) -> Option<Arc<str>> {
        self.metrics.get().map(|m| m.snapshotter_label(name))
    }

    /// The host.
    pub fn host(&self) -> &Arc<Host> {
        &self.host
    }

    /// How long since the services started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Of the calls served so far, how many ran their work on the worker that received
    /// them ([`Run::HereIfAlone`]).
    pub fn served_in_place(&self) -> u64 {
        self.in_place.load(Ordering::Relaxed)
    }

    /// Of the calls served so far, how many ran their work on the worker that received
    /// them once it had handed its share of the runtime over ([`Run::HandOverIfAlone`]).
    pub fn served_handing_over(&self) -> u64 {
        self.handed_over.load(Ordering::Relaxed)
    }

    /// Whether the call asking (already counted in flight) may run its work in place:
    /// it is the only call in flight, and the runtime has another worker to serve
    /// whatever arrives meanwhile.
    fn alone(&self) -> bool {
        let handle = tokio::runtime::Handle::current();
        let spare_worker = handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
            && handle.metrics().num_workers() >= 2;
        spare_worker && self.in_flight.load(Ordering::SeqCst) == 1
    }

    /// Runs `f` where `run` says, inside a span for the call, counting and logging it
    /// (in the metrics under `snapshotter`, a label from [`Self::snapshotter_label`]);
    /// its error becomes the matching gRPC status.
    async fn call<T: Send + 'static>(
        self: &Arc<Self>,
        method: &'static str,
        snapshotter: Option<Arc<str>>,
        meta: &MetadataMap,
        run: Run,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> std::result::Result<T, Status> {
        let id = match meta.get(REQUEST_ID_HEADER).and_then(|v| v.to_str().ok()) {
            Some(id) => id.chars().take(64).collect::<String>(),
            None => format!("w{}", self.next_id.fetch_add(1, Ordering::Relaxed)),
        };
        let ns = meta.get(NAMESPACE_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("-");
        // A span per call only at debug level (`WASNAP_LOG=debug`): at the default level
        // it would cost every call its formatting. A failure names the call itself.
        let span = tracing::debug_span!("rpc", id = %id, method, ns = %ns);
        self.requests.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let _flight = InFlight::enter(&self.in_flight);
        let inner = span.clone();
        let result = match run {
            Run::HereIfAlone if self.alone() => {
                self.in_place.fetch_add(1, Ordering::Relaxed);
                // Long work the call meets after all (overlay flattening a deep chain)
                // hands the worker's share over first.
                wasnap::long_work::handing_over(hand_over, || here(method, &inner, f))
            }
            Run::HandOverIfAlone if self.alone() => {
                self.handed_over.fetch_add(1, Ordering::Relaxed);
                tokio::task::block_in_place(|| here(method, &inner, f))
            }
            _ => tokio::task::spawn_blocking(move || inner.in_scope(f))
                .instrument(span.clone())
                .await
                .unwrap_or_else(|e| Err(Error::internal(format!("{method} panicked: {e}")))),
        };
        let _entered = span.enter();
        let elapsed = started.elapsed();
        self.busy_micros.fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
        let metrics = self.metrics.get();
        match result {
            Ok(v) => {
                if let Some(m) = metrics {
                    m.record_call(method, snapshotter, elapsed, None);
                }
                tracing::debug!(?elapsed, "ok");
                Ok(v)
            }
            Err(e) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                match e.kind() {
                    wasnap::ErrorKind::Internal | wasnap::ErrorKind::Unavailable => {
                        tracing::warn!(id = %id, method, ns = %ns, ?elapsed, error = %e, "failed")
                    }
                    _ => tracing::debug!(?elapsed, error = %e, "refused"),
                }
                let status = crate::convert::status(&e);
                if let Some(m) = metrics {
                    m.record_call(method, snapshotter, elapsed, Some(status.code()));
                }
                Err(status)
            }
        }
    }
}

/// How a call running in place hands the worker's share of the runtime over before
/// long work it meets ([`wasnap::long_work`]).
fn hand_over(work: &mut dyn FnMut()) {
    tokio::task::block_in_place(work)
}

/// Runs a call's work `f` on this thread, in its `span`; as the pool's join would, a
/// panic is the call's internal error.
fn here<T>(method: &str, span: &tracing::Span, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| span.in_scope(f)))
        .unwrap_or_else(|_| Err(Error::internal(format!("{method} panicked"))))
}

/// Where a call's work runs (see the [module documentation](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Run {
    /// On the blocking pool: the work may wait on the runtime (an upload read with
    /// `block_on`, a list's batches sent with `block_on`), which a worker must not.
    Pool,
    /// On the worker that received the call, if no other call is in flight and the
    /// runtime has another worker; on the pool otherwise. For bounded work only: the
    /// worker serves nothing else meanwhile.
    HereIfAlone,
    /// As [`Run::HereIfAlone`], but the worker first hands its share of the runtime
    /// (its queue, the I/O driver if it holds it) to another thread, which serves the
    /// other connections meanwhile (`block_in_place`): for work that may take long or
    /// block on the runtime.
    HandOverIfAlone,
}

/// A call counted in flight until it is answered or dropped.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        InFlight(count)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Who a call is for: a namespace from its header, or none (containerd's collector).
#[derive(Debug, Clone)]
pub(crate) enum Scope {
    Namespace(Ctx),
    Unnamespaced { lease: Option<String> },
}

impl Scope {
    pub(crate) fn of<T>(req: &Request<T>) -> Result<Scope> {
        let meta = req.metadata();
        let header = |name: &str| -> Result<Option<String>> {
            match meta.get(name) {
                None => Ok(None),
                Some(v) => v.to_str().map(|s| Some(s.to_owned())).map_err(|_| {
                    Error::invalid_argument(format!("header {name}: not printable ASCII"))
                }),
            }
        };
        let lease = header(LEASE_HEADER)?.filter(|l| !l.is_empty());
        match header(NAMESPACE_HEADER)?.filter(|n| !n.is_empty()) {
            Some(ns) => Ok(Scope::Namespace(Ctx::new(&ns)?.with_lease(lease))),
            None => Ok(Scope::Unnamespaced { lease }),
        }
    }

    /// The context for a call about `key`.
    pub(crate) fn for_key(&self, key: &str) -> Result<Ctx> {
        match self {
            Scope::Namespace(ctx) => Ok(ctx.clone()),
            Scope::Unnamespaced { lease } => match containerd_namespace(key) {
                Some(ns) => Ok(Ctx::new(ns)?.with_lease(lease.clone())),
                None => Err(namespace_required(&format!(
                    "key {key:?} does not start with <namespace>/<number>/ as containerd's keys do"
                ))),
            },
        }
    }

    /// The context for a call that names no key.
    pub(crate) fn required(&self) -> Result<Ctx> {
        match self {
            Scope::Namespace(ctx) => Ok(ctx.clone()),
            Scope::Unnamespaced { .. } => Err(namespace_required("this call needs one")),
        }
    }
}

fn namespace_required(why: &str) -> Error {
    Error::failed_precondition(format!(
        "namespace is required: no {NAMESPACE_HEADER} header, and {why}"
    ))
}

pub(crate) use wasnap::metadata::containerd_namespace;

/// The snapshotter a request names; empty means the configured default.
pub(crate) fn snapshotter(host: &Host, name: &str) -> Result<Arc<Snapshotter>> {
    let name = if name.is_empty() { host.default_snapshotter() } else { name };
    if !host.is_configured(name) {
        let known: Vec<&str> = host.snapshotter_names().collect();
        return Err(Error::invalid_argument(format!(
            "snapshotter not loaded: {name} (this daemon serves: {})",
            known.join(", ")
        )));
    }
    host.snapshotter(name)
}

/// Runs a request's work: `f` gets the scope and the message, on the blocking pool.
pub(crate) async fn handle<Q: Send + 'static, T: Send + 'static>(
    shared: &Arc<Shared>,
    method: &'static str,
    req: Request<Q>,
    f: impl FnOnce(&Host, Scope, Q) -> Result<T> + Send + 'static,
) -> std::result::Result<Response<T>, Status> {
    handle_for(shared, method, None, Run::Pool, req, f).await
}

/// [`handle`] for a call about one snapshotter, run where `run` says: `snapshotter` is
/// its label in the metrics ([`Shared::snapshotter_label`]).
pub(crate) async fn handle_for<Q: Send + 'static, T: Send + 'static>(
    shared: &Arc<Shared>,
    method: &'static str,
    snapshotter: Option<Arc<str>>,
    run: Run,
    req: Request<Q>,
    f: impl FnOnce(&Host, Scope, Q) -> Result<T> + Send + 'static,
) -> std::result::Result<Response<T>, Status> {
    let meta = req.metadata().clone();
    let scope = Scope::of(&req);
    let msg = req.into_inner();
    let host = shared.host.clone();
    let work = move || f(&host, scope?, msg);
    shared.call(method, snapshotter, &meta, run, work).await.map(Response::new)
}
