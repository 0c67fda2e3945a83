//! `wasnap plugin new`: a guest crate to start from, which builds, passes its own unit
//! test and the conformance suite as it is.
//!
//! A backend starts as the SDK README's snapshotter (`examples/minimal-guest`, the code
//! the workspace's tests build and check); a policy starts as one that passes every call
//! on and shows where a check goes. Both come with a native unit test on the SDK's
//! test harness and a configuration snippet.

use std::io::Write;
use std::path::{Path, PathBuf};

use wasnap::error::{Context, Error, Result};

/// The SDK README's snapshotter, verbatim (a workspace test checks the two agree).
const BACKEND_LIB: &str = include_str!("../../../examples/minimal-guest/src/lib.rs");

/// Where the SDK is when none is named: beside the sources this binary was built from.
fn default_sdk() -> Option<PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sdk").canonicalize().ok()
}

/// Checks a crate name: what cargo accepts and a `.wasm` file may be called.
fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid_argument(format!(
            "plugin name {name:?}: use lowercase letters, digits, '-' and '_', starting with a letter"
        )))
    }
}

/// The files of a new plugin crate named `name`, depending on the SDK at `sdk`.
fn files(name: &str, policy: bool, sdk: &Path) -> Vec<(&'static str, String)> {
    let world = if policy { "policy" } else { "backend" };
    let cargo = format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
# A component for wasm32-wasip2: `wasnap plugin build` (or cargo build --release
# --target wasm32-wasip2) writes target/wasm32-wasip2/release/{stem}.wasm.
crate-type = ["cdylib"]

[dependencies]
wasnap-sdk = {{ path = {sdk:?} }}
{serde}
# A crate of its own, even inside another workspace's directory.
[workspace]
"#,
        stem = name.replace('-', "_"),
        sdk = sdk.display().to_string(),
        // The policy template reads its configuration with serde; the backend takes none.
        serde = if policy { "serde = { version = \"1\", features = [\"derive\"] }\n" } else { "" },
    );
    let lib = if policy { policy_lib(name) } else { backend_lib() };
    let config = if policy {
        format!(
            r#"# In front of any snapshotter, in the host's configuration:
[[snapshotters.native.policies]]
path = "target/wasm32-wasip2/release/{stem}.wasm"
config = {{ deny_prefix = "containerd.io/snapshot/forbidden" }}   # what init receives
"#,
            stem = name.replace('-', "_")
        )
    } else {
        format!(
            r#"# In the host's configuration (a file with one snapshotter makes it the default):
[snapshotters.{name}]
driver = "wasm"
path = "target/wasm32-wasip2/release/{stem}.wasm"
limits = {{ memory_mib = 256, timeout_ms = 60000, instances = 2 }}
"#,
            stem = name.replace('-', "_")
        )
    };
    let readme = format!(
        "# {name}\n\nA wasnap {world} plugin. The loop:\n\n```sh\nwasnap plugin build   # the component\nwasnap plugin test    # cargo test, then the conformance suite against it\ncargo test            # its own unit tests, natively\n```\n\n`wasnap.toml` shows how a host configures it. The SDK's README explains the model.\n"
    );
    vec![
        ("Cargo.toml", cargo),
        ("src/lib.rs", lib),
        ("wasnap.toml", config),
        ("README.md", readme),
        (".gitignore", "/target\n".to_owned()),
    ]
}

fn backend_lib() -> String {
    // The example's first lines say where it comes from; the rest is the plugin.
    let code: String = BACKEND_LIB
        .lines()
        .skip_while(|l| l.starts_with("//!") || l.is_empty())
        .map(|l| format!("{l}\n"))
        .collect();
    format!(
        "//! A copy-based snapshotter: each snapshot is a layer holding its whole tree.\n\n{code}\n{}",
        r#"#[cfg(test)]
mod tests {
    use wasnap_sdk::testing::Harness;

    use super::*;

    #[test]
    fn a_child_starts_as_a_copy_of_its_committed_parent() {
        let h = Harness::new_temp();
        let _in = h.enter();
        let p = MyPlugin::init(Config::new("null")).unwrap();
        let m = p.prepare("a", None, &Labels::new()).unwrap();
        let Mount::Bind { layer, readonly: false } = m[0] else { panic!("{m:?}") };
        layer.write_file("hello", b"world", 0o644).unwrap();
        p.commit("base", "a", &Labels::new()).unwrap();
        let m = p.prepare("b", Some("base"), &Labels::new()).unwrap();
        let Mount::Bind { layer: child, .. } = m[0] else { panic!("{m:?}") };
        assert_eq!(child.read_file("hello").unwrap(), b"world");
    }
}
"#
    )
}

fn policy_lib(name: &str) -> String {
    format!(
        r##"//! `{name}`: a policy in front of the next snapshotter. Every call it does not
//! override passes on unchanged; `prepare` shows where a check goes.

use serde::Deserialize;
use wasnap_sdk::{{Config, Error, Labels, Mount, Next, Policy, Result}};

/// What `init` receives (`config = {{ ... }}` in the host's configuration).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {{
    /// Refuse snapshots with a label whose key starts with this.
    #[serde(default)]
    deny_prefix: Option<String>,
}}

struct MyPolicy {{
    settings: Settings,
}}

impl MyPolicy {{
    fn check(&self, key: &str, labels: &Labels) -> Result<()> {{
        if let Some(prefix) = &self.settings.deny_prefix
            && let Some(label) = labels.keys().find(|k| k.starts_with(prefix.as_str()))
        {{
            return Err(Error::InvalidArgument(format!(
                "snapshot {{key:?}}: label {{label:?}} is not allowed here"
            )));
        }}
        Ok(())
    }}
}}

impl Policy for MyPolicy {{
    fn init(config: Config) -> Result<Self> {{
        Ok(MyPolicy {{ settings: config.parse()? }})
    }}

    fn prepare(
        &self,
        next: &Next,
        key: &str,
        parent: Option<&str>,
        labels: &Labels,
    ) -> Result<Vec<Mount>> {{
        self.check(key, labels)?;
        next.prepare(key, parent, labels)
    }}
}}

wasnap_sdk::export_policy!(MyPolicy);

#[cfg(test)]
mod tests {{
    use super::*;

    #[test]
    fn a_denied_label_is_refused_and_others_pass() {{
        let p = MyPolicy::init(Config::new(r#"{{"deny_prefix": "x/"}}"#)).unwrap();
        let denied = Labels::from([("x/y".to_owned(), "1".to_owned())]);
        assert!(p.check("k", &denied).unwrap_err().to_string().contains("not allowed"));
        assert!(p.check("k", &Labels::new()).is_ok());
        assert!(MyPolicy::init(Config::new(r#"{{"deny": 1}}"#)).is_err());
    }}
}}
"##
    )
}

/// `wasnap plugin new`: writes the crate into `dir` (which must not exist, or be empty).
pub fn new(
    name: &str,
    policy: bool,
    dir: Option<&Path>,
    sdk: Option<&Path>,
    out: &mut dyn Write,
) -> Result<()> {
    check_name(name)?;
    let dir = dir.map_or_else(|| PathBuf::from(name), Path::to_path_buf);
    let sdk = match sdk {
        Some(s) => s.canonicalize().with_context(|| format!("--sdk {}", s.display()))?,
        None => default_sdk().ok_or_else(|| {
            Error::failed_precondition(
                "where is wasnap-sdk? this wasnap was built away from its sources: pass --sdk PATH (the sdk/ of a wasnap checkout)",
            )
        })?,
    };
    if !sdk.join("Cargo.toml").is_file() {
        return Err(Error::invalid_argument(format!(
            "--sdk {}: not a crate (no Cargo.toml)",
            sdk.display()
        )));
    }
    if dir.exists() && std::fs::read_dir(&dir).map(|mut d| d.next().is_some()).unwrap_or(true) {
        return Err(Error::already_exists(format!(
            "{}: exists and is not empty; pick another directory (--dir)",
            dir.display()
        )));
    }
    for (file, text) in files(name, policy, &sdk) {
        let path = dir.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("create {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    }
    let kind = if policy { "policy" } else { "backend" };
    writeln!(
        out,
        "created {kind} plugin {name} in {}\nnext: cd {} && wasnap plugin build && wasnap plugin test",
        dir.display(),
        dir.display()
    )
    .context("write")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_the_backend_is_the_readme_example() {
        for bad in ["", "My", "1x", "a/b", "a.b", "../x"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        check_name("my-plugin_2").unwrap();
        let lib = backend_lib();
        assert!(lib.contains("export_backend!(MyPlugin)"), "{lib}");
        assert!(!lib.contains("sdk/README.md, step 2"), "the example's own header is left out");
    }
}
