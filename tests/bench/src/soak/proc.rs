//! The `wasnap daemon` child of the soak: started on one root again and again, with
//! `WASNAP_FAULTS` set or not for each life, killed by its pid, and its exit awaited as
//! an event (a thread waits on the child and reports), so a daemon that aborts at an
//! armed fault point is noticed at once. Also samples its fds, threads and RSS from
//! `/proc`.
//!
//! (`wasnap_test_util::process::DaemonProcess` starts the same command but neither
//! exposes the pid nor takes an environment per start, which the soak needs.)

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use wasnap::Context;
use wasnap::error::{Error, Result};
use wasnap_daemon::client::Client;

/// The daemon child, across its lives.
pub struct Daemon {
    exe: PathBuf,
    config: PathBuf,
    root: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    pid: Option<i32>,
    exit: Option<oneshot::Receiver<std::io::Result<ExitStatus>>>,
}

/// One reading of the daemon's resources.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub fds: u64,
    pub threads: u64,
    pub rss_kib: u64,
}

impl Daemon {
    /// A daemon of `exe` on the root `root`, with its socket, log and `config` (written
    /// there) in `dir`; not started yet.
    pub fn new(exe: &Path, dir: &Path, root: &Path, config: &str) -> Result<Daemon> {
        let path = dir.join("wasnap.toml");
        std::fs::write(&path, config).with_context(|| "write the daemon's config")?;
        Ok(Daemon {
            exe: exe.to_path_buf(),
            config: path,
            root: root.to_path_buf(),
            socket: dir.join("wasnap.sock"),
            log: dir.join("wasnap.log"),
            pid: None,
            exit: None,
        })
    }

    /// Starts a life with `faults` (a `WASNAP_FAULTS` spec) armed; returns a client once
    /// the daemon answers `Status`.
    pub async fn start(&mut self, faults: Option<&str>) -> Result<Client> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .context("open the daemon log")?;
        let err = log.try_clone().context("open the daemon log")?;
        let mut cmd = Command::new(&self.exe);
        cmd.arg("--config")
            .arg(&self.config)
            .arg("--root")
            .arg(&self.root)
            .arg("daemon")
            .arg("--socket")
            .arg(&self.socket)
            .env(
                "WASNAP_LOG",
                // Guests' output is logged at info: the chaos guest's deaths are counted
                // from it.
                std::env::var("WASNAP_SOAK_DAEMON_LOG")
                    .unwrap_or_else(|_| "warn,wasnap::plugin::output=info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        match faults {
            Some(f) => cmd.env("WASNAP_FAULTS", f),
            None => cmd.env_remove("WASNAP_FAULTS"),
        };
        let mut child = cmd.spawn().context("start wasnap daemon")?;
        self.pid = Some(child.id() as i32);
        let (tx, rx) = oneshot::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        self.exit = Some(rx);
        let started = Instant::now();
        loop {
            // Readiness has no event to wait on: the socket answers or it does not yet.
            if let Ok(c) = Client::connect(&self.socket).await {
                let status = wasnap_daemon::proto::admin::StatusRequest {};
                if c.admin().status(tonic::Request::new(status)).await.is_ok() {
                    return Ok(c);
                }
            }
            if let Some(rx) = self.exit.as_mut()
                && let Ok(status) = rx.try_recv()
            {
                self.exit = None;
                self.pid = None;
                return Err(Error::internal(format!(
                    "wasnap daemon exited at start ({status:?}):\n{}",
                    self.log_tail()
                )));
            }
            if started.elapsed() > Duration::from_secs(180) {
                return Err(Error::unavailable(format!(
                    "wasnap daemon did not answer within 3 minutes:\n{}",
                    self.log_tail()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL.
    pub fn kill(&self) -> Result<()> {
        let pid = self.pid.and_then(rustix::process::Pid::from_raw);
        let pid = pid.ok_or_else(|| Error::failed_precondition("the daemon is not running"))?;
        // The child is not reaped until our waiting thread sees it exit: the pid is ours.
        rustix::process::kill_process(pid, rustix::process::Signal::KILL)
            .with_context(|| "kill -9 the daemon")
    }

    /// Waits for the running life to end; pending forever if none runs.
    pub async fn exited(&mut self) -> Exit {
        let Some(rx) = self.exit.as_mut() else {
            return std::future::pending().await;
        };
        let r = rx.await;
        self.exit = None;
        self.pid = None;
        match r {
            Ok(Ok(status)) => Exit { status: Some(status) },
            _ => Exit { status: None },
        }
    }

    /// Whether a life is running (its exit not yet seen).
    pub fn running(&self) -> bool {
        self.exit.is_some()
    }

    /// Its fds, threads and RSS now.
    pub fn sample(&self) -> Option<Sample> {
        let pid = self.pid?;
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
        };
        Some(Sample { fds, threads: field("Threads:")?, rss_kib: field("VmRSS:")? })
    }

    /// Its whole log, over every life.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// The fault point its log says it aborted at last, if any.
    pub fn last_abort_point(&self) -> Option<String> {
        let text = std::fs::read_to_string(&self.log).ok()?;
        let line = text.lines().rev().find(|l| l.contains("injected fault: aborting"))?;
        let at = line.find("point=")? + "point=".len();
        Some(line[at..].split_whitespace().next()?.trim_matches('"').to_owned())
    }
}

/// How a life ended.
#[derive(Debug)]
pub struct Exit {
    pub status: Option<ExitStatus>,
}

impl Exit {
    /// It aborted (SIGABRT), as an armed fault point does.
    pub fn aborted(&self) -> bool {
        self.status.and_then(|s| s.signal()) == Some(rustix::process::Signal::ABORT.as_raw())
    }

    /// It was killed by SIGKILL.
    pub fn killed(&self) -> bool {
        self.status.and_then(|s| s.signal()) == Some(rustix::process::Signal::KILL.as_raw())
    }
}

impl Drop for Daemon {
    /// Kills a running life and waits (briefly) until it is gone, so that its root can
    /// be unmounted next.
    fn drop(&mut self) {
        let Some(mut rx) = self.exit.take() else { return };
        let _ = self.kill();
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < until {
            match rx.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                _ => break,
            }
        }
    }
}
