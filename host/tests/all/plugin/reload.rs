//! Reloading a plugin under load: new calls go to the new version, calls in flight finish
//! on the old one, and a version that does not start leaves the old one serving.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use wasnap::Host;
use wasnap::config::{Config, DriverConfig, PluginConfig, SnapshotterConfig};
use wasnap::fault::Faults;
use wasnap::plugin::Limits;
use wasnap::root::{ReloadOutcome, ReloadReport};

use super::guest;
use crate::common::{ctx, tmp};

/// `wasm` with a custom section appended: the same plugin, another digest (what a
/// rebuild with a changed version string gives).
fn variant(wasm: &[u8], tag: &str) -> Vec<u8> {
    let name = b"wasnap-test-version";
    let mut body = vec![name.len() as u8];
    body.extend_from_slice(name);
    body.extend_from_slice(tag.as_bytes());
    assert!(body.len() < 128, "one-byte LEB128 size");
    let mut out = wasm.to_vec();
    out.push(0); // custom section
    out.push(body.len() as u8);
    out.extend_from_slice(&body);
    out
}

/// Puts `bytes` at `path` the way a deploy does: a new file renamed over the old.
fn deploy(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn config(path: &Path, plugin_config: Option<toml::Value>) -> Config {
    let mut plugin = PluginConfig::new(path);
    plugin.config = plugin_config;
    plugin.limits = Limits { instances: 4, ..Limits::default() };
    let mut config = Config::default();
    config.snapshotters.clear();
    config.snapshotters.insert("c".into(), SnapshotterConfig::from(DriverConfig::Wasm(plugin)));
    config.snapshotters.insert("n".into(), SnapshotterConfig::from(DriverConfig::Native));
    config.default_snapshotter = "c".into();
    config
}

fn only(reports: Vec<ReloadReport>) -> ReloadReport {
    assert_eq!(reports.len(), 1, "{reports:?}");
    reports.into_iter().next().unwrap()
}

#[test]
fn a_reload_under_load_fails_no_call_and_a_broken_version_keeps_the_old_one_serving() {
    let dir = tmp();
    let plugins = tmp();
    let wasm = std::fs::read(guest("copy")).unwrap();
    let path: PathBuf = plugins.path().join("copy.wasm");
    deploy(&path, &variant(&wasm, "1"));
    let host = Arc::new(
        Host::open_config(dir.path(), Arc::new(Faults::new()), config(&path, None)).unwrap(),
    );
    let sn = host.snapshotter("c").unwrap();
    let digest = || host.loaded_plugins()[0].wasm.plugin().info().digest.clone();
    let first = digest();

    // Clients: prepare, commit, view and remove, over and over, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (sn, stop, done) = (sn.clone(), stop.clone(), done.clone());
            std::thread::spawn(move || -> Result<(), String> {
                let cx = ctx("default");
                let none = wasnap::Labels::new();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let (a, b, v) = (format!("a{c}-{i}"), format!("b{c}-{i}"), format!("v{c}-{i}"));
                    let step = |what: &str, r: wasnap::Result<()>| {
                        r.map_err(|e| format!("client {c} call {i}: {what}: {e}"))
                    };
                    step("prepare", sn.prepare(&cx, &a, None, &none).map(drop))?;
                    step("commit", sn.commit(&cx, &b, &a, &none))?;
                    step("view", sn.view(&cx, &v, Some(&b), &none).map(drop))?;
                    step("remove view", sn.remove(&cx, &v))?;
                    step("remove", sn.remove(&cx, &b))?;
                    done.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
                Ok(())
            })
        })
        .collect();
    // Each step waits until the clients have made progress on the version now serving.
    let progress = |what: &str| {
        let from = done.load(Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(60);
        while done.load(Ordering::Relaxed) < from + 20 {
            assert!(Instant::now() < deadline, "no progress after {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    progress("start");

    // Unchanged file: nothing to do.
    let r = only(host.reload(&[], None).unwrap());
    assert_eq!((r.outcome, r.plugin.as_str()), (ReloadOutcome::Unchanged, "c"), "{r:?}");

    // A new version takes over; the old one's counters stop once its calls finish.
    deploy(&path, &variant(&wasm, "2"));
    let old = host.loaded_plugins()[0].wasm.plugin();
    let r = only(host.reload(&["c".into()], None).unwrap());
    assert_eq!(r.outcome, ReloadOutcome::Reloaded, "{r:?}");
    assert_eq!(r.from, first);
    assert_ne!(r.to, first);
    assert_eq!(digest(), r.to);
    let second = r.to.clone();
    progress("the new version");
    let settled = old.counters().snapshot().calls;
    progress("the new version, again");
    assert_eq!(old.counters().snapshot().calls, settled, "calls still reach the old version");
    assert_eq!(old.counters().snapshot().live, 0, "the old version's instances are gone");
    assert!(host.loaded_plugins()[0].wasm.plugin().counters().snapshot().calls > 0);

    // Versions that cannot serve: not a component, the wrong world, an init that fails.
    let broken: [(&str, Vec<u8>, Option<toml::Value>, &str); 3] = [
        ("garbage", b"\0asm\x0d\0\x01\0garbage".to_vec(), None, "compile plugin"),
        (
            "a policy",
            std::fs::read(guest("label-policy")).unwrap(),
            None,
            "cannot change a plugin's world",
        ),
        ("init fails", variant(&wasm, "3"), Some(toml::toml! { unknown = 1 }.into()), "init"),
    ];
    for (what, bytes, plugin_config, says) in broken {
        deploy(&path, &bytes);
        let new_config = config(&path, plugin_config);
        let r = only(host.reload(&[], Some(&new_config)).unwrap());
        assert_eq!(r.outcome, ReloadOutcome::Failed, "{what}: {r:?}");
        let error = r.error.unwrap();
        assert!(error.contains(says), "{what}: {error}");
        assert_eq!(digest(), second, "{what}: the old version serves");
        let loaded = &host.loaded_plugins()[0];
        assert_eq!(loaded.reload_error.as_ref().unwrap().0, error, "{what}: status says why");
        progress(what);
    }

    // A configuration that changes more than the plugin's settings is refused.
    let mut reshaped = config(&path, None);
    reshaped.snapshotters.get_mut("c").unwrap().sync_commits = false;
    deploy(&path, &variant(&wasm, "4"));
    let r = only(host.reload(&[], Some(&reshaped)).unwrap());
    assert_eq!(r.outcome, ReloadOutcome::Failed);
    assert!(r.error.unwrap().contains("next start"));
    assert_eq!(digest(), second);

    // And a good version after all that serves, with the failure cleared.
    let r = only(host.reload(&[], Some(&config(&path, None))).unwrap());
    assert_eq!(r.outcome, ReloadOutcome::Reloaded, "{r:?}");
    assert_eq!((r.from.as_str(), digest()), (second.as_str(), r.to.clone()));
    assert!(host.loaded_plugins()[0].reload_error.is_none());
    progress("the last version");

    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap().unwrap_or_else(|e| panic!("a call failed during the reloads: {e}"));
    }
    // A change to a snapshotter without plugins is reported too, not silently dropped.
    let mut native_changed = config(&path, None);
    native_changed.snapshotters.get_mut("n").unwrap().sync_commits = false;
    let reports = host.reload(&[], Some(&native_changed)).unwrap();
    let outcomes: Vec<_> = reports.iter().map(|r| (r.plugin.as_str(), r.outcome)).collect();
    assert_eq!(outcomes, [("c", ReloadOutcome::Unchanged), ("n", ReloadOutcome::Failed)]);
    let err = host.reload(&["nope".into()], None).unwrap_err();
    assert!(err.to_string().contains("configured: c, n"), "{err}");
    let err = host.reload(&["n".into()], None).unwrap_err();
    assert!(err.to_string().contains("runs no plugin"), "{err}");
    host.close().unwrap();
}
