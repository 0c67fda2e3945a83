//! The snapshotter of sdk/README.md, step 2, verbatim: a test checks the two agree
//! and runs the conformance suite against it.

use wasnap_sdk::store::{Record, Store};
use wasnap_sdk::{Config, Kind, Labels, Layer, Mount, Result, Snapshotter, Usage};

struct MyPlugin {
    store: Store,
}

fn mounts(rec: &Record) -> Vec<Mount> {
    // Writable for an active snapshot, read-only for views and committed ones.
    vec![Mount::bind(rec.layer, rec.kind != Kind::Active)]
}

impl MyPlugin {
    fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: Option<&str>,
        labels: &Labels,
    ) -> Result<Vec<Mount>> {
        // Checks the key and the parent, makes the layer, then records it.
        let rec = self.store.create(kind, key, parent, labels, |parent| match parent {
            Some(p) => Layer::clone_of(p.layer),
            None => Layer::create(),
        })?;
        Ok(mounts(&rec))
    }
}

impl Snapshotter for MyPlugin {
    fn init(_config: Config) -> Result<Self> {
        Ok(MyPlugin { store: Store::new() })
    }
    // stat, update and list come from the store.
    fn store(&self) -> Option<&Store> {
        Some(&self.store)
    }
    fn usage(&self, key: &str) -> Result<Usage> {
        self.store.get(key)?.layer.usage()
    }
    fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        Ok(mounts(&self.store.get(key)?))
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
        // The record first, then its layer: a crash between leaves a layer no record
        // names, which cleanup removes.
        self.store.remove(key)?.layer.remove()
    }
    fn cleanup(&self) -> Result<()> {
        self.store.reclaim_layers().map(drop)
    }
}

wasnap_sdk::export_backend!(MyPlugin);
