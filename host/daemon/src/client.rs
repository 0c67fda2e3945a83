//! Talking to a daemon: a connection over its unix socket, requests with the namespace
//! (and lease) headers set, and a blocking wrapper for synchronous callers (the CLI),
//! which also streams blobs and layers up from a `Read` and down into a `Write`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint, Uri};
use wasnap::Context;
use wasnap::content::BlobInfo;
use wasnap::digest::{Digest, Hasher};
use wasnap::layer::merge::Merged;
use wasnap::layer::snapshot::{AppliedSummary, Diffed, Registered};
use wasnap::{Error, Result};

use crate::proto::admin as apb;
use crate::proto::admin::admin_client::AdminClient;
use crate::proto::leases::leases_client::LeasesClient;
use crate::proto::snapshots::snapshots_client::SnapshotsClient;

/// The request header that carries the namespace, as containerd sends it.
pub const NAMESPACE_HEADER: &str = "containerd-namespace";
/// The request header that carries a wasnap lease for the call. containerd's own
/// `containerd-lease` header names containerd's leases, which wasnap does not keep, so
/// the daemon ignores that one.
pub const LEASE_HEADER: &str = "wasnap-lease";
/// The request header that carries a request id; the daemon logs it, or makes one.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The largest admin report a client takes: 1 GiB, some millions of snapshots.
pub const MAX_REPORT: usize = 1 << 30;

/// A connection to a daemon. Cheap to clone; clones share the connection.
#[derive(Debug, Clone)]
pub struct Client {
    channel: Channel,
    socket: PathBuf,
}

impl Client {
    /// Connects to the daemon listening on `socket`.
    pub async fn connect(socket: &Path) -> Result<Client> {
        let path = socket.to_path_buf();
        let connector = tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        });
        // The URI is required by the API and never used: the connector picks the socket.
        let channel = Endpoint::from_static("http://wasnap.sock")
            .connect_with_connector(connector)
            .await
            .map_err(|e| {
                let cause = std::error::Error::source(&e).map(|c| c.to_string());
                Error::unavailable(format!(
                    "no wasnap daemon answers at {}: {}",
                    socket.display(),
                    cause.unwrap_or_else(|| e.to_string())
                ))
            })?;
        Ok(Client { channel, socket: socket.to_path_buf() })
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The snapshots service.
    pub fn snapshots(&self) -> SnapshotsClient<Channel> {
        SnapshotsClient::new(self.channel.clone())
    }

    /// The leases service.
    pub fn leases(&self) -> LeasesClient<Channel> {
        LeasesClient::new(self.channel.clone())
    }

    /// wasnap's admin service. Its reports (`du`, `check`, `prune`, content lists) are
    /// one message each, as large as what they report: up to [`MAX_REPORT`] bytes,
    /// not tonic's default of 4 MiB.
    pub fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel.clone()).max_decoding_message_size(MAX_REPORT)
    }
}

/// `msg` as a request in `namespace` (none: no header, as containerd's collector
/// sends), with `lease` in effect if given.
pub fn request<T>(msg: T, namespace: Option<&str>, lease: Option<&str>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    let headers = [(NAMESPACE_HEADER, namespace), (LEASE_HEADER, lease)];
    for (name, value) in headers {
        if let Some(v) = value
            && let Ok(v) = v.parse()
        {
            req.metadata_mut().insert(name, v);
        }
    }
    req
}

/// A client for synchronous code: each call blocks on a runtime of its own.
#[derive(Debug)]
pub struct Blocking {
    rt: tokio::runtime::Runtime,
    client: Client,
}

impl Blocking {
    /// Connects to the daemon listening on `socket`.
    pub fn connect(socket: &Path) -> Result<Blocking> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .with_context(|| "start a runtime for the client")?;
        let client = rt.block_on(Client::connect(socket))?;
        Ok(Blocking { rt, client })
    }

    /// The connection.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Runs `f` (a call on the connection) to completion; a failed call's status
    /// becomes the host error it stands for.
    pub fn call<T, F>(&self, f: impl FnOnce(Client) -> F) -> Result<T>
    where
        F: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        self.rt
            .block_on(f(self.client.clone()))
            .map(tonic::Response::into_inner)
            .map_err(|s| crate::convert::error(&s))
    }

    /// Runs any future on the client's runtime (for streams).
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }
}

/// The namespace and lease a call is made in (its headers).
#[derive(Debug, Clone, Copy, Default)]
pub struct Headers<'a> {
    /// The namespace; none: no header.
    pub namespace: Option<&'a str>,
    /// A wasnap lease for the call.
    pub lease: Option<&'a str>,
}

impl Headers<'_> {
    /// `msg` as a request with these headers.
    pub fn request<T>(&self, msg: T) -> tonic::Request<T> {
        request(msg, self.namespace, self.lease)
    }
}

/// The largest chunk an upload sends.
const CHUNK: usize = crate::server::CHUNK;
/// Chunks read ahead of what the connection has taken.
const READ_AHEAD: usize = 4;

/// An upload's messages, from the thread that reads its input. The client drops the
/// receiver once the call is over, which releases a reader waiting to send.
struct UploadStream<M>(Arc<Mutex<Option<mpsc::Receiver<M>>>>);

impl<M> tokio_stream::Stream for UploadStream<M> {
    type Item = M;
    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<M>> {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match slot.as_mut() {
            Some(rx) => rx.poll_recv(cx),
            None => Poll::Ready(None),
        }
    }
}

/// One read of `input` into `buf` (not empty), again if interrupted; 0: the end.
fn read_some(input: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match input.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            r => return r,
        }
    }
}

fn report<T: serde::de::DeserializeOwned>(r: apb::ReportResponse) -> Result<T> {
    serde_json::from_str(&r.json).with_context(|| "decode the daemon's report")
}

impl Blocking {
    /// Sends `start`, then `input` in chunks (`data`), then `done`, as the stream of the
    /// call `call` makes. The input is read on a thread of its own, at most a few chunks
    /// ahead of the connection. If reading it fails, the stream ends without `done`, so
    /// the daemon keeps nothing, and that failure is the error.
    fn upload<M, T, F>(
        &self,
        start: M,
        input: &mut (dyn Read + Send),
        data: impl Fn(Vec<u8>) -> M + Send,
        done: M,
        call: impl FnOnce(Client, UploadStream<M>) -> F,
    ) -> Result<T>
    where
        M: Send + 'static,
        F: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let (tx, rx) = mpsc::channel(READ_AHEAD);
        let slot = Arc::new(Mutex::new(Some(rx)));
        let stream = UploadStream(slot.clone());
        std::thread::scope(|s| {
            let reader = s.spawn(move || -> Result<()> {
                if tx.blocking_send(start).is_err() {
                    return Ok(()); // The call ended: its status says why.
                }
                // One buffer, reused: each message takes a copy of what was read, so a
                // slow source's small chunks hold only their own bytes while queued.
                let mut buf = vec![0u8; CHUNK];
                loop {
                    let mut n = 0;
                    // A chunk goes once full, or as soon as the connection has taken
                    // every chunk before it: a slow source (a download piped in) keeps
                    // the upload moving, and the daemon's idle limit applies to the
                    // source, not to how long it takes to fill a chunk.
                    let ended = loop {
                        let k = read_some(input, &mut buf[n..]).context("read the upload")?;
                        n += k;
                        if k == 0 {
                            break true;
                        }
                        if n == buf.len() || tx.capacity() == tx.max_capacity() {
                            break false;
                        }
                    };
                    if n > 0 && tx.blocking_send(data(buf[..n].to_vec())).is_err() {
                        return Ok(());
                    }
                    if ended {
                        let _ = tx.blocking_send(done);
                        return Ok(());
                    }
                }
            });
            let result = self
                .rt
                .block_on(call(self.client.clone(), stream))
                .map(tonic::Response::into_inner)
                .map_err(|s| crate::convert::error(&s));
            // The call is over: a reader still waiting for room is let go.
            drop(slot.lock().unwrap_or_else(|e| e.into_inner()).take());
            let read = reader
                .join()
                .unwrap_or_else(|_| Err(Error::internal("the upload's reader panicked")));
            read.and(result)
        })
    }

    /// Stores `input` as a blob (`start` says what it must be and its labels).
    pub fn content_ingest(
        &self,
        h: Headers<'_>,
        start: apb::ContentIngestStart,
        input: &mut (dyn Read + Send),
    ) -> Result<BlobInfo> {
        use apb::content_ingest_request::Part;
        let msg = |part| apb::ContentIngestRequest { part: Some(part) };
        let r = self.upload(
            msg(Part::Start(start)),
            input,
            move |d| msg(Part::Data(d)),
            msg(Part::Done(apb::UploadDone {})),
            |c, stream| async move { c.admin().content_ingest(h.request(stream)).await },
        )?;
        report(r)
    }

    /// Applies `input`, a layer, into an active snapshot (`start` names it).
    pub fn layer_apply(
        &self,
        h: Headers<'_>,
        start: apb::LayerApplyStart,
        input: &mut (dyn Read + Send),
    ) -> Result<AppliedSummary> {
        use apb::layer_apply_request::Part;
        let msg = |part| apb::LayerApplyRequest { part: Some(part) };
        let r = self.upload(
            msg(Part::Start(start)),
            input,
            move |d| msg(Part::Data(d)),
            msg(Part::Done(apb::UploadDone {})),
            |c, stream| async move { c.admin().layer_apply(h.request(stream)).await },
        )?;
        report(r)
    }

    /// Writes blob `digest` to `out`, checking what arrives against the digest; returns
    /// its size.
    pub fn content_read(
        &self,
        h: Headers<'_>,
        digest: &Digest,
        out: &mut dyn Write,
    ) -> Result<u64> {
        let req = h.request(apb::ContentReadRequest { digest: digest.to_string() });
        let client = self.client.clone();
        let status = |s: tonic::Status| crate::convert::error(&s);
        self.rt.block_on(async move {
            let mut stream = client.admin().content_read(req).await.map_err(status)?.into_inner();
            let mut hasher = Hasher::default();
            while let Some(chunk) = stream.message().await.map_err(status)? {
                hasher.update(&chunk.data);
                out.write_all(&chunk.data).context("write the blob")?;
            }
            out.flush().context("write the blob")?;
            let size = hasher.count();
            let got = hasher.finish();
            if got != *digest {
                return Err(Error::internal(format!(
                    "blob {digest}: the daemon sent {size} bytes whose digest is {got}"
                )));
            }
            Ok(size)
        })
    }

    /// The namespace's blobs matching any of `filters`.
    pub fn content_list(&self, h: Headers<'_>, filters: &[String]) -> Result<Vec<BlobInfo>> {
        let r = h.request(apb::ContentListRequest { filters: filters.to_vec() });
        report(self.call(|c| async move { c.admin().content_list(r).await })?)
    }

    /// Blob `digest` and the snapshots (snapshotter, key) mapped to it.
    pub fn content_info(
        &self,
        h: Headers<'_>,
        digest: &Digest,
    ) -> Result<(BlobInfo, Vec<(String, String)>)> {
        let r = h.request(apb::ContentInfoRequest { digest: digest.to_string() });
        let resp = self.call(|c| async move { c.admin().content_info(r).await })?;
        let blob = report(apb::ReportResponse { json: resp.blob_json })?;
        Ok((blob, resp.snapshots.into_iter().map(|m| (m.snapshotter, m.key)).collect()))
    }

    /// Deletes blob `digest` from the namespace.
    pub fn content_delete(&self, h: Headers<'_>, digest: &Digest) -> Result<()> {
        let r = h.request(apb::ContentDeleteRequest { digest: digest.to_string() });
        self.call(|c| async move { c.admin().content_delete(r).await }).map(drop)
    }

    /// Stores the difference between a snapshot and its parent as a layer blob.
    pub fn layer_diff(&self, h: Headers<'_>, req: apb::LayerDiffRequest) -> Result<Diffed> {
        let r = h.request(req);
        report(self.call(|c| async move { c.admin().layer_diff(r).await })?)
    }

    /// Makes a layer blob a committed snapshot named by its chain ID.
    pub fn layer_register(
        &self,
        h: Headers<'_>,
        req: apb::LayerRegisterRequest,
    ) -> Result<Registered> {
        let r = h.request(req);
        report(self.call(|c| async move { c.admin().layer_register(r).await })?)
    }

    /// Merges snapshots (see [`wasnap::layer::snapshot::Layers::merge`]).
    pub fn merge(&self, h: Headers<'_>, req: apb::MergeRequest) -> Result<Merged> {
        let r = h.request(req);
        report(self.call(|c| async move { c.admin().merge(r).await })?)
    }

    /// Makes a diff snapshot (see [`wasnap::layer::snapshot::Layers::diff_snapshot`]).
    pub fn diff_snapshot(&self, h: Headers<'_>, req: apb::DiffSnapshotRequest) -> Result<Merged> {
        let r = h.request(req);
        report(self.call(|c| async move { c.admin().diff_snapshot(r).await })?)
    }

    /// Imports the image at `req.path` (read by the daemon).
    pub fn image_import(
        &self,
        h: Headers<'_>,
        req: apb::ImageImportRequest,
    ) -> Result<wasnap::image::Imported> {
        let r = h.request(req);
        report(self.call(|c| async move { c.admin().image_import(r).await })?)
    }
}
