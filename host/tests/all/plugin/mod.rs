//! WebAssembly plugins: loading, the sandbox's limits, and guests that misbehave on
//! purpose (`guests/adversary`, `guests/wrong-version`). Each misbehaviour must end in a
//! clear, typed error for that call only: the host stays up, the instance is replaced,
//! and another plugin's calls go on succeeding during and after.

mod contain;
mod load;
mod policies;
mod reload;
mod sandbox;

use std::path::PathBuf;
use std::sync::Arc;

use wasnap::plugin::{Limits, Plugin, WasmSnapshotter};
use wasnap::{Backend, Labels};

use crate::common::tmp;

/// The built guest `name`; building the guests is part of the test.
pub fn guest(name: &str) -> PathBuf {
    wasnap_test_util::guests::path(name).unwrap_or_else(|e| panic!("{e}"))
}

/// The plugin `name`, compiled once per test process.
pub fn plugin(name: &str) -> Arc<Plugin> {
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    static LOADED: Mutex<BTreeMap<String, Arc<Plugin>>> = Mutex::new(BTreeMap::new());
    let mut loaded = LOADED.lock().unwrap();
    if let Some(p) = loaded.get(name) {
        return p.clone();
    }
    let wasm = std::fs::read(guest(name)).unwrap();
    let p = Plugin::load(name, &wasm, None).unwrap();
    loaded.insert(name.to_owned(), p.clone());
    p
}

/// A backend plugin in a fresh root on tmpfs; the root lives as long as the result.
#[derive(Debug)]
pub struct Running {
    pub s: Arc<WasmSnapshotter>,
    pub root: tempfile::TempDir,
}

pub fn open(name: &str, config: serde_json::Value, limits: Limits) -> wasnap::Result<Running> {
    open_plugin(plugin(name), config, limits)
}

pub fn open_plugin(
    plugin: Arc<Plugin>,
    config: serde_json::Value,
    limits: Limits,
) -> wasnap::Result<Running> {
    let root = tmp();
    let path = root.path().canonicalize().unwrap();
    let dir = cap_std::fs::Dir::open_ambient_dir(&path, cap_std::ambient_authority()).unwrap();
    let s = WasmSnapshotter::open_in(plugin, &dir, &path, None, limits, &config)?;
    Ok(Running { s: Arc::new(s), root })
}

pub fn no_labels() -> Labels {
    Labels::new()
}

/// Limits with a short deadline and a small memory, so misbehaviour ends quickly.
pub fn tight() -> Limits {
    Limits { memory_mib: 64, timeout_ms: 500, ..Limits::default() }
}

/// Runs `f` while another, well-behaved plugin serves a stream of calls on another
/// thread; fails if any of those calls fails, or if none ran while `f` did.
pub fn while_another_plugin_works<R>(f: impl FnOnce() -> R) -> R {
    let good = open("adversary", serde_json::Value::Null, Limits::default()).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let worker = {
        let (s, stop) = (good.s.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = format!("k{n}");
                s.prepare(&key, None, &Labels::new()).unwrap();
                s.stat(&key).unwrap();
                s.remove(&key).unwrap();
                n += 1;
            }
            n
        })
    };
    let r = f();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let done = worker.join().expect("the other plugin's calls all succeeded");
    assert!(done > 0, "the other plugin served calls meanwhile");
    // ...and after.
    good.s.prepare("after", None, &Labels::new()).unwrap();
    r
}
