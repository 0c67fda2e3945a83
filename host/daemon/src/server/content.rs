//! The content store and layers, served by `wasnap.v1.Admin`: blobs in and out, and
//! layers applied into, diffed out of and registered as snapshots.
//!
//! **Uploads** (ContentIngest, LayerApply) are client streams: a start message, data
//! chunks, then `done`. The start is read on the async side; the rest is read by the
//! host's work on the blocking pool through [`Upload`], a blocking `Read` that waits on
//! the next message (`Handle::block_on`). Nothing is buffered beyond the message being
//! read and HTTP/2's flow-control window, so a large layer is never held whole: a slow
//! disk slows the client. A stream that ends without `done`, or fails (a client that
//! went away), makes the read fail, so the library's call fails as on any read error:
//! an ingest keeps no blob, an apply leaves what it wrote in the snapshot, which is
//! what the library does on any error (the caller removes the snapshot).
//!
//! **Downloads** (ContentRead): the blob is opened inside the call (so a missing blob
//! is the call's status) and its file sent in chunks from the blocking pool; a client
//! that goes away ends the sending.

use std::io::{self, Read};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use wasnap::content::Expected;
use wasnap::digest::Digest;
use wasnap::layer::Compression;
use wasnap::layer::snapshot::AppliedSummary;
use wasnap::{Context, Ctx, Error, Host, Labels, Result};

use super::{Run, Scope, Shared, snapshotter};
use crate::convert;
use crate::proto::admin::*;

/// The largest data chunk sent or expected (well under gRPC's 4 MiB message limit).
pub const CHUNK: usize = 1 << 20;

type Reply<T> = std::result::Result<Response<T>, Status>;

fn labels(map: std::collections::HashMap<String, String>) -> Labels {
    map.into_iter().collect()
}

fn json<T: Serialize>(v: &T) -> Result<ReportResponse> {
    serde_json::to_string(v).map(|json| ReportResponse { json }).with_context(|| "encode report")
}

fn digest(what: &str, s: &str) -> Result<Digest> {
    Digest::parse(s).map_err(|e| e.context(what))
}

/// A digest if one is given (empty: none).
fn digest_opt(what: &str, s: &str) -> Result<Option<Digest>> {
    if s.is_empty() { Ok(None) } else { digest(what, s).map(Some) }
}

/// One message of an upload.
pub(super) enum Part<S> {
    Start(S),
    Data(Vec<u8>),
    Done,
}

/// An upload's message type: its start, its chunks and its end.
pub(super) trait UploadMessage: Send + 'static {
    type Start;
    fn into_part(self) -> Option<Part<Self::Start>>;
}

impl UploadMessage for ContentIngestRequest {
    type Start = ContentIngestStart;
    fn into_part(self) -> Option<Part<ContentIngestStart>> {
        use content_ingest_request::Part as P;
        Some(match self.part? {
            P::Start(s) => Part::Start(s),
            P::Data(d) => Part::Data(d),
            P::Done(_) => Part::Done,
        })
    }
}

impl UploadMessage for LayerApplyRequest {
    type Start = LayerApplyStart;
    fn into_part(self) -> Option<Part<LayerApplyStart>> {
        use layer_apply_request::Part as P;
        Some(match self.part? {
            P::Start(s) => Part::Start(s),
            P::Data(d) => Part::Data(d),
            P::Done(_) => Part::Done,
        })
    }
}

/// The start of an upload, read on the async side.
async fn start<M: UploadMessage>(stream: &mut Streaming<M>, idle: Duration) -> Result<M::Start> {
    let Ok(message) = tokio::time::timeout(idle, stream.message()).await else {
        return Err(Error::unavailable(format!(
            "the upload sent no start message for {idle:?} (the daemon's stream_idle_secs)"
        )));
    };
    match message {
        Ok(Some(m)) => match m.into_part() {
            Some(Part::Start(s)) => Ok(s),
            _ => Err(Error::invalid_argument("an upload starts with its start message")),
        },
        Ok(None) => Err(Error::invalid_argument("an empty upload: no start message")),
        Err(s) => Err(convert::error(&s).context("read the upload")),
    }
}

/// The rest of an upload as a blocking `Read`, for the host's work on the blocking pool:
/// each read past the current chunk waits for the next message. It reads 0 (the end)
/// only after `done`; a stream that ends without it or fails is an error, whose class
/// [`Upload::classify`] restores on the library's error.
pub(super) struct Upload<M> {
    rt: tokio::runtime::Handle,
    /// How long a message may take to come.
    idle: Duration,
    stream: Streaming<M>,
    chunk: Vec<u8>,
    at: usize,
    done: bool,
    failed: Option<Error>,
}

impl<M: UploadMessage> Upload<M> {
    fn new(stream: Streaming<M>, idle: Duration) -> Self {
        Upload {
            rt: tokio::runtime::Handle::current(),
            idle,
            stream,
            chunk: Vec::new(),
            at: 0,
            done: false,
            failed: None,
        }
    }

    fn next(&mut self) -> Result<()> {
        // The timer is made inside `block_on`: this may run on a thread of the
        // library's (a layer's decoder) with no runtime of its own.
        let (idle, stream) = (self.idle, &mut self.stream);
        let message =
            self.rt.block_on(async { tokio::time::timeout(idle, stream.message()).await });
        let Ok(message) = message else {
            return Err(Error::unavailable(format!(
                "the upload sent nothing for {:?} (the daemon's stream_idle_secs)",
                self.idle
            )));
        };
        let part = match message {
            Ok(Some(m)) => m.into_part(),
            Ok(None) => {
                return Err(Error::unavailable(
                    "the upload ended before its last message (the client went away or failed)",
                ));
            }
            Err(s) => return Err(convert::error(&s).context("the upload failed")),
        };
        match part {
            Some(Part::Data(d)) => {
                (self.chunk, self.at) = (d, 0);
                Ok(())
            }
            Some(Part::Done) => {
                self.done = true;
                Ok(())
            }
            Some(Part::Start(_)) => Err(Error::invalid_argument("upload: a second start message")),
            None => Err(Error::invalid_argument("upload: a message with no part")),
        }
    }

    /// Reads what the library left unread up to `done` (a tar's padding, say), so that
    /// a success is reported only for an upload the client finished.
    fn finish(&mut self) -> Result<()> {
        let mut sink = [0u8; 8192];
        loop {
            match self.read(&mut sink) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) => {
                    let e = self.failed.take().unwrap_or_else(|| Error::from(e));
                    return Err(e.context("finish the upload"));
                }
            }
        }
    }

    /// The library's `result`, with the class of the upload's failure if the upload
    /// failed (the library sees an I/O error, which it takes for the host's fault).
    fn classify<T>(&mut self, result: Result<T>) -> Result<T> {
        match (result, self.failed.take()) {
            (Err(e), Some(f)) => Err(Error::new(f.kind(), e.message())),
            (r, _) => r,
        }
    }
}

impl<M: UploadMessage> Read for Upload<M> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.at < self.chunk.len() {
                let n = out.len().min(self.chunk.len() - self.at);
                out[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
                self.at += n;
                return Ok(n);
            }
            if self.done || out.is_empty() {
                return Ok(0);
            }
            if let Some(e) = &self.failed {
                return Err(io::Error::other(e.to_string()));
            }
            if let Err(e) = self.next() {
                let msg = e.message().to_owned();
                self.failed = Some(e);
                return Err(io::Error::other(msg));
            }
        }
    }
}

/// The parts of an upload request: headers, the call's scope, and the stream.
struct Incoming<M> {
    meta: tonic::metadata::MetadataMap,
    scope: Result<Scope>,
    stream: Streaming<M>,
}

impl<M> Incoming<M> {
    fn of(req: Request<Streaming<M>>) -> Self {
        let (meta, scope) = (req.metadata().clone(), Scope::of(&req));
        Incoming { meta, scope, stream: req.into_inner() }
    }
}

/// ContentIngest.
pub(super) async fn ingest(
    shared: &Arc<Shared>,
    req: Request<Streaming<ContentIngestRequest>>,
) -> Reply<ReportResponse> {
    const METHOD: &str = "Admin.ContentIngest";
    let Incoming { meta, scope, mut stream } = Incoming::of(req);
    let start = match start(&mut stream, shared.stream_idle()).await {
        Ok(s) => s,
        Err(e) => {
            return shared
                .call(METHOD, None, &meta, Run::Pool, move || Err(e))
                .await
                .map(Response::new);
        }
    };
    let mut upload = Upload::new(stream, shared.stream_idle());
    let host = shared.host().clone();
    let work = move || {
        let ctx = scope?.required()?;
        let expected = match digest_opt("expected digest", &start.expected_digest)? {
            Some(digest) => Some(Expected { digest, size: start.expected_size }),
            None if start.expected_size.is_some() => {
                return Err(Error::invalid_argument("an expected size needs an expected digest"));
            }
            None => None,
        };
        let labels = labels(start.labels);
        // As containerd does when the writer opens: not after reading the whole blob.
        if let Some(lease) = ctx.lease() {
            host.leases().require(&ctx, lease)?;
        }
        let mut w = host.content().writer()?;
        let copied = io::copy(&mut upload, &mut w).context("write blob");
        upload.classify(copied)?;
        // Dropped uncommitted on any error above: the writer removes its file.
        json(&w.commit(&ctx, expected, &labels)?)
    };
    shared.call(METHOD, None, &meta, Run::Pool, work).await.map(Response::new)
}

/// LayerApply.
pub(super) async fn apply(
    shared: &Arc<Shared>,
    req: Request<Streaming<LayerApplyRequest>>,
) -> Reply<ReportResponse> {
    const METHOD: &str = "Admin.LayerApply";
    let Incoming { meta, scope, mut stream } = Incoming::of(req);
    let start = match start(&mut stream, shared.stream_idle()).await {
        Ok(s) => s,
        Err(e) => {
            return shared
                .call(METHOD, None, &meta, Run::Pool, move || Err(e))
                .await
                .map(Response::new);
        }
    };
    let label = shared.snapshotter_label(&start.snapshotter);
    let mut upload = Upload::new(stream, shared.stream_idle());
    let host = shared.host().clone();
    let work = move || {
        let ctx = scope?.required()?;
        let compression = match start.compression.as_str() {
            "" => None,
            c => Some(Compression::parse(c)?),
        };
        let sn = snapshotter(&host, &start.snapshotter)?;
        let applied = host.layers(&sn).apply(&ctx, &start.key, &mut upload, compression);
        let applied = AppliedSummary::from(&upload.classify(applied)?);
        upload.finish()?;
        json(&applied)
    };
    shared.call(METHOD, label, &meta, Run::Pool, work).await.map(Response::new)
}

/// ContentRead's stream.
pub(super) type ReadStream = ReceiverStream<std::result::Result<DataChunk, Status>>;

/// ContentRead.
pub(super) async fn read(
    shared: &Arc<Shared>,
    req: Request<ContentReadRequest>,
) -> Reply<ReadStream> {
    let (meta, scope) = (req.metadata().clone(), Scope::of(&req));
    let r = req.into_inner();
    let host = shared.host().clone();
    let open = move || {
        let ctx = scope?.required()?;
        let (_, file) = host.content().read(&ctx, &digest("blob", &r.digest)?)?;
        Ok(file)
    };
    let mut file = shared.call("Admin.ContentRead", None, &meta, Run::Pool, open).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tokio::task::spawn_blocking(move || {
        loop {
            let mut data = vec![0u8; CHUNK];
            let mut n = 0;
            let failed = loop {
                match file.read(&mut data[n..]) {
                    Ok(0) => break None,
                    Ok(k) => {
                        n += k;
                        if n == data.len() {
                            break None;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => break Some(Error::from(e).context("read blob")),
                }
            };
            if let Some(e) = failed {
                tracing::warn!(error = %e, "ContentRead failed");
                let _ = tx.blocking_send(Err(convert::status(&e)));
                return;
            }
            if n == 0 {
                return;
            }
            data.truncate(n);
            if tx.blocking_send(Ok(DataChunk { data })).is_err() {
                return; // The client went away.
            }
        }
    });
    Ok(Response::new(ReceiverStream::new(rx)))
}

/// ContentList.
pub(super) fn list(host: &Host, scope: Scope, r: ContentListRequest) -> Result<ReportResponse> {
    json(&host.content().list(&scope.required()?, &r.filters)?)
}

/// ContentInfo.
pub(super) fn info(
    host: &Host,
    scope: Scope,
    r: ContentInfoRequest,
) -> Result<ContentInfoResponse> {
    let ctx = scope.required()?;
    let d = digest("blob", &r.digest)?;
    let blob = host.content().info(&ctx, &d)?;
    let snapshots = host
        .content()
        .mapped_snapshots(&ctx, &d)?
        .into_iter()
        .map(|(snapshotter, key)| MappedSnapshot { snapshotter, key })
        .collect();
    Ok(ContentInfoResponse { blob_json: json(&blob)?.json, snapshots })
}

/// ContentDelete.
pub(super) fn delete(
    host: &Host,
    scope: Scope,
    r: ContentDeleteRequest,
) -> Result<ContentDeleteResponse> {
    host.content().delete(&scope.required()?, &digest("blob", &r.digest)?)?;
    Ok(ContentDeleteResponse {})
}

/// LayerDiff.
pub(super) fn diff(host: &Host, scope: Scope, r: LayerDiffRequest) -> Result<ReportResponse> {
    let ctx: Ctx = scope.required()?;
    let compression = match r.compression.as_str() {
        "" => Compression::Gzip,
        c => Compression::parse(c)?,
    };
    let sn = snapshotter(host, &r.snapshotter)?;
    json(&host.layers(&sn).diff(&ctx, &r.key, compression, &labels(r.labels))?)
}

/// LayerRegister.
pub(super) fn register(
    host: &Host,
    scope: Scope,
    r: LayerRegisterRequest,
) -> Result<ReportResponse> {
    let ctx = scope.required()?;
    let blob = digest("blob", &r.blob)?;
    let diff_id = digest_opt("diffID", &r.diff_id)?;
    let parent = digest_opt("parent", &r.parent)?;
    let sn = snapshotter(host, &r.snapshotter)?;
    let reg = host.layers(&sn).register(
        &ctx,
        &blob,
        diff_id.as_ref(),
        parent.as_ref(),
        &labels(r.labels),
    )?;
    json(&reg)
}

/// Merge.
pub(super) fn merge(host: &Host, scope: Scope, r: MergeRequest) -> Result<ReportResponse> {
    let ctx = scope.required()?;
    let sn = snapshotter(host, &r.snapshotter)?;
    json(&host.layers(&sn).merge(&ctx, &r.name, &r.inputs, &labels(r.labels))?)
}

/// DiffSnapshot.
pub(super) fn diff_snapshot(
    host: &Host,
    scope: Scope,
    r: DiffSnapshotRequest,
) -> Result<ReportResponse> {
    let ctx = scope.required()?;
    let sn = snapshotter(host, &r.snapshotter)?;
    let lower = Some(r.lower.as_str()).filter(|l| !l.is_empty());
    let made = host.layers(&sn).diff_snapshot(&ctx, &r.name, lower, &r.upper, &labels(r.labels))?;
    json(&made)
}

/// ImageImport.
pub(super) fn import(host: &Host, scope: Scope, r: ImageImportRequest) -> Result<ReportResponse> {
    let ctx = scope.required()?;
    let path = std::path::Path::new(&r.path);
    if !path.is_absolute() {
        return Err(Error::invalid_argument(format!(
            "image path {:?} must be absolute: the daemon reads it",
            r.path
        )));
    }
    let platform = Some(r.platform.as_str()).filter(|p| !p.is_empty());
    let sn = snapshotter(host, &r.snapshotter)?;
    json(&host.import_image(&ctx, sn.name(), path, platform, &mut |_| {})?)
}
