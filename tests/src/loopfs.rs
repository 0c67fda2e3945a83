//! A scratch btrfs on a loop device: what `wasnap conformance --driver btrfs` and the
//! tests use when no btrfs directory is at hand.
//!
//! Each one has its own sparse image and its own loop device, so several can exist at
//! once. Dropping it unmounts the filesystem, detaches the device and deletes the image,
//! also when a test panicked. It shells out to `mkfs.btrfs` and `losetup`, which only
//! set the scratch filesystem up; the btrfs driver itself uses ioctls.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use tempfile::TempDir;
use wasnap::Mount;

/// A mounted btrfs on a loop device over a sparse image file.
#[derive(Debug)]
pub struct LoopBtrfs {
    /// Where the filesystem is mounted.
    pub mountpoint: PathBuf,
    /// The loop device (`/dev/loopN`); empty until attached.
    pub device: String,
    /// Holds the image, the mount point and scratch directories beside them.
    dir: TempDir,
    mounted: bool,
}

/// `losetup --find` picks a free device and then claims it; two threads doing it at once
/// can pick the same one. Other processes are handled by retrying.
static ATTACH: Mutex<()> = Mutex::new(());

fn run(tool: &Path, args: &[&std::ffi::OsStr]) -> Result<String, String> {
    let out = Command::new(tool)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", tool.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} {:?} failed ({}): {}",
            tool.display(),
            args,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Finds `name` on `PATH` or in the sbin directories, which a non-login PATH may lack.
fn tool(name: &str) -> Result<PathBuf, String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("{name} is not installed"))
}

impl LoopBtrfs {
    /// Makes, attaches and mounts a fresh btrfs of `size_mib` MiB, its image in a new
    /// directory under `base` (put it on a real disk), or says why it cannot.
    pub fn try_new(size_mib: u64, base: &Path) -> Result<LoopBtrfs, String> {
        if !rustix::process::geteuid().is_root() {
            return Err("needs root to attach a loop device and mount btrfs".into());
        }
        let losetup = tool("losetup")?;
        let mkfs = tool("mkfs.btrfs")?;
        if !Path::new("/dev/loop-control").exists() && !Path::new("/dev/loop0").exists() {
            return Err("no loop devices (/dev/loop-control is missing)".into());
        }
        let dir = tempfile::Builder::new()
            .prefix("wasnap-btrfs-")
            .tempdir_in(base)
            .map_err(|e| format!("temporary directory: {e}"))?;
        let image = dir.path().join("btrfs.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(size_mib << 20))
            .map_err(|e| format!("create {}: {e}", image.display()))?;
        run(&mkfs, &["-q".as_ref(), image.as_os_str()])?;
        let mountpoint = dir.path().join("mnt");
        std::fs::create_dir(&mountpoint).map_err(|e| format!("mkdir: {e}"))?;
        // From here on, dropping `fs` undoes whatever was done.
        let mut fs = LoopBtrfs { mountpoint, device: String::new(), dir, mounted: false };
        fs.device = attach(&losetup, &image)?;
        let mount = Mount {
            kind: "btrfs".into(),
            source: fs.device.clone(),
            target: String::new(),
            options: Vec::new(),
        };
        wasnap::mount::mount_all(&[mount], &fs.mountpoint)
            .map_err(|e| format!("mount btrfs from {}: {e}", fs.device))?;
        fs.mounted = true;
        Ok(fs)
    }

    /// A fresh directory beside the mount point (not on the btrfs), e.g. to mount a
    /// snapshot on or to keep a metadata database in.
    pub fn scratch(&self, name: &str) -> std::io::Result<PathBuf> {
        let p = self.dir.path().join(name);
        std::fs::create_dir_all(&p)?;
        Ok(p)
    }
}

fn attach(losetup: &Path, image: &Path) -> Result<String, String> {
    let _one_at_a_time = ATTACH.lock().unwrap_or_else(|e| e.into_inner());
    let mut last = String::new();
    for attempt in 0..5 {
        match run(losetup, &["--find".as_ref(), "--show".as_ref(), image.as_os_str()]) {
            Ok(device) if device.starts_with("/dev/") => return Ok(device),
            Ok(other) => return Err(format!("losetup printed {other:?}, not a device")),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(100 * (attempt + 1)));
    }
    Err(last)
}

/// Mount points at or below `dir`, deepest first, from /proc/self/mountinfo.
fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return Vec::new() };
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

impl Drop for LoopBtrfs {
    fn drop(&mut self) {
        // A test that failed may have left a snapshot mounted on the filesystem, which
        // would keep the device busy: undo every mount below our directory first.
        for p in mounts_below(self.dir.path()) {
            if p != self.mountpoint && wasnap::mount::unmount(&p).is_err() {
                let _ = wasnap::mount::detach(&p);
            }
        }
        // Errors are printed, not raised: panicking here while a failed test unwinds
        // would abort the whole test binary.
        if self.mounted
            && let Err(e) = wasnap::mount::unmount(&self.mountpoint)
        {
            eprintln!("unmount {}: {e}; detaching it lazily", self.mountpoint.display());
            let _ = wasnap::mount::detach(&self.mountpoint);
        }
        if !self.device.is_empty() {
            let detached =
                tool("losetup").and_then(|l| run(&l, &["--detach".as_ref(), self.device.as_ref()]));
            if let Err(e) = detached {
                eprintln!("detach {}: {e}", self.device);
            }
        }
        // The TempDir field then deletes the image and the directories.
    }
}
