//! Every fuzz target as a bounded test: its seeds and corpus, then a random run with a
//! fixed seed and a fixed number of inputs, so a run is the same every time. Then the
//! regression tests, one per defect the fuzzers found, named after what they found.

use std::path::Path;
use std::time::Duration;

use wasnap_fuzz::engine::{self, Failure};
use wasnap_fuzz::targets::{filter, grpc, guest, labels, records};
use wasnap_fuzz::{Budget, Options, Target};

/// The seed of every bounded run.
const SEED: u64 = 0x5eed_f022;

fn describe(failures: &[Failure]) -> String {
    failures
        .iter()
        .map(|f| format!("\n  {}\n    input: {}", f.what, engine::show(&f.input)))
        .collect()
}

fn check(target: &Target, inputs: u64) {
    let corpus = engine::run_corpus(target);
    assert!(corpus.inputs > 0, "{}: no seeds", target.name);
    assert!(
        corpus.failures.is_empty(),
        "{}: corpus failures:{}",
        target.name,
        describe(&corpus.failures)
    );
    let opts =
        Options { seed: SEED, budget: Budget::Inputs(inputs), save: false, stop_on_failure: false };
    let random = engine::fuzz(target, &opts);
    assert_eq!(random.inputs, inputs);
    assert!(
        random.failures.is_empty(),
        "{}: failures (seed {SEED}):{}",
        target.name,
        describe(&random.failures)
    );
    eprintln!("{}", engine::table(&[corpus, random]));
}

#[test]
fn fuzz_filter() {
    check(&filter::TARGET, 5_000);
}

#[test]
fn fuzz_labels() {
    check(&labels::TARGET, 40_000);
}

#[test]
fn fuzz_guest() {
    check(&guest::TARGET, 10_000);
}

#[test]
fn fuzz_grpc() {
    check(&grpc::TARGET, 500);
}

#[test]
fn fuzz_records() {
    check(&records::TARGET, 200);
}

// --- Regressions ------------------------------------------------------------------------

fn corpus_entry(target: &Target, name: &str) -> Vec<u8> {
    let path = engine::corpus_dir(target).join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Runs a corpus entry: its outcome, which must not be a failure.
fn passes(target: &Target, name: &str) -> String {
    match engine::run_one(target, &corpus_entry(target, name)) {
        Ok(outcome) => outcome,
        Err(what) => panic!("{}/{name}: {what}", target.name),
    }
}

#[test]
fn guest_overlay_upper_not_held_is_refused_as_invalid_not_missing() {
    // The upper layer's work directory was looked up before the layer itself was
    // checked, so a layer the plugin does not hold came back not-found (a missing
    // snapshot, to containerd) instead of invalid-argument (the plugin's fault).
    let outcome = passes(&guest::TARGET, "crash-overlay-upper-not-held-was-not-found");
    assert!(outcome.contains("mounts:err"), "{outcome}");
}

#[test]
fn records_redb_commit_panic_does_not_wedge_the_group_commit() {
    // A bit flipped in the allocator's state made redb panic in a commit; the leader
    // unwound with the group still marked as led, and every later write (the database's
    // own flush on drop included) waited for ever. Now the batch fails as internal.
    // (Which call's commit meets the damage depends on how many commits come before it:
    // once a prepare's, since prepares and commits are one transaction, a `check`'s.)
    let outcome = passes(&records::TARGET, "hang-redb-commit-panic-wedged-group-commit");
    assert!(outcome.contains(":Internal"), "{outcome}");
    assert!(outcome.contains("close:"), "{outcome}");
}

#[test]
fn records_redb_panic_opening_a_damaged_file_is_an_error() {
    let outcome = passes(&records::TARGET, "crash-redb-panic-opening-zeroed-page");
    assert!(outcome.starts_with("open:Internal"), "{outcome}");
}

#[test]
fn records_redb_panic_closing_a_damaged_file_is_contained() {
    let outcome = passes(&records::TARGET, "crash-redb-panic-closing-damaged-file");
    assert!(outcome.contains("close:ok"), "{outcome}");
}

#[test]
fn records_driver_id_counter_at_the_end_is_an_error_not_an_overflow() {
    // A driver's id counter at u64::MAX overflowed in `IdBlocks::next` (a panic in a
    // debug build, a wrap to reused ids in a release build).
    let outcome = passes(&records::TARGET, "crash-driver-id-counter-overflow");
    assert!(outcome.contains("prepare:Internal"), "{outcome}");
}

/// Runs a corpus entry on a thread of its own for at most `limit`: whether it passed.
fn strictly(name: &'static str, limit: Duration) -> Result<String, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(engine::run_one(&records::TARGET, &corpus_entry(&records::TARGET, name)));
    });
    rx.recv_timeout(limit).unwrap_or_else(|_| Err(format!("no answer in {limit:?} (hang)")))
}

#[test]
fn records_metadata_seq_counter_at_the_end_is_an_error_not_an_overflow() {
    strictly("crash-metadata-seq-overflow", Duration::from_secs(30)).unwrap();
}

#[test]
fn records_driver_parent_cycle_is_an_error_not_a_hang() {
    strictly("hang-driver-parent-cycle", Duration::from_secs(10)).unwrap();
}

#[test]
fn records_redb_read_panics_on_a_damaged_file_are_errors() {
    for name in ["crash-redb-read-panic-slice-range", "crash-redb-read-panic-tuple-key"] {
        strictly(name, Duration::from_secs(30)).unwrap();
    }
}

#[test]
fn every_corpus_directory_exists() {
    for t in wasnap_fuzz::TARGETS {
        let dir = engine::corpus_dir(t);
        assert!(Path::new(&dir).is_dir(), "{}", dir.display());
        assert!(!engine::corpus_files(t).is_empty(), "{}: empty corpus", t.name);
    }
}

#[test]
fn filter_errors_about_a_quoted_string_carry_no_control_characters() {
    // A quoted token was repeated raw in "found quoted string …", carriage returns and
    // all, so an error message could span lines in a log.
    for name in [
        "crash-quoted-string-carriage-return-in-error",
        "crash-quoted-string-control-chars-in-error",
    ] {
        passes(&filter::TARGET, name);
    }
}
