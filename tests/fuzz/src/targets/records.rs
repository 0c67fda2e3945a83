//! `records`: what a root's database holds, decoded: the metadata's records (JSON
//! `Record`s, commit `Intent`s, leases, content, and the tables that link them), the
//! native driver's records (`driver::storage`), a driver database of an older root
//! (imported at open), and the redb file itself.
//!
//! A template root is made once per process through the public API (two namespaces,
//! a committed chain, an active snapshot, a view, leases with resources). Each input
//! (JSON, see [`Input`]) copies it, changes its database (rows put, patched, moved or
//! deleted; or the file's bytes changed, cut or replaced) and opens it with
//! `wasnap::Host`, then reads and writes everything it can: stat, mounts, usage, walks
//! with filters, `du`, prepare, commit, update, remove, leases, `check`, collection.
//!
//! Properties: opening gives a typed error or a working host; no call panics (on any
//! thread) or hangs; whatever a call answers, it is a typed error or a value.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use redb::{MultimapTableDefinition, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use wasnap::metadata::Resource;
use wasnap::root::{Config, DriverConfig};
use wasnap::{Ctx, Host, Labels};

use crate::engine::{Mutator, Outcome, Target};
use crate::input::{below, decode, encode, one_in, pick, string};

/// The target.
pub const TARGET: Target = Target {
    name: "records",
    about: "stored records (metadata, driver, legacy driver db) and redb files, opened and used",
    run,
    generate,
    mutate,
    seeds,
    dictionary: &["\"bkey\"", "\"kind\"", "\"parent\"", "null", "-1", "1e999", "\"\"", "{}", "[]"],
    contained_panics: &["/redb-"],
    known: KNOWN,
    timeout: Duration::from_secs(120),
};

/// Issues found here in code this crate does not own, reported and not yet fixed.
/// Each has a regression test (ignored until fixed) in `tests/targets.rs`.
const KNOWN: &[(&str, &str)] = &[];

/// One input: changes to the template root's database.
#[derive(Debug, Clone, Default, Serialize, Deserialize, Arbitrary)]
pub struct Input {
    /// Row changes, in order.
    #[serde(default)]
    pub edits: Vec<Edit>,
    /// Changes to the database file's bytes, made after the row changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileEdit>,
    /// A driver database of an older root to import (rows of its `snapshots` table).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub legacy: Option<Legacy>,
}

/// The tables of a root's database that the target changes.
#[allow(missing_docs)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Arbitrary)]
#[serde(rename_all = "snake_case")]
pub enum Table {
    /// (snapshotter, namespace, key) -> JSON record.
    Snapshots,
    /// (snapshotter, namespace, name) -> JSON commit intent.
    CommitIntents,
    /// (namespace, id) -> JSON lease.
    Leases,
    /// (namespace, digest) -> JSON blob record.
    Content,
    /// (driver, key) -> JSON driver record.
    DriverSnapshots,
    /// (snapshotter, namespace, parent) ->> child keys.
    Children,
    /// (snapshotter, backend key) ->> (namespace, key).
    BackendKeys,
    /// (namespace, lease) ->> (type, id).
    LeaseResources,
    /// (driver, parent) ->> child keys.
    DriverChildren,
    /// name -> counter.
    Meta,
    /// (driver, counter) -> value.
    DriverMeta,
}

/// A value to store: text (the JSON records are text), a number, or a pair.
#[derive(Debug, Clone, Serialize, Deserialize, Arbitrary)]
#[serde(untagged)]
pub enum Val {
    /// A number, for counters.
    Number(u64),
    /// Text, for records and keys.
    Text(String),
    /// A pair, for the tables whose values are pairs.
    Pair(String, String),
}

/// One change to the database's rows.
#[derive(Debug, Clone, Serialize, Deserialize, Arbitrary)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Edit {
    /// Stores `value` at `key` (inserted into a multimap).
    Put {
        /// The table.
        table: Table,
        /// The key's parts (padded or cut to the table's).
        key: Vec<String>,
        /// The value.
        value: Val,
    },
    /// Changes one field of the JSON at `key`: `path` names it, `value` replaces it
    /// (null with `remove` deletes it).
    Patch {
        /// The table.
        table: Table,
        /// The key.
        key: Vec<String>,
        /// The field's path in the JSON object.
        path: Vec<String>,
        /// The new value.
        #[arbitrary(with = arbitrary_json)]
        value: Value,
        /// Delete the field instead.
        #[serde(default)]
        remove: bool,
    },
    /// Moves a row to another key.
    Move {
        /// The table.
        table: Table,
        /// From.
        from: Vec<String>,
        /// To.
        to: Vec<String>,
    },
    /// Deletes the row at `key` (every value of it, in a multimap).
    Delete {
        /// The table.
        table: Table,
        /// The key.
        key: Vec<String>,
    },
}

/// Changes to the database file.
#[derive(Debug, Clone, Default, Serialize, Deserialize, Arbitrary)]
pub struct FileEdit {
    /// The file's bytes instead, in hex (the template's when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace: Option<String>,
    /// Bytes XORed at offsets (taken modulo the file's length).
    #[serde(default)]
    pub flips: Vec<(u64, u8)>,
    /// Ranges zeroed: offset, length.
    #[serde(default)]
    pub zero: Vec<(u64, u16)>,
    /// The file cut to this length (modulo its length plus one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncate: Option<u64>,
}

/// A driver database as an older root kept it, in `snapshotters/native/metadata.db`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, Arbitrary)]
pub struct Legacy {
    /// key -> JSON record.
    pub rows: Vec<(String, String)>,
    /// Its id counter.
    #[serde(default)]
    pub max_id: Option<u64>,
}

fn arbitrary_json(u: &mut Unstructured<'_>) -> arbitrary::Result<Value> {
    json(u, 0)
}

fn json(u: &mut Unstructured<'_>, depth: usize) -> arbitrary::Result<Value> {
    Ok(match below(u, if depth > 2 { 6 } else { 8 }) {
        0 => Value::Null,
        1 => Value::Bool(bool::arbitrary(u)?),
        2 => Value::from(u64::arbitrary(u)?),
        3 => Value::from(i64::arbitrary(u)?),
        4 => Value::from(pick(
            u,
            &["view", "active", "committed", "", "base", "work", "default/1/a"],
        )),
        5 => Value::from(String::arbitrary(u)?),
        6 => Value::Array((0..below(u, 3)).map(|_| json(u, depth + 1)).collect::<Result<_, _>>()?),
        _ => Value::Object(
            (0..below(u, 3))
                .map(|_| Ok((pick(u, FIELDS).to_owned(), json(u, depth + 1)?)))
                .collect::<arbitrary::Result<_>>()?,
        ),
    })
}

/// Fields of the stored records (metadata and driver).
const FIELDS: &[&str] = &[
    "bkey",
    "kind",
    "parent",
    "labels",
    "created",
    "updated",
    "collectable",
    "committing",
    "blob",
    "layers",
    "last_used",
    "use_count",
    "key",
    "bname",
    "lease",
    "id",
    "usage",
    "size",
    "inodes",
    "expire",
];

// --- The template --------------------------------------------------------------------

struct Template {
    root: PathBuf,
    /// Every row's table and key, for inputs to aim at.
    rows: Vec<(Table, Vec<String>)>,
}

fn config() -> Config {
    Config {
        default_snapshotter: "native".into(),
        snapshotters: [("native".to_owned(), DriverConfig::Native.into())].into(),
        ..Config::default()
    }
}

fn open(root: &Path) -> wasnap::Result<Host> {
    Host::open_config(root, Arc::new(wasnap::fault::Faults::new()), config())
}

fn template() -> Result<&'static Template, String> {
    static T: OnceLock<Result<Template, String>> = OnceLock::new();
    T.get_or_init(|| make_template().map_err(|e| format!("setup: the template root: {e}")))
        .as_ref()
        .map_err(Clone::clone)
}

fn make_template() -> wasnap::Result<Template> {
    let root = crate::scratch::dir().join("records-template");
    let _ = std::fs::remove_dir_all(&root);
    let host = open(&root)?;
    let sn = host.snapshotter("native")?;
    let none = Labels::new();
    let team: Labels = [("team".to_owned(), "blue".to_owned())].into();
    let d = Ctx::new("default")?;
    sn.prepare(&d, "a", None, &team)?;
    sn.commit(&d, "base", "a", &team)?;
    sn.prepare(&d, "work", Some("base"), &none)?;
    sn.view(&d, "peek", Some("base"), &none)?;
    let leases = host.leases();
    leases.create(&d, Some("l1"), &none)?;
    let leased = d.clone().with_lease(Some("l1".into()));
    sn.prepare(&leased, "leased", Some("base"), &none)?;
    sn.commit(&leased, "leased-c", "leased", &none)?;
    let expire: Labels =
        [("containerd.io/gc.expire".to_owned(), "2000-01-01T00:00:00Z".to_owned())].into();
    leases.create(&d, Some("l2"), &expire)?;
    leases.add_resource(&d, "l2", &Resource::snapshot("native", "base"))?;
    let k = Ctx::new("k8s.io")?;
    sn.prepare(&k, "k8s.io/1/x", None, &none)?;
    sn.commit(&k, "y", "k8s.io/1/x", &none)?;
    host.close()?;
    // Everything that holds the database goes before it is opened again.
    drop((sn, leases, host));
    let rows = dump(&root.join("metadata.db")).map_err(wasnap::Error::internal)?;
    Ok(Template { root, rows })
}

// Table definitions, as the host declares them (metadata/db.rs, metadata/content.rs,
// driver/storage.rs): the same names and types, or redb refuses to open them.
type Bytes3 = TableDefinition<'static, (&'static str, &'static str, &'static str), &'static [u8]>;
type Bytes2 = TableDefinition<'static, (&'static str, &'static str), &'static [u8]>;
const SNAPSHOTS: Bytes3 = TableDefinition::new("snapshots");
const INTENTS: Bytes3 = TableDefinition::new("commit_intents");
const LEASES: Bytes2 = TableDefinition::new("leases");
const CONTENT: Bytes2 = TableDefinition::new("content");
const DRIVER_SNAPSHOTS: Bytes2 = TableDefinition::new("driver_snapshots");
const CHILDREN: MultimapTableDefinition<'static, (&str, &str, &str), &str> =
    MultimapTableDefinition::new("children");
const BKEYS: MultimapTableDefinition<'static, (&str, &str), (&str, &str)> =
    MultimapTableDefinition::new("backend_keys");
const LEASE_RESOURCES: MultimapTableDefinition<'static, (&str, &str), (&str, &str)> =
    MultimapTableDefinition::new("lease_resources");
const DRIVER_CHILDREN: MultimapTableDefinition<'static, (&str, &str), &str> =
    MultimapTableDefinition::new("driver_children");
const META: TableDefinition<'static, &str, u64> = TableDefinition::new("meta");
const DRIVER_META: TableDefinition<'static, (&str, &str), u64> =
    TableDefinition::new("driver_meta");
const LEGACY_SNAPS: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("snapshots");
const LEGACY_META: TableDefinition<'static, &str, u64> = TableDefinition::new("meta");

fn dump(path: &Path) -> Result<Vec<(Table, Vec<String>)>, String> {
    let db = redb::Database::open(path).map_err(|e| e.to_string())?;
    let txn = db.begin_read().map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    macro_rules! keys3 {
        ($def:expr, $table:expr) => {
            if let Ok(t) = txn.open_table($def) {
                for item in t.iter().map_err(|e| e.to_string())? {
                    let (k, _) = item.map_err(|e| e.to_string())?;
                    let (a, b, c) = k.value();
                    rows.push(($table, vec![a.to_owned(), b.to_owned(), c.to_owned()]));
                }
            }
        };
    }
    macro_rules! keys2 {
        ($def:expr, $table:expr) => {
            if let Ok(t) = txn.open_table($def) {
                for item in t.iter().map_err(|e| e.to_string())? {
                    let (k, _) = item.map_err(|e| e.to_string())?;
                    let (a, b) = k.value();
                    rows.push(($table, vec![a.to_owned(), b.to_owned()]));
                }
            }
        };
    }
    keys3!(SNAPSHOTS, Table::Snapshots);
    keys3!(INTENTS, Table::CommitIntents);
    keys2!(LEASES, Table::Leases);
    keys2!(CONTENT, Table::Content);
    keys2!(DRIVER_SNAPSHOTS, Table::DriverSnapshots);
    Ok(rows)
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let ty = e.file_type()?;
        let dest = to.join(e.file_name());
        if ty.is_dir() {
            copy_tree(&e.path(), &dest)?;
        } else if ty.is_file() {
            std::fs::copy(e.path(), &dest)?;
        }
    }
    Ok(())
}

// --- Applying an input ----------------------------------------------------------------

fn arity(t: Table) -> usize {
    match t {
        Table::Snapshots | Table::CommitIntents | Table::Children => 3,
        Table::Meta => 1,
        _ => 2,
    }
}

fn parts(key: &[String], n: usize) -> Vec<String> {
    (0..n).map(|i| key.get(i).cloned().unwrap_or_default()).collect()
}

fn text(v: &Val) -> String {
    match v {
        Val::Number(n) => n.to_string(),
        Val::Text(s) => s.clone(),
        Val::Pair(a, b) => format!("{a}{b}"),
    }
}

fn number(v: &Val) -> u64 {
    match v {
        Val::Number(n) => *n,
        Val::Text(s) => s.parse().unwrap_or(crate::engine::fnv(s.as_bytes())),
        Val::Pair(a, _) => a.len() as u64,
    }
}

fn pair(v: &Val) -> (String, String) {
    match v {
        Val::Pair(a, b) => (a.clone(), b.clone()),
        other => (text(other), String::new()),
    }
}

/// Reads the bytes of a JSON-valued row.
fn get_bytes(
    txn: &redb::WriteTransaction,
    table: Table,
    k: &[String],
) -> Result<Option<Vec<u8>>, redb::Error> {
    Ok(match table {
        Table::Snapshots | Table::CommitIntents => {
            let def = if table == Table::Snapshots { SNAPSHOTS } else { INTENTS };
            let t = txn.open_table(def)?;
            t.get((k[0].as_str(), k[1].as_str(), k[2].as_str()))?.map(|g| g.value().to_vec())
        }
        Table::Leases | Table::Content | Table::DriverSnapshots => {
            let def = match table {
                Table::Leases => LEASES,
                Table::Content => CONTENT,
                _ => DRIVER_SNAPSHOTS,
            };
            let t = txn.open_table(def)?;
            t.get((k[0].as_str(), k[1].as_str()))?.map(|g| g.value().to_vec())
        }
        _ => None,
    })
}

fn put(
    txn: &redb::WriteTransaction,
    table: Table,
    key: &[String],
    value: &Val,
) -> Result<(), redb::Error> {
    let k = parts(key, arity(table));
    match table {
        Table::Snapshots | Table::CommitIntents => {
            let def = if table == Table::Snapshots { SNAPSHOTS } else { INTENTS };
            txn.open_table(def)?
                .insert((k[0].as_str(), k[1].as_str(), k[2].as_str()), text(value).as_bytes())?;
        }
        Table::Leases | Table::Content | Table::DriverSnapshots => {
            let def = match table {
                Table::Leases => LEASES,
                Table::Content => CONTENT,
                _ => DRIVER_SNAPSHOTS,
            };
            txn.open_table(def)?.insert((k[0].as_str(), k[1].as_str()), text(value).as_bytes())?;
        }
        Table::Children => {
            txn.open_multimap_table(CHILDREN)?
                .insert((k[0].as_str(), k[1].as_str(), k[2].as_str()), text(value).as_str())?;
        }
        Table::DriverChildren => {
            txn.open_multimap_table(DRIVER_CHILDREN)?
                .insert((k[0].as_str(), k[1].as_str()), text(value).as_str())?;
        }
        Table::BackendKeys | Table::LeaseResources => {
            let def = if table == Table::BackendKeys { BKEYS } else { LEASE_RESOURCES };
            let (a, b) = pair(value);
            txn.open_multimap_table(def)?
                .insert((k[0].as_str(), k[1].as_str()), (a.as_str(), b.as_str()))?;
        }
        Table::Meta => {
            txn.open_table(META)?.insert(k[0].as_str(), number(value))?;
        }
        Table::DriverMeta => {
            txn.open_table(DRIVER_META)?.insert((k[0].as_str(), k[1].as_str()), number(value))?;
        }
    }
    Ok(())
}

fn delete(txn: &redb::WriteTransaction, table: Table, key: &[String]) -> Result<(), redb::Error> {
    let k = parts(key, arity(table));
    match table {
        Table::Snapshots | Table::CommitIntents => {
            let def = if table == Table::Snapshots { SNAPSHOTS } else { INTENTS };
            txn.open_table(def)?.remove((k[0].as_str(), k[1].as_str(), k[2].as_str()))?;
        }
        Table::Leases | Table::Content | Table::DriverSnapshots => {
            let def = match table {
                Table::Leases => LEASES,
                Table::Content => CONTENT,
                _ => DRIVER_SNAPSHOTS,
            };
            txn.open_table(def)?.remove((k[0].as_str(), k[1].as_str()))?;
        }
        Table::Children => {
            txn.open_multimap_table(CHILDREN)?.remove_all((
                k[0].as_str(),
                k[1].as_str(),
                k[2].as_str(),
            ))?;
        }
        Table::DriverChildren => {
            txn.open_multimap_table(DRIVER_CHILDREN)?.remove_all((k[0].as_str(), k[1].as_str()))?;
        }
        Table::BackendKeys | Table::LeaseResources => {
            let def = if table == Table::BackendKeys { BKEYS } else { LEASE_RESOURCES };
            txn.open_multimap_table(def)?.remove_all((k[0].as_str(), k[1].as_str()))?;
        }
        Table::Meta => {
            txn.open_table(META)?.remove(k[0].as_str())?;
        }
        Table::DriverMeta => {
            txn.open_table(DRIVER_META)?.remove((k[0].as_str(), k[1].as_str()))?;
        }
    }
    Ok(())
}

fn patch(json: &mut Value, path: &[String], value: &Value, remove: bool) {
    let Some((last, dirs)) = path.split_last() else {
        *json = value.clone();
        return;
    };
    let mut at = json;
    for p in dirs {
        let Value::Object(map) = at else { return };
        at = map.entry(p.clone()).or_insert_with(|| Value::Object(Default::default()));
    }
    if let Value::Object(map) = at {
        if remove {
            map.remove(last);
        } else {
            map.insert(last.clone(), value.clone());
        }
    }
}

fn apply_edits(db: &Path, edits: &[Edit]) -> Result<(), String> {
    let setup = |e: redb::Error| format!("setup: edit the database: {e}");
    let db = redb::Database::create(db).map_err(|e| setup(e.into()))?;
    let txn = db.begin_write().map_err(|e| setup(e.into()))?;
    for edit in edits.iter().take(32) {
        match edit {
            Edit::Put { table, key, value } => put(&txn, *table, key, value).map_err(setup)?,
            Edit::Delete { table, key } => delete(&txn, *table, key).map_err(setup)?,
            Edit::Patch { table, key, path, value, remove } => {
                let k = parts(key, arity(*table));
                let Some(bytes) = get_bytes(&txn, *table, &k).map_err(setup)? else { continue };
                let Ok(mut json) = serde_json::from_slice::<Value>(&bytes) else { continue };
                patch(&mut json, path, value, *remove);
                put(&txn, *table, &k, &Val::Text(json.to_string())).map_err(setup)?;
            }
            Edit::Move { table, from, to } => {
                let k = parts(from, arity(*table));
                let Some(bytes) = get_bytes(&txn, *table, &k).map_err(setup)? else { continue };
                delete(&txn, *table, &k).map_err(setup)?;
                let value = Val::Text(String::from_utf8_lossy(&bytes).into_owned());
                put(&txn, *table, to, &value).map_err(setup)?;
            }
        }
    }
    txn.commit().map_err(|e| setup(e.into()))?;
    Ok(())
}

fn apply_file(db: &Path, f: &FileEdit) -> Result<(), String> {
    let setup = |e: std::io::Error| format!("setup: edit the file: {e}");
    let mut bytes = match f.replace.as_deref().and_then(crate::engine::unhex) {
        Some(b) => b,
        None => std::fs::read(db).map_err(setup)?,
    };
    if !bytes.is_empty() {
        let len = bytes.len() as u64;
        for (at, x) in f.flips.iter().take(64) {
            bytes[(at % len) as usize] ^= x;
        }
        for (at, n) in f.zero.iter().take(16) {
            let start = (at % len) as usize;
            let end = (start + usize::from(*n)).min(bytes.len());
            bytes[start..end].fill(0);
        }
    }
    if let Some(t) = f.truncate {
        bytes.truncate((t % (bytes.len() as u64 + 1)) as usize);
    }
    std::fs::write(db, bytes).map_err(setup)
}

fn write_legacy(dir: &Path, legacy: &Legacy) -> Result<(), String> {
    let setup = |e: redb::Error| format!("setup: the legacy database: {e}");
    std::fs::create_dir_all(dir).map_err(|e| format!("setup: {e}"))?;
    let db = redb::Database::create(dir.join("metadata.db")).map_err(|e| setup(e.into()))?;
    let txn = db.begin_write().map_err(|e| setup(e.into()))?;
    {
        let mut t = txn.open_table(LEGACY_SNAPS).map_err(|e| setup(e.into()))?;
        for (k, v) in legacy.rows.iter().take(32) {
            t.insert(k.as_str(), v.as_bytes()).map_err(|e| setup(e.into()))?;
        }
        if let Some(id) = legacy.max_id {
            let mut m = txn.open_table(LEGACY_META).map_err(|e| setup(e.into()))?;
            m.insert("id", id).map_err(|e| setup(e.into()))?;
        }
    }
    txn.commit().map_err(|e| setup(e.into()))?;
    Ok(())
}

// --- Using the root -------------------------------------------------------------------

/// The class of a result, for the outcome.
fn class<T>(what: &str, r: &wasnap::Result<T>) -> String {
    match r {
        Ok(_) => format!("{what}:ok"),
        Err(e) => format!("{what}:{:?}", e.kind()),
    }
}

fn exercise(host: &Host, input: &Input, outcome: &mut Vec<String>) {
    let sn = host.snapshotter("native");
    outcome.push(class("open-native", &sn));
    if let Ok(sn) = sn {
        let mut namespaces = vec!["default".to_owned(), "k8s.io".to_owned()];
        let mut keys: Vec<String> =
            ["base", "work", "peek", "leased-c", "y", "missing"].map(String::from).to_vec();
        for e in &input.edits {
            if let Edit::Put { table: Table::Snapshots, key, .. }
            | Edit::Patch { table: Table::Snapshots, key, .. } = e
            {
                if let Some(ns) = key.get(1) {
                    namespaces.push(ns.clone());
                }
                if let Some(k) = key.get(2) {
                    keys.push(k.clone());
                }
            }
        }
        namespaces.truncate(4);
        keys.truncate(12);
        for ns in &namespaces {
            let Ok(ctx) = Ctx::new(ns) else { continue };
            let mut seen = Vec::new();
            let walked = sn.walk(&ctx, &[], &mut |i| {
                if seen.len() < 16 {
                    seen.push(i.name);
                }
                Ok(())
            });
            outcome.push(class("walk", &walked));
            for k in keys.iter().chain(&seen).take(24) {
                outcome.push(class("stat", &sn.stat(&ctx, k)));
                let _ = sn.mounts(&ctx, k);
                let _ = sn.usage(&ctx, k);
            }
            let filters = ["kind==committed".to_owned(), "labels.team==blue".to_owned()];
            let _ = sn.walk(&ctx, &filters, &mut |_| Ok(()));
            outcome.push(class("du", &sn.du(&ctx, &[], true)));
            let parent = seen.first().map_or("base", String::as_str);
            outcome.push(class(
                "prepare",
                &sn.prepare(&ctx, "fuzz-new", Some(parent), &Labels::new()),
            ));
            outcome.push(class("commit", &sn.commit(&ctx, "fuzz-c", "fuzz-new", &Labels::new())));
            let _ = sn.remove(&ctx, "fuzz-c");
            if let Ok(mut info) = sn.stat(&ctx, "work") {
                info.labels.insert("x".into(), "y".into());
                let _ = sn.update(&ctx, &info, &["labels.x".to_owned()]);
            }
            let _ = sn.remove(&ctx, "peek");
            let leases = host.leases();
            let _ = leases.list(&ctx, &[]);
            let _ = leases.resources(&ctx, "l1");
            let _ = leases.create(&ctx, Some("fuzz-l"), &Labels::new());
            let _ = host.delete_lease(&ctx, "l1", false);
        }
        let _ = sn.walk_all(&[], &mut |_, _| Ok(()));
    }
    outcome.push(class("check", &host.check()));
    outcome.push(class("collect-dry", &host.collect(true)));
    outcome.push(class("collect", &host.collect(false)));
}

fn run(bytes: &[u8]) -> Result<Outcome, String> {
    let input: Input = decode(bytes);
    let t = template()?;
    let dir = crate::scratch::tempdir("records-").map_err(|e| format!("setup: {e}"))?;
    let root = dir.path().join("root");
    copy_tree(&t.root, &root).map_err(|e| format!("setup: copy the template: {e}"))?;
    let db = root.join("metadata.db");
    if !input.edits.is_empty() {
        apply_edits(&db, &input.edits)?;
    }
    if let Some(legacy) = &input.legacy {
        write_legacy(&root.join("snapshotters/native"), legacy)?;
    }
    if let Some(f) = &input.file {
        apply_file(&db, f)?;
    }
    let mut outcome = Vec::new();
    match open(&root) {
        Err(e) => outcome.push(format!("open:{:?}", e.kind())),
        Ok(host) => {
            outcome.push("open:ok".into());
            exercise(&host, &input, &mut outcome);
            outcome.push(class("close", &host.close()));
        }
    }
    outcome.dedup();
    Ok(outcome.join(" "))
}

// --- Making inputs --------------------------------------------------------------------

fn known_key(u: &mut Unstructured<'_>, table: Table) -> Vec<String> {
    let rows: Vec<&Vec<String>> = match template() {
        Ok(t) => t.rows.iter().filter(|(tb, _)| *tb == table).map(|(_, k)| k).collect(),
        Err(_) => Vec::new(),
    };
    if !rows.is_empty() && !one_in(u, 4) {
        return rows[below(u, rows.len())].clone();
    }
    let n = arity(table);
    let mut k: Vec<String> = match table {
        Table::Snapshots | Table::CommitIntents | Table::Children => vec![
            "native".into(),
            pick(u, &["default", "k8s.io", "x"]).into(),
            pick(u, &["base", "work", "peek", "new", ""]).into(),
        ],
        Table::DriverSnapshots | Table::DriverChildren | Table::DriverMeta => {
            vec!["native".into(), pick(u, &["default/1/a", "default/2/base", "id", ""]).into()]
        }
        Table::BackendKeys => {
            vec!["native".into(), pick(u, &["default/1/a", "default/2/base"]).into()]
        }
        Table::Meta => vec![pick(u, &["seq", "version", "schema", ""]).into()],
        _ => {
            vec![pick(u, &["default", "k8s.io"]).into(), pick(u, &["l1", "l2", "sha256:00"]).into()]
        }
    };
    if one_in(u, 8) {
        let i = below(u, n);
        k[i] = string(u, &["a", "/", "\0", "é", ""], 0);
    }
    k
}

const RECORD_TEXT: &[&str] = &[
    r#"{"bkey":"default/9/new","kind":"committed","created":0,"updated":0}"#,
    r#"{"bkey":"default/9/new","kind":"active","parent":"base","created":1,"updated":1}"#,
    r#"{"bkey":"","kind":"view","created":18446744073709551615,"updated":0}"#,
    r#"{"bkey":"default/9/new","kind":"committed","layers":["base","base"],"created":0,"updated":0}"#,
    r#"{"bkey":"default/9/new","kind":"active","committing":"done","created":0,"updated":0}"#,
    r#"{"key":"work","bkey":"default/3/work","bname":"default/9/done"}"#,
    r#"{"id":7,"kind":"committed","created":0,"updated":0,"usage":{"size":1,"inodes":1}}"#,
    r#"{"id":7,"kind":"active","parent":"default/2/base","created":0,"updated":0}"#,
    r#"{"id":"l9","labels":{"containerd.io/gc.expire":"2000-01-01T00:00:00Z"}}"#,
    "{}",
    "[]",
    "null",
    "",
    "{",
    "\u{0}",
    "{\"bkey\":1}",
];

fn edit(u: &mut Unstructured<'_>) -> Edit {
    let table = Table::arbitrary(u).unwrap_or(Table::Snapshots);
    match below(u, 10) {
        0..=3 => Edit::Patch {
            table,
            key: known_key(u, table),
            path: vec![pick(u, FIELDS).to_owned()],
            value: json(u, 0).unwrap_or(Value::Null),
            remove: one_in(u, 6),
        },
        4..=6 => Edit::Put {
            table,
            key: known_key(u, table),
            value: match below(u, 4) {
                0 => Val::Number(u64::arbitrary(u).unwrap_or(0)),
                1 => Val::Pair(
                    pick(u, &["default", "k8s.io", "snapshots/native"]).into(),
                    pick(u, &["base", "work", "x"]).into(),
                ),
                _ => Val::Text(string(u, RECORD_TEXT, 0)),
            },
        },
        7 => Edit::Move { table, from: known_key(u, table), to: known_key(u, table) },
        _ => Edit::Delete { table, key: known_key(u, table) },
    }
}

fn generate(u: &mut Unstructured<'_>) -> Vec<u8> {
    let mut input = Input::default();
    match below(u, 10) {
        0 => {
            input.file = Some(FileEdit {
                replace: None,
                flips: (0..1 + below(u, 8))
                    .map(|_| (u64::arbitrary(u).unwrap_or(0), 1 << below(u, 8)))
                    .collect(),
                zero: if one_in(u, 3) {
                    vec![(u64::arbitrary(u).unwrap_or(0), u16::arbitrary(u).unwrap_or(0))]
                } else {
                    vec![]
                },
                truncate: if one_in(u, 4) { Some(u64::arbitrary(u).unwrap_or(0)) } else { None },
            })
        }
        1 => {
            let n = below(u, 4096);
            let bytes = u.bytes(n.min(u.len())).map(<[u8]>::to_vec).unwrap_or_default();
            input.file =
                Some(FileEdit { replace: Some(crate::engine::hex(&bytes)), ..FileEdit::default() });
        }
        2 => {
            input.legacy = Some(Legacy {
                rows: (0..1 + below(u, 3))
                    .map(|_| {
                        (
                            pick(u, &["a", "default/1/a", "", "b"]).to_owned(),
                            string(u, RECORD_TEXT, 0),
                        )
                    })
                    .collect(),
                max_id: if one_in(u, 2) { Some(u64::arbitrary(u).unwrap_or(0)) } else { None },
            })
        }
        _ => input.edits = (0..1 + below(u, 4)).map(|_| edit(u)).collect(),
    }
    encode(&input)
}

fn mutate(bytes: &[u8], m: &mut Mutator<'_>) -> Vec<u8> {
    let mut input: Input = decode(bytes);
    let fresh = m.fresh(256);
    let mut u = Unstructured::new(&fresh);
    match m.rng.below(5) {
        0 | 1 => input.edits.push(edit(&mut u)),
        2 if !input.edits.is_empty() => {
            let i = m.rng.below(input.edits.len());
            match &mut input.edits[i] {
                Edit::Put { value: Val::Text(s), .. } => m.string(s),
                other => *other = edit(&mut u),
            }
        }
        3 => {
            let f = input.file.get_or_insert_with(FileEdit::default);
            f.flips.push((m.rng.next_u64(), 1 << m.rng.below(8)));
        }
        _ => {
            let mut raw = bytes.to_vec();
            m.bytes(&mut raw);
            return raw;
        }
    }
    encode(&input)
}

fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let key = |s: &[&str]| s.iter().map(|p| (*p).to_owned()).collect::<Vec<_>>();
    let text = |s: &str| Val::Text(s.to_owned());
    let snap = |k: &str| key(&["native", "default", k]);
    let patch = |table, k: Vec<String>, field: &str, value: Value| Edit::Patch {
        table,
        key: k,
        path: vec![field.to_owned()],
        value,
        remove: false,
    };
    let inputs: Vec<(&'static str, Input)> = vec![
        ("unchanged", Input::default()),
        (
            "record-not-json",
            Input {
                edits: vec![Edit::Put {
                    table: Table::Snapshots,
                    key: snap("base"),
                    value: text("not json"),
                }],
                ..Input::default()
            },
        ),
        (
            "record-empty",
            Input {
                edits: vec![Edit::Put {
                    table: Table::Snapshots,
                    key: snap("work"),
                    value: text(""),
                }],
                ..Input::default()
            },
        ),
        (
            "record-wrong-kind",
            Input {
                edits: vec![patch(Table::Snapshots, snap("base"), "kind", Value::from("bogus"))],
                ..Input::default()
            },
        ),
        (
            "record-negative-time",
            Input {
                edits: vec![patch(Table::Snapshots, snap("base"), "created", Value::from(-1))],
                ..Input::default()
            },
        ),
        (
            "record-max-time",
            Input {
                edits: vec![patch(
                    Table::Snapshots,
                    snap("base"),
                    "updated",
                    Value::from(u64::MAX),
                )],
                ..Input::default()
            },
        ),
        (
            "record-parent-missing",
            Input {
                edits: vec![patch(Table::Snapshots, snap("work"), "parent", Value::from("gone"))],
                ..Input::default()
            },
        ),
        (
            "record-parent-itself",
            Input {
                edits: vec![patch(Table::Snapshots, snap("base"), "parent", Value::from("base"))],
                ..Input::default()
            },
        ),
        (
            "record-bkey-shared",
            Input {
                edits: vec![patch(Table::Snapshots, snap("peek"), "bkey", Value::from(""))],
                ..Input::default()
            },
        ),
        (
            "record-layers-self",
            Input {
                edits: vec![patch(
                    Table::Snapshots,
                    snap("base"),
                    "layers",
                    serde_json::json!(["base"]),
                )],
                ..Input::default()
            },
        ),
        (
            "record-committing",
            Input {
                edits: vec![patch(
                    Table::Snapshots,
                    snap("work"),
                    "committing",
                    Value::from("done"),
                )],
                ..Input::default()
            },
        ),
        (
            "record-moved-namespace",
            Input {
                edits: vec![Edit::Move {
                    table: Table::Snapshots,
                    from: snap("base"),
                    to: key(&["native", "other", "base"]),
                }],
                ..Input::default()
            },
        ),
        (
            "record-deleted",
            Input {
                edits: vec![Edit::Delete { table: Table::Snapshots, key: snap("base") }],
                ..Input::default()
            },
        ),
        (
            "intent-garbage",
            Input {
                edits: vec![Edit::Put {
                    table: Table::CommitIntents,
                    key: snap("done"),
                    value: text("{\"key\":"),
                }],
                ..Input::default()
            },
        ),
        (
            "intent-for-work",
            Input {
                edits: vec![Edit::Put {
                    table: Table::CommitIntents,
                    key: snap("done"),
                    value: text(r#"{"key":"work","bkey":"nope","bname":"nope2"}"#),
                }],
                ..Input::default()
            },
        ),
        (
            "lease-garbage",
            Input {
                edits: vec![Edit::Put {
                    table: Table::Leases,
                    key: key(&["default", "l1"]),
                    value: text("[1,2]"),
                }],
                ..Input::default()
            },
        ),
        (
            "content-garbage",
            Input {
                edits: vec![Edit::Put {
                    table: Table::Content,
                    key: key(&["default", "sha256:00"]),
                    value: text("{\"size\":-1}"),
                }],
                ..Input::default()
            },
        ),
        (
            "meta-counter-max",
            Input {
                edits: vec![Edit::Put {
                    table: Table::Meta,
                    key: key(&["seq"]),
                    value: Val::Number(u64::MAX),
                }],
                ..Input::default()
            },
        ),
        (
            "driver-id-max",
            Input {
                edits: vec![Edit::Put {
                    table: Table::DriverMeta,
                    key: key(&["native", "id"]),
                    value: Val::Number(u64::MAX),
                }],
                ..Input::default()
            },
        ),
        (
            "driver-record-garbage",
            Input {
                edits: vec![Edit::Put {
                    table: Table::DriverSnapshots,
                    key: key(&["native", "default/1/a"]),
                    value: text("{"),
                }],
                ..Input::default()
            },
        ),
        (
            "file-empty",
            Input {
                file: Some(FileEdit { replace: Some(String::new()), ..FileEdit::default() }),
                ..Input::default()
            },
        ),
        (
            "file-garbage",
            Input {
                file: Some(FileEdit { replace: Some("00ff".repeat(64)), ..FileEdit::default() }),
                ..Input::default()
            },
        ),
        (
            "file-truncated",
            Input {
                file: Some(FileEdit { truncate: Some(4096), ..FileEdit::default() }),
                ..Input::default()
            },
        ),
        (
            "file-header-flipped",
            Input {
                file: Some(FileEdit { flips: vec![(0, 1), (9, 0x80)], ..FileEdit::default() }),
                ..Input::default()
            },
        ),
        (
            "file-zeroed-page",
            Input {
                file: Some(FileEdit { zero: vec![(4096, 4096)], ..FileEdit::default() }),
                ..Input::default()
            },
        ),
        (
            "legacy-import",
            Input {
                legacy: Some(Legacy {
                    rows: vec![
                        (
                            "old".into(),
                            r#"{"id":3,"kind":"committed","created":0,"updated":0}"#.into(),
                        ),
                        (
                            "old-child".into(),
                            r#"{"id":4,"kind":"active","parent":"old","created":0,"updated":0}"#
                                .into(),
                        ),
                    ],
                    max_id: Some(9),
                }),
                ..Input::default()
            },
        ),
        (
            "legacy-garbage",
            Input {
                legacy: Some(Legacy { rows: vec![("x".into(), "{".into())], max_id: None }),
                ..Input::default()
            },
        ),
    ];
    inputs.into_iter().map(|(n, i)| (n, encode(&i))).collect()
}
