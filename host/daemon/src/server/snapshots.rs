//! `containerd.services.snapshots.v1.Snapshots` over the host's metadata layer.

use std::sync::Arc;

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use wasnap::{Error, Labels};

use super::{Run, Scope, Shared, containerd_namespace, handle_for, snapshotter};
use crate::convert;
use crate::proto::snapshots::snapshots_server::Snapshots;
use crate::proto::snapshots::*;

/// Snapshots in one List batch.
const BATCH: usize = 100;

/// The snapshots service.
#[derive(Debug, Clone)]
pub struct SnapshotsService {
    shared: Arc<Shared>,
}

impl SnapshotsService {
    /// The service over `shared`'s host.
    pub fn new(shared: Arc<Shared>) -> Self {
        SnapshotsService { shared }
    }
}

fn labels(map: std::collections::HashMap<String, String>) -> Labels {
    map.into_iter().collect()
}

fn parent(p: &str) -> Option<&str> {
    (!p.is_empty()).then_some(p)
}

type Reply<T> = std::result::Result<Response<T>, Status>;

/// A request that names the snapshotter it is for.
trait ForSnapshotter {
    fn snapshotter(&self) -> &str;
}

macro_rules! for_snapshotter {
    ($($request:ty),* $(,)?) => {$(
        impl ForSnapshotter for $request {
            fn snapshotter(&self) -> &str {
                &self.snapshotter
            }
        }
    )*};
}

for_snapshotter!(
    PrepareSnapshotRequest,
    ViewSnapshotRequest,
    MountsRequest,
    CommitSnapshotRequest,
    RemoveSnapshotRequest,
    StatSnapshotRequest,
    UpdateSnapshotRequest,
    UsageRequest,
    CleanupRequest,
);

/// What a call's work does, which bounds how long it may take (see [`handle`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Work {
    /// Reads or writes records only, on any driver: Stat, Update, Mounts, and Remove
    /// (the record goes now, the data in the background).
    Records,
    /// Makes a snapshot's directory: from a spare or one `mkdir` on overlay and btrfs
    /// (a subvolume snapshot), but a copy of the parent's data on native, if it has a
    /// parent.
    Create {
        /// The request names a parent.
        parent: bool,
    },
    /// Walks a layer or the store, so its time grows with the data: Commit (measures the
    /// layer and syncs it), Usage, Cleanup.
    Walk,
}

/// [`super::handle`], with the snapshotter the request names in the call's metrics.
///
/// A call may run in place as it is ([`Run::HereIfAlone`]) only if its work takes a
/// bounded time: while it runs, its worker serves nothing else, and tokio does not hand
/// that worker's share of the runtime (its I/O driver among it) to another worker, so
/// another connection's call may wait for it to end. So [`Work::Walk`], and a
/// [`Work::Create`] that copies a parent, run in place only once the worker has handed
/// its share over ([`Run::HandOverIfAlone`]). So does a plugin's every call: wasmtime's
/// WASI drives a guest's I/O with `block_on` on the current runtime, which panics on an
/// async worker that still holds its share.
async fn handle<Q: ForSnapshotter + Send + 'static, T: Send + 'static>(
    shared: &Arc<Shared>,
    method: &'static str,
    work: Work,
    req: Request<Q>,
    f: impl FnOnce(&wasnap::Host, Scope, Q) -> wasnap::Result<T> + Send + 'static,
) -> Reply<T> {
    let name = req.get_ref().snapshotter();
    let label = shared.snapshotter_label(name);
    let host = shared.host();
    let name = if name.is_empty() { host.default_snapshotter() } else { name };
    let bounded = match work {
        Work::Records => true,
        Work::Create { parent } => !parent || host.copies_on_create(name) == Some(false),
        Work::Walk => false,
    };
    let run = match host.runs_plugins(name) {
        Some(false) if bounded => Run::HereIfAlone,
        Some(_) => Run::HandOverIfAlone,
        // No such snapshotter: the call fails at once, wherever it runs.
        None => Run::Pool,
    };
    handle_for(shared, method, label, run, req, f).await
}

#[tonic::async_trait]
impl Snapshots for SnapshotsService {
    async fn prepare(
        &self,
        req: Request<PrepareSnapshotRequest>,
    ) -> Reply<PrepareSnapshotResponse> {
        let work = Work::Create { parent: !req.get_ref().parent.is_empty() };
        handle(&self.shared, "Prepare", work, req, |host, scope, r| {
            let ctx = scope.for_key(&r.key)?;
            let sn = snapshotter(host, &r.snapshotter)?;
            let mounts = sn.prepare(&ctx, &r.key, parent(&r.parent), &labels(r.labels))?;
            Ok(PrepareSnapshotResponse { mounts: mounts.into_iter().map(convert::mount).collect() })
        })
        .await
    }

    async fn view(&self, req: Request<ViewSnapshotRequest>) -> Reply<ViewSnapshotResponse> {
        let work = Work::Create { parent: !req.get_ref().parent.is_empty() };
        handle(&self.shared, "View", work, req, |host, scope, r| {
            let ctx = scope.for_key(&r.key)?;
            let sn = snapshotter(host, &r.snapshotter)?;
            let mounts = sn.view(&ctx, &r.key, parent(&r.parent), &labels(r.labels))?;
            Ok(ViewSnapshotResponse { mounts: mounts.into_iter().map(convert::mount).collect() })
        })
        .await
    }

    async fn mounts(&self, req: Request<MountsRequest>) -> Reply<MountsResponse> {
        handle(&self.shared, "Mounts", Work::Records, req, |host, scope, r| {
            let ctx = scope.for_key(&r.key)?;
            let mounts = snapshotter(host, &r.snapshotter)?.mounts(&ctx, &r.key)?;
            Ok(MountsResponse { mounts: mounts.into_iter().map(convert::mount).collect() })
        })
        .await
    }

    async fn commit(&self, req: Request<CommitSnapshotRequest>) -> Reply<()> {
        handle(&self.shared, "Commit", Work::Walk, req, |host, scope, r| {
            let ctx = scope.for_key(&r.key)?;
            // containerd 2's unpacker may ask a snapshotter with the `rebase` capability
            // to commit a layer onto another parent: refused, never dropped.
            let parent = (!r.parent.is_empty()).then_some(r.parent.as_str());
            snapshotter(host, &r.snapshotter)?.commit_onto(
                &ctx,
                &r.name,
                &r.key,
                parent,
                &labels(r.labels),
            )
        })
        .await
    }

    async fn remove(&self, req: Request<RemoveSnapshotRequest>) -> Reply<()> {
        handle(&self.shared, "Remove", Work::Records, req, |host, scope, r| {
            let ctx = scope.for_key(&r.key)?;
            // The record goes now; the data in the background, after the removals
            // before it (containerd's metadata layer leaves it to its collector).
            snapshotter(host, &r.snapshotter)?.remove_later(&ctx, &r.key)
        })
        .await
    }

    async fn stat(&self, req: Request<StatSnapshotRequest>) -> Reply<StatSnapshotResponse> {
        handle(&self.shared, "Stat", Work::Records, req, |host, scope, r| {
            let ctx = scope.for_key(&r.key)?;
            let info = snapshotter(host, &r.snapshotter)?.stat(&ctx, &r.key)?;
            Ok(StatSnapshotResponse { info: Some(convert::info(info)) })
        })
        .await
    }

    async fn update(&self, req: Request<UpdateSnapshotRequest>) -> Reply<UpdateSnapshotResponse> {
        handle(&self.shared, "Update", Work::Records, req, |host, scope, r| {
            let info = r
                .info
                .map(convert::info_from)
                .ok_or_else(|| Error::invalid_argument("update: no info given"))?;
            let ctx = scope.for_key(&info.name)?;
            let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
            let info = snapshotter(host, &r.snapshotter)?.update(&ctx, &info, &paths)?;
            Ok(UpdateSnapshotResponse { info: Some(convert::info(info)) })
        })
        .await
    }

    type ListStream = ReceiverStream<std::result::Result<ListSnapshotsResponse, Status>>;

    async fn list(&self, req: Request<ListSnapshotsRequest>) -> Reply<Self::ListStream> {
        // The walk runs on the blocking pool and sends batches as it goes, so a large
        // namespace is never held in memory whole, and a client that goes away ends it.
        // A failure (a bad filter, say) ends the stream with its status.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let (shared, meta, scope) = (self.shared.clone(), req.metadata().clone(), Scope::of(&req));
        let r = req.into_inner();
        let (host, label) = (shared.host().clone(), shared.snapshotter_label(&r.snapshotter));
        let failed = tx.clone();
        // A client that stops reading holds the thread no longer than this.
        let idle = shared.stream_idle();
        tokio::spawn(async move {
            let walk = move || -> wasnap::Result<()> {
                let scope = scope?;
                let sn = snapshotter(&host, &r.snapshotter)?;
                let mut batch = Vec::with_capacity(BATCH);
                let runtime = tokio::runtime::Handle::current();
                let send = |batch: &mut Vec<Info>| -> wasnap::Result<()> {
                    let info = std::mem::take(batch);
                    let batch = Ok(ListSnapshotsResponse { info });
                    let sent = async { tokio::time::timeout(idle, tx.send(batch)).await };
                    match runtime.block_on(sent) {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(_)) => Err(Error::unavailable("list: the client went away")),
                        Err(_) => Err(Error::unavailable(format!(
                            "list: the client took no batch for {idle:?}"
                        ))),
                    }
                };
                let mut push = |info: wasnap::Info| {
                    batch.push(convert::info(info));
                    if batch.len() == BATCH { send(&mut batch) } else { Ok(()) }
                };
                match &scope {
                    Scope::Namespace(ctx) => sn.walk(ctx, &r.filters, &mut push)?,
                    Scope::Unnamespaced { .. } => sn.walk_all(&r.filters, &mut |ns, info| {
                        // Only what containerd made in that namespace (see the module docs).
                        if containerd_namespace(&info.name) == Some(ns) {
                            push(info)
                        } else {
                            Ok(())
                        }
                    })?,
                }
                if !batch.is_empty() {
                    send(&mut batch)?;
                }
                Ok(())
            };
            if let Err(status) = shared.call("List", label, &meta, Run::Pool, walk).await {
                let _ = failed.send(Err(status)).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn usage(&self, req: Request<UsageRequest>) -> Reply<UsageResponse> {
        handle(&self.shared, "Usage", Work::Walk, req, |host, scope, r| {
            let ctx = scope.for_key(&r.key)?;
            Ok(convert::usage(snapshotter(host, &r.snapshotter)?.usage(&ctx, &r.key)?))
        })
        .await
    }

    async fn cleanup(&self, req: Request<CleanupRequest>) -> Reply<()> {
        handle(&self.shared, "Cleanup", Work::Walk, req, |host, _scope, r| {
            let report = snapshotter(host, &r.snapshotter)?.cleanup()?;
            if let Some((key, why)) = report.failed.first() {
                return Err(Error::internal(format!(
                    "cleanup removed {} and failed on {} (first: {key}: {why})",
                    report.removed.len(),
                    report.failed.len()
                )));
            }
            // containerd calls Cleanup after each of its collections (about once per
            // removal when it runs us as its proxy): only one that removed something
            // is worth an operator's line.
            match report.removed.len() {
                0 => tracing::debug!(removed = 0, "cleanup"),
                n => tracing::info!(removed = n, "cleanup"),
            }
            Ok(())
        })
        .await
    }
}
