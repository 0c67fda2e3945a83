//! Talking to a daemon: a connection over its unix socket, requests with the namespace
//! (and lease) headers set, and a blocking wrapper for synchronous callers (the CLI).

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use wasnap::Context;
use wasnap::{Error, Result};

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

    /// wasnap's admin service.
    pub fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel.clone())
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
