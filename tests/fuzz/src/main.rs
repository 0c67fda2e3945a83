//! `wasnap-fuzz`: runs the fuzz targets for as long as asked, saving failing inputs.
//!
//! ```text
//! wasnap-fuzz list
//! wasnap-fuzz <target>|all [--time SECS] [--seed N] [--no-save]
//! wasnap-fuzz run <target> FILE...
//! wasnap-fuzz seed [<target>]
//! ```

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use wasnap_fuzz::engine::{self, corpus_dir};
use wasnap_fuzz::{Budget, Options, TARGETS, Target, target};

const USAGE: &str = "usage:
  wasnap-fuzz list                                         the targets
  wasnap-fuzz <target>|all [--time SECS] [--seed N] [--no-save]
                                                           fuzz (default 60 s each, random seed);
                                                           failing inputs go to corpus/<target>/
  wasnap-fuzz run <target> FILE...                         run chosen inputs once
  wasnap-fuzz seed [<target>]                              write the hand-written seeds into
                                                           corpus/<target>/seed-<name>";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match args.first().map(String::as_str) {
        None | Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Some("list") => {
            for t in TARGETS {
                println!("{:<8}  {}", t.name, t.about);
            }
            ExitCode::SUCCESS
        }
        Some("run") => run_files(&args[1..]),
        Some("seed") => seed(args.get(1).map(String::as_str)),
        Some(name) => fuzz(name, &args[1..]),
    };
    wasnap_fuzz::scratch::remove();
    code
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("wasnap-fuzz: {msg}\n{USAGE}");
    ExitCode::from(2)
}

fn fuzz(name: &str, rest: &[String]) -> ExitCode {
    let targets: Vec<&Target> = if name == "all" {
        TARGETS.to_vec()
    } else {
        match target(name) {
            Some(t) => vec![t],
            None => return fail(&format!("no target {name:?}")),
        }
    };
    let mut time = Duration::from_secs(60);
    let mut seed = None;
    let mut save = true;
    let mut it = rest.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--time" => match it.next().and_then(|v| v.parse::<f64>().ok()) {
                Some(s) if s >= 0.0 => time = Duration::from_secs_f64(s),
                _ => return fail("--time takes a number of seconds"),
            },
            "--seed" => match it.next().and_then(|v| v.parse::<u64>().ok()) {
                Some(s) => seed = Some(s),
                None => return fail("--seed takes a number"),
            },
            "--no-save" => save = false,
            other => return fail(&format!("unknown argument {other:?}")),
        }
    }
    let seed = seed.unwrap_or_else(|| {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        now.as_nanos() as u64 ^ u64::from(std::process::id())
    });
    let mut reports = Vec::new();
    for (i, t) in targets.iter().enumerate() {
        let seed = seed.wrapping_add(i as u64);
        eprintln!("wasnap-fuzz: {} for {:.0} s, seed {seed}", t.name, time.as_secs_f64());
        // The corpus first: a failure there is a regression, whatever the random run finds.
        let mut report = engine::run_corpus(t);
        let random = engine::fuzz(
            t,
            &Options { seed, budget: Budget::Time(time), save, stop_on_failure: false },
        );
        report.inputs += random.inputs;
        report.elapsed += random.elapsed;
        report.outcomes = report.outcomes.max(random.outcomes);
        report.failures.extend(random.failures);
        for (issue, n) in random.known {
            *report.known.entry(issue).or_default() += n;
        }
        for (issue, n) in &report.known {
            eprintln!("  known issue {issue}: {n} input(s)");
        }
        for f in &report.failures {
            eprintln!("  FAILED: {}", f.what);
            eprintln!("    input: {}", engine::show(&f.input));
            if let Some(p) = &f.saved {
                eprintln!("    saved as {}", p.display());
            }
        }
        reports.push(report);
    }
    print!("{}", engine::table(&reports));
    if reports.iter().any(|r| !r.failures.is_empty()) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn run_files(args: &[String]) -> ExitCode {
    let Some(t) = args.first().and_then(|n| target(n)) else {
        return fail("run needs a target and files");
    };
    let mut failed = false;
    for file in &args[1..] {
        let input = match std::fs::read(file) {
            Ok(b) => b,
            Err(e) => return fail(&format!("read {file}: {e}")),
        };
        let started = std::time::Instant::now();
        match engine::run_one(t, &input) {
            Ok(outcome) => println!("ok      {file} ({:.1?}): {outcome}", started.elapsed()),
            Err(what) => match t.known_issue(&what) {
                Some(issue) => {
                    println!("KNOWN   {file} ({:.1?}): {issue}: {what}", started.elapsed())
                }
                None => {
                    failed = true;
                    println!("FAILED  {file} ({:.1?}): {what}", started.elapsed());
                }
            },
        }
    }
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

fn seed(name: Option<&str>) -> ExitCode {
    for t in TARGETS.iter().filter(|t| name.is_none_or(|n| n == t.name)) {
        let dir = corpus_dir(t);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            return fail(&format!("create {}: {e}", dir.display()));
        }
        let seeds = (t.seeds)();
        for (n, bytes) in &seeds {
            if let Err(e) = std::fs::write(dir.join(format!("seed-{n}")), bytes) {
                return fail(&format!("write {}: {e}", dir.display()));
            }
        }
        println!("{}: {} seeds in {}", t.name, seeds.len(), dir.display());
    }
    ExitCode::SUCCESS
}
