//! Turning a plugin argument (`--plugin`, `--policy`, `plugin inspect|compile`) into a
//! `.wasm` path: the file as given, or the component built from a guest crate's
//! directory.

use std::path::{Path, PathBuf};
use std::process::Command;

use wasnap::error::{Error, Result};

/// A `.wasm` path as given, or the component built from a guest crate's directory.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if !path.is_dir() {
        if !path.exists() {
            return Err(Error::invalid_argument(format!(
                "plugin {}: no such file",
                path.display()
            )));
        }
        return Ok(path.to_path_buf());
    }
    if !path.join("Cargo.toml").is_file() {
        return Err(Error::invalid_argument(format!(
            "plugin {}: a directory, but not a crate (no Cargo.toml)",
            path.display()
        )));
    }
    build(path)
}

/// Builds the crate in `dir` for wasm32-wasip2 and returns its component.
fn build(dir: &Path) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(dir)
        .args(["build", "--release", "--target", "wasm32-wasip2", "--message-format=json"])
        .arg("--quiet")
        .output()
        .map_err(|e| {
            Error::failed_precondition(format!("run cargo to build {}: {e}", dir.display()))
        })?;
    if !out.status.success() {
        return Err(Error::failed_precondition(format!(
            "building {} for wasm32-wasip2 failed (is the target installed? `rustup target add wasm32-wasip2`):\n{}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim_end()
        )));
    }
    // The crate's own artifact is the last compiler-artifact message with a .wasm.
    let manifest = dir.join("Cargo.toml").canonicalize().unwrap_or_default();
    let mut found = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let ours = msg["manifest_path"].as_str().map(Path::new) == Some(manifest.as_path());
        let wasm = msg["filenames"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| f.as_str())
            .find(|f| f.ends_with(".wasm"));
        if let (true, Some(w)) = (ours, wasm) {
            found = Some(PathBuf::from(w));
        }
    }
    found.ok_or_else(|| {
        Error::failed_precondition(format!(
            "{} built, but produced no .wasm: is it a `crate-type = [\"cdylib\"]` library?",
            dir.display()
        ))
    })
}
