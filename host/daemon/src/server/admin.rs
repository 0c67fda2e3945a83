//! `wasnap.v1.Admin`: status, collections, checks and host info; the content store and
//! layers (in [`super::content`]).

use std::sync::Arc;

use serde::Serialize;
use tonic::{Request, Response, Status};
use wasnap::Host;
use wasnap::root::{Config, DriverConfig, ReloadReport, SnapshotterState};
use wasnap::{Context, Error};

use tonic::Streaming;

use super::{Run, Shared, content, handle, handle_for};
use crate::proto::admin::admin_server::Admin;
use crate::proto::admin::*;

/// The admin service.
#[derive(Debug, Clone)]
pub struct AdminService {
    shared: Arc<Shared>,
    reconfigure: Option<Reconfigure>,
}

impl AdminService {
    /// The service over `shared`'s host.
    pub fn new(shared: Arc<Shared>) -> Self {
        AdminService { shared, reconfigure: None }
    }

    /// Reloads read the configuration again with `f`.
    pub fn with_reconfigure(mut self, f: Option<Reconfigure>) -> Self {
        self.reconfigure = f;
        self
    }
}

/// How a reload reads the configuration again (the file the daemon started with, and
/// the command line's additions), when the daemon has one.
#[derive(Clone)]
pub struct Reconfigure(pub Arc<dyn Fn() -> wasnap::Result<Config> + Send + Sync>);

impl std::fmt::Debug for Reconfigure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reconfigure")
    }
}

/// Reloads the plugins of `names` (every snapshotter's if empty), with the configuration
/// read again if `reconfigure` is given. What SIGHUP and `Admin.Reload` do.
pub fn reload(
    host: &Host,
    names: &[String],
    reconfigure: Option<&Reconfigure>,
) -> wasnap::Result<Vec<ReloadReport>> {
    let config = match reconfigure {
        Some(f) => Some((f.0)().map_err(|e| e.context("read the configuration again"))?),
        None => None,
    };
    host.reload(names, config.as_ref())
}

fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

type Reply<T> = std::result::Result<Response<T>, Status>;

fn database_commits(s: wasnap::kv::CommitStats) -> DatabaseCommits {
    DatabaseCommits {
        commits: s.commits,
        durable_commits: s.durable_commits,
        operations: s.operations,
    }
}

fn json<T: Serialize>(v: &T) -> wasnap::Result<ReportResponse> {
    serde_json::to_string(v).map(|json| ReportResponse { json }).with_context(|| "encode report")
}

/// The name of a driver, as configured.
fn driver_name(d: &DriverConfig) -> &'static str {
    match d {
        DriverConfig::Native => "native",
        DriverConfig::Overlay(_) => "overlay",
        DriverConfig::Btrfs => "btrfs",
        DriverConfig::Wasm(_) => "wasm",
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn status(&self, req: Request<StatusRequest>) -> Reply<StatusResponse> {
        let shared = self.shared.clone();
        handle(&self.shared, "Admin.Status", req, move |host, _scope, _r| {
            let states = host.snapshotter_states();
            let snapshotters = host
                .configs()
                .iter()
                .map(|(name, c)| {
                    let (state, error, retry_in_secs) = match states.get(name) {
                        Some(SnapshotterState::Failed { error, retry_in_secs, .. }) => {
                            ("failed", error.clone(), *retry_in_secs)
                        }
                        Some(SnapshotterState::Open) => ("open", String::new(), 0),
                        Some(SnapshotterState::Opening) => ("opening", String::new(), 0),
                        _ => ("closed", String::new(), 0),
                    };
                    Snapshotter {
                        name: name.clone(),
                        driver: driver_name(&c.driver).into(),
                        open: state == "open",
                        policies: c.policies.len() as u32,
                        state: state.into(),
                        error,
                        retry_in_secs,
                    }
                })
                .collect();
            let plugins = host
                .loaded_plugins()
                .into_iter()
                .map(|p| {
                    let plugin = p.wasm.plugin();
                    let c = plugin.counters().snapshot();
                    let info = plugin.info();
                    let pool = p.wasm.pool();
                    let (reload_error, failed_at) = match &p.reload_error {
                        Some((e, at)) => (e.clone(), unix_ms(*at)),
                        None => (String::new(), 0),
                    };
                    Plugin {
                        id: p.id(),
                        loaded_at_unix_ms: unix_ms(p.loaded_at),
                        reloads: p.wasm.reloads(),
                        reload_error,
                        reload_failed_at_unix_ms: failed_at,
                        busy_instances: pool.busy,
                        instance_limit: pool.limit,
                        snapshotter: p.snapshotter,
                        role: p.role.to_string(),
                        path: p.config.path.display().to_string(),
                        calls: c.calls,
                        errors: c.errors,
                        traps: c.traps,
                        timeouts: c.timeouts,
                        instances: c.instances,
                        live_instances: c.live,
                        busy_micros: c.busy_micros,
                        size: info.size,
                        sha256: info.digest.clone(),
                    }
                })
                .collect();
            Ok(StatusResponse {
                version: env!("CARGO_PKG_VERSION").into(),
                pid: std::process::id().into(),
                uptime_ms: shared.uptime().as_millis() as u64,
                root: host.root().display().to_string(),
                socket: shared.socket.display().to_string(),
                default_snapshotter: host.default_snapshotter().into(),
                snapshotters,
                plugins,
                requests: shared.requests.load(std::sync::atomic::Ordering::Relaxed),
                failed_requests: shared.failed.load(std::sync::atomic::Ordering::Relaxed),
                busy_micros: shared.busy_micros.load(std::sync::atomic::Ordering::Relaxed),
                served_in_place: shared.served_in_place(),
                served_handing_over: shared.served_handing_over(),
                database: Some(database_commits(host.db().db().stats())),
            })
        })
        .await
    }

    async fn collect(&self, req: Request<CollectRequest>) -> Reply<ReportResponse> {
        handle(&self.shared, "Admin.Collect", req, |host, scope, r| {
            if r.delete_lease.is_empty() {
                return json(&host.collect(r.dry_run)?);
            }
            if r.dry_run {
                return Err(Error::invalid_argument(
                    "a collection after deleting a lease cannot be a dry run",
                ));
            }
            let report = host.delete_lease(&scope.required()?, &r.delete_lease, true)?;
            json(&report.ok_or_else(|| Error::internal("a sync lease delete gave no report"))?)
        })
        .await
    }

    async fn check(&self, req: Request<CheckRequest>) -> Reply<ReportResponse> {
        handle(&self.shared, "Admin.Check", req, |host, _scope, _r| json(&host.check()?)).await
    }

    async fn du(&self, req: Request<DuRequest>) -> Reply<ReportResponse> {
        let label = self.shared.snapshotter_label(&req.get_ref().snapshotter);
        handle_for(&self.shared, "Admin.Du", label, Run::Pool, req, |host, scope, r| {
            let sn = super::snapshotter(host, &r.snapshotter)?;
            json(&sn.du(&scope.required()?, &r.filters, r.verbose)?)
        })
        .await
    }

    async fn prune(&self, req: Request<PruneRequest>) -> Reply<ReportResponse> {
        let label = self.shared.snapshotter_label(&req.get_ref().snapshotter);
        handle_for(&self.shared, "Admin.Prune", label, Run::Pool, req, |host, scope, r| {
            let ctx = scope.required()?;
            let name =
                if r.snapshotter.is_empty() { host.default_snapshotter() } else { &r.snapshotter };
            super::snapshotter(host, name)?;
            let policy = wasnap::metadata::PrunePolicy {
                all: r.all,
                filters: r.filters,
                keep_duration: std::time::Duration::from_millis(r.keep_duration_ms),
                keep_storage: r.keep_storage,
                reserved_space: r.reserved_space,
                min_free_space: r.min_free_space,
            };
            let scope = wasnap::metadata::Scope::Namespace(ctx.namespace());
            json(&host.prune_cache(name, scope, &policy, r.dry_run, &mut |_| {})?)
        })
        .await
    }

    async fn reload(&self, req: Request<ReloadRequest>) -> Reply<ReportResponse> {
        let reconfigure = self.reconfigure.clone();
        handle(&self.shared, "Admin.Reload", req, move |host, _scope, r| {
            json(&reload(host, &r.snapshotters, reconfigure.as_ref())?)
        })
        .await
    }

    async fn info(&self, req: Request<InfoRequest>) -> Reply<ReportResponse> {
        handle(&self.shared, "Admin.Info", req, |host, _scope, r| {
            let selected =
                if r.snapshotter.is_empty() { host.default_snapshotter() } else { &r.snapshotter };
            json(&host.info(selected))
        })
        .await
    }

    async fn content_ingest(
        &self,
        req: Request<Streaming<ContentIngestRequest>>,
    ) -> Reply<ReportResponse> {
        content::ingest(&self.shared, req).await
    }

    type ContentReadStream = content::ReadStream;

    async fn content_read(
        &self,
        req: Request<ContentReadRequest>,
    ) -> Reply<Self::ContentReadStream> {
        content::read(&self.shared, req).await
    }

    async fn content_list(&self, req: Request<ContentListRequest>) -> Reply<ReportResponse> {
        handle(&self.shared, "Admin.ContentList", req, content::list).await
    }

    async fn content_info(&self, req: Request<ContentInfoRequest>) -> Reply<ContentInfoResponse> {
        handle(&self.shared, "Admin.ContentInfo", req, content::info).await
    }

    async fn content_delete(
        &self,
        req: Request<ContentDeleteRequest>,
    ) -> Reply<ContentDeleteResponse> {
        handle(&self.shared, "Admin.ContentDelete", req, content::delete).await
    }

    async fn layer_apply(
        &self,
        req: Request<Streaming<LayerApplyRequest>>,
    ) -> Reply<ReportResponse> {
        content::apply(&self.shared, req).await
    }

    async fn layer_diff(&self, req: Request<LayerDiffRequest>) -> Reply<ReportResponse> {
        let label = self.shared.snapshotter_label(&req.get_ref().snapshotter);
        handle_for(&self.shared, "Admin.LayerDiff", label, Run::Pool, req, content::diff).await
    }

    async fn layer_register(&self, req: Request<LayerRegisterRequest>) -> Reply<ReportResponse> {
        let label = self.shared.snapshotter_label(&req.get_ref().snapshotter);
        handle_for(&self.shared, "Admin.LayerRegister", label, Run::Pool, req, content::register)
            .await
    }

    async fn merge(&self, req: Request<MergeRequest>) -> Reply<ReportResponse> {
        let label = self.shared.snapshotter_label(&req.get_ref().snapshotter);
        handle_for(&self.shared, "Admin.Merge", label, Run::Pool, req, content::merge).await
    }

    async fn diff_snapshot(&self, req: Request<DiffSnapshotRequest>) -> Reply<ReportResponse> {
        let label = self.shared.snapshotter_label(&req.get_ref().snapshotter);
        handle_for(
            &self.shared,
            "Admin.DiffSnapshot",
            label,
            Run::Pool,
            req,
            content::diff_snapshot,
        )
        .await
    }

    async fn image_import(&self, req: Request<ImageImportRequest>) -> Reply<ReportResponse> {
        let label = self.shared.snapshotter_label(&req.get_ref().snapshotter);
        handle_for(&self.shared, "Admin.ImageImport", label, Run::Pool, req, content::import).await
    }
}
