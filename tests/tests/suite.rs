//! The suite against wasnap's native driver, and against backends broken on purpose to
//! prove that the cases can fail.

#![allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is what it should do

use std::path::Path;
use std::sync::Arc;

use wasnap::Context;
use wasnap::Wrapper;
use wasnap::{Backend, Error, Filter, Info, Labels, Mount, Result, Usage};
use wasnap_conformance::{Factory, Options, Outcome, Report, cases, open_native, run};

struct Native;

impl Factory for Native {
    fn name(&self) -> String {
        "native".into()
    }
    fn open(&self, dir: &Path) -> Result<Arc<dyn Backend>> {
        open_native(dir)
    }
}

fn show(report: &Report) -> String {
    let mut out = Vec::new();
    report.write_table(&mut out).unwrap();
    String::from_utf8(out).unwrap()
}

#[test]
fn the_native_driver_passes_every_case() {
    let report = run(&Native, &cases::all(), &Options::default());
    let table = show(&report);
    eprintln!("{table}");
    assert_eq!(report.failed(), 0, "{table}");
    assert!(report.results.len() >= 21 + 5 + 7, "every case ran:\n{table}");
    let root = rustix::process::geteuid().is_root();
    if root {
        assert_eq!(report.skipped(), 0, "as root nothing may skip:\n{table}");
    } else {
        assert!(std::env::var_os("CI").is_none(), "CI runs as root; here we are not");
        assert!(report.skipped() > 0, "without root the mounting cases say why they skip");
    }
}

struct OverlayDriver;

impl Factory for OverlayDriver {
    fn name(&self) -> String {
        "overlay".into()
    }
    fn open(&self, dir: &Path) -> Result<Arc<dyn Backend>> {
        let cap = cap_std::fs::Dir::open_ambient_dir(dir, cap_std::ambient_authority())
            .with_context(|| "open")?;
        let opts = wasnap::driver::overlay::OverlayOptions::default();
        let faults = Arc::new(wasnap::fault::Faults::new());
        Ok(Arc::new(wasnap::driver::Overlay::open(cap, dir.to_path_buf(), faults, opts)?))
    }
}

#[test]
fn the_overlay_driver_passes_every_case() {
    if !rustix::process::geteuid().is_root() {
        assert!(std::env::var_os("CI").is_none(), "CI runs as root; here we are not");
        eprintln!("skipped: overlay needs root");
        return;
    }
    let report = run(&OverlayDriver, &cases::all(), &Options::default());
    let table = show(&report);
    assert_eq!((report.failed(), report.skipped()), (0, 0), "{table}");
}

struct BtrfsDriver;

impl Factory for BtrfsDriver {
    fn name(&self) -> String {
        "btrfs".into()
    }
    fn open(&self, dir: &Path) -> Result<Arc<dyn Backend>> {
        let cap = cap_std::fs::Dir::open_ambient_dir(dir, cap_std::ambient_authority())
            .with_context(|| "open")?;
        let faults = Arc::new(wasnap::fault::Faults::new());
        Ok(Arc::new(wasnap::driver::Btrfs::open(cap, dir.to_path_buf(), faults)?))
    }
}

#[test]
fn the_btrfs_driver_passes_every_case_on_a_scratch_btrfs() {
    let fs = match wasnap_conformance::loopfs::LoopBtrfs::try_new(
        2048,
        Path::new(env!("CARGO_TARGET_TMPDIR")),
    ) {
        Ok(fs) => fs,
        Err(why) => {
            assert!(std::env::var_os("CI").is_none(), "{why}; CI must not skip");
            eprintln!("skipped: {why}");
            return;
        }
    };
    let opts = Options { base: fs.mountpoint.clone(), ..Options::default() };
    let report = run(&BtrfsDriver, &cases::all(), &opts);
    let table = show(&report);
    assert_eq!((report.failed(), report.skipped()), (0, 0), "{table}");
}

#[test]
fn every_containerd_case_is_present_by_name() {
    let names: Vec<&str> = cases::all().iter().map(|c| c.name).collect();
    for want in [
        "Basic",
        "StatActive",
        "StatCommitted",
        "Transitivity",
        "PrepareView",
        "Update",
        "Remove",
        "Walk",
        "LayerFileUpdate",
        "RemoveDirectoryInLowerLayer",
        "Chown",
        "DirectoryPermissionOnCommit",
        "RemoveIntermediateSnapshot",
        "DeletedFilesInChildSnapshot",
        "MoveFileFromLowerLayer",
        "ViewReadonly",
        "StatInWalk",
        "CloseTwice",
        "RootPermission",
        "Rename",
        "128LayersMount",
    ] {
        assert!(names.contains(&want), "containerd's {want} is missing");
    }
}

/// How a broken backend is broken.
#[derive(Clone, Copy, Debug)]
enum Flaw {
    /// Views come back mounted read-write.
    WritableViews,
    /// Remove ignores children and forgets to delete data.
    SloppyRemove,
    /// Cleanup throws away live snapshots.
    GreedyCleanup,
    /// Usage is always zero.
    NoUsage,
    /// Walk ignores its filter.
    UnfilteredWalk,
}

struct Broken {
    inner: Arc<dyn Backend>,
    flaw: Flaw,
}

impl Broken {
    fn fix_mounts(&self, key: &str, mut m: Vec<Mount>) -> Result<Vec<Mount>> {
        if matches!(self.flaw, Flaw::WritableViews)
            && self.inner.stat(key)?.kind == wasnap::Kind::View
        {
            for mount in &mut m {
                mount.options.retain(|o| o != "ro");
                mount.options.push("rw".into());
            }
        }
        Ok(m)
    }
}

impl Wrapper for Broken {
    fn inner(&self) -> &dyn Backend {
        &*self.inner
    }
    fn usage(&self, key: &str) -> Result<Usage> {
        match self.flaw {
            Flaw::NoUsage => self.inner.stat(key).map(|_| Usage::default()),
            _ => self.inner.usage(key),
        }
    }
    fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let m = self.inner.mounts(key)?;
        self.fix_mounts(key, m)
    }
    fn view(&self, key: &str, parent: Option<&str>, labels: &Labels) -> Result<Vec<Mount>> {
        let m = self.inner.view(key, parent, labels)?;
        self.fix_mounts(key, m)
    }
    fn remove(&self, key: &str) -> Result<()> {
        match self.flaw {
            // Says yes without checking for children or removing anything.
            Flaw::SloppyRemove => self.inner.stat(key).map(drop),
            _ => self.inner.remove(key),
        }
    }
    fn walk(&self, filter: &Filter, f: &mut dyn FnMut(Info) -> Result<()>) -> Result<()> {
        match self.flaw {
            Flaw::UnfilteredWalk => self.inner.walk(&Filter::default(), f),
            _ => self.inner.walk(filter, f),
        }
    }
    fn cleanup(&self) -> Result<()> {
        if let Flaw::GreedyCleanup = self.flaw {
            let mut keys = Vec::new();
            self.inner.walk(&Filter::default(), &mut |i| {
                keys.push((i.parent.is_some(), i.name));
                Ok(())
            })?;
            keys.sort();
            for (_, k) in keys.iter().rev() {
                let _ = self.inner.remove(k);
            }
            return Ok(());
        }
        self.inner.cleanup()
    }
}

struct BrokenFactory(Flaw);

impl Factory for BrokenFactory {
    fn name(&self) -> String {
        format!("native with {:?}", self.0)
    }
    fn open(&self, dir: &Path) -> Result<Arc<dyn Backend>> {
        Ok(Arc::new(Broken { inner: open_native(dir)?, flaw: self.0 }))
    }
}

fn outcome(report: &Report, case: &str) -> Outcome {
    report.results.iter().find(|r| r.name == case).map(|r| r.outcome.clone()).unwrap()
}

#[test]
fn broken_backends_fail_the_matching_cases() {
    let needs_mounts = rustix::process::geteuid().is_root();
    let expectations: &[(Flaw, &[&str], bool)] = &[
        (Flaw::WritableViews, &["CloseAndReopen"], true),
        (Flaw::SloppyRemove, &["ErrorClasses", "NamespaceIsolation", "RemoveOrder"], false),
        (Flaw::GreedyCleanup, &["CleanupKeepsLiveSnapshots"], true),
        (Flaw::NoUsage, &["UsageActiveAndCommitted"], true),
        (Flaw::UnfilteredWalk, &["ConcurrentPrepares"], true),
    ];
    for (flaw, cases_that_fail, mounts) in expectations {
        if *mounts && !needs_mounts {
            eprintln!("skipped {flaw:?}: its cases mount, which needs root");
            continue;
        }
        let opts = Options {
            patterns: cases_that_fail.iter().map(|s| s.to_string()).collect(),
            ..Options::default()
        };
        let report = run(&BrokenFactory(*flaw), &cases::all(), &opts);
        for case in *cases_that_fail {
            match outcome(&report, case) {
                Outcome::Failed(reason) => eprintln!("{flaw:?} fails {case}: {reason}"),
                other => panic!("{flaw:?} should fail {case}, got {other:?}\n{}", show(&report)),
            }
        }
    }
}

#[test]
fn a_broken_backend_is_reported_not_propagated() {
    struct Panicking;
    impl Factory for Panicking {
        fn name(&self) -> String {
            "panicking".into()
        }
        fn open(&self, _: &Path) -> Result<Arc<dyn Backend>> {
            Err(Error::unavailable("this backend cannot start"))
        }
    }
    let report = run(&Panicking, &cases::all(), &Options::default());
    assert_eq!(report.failed(), report.results.len(), "{}", show(&report));
    assert!(matches!(&report.results[0].outcome, Outcome::Failed(m) if m.contains("cannot start")));
    let mut json = Vec::new();
    report.write_json(&mut json).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
    assert_eq!(v["failed"], report.results.len());
    let mut xml = Vec::new();
    report.write_junit(&mut xml).unwrap();
    let xml = String::from_utf8(xml).unwrap();
    assert!(xml.contains("<testsuites") && xml.contains("<failure"), "{xml}");
}

#[test]
fn mounts_are_undone_even_when_a_case_panics_or_fails() {
    if !rustix::process::geteuid().is_root() {
        assert!(std::env::var_os("CI").is_none(), "CI runs as root; here we are not");
        eprintln!("skipped: needs root to mount");
        return;
    }
    fn panics_while_mounted(
        env: &wasnap_conformance::Env<'_>,
    ) -> std::result::Result<(), wasnap_conformance::Fail> {
        let b = env.open()?;
        let m = b.prepare("k", None, &Labels::new())?;
        let mounted = env.mount(&m)?;
        std::mem::forget(mounted); // leak the guard: only the harness can undo it now
        panic!("boom while mounted");
    }
    fn fails_while_mounted(
        env: &wasnap_conformance::Env<'_>,
    ) -> std::result::Result<(), wasnap_conformance::Fail> {
        let b = env.open()?;
        let m = b.prepare("k", None, &Labels::new())?;
        let _mounted = env.mount(&m)?;
        Err(wasnap_conformance::Fail::Failed("failed while mounted".into()))
    }
    let cases = [
        wasnap_conformance::Case {
            name: "HarnessPanicsWhileMounted",
            group: wasnap_conformance::Group::Extra,
            about: "",
            run: panics_while_mounted,
        },
        wasnap_conformance::Case {
            name: "HarnessFailsWhileMounted",
            group: wasnap_conformance::Group::Extra,
            about: "",
            run: fails_while_mounted,
        },
    ];
    let report = run(&Native, &cases, &Options::default());
    assert!(
        matches!(&report.results[0].outcome, Outcome::Failed(m) if m.contains("boom while mounted"))
    );
    assert!(
        matches!(&report.results[1].outcome, Outcome::Failed(m) if m.contains("failed while mounted"))
    );
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mountinfo.contains("wasnap-conformance-Harness"),
        "a mount survived its case:\n{mountinfo}"
    );
}

/// A guest of `guests/`, loaded as a backend plugin.
fn guest_backend(name: &str) -> wasnap_conformance::StackFactory {
    let path = wasnap_test_util::guests::path(name).unwrap_or_else(|e| panic!("{e}"));
    wasnap_conformance::StackFactory::plugin(wasnap::config::PluginConfig::new(path))
}

fn assert_passes_as_root(factory: &dyn Factory) {
    let report = run(factory, &cases::all(), &Options::default());
    let table = show(&report);
    eprintln!("{table}");
    assert_eq!(report.failed(), 0, "{table}");
    if rustix::process::geteuid().is_root() {
        assert_eq!(report.skipped(), 0, "as root nothing may skip:\n{table}");
    } else {
        assert!(std::env::var_os("CI").is_none(), "CI runs as root; here we are not");
    }
}

#[test]
fn the_copy_guest_passes_every_case() {
    assert_passes_as_root(&guest_backend("copy"));
}

#[test]
fn the_overlay_layout_guest_passes_every_case() {
    if !rustix::process::geteuid().is_root() {
        assert!(std::env::var_os("CI").is_none(), "CI runs as root; here we are not");
        eprintln!("skipped: overlay needs root");
        return;
    }
    assert_passes_as_root(&guest_backend("overlay-layout"));
}

/// The example policies, each in front of the native driver with its default
/// configuration, change nothing a snapshotter must do.
#[test]
fn the_example_policies_pass_every_case_in_front_of_native() {
    for name in ["label-policy", "quota"] {
        let path = wasnap_test_util::guests::path(name).unwrap_or_else(|e| panic!("{e}"));
        let factory = wasnap_conformance::StackFactory::native()
            .with_policies(vec![wasnap::config::PluginConfig::new(path)]);
        assert_passes_as_root(&factory);
    }
}

/// A policy that sets a label passes once the suite is told which label is the
/// policy's; told nothing, the cases that compare labels see it and fail.
#[test]
fn a_label_setting_policy_passes_when_its_labels_are_named() {
    let path = wasnap_test_util::guests::path("label-policy").unwrap_or_else(|e| panic!("{e}"));
    let mut policy = wasnap::config::PluginConfig::new(path);
    let set = serde_json::json!({"set": {"containerd.io/snapshot/team": "blue"}});
    policy.config = Some(toml::Value::try_from(set).unwrap());
    let factory = wasnap_conformance::StackFactory::native().with_policies(vec![policy]);

    let report = run(&factory, &cases::all(), &Options::default());
    for case in ["Update", "CloseAndReopen"] {
        assert!(
            matches!(outcome(&report, case), Outcome::Failed(why) if why.contains("team")),
            "{case}: {:?}",
            outcome(&report, case)
        );
    }
    assert_passes_as_root(&factory.ignoring_labels(vec!["containerd.io/snapshot/team".into()]));
}

#[test]
fn the_sdk_readme_guest_is_the_one_tested_and_passes_every_case() {
    let root = wasnap_test_util::guests::workspace_root();
    let readme = std::fs::read_to_string(root.join("sdk/README.md")).unwrap();
    let step2 = readme.split("### 2. A snapshotter").nth(1).unwrap();
    let code = step2.split("```rust\n").nth(1).unwrap().split("```").next().unwrap();
    let example = std::fs::read_to_string(root.join("examples/minimal-guest/src/lib.rs")).unwrap();
    assert!(
        example.ends_with(code),
        "examples/minimal-guest/src/lib.rs must end with sdk/README.md's step 2 verbatim"
    );
    assert_passes_as_root(&guest_backend("myplugin"));
}
