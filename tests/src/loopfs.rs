//! A scratch filesystem on a loop device: the btrfs `wasnap conformance --driver btrfs`
//! and the tests use when no btrfs directory is at hand, and the small ext4 the tests
//! and the soak fill up to see what a full disk does.
//!
//! Each one has its own sparse image and its own loop device, so several can exist at
//! once. Dropping it unmounts the filesystem, detaches the device and deletes the image,
//! also when a test panicked. It shells out to `mkfs.<fs>` and `losetup`, which only
//! set the scratch filesystem up; the btrfs driver itself uses ioctls.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use tempfile::TempDir;
use wasnap::Mount;

/// A mounted btrfs on a loop device over a sparse image file.
pub type LoopBtrfs = LoopFs;

/// A mounted filesystem on a loop device over a sparse image file.
#[derive(Debug)]
pub struct LoopFs {
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

impl LoopFs {
    /// Makes, attaches and mounts a fresh btrfs of `size_mib` MiB, its image in a new
    /// directory under `base` (put it on a real disk), or says why it cannot.
    pub fn try_new(size_mib: u64, base: &Path) -> Result<LoopFs, String> {
        LoopFs::try_new_of("btrfs", size_mib, base)
    }

    /// As [`LoopFs::try_new`], with a filesystem of type `fs`: `btrfs` or `ext4` (made
    /// without blocks reserved for root, so that filling it fills it for everyone).
    pub fn try_new_of(fs: &str, size_mib: u64, base: &Path) -> Result<LoopFs, String> {
        let options: &[&str] = match fs {
            "btrfs" => &["-q"],
            "ext4" => &["-q", "-F", "-m", "0"],
            other => return Err(format!("no scratch filesystem of type {other:?}")),
        };
        if !rustix::process::geteuid().is_root() {
            return Err(format!("needs root to attach a loop device and mount {fs}"));
        }
        let losetup = tool("losetup")?;
        let mkfs = tool(&format!("mkfs.{fs}"))?;
        if !Path::new("/dev/loop-control").exists() && !Path::new("/dev/loop0").exists() {
            return Err("no loop devices (/dev/loop-control is missing)".into());
        }
        let dir = tempfile::Builder::new()
            .prefix(&format!("wasnap-{fs}-"))
            .tempdir_in(base)
            .map_err(|e| format!("temporary directory: {e}"))?;
        let image = dir.path().join(format!("{fs}.img"));
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(size_mib << 20))
            .map_err(|e| format!("create {}: {e}", image.display()))?;
        let mut args: Vec<&std::ffi::OsStr> = options.iter().map(|o| o.as_ref()).collect();
        args.push(image.as_os_str());
        run(&mkfs, &args)?;
        let mountpoint = dir.path().join("mnt");
        std::fs::create_dir(&mountpoint).map_err(|e| format!("mkdir: {e}"))?;
        // From here on, dropping `fs` undoes whatever was done.
        let mut loopfs = LoopFs { mountpoint, device: String::new(), dir, mounted: false };
        loopfs.device = attach(&losetup, &image)?;
        let mount = Mount {
            kind: fs.into(),
            source: loopfs.device.clone(),
            target: String::new(),
            options: Vec::new(),
        };
        wasnap::mount::mount_all(&[mount], &loopfs.mountpoint)
            .map_err(|e| format!("mount {fs} from {}: {e}", loopfs.device))?;
        loopfs.mounted = true;
        Ok(loopfs)
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

impl Drop for LoopFs {
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

/// A file that takes every free block of a filesystem, so that it is full; deleted when
/// dropped.
#[derive(Debug)]
pub struct Ballast {
    path: PathBuf,
    /// Bytes it took.
    pub bytes: u64,
}

impl Ballast {
    /// Fills the filesystem of `dir` with a new file `name` in it (preallocated in ever
    /// smaller pieces until not even one block is left).
    pub fn fill(dir: &Path, name: &str) -> std::io::Result<Ballast> {
        use rustix::fs::{FallocateFlags, fallocate, fstatvfs};
        let path = dir.join(name);
        let file = std::fs::File::create_new(&path)?;
        let mut ballast = Ballast { path, bytes: 0 };
        let st = fstatvfs(&file)?;
        let block = st.f_frsize.max(512);
        let mut piece = st.f_bavail * st.f_frsize;
        while piece >= block {
            match fallocate(&file, FallocateFlags::empty(), ballast.bytes, piece) {
                Ok(()) => ballast.bytes += piece,
                Err(rustix::io::Errno::NOSPC) => piece /= 2,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(ballast)
    }
}

impl Drop for Ballast {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            eprintln!("remove the ballast {}: {e}", self.path.display());
        }
    }
}
