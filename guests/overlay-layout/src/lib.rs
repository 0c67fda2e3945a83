//! `overlay-layout`: containerd's overlayfs snapshotter as a WebAssembly guest, the twin
//! of the host's overlay driver.
//!
//! The guest never mounts anything: it lays out directories in its root and returns
//! overlay mounts over them, which the host checks, resolves and hands on. Inside the
//! plugin's root:
//!
//! ```text
//! meta/                   the records (wasnap_sdk::store::Store)
//! snapshots/<id>/fs       the snapshot's layer: the upper directory while it is active
//! snapshots/<id>/work     overlayfs's work directory for that upper directory
//! tmp-<id>/               a snapshot's directories being made
//! ```
//!
//! Mounts, as containerd's overlayfs snapshotter makes them (lower layers nearest parent
//! first, `index=off` on every overlay):
//!
//! - active, no parent: a writable bind mount of its `fs`;
//! - active on a parent: `overlay` with the parent chain as `lowerdir`, its own `fs` as
//!   `upperdir` and `work` as `workdir`;
//! - view (or committed) of one layer: a read-only bind mount of that layer's `fs`;
//!   of several: a read-only `overlay` of them, `lowerdir` only.
//!
//! Whiteouts and opaque directories are made by the kernel's overlayfs in the upper
//! directory while a snapshot is mounted; commit only changes the record, so the layer
//! keeps them. The directories are made in `tmp-<id>`, renamed into place, and only
//! then is the record written; remove forgets the record before deleting the
//! directories. After a crash every record names complete directories, and what no
//! record names is left for `cleanup`.
//!
//! Configuration (all optional): `{"grace_secs": 600}`, how old a half-made snapshot or
//! another instance's reservation must be before cleanup takes it for a crash's.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use wasnap_sdk::store::{DEFAULT_GRACE, Record, Store, dir_names};
use wasnap_sdk::{Config, Error, Info, Kind, Labels, Mount, Result, Snapshotter, Usage, host, log};

const META: &str = "/meta";
const SNAPSHOTS: &str = "/snapshots";
const TMP_PREFIX: &str = "tmp-";

/// The most lower layers overlayfs stacks (the kernel's `OVERLAY_MAX_STACK`). A chain
/// deeper than this is refused when it is made, not when someone tries to mount it.
const MAX_LOWER_LAYERS: usize = 500;

/// What the host adds to overlay mounts, as containerd does where the kernel has it: a
/// layer may then be the lower directory of several upper directories.
const INDEX_OFF: &str = "index=off";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    /// Seconds after which what another instance left half done counts as a crash's.
    grace_secs: Option<u64>,
}

/// The snapshotter: its records; the layers live beside them in the root.
#[derive(Debug)]
struct OverlayLayout {
    store: Store,
}

/// Where snapshot `id`'s directories live.
fn home(id: u64) -> PathBuf {
    Path::new(SNAPSHOTS).join(id.to_string())
}

/// Snapshot `id`'s layer.
fn fs_dir(id: u64) -> PathBuf {
    home(id).join("fs")
}

/// Snapshot `id`'s overlay work directory.
fn work_dir(id: u64) -> PathBuf {
    home(id).join("work")
}

/// Where snapshot `id`'s directories are made.
fn tmp_home(id: u64) -> PathBuf {
    PathBuf::from(format!("/{TMP_PREFIX}{id}"))
}

fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::io(what, e)
}

/// Makes directory `path` with `mode`: WASI creates directories with the host's default
/// mode, which need not be the one containerd gives.
fn mkdir(path: &Path, mode: u32) -> Result<()> {
    fs::create_dir(path).map_err(io(format!("create {}", path.display())))?;
    host::chmod(path, mode)
}

/// Makes the empty layer and work directory of a new snapshot in `dir`. The layer is
/// the root of whatever is mounted from it, hence 0755 (containerd's mode).
///
/// containerd also gives a new upper directory the owner of the layer below it; WASI
/// cannot read an owner and the host offers no call that does, so the layer stays the
/// host process's (root's): an image whose root directory belongs to someone else
/// shows root as its owner in a snapshot prepared on it.
fn build(dir: &Path) -> Result<()> {
    fs::create_dir(dir).map_err(io(format!("create {}", dir.display())))?;
    mkdir(&dir.join("fs"), 0o755)?;
    mkdir(&dir.join("work"), 0o711)
}

/// The numbers that name entries of `dir` as `<prefix><n>`, and the names that do not
/// parse (garbage too).
fn numbered(dir: &str, prefix: &str) -> Result<(Vec<u64>, Vec<String>)> {
    let (mut ids, mut other) = (Vec::new(), Vec::new());
    for name in dir_names(Path::new(dir))? {
        let Some(rest) = name.strip_prefix(prefix) else { continue };
        match rest.parse::<u64>() {
            Ok(id) => ids.push(id),
            Err(_) => other.push(name),
        }
    }
    Ok((ids, other))
}

/// The mounts of a snapshot whose own id is `id`, of `kind`, with the ancestors `parents`
/// (ids, nearest first).
fn mounts_of(kind: Kind, id: u64, parents: &[u64]) -> Result<Vec<Mount>> {
    // What the snapshot shows, top first: its own layer unless it is a view.
    let mut layers: Vec<u64> = Vec::with_capacity(parents.len() + 1);
    if kind != Kind::View {
        layers.push(id);
    }
    layers.extend_from_slice(parents);
    let mount = match (kind, layers.as_slice()) {
        // A view without a parent shows its own (empty) layer.
        (_, []) => Mount::bind(fs_dir(id), true)?,
        (Kind::Active, [_]) => Mount::bind(fs_dir(id), false)?,
        (Kind::Active, [_, lowers @ ..]) => {
            let lowers: Vec<PathBuf> = lowers.iter().map(|l| fs_dir(*l)).collect();
            let mut m = Mount::overlay(&lowers, fs_dir(id), work_dir(id))?;
            m.options.push(INDEX_OFF.into());
            m
        }
        // The kernel wants two lower layers for an overlay without an upper one.
        (_, [only]) => Mount::bind(fs_dir(*only), true)?,
        (_, lowers) => {
            let lowers: Vec<PathBuf> = lowers.iter().map(|l| fs_dir(*l)).collect();
            let mut m = Mount::overlay_readonly(&lowers)?;
            m.options.push(INDEX_OFF.into());
            m
        }
    };
    Ok(vec![mount])
}

impl OverlayLayout {
    fn mounts_for(&self, rec: &Record) -> Result<Vec<Mount>> {
        let parents: Vec<u64> = self.store.ancestors(rec)?.iter().map(|p| p.id).collect();
        mounts_of(rec.kind, rec.id, &parents)
    }

    fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: Option<&str>,
        labels: &Labels,
    ) -> Result<Vec<Mount>> {
        let reservation = self.store.reserve(key, parent)?;
        let id = reservation.id;
        let mut parents = Vec::new();
        if let Some(p) = &reservation.parent {
            parents.push(p.id);
            parents.extend(self.store.ancestors(p)?.iter().map(|a| a.id));
            if parents.len() > MAX_LOWER_LAYERS {
                return Err(Error::InvalidArgument(format!(
                    "parent {:?} is {} layers deep; overlay stacks at most {MAX_LOWER_LAYERS} lower layers, so a snapshot on it could not be mounted",
                    p.name,
                    parents.len()
                )));
            }
        }
        let tmp = tmp_home(id);
        let dst = home(id);
        let placed = build(&tmp)
            .map_err(|e| e.context(format!("make the directories of {key:?}")))
            .and_then(|()| {
                // Ids are never reused: directories here are a crash's leftover from
                // before the allocator passed this id.
                if fs::symlink_metadata(&dst).is_ok() {
                    host::remove_tree(&dst)?;
                }
                fs::rename(&tmp, &dst).map_err(io(format!(
                    "rename {} to {}",
                    tmp.display(),
                    dst.display()
                )))
            });
        if let Err(e) = placed {
            let _ = host::remove_tree(&tmp);
            return Err(e);
        }
        match self.store.insert(reservation, kind, labels) {
            Ok(rec) => mounts_of(kind, rec.id, &parents),
            Err(e) => {
                let _ = host::remove_tree(&dst);
                Err(e)
            }
        }
    }

    /// Removes `path`, keeping the first failure for the caller while going on.
    fn reclaim(path: &Path, first_error: &mut Option<Error>) {
        if let Err(e) = host::remove_tree(path) {
            log::warn(format_args!("cleanup: could not remove {}: {e}", path.display()));
            first_error.get_or_insert(e);
        }
    }
}

impl Snapshotter for OverlayLayout {
    fn init(config: Config) -> Result<Self> {
        let settings: Settings = config.parse()?;
        let grace = settings.grace_secs.map_or(DEFAULT_GRACE, Duration::from_secs);
        fs::create_dir_all(SNAPSHOTS).map_err(io(format!("create {SNAPSHOTS}")))?;
        Ok(OverlayLayout { store: Store::open_with_grace(META, grace)? })
    }

    fn stat(&self, key: &str) -> Result<Info> {
        self.store.stat(key)
    }

    fn update(&self, info: &Info, fieldpaths: &[String]) -> Result<Info> {
        self.store.update(info, fieldpaths)
    }

    fn usage(&self, key: &str) -> Result<Usage> {
        // The layer alone: parents are other snapshots' usage, and the work directory
        // holds nothing between mounts.
        let rec = self.store.get(key)?;
        host::disk_usage(fs_dir(rec.id))
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
        // The upper directory becomes the layer as it is: only the record changes.
        self.store.commit(name, key, labels).map(drop)
    }

    fn remove(&self, key: &str) -> Result<()> {
        let rec = self.store.remove(key)?;
        // The snapshot is gone once its record is; directories left here are cleanup's.
        if let Err(e) = host::remove_tree(home(rec.id)) {
            log::warn(format_args!("remove {key:?}: directories left for cleanup: {e}"));
        }
        Ok(())
    }

    fn list(&self, after: Option<&str>, limit: u32) -> Result<Vec<Info>> {
        self.store.list(after, limit)
    }

    fn cleanup(&self) -> Result<()> {
        self.store.repair()?;
        // Listings first, then what is in flight, then the records: a create in another
        // instance reserves its id before its directories exist and lets go of it only
        // after its record is written, so an id listed here is in one of the later reads.
        let (homes, stray_homes) = numbered(SNAPSHOTS, "")?;
        let (building, stray_tmps) = numbered("/", TMP_PREFIX)?;
        let busy = self.store.inflight()?;
        let live = self.store.ids()?;
        let mut first_error = None;
        for id in homes.into_iter().filter(|id| !live.contains(id) && !busy.contains(id)) {
            Self::reclaim(&home(id), &mut first_error);
        }
        for id in building.into_iter().filter(|id| !busy.contains(id)) {
            Self::reclaim(&tmp_home(id), &mut first_error);
        }
        let strays = stray_homes
            .into_iter()
            .map(|n| Path::new(SNAPSHOTS).join(n))
            .chain(stray_tmps.into_iter().map(|n| Path::new("/").join(n)));
        for path in strays {
            Self::reclaim(&path, &mut first_error);
        }
        first_error.map_or(Ok(()), Err)
    }
}

wasnap_sdk::export_backend!(OverlayLayout);

#[cfg(test)]
mod tests {
    use super::*;

    fn options(kind: Kind, id: u64, parents: &[u64]) -> (String, String, Vec<String>) {
        let m = mounts_of(kind, id, parents).unwrap();
        assert_eq!(m.len(), 1);
        let m = m.into_iter().next().unwrap();
        (m.kind, m.source, m.options)
    }

    #[test]
    fn mounts_follow_containerd_overlayfs() {
        assert_eq!(
            options(Kind::Active, 1, &[]),
            ("bind".into(), "snapshots/1/fs".into(), vec!["rbind".into(), "rw".into()])
        );
        assert_eq!(
            options(Kind::View, 1, &[]),
            ("bind".into(), "snapshots/1/fs".into(), vec!["rbind".into(), "ro".into()])
        );
        assert_eq!(
            options(Kind::View, 3, &[2]),
            ("bind".into(), "snapshots/2/fs".into(), vec!["rbind".into(), "ro".into()])
        );
        assert_eq!(
            options(Kind::Committed, 1, &[]),
            ("bind".into(), "snapshots/1/fs".into(), vec!["rbind".into(), "ro".into()])
        );
        let (kind, _, opts) = options(Kind::Active, 3, &[2, 1]);
        assert_eq!(kind, "overlay");
        assert_eq!(
            opts,
            [
                "lowerdir=snapshots/2/fs:snapshots/1/fs",
                "upperdir=snapshots/3/fs",
                "workdir=snapshots/3/work",
                "index=off"
            ]
        );
        let (_, _, opts) = options(Kind::View, 4, &[2, 1]);
        assert_eq!(opts, ["ro", "lowerdir=snapshots/2/fs:snapshots/1/fs", "index=off"]);
        let (_, _, opts) = options(Kind::Committed, 2, &[1]);
        assert_eq!(opts, ["ro", "lowerdir=snapshots/2/fs:snapshots/1/fs", "index=off"]);
    }
}
