//! `chaos`: a test-only policy that, at random calls, traps, hangs until the host stops
//! it, or allocates until it runs out of memory, either before passing the call on or
//! after the next snapshotter has done it. The soak (`wasnap-bench soak`) puts it in
//! front of the `copy` guest to prove that a guest dying in any of these ways, at any
//! point of a call, leaves the host's records and the backend agreeing: the call failed
//! and nothing changed, or it is reported done.
//!
//! Configuration (see README.md): `percent` of the calls named in `calls` fail with one
//! of `faults`, except calls whose key or name contains `spare`.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Deserialize;
use wasnap_sdk::{Config, Error, Info, Labels, Mount, Next, Policy, Result};

/// The calls a fault may hit by default: every call that changes something.
const CHANGES: &[&str] = &["prepare", "view", "commit", "update", "remove"];

/// When, in a call, it dies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum When {
    /// Before passing the call on: the next snapshotter never sees it.
    Before,
    /// After the next snapshotter has done it.
    After,
    /// Either, as likely.
    Either,
}

/// How a call dies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Fault {
    /// A Rust panic: the instance traps.
    Trap,
    /// Spins until the host's deadline stops it.
    Hang,
    /// Allocates until its memory limit refuses more.
    Oom,
    /// Calls its next snapshotter (a `list` of one) without end, until a call fails,
    /// and fails with that. Never picked unless named.
    Flood,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Settings {
    /// Chance of a fault per eligible call, in percent.
    percent: u64,
    /// Mixed into every roll, so two runs with one seed differ only by timing.
    seed: u64,
    /// The calls a fault may hit.
    calls: Vec<String>,
    /// The faults to pick from, each as likely.
    faults: Vec<Fault>,
    /// When in a call it dies.
    when: When,
    /// Calls whose key or name contains this are never hit (the soak's checker).
    spare: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            percent: 0,
            seed: 0,
            calls: CHANGES.iter().map(|c| (*c).to_owned()).collect(),
            faults: vec![Fault::Trap, Fault::Hang, Fault::Oom],
            when: When::Either,
            spare: None,
        }
    }
}

/// The policy: its settings, and a count of the calls this instance has seen.
#[derive(Debug)]
struct Chaos {
    settings: Settings,
    calls: AtomicU64,
}

/// What a roll decided for one call.
#[derive(Debug, Clone, Copy)]
struct Doom {
    fault: Fault,
    /// After the next snapshotter has done the call, rather than before.
    after: bool,
}

impl Chaos {
    /// Whether and how `op` on `key` dies.
    fn roll(&self, op: &str, key: &str) -> Option<Doom> {
        let s = &self.settings;
        let spared = s.spare.as_deref().is_some_and(|m| !m.is_empty() && key.contains(m));
        if s.percent == 0 || s.faults.is_empty() || spared || !s.calls.iter().any(|c| c == op) {
            return None;
        }
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        let mut r = mix(s.seed ^ mix(n) ^ fnv(op.as_bytes()) ^ fnv(key.as_bytes()));
        if r % 100 >= s.percent {
            return None;
        }
        r = mix(r);
        let fault = s.faults[(r % s.faults.len() as u64) as usize];
        let after = match s.when {
            When::Before => false,
            When::After => true,
            When::Either => (r >> 32) & 1 == 1,
        };
        Some(Doom { fault, after })
    }

    /// Runs `call` (the next snapshotter doing `op` on `key`), dying before or after it
    /// if the roll says so.
    fn around<T>(
        &self,
        next: &Next,
        op: &str,
        key: &str,
        call: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let Some(doom) = self.roll(op, key) else { return call() };
        if doom.fault == Fault::Flood {
            return Err(flood(next, op, key));
        }
        if doom.after {
            let done = call();
            die(
                doom.fault,
                op,
                key,
                if done.is_ok() { "after it succeeded" } else { "after it failed" },
            )
        } else {
            die(doom.fault, op, key, "before passing it on")
        }
    }
}

/// Dies of `fault`; never returns. It first says so on stderr, in one line the soak
/// counts in the host's log.
fn die(fault: Fault, op: &str, key: &str, when: &str) -> ! {
    let name = match fault {
        Fault::Trap => "trap",
        Fault::Hang => "hang",
        Fault::Oom => "oom",
        Fault::Flood => unreachable!("a flood returns"),
    };
    eprintln!("chaos: dying of {name} in {op} {key:?} {when}");
    match fault {
        Fault::Trap => panic!("chaos: the trap said above"),
        Fault::Hang => {
            let mut spins: u64 = 0;
            loop {
                spins = std::hint::black_box(spins.wrapping_add(1));
            }
        }
        Fault::Flood => unreachable!("a flood returns"),
        Fault::Oom => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                // Touch every page, so the memory is really taken; when the limit
                // refuses the next growth, the allocator aborts and the instance traps.
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
    }
}

/// Calls the next snapshotter until it refuses, and says how many calls it took.
fn flood(next: &Next, op: &str, key: &str) -> Error {
    eprintln!("chaos: flooding the next snapshotter in {op} {key:?}");
    let mut calls: u64 = 0;
    loop {
        match next.list(None, 1) {
            Ok(_) => calls += 1,
            Err(e) => {
                return Error::Unavailable(format!(
                    "chaos: flooded the next snapshotter in {op} {key:?}; call {} failed: {e}",
                    calls + 1
                ));
            }
        }
    }
}

/// splitmix64's finaliser.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// FNV-1a.
fn fnv(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

impl Policy for Chaos {
    fn init(config: Config) -> Result<Self> {
        let settings: Settings = config.parse()?;
        if settings.percent > 100 {
            return Err(Error::InvalidArgument(format!(
                "chaos: percent must be 0 to 100, got {}",
                settings.percent
            )));
        }
        if let Some(bad) = settings.calls.iter().find(|c| !KNOWN.contains(&c.as_str())) {
            return Err(Error::InvalidArgument(format!(
                "chaos: unknown call {bad:?} in calls (known: {})",
                KNOWN.join(", ")
            )));
        }
        Ok(Chaos { settings, calls: AtomicU64::new(0) })
    }

    fn stat(&self, next: &Next, key: &str) -> Result<Info> {
        self.around(next, "stat", key, || next.stat(key))
    }

    fn update(&self, next: &Next, info: &Info, fieldpaths: &[String]) -> Result<Info> {
        self.around(next, "update", &info.name, || next.update(info, fieldpaths))
    }

    fn mounts(&self, next: &Next, key: &str) -> Result<Vec<Mount>> {
        self.around(next, "mounts", key, || next.mounts(key))
    }

    fn prepare(
        &self,
        next: &Next,
        key: &str,
        parent: Option<&str>,
        labels: &Labels,
    ) -> Result<Vec<Mount>> {
        self.around(next, "prepare", key, || next.prepare(key, parent, labels))
    }

    fn view(
        &self,
        next: &Next,
        key: &str,
        parent: Option<&str>,
        labels: &Labels,
    ) -> Result<Vec<Mount>> {
        self.around(next, "view", key, || next.view(key, parent, labels))
    }

    fn commit(&self, next: &Next, name: &str, key: &str, labels: &Labels) -> Result<()> {
        self.around(next, "commit", name, || next.commit(name, key, labels))
    }

    fn remove(&self, next: &Next, key: &str) -> Result<()> {
        self.around(next, "remove", key, || next.remove(key))
    }
}

/// The calls `calls` may name.
const KNOWN: &[&str] = &["stat", "update", "mounts", "prepare", "view", "commit", "remove"];

wasnap_sdk::export_policy!(Chaos);
