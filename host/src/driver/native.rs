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

use super::layout::{Layout, io};
use crate::driver::storage::Snap;
use crate::error::Result;
use crate::fault::Faults;
use crate::filter::Filter;
use crate::fsutil;
use crate::snapshot::{Info, Kind, Labels, Mount, Usage};
use crate::snapshotter::{FieldPath, Snapshotter};

/// The native copy-based driver.
#[derive(Debug)]
pub struct Native {
    layout: Layout,
}

impl Native {
    /// Opens the driver in `dir` (which is `path` on the host), creating its layout.
    pub fn open(dir: Dir, path: PathBuf, faults: Arc<Faults>) -> Result<Self> {
        Ok(Native { layout: Layout::open(dir, path, faults, "native", "")? })
    }

    fn mounts_for(&self, snap: &Snap) -> Vec<Mount> {
        let mode = if snap.kind == Kind::Active { "rw" } else { "ro" };
        vec![Mount {
            kind: "bind".into(),
            source: self.layout.host_path(&Layout::snapshot_dir(snap.id)),
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
        let tmp = l.tmp_name("new");
        l.dir.create_dir(&tmp).map_err(io(format!("create {tmp}")))?;
        let built = (|| {
            let dst = l.dir.open_dir(&tmp).map_err(io(format!("open {tmp}")))?;
            match &parent_snap {
                Some(p) => {
                    let src_name = Layout::snapshot_dir(p.id);
                    let src = l.dir.open_dir(&src_name).map_err(io(format!("open {src_name}")))?;
                    fsutil::copy_tree(&src, &dst)
                }
                None => l
                    .dir
                    .set_permissions(&tmp, Permissions::from_mode(0o755))
                    .map_err(io(format!("chmod {tmp}"))),
            }
        })();
        if let Err(e) = built {
            let _ = l.remove_path(tmp.as_str());
            return Err(e);
        }
        let snap = l.install(tmp.as_str(), kind, key, parent, labels)?;
        Ok(self.mounts_for(&snap))
    }
}

impl Snapshotter for Native {
    fn stat(&self, key: &str) -> Result<Info> {
        self.layout.check_open()?;
        Ok(self.layout.store.get(key)?.0)
    }

    fn update(&self, info: &Info, fieldpaths: &[FieldPath]) -> Result<Info> {
        self.layout.check_open()?;
        let mut txn = self.layout.store.begin()?;
        let info = txn.update(info, fieldpaths)?;
        txn.commit()?;
        Ok(info)
    }

    fn usage(&self, key: &str) -> Result<Usage> {
        self.layout.usage(key)
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
        self.layout.commit(name, key, labels)
    }

    fn remove(&self, key: &str) -> Result<()> {
        self.layout.remove(key, true)
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
}
