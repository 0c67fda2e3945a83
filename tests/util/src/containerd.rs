//! A containerd of our own, for the end-to-end tests and the side-by-side benchmark:
//! started from the distribution's binary with its own config, root, state and socket
//! in a directory we choose, with wasnap daemons as proxy snapshotters. It is stopped
//! (by its pid, never by name) when dropped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use wasnap::Context;
use wasnap::{Error, Result};

/// Where containerd is looked for, in order, if `WASNAP_CONTAINERD` does not say.
const CANDIDATES: &[&str] = &["/usr/bin/containerd", "/usr/local/bin/containerd"];

/// The containerd binary, if this machine has one (`WASNAP_CONTAINERD` overrides).
pub fn binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("WASNAP_CONTAINERD") {
        return Some(PathBuf::from(p));
    }
    CANDIDATES.iter().map(PathBuf::from).find(|p| p.is_file())
}

/// `ctr`, next to containerd.
pub fn ctr_binary() -> Option<PathBuf> {
    let ctr = binary()?.with_file_name("ctr");
    ctr.is_file().then_some(ctr)
}

/// A running containerd, stopped when dropped.
#[derive(Debug)]
pub struct Containerd {
    child: Option<Child>,
    dir: PathBuf,
    address: PathBuf,
}

impl Containerd {
    /// Starts containerd with everything under `dir` (which must exist): `config.toml`,
    /// `root/`, `state/`, `containerd.sock`, `containerd.log`. Each entry of `proxies`
    /// is a proxy snapshotter: its name in containerd, and the wasnap socket serving it.
    /// The CRI plugin is disabled. Waits until containerd answers.
    pub fn start(dir: &Path, proxies: &BTreeMap<String, PathBuf>) -> Result<Containerd> {
        let bin = binary().ok_or_else(|| {
            Error::not_found("containerd is not installed (apt-get install containerd)")
        })?;
        let address = dir.join("containerd.sock");
        let mut config = format!(
            "version = 2\nroot = {root:?}\nstate = {state:?}\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\n[grpc]\n  address = {address:?}\n\n",
            root = dir.join("root"),
            state = dir.join("state"),
        );
        for (name, socket) in proxies {
            config.push_str(&format!(
                "[proxy_plugins.{name:?}]\n  type = \"snapshot\"\n  address = {socket:?}\n\n"
            ));
        }
        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, config).with_context(|| "write containerd config")?;
        let log = std::fs::File::create(dir.join("containerd.log"))
            .with_context(|| "create containerd log")?;
        let err = log.try_clone().with_context(|| "containerd log")?;
        let child = Command::new(&bin)
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let mut c = Containerd { child: Some(child), dir: dir.to_path_buf(), address };
        c.wait_ready(Duration::from_secs(30))?;
        Ok(c)
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        let started = Instant::now();
        loop {
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(Error::internal(format!(
                    "containerd exited at start ({status}); its log: {}",
                    self.log_tail()
                )));
            }
            if self.address.exists() && self.ctr(&["version"]).is_ok_and(|o| o.status.success()) {
                return Ok(());
            }
            if started.elapsed() > limit {
                return Err(Error::unavailable(format!(
                    "containerd did not answer within {limit:?}; its log: {}",
                    self.log_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The socket containerd serves on (its snapshots service, too).
    pub fn address(&self) -> &Path {
        &self.address
    }

    /// The directory everything is in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The containerd process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Runs `ctr --address <ours> ARGS…` and returns what it did (a failure to start
    /// ctr is an error; a failing ctr is not: look at the status).
    pub fn ctr(&self, args: &[&str]) -> Result<Output> {
        let ctr = ctr_binary().ok_or_else(|| Error::not_found("ctr is not installed"))?;
        Command::new(ctr)
            .arg("--address")
            .arg(&self.address)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| "run ctr")
    }

    /// The last lines of containerd's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Stops containerd: SIGTERM, then SIGKILL after 10 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.stop();
    }
}
