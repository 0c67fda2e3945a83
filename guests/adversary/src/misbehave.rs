//! The misbehaviours themselves.

use std::hint::black_box;
use std::io::{self, Write};
use std::sync::{Mutex, PoisonError};

use crate::bindings::wasnap::snapshotter::types::{Info, Kind, Mount, Timestamp};
use crate::config::{self, Mode, Walk};

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
        Mode::Hog => hog(),
        Mode::Panic => panic!("adversary: deliberate panic in {}", call.name),
        Mode::Stdout(bytes) => noise(bytes),
        Mode::Good | Mode::Escape | Mode::HugeWalk(_) | Mode::SlowInit | Mode::BadInit => {}
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

/// The escapes mode `escape` tries, chosen by how the key ends.
const ESCAPES: [&str; 11] = [
    "abs", "dotdot", "symlink", "type", "option", "suid", "dev", "inject", "target", "devsrc",
    "workdir",
];

/// Replaces the good mounts of a snapshot by one that tries to leave the root, picked
/// by the end of `key`; a key that names no escape keeps its good mounts.
pub fn escape(key: &str, good: Vec<Mount>) -> Vec<Mount> {
    let Some(escape) = ESCAPES.iter().find(|escape| key.ends_with(*escape)) else {
        return good;
    };
    let Some(template) = good.first().cloned() else {
        return good;
    };
    let bind = |source: &str| Mount { source: source.to_owned(), ..template.clone() };
    let with_options = |extra: &[&str]| {
        let mut mount = template.clone();
        mount.options.extend(extra.iter().map(|o| (*o).to_owned()));
        mount
    };
    let overlay = |options: String| Mount {
        type_: "overlay".to_owned(),
        source: "overlay".to_owned(),
        target: String::new(),
        options: vec![options],
    };
    let mount = match *escape {
        "abs" => bind("/etc"),
        "dotdot" => bind("../../etc"),
        "symlink" => {
            make_outward_link();
            bind("link/etc")
        }
        "type" => Mount {
            type_: "proc".to_owned(),
            source: "proc".to_owned(),
            target: String::new(),
            options: Vec::new(),
        },
        "option" => with_options(&["suid", "dev"]),
        "suid" => with_options(&["suid"]),
        "dev" => with_options(&["dev"]),
        // A comma inside a value smuggles a second option past a naive check.
        "inject" => overlay(format!("lowerdir={},upperdir=/etc", template.source)),
        "workdir" => overlay(format!(
            "lowerdir={},upperdir={},workdir=../../tmp",
            template.source, template.source
        )),
        "target" => Mount { target: "../../x".to_owned(), ..template.clone() },
        "devsrc" => bind("snap/../../../dev"),
        _ => template.clone(),
    };
    vec![mount]
}

/// Creates `/link` pointing out of the root. WASI implementations may refuse an absolute
/// target, so a chain of `..` that reaches the host's `/` from any depth is the
/// fallback. Failures are ignored: then `link/etc` simply does not exist, which the host
/// must refuse as well.
fn make_outward_link() {
    let deep_parent = [".."; 32].join("/");
    for target in ["/", deep_parent.as_str()] {
        match symlink(target, "/link") {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return,
            Err(_) => {}
        }
    }
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

    #[test]
    fn escapes_follow_the_key() {
        let good = vec![Mount {
            type_: "bind".to_owned(),
            source: "snap/0/fs".to_owned(),
            target: String::new(),
            options: vec!["rbind".to_owned(), "rw".to_owned()],
        }];
        let escaped = |key: &str| escape(key, good.clone()).remove(0);
        assert_eq!(escaped("ns/1/abs").source, "/etc");
        assert_eq!(escaped("ns/1/dotdot").source, "../../etc");
        assert_eq!(escaped("ns/1/devsrc").source, "snap/../../../dev");
        assert_eq!(escaped("ns/1/type").type_, "proc");
        assert_eq!(escaped("ns/1/target").target, "../../x");
        assert_eq!(escaped("ns/1/dev").options, ["rbind", "rw", "dev"]);
        assert_eq!(escaped("ns/1/inject").options, ["lowerdir=snap/0/fs,upperdir=/etc"]);
        assert_eq!(escaped("ns/1/plain").source, "snap/0/fs");
    }
}
