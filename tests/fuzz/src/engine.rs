//! The fuzzing engine: runs a target's inputs with panics caught and a watchdog for
//! hangs, makes new inputs (structure-aware through `arbitrary`, or by mutating known
//! ones), keeps inputs that showed a new behaviour as material for more, and saves the
//! ones that fail into the target's corpus directory.
//!
//! No coverage instrumentation (that needs nightly): a target reports what an input
//! did as a short outcome string (which error class, which branch), and an input whose
//! outcome was not seen before joins the pool that mutations draw from.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arbitrary::Unstructured;

/// What a target says an input did, when it did nothing wrong: a short description of
/// its outcome (an error class, a branch taken). Distinct outcomes steer the fuzzer.
pub type Outcome = String;

/// One fuzz target.
#[derive(Debug)]
pub struct Target {
    /// Its name: the command line's, and its corpus directory's.
    pub name: &'static str,
    /// One line on what it covers.
    pub about: &'static str,
    /// Runs one input: `Err` says which property it broke. A panic is caught by the
    /// engine and counts as a failure too.
    pub run: fn(&[u8]) -> Result<Outcome, String>,
    /// Makes a fresh input from random bytes, aware of the input's structure.
    pub generate: fn(&mut Unstructured<'_>) -> Vec<u8>,
    /// Changes a known input into a nearby one (the default: [`Mutator::bytes`]).
    pub mutate: fn(&[u8], &mut Mutator<'_>) -> Vec<u8>,
    /// Hand-written inputs, by name: good and bad cases every run starts from.
    pub seeds: fn() -> Vec<(&'static str, Vec<u8>)>,
    /// Tokens byte mutations insert.
    pub dictionary: &'static [&'static str],
    /// Longest time one input may take before it counts as a hang.
    pub timeout: Duration,
    /// Panics at source locations containing one of these are a dependency's, and
    /// count as contained when the host caught them: the input ran to its end (so the
    /// host turned the panic into an error). A panic that reaches the target always
    /// fails the input.
    pub contained_panics: &'static [&'static str],
    /// Failures already found and reported but not fixed here (in code this crate does
    /// not own): a failure whose text matches the first string (pieces separated by
    /// `*`, found in order) is counted under the second, its name, and does not fail a
    /// run. Each has a regression test.
    pub known: &'static [(&'static str, &'static str)],
}

impl Target {
    /// The name of the known issue `failure` is, if it is one.
    pub fn known_issue(&self, failure: &str) -> Option<&'static str> {
        let matches = |pattern: &str| {
            let mut rest = failure;
            pattern.split('*').all(|piece| match rest.find(piece) {
                Some(i) => {
                    rest = &rest[i + piece.len()..];
                    true
                }
                None => false,
            })
        };
        self.known.iter().find(|(pattern, _)| matches(pattern)).map(|(_, name)| *name)
    }
}

/// The default mutation: bytes changed, inserted, removed, repeated or spliced.
pub fn mutate_bytes(input: &[u8], m: &mut Mutator<'_>) -> Vec<u8> {
    let mut v = input.to_vec();
    m.bytes(&mut v);
    v
}

/// Where a target's corpus lives in the source tree.
pub fn corpus_dir(target: &Target) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target.name)
}

/// The files of a target's corpus directory, by name.
pub fn corpus_files(target: &Target) -> Vec<(String, Vec<u8>)> {
    let Ok(dir) = std::fs::read_dir(corpus_dir(target)) else { return Vec::new() };
    let mut files: Vec<(String, Vec<u8>)> = dir
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            if name.starts_with('.') {
                return None;
            }
            Some((name, std::fs::read(e.path()).ok()?))
        })
        .collect();
    files.sort();
    files
}

/// A small, fast, reproducible generator (SplitMix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator that always gives the same numbers for `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n` (0 if `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { (self.next_u64() % n as u64) as usize }
    }

    /// True one time in `n`.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    /// `len` random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        v.truncate(len);
        v
    }
}

/// What mutations draw on: randomness, the target's dictionary, and another input of
/// the pool to splice from.
#[derive(Debug)]
pub struct Mutator<'a> {
    /// The randomness.
    pub rng: &'a mut Rng,
    /// Tokens to insert.
    pub dictionary: &'static [&'static str],
    /// Another input, to splice pieces of.
    pub donor: &'a [u8],
}

impl Mutator<'_> {
    /// Applies one to four byte mutations to `v`.
    pub fn bytes(&mut self, v: &mut Vec<u8>) {
        for _ in 0..1 + self.rng.below(4) {
            self.one(v);
        }
    }

    /// Mutates a string, keeping it a string (invalid UTF-8 becomes U+FFFD).
    pub fn string(&mut self, s: &mut String) {
        let mut v = std::mem::take(s).into_bytes();
        self.bytes(&mut v);
        *s = String::from_utf8_lossy(&v).into_owned();
    }

    /// Fresh structured data: an `Unstructured` over `len` random bytes.
    pub fn fresh(&mut self, len: usize) -> Vec<u8> {
        self.rng.bytes(len)
    }

    fn one(&mut self, v: &mut Vec<u8>) {
        let len = v.len();
        match self.rng.below(11) {
            0 | 1 if len > 0 => {
                let i = self.rng.below(len);
                v[i] ^= 1 << self.rng.below(8);
            }
            2 if len > 0 => {
                let i = self.rng.below(len);
                v[i] = INTERESTING[self.rng.below(INTERESTING.len())];
            }
            3 => {
                let i = self.rng.below(len + 1);
                let n = 1 + self.rng.below(8);
                let bytes = self.rng.bytes(n);
                v.splice(i..i, bytes);
            }
            4 if len > 0 => {
                let i = self.rng.below(len);
                let n = 1 + self.rng.below((len - i).min(16));
                v.drain(i..i + n);
            }
            5 | 6 if !self.dictionary.is_empty() => {
                let token = self.dictionary[self.rng.below(self.dictionary.len())].as_bytes();
                let i = self.rng.below(len + 1);
                if self.rng.one_in(3) && i < len {
                    let end = (i + token.len()).min(len);
                    v.splice(i..end, token.iter().copied());
                } else {
                    v.splice(i..i, token.iter().copied());
                }
            }
            7 if len > 0 => {
                // Repeat a piece, sometimes many times: lengths past a budget.
                let i = self.rng.below(len);
                let n = 1 + self.rng.below((len - i).min(32));
                let times = if self.rng.one_in(8) { 1 + self.rng.below(2048) } else { 1 };
                let piece: Vec<u8> = v[i..i + n].to_vec();
                let at = self.rng.below(len + 1);
                let repeated: Vec<u8> = piece.iter().copied().cycle().take(n * times).collect();
                v.splice(at..at, repeated);
            }
            8 if !self.donor.is_empty() => {
                let d = self.donor;
                let i = self.rng.below(d.len());
                let n = 1 + self.rng.below(d.len() - i);
                let at = self.rng.below(len + 1);
                let end = if self.rng.one_in(2) { len } else { at };
                v.splice(at..end, d[i..i + n].iter().copied());
            }
            9 if len > 0 => v.truncate(self.rng.below(len)),
            _ if len > 1 => {
                let (i, j) = (self.rng.below(len), self.rng.below(len));
                v.swap(i, j);
            }
            _ => v.push(self.rng.next_u64() as u8),
        }
    }
}

const INTERESTING: &[u8] = &[0, 1, 0x7f, 0x80, 0xff, b'"', b'\\', b'\n', b',', b'.', b'/', b'{'];

/// Why an input failed.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The input.
    pub input: Vec<u8>,
    /// What went wrong: a broken property, a panic (with where), or a hang.
    pub what: String,
    /// Where it was saved, if it was.
    pub saved: Option<PathBuf>,
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The target's name.
    pub target: &'static str,
    /// Inputs run.
    pub inputs: u64,
    /// How long the run took.
    pub elapsed: Duration,
    /// Distinct outcomes seen.
    pub outcomes: usize,
    /// Inputs that failed.
    pub failures: Vec<Failure>,
    /// Inputs that hit a known issue, by issue.
    pub known: std::collections::BTreeMap<&'static str, u64>,
}

impl Report {
    /// Inputs per second.
    pub fn rate(&self) -> f64 {
        self.inputs as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// How long a random run goes on.
#[derive(Debug, Clone, Copy)]
pub enum Budget {
    /// This many inputs: what tests use, so that a run is the same every time.
    Inputs(u64),
    /// This long.
    Time(Duration),
}

/// How to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The seed of the random run.
    pub seed: u64,
    /// How long it goes on.
    pub budget: Budget,
    /// Save failing inputs into the corpus directory.
    pub save: bool,
    /// Stop at the first failure.
    pub stop_on_failure: bool,
}

// --- Panics ------------------------------------------------------------------------

thread_local! {
    /// Set while this thread runs an input: its panics are the input's, not printed.
    static RUNNING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Set once this thread has run an input: a panic of its own between inputs (a
    /// test's assertion) is its own, not an input's.
    static RUNNER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Panics seen while any input ran, on any thread (a host worker's panic is caught by
/// tokio and would otherwise go unnoticed), with where they happened.
static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());
static ACTIVE: AtomicUsize = AtomicUsize::new(0);

fn install_panic_hook() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let running = RUNNING.with(std::cell::Cell::get);
            // A panic on a thread of the host's (a worker) while any input runs is taken
            // as that input's; one on a runner between its inputs is not an input's.
            if running || ACTIVE.load(Ordering::SeqCst) > 0 && !RUNNER.with(std::cell::Cell::get) {
                let msg = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(non-string panic)".to_owned());
                let at = info.location().map(|l| l.to_string()).unwrap_or_default();
                let thread = std::thread::current().name().unwrap_or("?").to_owned();
                let mut panics = PANICS.lock().unwrap_or_else(|e| e.into_inner());
                if panics.len() < 64 {
                    panics.push(format!("panic on thread {thread:?} at {at}: {msg}"));
                }
            }
            if !RUNNING.with(std::cell::Cell::get)
                || std::env::var_os("WASNAP_FUZZ_VERBOSE").is_some()
            {
                previous(info);
            }
        }));
    });
}

fn take_panics() -> Vec<String> {
    std::mem::take(&mut *PANICS.lock().unwrap_or_else(|e| e.into_inner()))
}

// --- Hangs ---------------------------------------------------------------------------

/// The input a loop is running, for the watchdog.
#[derive(Debug)]
struct Running {
    target: &'static str,
    started: Instant,
    timeout: Duration,
    input: Vec<u8>,
    save: Option<PathBuf>,
}

type Slot = Arc<Mutex<Option<Running>>>;

static SLOTS: Mutex<Vec<Slot>> = Mutex::new(Vec::new());

/// Starts the watchdog once: an input that overruns its target's timeout is reported
/// (and saved as `hang-…`), and the process ends, since a stuck thread cannot be
/// stopped from outside.
fn watchdog() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        std::thread::Builder::new()
            .name("fuzz-watchdog".into())
            .spawn(|| {
                loop {
                    std::thread::sleep(Duration::from_millis(100));
                    let slots = SLOTS.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    for slot in slots {
                        let guard = slot.lock().unwrap_or_else(|e| e.into_inner());
                        let Some(r) = guard.as_ref() else { continue };
                        if r.started.elapsed() <= r.timeout {
                            continue;
                        }
                        let mut msg = format!(
                            "wasnap-fuzz: {}: an input ran for more than {:?} (hang)\n  input: {}",
                            r.target,
                            r.timeout,
                            show(&r.input)
                        );
                        if let Some(dir) = &r.save {
                            match save(dir, "hang", &r.input) {
                                Ok(p) => {
                                    let _ = write!(msg, "\n  saved as {}", p.display());
                                }
                                Err(e) => {
                                    let _ = write!(msg, "\n  could not save it: {e}");
                                }
                            }
                        }
                        eprintln!("{msg}");
                        std::process::exit(3);
                    }
                }
            })
            .expect("spawn the fuzz watchdog");
    });
}

/// An input as it reads in a message: text if it is, else hex; cut at 2 KiB.
pub fn show(input: &[u8]) -> String {
    let cut = &input[..input.len().min(2048)];
    let more = if input.len() > cut.len() {
        format!(" … ({} bytes in all)", input.len())
    } else {
        String::new()
    };
    match std::str::from_utf8(cut) {
        Ok(s) => format!("{s:?}{more}"),
        Err(_) => format!("hex {}{more}", hex(cut)),
    }
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Bytes from hex; `None` if it is not.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
        .collect()
}

/// FNV-1a, for names of saved inputs and outcome sets.
pub fn fnv(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
}

fn save(dir: &Path, kind: &str, input: &[u8]) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("{kind}-{:016x}", fnv(input)));
    std::fs::write(&path, input)?;
    Ok(path)
}

// --- Running -------------------------------------------------------------------------

/// Runs one input: its outcome, or why it failed (a broken property, or a panic on any
/// thread while it ran).
pub fn run_one(target: &Target, input: &[u8]) -> Result<Outcome, String> {
    let _one = one_at_a_time();
    run_locked(target, input)
}

/// One input at a time in a process (tests run side by side): a panic on one of the
/// host's threads is then the running input's.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn run_locked(target: &Target, input: &[u8]) -> Result<Outcome, String> {
    install_panic_hook();
    ACTIVE.fetch_add(1, Ordering::SeqCst);
    RUNNER.with(|r| r.set(true));
    RUNNING.with(|r| r.set(true));
    let result = catch_unwind(AssertUnwindSafe(|| (target.run)(input)));
    RUNNING.with(|r| r.set(false));
    ACTIVE.fetch_sub(1, Ordering::SeqCst);
    let mut panics = take_panics();
    if matches!(result, Ok(Ok(_))) {
        panics.retain(|p| !target.contained_panics.iter().any(|at| p.contains(at)));
    }
    // A panic the input's code caught (the host's own catch, tokio's) is still one.
    match result {
        Ok(Ok(outcome)) if panics.is_empty() => Ok(outcome),
        Ok(Ok(_)) => Err(format!("caught {}", panics.join("; "))),
        Ok(Err(broken)) if panics.is_empty() => Err(broken),
        Ok(Err(broken)) => Err(format!("{broken} (and caught {})", panics.join("; "))),
        Err(_) if panics.is_empty() => Err("escaped panic (no message)".to_owned()),
        Err(_) => Err(format!("escaped {}", panics.join("; "))),
    }
}

/// A loop's registration with the watchdog.
struct Watch(Slot);

impl Watch {
    fn new() -> Self {
        watchdog();
        let slot: Slot = Arc::default();
        SLOTS.lock().unwrap_or_else(|e| e.into_inner()).push(slot.clone());
        Watch(slot)
    }

    fn run(&self, target: &Target, input: &[u8], save: bool) -> Result<Outcome, String> {
        let _one = one_at_a_time();
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(Running {
            target: target.name,
            started: Instant::now(),
            timeout: target.timeout,
            input: input.to_vec(),
            save: save.then(|| corpus_dir(target)),
        });
        let result = run_locked(target, input);
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
        result
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        SLOTS.lock().unwrap_or_else(|e| e.into_inner()).retain(|s| !Arc::ptr_eq(s, &self.0));
    }
}

/// Runs the seeds and every file of the corpus directory once.
pub fn run_corpus(target: &Target) -> Report {
    let started = Instant::now();
    let watch = Watch::new();
    let mut report = Report { target: target.name, ..Report::default() };
    let mut outcomes = HashSet::new();
    let seeds = (target.seeds)().into_iter().map(|(n, b)| (format!("seed {n}"), b));
    for (name, input) in seeds.chain(corpus_files(target)) {
        report.inputs += 1;
        match watch.run(target, &input, false) {
            Ok(o) => {
                outcomes.insert(o);
            }
            Err(what) => match target.known_issue(&what) {
                Some(issue) => *report.known.entry(issue).or_default() += 1,
                None => report.failures.push(Failure {
                    input,
                    what: format!("{name}: {what}"),
                    saved: None,
                }),
            },
        }
    }
    report.outcomes = outcomes.len();
    report.elapsed = started.elapsed();
    report
}

/// Most inputs kept for mutation.
const POOL: usize = 4096;

/// A random run: fresh inputs and mutations of the seeds, the corpus and the inputs
/// that showed a new outcome, for as long as `opts` says.
pub fn fuzz(target: &Target, opts: &Options) -> Report {
    let started = Instant::now();
    let watch = Watch::new();
    let mut rng = Rng::new(opts.seed);
    let mut report = Report { target: target.name, ..Report::default() };
    let mut pool: Vec<Vec<u8>> = (target.seeds)().into_iter().map(|(_, b)| b).collect();
    pool.extend(corpus_files(target).into_iter().map(|(_, b)| b));
    let mut outcomes: HashSet<u64> = HashSet::new();
    let mut failed: HashSet<u64> = HashSet::new();
    loop {
        let done = match opts.budget {
            Budget::Inputs(n) => report.inputs >= n,
            Budget::Time(d) => started.elapsed() >= d,
        };
        if done {
            break;
        }
        let input = if pool.is_empty() || rng.one_in(3) {
            // Mostly small, sometimes large: budgets are tested by size.
            let len = match rng.below(10) {
                0 => rng.below(64 * 1024),
                1..=3 => rng.below(256),
                _ => rng.below(4096),
            };
            let bytes = rng.bytes(len);
            (target.generate)(&mut Unstructured::new(&bytes))
        } else {
            let base = pool[rng.below(pool.len())].clone();
            let donor = pool[rng.below(pool.len())].clone();
            let mut m = Mutator { rng: &mut rng, dictionary: target.dictionary, donor: &donor };
            (target.mutate)(&base, &mut m)
        };
        report.inputs += 1;
        match watch.run(target, &input, opts.save) {
            Ok(outcome) => {
                if outcomes.insert(fnv(outcome.as_bytes())) {
                    if pool.len() >= POOL {
                        let i = rng.below(pool.len());
                        pool[i] = input;
                    } else {
                        pool.push(input);
                    }
                }
            }
            Err(what) if target.known_issue(&what).is_some() => {
                let issue = target.known_issue(&what).unwrap_or_default();
                *report.known.entry(issue).or_default() += 1;
            }
            Err(what) => {
                // One report per kind of failure: its text without numbers (a panic's
                // location, a property's name and first details), at most 20 saved.
                let kind: String = what.chars().filter(|c| !c.is_ascii_digit()).take(100).collect();
                let new = failed.insert(fnv(kind.as_bytes()));
                let saved = if opts.save && new && failed.len() <= 20 {
                    save(&corpus_dir(target), "crash", &input).ok()
                } else {
                    None
                };
                if new || report.failures.len() < 16 {
                    report.failures.push(Failure { input, what, saved });
                }
                if opts.stop_on_failure {
                    break;
                }
            }
        }
    }
    report.outcomes = outcomes.len();
    report.elapsed = started.elapsed();
    report
}

/// The table the binary prints.
pub fn table(reports: &[Report]) -> String {
    let mut rows = vec![[
        "TARGET".to_owned(),
        "INPUTS".to_owned(),
        "TIME".to_owned(),
        "INPUTS/S".to_owned(),
        "OUTCOMES".to_owned(),
        "FAILURES".to_owned(),
        "KNOWN".to_owned(),
    ]];
    for r in reports {
        rows.push([
            r.target.to_owned(),
            r.inputs.to_string(),
            format!("{:.1} s", r.elapsed.as_secs_f64()),
            format!("{:.0}", r.rate()),
            r.outcomes.to_string(),
            r.failures.len().to_string(),
            r.known.values().sum::<u64>().to_string(),
        ]);
    }
    let widths: Vec<usize> =
        (0..7).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in &rows {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    }
    out
}
