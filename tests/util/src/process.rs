//! A `wasnap daemon` child process, for the end-to-end tests and the benchmark:
//! started with a config, root and socket we choose, ready once the socket answers,
//! stopped by its pid (SIGKILL) when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rustix::process::Signal;
use wasnap::Context;
use wasnap::{Error, Result};

/// A running `wasnap daemon`.
#[derive(Debug)]
pub struct DaemonProcess {
    child: Option<Child>,
    exe: PathBuf,
    config: PathBuf,
    root: PathBuf,
    socket: PathBuf,
    log: PathBuf,
}

impl DaemonProcess {
    /// Starts `exe daemon` (the `wasnap` binary) with everything in `dir`: the config
    /// (`config` is written to `dir/wasnap.toml`), `wasnap-root/`, `wasnap.sock` and
    /// the log `wasnap.log`. Returns once the socket answers.
    pub fn start(exe: &Path, dir: &Path, config: &str) -> Result<DaemonProcess> {
        let path = dir.join("wasnap.toml");
        std::fs::write(&path, config).with_context(|| "write daemon config")?;
        let mut d = DaemonProcess {
            child: None,
            exe: exe.to_path_buf(),
            config: path,
            root: dir.join("wasnap-root"),
            socket: dir.join("wasnap.sock"),
            log: dir.join("wasnap.log"),
        };
        d.spawn()?;
        Ok(d)
    }

    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts the process again (after [`DaemonProcess::signal`]) on the same root and
    /// socket; returns once the socket answers.
    pub fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .context("open the daemon log")?;
        let err = log.try_clone().context("open the daemon log")?;
        let child = Command::new(&self.exe)
            .arg("--config")
            .arg(&self.config)
            .arg("--root")
            .arg(&self.root)
            .arg("daemon")
            .arg("--socket")
            .arg(&self.socket)
            .env("WASNAP_LOG", std::env::var("WASNAP_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .context("start wasnap daemon")?;
        let child = self.child.insert(child);
        let started = Instant::now();
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(Error::internal(format!(
                    "wasnap daemon exited at start ({status}):\n{}",
                    self.log_tail()
                )));
            }
            if started.elapsed() > Duration::from_secs(120) {
                return Err(Error::unavailable(format!(
                    "wasnap daemon did not listen within 2 minutes:\n{}",
                    self.log_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Sends `sig` and waits for the process to exit.
    pub fn signal(&mut self, sig: Signal) -> Result<ExitStatus> {
        let mut child =
            self.child.take().ok_or_else(|| Error::failed_precondition("not running"))?;
        if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
            rustix::process::kill_process(pid, sig).with_context(|| "signal the daemon")?;
        }
        child.wait().with_context(|| "wait for the daemon")
    }

    /// Sends `sig` (SIGHUP, say) and returns at once.
    pub fn send(&self, sig: Signal) -> Result<()> {
        let child = self.child.as_ref().ok_or_else(|| Error::failed_precondition("not running"))?;
        let pid = rustix::process::Pid::from_raw(child.id() as i32)
            .ok_or_else(|| Error::internal("no pid"))?;
        rustix::process::kill_process(pid, sig).with_context(|| "signal the daemon")
    }

    /// The socket it serves on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Its root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
