//! The well-behaved part: a minimal snapshotter whose records live in memory, so they
//! die with the instance, and whose contents live in `snap/<n>/fs` under the root.
//!
//! It is only as correct as the host's recovery tests need; it keeps no state across
//! instances and does not share records with other instances of itself.

use std::collections::BTreeMap;
use std::io;
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::bindings::wasnap::snapshotter::host;
use crate::bindings::wasnap::snapshotter::types::{
    Error, Info, Kind, Labels, Mount, Timestamp, UsageInfo,
};

struct Record {
    info: Info,
    /// `snap/<n>`, relative to the root; the snapshot's contents are in its `fs` child.
    dir: String,
}

struct State {
    records: BTreeMap<String, Record>,
    /// The next `<n>` to try for a new directory.
    next: u64,
}

static STATE: Mutex<State> = Mutex::new(State { records: BTreeMap::new(), next: 0 });

fn state() -> MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(PoisonError::into_inner)
}

fn not_found(doing: &str, key: &str) -> Error {
    Error::NotFound(format!("{doing}: snapshot {key:?} does not exist"))
}

fn io_error(doing: &str, path: &str, e: &io::Error) -> Error {
    Error::Internal(format!("{doing}: {path}: {e}"))
}

pub fn now() -> Timestamp {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp { seconds: since.as_secs(), nanoseconds: since.subsec_nanos() }
}

/// The one mount of a snapshot whose contents are at `fs`.
pub fn bind(fs: &str, kind: Kind) -> Mount {
    let access = if kind == Kind::Active { "rw" } else { "ro" };
    Mount {
        type_: "bind".to_owned(),
        source: fs.to_owned(),
        target: String::new(),
        options: vec!["rbind".to_owned(), access.to_owned()],
    }
}

impl State {
    /// Claims a fresh `snap/<n>`. An earlier instance may have left directories behind,
    /// and another instance may be claiming at the same time, so a taken name is skipped
    /// rather than reused.
    fn claim_dir(&mut self, doing: &str) -> Result<String, Error> {
        std::fs::create_dir_all("/snap").map_err(|e| io_error(doing, "snap", &e))?;
        loop {
            let dir = format!("snap/{}", self.next);
            self.next += 1;
            match std::fs::create_dir(format!("/{dir}")) {
                Ok(()) => return Ok(dir),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_error(doing, &dir, &e)),
            }
        }
    }

    fn get(&self, doing: &str, key: &str) -> Result<&Record, Error> {
        self.records.get(key).ok_or_else(|| not_found(doing, key))
    }
}

pub fn stat(key: &str) -> Result<Info, Error> {
    Ok(state().get("stat", key)?.info.clone())
}

pub fn mounts(key: &str) -> Result<Vec<Mount>, Error> {
    let state = state();
    let record = state.get("mounts", key)?;
    Ok(vec![bind(&format!("{}/fs", record.dir), record.info.kind)])
}

pub fn usage(key: &str) -> Result<UsageInfo, Error> {
    let dir = state().get("usage", key)?.dir.clone();
    host::disk_usage(&format!("{dir}/fs"))
}

/// `prepare` (kind active) and `view` (kind view).
pub fn create(
    key: &str,
    parent: Option<&str>,
    labels: Labels,
    kind: Kind,
) -> Result<Vec<Mount>, Error> {
    let doing = format!("creating snapshot {key:?}");
    let mut state = state();
    if state.records.contains_key(key) {
        return Err(Error::AlreadyExists(format!("{doing}: it already exists")));
    }
    let parent_dir = match parent {
        None => None,
        Some(parent) => {
            let record = state.get(&doing, parent)?;
            if record.info.kind != Kind::Committed {
                return Err(Error::FailedPrecondition(format!(
                    "{doing}: parent {parent:?} is not committed"
                )));
            }
            Some(record.dir.clone())
        }
    };
    let dir = state.claim_dir(&doing)?;
    let fs = format!("{dir}/fs");
    let filled = match parent_dir {
        Some(parent_dir) => host::copy_tree(&format!("{parent_dir}/fs"), &fs),
        None => std::fs::create_dir(format!("/{fs}"))
            .map_err(|e| io_error(&doing, &fs, &e))
            .and_then(|()| host::chmod(&fs, 0o755)),
    };
    if let Err(e) = filled {
        // Best effort: the directory is ours alone and nothing records it.
        let _ = host::remove_tree(&dir);
        return Err(e);
    }
    let time = now();
    let info = Info {
        name: key.to_owned(),
        parent: parent.map(str::to_owned),
        kind,
        labels,
        created: time,
        updated: time,
    };
    state.records.insert(key.to_owned(), Record { info, dir });
    Ok(vec![bind(&fs, kind)])
}

pub fn commit(name: &str, key: &str, labels: Labels) -> Result<(), Error> {
    let doing = format!("committing {key:?} as {name:?}");
    let mut state = state();
    if state.get(&doing, key)?.info.kind != Kind::Active {
        return Err(Error::FailedPrecondition(format!("{doing}: {key:?} is not active")));
    }
    if state.records.contains_key(name) {
        return Err(Error::AlreadyExists(format!("{doing}: {name:?} already exists")));
    }
    let Some(active) = state.records.remove(key) else {
        return Err(not_found(&doing, key));
    };
    let time = now();
    let info = Info {
        name: name.to_owned(),
        parent: active.info.parent,
        kind: Kind::Committed,
        labels,
        created: time,
        updated: time,
    };
    state.records.insert(name.to_owned(), Record { info, dir: active.dir });
    Ok(())
}

pub fn remove(key: &str) -> Result<(), Error> {
    let doing = format!("removing {key:?}");
    let mut state = state();
    let dir = state.get(&doing, key)?.dir.clone();
    let child = state.records.values().find(|r| r.info.parent.as_deref() == Some(key));
    if let Some(child) = child {
        return Err(Error::FailedPrecondition(format!(
            "{doing}: {:?} has it as parent",
            child.info.name
        )));
    }
    host::remove_tree(&dir)?;
    state.records.remove(key);
    Ok(())
}

/// Labels as containerd updates them: `labels` (or nothing) replaces all of them,
/// `labels.<k>` sets or deletes one, any other path is refused.
pub fn update(info: Info, fieldpaths: &[String]) -> Result<Info, Error> {
    let doing = format!("updating {:?}", info.name);
    let mut state = state();
    let Some(record) = state.records.get_mut(&info.name) else {
        return Err(not_found(&doing, &info.name));
    };
    let wanted: BTreeMap<&str, &str> =
        info.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut labels: BTreeMap<String, String> = record.info.labels.iter().cloned().collect();
    let replace_all = || wanted.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    if fieldpaths.is_empty() {
        labels = replace_all();
    }
    for path in fieldpaths {
        if path == "labels" {
            labels = replace_all();
        } else if let Some(key) = path.strip_prefix("labels.") {
            match wanted.get(key) {
                Some(value) => labels.insert(key.to_owned(), (*value).to_owned()),
                None => labels.remove(key),
            };
        } else {
            return Err(Error::InvalidArgument(format!("{doing}: cannot update field {path:?}")));
        }
    }
    record.info.labels = labels.into_iter().collect();
    record.info.updated = later(now(), record.info.updated);
    Ok(record.info.clone())
}

/// `time`, or just after `previous` if the clock has not moved past it.
fn later(time: Timestamp, previous: Timestamp) -> Timestamp {
    if (time.seconds, time.nanoseconds) > (previous.seconds, previous.nanoseconds) {
        time
    } else if previous.nanoseconds < 999_999_999 {
        Timestamp { nanoseconds: previous.nanoseconds + 1, ..previous }
    } else {
        Timestamp { seconds: previous.seconds + 1, nanoseconds: 0 }
    }
}

pub fn list(after: Option<&str>, limit: u32) -> Result<Vec<Info>, Error> {
    let state = state();
    let start = after.map_or(Bound::Unbounded, Bound::Excluded);
    let page = state.records.range::<str, _>((start, Bound::Unbounded));
    Ok(page.take(limit as usize).map(|(_, record)| record.info.clone()).collect())
}
