//! The snapshotter of sdk/README.md, step 2, verbatim: a test checks the two agree
//! and runs the conformance suite against it.

use std::fs;

use wasnap_sdk::store::{Record, Store};
use wasnap_sdk::{Config, Error, Info, Kind, Labels, Mount, Result, Snapshotter, Usage, host};

struct MyPlugin {
    store: Store,
}

/// Where snapshot `id`'s tree lives inside the plugin's root.
fn tree(id: u64) -> String {
    format!("/snapshots/{id}")
}

fn mounts(rec: &Record) -> Result<Vec<Mount>> {
    // Writable for an active snapshot, read-only for views and committed ones.
    Ok(vec![Mount::bind(tree(rec.id), rec.kind != Kind::Active)?])
}

impl MyPlugin {
    fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: Option<&str>,
        labels: &Labels,
    ) -> Result<Vec<Mount>> {
        // Checks the key and the parent and allocates an id, before any work on disk.
        let reservation = self.store.reserve(key, parent)?;
        let dir = tree(reservation.id);
        match &reservation.parent {
            Some(p) => host::copy_tree(tree(p.id), &dir)?,
            None => {
                fs::create_dir(&dir).map_err(|e| Error::io(format!("create {dir}"), e))?;
                host::chmod(&dir, 0o755)?;
            }
        }
        let rec = self.store.insert(reservation, kind, labels)?;
        mounts(&rec)
    }
}

impl Snapshotter for MyPlugin {
    fn init(_config: Config) -> Result<Self> {
        fs::create_dir_all("/snapshots").map_err(|e| Error::io("create /snapshots", e))?;
        Ok(MyPlugin { store: Store::open("/meta")? })
    }
    fn stat(&self, key: &str) -> Result<Info> {
        self.store.stat(key)
    }
    fn update(&self, info: &Info, fieldpaths: &[String]) -> Result<Info> {
        self.store.update(info, fieldpaths)
    }
    fn usage(&self, key: &str) -> Result<Usage> {
        host::disk_usage(tree(self.store.get(key)?.id))
    }
    fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        mounts(&self.store.get(key)?)
    }
    fn prepare(&self, key: &str, parent: Option<&str>, labels: &Labels) -> Result<Vec<Mount>> {
        self.create(Kind::Active, key, parent, labels)
    }
    fn view(&self, key: &str, parent: Option<&str>, labels: &Labels) -> Result<Vec<Mount>> {
        self.create(Kind::View, key, parent, labels)
    }
    fn commit(&self, name: &str, key: &str, labels: &Labels) -> Result<()> {
        self.store.commit(name, key, labels).map(drop)
    }
    fn remove(&self, key: &str) -> Result<()> {
        let rec = self.store.remove(key)?;
        host::remove_tree(tree(rec.id))
    }
    fn list(&self, after: Option<&str>, limit: u32) -> Result<Vec<Info>> {
        self.store.list(after, limit)
    }
}

wasnap_sdk::export_backend!(MyPlugin);
