//! The example and test guests, built for wasm32-wasip2 on demand.
//!
//! Tests ask for a guest by package name and get the path of its `.wasm`. The first
//! request in a process builds every guest of the workspace in one `cargo build` (in
//! release mode, into `target/guests`, a target directory of its own so that it never
//! waits on the lock of the `cargo test` that runs it); later requests reuse the
//! result, and cargo itself makes a rebuild a no-op when nothing changed. The `.wasm`
//! files land in `target/guests/wasm32-wasip2/release` (`wasnap bench --guest-dir`
//! takes that directory). Set `WASNAP_GUESTS_DIR` to a directory of prebuilt `.wasm`
//! files to skip the build.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Every guest in the workspace, by package name.
pub const ALL: &[&str] = &[
    "copy",
    "overlay-layout",
    "label-policy",
    "quota",
    "adversary",
    "chaos",
    "wrong-version",
    // examples/minimal-guest: the snapshotter of sdk/README.md.
    "myplugin",
];

/// The workspace root (this crate lives in `tests/util/`, two levels below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).ancestors().nth(2).unwrap_or(Path::new("/")).to_path_buf()
}

/// The path of the built guest `package` (e.g. `copy`, `label-policy`).
pub fn path(package: &str) -> Result<PathBuf, String> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = BUILT.get_or_init(build_all).clone()?;
    let file = dir.join(format!("{}.wasm", package.replace('-', "_")));
    if file.is_file() {
        Ok(file)
    } else {
        Err(format!("guest {package}: {} was not built", file.display()))
    }
}

fn build_all() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("WASNAP_GUESTS_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let root = workspace_root();
    let target = root.join("target/guests");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .args(["build", "--quiet", "--release", "--target", "wasm32-wasip2", "--target-dir"])
        .arg(&target);
    for p in ALL {
        cmd.args(["-p", p]);
    }
    // Flags meant for the host build (coverage, sanitizers) do not apply to wasm.
    cmd.env_remove("RUSTFLAGS").env_remove("CARGO_ENCODED_RUSTFLAGS");
    let out = cmd.output().map_err(|e| format!("run cargo to build the guests: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "building the guests failed (is the wasm32-wasip2 target installed? `rustup target add wasm32-wasip2`):\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(target.join("wasm32-wasip2/release"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_workspace_root_is_the_workspace_root() {
        let manifest = std::fs::read_to_string(super::workspace_root().join("Cargo.toml"))
            .unwrap_or_else(|e| panic!("the workspace root's Cargo.toml: {e}"));
        assert!(manifest.contains("[workspace]"), "not the workspace's manifest:\n{manifest}");
    }
}
