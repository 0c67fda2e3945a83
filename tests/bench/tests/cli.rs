//! The binary as CI runs it. (Being an integration test also makes `cargo test` build
//! `target/debug/wasnap-bench`, which `.ci/test` then runs in smoke mode.)

use std::process::Command;

#[test]
fn a_missing_wasnap_binary_is_named_and_nothing_runs() {
    let out = Command::new(env!("CARGO_BIN_EXE_wasnap-bench"))
        .args(["daemon", "--smoke", "--wasnap", "/nonexistent/wasnap"])
        .output()
        .expect("run wasnap-bench");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("wasnap-bench: "), "{err}");
    assert!(err.contains("--wasnap /nonexistent/wasnap") && err.contains("not found"), "{err}");
    assert!(out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stdout));
}
