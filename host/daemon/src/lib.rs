//! The wasnap daemon: containerd's snapshots and leases gRPC services, and wasnap's
//! admin service, over a unix socket; and the client the CLI and the bench use.
//!
//! - [`proto`]: the generated messages, servers and clients.
//! - [`convert`]: host types and errors to and from the wire.
//! - [`server`]: the services over an open [`wasnap::Host`].
//! - [`serve`]: the daemon's life: the socket, signals, a graceful stop.
//! - [`conn`]: a client's connection as the server reads and writes it.
//! - [`metrics`]: the Prometheus endpoint.
//! - [`client`]: connecting to a daemon, namespace headers, a blocking wrapper.

pub mod client;
pub mod conn;
pub mod convert;
pub mod metrics;
pub mod proto;
pub mod serve;
pub mod server;
