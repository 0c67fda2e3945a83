//! What directory-per-snapshot drivers (native, overlay) share: the layout of their
//! directory and the crash-safe steps around a snapshot's tree.
//!
//! ```text
//! metadata.db        the driver's records (ids, kinds, parents, labels, usage)
//! snapshots/<id>/    one directory per snapshot
//! tmp/               trees being built or deleted; anything here after a crash is garbage
//! ```
//!
//! A tree is built in `tmp/` where no record names it, and renamed to
//! `snapshots/<id>` inside the record's transaction; a removed tree is renamed into
//! `tmp/` inside the transaction that forgets it. So after a crash at any step, every
//! record names a complete tree, and [`Layout::reclaim`] deletes the rest.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cap_std::fs::{Dir, DirBuilder, DirBuilderExt};

use crate::driver::storage::{Snap, Store};
use crate::error::{Error, Result};
use crate::fault::Faults;
use crate::fsutil;
use crate::snapshot::{Kind, Labels, Usage};

const SNAPSHOTS: &str = "snapshots";
const TMP: &str = "tmp";

pub(crate) fn io(context: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::internal(context, e)
}

/// A driver's directory, its records and its fault points.
#[derive(Debug)]
pub(crate) struct Layout {
    pub dir: Dir,
    /// The same directory as `dir`, as a host path: used only to build mount sources,
    /// which callers outside the process need.
    pub path: PathBuf,
    pub store: Store,
    faults: Arc<Faults>,
    /// The driver's name, for messages and fault point names (`<name>.create.…`).
    name: &'static str,
    /// Where a snapshot's own layer is inside `snapshots/<id>` (`""`: the directory
    /// itself; `"fs"` for overlay): what usage measures.
    layer: &'static str,
    closed: AtomicBool,
    tmp_seq: AtomicU64,
    /// Names in `tmp/` this process is working on right now: reclaim leaves them be.
    busy: Arc<Mutex<HashSet<String>>>,
    /// Held shared by an install from the moment its tree is renamed to
    /// `snapshots/<id>` until its record commits, and exclusively by reclaim while it
    /// decides which `snapshots/<id>` no record names: so reclaim never takes a tree
    /// whose record is about to commit.
    installing: std::sync::RwLock<()>,
}

/// A name in `tmp/` that this process is using; reclaim skips it until it is dropped.
#[derive(Debug)]
pub(crate) struct TmpName {
    name: String,
    busy: Arc<Mutex<HashSet<String>>>,
}

impl TmpName {
    pub fn as_str(&self) -> &str {
        &self.name
    }
}

impl std::fmt::Display for TmpName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

impl AsRef<std::path::Path> for TmpName {
    fn as_ref(&self) -> &std::path::Path {
        self.name.as_ref()
    }
}

impl Drop for TmpName {
    fn drop(&mut self) {
        self.busy.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.name);
    }
}

impl Layout {
    /// Opens the layout in `dir`, creating what is missing.
    pub fn open(
        dir: Dir,
        path: PathBuf,
        faults: Arc<Faults>,
        name: &'static str,
        layer: &'static str,
    ) -> Result<Self> {
        let mut private = DirBuilder::new();
        private.mode(0o700);
        for sub in [SNAPSHOTS, TMP] {
            match dir.create_dir_with(sub, &private) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(Error::internal(format!("create {sub}/ in {}", path.display()), e));
                }
            }
        }
        let store = Store::open(&dir)?;
        Ok(Layout {
            dir,
            path,
            store,
            faults,
            name,
            layer,
            closed: AtomicBool::new(false),
            tmp_seq: AtomicU64::new(0),
            busy: Arc::default(),
            installing: std::sync::RwLock::new(()),
        })
    }

    /// Unavailable once closed.
    pub fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Unavailable(format!("{} snapshotter is closed", self.name)));
        }
        Ok(())
    }

    /// Marks the driver closed; idempotent.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    /// Fails or aborts if the fault point `<driver>.<point>` is armed.
    pub fn fault(&self, point: &str) -> Result<()> {
        self.faults.hit(&format!("{}.{point}", self.name))
    }

    /// `snapshots/<id>`, relative to the driver's directory.
    pub fn snapshot_dir(id: u64) -> String {
        format!("{SNAPSHOTS}/{id}")
    }

    /// The host path of `rel`, for mount sources.
    pub fn host_path(&self, rel: &str) -> String {
        self.path.join(rel).to_string_lossy().into_owned()
    }

    /// A fresh name in `tmp/`, spared by reclaim while the returned guard lives.
    pub fn tmp_name(&self, what: &str) -> TmpName {
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let name = format!("{TMP}/{what}-{}-{n}", std::process::id());
        self.busy.lock().unwrap_or_else(|e| e.into_inner()).insert(name.clone());
        TmpName { name, busy: self.busy.clone() }
    }

    /// Deletes `rel` (`snapshots/<id>` or `tmp/<name>`) and everything in it, even
    /// read-only directories when not running as root.
    pub fn remove_path(&self, rel: &str) -> Result<()> {
        let (parent, name) = rel.split_once('/').unwrap_or((".", rel));
        let parent = self.dir.open_dir(parent).map_err(io(format!("open {parent}/")))?;
        fsutil::remove_tree(&parent, name)
    }

    /// Checks that `key` is free and `parent` (if any) is committed, before any tree is
    /// built for nothing. The transaction in [`Layout::install`] checks again.
    pub fn precheck(&self, key: &str, parent: Option<&str>) -> Result<Option<Snap>> {
        self.check_open()?;
        self.store.precheck(key, parent)
    }

    /// Records the snapshot and moves the tree built at `tmp` to `snapshots/<id>`, as
    /// one step: on any failure the record is not written and the tree is deleted.
    pub fn install(
        &self,
        tmp: &str,
        kind: Kind,
        key: &str,
        parent: Option<&str>,
        labels: &Labels,
    ) -> Result<Snap> {
        let result = (|| {
            let _installing = self.installing.read().unwrap_or_else(|e| e.into_inner());
            let mut txn = self.store.begin()?;
            let snap = txn.create(kind, key, parent, labels)?;
            let final_name = Self::snapshot_dir(snap.id);
            // An id is only taken when its transaction commits; a directory already
            // under that name is a leftover of a crash before a commit.
            if self.dir.symlink_metadata(&final_name).is_ok() {
                self.remove_path(&final_name)?;
            }
            self.fault("create.before-rename")?;
            self.dir
                .rename(tmp, &self.dir, &final_name)
                .map_err(io(format!("rename {tmp} to {final_name}")))?;
            if let Err(e) = self.fault("create.before-commit").and_then(|()| txn.commit()) {
                let _ = self.remove_path(&final_name);
                return Err(e);
            }
            Ok(snap)
        })();
        if result.is_err() {
            let _ = self.remove_path(tmp);
        }
        result
    }

    /// Disk usage of snapshot `id`'s own layer, measured now.
    pub fn measure(&self, id: u64) -> Result<Usage> {
        let dir = Self::snapshot_dir(id);
        let name = if self.layer.is_empty() { dir } else { format!("{dir}/{}", self.layer) };
        let layer = self.dir.open_dir(&name).map_err(io(format!("open {name}")))?;
        fsutil::disk_usage(&layer)
    }

    /// Usage of `key`: stored at commit for committed snapshots (so asking is O(1)),
    /// measured for the others.
    pub fn usage(&self, key: &str) -> Result<Usage> {
        self.check_open()?;
        let (_, snap) = self.store.get(key)?;
        match snap.usage {
            Some(usage) => Ok(usage),
            None => self.measure(snap.id),
        }
    }

    /// Commits the active snapshot `key` as `name`: the tree stays where it is, the
    /// record changes kind and name, and the layer's usage is measured and stored.
    pub fn commit(&self, name: &str, key: &str, labels: &Labels) -> Result<()> {
        self.check_open()?;
        let (info, snap) = self.store.get(key)?;
        if info.kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!("snapshot {key:?} is not active")));
        }
        let usage = self.measure(snap.id)?;
        let mut txn = self.store.begin()?;
        txn.commit_active(key, name, usage, labels)?;
        self.fault("commit.before-commit")?;
        txn.commit()
    }

    /// Forgets `key` and moves its tree to `tmp/`; with `now`, deletes it too (otherwise
    /// [`Layout::reclaim`] does, like containerd's asynchronous remove).
    pub fn remove(&self, key: &str, now: bool) -> Result<()> {
        self.check_open()?;
        let mut txn = self.store.begin()?;
        let (id, _) = txn.remove(key)?;
        let name = Self::snapshot_dir(id);
        let doomed = self.tmp_name(&format!("rm-{id}"));
        // Moved inside the transaction: if the commit fails it is moved back; if we
        // crash after the commit, reclaim finds it in tmp/.
        let moved = match self.dir.rename(&name, &self.dir, &doomed) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(Error::internal(format!("rename {name} to {doomed}"), e)),
        };
        if let Err(e) = self.fault("remove.before-commit").and_then(|()| txn.commit()) {
            if moved {
                let _ = self.dir.rename(&doomed, &self.dir, &name);
            }
            return Err(e);
        }
        if now
            && moved
            && let Err(e) = self.remove_path(doomed.as_str())
        {
            tracing::warn!(path = %doomed, error = %e, "could not delete a removed snapshot's tree; cleanup will retry");
        }
        Ok(())
    }

    /// Deletes every tree in `tmp/` and every `snapshots/<id>` no record names, while
    /// creates, commits and removes go on: trees being built or removed in `tmp/` are
    /// named busy, and a tree being installed is spared through `installing`.
    pub fn reclaim(&self) -> Result<()> {
        self.check_open()?;
        let mut doomed = Vec::new();
        // First the unnamed snapshots/<id>: decided, and moved to tmp/ (a rename, so
        // quick), with installs held off; deleted afterwards with nothing held.
        let mut moved = Vec::new();
        {
            let _no_installs = self.installing.write().unwrap_or_else(|e| e.into_inner());
            let ids: HashSet<u64> = self.store.ids()?;
            for entry in self.dir.read_dir(SNAPSHOTS).map_err(io("read snapshots/"))? {
                let entry = entry.map_err(io("read snapshots/"))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.parse::<u64>().is_ok_and(|id| ids.contains(&id)) {
                    continue;
                }
                let from = format!("{SNAPSHOTS}/{name}");
                let to = self.tmp_name("reclaim");
                match self.dir.rename(&from, &self.dir, &to) {
                    Ok(()) => moved.push(to),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::internal(format!("move {from} to {to}"), e)),
                }
            }
        }
        for path in &moved {
            match self.remove_path(path.as_str()) {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        // Then tmp/. List it before reading which names are busy: a name is made busy
        // before its tree appears, so a listed tree whose name is not busy any more is
        // one its owner is done with.
        let mut listed = Vec::new();
        for entry in self.dir.read_dir(TMP).map_err(io("read tmp/"))? {
            let entry = entry.map_err(io("read tmp/"))?;
            listed.push(entry.file_name().to_string_lossy().into_owned());
        }
        // Busy before ids: a remove commits before its name stops being busy, so a
        // name not busy here has its removal in the ids read next.
        let busy = self.busy.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let ids: HashSet<u64> = self.store.ids()?;
        for name in listed {
            let path = format!("{TMP}/{name}");
            if busy.contains(&path) {
                continue;
            }
            // A remove killed before its transaction committed: the record still names
            // the tree, so it goes back where the record says it is.
            let removed_id = name
                .strip_prefix("rm-")
                .and_then(|r| r.split('-').next())
                .and_then(|id| id.parse().ok());
            if let Some(id) = removed_id.filter(|id| ids.contains(id)) {
                let home = Self::snapshot_dir(id);
                if self.dir.symlink_metadata(&home).is_err() {
                    match self.dir.rename(&path, &self.dir, &home) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            return Err(Error::internal(format!("restore {path} to {home}"), e));
                        }
                    }
                    continue;
                }
            }
            doomed.push(path);
        }
        for path in doomed {
            match self.remove_path(&path) {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
