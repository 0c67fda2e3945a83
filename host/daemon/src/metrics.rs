//! The Prometheus endpoint (`[metrics] address`): what the daemon counts, and the HTTP
//! server that hands it out.
//!
//! Calls are counted as they end (from `server::Shared::call`), collections by an
//! observer on the host's collector. Plugin pools and counters, and the snapshots per
//! namespace, are read when scraped, by a [`Collector`] over the host. `GET /metrics`
//! answers in the OpenMetrics text format when the scraper asks for it (Prometheus
//! does), else in the Prometheus text format 0.0.4. README.md, "Metrics", lists every
//! name.
//!
//! Label values come from what this daemon serves, never straight from a request: a
//! call naming a snapshotter the daemon does not serve is counted under
//! `snapshotter="-"`, so a client cannot make series without bound.

use std::collections::{BTreeMap, HashMap};
use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabel, EncodeLabelSet, EncodeLabelValue, EncodeMetric,
    LabelSetEncoder, LabelValueEncoder,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use tokio::sync::oneshot;
use wasnap::gc::Collected;
use wasnap::plugin::CountersSnapshot;
use wasnap::{Error, Host, Result};

/// Bounds of the call latency buckets (seconds): 50 µs to 10 s, 1-2.5-5 per decade.
const CALL_BUCKETS: [f64; 17] = [
    50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

/// Bounds of the collection duration buckets (seconds): 1 ms to 5 min. Mark and sweep
/// are bounded by `[gc] max_pause_ms`; pruning a slow backend can take much longer.
const GC_BUCKETS: [f64; 12] = [1e-3, 5e-3, 25e-3, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

/// The `snapshotter` label of a call naming one this daemon does not serve (no
/// snapshotter name can start with `-`).
const UNKNOWN_SNAPSHOTTER: &str = "-";

/// What the daemon counts, and the registry that encodes it with what the host reports
/// at scrape time.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    calls: Family<CallLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    durations: Family<CallLabels, Histogram, fn() -> Histogram>,
    /// The `snapshotter` label values, one allocation each, shared by every series.
    names: HashMap<String, Arc<str>>,
    default: Arc<str>,
    unknown: Arc<str>,
}

impl Metrics {
    /// Metrics for the daemon over `host`: registers the families, observes the host's
    /// collections (failed-precondition if something else already does) and reads its
    /// plugins and snapshot counts at each scrape.
    pub fn new(host: &Arc<Host>) -> Result<Arc<Metrics>> {
        let mut registry = Registry::default();
        let calls = Family::<CallLabels, Counter>::default();
        registry.register(
            "wasnap_operations",
            "Calls that ended, by service, operation and snapshotter",
            calls.clone(),
        );
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "wasnap_operation_errors",
            "Calls that failed, by gRPC status code",
            errors.clone(),
        );
        let durations: Family<CallLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(CALL_BUCKETS));
        registry.register_with_unit(
            "wasnap_operation_duration",
            "How long calls took, from arrival to reply",
            Unit::Seconds,
            durations.clone(),
        );
        let gc = GcMetrics::register(&mut registry);
        host.observe_collections(move |c| gc.observe(c))?;
        registry.register_collector(Box::new(HostCollector { host: Arc::downgrade(host) }));

        let names: HashMap<String, Arc<str>> =
            host.snapshotter_names().map(|n| (n.to_owned(), Arc::from(n))).collect();
        let default = host.default_snapshotter();
        let default = names.get(default).cloned().unwrap_or_else(|| Arc::from(default));
        Ok(Arc::new(Metrics {
            registry,
            calls,
            errors,
            durations,
            names,
            default,
            unknown: Arc::from(UNKNOWN_SNAPSHOTTER),
        }))
    }

    /// The `snapshotter` label of a call whose request names `name` (empty: the
    /// default snapshotter). Allocates nothing.
    pub fn snapshotter_label(&self, name: &str) -> Arc<str> {
        if name.is_empty() {
            return self.default.clone();
        }
        self.names.get(name).unwrap_or(&self.unknown).clone()
    }

    /// Counts one call of `method` (a gRPC method as the services name it: `Prepare`,
    /// `Leases.Create`, `Admin.Collect`) that took `elapsed`, for `snapshotter` (from
    /// [`Self::snapshotter_label`]; `None` if the call names none), and that failed
    /// with `failed` if it did.
    pub fn record_call(
        &self,
        method: &'static str,
        snapshotter: Option<Arc<str>>,
        elapsed: Duration,
        failed: Option<tonic::Code>,
    ) {
        let call = CallLabels { method, snapshotter };
        self.durations.get_or_create(&call).observe(elapsed.as_secs_f64());
        self.calls.get_or_create(&call).inc();
        if let Some(code) = failed {
            self.errors.get_or_create(&ErrorLabels { call, code }).inc();
        }
    }

    /// Everything, in `format`. Reads the metadata database and the plugins: blocking.
    pub fn encode(&self, format: Format) -> Result<String> {
        let mut out = String::new();
        match format {
            Format::OpenMetrics => {
                prometheus_client::encoding::text::encode(&mut out, &self.registry)
            }
            Format::Prometheus => {
                prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            }
        }
        .map_err(|_| Error::internal("encode the metrics"))?;
        Ok(out)
    }
}

/// The exposition formats a scrape can get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics text 1.0.0 (what Prometheus asks for first).
    OpenMetrics,
    /// The Prometheus text format 0.0.4 (for anything that does not ask).
    Prometheus,
}

impl Format {
    /// The format an `Accept` header asks for: OpenMetrics if it names it, else the
    /// Prometheus text format.
    pub fn accepted(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    /// Its `Content-Type`.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        }
    }
}

/// A running endpoint: serves until dropped.
#[derive(Debug)]
pub struct Endpoint {
    address: SocketAddr,
    _stop: oneshot::Sender<()>,
}

impl Endpoint {
    /// Where it listens (with the port taken, if asked for port 0).
    pub fn address(&self) -> SocketAddr {
        self.address
    }
}

/// The endpoint's listener, bound, with its address (the port taken, if asked for 0).
#[derive(Debug)]
pub struct Bound {
    listener: tokio::net::TcpListener,
    address: SocketAddr,
}

/// Takes `address` for the endpoint. An address that cannot be used is an error naming
/// it: unavailable if it is taken, else invalid-argument.
pub async fn bind(address: SocketAddr) -> Result<Bound> {
    let bind = |e: std::io::Error| {
        let msg = format!("metrics address {address}: {e}");
        match e.kind() {
            std::io::ErrorKind::AddrInUse => Error::unavailable(msg),
            _ => Error::invalid_argument(msg),
        }
    };
    let listener = tokio::net::TcpListener::bind(address).await.map_err(bind)?;
    let address = listener.local_addr().map_err(bind)?;
    Ok(Bound { listener, address })
}

/// Serves `GET /metrics` from `metrics` on `listener` (from [`bind`]), on a task of its
/// own, until the returned [`Endpoint`] is dropped (scrapes in flight finish).
pub fn serve(bound: Bound, metrics: Arc<Metrics>) -> Endpoint {
    let Bound { listener, address: bound } = bound;
    let app = axum::Router::new().route("/metrics", axum::routing::get(scrape)).with_state(metrics);
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let stopped = async move {
            let _ = stopped.await;
        };
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stopped).await {
            tracing::warn!(address = %bound, error = %e, "the metrics endpoint stopped");
        }
    });
    tracing::info!(address = %bound, "serving metrics at /metrics");
    Endpoint { address: bound, _stop: stop }
}

async fn scrape(State(metrics): State<Arc<Metrics>>, headers: HeaderMap) -> Response {
    let format = Format::accepted(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    // A scrape reads the metadata database and takes the plugins' pool locks.
    let body = tokio::task::spawn_blocking(move || metrics.encode(format))
        .await
        .unwrap_or_else(|e| Err(Error::internal(format!("encode the metrics: {e}"))));
    match body {
        Ok(body) => ([(header::CONTENT_TYPE, format.content_type())], body).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "metrics scrape failed");
            (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
        }
    }
}

/// A call's labels: `service` and `op` from its method, and its snapshotter. Built on
/// every call, so they hold nothing that allocates; the names are spelt at scrape time.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CallLabels {
    method: &'static str,
    snapshotter: Option<Arc<str>>,
}

impl EncodeLabelSet for CallLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> fmt::Result {
        // The snapshots service's methods have no prefix; the others' do.
        let (service, op) = self.method.split_once('.').unwrap_or(("Snapshots", self.method));
        ("service", Snake(service)).encode(encoder.encode_label())?;
        ("op", Snake(op)).encode(encoder.encode_label())?;
        ("snapshotter", self.snapshotter.as_deref().unwrap_or("")).encode(encoder.encode_label())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ErrorLabels {
    call: CallLabels,
    code: tonic::Code,
}

impl EncodeLabelSet for ErrorLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> fmt::Result {
        self.call.encode(encoder)?;
        ("code", CodeName(self.code)).encode(encoder.encode_label())
    }
}

/// A CamelCase name in snake case: `AddResource` is `add_resource`.
struct Snake(&'static str);

impl EncodeLabelValue for Snake {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> fmt::Result {
        for (i, c) in self.0.char_indices() {
            if c.is_ascii_uppercase() && i > 0 {
                encoder.write_char('_')?;
            }
            encoder.write_char(c.to_ascii_lowercase())?;
        }
        Ok(())
    }
}

/// A gRPC status code as gRPC names it (`NotFound`), as containerd's logs print it.
struct CodeName(tonic::Code);

impl EncodeLabelValue for CodeName {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> fmt::Result {
        // The derived Debug of the fieldless enum is the variant's name.
        write!(encoder, "{:?}", self.0)
    }
}

/// Collections, as the host's collector reports them. Dry runs change nothing and are
/// not counted here (they are calls like any other: `op="collect"`).
#[derive(Debug, Clone)]
struct GcMetrics {
    runs: Family<[(&'static str, &'static str); 1], Counter>,
    duration: Histogram,
    removed: Counter,
    pruned: Counter,
    expired: Counter,
}

impl GcMetrics {
    fn register(registry: &mut Registry) -> GcMetrics {
        let gc = GcMetrics {
            runs: Family::default(),
            duration: Histogram::new(GC_BUCKETS),
            removed: Counter::default(),
            pruned: Counter::default(),
            expired: Counter::default(),
        };
        // Every result from the start, so that rates and alerts see a zero, not nothing.
        for result in ["ok", "incomplete", "failed"] {
            drop(gc.runs.get_or_create(&[("result", result)]));
        }
        registry.register(
            "wasnap_gc_runs",
            "Garbage collections, by result: ok, incomplete (something could not be pruned; retried next time) or failed",
            gc.runs.clone(),
        );
        registry.register_with_unit(
            "wasnap_gc_duration",
            "How long garbage collections took, mark to prune",
            Unit::Seconds,
            gc.duration.clone(),
        );
        registry.register(
            "wasnap_gc_removed_snapshots",
            "Snapshot records garbage collection removed",
            gc.removed.clone(),
        );
        registry.register(
            "wasnap_gc_pruned_snapshots",
            "Backend snapshots garbage collection pruned (no record named them)",
            gc.pruned.clone(),
        );
        registry.register(
            "wasnap_gc_expired_leases",
            "Expired leases garbage collection removed",
            gc.expired.clone(),
        );
        gc
    }

    fn observe(&self, c: &Collected<'_>) {
        if c.dry_run {
            return;
        }
        let result = match c.result {
            Ok(r) if r.failed.is_empty() => "ok",
            Ok(_) => "incomplete",
            Err(_) => "failed",
        };
        self.runs.get_or_create(&[("result", result)]).inc();
        self.duration.observe(c.elapsed.as_secs_f64());
        if let Ok(r) = c.result {
            self.removed.inc_by(r.removed.len() as u64);
            self.pruned.inc_by(r.pruned.len() as u64);
            self.expired.inc_by(r.expired_leases.len() as u64);
        }
    }
}

/// What the host reports at scrape time: its plugins and its snapshot counts. Holds
/// the host weakly: a scrape after the daemon closed it reports neither.
#[derive(Debug)]
struct HostCollector {
    host: Weak<Host>,
}

impl Collector for HostCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let Some(host) = self.host.upgrade() else { return Ok(()) };
        encode_plugins(&plugin_rows(&host), &mut encoder)?;
        let db = host.db().db().stats();
        let counters: [(&str, &str, u64); 3] = [
            ("wasnap_database_commits", "Write transactions of the root database.", db.commits),
            (
                "wasnap_database_durable_commits",
                "Of the root database's write transactions, those synced to disk.",
                db.durable_commits,
            ),
            (
                "wasnap_database_operations",
                "Operations the root database's write transactions carried (group commit \
                 makes these more than its commits).",
                db.operations,
            ),
        ];
        for (name, help, value) in counters {
            let none: [(&str, &str); 0] = [];
            family(
                &mut encoder,
                name,
                help,
                None,
                MetricType::Counter,
                [(none, ConstCounter::new(value))],
            )?;
        }
        match host.db().record_counts() {
            Ok(counts) => family(
                &mut encoder,
                "wasnap_snapshots",
                "Snapshot records, by snapshotter and namespace.",
                None,
                MetricType::Gauge,
                counts.iter().map(|((snapshotter, namespace), n)| {
                    let labels = [("snapshotter", snapshotter.as_str()), ("namespace", namespace)];
                    (labels, ConstGauge::new(i64::try_from(*n).unwrap_or(i64::MAX)))
                }),
            ),
            // The rest of the scrape still helps: say why this part is missing.
            Err(e) => {
                tracing::warn!(error = %e, "metrics: cannot count the snapshots");
                Ok(())
            }
        }
    }
}

/// A plugin's labels: its snapshotter, its role, and its file's stem.
type PluginKey = (String, String, String);

/// One plugin's figures, as one series per metric.
#[derive(Debug, Default)]
struct PluginRow {
    sha256: String,
    busy: i64,
    idle: i64,
    limit: i64,
    counters: CountersSnapshot,
}

/// The host's plugins now. Keyed by the labels: a file loaded twice in one place (two
/// policies, say) is one series. Its pools add up; its counters are the plugin's own,
/// shared by every place that loaded it, so they are taken once.
fn plugin_rows(host: &Host) -> BTreeMap<PluginKey, PluginRow> {
    let mut rows = BTreeMap::<PluginKey, PluginRow>::new();
    for p in host.loaded_plugins() {
        let name =
            p.config.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let plugin = p.wasm.plugin();
        let pool = p.wasm.pool();
        let row =
            rows.entry((p.snapshotter, p.role.to_string(), name)).or_insert_with(|| PluginRow {
                sha256: plugin.info().digest.clone(),
                busy: 0,
                idle: 0,
                limit: 0,
                counters: plugin.counters().snapshot(),
            });
        row.busy += i64::from(pool.busy);
        row.idle += i64::from(pool.idle);
        row.limit += i64::from(pool.limit);
    }
    rows
}

fn encode_plugins(
    rows: &BTreeMap<PluginKey, PluginRow>,
    encoder: &mut DescriptorEncoder<'_>,
) -> fmt::Result {
    fn labels((s, r, p): &PluginKey) -> [(&'static str, &str); 3] {
        [("snapshotter", s.as_str()), ("role", r.as_str()), ("plugin", p.as_str())]
    }
    let mut info = encoder.encode_descriptor(
        "wasnap_plugin",
        "A loaded plugin: where it serves, and the sha256 of the version serving.",
        None,
        MetricType::Info,
    )?;
    for (key, row) in rows {
        let [s, r, p] = labels(key);
        info.encode_info(&[s, r, p, ("sha256", row.sha256.as_str())])?;
    }
    family(
        encoder,
        "wasnap_plugin_instances",
        "Plugin instances now, by state: busy (in a call, or starting) or idle.",
        None,
        MetricType::Gauge,
        rows.iter().flat_map(|(key, row)| {
            let [s, r, p] = labels(key);
            [
                ([s, r, p, ("state", "busy")], ConstGauge::new(row.busy)),
                ([s, r, p, ("state", "idle")], ConstGauge::new(row.idle)),
            ]
        }),
    )?;
    family(
        encoder,
        "wasnap_plugin_instance_limit",
        "The most instances a plugin may have (its limits.instances).",
        None,
        MetricType::Gauge,
        rows.iter().map(|(key, row)| (labels(key), ConstGauge::new(row.limit))),
    )?;
    // Counters of the version serving: a reload starts them again from zero, which
    // Prometheus takes as a counter reset.
    type Count = fn(&CountersSnapshot) -> u64;
    let counters: [(&str, &str, Count); 5] = [
        ("wasnap_plugin_calls", "Calls into the plugin.", |r| r.calls),
        ("wasnap_plugin_call_errors", "Plugin calls that returned an error.", |r| r.errors),
        (
            "wasnap_plugin_traps",
            "Plugin calls that trapped (panic, memory limit, bad output) or timed out.",
            |r| r.traps,
        ),
        ("wasnap_plugin_timeouts", "Plugin calls that ran past their deadline.", |r| r.timeouts),
        (
            "wasnap_plugin_instances_created",
            "Plugin instances created (the first, and one for each replaced after a trap).",
            |r| r.instances,
        ),
    ];
    for (name, help, value) in counters {
        family(
            encoder,
            name,
            help,
            None,
            MetricType::Counter,
            rows.iter().map(|(key, row)| (labels(key), ConstCounter::new(value(&row.counters)))),
        )?;
    }
    family(
        encoder,
        "wasnap_plugin_busy",
        "Time spent in plugin calls.",
        Some(&Unit::Seconds),
        MetricType::Counter,
        rows.iter().map(|(key, row)| {
            (labels(key), ConstCounter::new(row.counters.busy_micros as f64 / 1e6))
        }),
    )
}

/// Encodes one metric family from its series.
fn family<L: EncodeLabelSet, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    metric_type: MetricType,
    series: impl IntoIterator<Item = (L, M)>,
) -> fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, unit, metric_type)?;
    for (labels, value) in series {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels<L>(l: &L) -> String
    where
        L: EncodeLabelSet + Clone + std::hash::Hash + Eq + fmt::Debug + Send + Sync + 'static,
    {
        // Through a registry, as a scrape encodes them.
        let family = Family::<_, Counter>::default();
        family.get_or_create(l).inc();
        let mut registry = Registry::default();
        registry.register("t", "t", family);
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).unwrap();
        let line = out.lines().find(|l| l.starts_with("t_total{")).unwrap();
        line["t_total".len()..line.rfind(' ').unwrap()].to_owned()
    }

    #[test]
    fn methods_name_their_service_and_op() {
        let call = |method, snapshotter: Option<&str>| CallLabels {
            method,
            snapshotter: snapshotter.map(Arc::from),
        };
        assert_eq!(
            labels(&call("Prepare", Some("native"))),
            r#"{service="snapshots",op="prepare",snapshotter="native"}"#
        );
        assert_eq!(
            labels(&call("Leases.AddResource", None)),
            r#"{service="leases",op="add_resource",snapshotter=""}"#
        );
        assert_eq!(
            labels(&ErrorLabels { call: call("Admin.Collect", None), code: tonic::Code::NotFound }),
            r#"{service="admin",op="collect",snapshotter="",code="NotFound"}"#
        );
    }

    /// Plugin rows, encoded as a scrape does.
    #[derive(Debug)]
    struct Rows(BTreeMap<PluginKey, PluginRow>);

    impl Collector for Rows {
        fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
            encode_plugins(&self.0, &mut encoder)
        }
    }

    #[test]
    fn plugins_are_one_series_each_per_metric() {
        let key = |s: &str, r: &str, p: &str| (s.to_owned(), r.to_owned(), p.to_owned());
        let counters = CountersSnapshot {
            calls: 7,
            errors: 2,
            traps: 1,
            timeouts: 1,
            instances: 3,
            live: 1,
            busy_micros: 1_500_000,
        };
        let copy = PluginRow { sha256: "ab".repeat(32), busy: 1, idle: 2, limit: 4, counters };
        let policy = PluginRow { sha256: "cd".repeat(32), limit: 1, ..PluginRow::default() };
        let rows = Rows(BTreeMap::from([
            (key("copy", "backend", "copy"), copy),
            (key("copy", "policy", "label_policy"), policy),
        ]));
        let mut registry = Registry::default();
        registry.register_collector(Box::new(rows));
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry).unwrap();
        let scrape =
            prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
        let value = |metric: &str, labels: &[(&str, &str)]| -> f64 {
            let found: Vec<_> = scrape
                .samples
                .iter()
                .filter(|s| s.metric == metric)
                .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
                .collect();
            assert_eq!(found.len(), 1, "{metric} {labels:?} in\n{text}");
            match found[0].value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
                ref other => panic!("{metric}: {other:?}"),
            }
        };
        let backend = [("snapshotter", "copy"), ("role", "backend"), ("plugin", "copy")];
        let sha = "ab".repeat(32);
        assert_eq!(value("wasnap_plugin_info", &[backend[0], backend[2], ("sha256", &sha)]), 1.0);
        assert_eq!(value("wasnap_plugin_instances", &[backend[2], ("state", "busy")]), 1.0);
        assert_eq!(value("wasnap_plugin_instances", &[backend[2], ("state", "idle")]), 2.0);
        assert_eq!(value("wasnap_plugin_instance_limit", &backend), 4.0);
        assert_eq!(value("wasnap_plugin_calls_total", &backend), 7.0);
        assert_eq!(value("wasnap_plugin_call_errors_total", &backend), 2.0);
        assert_eq!(value("wasnap_plugin_traps_total", &backend), 1.0);
        assert_eq!(value("wasnap_plugin_timeouts_total", &backend), 1.0);
        assert_eq!(value("wasnap_plugin_instances_created_total", &backend), 3.0);
        assert_eq!(value("wasnap_plugin_busy_seconds_total", &backend), 1.5);
        assert_eq!(value("wasnap_plugin_instance_limit", &[("role", "policy")]), 1.0);
        assert_eq!(value("wasnap_plugin_calls_total", &[("plugin", "label_policy")]), 0.0);
    }

    #[test]
    fn formats_follow_the_accept_header() {
        let prometheus = "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4,*/*;q=0.1";
        assert_eq!(Format::accepted(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(Format::accepted(Some("*/*")), Format::Prometheus);
        assert_eq!(Format::accepted(None), Format::Prometheus);
        assert!(Format::OpenMetrics.content_type().starts_with("application/openmetrics-text"));
    }
}
