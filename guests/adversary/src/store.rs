//! The well-behaved part: a minimal snapshotter whose records live in memory, so they
//! die with the instance, and whose contents live in layers the host makes.
//!
//! It is only as correct as the host's recovery tests need; it keeps no state across
//! instances and does not share records with other instances of itself.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::bindings::wasnap::snapshotter::layers;
use crate::bindings::wasnap::snapshotter::types::{
    BindMount, Error, Info, Kind, Labels, Mount, Timestamp, UsageInfo,
};

struct Record {
    info: Info,
    layer: u64,
}

static STATE: Mutex<BTreeMap<String, Record>> = Mutex::new(BTreeMap::new());

fn state() -> MutexGuard<'static, BTreeMap<String, Record>> {
    STATE.lock().unwrap_or_else(PoisonError::into_inner)
}

fn not_found(doing: &str, key: &str) -> Error {
    Error::NotFound(format!("{doing}: snapshot {key:?} does not exist"))
}

fn get<'a>(
    state: &'a BTreeMap<String, Record>,
    doing: &str,
    key: &str,
) -> Result<&'a Record, Error> {
    state.get(key).ok_or_else(|| not_found(doing, key))
}

pub fn now() -> Timestamp {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp { seconds: since.as_secs(), nanoseconds: since.subsec_nanos() }
}

/// The one mount of a snapshot of `kind` whose contents are in `layer`.
pub fn bind(layer: u64, kind: Kind) -> Mount {
    Mount::Bind(BindMount { layer, readonly: kind != Kind::Active })
}

/// The layer of `key`.
pub fn layer_of(key: &str) -> Result<u64, Error> {
    Ok(get(&state(), "layer", key)?.layer)
}

pub fn stat(key: &str) -> Result<Info, Error> {
    Ok(get(&state(), "stat", key)?.info.clone())
}

pub fn mounts(key: &str) -> Result<Vec<Mount>, Error> {
    let state = state();
    let record = get(&state, "mounts", key)?;
    Ok(vec![bind(record.layer, record.info.kind)])
}

pub fn usage(key: &str) -> Result<UsageInfo, Error> {
    let layer = get(&state(), "usage", key)?.layer;
    layers::usage(layer)
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
    if state.contains_key(key) {
        return Err(Error::AlreadyExists(format!("{doing}: it already exists")));
    }
    let layer = match parent {
        None => layers::create(None)?,
        Some(parent) => {
            let record = get(&state, &doing, parent)?;
            if record.info.kind != Kind::Committed {
                return Err(Error::FailedPrecondition(format!(
                    "{doing}: parent {parent:?} is not committed"
                )));
            }
            layers::clone(record.layer)?
        }
    };
    let time = now();
    let info = Info {
        name: key.to_owned(),
        parent: parent.map(str::to_owned),
        kind,
        labels,
        created: time,
        updated: time,
    };
    state.insert(key.to_owned(), Record { info, layer });
    Ok(vec![bind(layer, kind)])
}

pub fn commit(name: &str, key: &str, labels: Labels) -> Result<(), Error> {
    let doing = format!("committing {key:?} as {name:?}");
    let mut state = state();
    if get(&state, &doing, key)?.info.kind != Kind::Active {
        return Err(Error::FailedPrecondition(format!("{doing}: {key:?} is not active")));
    }
    if state.contains_key(name) {
        return Err(Error::AlreadyExists(format!("{doing}: {name:?} already exists")));
    }
    let Some(active) = state.remove(key) else { return Err(not_found(&doing, key)) };
    let time = now();
    let info = Info {
        name: name.to_owned(),
        parent: active.info.parent,
        kind: Kind::Committed,
        labels,
        created: time,
        updated: time,
    };
    state.insert(name.to_owned(), Record { info, layer: active.layer });
    Ok(())
}

pub fn remove(key: &str) -> Result<(), Error> {
    let doing = format!("removing {key:?}");
    let mut state = state();
    let layer = get(&state, &doing, key)?.layer;
    if let Some(child) = state.values().find(|r| r.info.parent.as_deref() == Some(key)) {
        return Err(Error::FailedPrecondition(format!(
            "{doing}: {:?} has it as parent",
            child.info.name
        )));
    }
    layers::remove(layer)?;
    state.remove(key);
    Ok(())
}

/// Labels as containerd updates them: `labels` (or nothing) replaces all of them,
/// `labels.<k>` sets or deletes one, any other path is refused.
pub fn update(info: Info, fieldpaths: &[String]) -> Result<Info, Error> {
    let doing = format!("updating {:?}", info.name);
    let mut state = state();
    let Some(record) = state.get_mut(&info.name) else { return Err(not_found(&doing, &info.name)) };
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
    let page = state.range::<str, _>((start, Bound::Unbounded));
    Ok(page.take(limit as usize).map(|(_, record)| record.info.clone()).collect())
}
