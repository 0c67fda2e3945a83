//! The faults the soak injects, and when.
//!
//! Two kinds run today:
//! - [`Fault::Kill`]: `kill -9` of the daemon at a random moment of the load;
//! - [`Fault::AbortAt`]: a life started with one fault point armed to `abort`
//!   (`WASNAP_FAULTS=point=abort`, see `host/src/fault.rs`): the daemon dies when a
//!   call reaches that step, in the middle of whatever it was doing.
//!
//! After either the daemon restarts on the same root and the checker runs before any
//! client goes on.
//!
//! A third runs in the clients ([`super::ops`], row `list (stalled reader)`): a client
//! that takes a List stream's first page, leaves the rest unread for seconds and asks
//! for a collection meanwhile, which must end in time.
//!
//! A fourth runs in the daemon: the `copy` snapshotter has the test-only `chaos` guest
//! (`guests/chaos`) in its policy chain, which at random prepares, views, commits and
//! updates traps, hangs until its deadline, or runs out of memory, before or after
//! `copy` did the call. A client takes the failure as a refusal: nothing may have
//! changed, which the checker then holds it to. The guest says each death on stderr;
//! [`guest_deaths`] counts them in the daemon's log, and the host's repairs (a commit
//! finished, a backend snapshot removed) are counted by their log lines.
//!
//! A fifth fills the disk ([`Fault::DiskFull`], with `--full-disk N`): the root is on
//! a small loop-mounted ext4, and N times a ballast file takes every free block for
//! [`FULL_FOR`] while the clients go on. A call failing with "No space left on device"
//! (or a plugin's refusal to go below its `keep_free_mib`) meanwhile is a refusal
//! (nothing may have changed); then the ballast goes and the checker runs at once. The
//! daemon must neither die nor stay broken.
//!
//! Further kinds plug in here: add a variant to [`Fault`], let [`Plan::next_life`] or
//! [`Plan::next_kill`] choose it, and give it a row in the table (`Fault::kind`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::rng::Rng;

/// Fault points a client's calls or a collection reach (grep `faults.hit(` and
/// `self.fault(` in host/src). Driver points are `<driver>.<point>`. Native and overlay
/// commit in place, so `commit.before-rename` and `commit.before-delete` (btrfs's, in
/// `Layout::commit_moved`) are not theirs: armed, they were never reached.
pub const POINTS: &[&str] = &[
    "metadata.create.after-backend",
    "metadata.commit.before-backend",
    "metadata.commit.intent",
    "metadata.commit.after-backend",
    "metadata.remove.backend",
    "gc.sweep.before-commit",
    "gc.before-prune",
    "gc.prune.remove",
    "native.create.before-rename",
    "native.create.before-commit",
    "native.commit.before-commit",
    "native.remove.before-commit",
    "native.remove.before-delete",
    "overlay.create.before-rename",
    "overlay.create.before-commit",
    "overlay.commit.before-commit",
    "overlay.remove.before-commit",
    "overlay.remove.before-delete",
];

/// One fault injected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// `kill -9` at a random moment.
    Kill,
    /// A life with this point armed to abort.
    AbortAt(String),
    /// The root's filesystem filled for a while by a ballast file.
    DiskFull,
}

impl Fault {
    /// Its row in the faults table.
    pub fn kind(&self) -> String {
        match self {
            Fault::Kill => "kill -9 (random moment)".into(),
            Fault::AbortAt(p) => format!("abort at {p}"),
            Fault::DiskFull => format!("disk full for {} s (ballast)", FULL_FOR.as_secs()),
        }
    }
}

/// How long the disk stays full in each window.
pub const FULL_FOR: Duration = Duration::from_secs(4);

/// When to kill and what to arm.
#[derive(Debug)]
pub struct Plan {
    /// Random kills still to do.
    kills_left: u32,
    /// Full-disk windows still to do.
    full_left: u32,
    end: Instant,
    /// Chance that a life arms a fault point, in percent.
    arm_percent: u64,
}

impl Plan {
    /// `kills` random kills spread over the run ending at `end`; each restarted life
    /// arms a point with `arm_percent`% chance.
    pub fn new(kills: u32, full: u32, end: Instant, arm_percent: u64) -> Plan {
        Plan { kills_left: kills, full_left: full, end, arm_percent }
    }

    /// When the next random kill is due (None: no more), jittered around an even
    /// spread of the kills left over the time left.
    pub fn next_kill(&mut self, rng: &mut Rng, now: Instant) -> Option<Instant> {
        self.next(self.kills_left, rng, now)
    }

    /// When the next full-disk window is due (None: no more), spread as the kills.
    pub fn next_full(&mut self, rng: &mut Rng, now: Instant) -> Option<Instant> {
        self.next(self.full_left, rng, now)
    }

    /// A full-disk window was done.
    pub fn filled(&mut self) {
        self.full_left = self.full_left.saturating_sub(1);
    }

    fn next(&self, left_to_do: u32, rng: &mut Rng, now: Instant) -> Option<Instant> {
        if left_to_do == 0 || now >= self.end {
            return None;
        }
        let left = self.end - now;
        let gap = left / (left_to_do + 1);
        let jitter = 0.5 + rng.unit();
        Some(now + gap.mul_f64(jitter).max(Duration::from_millis(500)))
    }

    /// A random kill was done.
    pub fn killed(&mut self) {
        self.kills_left = self.kills_left.saturating_sub(1);
    }

    /// The point to arm for the next life, if any.
    pub fn next_life(&mut self, rng: &mut Rng, first: bool) -> Option<Fault> {
        if first || rng.below(100) >= self.arm_percent {
            return None;
        }
        Some(Fault::AbortAt(POINTS[rng.below(POINTS.len() as u64) as usize].to_owned()))
    }
}

/// `WASNAP_FAULTS` for a life.
pub fn spec(f: &Fault) -> Option<String> {
    match f {
        Fault::AbortAt(p) => Some(format!("{p}=abort")),
        Fault::Kill | Fault::DiskFull => None,
    }
}

/// What the `chaos` guest writes to stderr before it dies (its `die`), as the host logs
/// a guest's output line; errors quoting the guest's last lines repeat it elsewhere.
const DYING: &str = "wasnap::plugin::output: chaos: dying of ";
/// The host's log line for a commit it finished after its backend chain failed.
pub const FINISHED_COMMIT: &str = "holds the committed snapshot; finishing it";
/// The host's log line for a backend snapshot a failed create had made.
pub const DISCARDED: &str = "removed a backend snapshot the backend made although the call failed";

/// The `chaos` guest's deaths in `log`, by (fault, when).
pub fn guest_deaths(log: &str) -> BTreeMap<(String, String), u64> {
    let mut n = BTreeMap::new();
    for line in log.lines() {
        let Some(at) = line.find(DYING) else { continue };
        let rest = &line[at + DYING.len()..];
        let fault = rest.split_whitespace().next().unwrap_or("?").to_owned();
        let when = ["before passing it on", "after it succeeded", "after it failed"]
            .into_iter()
            .find(|w| rest.contains(w))
            .unwrap_or("?")
            .to_owned();
        *n.entry((fault, when)).or_default() += 1;
    }
    n
}

/// Lines of `log` that contain `needle`.
pub fn count_lines(log: &str, needle: &str) -> u64 {
    log.lines().filter(|l| l.contains(needle)).count() as u64
}
