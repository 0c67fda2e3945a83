//! `overlay-layout`: containerd's overlayfs snapshotter as a WebAssembly guest, the twin
//! of the host's overlay driver.
//!
//! The guest never mounts anything and never names a path: each snapshot has one layer
//! (its upper directory while active, its layer once committed), the records live in the
//! host's key-value store, and it returns overlay mounts that name layers, which the host
//! turns into real mounts from its own paths.
//!
//! Mounts, as containerd's overlayfs snapshotter makes them (lower layers nearest parent
//! first, `index=off` on every overlay):
//!
//! - active, no parent: a writable bind mount of its layer;
//! - active on a parent: `overlay` with the parent chain as lowers and its own layer as
//!   upper (the host provides the work directory);
//! - view (or committed) of one layer: a read-only bind mount of that layer; of several:
//!   a read-only `overlay` of them.
//!
//! Whiteouts and opaque directories are made by the kernel's overlayfs in the upper layer
//! while a snapshot is mounted; commit only changes the record, so the layer keeps them.
//! A new upper layer gets the owner of the layer below it, as containerd gives it, or a
//! chowned image root would be lost.

use wasnap_sdk::store::{Record, Store};
use wasnap_sdk::{Config, Error, Kind, Labels, Layer, Mount, Result, Snapshotter, Usage, log};

/// The most lower layers overlayfs stacks (the kernel's `OVERLAY_MAX_STACK`). A chain
/// deeper than this is refused when it is made, not when someone tries to mount it.
const MAX_LOWER_LAYERS: usize = 500;

/// Its configuration: none.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {}

/// The snapshotter: its records.
#[derive(Debug)]
struct OverlayLayout {
    store: Store,
}

/// The mounts of a snapshot of `kind` whose own layer is `own` (first in `chain`, which
/// continues with its parents' layers, nearest first).
fn mounts_of(kind: Kind, chain: &[Layer]) -> Vec<Mount> {
    let (own, parents) = chain.split_first().expect("a chain holds the snapshot's own layer");
    match (kind, parents) {
        (Kind::Active, []) => vec![Mount::bind(*own, false)],
        (Kind::Active, lowers) => vec![Mount::overlay(lowers.to_vec(), *own)],
        // A view shows its parents only: its own layer is empty and stays so.
        (Kind::View, []) => vec![Mount::bind(*own, true)],
        (Kind::View, [only]) => vec![Mount::bind(*only, true)],
        (Kind::View, lowers) => vec![Mount::overlay_readonly(lowers.to_vec())],
        (Kind::Committed, []) => vec![Mount::bind(*own, true)],
        (Kind::Committed, _) => vec![Mount::overlay_readonly(chain.to_vec())],
    }
}

impl OverlayLayout {
    fn mounts_for(&self, rec: &Record) -> Result<Vec<Mount>> {
        Ok(mounts_of(rec.kind, &self.store.chain(rec)?))
    }

    fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: Option<&str>,
        labels: &Labels,
    ) -> Result<Vec<Mount>> {
        if let Some(p) = parent {
            let depth = self
                .store
                .chain(&self.store.get(p).map_err(|e| match e {
                    Error::NotFound(_) => Error::NotFound(format!("parent snapshot {p:?}")),
                    other => other,
                })?)?
                .len();
            if depth > MAX_LOWER_LAYERS {
                return Err(Error::InvalidArgument(format!(
                    "parent {p:?} is {depth} layers deep; overlay stacks at most {MAX_LOWER_LAYERS} lower layers"
                )));
            }
        }
        let rec = self.store.create(kind, key, parent, labels, |p| match p {
            Some(p) => Layer::create_owned_like(p.layer),
            None => Layer::create(),
        })?;
        self.mounts_for(&rec)
    }
}

impl Snapshotter for OverlayLayout {
    fn init(config: Config) -> Result<Self> {
        let _: Settings = config.parse()?;
        Ok(OverlayLayout { store: Store::new() })
    }

    fn store(&self) -> Option<&Store> {
        Some(&self.store)
    }

    fn usage(&self, key: &str) -> Result<Usage> {
        self.store.get(key)?.layer.usage()
    }

    fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        self.mounts_for(&self.store.get(key)?)
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
        if let Err(e) = rec.layer.remove() {
            log::warn(format_args!("remove {key:?}: {} stays for cleanup: {e}", rec.layer));
        }
        Ok(())
    }

    fn cleanup(&self) -> Result<()> {
        self.store.reclaim_layers().map(drop)
    }
}

wasnap_sdk::export_backend!(OverlayLayout);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_follow_containerd_overlayfs() {
        let l = |ids: &[u64]| ids.iter().copied().map(Layer).collect::<Vec<_>>();
        assert_eq!(mounts_of(Kind::Active, &l(&[1])), [Mount::bind(Layer(1), false)]);
        assert_eq!(mounts_of(Kind::Active, &l(&[3, 2, 1])), [Mount::overlay(l(&[2, 1]), Layer(3))]);
        assert_eq!(mounts_of(Kind::View, &l(&[4, 2])), [Mount::bind(Layer(2), true)]);
        assert_eq!(mounts_of(Kind::View, &l(&[4, 2, 1])), [Mount::overlay_readonly(l(&[2, 1]))]);
        assert_eq!(mounts_of(Kind::Committed, &l(&[2])), [Mount::bind(Layer(2), true)]);
        assert_eq!(mounts_of(Kind::Committed, &l(&[2, 1])), [Mount::overlay_readonly(l(&[2, 1]))]);
    }
}
