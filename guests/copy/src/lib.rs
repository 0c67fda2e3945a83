//! `copy`: a copy-based snapshotter as a WebAssembly guest, the twin of the host's native
//! driver, and the example of a backend built on `wasnap-sdk`.
//!
//! Every snapshot is a full directory tree: prepare and view copy the parent's tree
//! (through the host, which keeps modes, owners, times, xattrs, links and devices), and the
//! mounts are bind mounts of it. Inside the plugin's root:
//!
//! ```text
//! meta/              the records (wasnap_sdk::store::Store)
//! snapshots/<id>/    one tree per snapshot
//! tmp-<id>/          a tree being built for snapshot <id>
//! ```
//!
//! A tree is built in `tmp-<id>`, renamed to `snapshots/<id>`, and only then is the record
//! written; remove forgets the record before deleting the tree. So after a crash at any
//! step every record names a complete tree, and what no record names is left for
//! `cleanup`.
//!
//! Configuration (all optional): `{"grace_secs": 600}`, how old a half-built tree or a
//! reservation of another instance must be before cleanup takes it for a crash's.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use wasnap_sdk::store::{DEFAULT_GRACE, Record, Store, dir_names};
use wasnap_sdk::{Config, Error, Info, Kind, Labels, Mount, Result, Snapshotter, Usage, host, log};

const META: &str = "/meta";
const SNAPSHOTS: &str = "/snapshots";
const TMP_PREFIX: &str = "tmp-";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    /// Seconds after which what another instance left half done counts as a crash's.
    grace_secs: Option<u64>,
}

/// The snapshotter: its records; the trees live beside them in the root.
#[derive(Debug)]
struct Copy {
    store: Store,
}

/// Where snapshot `id`'s tree lives.
fn tree(id: u64) -> PathBuf {
    Path::new(SNAPSHOTS).join(id.to_string())
}

/// Where snapshot `id`'s tree is built.
fn tmp_tree(id: u64) -> PathBuf {
    PathBuf::from(format!("/{TMP_PREFIX}{id}"))
}

fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::io(what, e)
}

/// Fills the new tree at `dst`: a copy of the parent's, or an empty root with mode 0755
/// (WASI creates directories with the host's default mode, which need not be that).
fn build(dst: &Path, parent: Option<&Record>) -> Result<()> {
    match parent {
        Some(p) => host::copy_tree(tree(p.id), dst),
        None => {
            fs::create_dir(dst).map_err(io(format!("create {}", dst.display())))?;
            host::chmod(dst, 0o755)
        }
    }
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

impl Copy {
    fn mounts_for(rec: &Record) -> Result<Vec<Mount>> {
        Ok(vec![Mount::bind(tree(rec.id), rec.kind != Kind::Active)?])
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
        let tmp = tmp_tree(id);
        let home = tree(id);
        let placed = build(&tmp, reservation.parent.as_ref())
            .map_err(|e| e.context(format!("build the tree of {key:?}")))
            .and_then(|()| {
                // Ids are never reused: a tree here is a crash's leftover from before the
                // allocator passed this id.
                if fs::symlink_metadata(&home).is_ok() {
                    host::remove_tree(&home)?;
                }
                fs::rename(&tmp, &home).map_err(io(format!(
                    "rename {} to {}",
                    tmp.display(),
                    home.display()
                )))
            });
        if let Err(e) = placed {
            let _ = host::remove_tree(&tmp);
            return Err(e);
        }
        match self.store.insert(reservation, kind, labels) {
            Ok(rec) => Self::mounts_for(&rec),
            Err(e) => {
                let _ = host::remove_tree(&home);
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

impl Snapshotter for Copy {
    fn init(config: Config) -> Result<Self> {
        let settings: Settings = config.parse()?;
        let grace = settings.grace_secs.map_or(DEFAULT_GRACE, Duration::from_secs);
        fs::create_dir_all(SNAPSHOTS).map_err(io(format!("create {SNAPSHOTS}")))?;
        Ok(Copy { store: Store::open_with_grace(META, grace)? })
    }

    fn stat(&self, key: &str) -> Result<Info> {
        self.store.stat(key)
    }

    fn update(&self, info: &Info, fieldpaths: &[String]) -> Result<Info> {
        self.store.update(info, fieldpaths)
    }

    fn usage(&self, key: &str) -> Result<Usage> {
        let rec = self.store.get(key)?;
        host::disk_usage(tree(rec.id))
    }

    fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        Self::mounts_for(&self.store.get(key)?)
    }

    fn prepare(&self, key: &str, parent: Option<&str>, labels: &Labels) -> Result<Vec<Mount>> {
        self.create(Kind::Active, key, parent, labels)
    }

    fn view(&self, key: &str, parent: Option<&str>, labels: &Labels) -> Result<Vec<Mount>> {
        self.create(Kind::View, key, parent, labels)
    }

    fn commit(&self, name: &str, key: &str, labels: &Labels) -> Result<()> {
        // The tree stays where it is: committed and active differ only in the record.
        self.store.commit(name, key, labels).map(drop)
    }

    fn remove(&self, key: &str) -> Result<()> {
        let rec = self.store.remove(key)?;
        // The snapshot is gone once its record is; a tree left here is cleanup's.
        if let Err(e) = host::remove_tree(tree(rec.id)) {
            log::warn(format_args!("remove {key:?}: tree left for cleanup: {e}"));
        }
        Ok(())
    }

    fn list(&self, after: Option<&str>, limit: u32) -> Result<Vec<Info>> {
        self.store.list(after, limit)
    }

    fn cleanup(&self) -> Result<()> {
        self.store.repair()?;
        // Listings first, then what is in flight, then the records: a create in another
        // instance reserves its id before its tree exists and lets go of it only after
        // its record is written, so a tree listed here is in one of the two later reads.
        let (trees, stray_trees) = numbered(SNAPSHOTS, "")?;
        let (building, stray_tmps) = numbered("/", TMP_PREFIX)?;
        let busy = self.store.inflight()?;
        let live = self.store.ids()?;
        let mut first_error = None;
        for id in trees.into_iter().filter(|id| !live.contains(id) && !busy.contains(id)) {
            Self::reclaim(&tree(id), &mut first_error);
        }
        for id in building.into_iter().filter(|id| !busy.contains(id)) {
            Self::reclaim(&tmp_tree(id), &mut first_error);
        }
        let strays = stray_trees
            .into_iter()
            .map(|n| Path::new(SNAPSHOTS).join(n))
            .chain(stray_tmps.into_iter().map(|n| Path::new("/").join(n)));
        for path in strays {
            Self::reclaim(&path, &mut first_error);
        }
        first_error.map_or(Ok(()), Err)
    }
}

wasnap_sdk::export_backend!(Copy);
