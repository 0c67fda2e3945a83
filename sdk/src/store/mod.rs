//! A small record store for a plugin's own snapshots: which keys exist, their ids,
//! kinds, parents, labels and times, kept in files below one directory of the plugin's
//! root, with containerd's rules for create, commit, update and remove.
//!
//! ```text
//! <dir>/records/<key>       one JSON record per snapshot (key escaped, see below)
//! <dir>/children/<p>/<k>    "k has parent p": what makes remove of p refuse
//! <dir>/ids/<n>             the highest id ever allocated
//! <dir>/inflight/<n>        ids reserved for a create that has not written its record yet
//! <dir>/tmp/                records being written; a `commit-…` file is a commit under way
//! ```
//!
//! Every record is written to `tmp/`, synced, and then linked (new key) or renamed
//! (update) into place, and the directory synced: a crash leaves either the old record or
//! the new one, never half of one, plus leftovers in `tmp/` that are ignored and later
//! removed. Keys are file names escaped as `%XX` where needed (long keys: a hash), so
//! a walk reads names, not files. Ids grow and are never reused, even by instances
//! allocating at the same time, so a leftover directory named by an id can never be
//! mistaken for a newer snapshot's.
//!
//! There are no locks (WASI has none), and several instances of a plugin may share the
//! directory: concurrent creates, of one key or many, on one parent or many, are safe;
//! commit, update and remove of one key are expected one at a time, as the host's
//! metadata layer issues them.

mod fsops;
mod names;
mod record;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::error::{Error, Result};
use crate::fieldpath;
use crate::types::{Info, Kind, Labels};
pub use fsops::{dir_names, instance_tag};
use fsops::{io, remove_file, sync_dir, unique, write_new};
pub use record::{Record, Reservation};

const RECORDS: &str = "records";
const CHILDREN: &str = "children";
const IDS: &str = "ids";
const INFLIGHT: &str = "inflight";
const TMP: &str = "tmp";
const COMMIT_PREFIX: &str = "commit";

/// How old a leftover (temporary file, reservation, unfinished commit) must be before the
/// store treats it as a crash's and deletes it; younger ones may belong to another
/// instance working right now. Longer than any call the host lets run.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(600);

/// The record store; see the [module documentation](self).
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    grace: Duration,
    /// Ids below this are taken by records older than the id markers.
    floor: u64,
}

fn not_found(key: &str) -> Error {
    Error::NotFound(format!("snapshot {key:?}"))
}

fn encode_record(rec: &Record) -> Result<Vec<u8>> {
    serde_json::to_vec(rec)
        .map_err(|e| Error::internal(format!("encode record of {:?}", rec.name), e))
}

impl Store {
    /// Opens the store in `dir` (inside a guest, e.g. `/meta`), creating it if needed, and
    /// finishes any commit a crash cut short.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Store> {
        Self::open_with_grace(dir, DEFAULT_GRACE)
    }

    /// As [`Store::open`], with another age after which leftovers count as a crash's.
    pub fn open_with_grace(dir: impl Into<PathBuf>, grace: Duration) -> Result<Store> {
        let dir = dir.into();
        for sub in [RECORDS, CHILDREN, IDS, INFLIGHT, TMP] {
            let path = dir.join(sub);
            fs::create_dir_all(&path).map_err(io(format!("create {}", path.display())))?;
        }
        let mut store = Store { dir, grace, floor: 0 };
        if fsops::dir_names(&store.path(IDS))?.is_empty() {
            // No id markers (a new store, or one whose markers were lost): start above
            // every record there is.
            store.floor = store.all()?.iter().map(|r| r.id).max().unwrap_or(0);
        }
        store.finish_commits()?;
        Ok(store)
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, sub: &str) -> PathBuf {
        self.dir.join(sub)
    }

    fn record_path(&self, key: &str) -> PathBuf {
        self.path(RECORDS).join(names::encode(key))
    }

    fn child_marker(&self, parent: &str, child: &str) -> PathBuf {
        self.path(CHILDREN).join(names::encode(parent)).join(names::encode(child))
    }

    /// Reads the record in file `name` of `records/`; `None` if it is gone.
    fn read(&self, name: &str) -> Result<Option<Record>> {
        let path = self.path(RECORDS).join(name);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("read record {}", path.display()), e)),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::internal(format!("corrupt record {}", path.display()), e))
    }

    /// The record of `key`, if there is one.
    pub fn find(&self, key: &str) -> Result<Option<Record>> {
        if key.is_empty() {
            return Ok(None);
        }
        let rec = self.read(&names::encode(key))?;
        match rec {
            Some(r) if r.name != key => Err(Error::Internal(format!(
                "record file of {key:?} holds {:?} (hash collision?)",
                r.name
            ))),
            other => Ok(other),
        }
    }

    /// The record of `key`; not-found if there is none.
    pub fn get(&self, key: &str) -> Result<Record> {
        self.find(key)?.ok_or_else(|| not_found(key))
    }

    /// The info of `key`, as `stat` returns it.
    pub fn stat(&self, key: &str) -> Result<Info> {
        Ok(self.get(key)?.info())
    }

    /// Checks that `key` is free and `parent` (if any) exists and is committed, and
    /// allocates the new snapshot's id, before any work on disk: already-exists,
    /// not-found (parent), invalid-argument (parent not committed, empty key), as the
    /// host's native driver answers.
    pub fn reserve(&self, key: &str, parent: Option<&str>) -> Result<Reservation> {
        if key.is_empty() {
            return Err(Error::InvalidArgument("snapshot key must not be empty".into()));
        }
        if self.find(key)?.is_some() {
            return Err(Error::AlreadyExists(format!("snapshot {key:?}")));
        }
        let parent = match parent {
            None => None,
            Some(p) => {
                let rec = self
                    .find(p)?
                    .ok_or_else(|| Error::NotFound(format!("parent snapshot {p:?}")))?;
                if rec.kind != Kind::Committed {
                    return Err(Error::InvalidArgument(format!(
                        "parent {p:?} is not a committed snapshot"
                    )));
                }
                Some(rec)
            }
        };
        let id = fsops::allocate_id(&self.path(IDS), self.floor)?;
        let marker = self.path(INFLIGHT).join(id.to_string());
        write_new(&marker, b"")?;
        Ok(Reservation { id, key: key.to_owned(), parent, marker })
    }

    /// Writes the record for a [`Reservation`]: the snapshot now exists. already-exists if
    /// another instance took the key meanwhile; not-found if the parent went away.
    pub fn insert(&self, reservation: Reservation, kind: Kind, labels: &Labels) -> Result<Record> {
        let now = SystemTime::now();
        let rec = Record {
            name: reservation.key.clone(),
            id: reservation.id,
            kind,
            parent: reservation.parent.as_ref().map(|p| p.name.clone()),
            labels: labels.clone(),
            created: now,
            updated: now,
            data: None,
            committed_from: None,
        };
        if let Some(p) = &rec.parent {
            if self.find(p)?.is_none() {
                return Err(Error::NotFound(format!("parent snapshot {p:?}")));
            }
            self.mark_child(p, &rec.name)?;
        }
        let tmp = self.path(TMP).join(unique("new"));
        write_new(&tmp, &encode_record(&rec)?)?;
        let linked = self.link(&tmp, &rec.name);
        let _ = fs::remove_file(&tmp);
        linked?;
        Ok(rec)
    }

    /// [`Store::reserve`] and [`Store::insert`] in one, for plugins that build nothing
    /// before the record exists.
    pub fn create(
        &self,
        key: &str,
        parent: Option<&str>,
        kind: Kind,
        labels: &Labels,
    ) -> Result<Record> {
        let reservation = self.reserve(key, parent)?;
        self.insert(reservation, kind, labels)
    }

    /// Notes durably that `child` has `parent`, before the child's record exists.
    fn mark_child(&self, parent: &str, child: &str) -> Result<()> {
        let marker = self.child_marker(parent, child);
        let dir = marker.parent().unwrap_or(&self.dir).to_path_buf();
        fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
        // A marker left by a create that failed may be there already; it says the same.
        fs::write(&marker, child.as_bytes()).map_err(io(format!("write {}", marker.display())))?;
        sync_dir(&dir)
    }

    /// Links the finished file `tmp` into `records/` as `key`'s record, refusing to
    /// replace one, and makes it durable.
    fn link(&self, tmp: &Path, key: &str) -> Result<()> {
        let dst = self.record_path(key);
        match fs::hard_link(tmp, &dst) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(Error::AlreadyExists(format!("snapshot {key:?}")));
            }
            Err(e) => return Err(Error::io(format!("link record {}", dst.display()), e)),
        }
        sync_dir(&self.path(RECORDS))
    }

    /// Replaces the record of `rec.name` with `rec`, durably.
    fn replace(&self, rec: &Record) -> Result<()> {
        let tmp = self.path(TMP).join(unique("upd"));
        write_new(&tmp, &encode_record(rec)?)?;
        let dst = self.record_path(&rec.name);
        if let Err(e) = fs::rename(&tmp, &dst) {
            let _ = fs::remove_file(&tmp);
            return Err(Error::io(format!("replace record {}", dst.display()), e));
        }
        sync_dir(&self.path(RECORDS))
    }

    /// Changes the labels of `info.name` as containerd's `fieldpaths` say (see
    /// [`fieldpath::apply`]) and returns the new info; kind, parent and `created` stay,
    /// `updated` moves forward.
    pub fn update(&self, info: &Info, fieldpaths: &[String]) -> Result<Info> {
        let mut rec = self.get(&info.name)?;
        fieldpath::apply(&mut rec.labels, &info.labels, fieldpaths, &info.name)?;
        // Strictly later, even if the clock is coarse or stepped back.
        let next = rec.updated.checked_add(Duration::from_nanos(1)).unwrap_or(rec.updated);
        rec.updated = SystemTime::now().max(next);
        self.replace(&rec)?;
        Ok(rec.info())
    }

    /// Sets the plugin's own data on the record of `key` (the time of the last change is
    /// not touched: this is not a change containerd sees).
    pub fn set_data(&self, key: &str, data: Option<serde_json::Value>) -> Result<Record> {
        let mut rec = self.get(key)?;
        rec.data = data;
        self.replace(&rec)?;
        Ok(rec)
    }

    /// Turns the active snapshot `key` into the committed snapshot `name` with `labels`,
    /// keeping its id, parent and data: not-found if `key` is missing, failed-precondition
    /// if it is not active, already-exists if `name` is taken.
    pub fn commit(&self, name: &str, key: &str, labels: &Labels) -> Result<Record> {
        self.commit_until(name, key, labels, CommitStep::All)
    }

    fn commit_until(
        &self,
        name: &str,
        key: &str,
        labels: &Labels,
        stop: CommitStep,
    ) -> Result<Record> {
        let old = self.get(key)?;
        if old.kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!("snapshot {key:?} is not active")));
        }
        if name.is_empty() {
            return Err(Error::InvalidArgument("snapshot name must not be empty".into()));
        }
        if self.find(name)?.is_some() {
            return Err(Error::AlreadyExists(format!("snapshot {name:?}")));
        }
        let now = SystemTime::now();
        let rec = Record {
            name: name.to_owned(),
            kind: Kind::Committed,
            labels: labels.clone(),
            created: now,
            updated: now,
            committed_from: Some(key.to_owned()),
            ..old
        };
        if let Some(p) = &rec.parent {
            self.mark_child(p, name)?;
        }
        // The temporary file stays until the old record is gone: finding it after a crash
        // says which commit to finish.
        let tmp = self.path(TMP).join(unique(COMMIT_PREFIX));
        write_new(&tmp, &encode_record(&rec)?)?;
        if let Err(e) = self.link(&tmp, name) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        if stop == CommitStep::Linked {
            return Ok(rec);
        }
        self.finish_commit(&rec)?;
        remove_file(&tmp)?;
        Ok(rec)
    }

    /// The second half of a commit: forgets the active record the committed `rec` came
    /// from, unless that key names another snapshot by now.
    fn finish_commit(&self, rec: &Record) -> Result<()> {
        let Some(from) = &rec.committed_from else { return Ok(()) };
        match self.find(from)? {
            Some(old) if old.id == rec.id && old.kind == Kind::Active => self.forget(&old),
            // Already forgotten; its marker may be left.
            None => self.forget_child_marker(rec.parent.as_deref(), from),
            // The key was used again: nothing of the commit is left to do.
            Some(_) => Ok(()),
        }
    }

    /// Deletes `rec`'s record and then the marker that names it as its parent's child.
    fn forget(&self, rec: &Record) -> Result<()> {
        remove_file(&self.record_path(&rec.name))?;
        sync_dir(&self.path(RECORDS))?;
        self.forget_child_marker(rec.parent.as_deref(), &rec.name)
    }

    fn forget_child_marker(&self, parent: Option<&str>, child: &str) -> Result<()> {
        if let Some(p) = parent {
            remove_file(&self.child_marker(p, child))?;
        }
        Ok(())
    }

    /// Finishes the commits a crash cut short (their committed record is in place) and
    /// forgets old leftovers in `tmp/`. Cheap: reads `tmp/` only.
    fn finish_commits(&self) -> Result<()> {
        let tmp_dir = self.path(TMP);
        for name in fsops::dir_names(&tmp_dir)? {
            let path = tmp_dir.join(&name);
            if name.starts_with(COMMIT_PREFIX)
                && let Ok(bytes) = fs::read(&path)
                && let Ok(rec) = serde_json::from_slice::<Record>(&bytes)
                && self.find(&rec.name)?.is_some_and(|r| r.id == rec.id)
            {
                self.finish_commit(&rec)?;
                remove_file(&path)?;
                continue;
            }
            if fsops::age(&path).is_some_and(|a| a >= self.grace) {
                remove_file(&path)?;
            }
        }
        Ok(())
    }

    /// Removes the record of `key` and returns it, so the caller can delete its data:
    /// not-found if it is missing, failed-precondition while another snapshot has it as
    /// parent.
    pub fn remove(&self, key: &str) -> Result<Record> {
        let rec = self.get(key)?;
        let children = self.children(key)?;
        if let Some(child) = children.first() {
            return Err(Error::FailedPrecondition(format!(
                "cannot remove snapshot {key:?} with child {child:?}"
            )));
        }
        self.forget(&rec)?;
        // Only stale markers were left in it; a concurrent create of a child of a snapshot
        // being removed is the caller's race (the host never makes one).
        let _ = fs::remove_dir(self.path(CHILDREN).join(names::encode(key)));
        Ok(rec)
    }

    /// The keys of the snapshots whose parent is `key`, sorted. Markers that a failed
    /// create or an interrupted remove left behind are dropped on the way.
    pub fn children(&self, key: &str) -> Result<Vec<String>> {
        let dir = self.path(CHILDREN).join(names::encode(key));
        let mut out = Vec::new();
        for name in fsops::dir_names(&dir)? {
            let marker = dir.join(&name);
            let child = match names::decode(&name) {
                Some(k) => k,
                None => match fs::read_to_string(&marker) {
                    Ok(k) => k,
                    Err(_) => continue,
                },
            };
            match self.find(&child)? {
                Some(c) if c.parent.as_deref() == Some(key) => out.push(child),
                // A create in flight writes its marker first: spare young markers.
                _ if fsops::age(&marker).is_none_or(|a| a < self.grace) => {}
                _ => {
                    remove_file(&marker)?;
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// One page of a walk: at most `limit` infos with names strictly greater than
    /// `after`, in ascending byte order of name. Reads file names for the order and only
    /// the page's records.
    pub fn list(&self, after: Option<&str>, limit: u32) -> Result<Vec<Info>> {
        Ok(self.page(after, limit as usize)?.iter().map(Record::info).collect())
    }

    fn page(&self, after: Option<&str>, limit: usize) -> Result<Vec<Record>> {
        let mut keys: Vec<(String, String)> = Vec::new();
        for name in fsops::dir_names(&self.path(RECORDS))? {
            let key = match names::decode(&name) {
                Some(k) => k,
                None if names::is_hashed(&name) => match self.read(&name)? {
                    Some(r) => r.name,
                    None => continue,
                },
                None => continue,
            };
            if after.is_none_or(|a| key.as_str() > a) {
                keys.push((key, name));
            }
        }
        keys.sort_unstable();
        let mut out = Vec::with_capacity(limit.min(keys.len()));
        for (key, name) in keys {
            if out.len() == limit {
                break;
            }
            // Removed since the names were read: the page goes on with the next one, so
            // that it is short only at the end of the walk.
            match self.read(&name)? {
                Some(r) if r.name == key => out.push(r),
                _ => {}
            }
        }
        Ok(out)
    }

    fn all(&self) -> Result<Vec<Record>> {
        self.page(None, usize::MAX)
    }

    /// Every record, in ascending order of name.
    pub fn records(&self) -> Result<Vec<Record>> {
        self.all()
    }

    /// The id of every record: anything on disk named by another id is a leftover (but
    /// see [`Store::inflight`]).
    pub fn ids(&self) -> Result<BTreeSet<u64>> {
        Ok(self.all()?.iter().map(|r| r.id).collect())
    }

    /// Ids reserved by creates that have not written their record yet, in this or
    /// another instance: what cleanup must spare. Reservations older than the grace
    /// period are a crash's and are dropped.
    ///
    /// To decide safely what is a leftover, read in this order: first the ids on disk
    /// (directory listings), then `inflight()`, then [`Store::ids`]. A create reserves
    /// before it builds and writes its record before it lets go of the reservation, so it
    /// shows in one of the two later reads.
    pub fn inflight(&self) -> Result<BTreeSet<u64>> {
        let dir = self.path(INFLIGHT);
        let mut out = BTreeSet::new();
        for name in fsops::dir_names(&dir)? {
            let Ok(id) = name.parse::<u64>() else { continue };
            let path = dir.join(&name);
            if fsops::age(&path).is_some_and(|a| a >= self.grace) {
                remove_file(&path)?;
            } else {
                out.insert(id);
            }
        }
        Ok(out)
    }

    /// The records of `rec`'s ancestors, nearest first.
    pub fn ancestors(&self, rec: &Record) -> Result<Vec<Record>> {
        let mut out: Vec<Record> = Vec::new();
        let mut next = rec.parent.clone();
        while let Some(p) = next {
            if out.len() > 100_000 || out.iter().any(|r| r.name == p) {
                return Err(Error::Internal(format!("parent chain of {:?} loops", rec.name)));
            }
            let parent = self.find(&p)?.ok_or_else(|| {
                Error::Internal(format!("record of {:?} names missing parent {p:?}", rec.name))
            })?;
            next = parent.parent.clone();
            out.push(parent);
        }
        Ok(out)
    }

    /// A thorough repair, for `cleanup`: finishes interrupted commits (also any whose
    /// marker is gone: an active and a committed record with one id keep the committed
    /// one), and drops leftovers older than the grace period. Reads every record.
    pub fn repair(&self) -> Result<()> {
        self.finish_commits()?;
        let mut by_id: BTreeMap<u64, Vec<Record>> = BTreeMap::new();
        for rec in self.all()? {
            by_id.entry(rec.id).or_default().push(rec);
        }
        for recs in by_id.values().filter(|v| v.len() > 1) {
            if recs.iter().any(|r| r.kind == Kind::Committed) {
                for active in recs.iter().filter(|r| r.kind == Kind::Active) {
                    self.forget(active)?;
                }
            }
        }
        self.inflight()?;
        Ok(())
    }
}

/// Where a commit stops, so tests can cut one short as a crash would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CommitStep {
    /// The whole commit.
    All,
    /// After the committed record is linked, before the active one is removed.
    #[cfg_attr(not(test), allow(dead_code))]
    Linked,
}
