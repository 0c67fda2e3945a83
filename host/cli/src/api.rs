//! What the commands ask of wasnap, whether it runs in this process (embedded: the
//! CLI opens the root itself) or in a daemon (`--address`): each command's logic is
//! written once, against [`Api`].

use std::cell::OnceCell;
use std::collections::HashMap;
use std::io::{BufReader, Read, Write};
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

use wasnap::Context;
use wasnap::Snapshotter;
use wasnap::content::{BlobInfo, Expected};
use wasnap::digest::Digest;
use wasnap::error::{Error, Result};
use wasnap::gc::GcReport;
use wasnap::layer::Compression;
use wasnap::layer::merge::Merged;
use wasnap::layer::snapshot::{AppliedSummary, Diffed, Registered};
use wasnap::metadata::{CachePruneReport, DiskUsage, PrunePolicy, PruneProgress, Scope};
use wasnap::metadata::{Ctx, Lease, PruneReport, Resource};
use wasnap::root::{CheckReport, Host, HostInfo};
use wasnap::snapshot::{Info, Labels, Mount, Usage};
use wasnap_daemon::client::{Blocking, Headers};
use wasnap_daemon::convert;
use wasnap_daemon::proto::{admin as apb, leases as lpb, snapshots as spb};

/// The operations behind the CLI's commands, for one namespace, snapshotter and lease.
pub trait Api {
    /// The name of the snapshotter the commands act on (lease resources name it).
    fn snapshotter(&self) -> Result<String>;
    /// The lease in effect (`--lease`), if any.
    fn lease(&self) -> Option<&str>;
    /// The same operations with `lease` in effect instead.
    fn with_lease(&self, lease: &str) -> Box<dyn Api + '_>;
    fn prepare(&self, key: &str, parent: Option<&str>, labels: &Labels) -> Result<Vec<Mount>>;
    fn view(&self, key: &str, parent: Option<&str>, labels: &Labels) -> Result<Vec<Mount>>;
    fn commit(&self, name: &str, key: &str, labels: &Labels) -> Result<()>;
    fn remove(&self, key: &str) -> Result<()>;
    fn stat(&self, key: &str) -> Result<Info>;
    fn update(&self, info: &Info, paths: &[String]) -> Result<Info>;
    fn list(&self, filters: &[String]) -> Result<Vec<Info>>;
    fn usage(&self, key: &str) -> Result<Usage>;
    fn mounts(&self, key: &str) -> Result<Vec<Mount>>;
    /// What a cleanup removed; `None` when the daemon did it (the API does not say).
    fn cleanup(&self) -> Result<Option<PruneReport>>;
    fn lease_create(&self, id: Option<&str>, labels: &Labels) -> Result<Lease>;
    fn lease_list(&self, filters: &[String]) -> Result<Vec<Lease>>;
    /// Deletes a lease; with `sync`, collects and returns what the collection did.
    fn lease_delete(&self, id: &str, sync: bool) -> Result<Option<GcReport>>;
    fn lease_add(&self, id: &str, resource: &Resource) -> Result<()>;
    fn lease_remove(&self, id: &str, resource: &Resource) -> Result<()>;
    fn lease_resources(&self, id: &str) -> Result<Vec<Resource>>;
    fn collect(&self, dry_run: bool) -> Result<GcReport>;
    fn check(&self) -> Result<Vec<CheckReport>>;
    /// The namespace's snapshots as a build cache (`du`): sizes, use, in use, shared,
    /// reclaimable; with `verbose`, active snapshots and views are measured too.
    fn du(&self, filters: &[String], verbose: bool) -> Result<DiskUsage>;
    /// Prunes the namespace's snapshots by `policy`; `progress` hears how it goes where
    /// the prune runs in this process.
    fn prune(
        &self,
        policy: &PrunePolicy,
        dry_run: bool,
        progress: &mut dyn FnMut(PruneProgress<'_>),
    ) -> Result<CachePruneReport>;
    fn info(&self) -> Result<HostInfo>;

    // The content store (the namespace's blobs) and layers (on the snapshotter).

    /// Stores `input` as a blob, refused unless it is `expected`.
    fn content_ingest(
        &self,
        input: &mut (dyn Read + Send),
        expected: Option<Expected>,
        labels: &Labels,
    ) -> Result<BlobInfo>;
    /// Writes blob `digest` to `out`.
    fn content_read(&self, digest: &Digest, out: &mut dyn Write) -> Result<()>;
    fn content_list(&self, filters: &[String]) -> Result<Vec<BlobInfo>>;
    /// A blob and the snapshots (snapshotter, key) mapped to it.
    fn content_info(&self, digest: &Digest) -> Result<(BlobInfo, Vec<(String, String)>)>;
    fn content_delete(&self, digest: &Digest) -> Result<()>;
    /// Applies a layer into the active snapshot `key` (compression detected if none).
    fn layer_apply(
        &self,
        key: &str,
        input: &mut (dyn Read + Send),
        compression: Option<Compression>,
    ) -> Result<AppliedSummary>;
    /// Stores the difference between `key` and its parent as a layer blob.
    fn layer_diff(&self, key: &str, compression: Compression, labels: &Labels) -> Result<Diffed>;
    /// Makes layer blob `blob` a committed snapshot named by its chain ID on `parent`.
    fn layer_register(
        &self,
        blob: &Digest,
        diff_id: Option<&Digest>,
        parent: Option<&Digest>,
        labels: &Labels,
    ) -> Result<Registered>;
    /// Merges committed snapshots as `name` (or finds the snapshot that is this merge).
    fn merge(&self, name: &str, inputs: &[String], labels: &Labels) -> Result<Merged>;
    /// Makes `name`, what changes `lower` (none: nothing) into `upper`.
    fn diff_snapshot(
        &self,
        name: &str,
        lower: Option<&str>,
        upper: &str,
        labels: &Labels,
    ) -> Result<Merged>;
    /// Imports the image at `path` (an OCI layout, or a tar of one or of `docker save`);
    /// `progress` hears what happens where the import runs in this process.
    fn image_import(
        &self,
        path: &Path,
        platform: Option<&str>,
        progress: &mut dyn FnMut(wasnap::image::Event<'_>),
    ) -> Result<wasnap::image::Imported>;
}

/// How much of a layer is read at a time when applying it in this process.
const LAYER_BUFFER: usize = 1 << 20;

/// Embedded: the root opened in this process.
pub struct Local<'h> {
    host: &'h Host,
    name: String,
    ctx: Ctx,
}

impl<'h> Local<'h> {
    /// `snapshotter` of `host`, for `ctx`.
    pub fn new(host: &'h Host, snapshotter: &str, ctx: Ctx) -> Self {
        Local { host, name: snapshotter.to_owned(), ctx }
    }

    fn sn(&self) -> Result<Arc<Snapshotter>> {
        self.host.snapshotter(&self.name)
    }
}

impl Api for Local<'_> {
    fn snapshotter(&self) -> Result<String> {
        Ok(self.name.clone())
    }
    fn lease(&self) -> Option<&str> {
        self.ctx.lease()
    }
    fn with_lease(&self, lease: &str) -> Box<dyn Api + '_> {
        let ctx = self.ctx.clone().with_lease(Some(lease.to_owned()));
        Box::new(Local { host: self.host, name: self.name.clone(), ctx })
    }
    fn prepare(&self, key: &str, parent: Option<&str>, labels: &Labels) -> Result<Vec<Mount>> {
        self.sn()?.prepare(&self.ctx, key, parent, labels)
    }
    fn view(&self, key: &str, parent: Option<&str>, labels: &Labels) -> Result<Vec<Mount>> {
        self.sn()?.view(&self.ctx, key, parent, labels)
    }
    fn commit(&self, name: &str, key: &str, labels: &Labels) -> Result<()> {
        self.sn()?.commit(&self.ctx, name, key, labels)
    }
    fn remove(&self, key: &str) -> Result<()> {
        self.sn()?.remove(&self.ctx, key)
    }
    fn stat(&self, key: &str) -> Result<Info> {
        self.sn()?.stat(&self.ctx, key)
    }
    fn update(&self, info: &Info, paths: &[String]) -> Result<Info> {
        self.sn()?.update(&self.ctx, info, paths)
    }
    fn list(&self, filters: &[String]) -> Result<Vec<Info>> {
        let mut infos = Vec::new();
        self.sn()?.walk(&self.ctx, filters, &mut |i| {
            infos.push(i);
            Ok(())
        })?;
        Ok(infos)
    }
    fn usage(&self, key: &str) -> Result<Usage> {
        self.sn()?.usage(&self.ctx, key)
    }
    fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        self.sn()?.mounts(&self.ctx, key)
    }
    fn cleanup(&self) -> Result<Option<PruneReport>> {
        self.sn()?.cleanup().map(Some)
    }
    fn lease_create(&self, id: Option<&str>, labels: &Labels) -> Result<Lease> {
        self.host.leases().create(&self.ctx, id, labels)
    }
    fn lease_list(&self, filters: &[String]) -> Result<Vec<Lease>> {
        self.host.leases().list(&self.ctx, filters)
    }
    fn lease_delete(&self, id: &str, sync: bool) -> Result<Option<GcReport>> {
        self.host.delete_lease(&self.ctx, id, sync)
    }
    fn lease_add(&self, id: &str, resource: &Resource) -> Result<()> {
        self.host.leases().add_resource(&self.ctx, id, resource)
    }
    fn lease_remove(&self, id: &str, resource: &Resource) -> Result<()> {
        self.host.leases().delete_resource(&self.ctx, id, resource)
    }
    fn lease_resources(&self, id: &str) -> Result<Vec<Resource>> {
        self.host.leases().resources(&self.ctx, id)
    }
    fn collect(&self, dry_run: bool) -> Result<GcReport> {
        self.host.collect(dry_run)
    }
    fn check(&self) -> Result<Vec<CheckReport>> {
        self.host.check()
    }
    fn du(&self, filters: &[String], verbose: bool) -> Result<DiskUsage> {
        self.sn()?.du(&self.ctx, filters, verbose)
    }
    fn prune(
        &self,
        policy: &PrunePolicy,
        dry_run: bool,
        progress: &mut dyn FnMut(PruneProgress<'_>),
    ) -> Result<CachePruneReport> {
        let scope = Scope::Namespace(self.ctx.namespace());
        self.host.prune_cache(&self.name, scope, policy, dry_run, progress)
    }
    fn info(&self) -> Result<HostInfo> {
        Ok(self.host.info(&self.name))
    }
    fn content_ingest(
        &self,
        input: &mut (dyn Read + Send),
        expected: Option<Expected>,
        labels: &Labels,
    ) -> Result<BlobInfo> {
        self.host.content().ingest(&self.ctx, input, expected, labels)
    }
    fn content_read(&self, digest: &Digest, out: &mut dyn Write) -> Result<()> {
        let (_, mut blob) = self.host.content().read(&self.ctx, digest)?;
        std::io::copy(&mut blob, out).context("write the blob")?;
        Ok(())
    }
    fn content_list(&self, filters: &[String]) -> Result<Vec<BlobInfo>> {
        self.host.content().list(&self.ctx, filters)
    }
    fn content_info(&self, digest: &Digest) -> Result<(BlobInfo, Vec<(String, String)>)> {
        let content = self.host.content();
        Ok((content.info(&self.ctx, digest)?, content.mapped_snapshots(&self.ctx, digest)?))
    }
    fn content_delete(&self, digest: &Digest) -> Result<()> {
        self.host.content().delete(&self.ctx, digest)
    }
    fn layer_apply(
        &self,
        key: &str,
        input: &mut (dyn Read + Send),
        compression: Option<Compression>,
    ) -> Result<AppliedSummary> {
        let sn = self.sn()?;
        let input = BufReader::with_capacity(LAYER_BUFFER, input);
        let applied = self.host.layers(&sn).apply(&self.ctx, key, input, compression)?;
        Ok(AppliedSummary::from(&applied))
    }
    fn layer_diff(&self, key: &str, compression: Compression, labels: &Labels) -> Result<Diffed> {
        let sn = self.sn()?;
        self.host.layers(&sn).diff(&self.ctx, key, compression, labels)
    }
    fn layer_register(
        &self,
        blob: &Digest,
        diff_id: Option<&Digest>,
        parent: Option<&Digest>,
        labels: &Labels,
    ) -> Result<Registered> {
        let sn = self.sn()?;
        self.host.layers(&sn).register(&self.ctx, blob, diff_id, parent, labels)
    }
    fn merge(&self, name: &str, inputs: &[String], labels: &Labels) -> Result<Merged> {
        let sn = self.sn()?;
        self.host.layers(&sn).merge(&self.ctx, name, inputs, labels)
    }
    fn diff_snapshot(
        &self,
        name: &str,
        lower: Option<&str>,
        upper: &str,
        labels: &Labels,
    ) -> Result<Merged> {
        let sn = self.sn()?;
        self.host.layers(&sn).diff_snapshot(&self.ctx, name, lower, upper, labels)
    }
    fn image_import(
        &self,
        path: &Path,
        platform: Option<&str>,
        progress: &mut dyn FnMut(wasnap::image::Event<'_>),
    ) -> Result<wasnap::image::Imported> {
        self.host.import_image(&self.ctx, &self.name, path, platform, progress)
    }
}

/// Through a daemon, over its socket.
pub struct Remote {
    /// Shared with the same API under another lease ([`Api::with_lease`]).
    client: Rc<Blocking>,
    /// The request's `snapshotter` field: `-s` as given, or empty for the daemon's
    /// default.
    name: String,
    /// The daemon's default, asked for (Admin.Status) only when a command needs the
    /// name itself and `-s` was not given.
    default: OnceCell<String>,
    namespace: String,
    lease: Option<String>,
}

fn report<T: serde::de::DeserializeOwned>(r: apb::ReportResponse) -> Result<T> {
    serde_json::from_str(&r.json).with_context(|| "decode the daemon's report")
}

impl Remote {
    /// Connects to the daemon at `socket`; `snapshotter` none means the daemon's default.
    pub fn connect(
        socket: &Path,
        snapshotter: Option<&str>,
        namespace: &str,
        lease: Option<String>,
    ) -> Result<Remote> {
        Ctx::new(namespace)?;
        // A lease goes in a header, which holds visible ASCII only: refused here rather
        // than left off, which would make the call's snapshots outside any lease.
        if let Some(l) = &lease
            && tonic::metadata::AsciiMetadataValue::try_from(l.as_str()).is_err()
        {
            return Err(Error::invalid_argument(format!(
                "lease {l:?}: cannot be sent in a request header (visible ASCII only)"
            )));
        }
        Ok(Remote {
            client: Rc::new(Blocking::connect(socket)?),
            name: snapshotter.unwrap_or_default().to_owned(),
            default: OnceCell::new(),
            namespace: namespace.to_owned(),
            lease,
        })
    }

    /// The daemon's status.
    pub fn status(socket: &Path) -> Result<apb::StatusResponse> {
        Blocking::connect(socket)?
            .call(|c| async move { c.admin().status(apb::StatusRequest {}).await })
    }

    fn req<T>(&self, msg: T) -> tonic::Request<T> {
        self.headers().request(msg)
    }

    fn headers(&self) -> Headers<'_> {
        Headers { namespace: Some(&self.namespace), lease: self.lease.as_deref() }
    }

    fn labels(labels: &Labels) -> HashMap<String, String> {
        labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

impl Api for Remote {
    fn lease(&self) -> Option<&str> {
        self.lease.as_deref()
    }
    fn with_lease(&self, lease: &str) -> Box<dyn Api + '_> {
        Box::new(Remote {
            client: self.client.clone(),
            name: self.name.clone(),
            default: self.default.clone(),
            namespace: self.namespace.clone(),
            lease: Some(lease.to_owned()),
        })
    }
    fn snapshotter(&self) -> Result<String> {
        if !self.name.is_empty() {
            return Ok(self.name.clone());
        }
        if let Some(name) = self.default.get() {
            return Ok(name.clone());
        }
        let status =
            self.client.call(|c| async move { c.admin().status(apb::StatusRequest {}).await })?;
        Ok(self.default.get_or_init(|| status.default_snapshotter).clone())
    }
    fn prepare(&self, key: &str, parent: Option<&str>, labels: &Labels) -> Result<Vec<Mount>> {
        let r = self.req(spb::PrepareSnapshotRequest {
            snapshotter: self.name.clone(),
            key: key.into(),
            parent: parent.unwrap_or_default().into(),
            labels: Self::labels(labels),
        });
        let resp = self.client.call(|c| async move { c.snapshots().prepare(r).await })?;
        Ok(resp.mounts.into_iter().map(convert::mount_from).collect())
    }
    fn view(&self, key: &str, parent: Option<&str>, labels: &Labels) -> Result<Vec<Mount>> {
        let r = self.req(spb::ViewSnapshotRequest {
            snapshotter: self.name.clone(),
            key: key.into(),
            parent: parent.unwrap_or_default().into(),
            labels: Self::labels(labels),
        });
        let resp = self.client.call(|c| async move { c.snapshots().view(r).await })?;
        Ok(resp.mounts.into_iter().map(convert::mount_from).collect())
    }
    fn commit(&self, name: &str, key: &str, labels: &Labels) -> Result<()> {
        let r = self.req(spb::CommitSnapshotRequest {
            snapshotter: self.name.clone(),
            name: name.into(),
            key: key.into(),
            labels: Self::labels(labels),
            parent: String::new(),
        });
        self.client.call(|c| async move { c.snapshots().commit(r).await })
    }
    fn remove(&self, key: &str) -> Result<()> {
        let r = self
            .req(spb::RemoveSnapshotRequest { snapshotter: self.name.clone(), key: key.into() });
        self.client.call(|c| async move { c.snapshots().remove(r).await })
    }
    fn stat(&self, key: &str) -> Result<Info> {
        let r =
            self.req(spb::StatSnapshotRequest { snapshotter: self.name.clone(), key: key.into() });
        let resp = self.client.call(|c| async move { c.snapshots().stat(r).await })?;
        resp.info.map(convert::info_from).ok_or_else(|| Error::internal("stat: no info"))
    }
    fn update(&self, info: &Info, paths: &[String]) -> Result<Info> {
        let r = self.req(spb::UpdateSnapshotRequest {
            snapshotter: self.name.clone(),
            info: Some(convert::info(info.clone())),
            update_mask: Some(prost_types::FieldMask { paths: paths.to_vec() }),
        });
        let resp = self.client.call(|c| async move { c.snapshots().update(r).await })?;
        resp.info.map(convert::info_from).ok_or_else(|| Error::internal("update: no info"))
    }
    fn list(&self, filters: &[String]) -> Result<Vec<Info>> {
        let r = self.req(spb::ListSnapshotsRequest {
            snapshotter: self.name.clone(),
            filters: filters.to_vec(),
        });
        let client = self.client.client().clone();
        self.client.block_on(async move {
            let mut stream =
                client.snapshots().list(r).await.map_err(|s| convert::error(&s))?.into_inner();
            let mut infos = Vec::new();
            while let Some(batch) = stream.message().await.map_err(|s| convert::error(&s))? {
                infos.extend(batch.info.into_iter().map(convert::info_from));
            }
            Ok(infos)
        })
    }
    fn usage(&self, key: &str) -> Result<Usage> {
        let r = self.req(spb::UsageRequest { snapshotter: self.name.clone(), key: key.into() });
        Ok(convert::usage_from(self.client.call(|c| async move { c.snapshots().usage(r).await })?))
    }
    fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let r = self.req(spb::MountsRequest { snapshotter: self.name.clone(), key: key.into() });
        let resp = self.client.call(|c| async move { c.snapshots().mounts(r).await })?;
        Ok(resp.mounts.into_iter().map(convert::mount_from).collect())
    }
    fn cleanup(&self) -> Result<Option<PruneReport>> {
        let r = self.req(spb::CleanupRequest { snapshotter: self.name.clone() });
        self.client.call(|c| async move { c.snapshots().cleanup(r).await }).map(|()| None)
    }
    fn lease_create(&self, id: Option<&str>, labels: &Labels) -> Result<Lease> {
        let r = self.req(lpb::CreateRequest {
            id: id.unwrap_or_default().into(),
            labels: Self::labels(labels),
        });
        let resp = self.client.call(|c| async move { c.leases().create(r).await })?;
        resp.lease.map(convert::lease_from).ok_or_else(|| Error::internal("create: no lease"))
    }
    fn lease_list(&self, filters: &[String]) -> Result<Vec<Lease>> {
        let r = self.req(lpb::ListRequest { filters: filters.to_vec() });
        let resp = self.client.call(|c| async move { c.leases().list(r).await })?;
        Ok(resp.leases.into_iter().map(convert::lease_from).collect())
    }
    fn lease_delete(&self, id: &str, sync: bool) -> Result<Option<GcReport>> {
        // The Leases API's sync answers with nothing: a sync delete is the admin
        // collection that deletes the lease first (one call, so the background
        // collector cannot take first what the report is to show).
        if sync {
            let r = self.req(apb::CollectRequest { dry_run: false, delete_lease: id.into() });
            let collected: GcReport =
                report(self.client.call(|c| async move { c.admin().collect(r).await })?)?;
            if collected.deleted_lease.as_deref() == Some(id) {
                return Ok(Some(collected));
            }
            // A daemon from before `delete_lease` collected without deleting: delete,
            // then collect, as it would have been asked.
        }
        let r = self.req(lpb::DeleteRequest { id: id.into(), sync: false });
        self.client.call(|c| async move { c.leases().delete(r).await })?;
        if sync { self.collect(false).map(Some) } else { Ok(None) }
    }
    fn lease_add(&self, id: &str, resource: &Resource) -> Result<()> {
        let r = self.req(lpb::AddResourceRequest {
            id: id.into(),
            resource: Some(convert::resource(resource.clone())),
        });
        self.client.call(|c| async move { c.leases().add_resource(r).await })
    }
    fn lease_remove(&self, id: &str, resource: &Resource) -> Result<()> {
        let r = self.req(lpb::DeleteResourceRequest {
            id: id.into(),
            resource: Some(convert::resource(resource.clone())),
        });
        self.client.call(|c| async move { c.leases().delete_resource(r).await })
    }
    fn lease_resources(&self, id: &str) -> Result<Vec<Resource>> {
        let r = self.req(lpb::ListResourcesRequest { id: id.into() });
        let resp = self.client.call(|c| async move { c.leases().list_resources(r).await })?;
        Ok(resp.resources.into_iter().map(convert::resource_from).collect())
    }
    fn collect(&self, dry_run: bool) -> Result<GcReport> {
        let r = self.req(apb::CollectRequest { dry_run, delete_lease: String::new() });
        report(self.client.call(|c| async move { c.admin().collect(r).await })?)
    }
    fn check(&self) -> Result<Vec<CheckReport>> {
        let r = self.req(apb::CheckRequest {});
        report(self.client.call(|c| async move { c.admin().check(r).await })?)
    }
    fn du(&self, filters: &[String], verbose: bool) -> Result<DiskUsage> {
        let r = self.req(apb::DuRequest {
            snapshotter: self.name.clone(),
            filters: filters.to_vec(),
            verbose,
        });
        report(self.client.call(|c| async move { c.admin().du(r).await })?)
    }
    fn prune(
        &self,
        policy: &PrunePolicy,
        dry_run: bool,
        _progress: &mut dyn FnMut(PruneProgress<'_>),
    ) -> Result<CachePruneReport> {
        let r = self.req(apb::PruneRequest {
            snapshotter: self.name.clone(),
            filters: policy.filters.clone(),
            all: policy.all,
            dry_run,
            keep_duration_ms: u64::try_from(policy.keep_duration.as_millis()).unwrap_or(u64::MAX),
            keep_storage: policy.keep_storage,
            reserved_space: policy.reserved_space,
            min_free_space: policy.min_free_space,
        });
        report(self.client.call(|c| async move { c.admin().prune(r).await })?)
    }
    fn info(&self) -> Result<HostInfo> {
        let r = self.req(apb::InfoRequest { snapshotter: self.name.clone() });
        report(self.client.call(|c| async move { c.admin().info(r).await })?)
    }
    fn content_ingest(
        &self,
        input: &mut (dyn Read + Send),
        expected: Option<Expected>,
        labels: &Labels,
    ) -> Result<BlobInfo> {
        let start = apb::ContentIngestStart {
            expected_digest: expected.map(|e| e.digest.to_string()).unwrap_or_default(),
            expected_size: expected.and_then(|e| e.size),
            labels: Self::labels(labels),
        };
        self.client.content_ingest(self.headers(), start, input)
    }
    fn content_read(&self, digest: &Digest, out: &mut dyn Write) -> Result<()> {
        self.client.content_read(self.headers(), digest, out).map(drop)
    }
    fn content_list(&self, filters: &[String]) -> Result<Vec<BlobInfo>> {
        self.client.content_list(self.headers(), filters)
    }
    fn content_info(&self, digest: &Digest) -> Result<(BlobInfo, Vec<(String, String)>)> {
        self.client.content_info(self.headers(), digest)
    }
    fn content_delete(&self, digest: &Digest) -> Result<()> {
        self.client.content_delete(self.headers(), digest)
    }
    fn layer_apply(
        &self,
        key: &str,
        input: &mut (dyn Read + Send),
        compression: Option<Compression>,
    ) -> Result<AppliedSummary> {
        let start = apb::LayerApplyStart {
            snapshotter: self.name.clone(),
            key: key.into(),
            compression: compression.map(|c| c.as_str().to_owned()).unwrap_or_default(),
        };
        self.client.layer_apply(self.headers(), start, input)
    }
    fn layer_diff(&self, key: &str, compression: Compression, labels: &Labels) -> Result<Diffed> {
        let r = apb::LayerDiffRequest {
            snapshotter: self.name.clone(),
            key: key.into(),
            compression: compression.as_str().into(),
            labels: Self::labels(labels),
        };
        self.client.layer_diff(self.headers(), r)
    }
    fn layer_register(
        &self,
        blob: &Digest,
        diff_id: Option<&Digest>,
        parent: Option<&Digest>,
        labels: &Labels,
    ) -> Result<Registered> {
        let r = apb::LayerRegisterRequest {
            snapshotter: self.name.clone(),
            blob: blob.to_string(),
            diff_id: diff_id.map(Digest::to_string).unwrap_or_default(),
            parent: parent.map(Digest::to_string).unwrap_or_default(),
            labels: Self::labels(labels),
        };
        self.client.layer_register(self.headers(), r)
    }
    fn merge(&self, name: &str, inputs: &[String], labels: &Labels) -> Result<Merged> {
        let r = apb::MergeRequest {
            snapshotter: self.name.clone(),
            name: name.into(),
            inputs: inputs.to_vec(),
            labels: Self::labels(labels),
        };
        self.client.merge(self.headers(), r)
    }
    fn diff_snapshot(
        &self,
        name: &str,
        lower: Option<&str>,
        upper: &str,
        labels: &Labels,
    ) -> Result<Merged> {
        let r = apb::DiffSnapshotRequest {
            snapshotter: self.name.clone(),
            name: name.into(),
            lower: lower.unwrap_or_default().into(),
            upper: upper.into(),
            labels: Self::labels(labels),
        };
        self.client.diff_snapshot(self.headers(), r)
    }
    fn image_import(
        &self,
        path: &Path,
        platform: Option<&str>,
        _progress: &mut dyn FnMut(wasnap::image::Event<'_>),
    ) -> Result<wasnap::image::Imported> {
        // The daemon reads the path itself: make it absolute here.
        let path =
            std::path::absolute(path).with_context(|| format!("resolve {}", path.display()))?;
        let r = apb::ImageImportRequest {
            snapshotter: self.name.clone(),
            path: path.to_string_lossy().into_owned(),
            platform: platform.unwrap_or_default().to_owned(),
        };
        self.client.image_import(self.headers(), r)
    }
}
