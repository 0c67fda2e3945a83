//! The native driver: copy-based, like containerd's native snapshotter.
//!
//! Every snapshot is a full directory tree: prepare and view copy the parent's tree
//! (keeping mode, ownership, timestamps, xattrs, links and device nodes), and the mounts
//! are bind mounts of it. Slow for big layers, but it works on any filesystem and needs
//! no kernel support beyond bind mounts, which is why it is the default.
//!
//! Layout of its directory:
//! ```text
//! metadata.db        its records (ids, kinds, parents, labels, usage)
//! snapshots/<id>/    one tree per snapshot
//! tmp/               trees being built or deleted; anything here after a crash is garbage
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use cap_std::fs::{Dir, DirBuilder, Permissions};
use cap_std::fs::{DirBuilderExt, PermissionsExt};

use crate::driver::storage::{Snap, Store};
use crate::error::{Error, Result};
use crate::fault::Faults;
use crate::filter::Filter;
use crate::fsutil;
use crate::snapshot::{Info, Kind, Labels, Mount, Usage};
use crate::snapshotter::{FieldPath, Snapshotter};

const SNAPSHOTS: &str = "snapshots";
const TMP: &str = "tmp";

/// The native copy-based driver.
#[derive(Debug)]
pub struct Native {
    dir: Dir,
    /// The same directory as `dir`, as a host path: used only to build mount sources,
    /// which callers outside the process need.
    path: PathBuf,
    store: Store,
    faults: Arc<Faults>,
    closed: AtomicBool,
    tmp_seq: AtomicU64,
}

fn io(context: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::internal(context, e)
}

impl Native {
    /// Opens the driver in `dir` (which is `path` on the host), creating its layout.
    pub fn open(dir: Dir, path: PathBuf, faults: Arc<Faults>) -> Result<Self> {
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
        Ok(Native {
            dir,
            path,
            store,
            faults,
            closed: AtomicBool::new(false),
            tmp_seq: AtomicU64::new(0),
        })
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Unavailable("native snapshotter is closed".into()));
        }
        Ok(())
    }

    /// Deletes `rel` (`snapshots/<id>` or `tmp/<name>`) and everything in it, even
    /// read-only directories when not running as root.
    fn remove_path(&self, rel: &str) -> Result<()> {
        let (parent, name) = rel.split_once('/').unwrap_or((".", rel));
        let parent = self.dir.open_dir(parent).map_err(io(format!("open {parent}/")))?;
        fsutil::remove_tree(&parent, name)
    }

    fn snapshot_dir(id: u64) -> String {
        format!("{SNAPSHOTS}/{id}")
    }

    fn tmp_name(&self, what: &str) -> String {
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        format!("{TMP}/{what}-{}-{n}", std::process::id())
    }

    fn mounts_for(&self, snap: &Snap) -> Vec<Mount> {
        let source = self.path.join(Self::snapshot_dir(snap.id));
        let mode = if snap.kind == Kind::Active { "rw" } else { "ro" };
        vec![Mount {
            kind: "bind".into(),
            source: source.to_string_lossy().into_owned(),
            target: String::new(),
            options: vec!["rbind".into(), mode.into()],
        }]
    }

    fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: Option<&str>,
        labels: &Labels,
    ) -> Result<Vec<Mount>> {
        self.check_open()?;
        // Fail fast before copying a tree for nothing; the transaction re-checks.
        match self.store.get(key) {
            Ok(_) => return Err(Error::AlreadyExists(format!("snapshot {key:?}"))),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
        let parent_id = match parent {
            Some(p) => {
                let (info, snap) = self.store.get(p).map_err(|e| {
                    if e.is_not_found() {
                        Error::NotFound(format!("parent snapshot {p:?}"))
                    } else {
                        e
                    }
                })?;
                if info.kind != Kind::Committed {
                    return Err(Error::InvalidArgument(format!(
                        "parent {p:?} is not a committed snapshot"
                    )));
                }
                Some(snap.id)
            }
            None => None,
        };

        // Build the tree where nothing names it, so a crash leaves only garbage in tmp/.
        let tmp = self.tmp_name("new");
        self.dir.create_dir(&tmp).map_err(io(format!("create {tmp}")))?;
        let built = (|| {
            let dst = self.dir.open_dir(&tmp).map_err(io(format!("open {tmp}")))?;
            match parent_id {
                Some(pid) => {
                    let src_name = Self::snapshot_dir(pid);
                    let src =
                        self.dir.open_dir(&src_name).map_err(io(format!("open {src_name}")))?;
                    fsutil::copy_tree(&src, &dst)
                }
                None => self
                    .dir
                    .set_permissions(&tmp, Permissions::from_mode(0o755))
                    .map_err(io(format!("chmod {tmp}"))),
            }
        })();
        let result = built.and_then(|()| {
            let mut txn = self.store.begin()?;
            let snap = txn.create(kind, key, parent, labels)?;
            let final_name = Self::snapshot_dir(snap.id);
            // An id is only taken when its transaction commits; a directory already
            // under that name is a leftover of a crash before a commit.
            if self.dir.symlink_metadata(&final_name).is_ok() {
                self.remove_path(&final_name)?;
            }
            self.faults.hit("native.create.before-rename")?;
            self.dir
                .rename(&tmp, &self.dir, &final_name)
                .map_err(io(format!("rename {tmp} to {final_name}")))?;
            if let Err(e) =
                self.faults.hit("native.create.before-commit").and_then(|()| txn.commit())
            {
                let _ = self.remove_path(&final_name);
                return Err(e);
            }
            Ok(snap)
        });
        match result {
            Ok(snap) => Ok(self.mounts_for(&snap)),
            Err(e) => {
                let _ = self.remove_path(&tmp);
                Err(e)
            }
        }
    }
}

impl Snapshotter for Native {
    fn stat(&self, key: &str) -> Result<Info> {
        self.check_open()?;
        Ok(self.store.get(key)?.0)
    }

    fn update(&self, info: &Info, fieldpaths: &[FieldPath]) -> Result<Info> {
        self.check_open()?;
        let mut txn = self.store.begin()?;
        let info = txn.update(info, fieldpaths)?;
        txn.commit()?;
        Ok(info)
    }

    fn usage(&self, key: &str) -> Result<Usage> {
        self.check_open()?;
        let (_, snap) = self.store.get(key)?;
        if let Some(usage) = snap.usage {
            return Ok(usage);
        }
        let name = Self::snapshot_dir(snap.id);
        let dir = self.dir.open_dir(&name).map_err(io(format!("open {name}")))?;
        fsutil::disk_usage(&dir)
    }

    fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        self.check_open()?;
        let (_, snap) = self.store.get(key)?;
        Ok(self.mounts_for(&snap))
    }

    fn prepare(&self, key: &str, parent: Option<&str>, labels: &Labels) -> Result<Vec<Mount>> {
        self.create(Kind::Active, key, parent, labels)
    }

    fn view(&self, key: &str, parent: Option<&str>, labels: &Labels) -> Result<Vec<Mount>> {
        self.create(Kind::View, key, parent, labels)
    }

    fn commit(&self, name: &str, key: &str, labels: &Labels) -> Result<()> {
        self.check_open()?;
        let (info, snap) = self.store.get(key)?;
        if info.kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!("snapshot {key:?} is not active")));
        }
        // Measured once here so that asking for a committed snapshot's usage is O(1).
        let dir_name = Self::snapshot_dir(snap.id);
        let dir = self.dir.open_dir(&dir_name).map_err(io(format!("open {dir_name}")))?;
        let usage = fsutil::disk_usage(&dir)?;
        let mut txn = self.store.begin()?;
        txn.commit_active(key, name, usage, labels)?;
        txn.commit()
    }

    fn remove(&self, key: &str) -> Result<()> {
        self.check_open()?;
        let mut txn = self.store.begin()?;
        let (id, _) = txn.remove(key)?;
        let name = Self::snapshot_dir(id);
        let doomed = self.tmp_name(&format!("rm-{id}"));
        // Move the tree out of the way inside the transaction: if the commit fails it is
        // moved back; if we crash after the commit, cleanup finds it in tmp/.
        let moved = match self.dir.rename(&name, &self.dir, &doomed) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(Error::internal(format!("rename {name} to {doomed}"), e)),
        };
        if let Err(e) = self.faults.hit("native.remove.before-commit").and_then(|()| txn.commit()) {
            if moved {
                let _ = self.dir.rename(&doomed, &self.dir, &name);
            }
            return Err(e);
        }
        if moved && let Err(e) = self.remove_path(&doomed) {
            tracing::warn!(path = %doomed, error = %e, "could not delete a removed snapshot's tree; cleanup will retry");
        }
        Ok(())
    }

    fn walk(&self, filter: &Filter, f: &mut dyn FnMut(Info) -> Result<()>) -> Result<()> {
        self.check_open()?;
        self.store.walk(&mut |info, _| if filter.matches(&info) { f(info) } else { Ok(()) })
    }

    fn cleanup(&self) -> Result<()> {
        self.check_open()?;
        let ids = self.store.ids()?;
        // Leftovers: trees in tmp/ (interrupted builds and deletes) and trees in
        // snapshots/ that no record names (a crash between rename and commit).
        let mut doomed = Vec::new();
        for entry in self.dir.read_dir(TMP).map_err(io("read tmp/"))? {
            let entry = entry.map_err(io("read tmp/"))?;
            doomed.push(format!("{TMP}/{}", entry.file_name().to_string_lossy()));
        }
        for entry in self.dir.read_dir(SNAPSHOTS).map_err(io("read snapshots/"))? {
            let entry = entry.map_err(io("read snapshots/"))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let known = name.parse::<u64>().is_ok_and(|id| ids.contains(&id));
            if !known {
                doomed.push(format!("{SNAPSHOTS}/{name}"));
            }
        }
        for path in doomed {
            // A tree being built right now by a concurrent prepare also lives in tmp/;
            // the metadata layer holds prepares off while it cleans up, and a direct
            // user of this driver must do the same.
            match self.remove_path(&path) {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        Ok(())
    }
}
