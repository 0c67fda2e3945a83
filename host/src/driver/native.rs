//! The native driver: copy-based, like containerd's native snapshotter.
//!
//! Every snapshot is a full directory tree: prepare and view copy the parent's tree
//! (keeping mode, ownership, timestamps, xattrs, links and device nodes), and the mounts
//! are bind mounts of it. Slow for big layers, but it works on any filesystem and needs
//! no kernel support beyond bind mounts, which is why it is the default. Its directory
//! follows [`layout`](super::layout).

use std::path::PathBuf;
use std::sync::Arc;

use cap_std::fs::{Dir, Permissions, PermissionsExt};

use super::Trees;
use super::layout::{Deletion, Layout};
use crate::backend::{Backend, FieldPath};
use crate::driver::storage::{Snap, Store};
use crate::error::{Context, Result};
use crate::fault::Faults;
use crate::filter::Filter;
use crate::fsutil;
use crate::snapshot::{Info, Kind, Labels, Mount, Usage};

/// The native copy-based driver.
#[derive(Debug)]
pub struct Native {
    layout: Arc<Layout>,
}

impl Native {
    /// Opens the driver in `dir` (which is `path` on the host) with records of its own
    /// in `dir`.
    pub fn open(dir: Dir, path: PathBuf, faults: Arc<Faults>) -> Result<Self> {
        let store = Store::open(&dir)?;
        Self::with_store(dir, path, store, faults)
    }

    /// Whether commits sync the layer's data before recording it (the default), or
    /// trust the page cache, as containerd's native snapshotter does.
    pub fn set_sync_commits(&self, sync: bool) {
        self.layout.set_sync_commits(sync);
    }

    /// Opens the driver in `dir` keeping its records in `store`.
    pub fn with_store(dir: Dir, path: PathBuf, store: Store, faults: Arc<Faults>) -> Result<Self> {
        let layout = Arc::new(Layout::open(dir, path, store, Box::new(Trees), faults, "native")?);
        layout.start_deleter()?;
        Ok(Native { layout })
    }

    fn mounts_for(&self, snap: &Snap) -> Vec<Mount> {
        let mode = if snap.kind == Kind::Active { "rw" } else { "ro" };
        vec![Mount {
            kind: "bind".into(),
            source: self.layout.host_path(&Layout::entry(snap.id)),
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
        let l = &self.layout;
        let parent_snap = l.precheck(key, parent)?;
        let id = l.store.next_id()?;
        let tmp = l.tmp_name("new");
        l.tmp.create_dir(tmp.name()).with_context(|| format!("create {tmp}"))?;
        let built = (|| {
            let dst = fsutil::open_dir_nofollow(&l.tmp, tmp.name())?;
            match &parent_snap {
                Some(p) => {
                    let src = fsutil::open_dir_nofollow(&l.snapshots, &p.id.to_string())?;
                    fsutil::copy_tree(&src, &dst)
                }
                None => l
                    .tmp
                    .set_permissions(tmp.name(), Permissions::from_mode(0o755))
                    .with_context(|| format!("chmod {tmp}")),
            }
        })();
        if let Err(e) = built {
            let _ = l.delete_tmp(tmp.name());
            return Err(e);
        }
        let snap = l.install(&tmp, id, false, kind, key, parent, labels)?;
        Ok(self.mounts_for(&snap))
    }

    fn measure(&self, id: u64) -> Result<Usage> {
        fsutil::disk_usage(&fsutil::open_dir_nofollow(&self.layout.snapshots, &id.to_string())?)
    }
}

impl Backend for Native {
    fn stat(&self, key: &str) -> Result<Info> {
        self.layout.check_open()?;
        Ok(self.layout.store.get(key)?.0)
    }

    fn update(&self, info: &Info, fieldpaths: &[FieldPath]) -> Result<Info> {
        self.layout.check_open()?;
        Ok(self.layout.store.update(info, fieldpaths)?.0)
    }

    fn usage(&self, key: &str) -> Result<Usage> {
        self.layout.usage(key, |id| self.measure(id))
    }

    fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        self.layout.check_open()?;
        let (_, snap) = self.layout.store.get(key)?;
        Ok(self.mounts_for(&snap))
    }

    fn prepare(&self, key: &str, parent: Option<&str>, labels: &Labels) -> Result<Vec<Mount>> {
        self.create(Kind::Active, key, parent, labels)
    }

    fn view(&self, key: &str, parent: Option<&str>, labels: &Labels) -> Result<Vec<Mount>> {
        self.create(Kind::View, key, parent, labels)
    }

    fn commit(&self, name: &str, key: &str, labels: &Labels) -> Result<()> {
        self.layout.check_open()?;
        let (info, snap) = self.layout.store.get(key)?;
        if info.kind != Kind::Active {
            return Err(crate::Error::failed_precondition(format!(
                "snapshot {key:?} is not active"
            )));
        }
        // Measured once here, so the usage engines poll is O(1) afterwards.
        let usage = self
            .layout
            .settle(&fsutil::open_dir_nofollow(&self.layout.snapshots, &snap.id.to_string())?)?;
        self.layout.commit_in_place(name, key, usage, labels)
    }

    fn remove(&self, key: &str) -> Result<()> {
        self.layout.remove(key, Deletion::Background)
    }

    fn walk(&self, filter: &Filter, f: &mut dyn FnMut(Info) -> Result<()>) -> Result<()> {
        self.layout.check_open()?;
        self.layout.store.walk(&mut |info, _| if filter.matches(&info) { f(info) } else { Ok(()) })
    }

    fn cleanup(&self) -> Result<()> {
        self.layout.reclaim()
    }

    fn close(&self) -> Result<()> {
        self.layout.close();
        Ok(())
    }

    fn verify(&self) -> Result<Vec<(String, String)>> {
        self.layout.verify("")
    }
}
