//! The example policies (`guests/label-policy`, `guests/quota`) in front of the native
//! driver: what they refuse, what they rewrite, and that configured permissively they
//! leave every conformance case passing. And the test-only `chaos` policy, which dies
//! before or after the backend does a call: what the host makes of each death.

use std::path::Path;
use std::sync::Arc;

use cap_std::ambient_authority;
use cap_std::fs::Dir;
use serde_json::json;
use tempfile::TempDir;
use wasnap::config::PluginConfig;
use wasnap::fault::Faults;
use wasnap::plugin::{Limits, WasmSnapshotter};
use wasnap::{Backend, Error, ErrorKind, FieldPath, Snapshotter};
use wasnap_conformance::{Options, StackFactory, cases, open_native, run};

use super::{no_labels, plugin};
use crate::common::{backend_keys, ctx, is_root, labels, metadb, source, tmp};

const SECRET: &str = "containerd.io/snapshot/secret.token";
const OWNER: &str = "containerd.io/snapshot/owner";
const DEBUG: &str = "containerd.io/snapshot/debug.trace";
const MANAGED: &str = "containerd.io/snapshot/managed-by";

/// The policy `name` in front of a native driver, both in one fresh directory.
struct Chain {
    dir: TempDir,
    native: Arc<dyn Backend>,
    policy: Arc<dyn Backend>,
}

fn subdir(root: &Path, name: &str) -> std::path::PathBuf {
    let path = root.join(name);
    std::fs::create_dir(&path).unwrap();
    path.canonicalize().unwrap()
}

fn chain(name: &str, config: serde_json::Value) -> Chain {
    chain_with(name, config, Limits::default())
}

fn chain_with(name: &str, config: serde_json::Value, limits: Limits) -> Chain {
    let dir = tmp();
    let native = open_native(&subdir(dir.path(), "native")).unwrap();
    let path = subdir(dir.path(), "policy");
    let cap = Dir::open_ambient_dir(&path, ambient_authority()).unwrap();
    let policy =
        WasmSnapshotter::open_in(plugin(name), &cap, &path, Some(native.clone()), limits, &config)
            .unwrap();
    Chain { dir, native, policy: Arc::new(policy) }
}

impl Chain {
    /// The host's metadata layer over the chain, as the daemon stacks them.
    fn metadata(&self) -> Snapshotter {
        Snapshotter::new(
            metadb(self.dir.path()),
            "test",
            self.policy.clone(),
            Arc::new(Faults::new()),
        )
    }
}

fn expect(r: wasnap::Result<impl std::fmt::Debug>, kind: ErrorKind, says: &str) -> Error {
    let e = r.expect_err("the policy refuses");
    assert_eq!(e.kind(), kind, "{e}");
    assert!(e.to_string().contains(says), "{e:?} does not say {says:?}");
    e
}

#[test]
fn label_policy_refuses_a_denied_label_and_nothing_is_created() {
    let c = chain("label-policy", json!({"deny": ["containerd.io/snapshot/secret.*"]}));
    let denied = labels(&[(SECRET, "x"), (OWNER, "me")]);
    let says =
        format!(r#"label "{SECRET}" is refused by rule deny "containerd.io/snapshot/secret.*""#);

    // Straight to the chain, as the metadata layer calls it.
    expect(c.policy.prepare("ns1/1/k", None, &denied), ErrorKind::InvalidArgument, &says);
    expect(c.policy.view("ns1/2/v", None, &denied), ErrorKind::InvalidArgument, &says);
    assert!(backend_keys(c.native.as_ref()).is_empty());

    // Through the metadata layer: the caller sees the same refusal, nothing is recorded.
    let sn = c.metadata();
    let ns = ctx("ns1");
    expect(sn.prepare(&ns, "k", None, &denied), ErrorKind::InvalidArgument, &says);
    assert!(crate::common::list(&sn, &ns, &[]).unwrap().is_empty());
    assert!(backend_keys(c.native.as_ref()).is_empty());

    // Commit is judged too, and a refused commit leaves the active snapshot as it was.
    sn.prepare(&ns, "active", None, &labels(&[(OWNER, "me")])).unwrap();
    expect(sn.commit(&ns, "done", "active", &denied), ErrorKind::InvalidArgument, &says);
    let kinds: Vec<_> = backend_keys(c.native.as_ref()).into_iter().map(|i| i.kind).collect();
    assert_eq!(kinds, [wasnap::Kind::Active]);
    sn.commit(&ns, "done", "active", &labels(&[(OWNER, "me")])).unwrap();

    // An update that would add a denied label changes neither layer.
    let mut info = sn.stat(&ns, "done").unwrap();
    info.labels.insert(SECRET.into(), "y".into());
    expect(sn.update(&ns, &info, &[]), ErrorKind::InvalidArgument, &says);
    assert_eq!(sn.stat(&ns, "done").unwrap().labels, labels(&[(OWNER, "me")]));
}

#[test]
fn label_policy_rewrites_show_in_the_backend() {
    let c = chain(
        "label-policy",
        json!({"remove": ["containerd.io/snapshot/debug.*"], "set": {MANAGED: "wasnap"},
               "require": [OWNER], "max_labels": 3}),
    );
    let sn = c.metadata();
    let ns = ctx("ns1");
    sn.prepare(&ns, "k", None, &labels(&[(OWNER, "me"), (DEBUG, "on")])).unwrap();
    let bkey = backend_keys(c.native.as_ref()).remove(0).name;
    assert_eq!(c.native.stat(&bkey).unwrap().labels, labels(&[(OWNER, "me"), (MANAGED, "wasnap")]));
    // The metadata layer keeps what the caller gave.
    assert_eq!(sn.stat(&ns, "k").unwrap().labels, labels(&[(OWNER, "me"), (DEBUG, "on")]));

    // Commit, and an update naming one label, are rewritten the same way.
    sn.commit(&ns, "c", "k", &labels(&[(OWNER, "you"), (MANAGED, "someone")])).unwrap();
    let cname = backend_keys(c.native.as_ref()).remove(0).name;
    assert_eq!(
        c.native.stat(&cname).unwrap().labels,
        labels(&[(OWNER, "you"), (MANAGED, "wasnap")])
    );
    let mut info = c.policy.stat(&cname).unwrap();
    info.labels = labels(&[(DEBUG, "again")]);
    let updated =
        c.policy.update(&info, &[FieldPath::Label(DEBUG.into()), FieldPath::Label(MANAGED.into())]);
    assert_eq!(updated.unwrap().labels, labels(&[(OWNER, "you"), (MANAGED, "wasnap")]));

    // What the rules require is checked after rewriting.
    let e = expect(
        sn.prepare(&ns, "no-owner", None, &labels(&[(DEBUG, "on")])),
        ErrorKind::InvalidArgument,
        &format!(r#"label "{OWNER}" is missing (rule require "{OWNER}")"#),
    );
    assert!(e.to_string().contains("label-policy: prepare"), "{e}");
    expect(
        c.policy.prepare(
            "ns1/9/many",
            None,
            &labels(&[
                (OWNER, "me"),
                ("containerd.io/snapshot/a", "1"),
                ("containerd.io/snapshot/b", "2"),
            ]),
        ),
        ErrorKind::InvalidArgument,
        "4 labels (after rewriting) are more than rule max_labels 3",
    );
}

/// What a policy passes on is checked as the metadata layer checks a caller's labels:
/// a label over containerd's size limit (here one the host was not given through the
/// metadata layer, which a permissive policy passes on as it is) refuses the call, and
/// the snapshotter behind it stores nothing.
#[test]
fn labels_a_policy_passes_on_are_checked() {
    let big = "x".repeat(wasnap::snapshot::MAX_LABEL_SIZE);
    let big = labels(&[(MANAGED, big.as_str())]);
    let c = chain("label-policy", json!({}));
    let says = "greater than maximum size";
    expect(c.policy.prepare("ns1/1/k", None, &big), ErrorKind::InvalidArgument, says);
    expect(c.policy.view("ns1/2/v", None, &big), ErrorKind::InvalidArgument, says);
    assert!(backend_keys(c.native.as_ref()).is_empty());
    c.native.prepare("ns1/3/a", None, &no_labels()).unwrap();
    expect(c.policy.commit("ns1/4/c", "ns1/3/a", &big), ErrorKind::InvalidArgument, says);
    let kinds: Vec<_> = backend_keys(c.native.as_ref()).into_iter().map(|i| i.kind).collect();
    assert_eq!(kinds, [wasnap::Kind::Active], "the commit was not passed on");
}

#[test]
fn label_policy_refuses_a_configuration_that_cannot_work() {
    let dir = tmp();
    let native = open_native(&subdir(dir.path(), "native")).unwrap();
    let path = subdir(dir.path(), "policy");
    let cap = Dir::open_ambient_dir(&path, ambient_authority()).unwrap();
    let err = WasmSnapshotter::open_in(
        plugin("label-policy"),
        &cap,
        &path,
        Some(native),
        Limits::default(),
        &json!({"deny": ["containerd.io/*/x"]}),
    )
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    assert!(err.to_string().contains("'*' may only end a pattern"), "{err}");
}

#[test]
fn quota_limits_active_snapshots_per_namespace() {
    let c = chain("quota", json!({"max_active": 3}));
    let sn = c.metadata();
    let (ns1, ns2) = (ctx("ns1"), ctx("ns2"));
    for k in ["a", "b", "c"] {
        sn.prepare(&ns1, k, None, &no_labels()).unwrap();
    }
    let full = r#"quota: namespace "ns1" has 3 active snapshots (limit 3)"#;
    expect(sn.prepare(&ns1, "d", None, &no_labels()), ErrorKind::FailedPrecondition, full);
    assert_eq!(backend_keys(c.native.as_ref()).len(), 3, "the refused prepare made nothing");

    // Another namespace has its own count; views are not active and not counted.
    for k in ["a", "b", "c"] {
        sn.prepare(&ns2, k, None, &no_labels()).unwrap();
    }
    sn.view(&ns1, "v", None, &no_labels()).unwrap();
    expect(sn.prepare(&ns1, "d", None, &no_labels()), ErrorKind::FailedPrecondition, full);

    // Removing an active snapshot, or committing it, frees a slot.
    sn.remove(&ns1, "a").unwrap();
    sn.prepare(&ns1, "d", None, &no_labels()).unwrap();
    expect(sn.prepare(&ns1, "e", None, &no_labels()), ErrorKind::FailedPrecondition, full);
    sn.commit(&ns1, "b-done", "b", &no_labels()).unwrap();
    sn.prepare(&ns1, "e", Some("b-done"), &no_labels()).unwrap();
    expect(sn.prepare(&ns1, "f", None, &no_labels()), ErrorKind::FailedPrecondition, full);

    // A snapshot removed behind the policy's back frees its slot once the namespace is
    // at its limit (the policy checks what it counted against the backend).
    let behind = backend_keys(c.native.as_ref())
        .into_iter()
        .map(|i| i.name)
        .find(|k| k.starts_with("ns1/") && k.ends_with("/e"))
        .expect("ns1's e");
    c.native.remove(&behind).unwrap();
    sn.prepare(&ns1, "f", None, &no_labels()).unwrap();
    let full_again = r#"quota: namespace "ns1" has 3 active snapshots (limit 3)"#;
    expect(sn.prepare(&ns1, "g", None, &no_labels()), ErrorKind::FailedPrecondition, full_again);

    // A policy put in front of existing snapshots counts them (its count is seeded from
    // the backend the first time it sees a namespace).
    let again = WasmSnapshotter::open_in(
        plugin("quota"),
        &Dir::open_ambient_dir(subdir(c.dir.path(), "policy-2"), ambient_authority()).unwrap(),
        &c.dir.path().join("policy-2").canonicalize().unwrap(),
        Some(c.native.clone()),
        Limits::default(),
        &json!({"max_active": 3}),
    )
    .unwrap();
    expect(again.prepare("ns1/999/h", None, &no_labels()), ErrorKind::FailedPrecondition, full);
    again.prepare("ns3/999/h", None, &no_labels()).unwrap();
}

#[test]
fn quota_limits_bytes_per_namespace() {
    const LIMIT: u64 = 1 << 20;
    let c = chain("quota", json!({"max_bytes": LIMIT}));
    let sn = c.metadata();
    let (ns1, ns2) = (ctx("ns1"), ctx("ns2"));
    let mounts = sn.prepare(&ns1, "a", None, &no_labels()).unwrap();
    sn.prepare(&ns1, "small", None, &no_labels()).unwrap();
    // The native driver's bind source is a host directory: write into it directly.
    std::fs::write(source(&mounts).join("big"), vec![0x5a_u8; 2 * LIMIT as usize]).unwrap();

    let e = expect(
        sn.prepare(&ns1, "b", None, &no_labels()),
        ErrorKind::FailedPrecondition,
        r#"quota: namespace "ns1" uses "#,
    );
    assert!(e.to_string().contains(&format!("bytes (limit {LIMIT})")), "{e}");
    expect(sn.view(&ns1, "v", None, &no_labels()), ErrorKind::FailedPrecondition, "uses");
    assert_eq!(backend_keys(c.native.as_ref()).len(), 2, "the refused calls made nothing");
    sn.prepare(&ns2, "b", None, &no_labels()).unwrap();

    // Committed layers count too: committing does not free the bytes, removing does.
    sn.commit(&ns1, "a-done", "a", &no_labels()).unwrap();
    expect(sn.prepare(&ns1, "b", None, &no_labels()), ErrorKind::FailedPrecondition, "uses");
    sn.remove(&ns1, "a-done").unwrap();
    sn.prepare(&ns1, "b", None, &no_labels()).unwrap();
}

#[test]
fn quota_holds_when_prepares_race_for_the_last_slots() {
    const LIMIT: usize = 3;
    let limits = Limits { instances: 8, ..Limits::default() };
    let c = chain_with("quota", json!({"max_active": LIMIT}), limits);
    let results: Vec<wasnap::Result<()>> = std::thread::scope(|s| {
        let racers: Vec<_> = (0..8)
            .map(|i| {
                let policy = c.policy.clone();
                s.spawn(move || policy.prepare(&format!("ns1/{i}/k"), None, &no_labels()).map(drop))
            })
            .collect();
        racers.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let admitted = results.iter().filter(|r| r.is_ok()).count();
    for e in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
    }
    let left = backend_keys(c.native.as_ref());
    assert_eq!(left.len(), admitted, "refused prepares left nothing: {left:?}");
    // Slots are reserved in one key-value transaction: exactly the limit gets in.
    assert_eq!(admitted, LIMIT, "{admitted} prepares admitted, limit {LIMIT}");
}

#[test]
fn quota_counts_keys_without_a_namespace_together() {
    let c = chain("quota", json!({"max_active": 1}));
    c.policy.prepare("plain", None, &no_labels()).unwrap();
    expect(
        c.policy.prepare("other", None, &no_labels()),
        ErrorKind::FailedPrecondition,
        "quota: keys without a namespace have 1 active snapshots (limit 1)",
    );
    c.policy.prepare("ns/1/k", None, &no_labels()).unwrap();
}

/// Runs the whole suite with `policy` configured by `config` in front of the native
/// driver; as root nothing may skip.
fn suite_passes_with(policy: &str, config: serde_json::Value) {
    let mut p = PluginConfig::new(super::guest(policy));
    p.config = Some(toml::Value::try_from(config).unwrap());
    let factory = StackFactory::native().with_policies(vec![p]);
    let report = run(&factory, &cases::all(), &Options::default());
    let mut out = Vec::new();
    report.write_table(&mut out).unwrap();
    let table = String::from_utf8(out).unwrap();
    assert_eq!(report.failed(), 0, "{table}");
    assert!(report.results.len() >= 21 + 5 + 7, "every case ran:\n{table}");
    if is_root() {
        assert_eq!(report.skipped(), 0, "as root nothing may skip:\n{table}");
    } else {
        assert!(std::env::var_os("CI").is_none(), "CI runs as root; here we are not");
    }
}

#[test]
fn the_suite_passes_through_a_permissive_label_policy() {
    suite_passes_with(
        "label-policy",
        json!({"deny": ["containerd.io/snapshot/forbidden.*"],
               "remove": ["containerd.io/snapshot/never-given"], "max_labels": 1000}),
    );
}

#[test]
fn the_suite_passes_through_a_generous_quota() {
    suite_passes_with("quota", json!({"max_active": 10_000, "max_bytes": 1_u64 << 40}));
}

/// `chaos` in front of native, killing every `calls` call with each fault in turn, at
/// `when`; a hang costs 300 ms.
fn chaos_chains(calls: &[&str], when: &str) -> Vec<(&'static str, Chain)> {
    let limits = Limits { timeout_ms: 300, memory_mib: 32, ..Limits::default() };
    ["trap", "oom", "hang"]
        .into_iter()
        .map(|fault| {
            let config = json!({"percent": 100, "calls": calls, "faults": [fault], "when": when});
            (fault, chain_with("chaos", config, limits.clone()))
        })
        .collect()
}

#[test]
fn a_policy_calling_its_next_snapshotter_without_end_is_stopped() {
    // Time in the next snapshotter is not charged to a policy's deadline, so only the
    // number of its calls there stops a policy that loops on them.
    let limits = Limits { next_calls: 50, ..Limits::default() };
    let config = json!({"percent": 100, "calls": ["prepare"], "faults": ["flood"]});
    let c = chain_with("chaos", config, limits);
    for key in ["k1", "k2"] {
        let started = std::time::Instant::now();
        let err = c.policy.prepare(key, None, &no_labels()).unwrap_err();
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "{key}");
        assert_eq!(err.kind(), ErrorKind::Unavailable, "{key}: {err}");
        // 50 served, the 51st refused: each call has its own count.
        let text = err.to_string();
        assert!(text.contains("call 51 failed") && text.contains("next_calls"), "{key}: {text}");
    }
    assert!(in_backend(&c).is_empty());
    let bad = Limits { next_calls: 0, ..Limits::default() };
    let dir = tmp();
    let cap = Dir::open_ambient_dir(dir.path(), ambient_authority()).unwrap();
    let err = WasmSnapshotter::open_in(plugin("chaos"), &cap, dir.path(), None, bad, &json!({}))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
}

/// The backend's snapshots as (name, kind), sorted.
fn in_backend(c: &Chain) -> Vec<(String, wasnap::Kind)> {
    backend_keys(c.native.as_ref()).into_iter().map(|i| (i.name, i.kind)).collect()
}

#[test]
fn a_guest_dying_after_the_backend_committed_leaves_the_commit_done() {
    for (fault, c) in chaos_chains(&["commit"], "after") {
        let sn = c.metadata();
        let ns = ctx("ns1");
        sn.prepare(&ns, "a", None, &no_labels()).unwrap();
        // The backend committed; the host asks it which key it holds and finishes the
        // commit, instead of putting back an active record whose data has moved.
        sn.commit(&ns, "c", "a", &labels(&[(OWNER, "me")]))
            .unwrap_or_else(|e| panic!("{fault}: the commit was done: {e}"));
        let info = sn.stat(&ns, "c").unwrap();
        assert_eq!(info.kind, wasnap::Kind::Committed, "{fault}");
        assert_eq!(info.labels, labels(&[(OWNER, "me")]), "{fault}");
        let e = sn.stat(&ns, "a").expect_err("the active snapshot is gone");
        assert_eq!(e.kind(), ErrorKind::NotFound, "{fault}: {e}");
        let backend = in_backend(&c);
        assert_eq!(backend.len(), 1, "{fault}: {backend:?}");
        assert_eq!(backend[0].1, wasnap::Kind::Committed, "{fault}");
        // The committed snapshot is usable: a child of it, and its removal.
        sn.prepare(&ns, "b", Some("c"), &no_labels()).unwrap();
        sn.remove(&ns, "b").unwrap();
        sn.remove(&ns, "c").unwrap();
        assert!(in_backend(&c).is_empty(), "{fault}");
    }
}

#[test]
fn a_guest_dying_before_the_backend_committed_leaves_the_active_snapshot() {
    for (fault, c) in chaos_chains(&["commit"], "before") {
        let sn = c.metadata();
        let ns = ctx("ns1");
        sn.prepare(&ns, "a", None, &no_labels()).unwrap();
        let e = sn.commit(&ns, "c", "a", &no_labels()).expect_err("the guest died");
        assert!(matches!(e.kind(), ErrorKind::Internal | ErrorKind::Unavailable), "{fault}: {e}");
        assert_eq!(sn.stat(&ns, "a").unwrap().kind, wasnap::Kind::Active, "{fault}");
        assert_eq!(sn.stat(&ns, "c").unwrap_err().kind(), ErrorKind::NotFound, "{fault}");
        let backend = in_backend(&c);
        assert_eq!(backend.len(), 1, "{fault}: {backend:?}");
        assert_eq!(backend[0].1, wasnap::Kind::Active, "{fault}");
        // Not left marked as committing: it can be removed.
        sn.remove(&ns, "a").unwrap();
        assert!(in_backend(&c).is_empty(), "{fault}");
    }
}

#[test]
fn a_guest_dying_after_the_backend_made_a_snapshot_leaves_nothing() {
    for (fault, c) in chaos_chains(&["prepare", "view"], "after") {
        let sn = c.metadata();
        let ns = ctx("ns1");
        for view in [false, true] {
            let made = if view {
                sn.view(&ns, "v", None, &no_labels())
            } else {
                sn.prepare(&ns, "a", None, &no_labels())
            };
            let e = made.expect_err("the guest died");
            assert!(
                matches!(e.kind(), ErrorKind::Internal | ErrorKind::Unavailable),
                "{fault}: {e}"
            );
            assert!(crate::common::list(&sn, &ns, &[]).unwrap().is_empty(), "{fault}");
            // What the backend made is removed with the failure, not left to pruning.
            assert!(in_backend(&c).is_empty(), "{fault} (view {view}): {:?}", in_backend(&c));
        }
    }
}
