//! `copy`: a copy-based snapshotter as a WebAssembly guest, the twin of the host's native
//! driver, and the example of a backend built on `wasnap-sdk`.
//!
//! Every snapshot is a layer holding its whole tree: prepare and view clone the parent's
//! layer (the host copies it, keeping modes, owners, times, xattrs, links and devices),
//! and the mounts are bind mounts of it. The records live in the host's key-value store
//! (`wasnap_sdk::store::Store`), so any number of instances may serve one snapshotter.
//!
//! A layer is made before its record is written and removed after its record is gone,
//! so a crash leaves at most a layer no record names, which `cleanup` removes.

use wasnap_sdk::store::{Record, Store};
use wasnap_sdk::{Config, Kind, Labels, Layer, Mount, Result, Snapshotter, Usage, log};

/// Its configuration: none.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {}

/// The snapshotter: its records.
#[derive(Debug)]
struct Copy {
    store: Store,
}

impl Copy {
    fn mounts_for(rec: &Record) -> Vec<Mount> {
        vec![Mount::bind(rec.layer, rec.kind != Kind::Active)]
    }

    fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: Option<&str>,
        labels: &Labels,
    ) -> Result<Vec<Mount>> {
        let rec = self.store.create(kind, key, parent, labels, |p| match p {
            Some(p) => Layer::clone_of(p.layer),
            None => Layer::create(),
        })?;
        Ok(Self::mounts_for(&rec))
    }
}

impl Snapshotter for Copy {
    fn init(config: Config) -> Result<Self> {
        // No settings: any is refused, so a typo in the host's config is not ignored.
        let _: Settings = config.parse()?;
        Ok(Copy { store: Store::new() })
    }

    fn store(&self) -> Option<&Store> {
        Some(&self.store)
    }

    fn usage(&self, key: &str) -> Result<Usage> {
        self.store.get(key)?.layer.usage()
    }

    fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        Ok(Self::mounts_for(&self.store.get(key)?))
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
        // The record is gone; a layer left by a failure here is cleanup's.
        if let Err(e) = rec.layer.remove() {
            log::warn(format_args!("remove {key:?}: {} stays for cleanup: {e}", rec.layer));
        }
        Ok(())
    }

    fn cleanup(&self) -> Result<()> {
        let removed = self.store.reclaim_layers()?;
        if !removed.is_empty() {
            log::info(format_args!("cleanup removed {} layers no record named", removed.len()));
        }
        Ok(())
    }
}

wasnap_sdk::export_backend!(Copy);

#[cfg(test)]
mod tests {
    use wasnap_sdk::testing::Harness;

    use super::*;

    #[test]
    fn a_child_starts_as_a_copy_of_its_parent_and_changes_alone() {
        let h = Harness::new_temp();
        let _in = h.enter();
        let c = Copy::init(Config::new("null")).unwrap();
        let m = c.prepare("a", None, &Labels::new()).unwrap();
        let Mount::Bind { layer, readonly: false } = m[0] else { panic!("{m:?}") };
        layer.write_file("f", b"parent", 0o644).unwrap();
        c.commit("base", "a", &Labels::new()).unwrap();
        let m = c.prepare("b", Some("base"), &Labels::new()).unwrap();
        let Mount::Bind { layer: child, .. } = m[0] else { panic!("{m:?}") };
        assert_eq!(child.read_file("f").unwrap(), b"parent");
        child.write_file("f", b"child", 0o644).unwrap();
        assert_eq!(layer.read_file("f").unwrap(), b"parent");
        let Mount::Bind { readonly: true, .. } = c.mounts("base").unwrap()[0] else { panic!() };
        c.remove("b").unwrap();
        assert!(std::fs::metadata(h.layer_path(child)).is_err(), "its layer went with it");
    }
}
