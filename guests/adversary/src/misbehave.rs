//! The misbehaviours themselves.

use std::hint::black_box;
use std::io::{self, Write};
use std::sync::{Mutex, PoisonError};

use crate::bindings::wasnap::snapshotter::types::{
    BindMount, Error, Info, Kind, Mount, OverlayFlags, OverlayMount, Timestamp,
};
use crate::bindings::wasnap::snapshotter::{kv, layers};
use crate::config::{self, Mode, Op, Walk};

/// One snapshotter call: its name and the keys or names it was given.
#[derive(Clone, Copy, Debug)]
pub struct Call<'a> {
    name: &'static str,
    keys: [Option<&'a str>; 2],
}

impl<'a> Call<'a> {
    pub fn new(name: &'static str, keys: &[&'a str]) -> Self {
        Self { name, keys: [keys.first().copied(), keys.get(1).copied()] }
    }

    /// Whether the configuration's `only` (if any) picks this call. A call without a
    /// key (`list`, `cleanup`) is picked only when there is no `only`.
    pub fn targeted(&self) -> bool {
        match config::get().only {
            None => true,
            Some(only) => self.keys.iter().flatten().any(|key| key.contains(only.as_str())),
        }
    }
}

/// What every mode does at the start of a snapshotter call, before the real work.
pub fn common(call: Call<'_>) {
    let mode = config::get().mode;
    if !call.targeted() {
        return;
    }
    match mode {
        Mode::Spin => spin(),
        Mode::Sleep => sleep(),
        Mode::Hog => hog(),
        Mode::Panic => panic!("adversary: deliberate panic in {}", call.name),
        Mode::Stdout(bytes) => noise(bytes),
        Mode::Good
        | Mode::BadMount
        | Mode::HugeWalk(_)
        | Mode::SlowInit
        | Mode::SleepInit
        | Mode::BadInit
        | Mode::FloodError(_)
        | Mode::FdBomb
        | Mode::DiskBomb
        | Mode::HugeUsage
        | Mode::Hammer(..)
        | Mode::Ancestors => {}
    }
}

/// Waits for ever, in the host: `std::thread::sleep` subscribes to the monotonic clock
/// and blocks on the timer. Only a host whose timers end with the call can stop it.
pub fn sleep() -> ! {
    loop {
        std::thread::sleep(std::time::Duration::MAX);
    }
}

/// Never returns and never yields: only the host's deadline can stop it.
pub fn spin() -> ! {
    let mut turns: u64 = 0;
    loop {
        // black_box keeps the optimiser from proving the loop useless.
        turns = black_box(turns.wrapping_add(1));
    }
}

/// Allocates and writes 1 MiB after 1 MiB, keeping all of it, until the host's memory
/// cap (or the allocator's failure, which aborts) ends the call.
pub fn hog() -> ! {
    static HOARD: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
    let mut hoard = HOARD.lock().unwrap_or_else(PoisonError::into_inner);
    loop {
        // A non-zero fill so every page is written, not just reserved.
        hoard.push(black_box(vec![0xa5; 1 << 20]));
    }
}

/// Writes `bytes` bytes to stdout as short lines and as many to stderr as one long line,
/// so the host has to bound both the volume and the length of a line.
fn noise(bytes: usize) {
    const LINE: &[u8] = b"adversary: stdout noise; the host must bound and log this\n";
    let mut chunk = Vec::with_capacity(64 << 10);
    while chunk.len() + LINE.len() <= chunk.capacity() {
        chunk.extend_from_slice(LINE);
    }
    // Errors are ignored: a host that closed our output has bounded it.
    let _ = write_repeated(&mut io::stdout().lock(), &chunk, bytes);
    let long = vec![b'x'; 64 << 10];
    let mut stderr = io::stderr().lock();
    let _ = write_repeated(&mut stderr, &long, bytes).and_then(|()| stderr.write_all(b"\n"));
}

fn write_repeated(out: &mut impl Write, chunk: &[u8], bytes: usize) -> io::Result<()> {
    let mut left = bytes;
    while left > 0 {
        let part = chunk.get(..left.min(chunk.len())).unwrap_or(chunk);
        out.write_all(part)?;
        left -= part.len();
    }
    out.flush()
}

/// The mounts mode `bad-mount` returns, chosen by how the key ends; each breaks one rule
/// the host must enforce. `own` is the snapshot's own (good) layer.
pub fn bad_mount(key: &str, own: u64, good: Vec<Mount>) -> Vec<Mount> {
    let overlay = |lowers: Vec<u64>, upper: Option<u64>| {
        Mount::Overlay(OverlayMount { lowers, upper, flags: OverlayFlags::INDEX_OFF })
    };
    if key.ends_with("foreign") {
        // A layer this plugin never held (another snapshotter's, say).
        vec![Mount::Bind(BindMount { layer: 999_999_999, readonly: false })]
    } else if key.ends_with("twice") {
        vec![overlay(vec![own], Some(own))]
    } else if key.ends_with("passed") {
        // A backend has no next snapshotter to pass a mount from.
        vec![Mount::Passed(0)]
    } else if key.ends_with("deep") {
        vec![overlay(vec![own; 501], None)]
    } else if key.ends_with("removed") {
        let gone = layers::create(None).unwrap_or(own);
        let _ = layers::remove(gone);
        vec![Mount::Bind(BindMount { layer: gone, readonly: true })]
    } else if key.ends_with("writable") {
        // Writable whatever the snapshot's kind: the metadata layer refuses it for a view.
        vec![Mount::Bind(BindMount { layer: own, readonly: false })]
    } else if key.ends_with("many") {
        (0..100).map(|_| Mount::Bind(BindMount { layer: own, readonly: true })).collect()
    } else {
        good
    }
}

/// An error message `bytes` long with forged log lines in it.
pub fn flood_error(bytes: usize) -> Error {
    // Claims to be another plugin's error, as a policy passing one on would return it.
    let mut text = String::from(
        "plugin \"native\": adversary failed\n2026-12-04T00:00:00.000000Z ERROR wasnap::root: forged: the host is compromised\r\x1b[2K",
    );
    while text.len() < bytes {
        text.push_str("\nflood ");
    }
    Error::Internal(text)
}

/// Opens files in the private directory, keeping them open, until the host refuses;
/// says how many it got.
pub fn fd_bomb() -> Error {
    static KEPT: Mutex<Vec<std::fs::File>> = Mutex::new(Vec::new());
    let mut kept = KEPT.lock().unwrap_or_else(PoisonError::into_inner);
    for i in 0..1_000_000u32 {
        match std::fs::File::create(format!("/bomb-{}", i % 4)) {
            Ok(f) => kept.push(f),
            Err(e) => {
                return Error::FailedPrecondition(format!(
                    "fd-bomb: opened {} then: {e}",
                    kept.len()
                ));
            }
        }
    }
    Error::Internal(format!("fd-bomb: opened {} files and nothing stopped it", kept.len()))
}

/// Fills the private directory each way WASI has to write it: through a stream (what
/// `std::fs` uses), through `descriptor.write` (`pwrite`), one byte a block, and with
/// new directories, each until refused and then removed (waiting before each for
/// the host to find the room again); tries a hard link; then writes 1 MiB again.
/// Says how far each got and how it was refused.
pub fn disk_bomb() -> Error {
    const CHUNK: usize = 1 << 16;
    // Far past any budget the tests set, and still a bounded write without one.
    const MAX: u64 = 64 << 20;
    let chunk = vec![0x5a_u8; CHUNK];
    let refused = |e: std::io::Error| format!("{:?}", e.kind());
    // Each way starts once the host has measured what the last one left: after a
    // refusal the host measures again only when some time has passed.
    let wait_for_room = || {
        for _ in 0..250 {
            if std::fs::write("/probe", b"x").is_ok() {
                let _ = std::fs::remove_file("/probe");
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };

    wait_for_room();
    let mut streamed = 0u64;
    let stream_end = match std::fs::File::create("/fill-stream") {
        Err(e) => refused(e),
        Ok(mut f) => loop {
            if streamed >= MAX {
                break "not refused".to_owned();
            }
            match f.write_all(&chunk) {
                Ok(()) => streamed += CHUNK as u64,
                Err(e) => break refused(e),
            }
        },
    };
    let _ = std::fs::remove_file("/fill-stream");

    wait_for_room();
    let mut written = 0u64;
    let pwrite_end = match std::fs::File::create("/fill-pwrite") {
        Err(e) => refused(e),
        Ok(f) => loop {
            if written >= MAX {
                break "not refused".to_owned();
            }
            match pwrite(&f, &chunk, written) {
                Ok(n) => written += n as u64,
                Err(e) => break refused(e),
            }
        },
    };
    let _ = std::fs::remove_file("/fill-pwrite");

    // One byte a block: few bytes, many blocks.
    wait_for_room();
    let mut scattered = 0u64;
    let scattered_end = match std::fs::File::create("/fill-scattered") {
        Err(e) => refused(e),
        Ok(f) => loop {
            if scattered * 4096 >= MAX {
                break "not refused".to_owned();
            }
            match pwrite(&f, b"x", scattered * 4096) {
                Ok(_) => scattered += 1,
                Err(e) => break refused(e),
            }
        },
    };
    let _ = std::fs::remove_file("/fill-scattered");

    // A name that takes no blocks of its own.
    wait_for_room();
    let link_end = match std::fs::write("/linked", b"x")
        .and_then(|()| std::fs::hard_link("/linked", "/link"))
    {
        Ok(()) => "not refused".to_owned(),
        Err(e) => refused(e),
    };
    let _ = std::fs::remove_file("/link");
    let _ = std::fs::remove_file("/linked");

    wait_for_room();
    let mut dirs = 0u32;
    let dirs_end = loop {
        if dirs >= 20_000 {
            break "not refused".to_owned();
        }
        match std::fs::create_dir(format!("/d-{dirs}")) {
            Ok(()) => dirs += 1,
            Err(e) => break refused(e),
        }
    };
    for i in 0..dirs {
        let _ = std::fs::remove_dir(format!("/d-{i}"));
    }

    wait_for_room();
    let after = match std::fs::write("/after", vec![1u8; 1 << 20]) {
        Ok(()) => "ok".to_owned(),
        Err(e) => refused(e),
    };
    let _ = std::fs::remove_file("/after");
    Error::FailedPrecondition(format!(
        "disk-bomb: stream {streamed} ({stream_end}); pwrite {written} ({pwrite_end}); scattered {scattered} ({scattered_end}); link 0 ({link_end}); dirs {dirs} ({dirs_end}); after {after}"
    ))
}

/// `pwrite(2)`: one `descriptor.write` of `buf` at `offset`.
#[allow(unsafe_code)]
fn pwrite(file: &std::fs::File, buf: &[u8], offset: u64) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let offset = i64::try_from(offset).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // SAFETY: `buf` is valid for `buf.len()` bytes and the descriptor is `file`'s,
    // open for as long as this borrow.
    let n = unsafe { libc::pwrite(file.as_raw_fd(), buf.as_ptr().cast(), buf.len(), offset) };
    usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
}

/// The key-value key holding the victim layer's id (written by a `prepare` whose key
/// contains `victim`, read by the attacks).
pub const VICTIM: &str = "victim-layer";

/// Calls `op` on the victim layer `n` times, going on past refusals; says how many calls
/// succeeded, how many were refused, and the last refusal.
pub fn hammer(op: Op, n: u32) -> Result<(u32, u32, Option<Error>), Error> {
    let layer = victim()?;
    let target = config::get().target.unwrap_or_else(|| "../../../../../../../../sentinel".into());
    let target = target.as_str();
    let (mut ok, mut refused, mut last) = (0, 0, None);
    for i in 0..n {
        let r = match op {
            Op::ReadDir => layers::read_dir(layer, "victim").map(drop),
            Op::ReadFile => layers::read_file(layer, "victim").map(drop),
            Op::WriteFile => layers::write_file(layer, "victim", b"written through", 0o777),
            Op::MakeDir => layers::make_dir(layer, "victim/sub", 0o777),
            Op::Symlink => layers::symlink(layer, "victim/link", target),
            Op::RemoveEntry => layers::remove_entry(layer, "victim/x"),
            Op::SetMode => layers::set_mode(layer, "victim", 0o6777),
            Op::SetOwner => layers::set_owner(layer, "victim", 4242, 4242),
            Op::SetXattr => layers::set_xattr(layer, "victim", "user.adversary", b"owned"),
            Op::GetXattr => layers::get_xattr(layer, "victim", "user.x").map(drop),
            Op::MakeWhiteout => layers::make_whiteout(layer, "victim/wh"),
            Op::Clone => layers::clone(layer).and_then(layers::remove),
            Op::Hoard => layers::clone(layer).map(drop),
            Op::Usage => layers::usage(layer).map(drop),
            Op::Swap => {
                // What a second instance racing a clone or a chmod does inside the layer.
                let _ = layers::remove_entry(layer, "victim");
                let r = layers::symlink(layer, "victim", target);
                let _ = layers::remove_entry(layer, "victim");
                let _ = if i % 2 == 0 {
                    layers::make_whiteout(layer, "victim")
                } else {
                    layers::write_file(layer, "victim", b"plain", 0o600)
                };
                r
            }
        };
        match r {
            Ok(()) => ok += 1,
            Err(e) => {
                refused += 1;
                last = Some(e);
            }
        }
    }
    Ok((ok, refused, last))
}

fn victim() -> Result<u64, Error> {
    let entry = kv::get(VICTIM)?.ok_or_else(|| Error::NotFound("no victim layer yet".into()))?;
    let bytes: [u8; 8] = entry.value.try_into().map_err(|_| Error::Internal("victim id".into()))?;
    Ok(u64::from_le_bytes(bytes))
}

/// Records `layer` as the victim of the attacks.
pub fn set_victim(layer: u64) -> Result<(), Error> {
    let put = kv::Write::Put((VICTIM.to_owned(), layer.to_le_bytes().to_vec()));
    kv::commit(&[], &[put]).map(drop)
}

/// Tries every way it has to reach above a layer or above its private directory; every
/// one must fail or stay inside. Returns what succeeded that must not have.
pub fn ancestors() -> Result<Vec<String>, Error> {
    let layer = victim()?;
    let mut broke = Vec::new();
    let mut must_fail = |what: &str, ok: bool| {
        if ok {
            broke.push(what.to_owned());
        }
    };
    // Through the layer's functions: the layer's root and anything above it.
    must_fail("remove-entry .", layers::remove_entry(layer, ".").is_ok());
    for path in ["..", "../x", "/x", "a/../../x", "../../../../etc/passwd"] {
        must_fail(
            &format!("write-file {path}"),
            layers::write_file(layer, path, b"x", 0o644).is_ok(),
        );
        must_fail(&format!("make-dir {path}"), layers::make_dir(layer, path, 0o755).is_ok());
        must_fail(&format!("remove-entry {path}"), layers::remove_entry(layer, path).is_ok());
        must_fail(&format!("set-mode {path}"), layers::set_mode(layer, path, 0o777).is_ok());
    }
    // A symlink inside the layer pointing up: never followed by the host.
    let _ = layers::symlink(layer, "up", "../../../..");
    for path in ["up/x", "up/etc/passwd", "up/.."] {
        must_fail(
            &format!("write-file {path}"),
            layers::write_file(layer, path, b"x", 0o644).is_ok(),
        );
        must_fail(&format!("read-file {path}"), layers::read_file(layer, path).is_ok());
        must_fail(&format!("set-owner {path}"), layers::set_owner(layer, path, 1, 1).is_ok());
    }
    // Through WASI: the private directory's parent, by name and through a symlink.
    must_fail("wasi list /..", std::fs::metadata("/../layers").is_ok());
    must_fail("wasi rename / away", std::fs::rename("/", "/moved").is_ok());
    let _ = symlink("../../..", "/up");
    must_fail("wasi read through /up", std::fs::read_dir("/up/layers").is_ok());
    must_fail("wasi write through /up", std::fs::write("/up/x", b"x").is_ok());
    // Layers it does not hold.
    let other = layers::create(None)?;
    layers::remove(other)?;
    must_fail("remove a removed layer", layers::remove(other).is_ok());
    must_fail("remove a layer never made", layers::remove(u64::MAX).is_ok());
    Ok(broke)
}

/// `std::os::wasi::fs::symlink_path` is still unstable; the deprecated portable function
/// is the one stable way to make a symlink from a WASI guest.
#[allow(deprecated)]
fn symlink(target: &str, link: &str) -> io::Result<()> {
    std::fs::soft_link(target, link)
}

/// Where the backwards walk of `Walk::Unordered` starts.
const UNORDERED_START: u64 = 1_000_000_000_000_000;

/// A page of `list` as mode `huge-walk` gets it wrong.
pub fn walk(walk: Walk, after: Option<&str>, limit: u32) -> Vec<Info> {
    let after = after.and_then(|name| name.strip_prefix("walk-")?.parse::<u64>().ok());
    let limit = u64::from(limit);
    let numbers: Vec<u64> = match walk {
        Walk::Huge(count) => (0..u64::from(count)).collect(),
        Walk::Endless => {
            let start = after.map_or(0, |n| n + 1);
            (start..start + limit).collect()
        }
        Walk::Unordered => {
            // Each page lies wholly before the `after` the host asked from.
            let start = after.map_or(UNORDERED_START, |n| n.saturating_sub(2 * limit));
            (start..start + limit).collect()
        }
        Walk::Descending => {
            let start = after.map_or(0, |n| n + 1);
            (start..start + limit).rev().collect()
        }
    };
    numbers.into_iter().map(walk_info).collect()
}

/// A made-up committed snapshot; zero-padded so byte order is numeric order.
fn walk_info(n: u64) -> Info {
    let epoch = Timestamp { seconds: 0, nanoseconds: 0 };
    Info {
        name: format!("walk-{n:020}"),
        parent: None,
        kind: Kind::Committed,
        labels: Vec::new(),
        created: epoch,
        updated: epoch,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(page: &[Info]) -> Vec<&str> {
        page.iter().map(|info| info.name.as_str()).collect()
    }

    #[test]
    fn walks_go_wrong_as_asked() {
        assert_eq!(walk(Walk::Huge(7), None, 2).len(), 7);
        let first = walk(Walk::Endless, None, 3);
        let last = first.last().map(|info| info.name.clone());
        let second = walk(Walk::Endless, last.as_deref(), 3);
        assert_eq!(second.len(), 3);
        assert!(names(&first) < names(&second));
        let first = walk(Walk::Unordered, None, 3);
        let after = first.last().map(|info| info.name.clone()).unwrap();
        assert!(walk(Walk::Unordered, Some(&after), 3).iter().all(|info| info.name < after));
        let page = walk(Walk::Descending, None, 3);
        assert!(names(&page).windows(2).all(|pair| pair[0] > pair[1]));
    }
}
