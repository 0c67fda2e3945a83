//! `wasnap.v1.Admin`: status, collections, checks and host info.

use std::sync::Arc;

use serde::Serialize;
use tonic::{Request, Response, Status};
use wasnap::Context;
use wasnap::root::{DriverConfig, SnapshotterState};

use super::{Shared, handle};
use crate::proto::admin::admin_server::Admin;
use crate::proto::admin::*;

/// The admin service.
#[derive(Debug, Clone)]
pub struct AdminService {
    shared: Arc<Shared>,
}

impl AdminService {
    /// The service over `shared`'s host.
    pub fn new(shared: Arc<Shared>) -> Self {
        AdminService { shared }
    }
}

type Reply<T> = std::result::Result<Response<T>, Status>;

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
                    let c = p.wasm.plugin().counters().snapshot();
                    let info = p.wasm.plugin().info();
                    Plugin {
                        snapshotter: p.snapshotter,
                        role: p.role.to_string(),
                        path: p.path.display().to_string(),
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
            })
        })
        .await
    }

    async fn collect(&self, req: Request<CollectRequest>) -> Reply<ReportResponse> {
        handle(&self.shared, "Admin.Collect", req, |host, _scope, r| {
            json(&host.collect(r.dry_run)?)
        })
        .await
    }

    async fn check(&self, req: Request<CheckRequest>) -> Reply<ReportResponse> {
        handle(&self.shared, "Admin.Check", req, |host, _scope, _r| json(&host.check()?)).await
    }

    async fn info(&self, req: Request<InfoRequest>) -> Reply<ReportResponse> {
        handle(&self.shared, "Admin.Info", req, |host, _scope, r| {
            let selected =
                if r.snapshotter.is_empty() { host.default_snapshotter() } else { &r.snapshotter };
            json(&host.info(selected))
        })
        .await
    }
}
