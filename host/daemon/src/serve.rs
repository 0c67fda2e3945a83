//! The daemon's life: open the root, take the socket, serve, stop gracefully.

use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use wasnap::Context;
use wasnap::fault::Faults;
use wasnap::root::{Config, Host};
use wasnap::{Error, Result};

use crate::metrics::{Endpoint, Metrics};
use crate::proto::admin::admin_server::AdminServer;
use crate::proto::leases::leases_server::LeasesServer;
use crate::proto::snapshots::snapshots_server::SnapshotsServer;
use crate::server::{AdminService, LeasesService, Reconfigure, Shared, SnapshotsService};

/// What a daemon serves, and where.
#[derive(Debug, Clone)]
pub struct Options {
    /// The state directory.
    pub root: PathBuf,
    /// The unix socket to serve on.
    pub socket: PathBuf,
    /// The snapshotters and GC settings.
    pub config: Config,
    /// After a stop signal, how long calls in flight may take before the daemon exits
    /// anyway.
    pub shutdown_timeout: Duration,
    /// How a reload (SIGHUP, `wasnap plugin reload`) reads the configuration again; none:
    /// plugins are reloaded from the files and settings they were loaded with.
    pub reconfigure: Option<Reconfigure>,
}

impl Options {
    /// Options from a configuration: its root (or the default root), its socket and its
    /// shutdown bound.
    pub fn from_config(config: Config) -> Options {
        Options {
            root: config.root.clone().unwrap_or_else(wasnap::root::default_root),
            socket: config.daemon.socket.clone(),
            shutdown_timeout: Duration::from_secs(config.daemon.shutdown_timeout_secs),
            config,
            reconfigure: None,
        }
    }
}

/// Runs a daemon until SIGTERM or SIGINT, on a runtime of its own. Returns once the
/// daemon has stopped and closed the root; an error says why it could not start.
pub fn run(opts: Options) -> Result<()> {
    let workers = opts.config.daemon.async_workers;
    if workers == 0 {
        return Err(Error::invalid_argument(
            "daemon.async_workers is 0: the daemon needs at least one thread to serve",
        ));
    }
    check_stream_idle(&opts)?;
    raise_open_file_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .thread_name("wasnap-daemon")
        .build()
        .with_context(|| "start the runtime")?;
    let result = rt.block_on(async {
        let stop = stop_signal()?;
        serve(opts, stop).await
    });
    // A call still stuck in a backend past the shutdown bound must not hold the exit:
    // dropping the runtime would wait for its blocking threads.
    rt.shutdown_timeout(Duration::from_millis(500));
    result
}

/// Raises the soft limit on open files to the hard one, as Go's runtime does for
/// containerd: every plugin instance may hold up to 1024 descriptors, and the common
/// soft default (1024) would have one busy guest fail the whole daemon's opens.
fn raise_open_file_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.maximum.is_some() && limit.current == limit.maximum {
        return;
    }
    let raised = rustix::process::Rlimit { current: limit.maximum, maximum: limit.maximum };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => {
            tracing::debug!(from = ?limit.current, to = ?limit.maximum, "raised the open-file limit")
        }
        Err(e) => {
            tracing::warn!(error = %e, soft = ?limit.current, "could not raise the open-file limit")
        }
    }
}

/// Resolves when SIGTERM or SIGINT arrives.
fn stop_signal() -> Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).with_context(|| "SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).with_context(|| "SIGINT")?;
    Ok(async move {
        let which = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = which, "stopping: no new connections; finishing calls in flight");
    })
}

/// On SIGHUP, reloads every plugin whose file or settings changed (see
/// [`Host::reload`]), logging what each did. Stops when the returned task is aborted.
fn reload_on_hangup(
    host: Arc<Host>,
    reconfigure: Option<Reconfigure>,
) -> Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup()).with_context(|| "SIGHUP")?;
    // Held weakly: an aborted task is dropped some time after the abort, and the root
    // (its lock) must close when the daemon does, not then.
    let host = Arc::downgrade(&host);
    Ok(tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let Some(host) = host.upgrade() else { return };
            tracing::info!("SIGHUP: reloading plugins");
            let reconfigure = reconfigure.clone();
            let done = tokio::task::spawn_blocking(move || {
                crate::server::reload(&host, &[], reconfigure.as_ref())
            })
            .await;
            match done {
                Ok(Ok(reports)) => {
                    for r in reports {
                        tracing::info!(plugin = %r.plugin, outcome = ?r.outcome, from = %r.from, to = %r.to, "reload");
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "SIGHUP: reload failed; every plugin keeps its version")
                }
                Err(e) => tracing::warn!(error = %e, "SIGHUP: reload panicked"),
            }
        }
    }))
}

fn check_stream_idle(opts: &Options) -> Result<()> {
    match opts.config.daemon.stream_idle_secs {
        0 => Err(Error::invalid_argument(
            "daemon.stream_idle_secs is 0: every stream would fail before it moved",
        )),
        _ => Ok(()),
    }
}

/// Serves until `stop` resolves, then lets calls in flight finish (within the
/// configured bound) and closes the root.
pub async fn serve(opts: Options, stop: impl Future<Output = ()> + Send + 'static) -> Result<()> {
    serve_reporting(opts, stop, None).await
}

/// Where a daemon serves, once it does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Serving {
    /// The unix socket: bound, so a client may connect at once.
    pub socket: PathBuf,
    /// The metrics endpoint, if configured: its address with the port taken (the
    /// configuration may ask for port 0).
    pub metrics: Option<SocketAddr>,
}

/// [`serve`], telling `serving` where the daemon serves as soon as it does.
pub async fn serve_reporting(
    opts: Options,
    stop: impl Future<Output = ()> + Send + 'static,
    serving: Option<tokio::sync::oneshot::Sender<Serving>>,
) -> Result<()> {
    check_stream_idle(&opts)?;
    // Opening the root takes its lock: a second daemon on the same root stops here,
    // before it touches the socket the first one serves on.
    let root = opts.root.clone();
    let config = opts.config.clone();
    let host = tokio::task::spawn_blocking(move || {
        Host::open_config(&root, Arc::new(Faults::from_env()?), config)
    })
    .await
    .map_err(|e| Error::internal(format!("open the root: {e}")))??;
    let host = Arc::new(host);
    // The metrics address next, while nothing but the database is open: an address
    // that cannot be used stops the start before it opens anything else.
    let metrics = match opts.config.metrics.address {
        None => None,
        Some(address) => {
            let listener = crate::metrics::bind(address).await?;
            Some((listener, Metrics::new(&host)?))
        }
    };
    // Open every snapshotter now, so a plugin that cannot start is in the log at once
    // (and `wasnap status` shows it closed) rather than at its first call. The others
    // serve regardless; a failed one is tried again on its next call.
    let opening = host.clone();
    tokio::task::spawn_blocking(move || {
        let names: Vec<String> = opening.snapshotter_names().map(str::to_owned).collect();
        for name in names {
            if let Err(e) = opening.snapshotter(&name) {
                tracing::warn!(snapshotter = %name, error = %e, "cannot open; its calls will fail until it can");
            }
        }
        // Nothing is dropped silently: what a crash or a failing disk left inconsistent
        // is in the log from the start (and in `wasnap gc --check`).
        match opening.check() {
            Ok(reports) => {
                for r in reports.iter().filter(|r| r.problems() > 0) {
                    for bkey in &r.missing {
                        tracing::error!(snapshotter = %r.snapshotter, bkey, "a record names a snapshot its backend does not have");
                    }
                    for (bkey, why) in &r.damaged {
                        tracing::error!(snapshotter = %r.snapshotter, bkey, "a snapshot's data is damaged: {why}");
                    }
                    if !r.orphans.is_empty() {
                        tracing::info!(snapshotter = %r.snapshotter, count = r.orphans.len(), "backend snapshots no record names; the next collection prunes them");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not check the snapshotters at start"),
        }
    })
    .await
    .map_err(|e| Error::internal(format!("open the snapshotters: {e}")))?;
    let listener = bind(&opts.socket)?;
    let gc = host.start_gc()?;
    let hangup = reload_on_hangup(host.clone(), opts.reconfigure.clone())?;
    tracing::info!(socket = %opts.socket.display(), root = %host.root().display(), "serving");

    let shared = Shared::new(host.clone(), opts.socket.clone());
    shared.set_stream_idle(Duration::from_secs(opts.config.daemon.stream_idle_secs));
    // Metrics, if configured: calls count from here on, and the endpoint serves until
    // this function returns.
    let endpoint = match metrics {
        None => None,
        Some((listener, metrics)) => {
            shared.set_metrics(metrics.clone());
            Some(crate::metrics::serve(listener, metrics))
        }
    };
    if let Some(tx) = serving {
        let metrics = endpoint.as_ref().map(Endpoint::address);
        let _ = tx.send(Serving { socket: opts.socket.clone(), metrics });
    }
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    // A database that failed a write refuses every write until it is reopened: the
    // daemon then stops as for a signal, and exits with an error, for its service
    // manager to start it again (which reopens and repairs the file and runs every
    // recovery) instead of answering every change with an error.
    let broken: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    let (watched, noted) = (host.clone(), broken.clone());
    let signal = async move {
        tokio::select! {
            () = stop => {}
            why = database_broken(&watched) => {
                tracing::error!(error = %why, "the database failed a write and refuses every write until it is reopened; stopping, for the service manager to start wasnap again");
                *noted.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
            }
        }
        let _ = stopping_tx.send(());
    };
    let server = tonic::transport::Server::builder()
        .add_service(SnapshotsServer::new(SnapshotsService::new(shared.clone())))
        .add_service(LeasesServer::new(LeasesService::new(shared.clone())))
        .add_service(AdminServer::new(
            AdminService::new(shared.clone()).with_reconfigure(opts.reconfigure.clone()),
        ))
        .serve_with_incoming_shutdown(incoming(listener), signal);
    let limit = opts.shutdown_timeout;
    let served = tokio::select! {
        r = server => r.map_err(|e| Error::internal(format!("serve: {e}"))),
        () = async move {
            // Only once stopping: give calls in flight their bound, then go anyway.
            if stopping_rx.await.is_ok() {
                tokio::time::sleep(limit).await;
            } else {
                std::future::pending::<()>().await;
            }
        } => {
            tracing::warn!(?limit, "calls were still running when the shutdown bound passed; exiting anyway");
            Ok(())
        }
    };
    let _ = std::fs::remove_file(&opts.socket);
    hangup.abort();
    drop(gc);
    let closed = tokio::task::spawn_blocking(move || host.close())
        .await
        .map_err(|e| Error::internal(format!("close the root: {e}")))?;
    tracing::info!("stopped");
    let broken = broken.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(why) = broken {
        return Err(Error::unavailable(format!(
            "stopped because the database failed a write ({why}); start wasnap again to reopen and repair it"
        )));
    }
    served.and(closed)
}

/// The listener's connections, each watched for writability only while a write waits
/// (see [`crate::conn`]).
fn incoming(
    listener: UnixListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<crate::conn::Conn>> {
    use tokio_stream::StreamExt;
    UnixListenerStream::new(listener).map(|accepted| accepted.and_then(crate::conn::Conn::new))
}

/// Resolves, with the reason, once the root's database refuses every write.
async fn database_broken(host: &Host) -> String {
    loop {
        if let Some(why) = host.database_broken() {
            return why;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Takes the socket: its directory is made owner-only if we create it, a stale socket
/// (nothing answers) is replaced, a live one is refused, and the new socket is 0600.
fn bind(socket: &Path) -> Result<UnixListener> {
    if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("create {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(socket) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(Error::already_exists(format!(
                "{} exists and is not a socket; not replacing it",
                socket.display()
            )));
        }
        Ok(_) => {
            if std::os::unix::net::UnixStream::connect(socket).is_ok() {
                return Err(Error::already_exists(format!(
                    "another daemon is serving on {}",
                    socket.display()
                )));
            }
            std::fs::remove_file(socket)
                .with_context(|| format!("remove stale {}", socket.display()))?;
        }
        Err(_) => {}
    }
    // Created owner-only from the start: no moment where others may connect.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let listener = UnixListener::bind(socket);
    rustix::process::umask(old);
    let listener = listener.with_context(|| format!("listen on {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", socket.display()))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_async_worker_and_no_stream_idle_time_are_refused_before_anything_starts() {
        type Tune = fn(&mut Config);
        let tunes: [(&str, Tune); 2] = [
            ("async_workers", |c| c.daemon.async_workers = 0),
            ("stream_idle_secs", |c| c.daemon.stream_idle_secs = 0),
        ];
        for (name, tune) in tunes {
            let mut config = Config::default();
            tune(&mut config);
            let dir = tempfile::tempdir_in("/dev/shm").unwrap();
            config.root = Some(dir.path().join("root"));
            let e = run(Options::from_config(config)).unwrap_err();
            assert_eq!(e.kind(), wasnap::ErrorKind::InvalidArgument, "{e}");
            assert!(e.message().contains(name), "{e}");
            assert!(!dir.path().join("root").exists(), "nothing was opened");
        }
    }
}
