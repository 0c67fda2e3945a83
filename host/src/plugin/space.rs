//! What one plugin owns on the host: its private directory, its layers, its key-value
//! store. Shared by every instance of the plugin, so invariants across records hold
//! however many instances run.
//!
//! ```text
//! <dir>/state/         the plugin's private directory: its WASI preopen, nothing else
//! <dir>/layers/<id>    a layer's contents (backends only); what mounts name
//! <dir>/work/<id>      overlay's work directory for layer <id> used as an upper layer
//! <dir>/tmp/           layers being made; anything here after a crash is garbage
//! ```
//!
//! The layer registry and the key-value store are tables of the root's database (or,
//! for a plugin opened on its own, of a database in `<dir>`), keyed by the space's name.
//! Under a host their changes are deferred like a driver's: the metadata commit that
//! follows every backend call makes them durable.
//!
//! A layer is made in `tmp/`, renamed to `layers/<id>`, then registered; until the call
//! that made it returns it is *pending*, visible to that call only. So a cleanup in one
//! instance never takes a layer another instance is about to record. A removed layer is
//! gone at once (no call may use or list it, its directory is deleted), but its registry
//! entry is deleted by the space's next write, whichever call makes it, or when the
//! space next opens: a removal costs no write of its own.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cap_std::fs::{Dir, DirBuilder, DirBuilderExt};
use redb::{ReadableTable, TableDefinition, WriteTransaction};
use rustix::fs::{AtFlags, Gid, Mode, Uid};

use super::limits::Limits;
use super::quota::StateQuota;
use crate::error::{Context, Error, Result};
use crate::fsutil;
use crate::kv::{Db, Durability, IdBlocks, now_nanos};
use crate::snapshot::Usage;

/// (space, layer id) -> when it was made (nanoseconds since the epoch).
const LAYERS: TableDefinition<'static, (&str, u64), u64> = TableDefinition::new("plugin_layers");
/// (space, key) -> revision (8 bytes, little-endian) followed by the value.
const KV: TableDefinition<'static, (&str, &str), &[u8]> = TableDefinition::new("plugin_kv");
/// (space, counter) -> value.
const META: TableDefinition<'static, (&str, &str), u64> = TableDefinition::new("plugin_meta");
const META_LAYER: &str = "layer";
const META_REVISION: &str = "revision";
const META_BYTES: &str = "bytes";

/// The database file of a plugin opened on its own, in its directory.
const OWN_DB: &str = "plugin.db";
const STATE: &str = "state";
const LAYERS_DIR: &str = "layers";
const WORK_DIR: &str = "work";
const TMP_DIR: &str = "tmp";

/// Longest key, value, and most writes of one change, and most entries of one range.
pub(crate) const MAX_KEY: usize = 1024;
pub(crate) const MAX_VALUE: usize = 1 << 20;
pub(crate) const MAX_WRITES: usize = 1024;
pub(crate) const MAX_RANGE: u32 = 10_000;
/// Most bytes of values one range returns; a range stops early past it.
const MAX_RANGE_BYTES: usize = 16 << 20;
/// Layer ids are handed out from blocks reserved in the registry.
const ID_BLOCK: u64 = 256;
/// Inodes the layers' filesystem must keep free, where it counts them, while
/// `keep_free_mib` is set.
const KEEP_FREE_INODES: u64 = 4096;

/// A guest call, as layers know it: a layer made during a call is that call's until it
/// returns.
pub(crate) type CallId = u64;

/// A fresh call id.
pub(crate) fn next_call() -> CallId {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// One plugin's world on the host.
pub struct Space {
    name: String,
    private: PathBuf,
    db: Arc<Db>,
    durability: Durability,
    layers: Option<LayerDirs>,
    kv_max_bytes: u64,
    /// The budget of `state/`, which the guest's WASI writes are charged against.
    state: Arc<StateQuota>,
    /// Bumped after each change to this space's key-value rows, which only
    /// [`Space::kv_commit`] makes.
    kv_generation: AtomicU64,
    /// A read view of the key-value table, reused by reads while no change has been
    /// made since it was taken, and for at most [`KV_VIEW_FOR`] (so it never holds old
    /// pages of the database for long): a `get` is then one lookup, not a transaction.
    kv_view: Mutex<Option<KvView>>,
}

/// How long a read view of the key-value table is reused.
const KV_VIEW_FOR: std::time::Duration = std::time::Duration::from_millis(20);

type KvTable = redb::ReadOnlyTable<(&'static str, &'static str), &'static [u8]>;

struct KvView {
    generation: u64,
    taken: std::time::Instant,
    table: Arc<KvTable>,
}

impl std::fmt::Debug for Space {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Space").field("name", &self.name).field("private", &self.private).finish()
    }
}

/// A layer made by a call still in progress.
#[derive(Debug, Clone, Copy)]
struct Pending {
    call: CallId,
    /// Whether its registry entry is written. A new layer is registered with the
    /// call's next key-value commit, in the same transaction, or else when the call
    /// ends: before anything durable can name it, and without a write of its own.
    registered: bool,
}

/// The directories of a backend's layers.
struct LayerDirs {
    /// The host path of the plugin's directory: mounts name paths below it.
    path: PathBuf,
    layers: Dir,
    work: Dir,
    tmp: Dir,
    /// Layers being made by a call still in progress.
    pending: Mutex<HashMap<u64, Pending>>,
    /// Layers removed whose registry entry is still written: never usable or listed,
    /// and their entries are deleted by the space's next write, in its transaction,
    /// rather than by a write of their own (or, after a crash, when the space opens).
    removed: Mutex<HashSet<u64>>,
    ids: IdBlocks,
    tmp_seq: AtomicU64,
    /// Bytes the layers' filesystem must keep free: past it, a guest adds nothing to
    /// its layers ([`Space::room`]).
    keep_free: AtomicU64,
    /// Names in `tmp/` whose removal a call's deadline cut short: a failed clone's
    /// partial copy, a removed layer. Nothing else names them; each later call that
    /// makes or removes a layer goes on removing them, within its own deadline, so a
    /// guest that keeps running out of time cannot keep space for itself.
    garbage: Mutex<Vec<String>>,
}

fn subdir(dir: &Dir, name: &str, path: &Path) -> Result<Dir> {
    // No-follow: made, never followed, its name synced. The names are the
    // host's, in the plugin's directory, which no guest reaches.
    fsutil::make_dir_synced(dir, name, 0o700)
        .with_context(|| format!("open {}/{name}", path.display()))
}

fn decode_entry(bytes: &[u8]) -> Result<(u64, Vec<u8>)> {
    if bytes.len() < 8 {
        return Err(Error::internal("corrupt key-value entry: shorter than its revision"));
    }
    let (rev, value) = bytes.split_at(8);
    let rev = u64::from_le_bytes(rev.try_into().map_err(|_| Error::internal("revision"))?);
    Ok((rev, value.to_vec()))
}

/// A key-value check: `key` has `revision` (none: not set).
#[derive(Debug, Clone)]
pub(crate) struct Check {
    pub key: String,
    pub revision: Option<u64>,
}

/// A key-value write.
#[derive(Debug, Clone)]
pub(crate) enum Write {
    Put(String, Vec<u8>),
    Delete(String),
}

impl Space {
    /// The space `name` in the plugin directory `dir` (host path `path`), with layers if
    /// `layers`. `db` is the root's shared database; without one the space keeps a
    /// database of its own in `dir`. Of `limits`, it keeps to those on disk: `kv_mib`,
    /// `state_mib` ([`StateQuota`]) and `keep_free_mib`. Leftovers of a crash
    /// (half-made layers, layers no registry names) are deleted: no call runs yet.
    pub fn open(
        name: &str,
        dir: &Dir,
        path: &Path,
        db: Option<&Arc<Db>>,
        layers: bool,
        limits: &Limits,
    ) -> Result<Arc<Space>> {
        let kv_max_bytes = limits.kv_mib.saturating_mul(1 << 20);
        let state_max_bytes = limits.state_mib.saturating_mul(1 << 20);
        let (db, durability) = match db {
            Some(db) => (db.clone(), Durability::Deferred),
            None => (Arc::new(Db::open(dir, OWN_DB, "plugin database")?), Durability::Immediate),
        };
        db.write(Durability::Immediate, |txn| {
            txn.open_table(LAYERS)?;
            txn.open_table(KV)?;
            txn.open_table(META)?;
            Ok(())
        })?;
        let state = Arc::new(StateQuota::new(subdir(dir, STATE, path)?, state_max_bytes));
        let layers = if layers {
            Some(LayerDirs {
                path: path.to_owned(),
                layers: subdir(dir, LAYERS_DIR, path)?,
                work: subdir(dir, WORK_DIR, path)?,
                tmp: subdir(dir, TMP_DIR, path)?,
                pending: Mutex::default(),
                removed: Mutex::default(),
                ids: IdBlocks::new(META, name, META_LAYER, ID_BLOCK),
                tmp_seq: AtomicU64::new(0),
                garbage: Mutex::new(Vec::new()),
                keep_free: AtomicU64::new(limits.keep_free_mib.saturating_mul(1 << 20)),
            })
        } else {
            None
        };
        let space = Arc::new(Space {
            name: name.to_owned(),
            private: path.join(STATE),
            db,
            durability,
            layers,
            kv_max_bytes,
            state,
            kv_generation: AtomicU64::new(0),
            kv_view: Mutex::new(None),
        });
        space.reclaim()?;
        Ok(space)
    }

    /// The plugin's private directory on the host: its WASI preopen.
    pub fn private(&self) -> &Path {
        &self.private
    }

    /// The budget of the private directory.
    pub(crate) fn state_quota(&self) -> &Arc<StateQuota> {
        &self.state
    }

    /// Applies a reload's limits: those on disk that can change while the space is
    /// open (`state_mib`, `keep_free_mib`; not `kv_mib`).
    pub(crate) fn set_limits(&self, limits: &Limits) {
        self.state.set_max(limits.state_mib.saturating_mul(1 << 20));
        if let Some(d) = &self.layers {
            d.keep_free.store(limits.keep_free_mib.saturating_mul(1 << 20), Ordering::Relaxed);
        }
    }

    /// Fails while the filesystem holding the layers has less space (or fewer inodes)
    /// free than the plugin must leave: what a guest adds to its layers cannot fill it.
    /// Free space is what an unprivileged user could still use (`f_bavail`), so the
    /// blocks a filesystem reserves for root are never counted as room.
    fn room(&self, d: &LayerDirs) -> Result<()> {
        let keep = d.keep_free.load(Ordering::Relaxed);
        if keep == 0 {
            return Ok(());
        }
        // Pinned: statfs of the host's own layers directory, by descriptor.
        let st = rustix::fs::fstatvfs(&d.layers).context("statfs the layers' filesystem")?;
        let free = st.f_bavail.saturating_mul(st.f_frsize);
        // A filesystem that counts inodes (btrfs does not: it reports none).
        let inodes_short = st.f_files > 0 && st.f_favail < KEEP_FREE_INODES;
        if free < keep || inodes_short {
            return Err(Error::failed_precondition(format!(
                "plugin {:?} may not add to its layers: their filesystem has {} MiB and {} inodes free, and {} MiB and {KEEP_FREE_INODES} inodes must stay free (keep_free_mib)",
                self.name,
                free >> 20,
                st.f_favail,
                keep >> 20
            )));
        }
        Ok(())
    }

    /// As [`Self::room`], before a host function adds to a layer.
    pub(crate) fn room_for_writes(&self) -> Result<()> {
        self.room(self.dirs()?)
    }

    /// Whether the plugin has layers (a backend).
    pub fn has_layers(&self) -> bool {
        self.layers.is_some()
    }

    fn dirs(&self) -> Result<&LayerDirs> {
        self.layers
            .as_ref()
            .ok_or_else(|| Error::not_implemented("a policy has no layers of its own"))
    }

    fn registered(&self) -> Result<Vec<u64>> {
        self.db.read_with(|txn| {
            let t = txn.open_table(LAYERS)?;
            let mut ids = Vec::new();
            for item in t.range((self.name.as_str(), 0)..=(self.name.as_str(), u64::MAX))? {
                ids.push(item?.0.value().1);
            }
            Ok(ids)
        })
    }

    fn is_registered(&self, id: u64) -> Result<bool> {
        self.db
            .read_with(|txn| Ok(txn.open_table(LAYERS)?.get((self.name.as_str(), id))?.is_some()))
    }

    /// Deletes what a crash left: everything in `tmp/`, and layers and work directories
    /// no registry entry names.
    fn reclaim(&self) -> Result<()> {
        let Some(d) = &self.layers else { return Ok(()) };
        let known: HashSet<u64> = self.registered()?.into_iter().collect();
        // Pinned: listings of the host's own directories; each name is then removed with
        // remove_tree, which follows no symlink and crosses no mount.
        let names = |dir: &Dir| -> Result<Vec<String>> {
            let mut out = Vec::new();
            for e in dir.entries().context("read a layer directory")? {
                out.push(
                    e.context("read a layer directory")?.file_name().to_string_lossy().into_owned(),
                );
            }
            Ok(out)
        };
        for name in names(&d.tmp)? {
            fsutil::remove_tree(&d.tmp, &name)?;
        }
        for (dir, what) in [(&d.layers, LAYERS_DIR), (&d.work, WORK_DIR)] {
            for name in names(dir)? {
                if !name.parse::<u64>().is_ok_and(|id| known.contains(&id)) {
                    tracing::info!(space = %self.name, entry = %format!("{what}/{name}"), "deleting what a crash left");
                    fsutil::remove_tree(dir, &name)?;
                }
            }
        }
        // Entries of layers whose removal a crash cut short after their directory went
        // (see `LayerDirs::removed`).
        let layers: HashSet<String> = names(&d.layers)?.into_iter().collect();
        let gone: Vec<u64> =
            known.into_iter().filter(|id| !layers.contains(&id.to_string())).collect();
        if !gone.is_empty() {
            tracing::info!(space = %self.name, layers = ?gone, "deleting registry entries of removed layers");
            let name = self.name.clone();
            self.db.write(self.durability, move |txn| unregister_in(txn, &name, &gone))?;
        }
        Ok(())
    }

    // --- layers ---

    /// Whether `call` may use layer `id`: it is `call`'s own pending layer, or
    /// registered and not another call's pending layer.
    fn usable(&self, call: CallId, id: u64) -> Result<()> {
        let d = self.dirs()?;
        match d.pending.lock().unwrap_or_else(|e| e.into_inner()).get(&id) {
            Some(p) if p.call != call => {
                return Err(Error::failed_precondition(format!(
                    "layer {id} is being made by another call"
                )));
            }
            Some(_) => return Ok(()),
            None => {}
        }
        if d.removed.lock().unwrap_or_else(|e| e.into_inner()).contains(&id)
            || !self.is_registered(id)?
        {
            return Err(Error::not_found(format!("layer {id}")));
        }
        Ok(())
    }

    fn next_id(&self, d: &LayerDirs) -> Result<u64> {
        d.ids.next(&self.db)
    }

    /// Makes a layer for `call`: `build` fills `tmp/<name>` (which it must create), then
    /// the layer is moved into place, pending until the call returns and registered by
    /// then (see [`Pending::registered`]). A crash before that leaves a directory no
    /// registry entry names, which the next open deletes; nothing durable named it.
    fn make(&self, call: CallId, build: impl FnOnce(&Dir, &str) -> Result<()>) -> Result<u64> {
        let d = self.dirs()?;
        self.sweep(d)?;
        self.room(d)?;
        let id = self.next_id(d)?;
        let tmp = format!("{id}-{}", d.tmp_seq.fetch_add(1, Ordering::Relaxed));
        // No-follow: rename moves the name itself, between two of the host's directories.
        let made = build(&d.tmp, &tmp).and_then(|()| {
            d.tmp
                .rename(&tmp, &d.layers, id.to_string())
                .with_context(|| format!("move the new layer {id} into place"))
        });
        if let Err(e) = made {
            if let Err(left) = Self::discard(d, tmp) {
                tracing::warn!(space = %self.name, "a failed layer's remains in tmp/ wait for the next open: {left}");
            }
            return Err(e);
        }
        let pending = Pending { call, registered: false };
        d.pending.lock().unwrap_or_else(|e| e.into_inner()).insert(id, pending);
        Ok(id)
    }

    /// Removes `tmp/<name>`. If the call's deadline cuts that short, the rest is
    /// garbage the next calls go on with ([`LayerDirs::garbage`]); any other failure is
    /// the caller's (what is left waits for the next open, as after a crash).
    fn discard(d: &LayerDirs, name: String) -> Result<()> {
        match fsutil::remove_tree(&d.tmp, &name) {
            Ok(()) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) if fsutil::deadline::passed() => {
                tracing::debug!(entry = %format!("tmp/{name}"), "removal left for a later call: {e}");
                d.garbage.lock().unwrap_or_else(|e| e.into_inner()).push(name);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Goes on removing what earlier calls could not ([`Self::discard`]), within this
    /// call's deadline: unavailable if that runs out first, since the call has no time
    /// left for its own work either. An entry that fails for another reason (a file a
    /// container made immutable, say) is left for the next open, with a warning, rather
    /// than fail every later call.
    fn sweep(&self, d: &LayerDirs) -> Result<()> {
        let names = std::mem::take(&mut *d.garbage.lock().unwrap_or_else(|e| e.into_inner()));
        let mut names = names.into_iter();
        while let Some(name) = names.next() {
            match fsutil::remove_tree(&d.tmp, &name) {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) if fsutil::deadline::passed() => {
                    let mut garbage = d.garbage.lock().unwrap_or_else(|e| e.into_inner());
                    garbage.push(name);
                    garbage.extend(names);
                    return Err(e.context("remove what an earlier call left"));
                }
                Err(e) => tracing::warn!(space = %self.name, entry = %format!("tmp/{name}"),
                    "left for the next open: {e}"),
            }
        }
        Ok(())
    }

    /// `call`'s layers whose registry entry is not written yet.
    fn unregistered(&self, call: CallId) -> Vec<u64> {
        let Some(d) = &self.layers else { return Vec::new() };
        let pending = d.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.iter().filter(|(_, p)| p.call == call && !p.registered).map(|(id, _)| *id).collect()
    }

    /// Removed layers whose registry entry is still written (see `LayerDirs::removed`).
    fn removed(&self) -> Vec<u64> {
        let Some(d) = &self.layers else { return Vec::new() };
        d.removed.lock().unwrap_or_else(|e| e.into_inner()).iter().copied().collect()
    }

    /// Notes that the registry entries of removed layers `ids` are deleted now.
    fn unregistered_removed(&self, ids: &[u64]) {
        let Some(d) = &self.layers else { return };
        let mut removed = d.removed.lock().unwrap_or_else(|e| e.into_inner());
        for id in ids {
            removed.remove(id);
        }
    }

    /// Notes that `ids`, `call`'s layers, are registered now.
    fn mark_registered(&self, call: CallId, ids: &[u64]) {
        let Some(d) = &self.layers else { return };
        let mut pending = d.pending.lock().unwrap_or_else(|e| e.into_inner());
        for id in ids {
            if let Some(p) = pending.get_mut(id)
                && p.call == call
            {
                p.registered = true;
            }
        }
    }

    /// An empty layer (mode 0755), owned like the root of `owner_of` if given.
    pub(crate) fn create_layer(&self, call: CallId, owner_of: Option<u64>) -> Result<u64> {
        let owner = match owner_of {
            Some(src) => {
                let fd = self.open_layer(call, src)?;
                // Pinned: the layer's root, opened without following.
                let st = rustix::fs::fstat(&fd).context("stat the owner's layer")?;
                Some((st.st_uid, st.st_gid))
            }
            None => None,
        };
        self.make(call, |tmp, name| {
            let mut b = DirBuilder::new();
            b.mode(0o755);
            // No-follow: mkdirat creates, never follows; tmp/ is the host's alone.
            tmp.create_dir_with(name, &b)
                .with_context(|| format!("create layer directory {name}"))?;
            let fd = fsutil::open_dir_nofollow(tmp, name)?;
            // Pinned: fchmod and fchown act on the directory just opened.
            // The mode asked for, whatever the umask.
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o755)).context("chmod a new layer")?;
            if let Some((uid, gid)) = owner {
                rustix::fs::fchown(&fd, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
                    .context("chown a new layer")?;
            }
            Ok(())
        })
    }

    /// A new layer holding a copy of `source`.
    pub(crate) fn clone_layer(&self, call: CallId, source: u64) -> Result<u64> {
        let src = self.open_layer(call, source)?;
        let d = self.dirs()?;
        self.make(call, |tmp, name| {
            // No-follow: mkdirat creates, never follows; copy_tree walks from the pinned
            // source root and follows no symlink, crosses no mount inside it.
            tmp.create_dir(name).with_context(|| format!("create layer directory {name}"))?;
            let dst = fsutil::open_dir_nofollow(tmp, name)?;
            // The floor is checked before each entry and each chunk of a file: a copy
            // stops where it reaches it, passing it by one chunk at most.
            let room = || self.room(d);
            fsutil::copy_tree_while(&Dir::from_std_file(std::fs::File::from(src)), &dst, &room)
                .map_err(|e| e.context(format!("copy layer {source}")))
        })
    }

    /// Removes layer `id` and its work directory.
    pub(crate) fn remove_layer(&self, call: CallId, id: u64) -> Result<()> {
        self.usable(call, id)?;
        let d = self.dirs()?;
        self.sweep(d)?;
        {
            let mut pending = d.pending.lock().unwrap_or_else(|e| e.into_inner());
            // The call's own layer not registered yet has no entry to delete; another's
            // is deleted by the space's next write. Either way the layer is gone from
            // here on, before its directory is.
            if pending.remove(&id).is_none_or(|p| p.registered) {
                d.removed.lock().unwrap_or_else(|e| e.into_inner()).insert(id);
            }
        }
        // Moved aside first: a removal cut short by the deadline leaves garbage in tmp/
        // for later calls to finish, not a half-deleted layer under a registered-looking
        // name. The layer is gone either way, so the call succeeds.
        let doomed = format!("rm-{id}-{}", d.tmp_seq.fetch_add(1, Ordering::Relaxed));
        // No-follow: rename moves the layer's own name; remove_tree never follows.
        match d.layers.rename(id.to_string(), &d.tmp, &doomed) {
            Ok(()) => Self::discard(d, doomed)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::from(e).context(format!("move layer {id} aside"))),
        }
        match fsutil::remove_tree(&d.work, id.to_string()) {
            Err(e) if !e.is_not_found() => Err(e),
            _ => Ok(()),
        }
    }

    /// Disk usage of layer `id`.
    pub(crate) fn layer_usage(&self, call: CallId, id: u64) -> Result<Usage> {
        let fd = self.open_layer(call, id)?;
        // Pinned: the walk starts at the layer's root descriptor.
        fsutil::disk_usage(&Dir::from_std_file(std::fs::File::from(fd)))
    }

    /// Every layer `call` may see, ascending.
    pub(crate) fn list_layers(&self, call: CallId) -> Result<Vec<u64>> {
        let d = self.dirs()?;
        let pending = d.pending.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let removed = d.removed.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut ids: Vec<u64> = self
            .registered()?
            .into_iter()
            .filter(|id| pending.get(id).is_none_or(|p| p.call == call) && !removed.contains(id))
            .collect();
        // With the call's own layers not registered yet.
        ids.extend(
            pending.iter().filter(|(_, p)| p.call == call && !p.registered).map(|(id, _)| *id),
        );
        ids.sort_unstable();
        ids.dedup();
        Ok(ids)
    }

    /// Opens layer `id` (a directory the host made) for `call`.
    pub(crate) fn open_layer(&self, call: CallId, id: u64) -> Result<std::os::fd::OwnedFd> {
        self.usable(call, id)?;
        let d = self.dirs()?;
        let flags = rustix::fs::OFlags::RDONLY
            | rustix::fs::OFlags::DIRECTORY
            | rustix::fs::OFlags::NOFOLLOW
            | rustix::fs::OFlags::CLOEXEC;
        // No-follow: a symlink at layers/<id> is an error; O_DIRECTORY opens nothing else.
        rustix::fs::openat(&d.layers, id.to_string(), flags, Mode::empty()).map_err(|e| {
            Error::from(e)
                .context(format!("open layer {id} (registered, but its directory is gone)"))
        })
    }

    /// The host path of layer `id`'s contents, for a mount, if `call` may use it.
    pub(crate) fn layer_path(&self, call: CallId, id: u64) -> Result<String> {
        self.usable(call, id)?;
        self.host_path(&format!("{LAYERS_DIR}/{id}"))
    }

    /// The host path of layer `id`'s overlay work directory, made if missing.
    pub(crate) fn work_path(&self, call: CallId, id: u64) -> Result<String> {
        self.usable(call, id)?;
        let d = self.dirs()?;
        let mut b = DirBuilder::new();
        b.mode(0o711);
        // No-follow: mkdirat creates, never follows; work/ is the host's alone.
        match d.work.create_dir_with(id.to_string(), &b) {
            Ok(()) => {
                // Checked again: a removal of the layer by another instance that began
                // since the check above may have deleted work/<id> before it was made,
                // and would leave this one behind. One that begins after this check
                // deletes it.
                if let Err(e) = self.usable(call, id) {
                    let _ = fsutil::remove_tree(&d.work, id.to_string());
                    return Err(e);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                // Only a directory the host made is ever a work directory. No-follow.
                let st = rustix::fs::statat(&d.work, id.to_string(), AtFlags::SYMLINK_NOFOLLOW)
                    .context("stat a work directory")?;
                if rustix::fs::FileType::from_raw_mode(st.st_mode)
                    != rustix::fs::FileType::Directory
                {
                    return Err(Error::internal(format!("work/{id} is not a directory")));
                }
            }
            Err(e) => return Err(Error::from(e).context(format!("create work/{id}"))),
        }
        self.host_path(&format!("{WORK_DIR}/{id}"))
    }

    fn host_path(&self, rel: &str) -> Result<String> {
        let d = self.dirs()?;
        let path = d.path.join(rel);
        let s = path
            .to_str()
            .ok_or_else(|| Error::internal("a plugin directory's path is not UTF-8"))?;
        // overlayfs parses these in its options; the host chose the path, so this is a
        // misconfiguration, not the guest's doing.
        if s.contains([':', ',', '\\']) {
            return Err(Error::failed_precondition(format!(
                "the plugin's directory {} holds ':', ',' or '\\', which overlay mounts cannot name",
                d.path.display()
            )));
        }
        Ok(s.to_owned())
    }

    /// Ends `call`: the layers it made and did not register with a key-value commit are
    /// registered, and none is pending any more. If that write fails, those layers are
    /// deleted and the call must fail: no registry entry names them, so nothing may.
    pub(crate) fn settle(&self, call: CallId) -> Result<()> {
        let Some(d) = &self.layers else { return Ok(()) };
        let ids = self.unregistered(call);
        let registered = match ids.is_empty() {
            true => Ok(()),
            false => {
                let (name, ids, gone) = (self.name.clone(), ids.clone(), self.removed());
                let gone_ = gone.clone();
                self.db
                    .write(self.durability, move |txn| {
                        register_in(txn, &name, &ids)?;
                        unregister_in(txn, &name, &gone_)
                    })
                    .inspect(|()| self.unregistered_removed(&gone))
            }
        };
        d.pending.lock().unwrap_or_else(|e| e.into_inner()).retain(|_, p| p.call != call);
        if let Err(e) = registered {
            for id in &ids {
                // No-follow: remove_tree deletes the layer's own name, following nothing.
                let _ = fsutil::remove_tree(&d.layers, id.to_string());
                let _ = fsutil::remove_tree(&d.work, id.to_string());
            }
            return Err(e.context("register the layers the call made"));
        }
        Ok(())
    }

    /// Layers registered whose directory is gone: (layer, why).
    pub(crate) fn verify(&self) -> Result<Vec<(String, String)>> {
        let Some(d) = &self.layers else { return Ok(Vec::new()) };
        let mut bad = Vec::new();
        let removed = d.removed.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for id in self.registered()?.into_iter().filter(|id| !removed.contains(id)) {
            // No-follow: lstat of the layer's own name.
            if rustix::fs::statat(&d.layers, id.to_string(), AtFlags::SYMLINK_NOFOLLOW).is_err() {
                bad.push((format!("layer {id}"), format!("{LAYERS_DIR}/{id} is gone")));
            }
        }
        Ok(bad)
    }

    // --- key-value ---

    /// The entry of `key`.
    pub(crate) fn kv_get(&self, key: &str) -> Result<Option<(u64, Vec<u8>)>> {
        check_key(key)?;
        let t = self.kv_view()?;
        crate::kv::contained(|| {
            let g = t.get((self.name.as_str(), key))?;
            g.map(|g| decode_entry(g.value())).transpose()
        })
    }

    /// The current read view of the key-value table (see [`Space::kv_view`]'s field).
    /// A change this space committed before the call is always in it: the generation is
    /// bumped before `kv_commit` returns, and a view taken before that is not reused.
    fn kv_view(&self) -> Result<Arc<KvTable>> {
        let generation = self.kv_generation.load(Ordering::Acquire);
        let mut view = self.kv_view.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = view.as_ref()
            && v.generation == generation
            && v.taken.elapsed() < KV_VIEW_FOR
        {
            return Ok(v.table.clone());
        }
        let table = Arc::new(self.db.read_with(|txn| Ok(txn.open_table(KV)?))?);
        *view = Some(KvView { generation, taken: std::time::Instant::now(), table: table.clone() });
        Ok(table)
    }

    /// Keys from `start` up to `end`, at most `limit`.
    pub(crate) fn kv_range(
        &self,
        start: &str,
        end: Option<&str>,
        limit: u32,
    ) -> Result<Vec<(String, u64, Vec<u8>)>> {
        check_key(start)?;
        if let Some(e) = end {
            check_key(e)?;
        }
        let limit = limit.min(MAX_RANGE) as usize;
        self.db.read_with(|txn| {
            let t = txn.open_table(KV)?;
            let name = self.name.as_str();
            let mut out = Vec::new();
            let mut bytes = 0usize;
            for item in t.range((name, start)..)? {
                let (k, v) = item?;
                let (space, key) = k.value();
                if space != name || end.is_some_and(|e| key >= e) || out.len() >= limit {
                    break;
                }
                let (rev, value) = decode_entry(v.value())?;
                bytes += value.len() + key.len();
                out.push((key.to_owned(), rev, value));
                if bytes > MAX_RANGE_BYTES {
                    break;
                }
            }
            Ok(out)
        })
    }

    /// Applies `writes` if every check holds; false if one does not. The layers `call`
    /// made and has not registered yet are registered in the same transaction, whether
    /// the checks hold or not: a record written here may name them.
    pub(crate) fn kv_commit(
        &self,
        call: CallId,
        checks: Vec<Check>,
        writes: Vec<Write>,
    ) -> Result<bool> {
        if writes.len() > MAX_WRITES || checks.len() > MAX_WRITES {
            return Err(Error::invalid_argument(format!(
                "a change has at most {MAX_WRITES} checks and {MAX_WRITES} writes"
            )));
        }
        for c in &checks {
            check_key(&c.key)?;
        }
        for w in &writes {
            match w {
                Write::Put(k, v) => {
                    check_key(k)?;
                    if v.len() > MAX_VALUE {
                        return Err(Error::invalid_argument(format!(
                            "value of {k:?} is {} bytes, more than {MAX_VALUE}",
                            v.len()
                        )));
                    }
                }
                Write::Delete(k) => check_key(k)?,
            }
        }
        let (name, max) = (self.name.clone(), self.kv_max_bytes);
        let layers = self.unregistered(call);
        let registering = layers.clone();
        let gone = self.removed();
        let gone_ = gone.clone();
        let committed = self.db.write(self.durability, move |txn| {
            register_in(txn, &name, &registering)?;
            unregister_in(txn, &name, &gone_)?;
            commit_in(txn, &name, &checks, &writes, max)
        });
        if committed.is_ok() {
            self.mark_registered(call, &layers);
            self.unregistered_removed(&gone);
        }
        if matches!(committed, Ok(true)) {
            self.kv_generation.fetch_add(1, Ordering::AcqRel);
        }
        committed
    }
}

fn check_key(key: &str) -> Result<()> {
    if key.len() > MAX_KEY {
        return Err(Error::invalid_argument(format!(
            "key is {} bytes, more than {MAX_KEY}",
            key.len()
        )));
    }
    Ok(())
}

/// Writes the registry entries of layers `ids` of space `name`.
fn register_in(txn: &WriteTransaction, name: &str, ids: &[u64]) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let mut t = txn.open_table(LAYERS)?;
    let now = now_nanos();
    for id in ids {
        t.insert((name, *id), now)?;
    }
    Ok(())
}

/// Deletes the registry entries of layers `ids` of space `name`.
fn unregister_in(txn: &WriteTransaction, name: &str, ids: &[u64]) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let mut t = txn.open_table(LAYERS)?;
    for id in ids {
        t.remove((name, *id))?;
    }
    Ok(())
}

fn commit_in(
    txn: &WriteTransaction,
    name: &str,
    checks: &[Check],
    writes: &[Write],
    max_bytes: u64,
) -> Result<bool> {
    let mut kv = txn.open_table(KV)?;
    for c in checks {
        let found = match kv.get((name, c.key.as_str()))? {
            Some(g) => Some(decode_entry(g.value())?.0),
            None => None,
        };
        if found != c.revision {
            return Ok(false);
        }
    }
    let mut meta = txn.open_table(META)?;
    let rev = meta.get((name, META_REVISION))?.map_or(0, |g| g.value()) + 1;
    let mut size = meta.get((name, META_BYTES))?.map_or(0, |g| g.value());
    for w in writes {
        let key = match w {
            Write::Put(k, _) | Write::Delete(k) => k.as_str(),
        };
        if let Some(old) = kv.remove((name, key))? {
            size = size.saturating_sub((key.len() + old.value().len()) as u64);
        }
        if let Write::Put(k, v) = w {
            let mut bytes = Vec::with_capacity(8 + v.len());
            bytes.extend_from_slice(&rev.to_le_bytes());
            bytes.extend_from_slice(v);
            size += (k.len() + bytes.len()) as u64;
            kv.insert((name, k.as_str()), bytes.as_slice())?;
        }
    }
    if size > max_bytes {
        return Err(Error::failed_precondition(format!(
            "the plugin's key-value store would hold {size} bytes, more than its limit of {max_bytes}"
        )));
    }
    meta.insert((name, META_REVISION), rev)?;
    meta.insert((name, META_BYTES), size)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads reuse a view of the table, yet never miss a change this space committed
    /// before them, nor one another space (another plugin) committed to its own keys.
    #[test]
    fn a_read_after_a_commit_sees_it_though_reads_reuse_a_view() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().canonicalize().unwrap();
        let dir = Dir::open_ambient_dir(&path, cap_std::ambient_authority()).unwrap();
        let db = Arc::new(Db::open(&dir, "root.db", "test database").unwrap());
        dir.create_dir("a").unwrap();
        dir.create_dir("b").unwrap();
        let open = |name: &str| {
            let sub = dir.open_dir(name).unwrap();
            Space::open(name, &sub, &path.join(name), Some(&db), false, &small()).unwrap()
        };
        let (a, b) = (open("a"), open("b"));
        let put = |s: &Space, v: &[u8]| {
            assert!(
                s.kv_commit(next_call(), Vec::new(), vec![Write::Put("k".into(), v.to_vec())])
                    .unwrap()
            );
        };
        for round in 0..200u32 {
            let before = a.kv_get("k").unwrap();
            let v = round.to_le_bytes();
            put(&a, &v);
            let after = a.kv_get("k").unwrap().expect("just written");
            assert_eq!(after.1, v, "round {round}: the read after the commit saw {before:?}");
            assert!(before.is_none_or(|(rev, _)| rev < after.0));
            put(&b, b"other");
            assert_eq!(a.kv_get("k").unwrap().unwrap().1, v, "another space's key is its own");
        }
        assert!(a.kv_commit(next_call(), Vec::new(), vec![Write::Delete("k".into())]).unwrap());
        assert_eq!(a.kv_get("k").unwrap(), None);
    }

    /// Limits a test's space keeps to: small budgets.
    fn small() -> Limits {
        Limits { kv_mib: 1, state_mib: 1, ..Limits::default() }
    }

    /// A backend space on the shared database `root.db` in `path`.
    fn layered(path: &Path) -> (Arc<Db>, Arc<Space>) {
        let dir = Dir::open_ambient_dir(path, cap_std::ambient_authority()).unwrap();
        let db = Arc::new(Db::open(&dir, "root.db", "test database").unwrap());
        let space = open_layered(path, &db);
        (db, space)
    }

    fn open_layered(path: &Path, db: &Arc<Db>) -> Arc<Space> {
        let dir = Dir::open_ambient_dir(path, cap_std::ambient_authority()).unwrap();
        if !path.join("p").exists() {
            dir.create_dir("p").unwrap();
        }
        let sub = dir.open_dir("p").unwrap();
        Space::open("p", &sub, &path.join("p"), Some(db), true, &small()).unwrap()
    }

    fn layer_dir(path: &Path, id: u64) -> PathBuf {
        path.join("p").join(LAYERS_DIR).join(id.to_string())
    }

    /// A new layer costs no write of its own: the call's key-value commit registers
    /// it in its transaction, whether its checks hold or not, and the call's end then
    /// writes nothing.
    #[test]
    fn a_new_layer_is_registered_by_the_calls_key_value_commit() {
        let tmp = tempfile::tempdir_in("/dev/shm").unwrap();
        let (db, s) = layered(tmp.path());
        // A first layer takes a block of layer ids, which is a write: not counted below.
        let first = next_call();
        let earlier = s.create_layer(first, None).unwrap();
        s.settle(first).unwrap();
        let call = next_call();
        let commits = || db.stats().commits;
        let before = commits();
        let (a, b) = (s.create_layer(call, None).unwrap(), s.create_layer(call, None).unwrap());
        assert_eq!(commits(), before, "making a layer writes nothing");
        let other = next_call();
        assert!(!s.is_registered(a).unwrap() && !s.is_registered(b).unwrap());
        // The call sees its own layers; another call sees neither.
        assert_eq!(s.list_layers(call).unwrap(), vec![earlier, a, b]);
        assert!(s.layer_path(call, a).is_ok());
        assert!(!s.list_layers(other).unwrap().contains(&a));
        assert!(!s.list_layers(other).unwrap().contains(&b));
        assert_eq!(
            s.open_layer(other, a).unwrap_err().kind(),
            crate::ErrorKind::FailedPrecondition
        );
        // A commit whose check fails still registers them, in its one transaction.
        let stale = Check { key: "rec".into(), revision: Some(99) };
        let put = || vec![Write::Put("rec".into(), a.to_le_bytes().to_vec())];
        assert!(!s.kv_commit(call, vec![stale], put()).unwrap());
        assert_eq!(commits(), before + 1, "the commit, and no other write");
        assert!(s.is_registered(a).unwrap() && s.is_registered(b).unwrap());
        assert!(s.kv_commit(call, Vec::new(), put()).unwrap());
        s.settle(call).unwrap();
        assert_eq!(commits(), before + 2, "the call's end wrote nothing");
        let seen = s.list_layers(other).unwrap();
        assert!(seen.contains(&a) && seen.contains(&b), "{seen:?}");
    }

    /// A call that commits nothing has its layers registered when it ends, in one
    /// write; a layer it made and removed again costs no write at all.
    #[test]
    fn a_calls_end_registers_what_no_commit_did() {
        let tmp = tempfile::tempdir_in("/dev/shm").unwrap();
        let (db, s) = layered(tmp.path());
        let call = next_call();
        let (a, b) = (s.create_layer(call, None).unwrap(), s.create_layer(call, None).unwrap());
        let gone = s.clone_layer(call, a).unwrap();
        let before = db.stats().commits;
        s.remove_layer(call, gone).unwrap();
        assert!(!layer_dir(tmp.path(), gone).exists());
        assert_eq!(db.stats().commits, before, "an unregistered layer has no entry to delete");
        s.settle(call).unwrap();
        assert_eq!(db.stats().commits, before + 1, "both layers in one write");
        assert!(s.is_registered(a).unwrap() && s.is_registered(b).unwrap());
        assert!(!s.is_registered(gone).unwrap());
        let later = next_call();
        assert_eq!(s.list_layers(later).unwrap(), vec![a, b]);
        s.remove_layer(later, b).unwrap();
        assert!(!layer_dir(tmp.path(), b).exists());
        s.settle(later).unwrap();
    }

    /// Removing a registered layer costs no write of its own: the layer is gone at
    /// once (not usable, not listed, its directory deleted), and its registry entry
    /// goes with the space's next write, whichever call makes it. A crash before that
    /// leaves an entry whose directory is gone, which the next open deletes.
    #[test]
    fn a_removed_layers_entry_goes_with_the_next_write() {
        let tmp = tempfile::tempdir_in("/dev/shm").unwrap();
        let (db, s) = layered(tmp.path());
        let first = next_call();
        let (a, b, c) = (
            s.create_layer(first, None).unwrap(),
            s.create_layer(first, None).unwrap(),
            s.create_layer(first, None).unwrap(),
        );
        s.settle(first).unwrap();
        let call = next_call();
        let before = db.stats().commits;
        s.remove_layer(call, a).unwrap();
        assert_eq!(db.stats().commits, before, "no write of its own");
        assert!(!layer_dir(tmp.path(), a).exists());
        assert!(s.is_registered(a).unwrap(), "its entry waits for the next write");
        let other = next_call();
        for who in [call, other] {
            assert!(s.open_layer(who, a).unwrap_err().is_not_found());
            assert!(s.layer_path(who, a).unwrap_err().is_not_found());
            assert!(s.remove_layer(who, a).unwrap_err().is_not_found());
            assert_eq!(s.list_layers(who).unwrap(), vec![b, c]);
        }
        assert!(s.verify().unwrap().is_empty(), "a removed layer is not a missing one");
        s.settle(call).unwrap();
        assert_eq!(db.stats().commits, before, "the call's end has nothing to write");
        // Another call's key-value commit carries the deletion.
        let put = vec![Write::Put("k".into(), b"v".to_vec())];
        assert!(s.kv_commit(other, Vec::new(), put).unwrap());
        assert_eq!(db.stats().commits, before + 1);
        assert!(!s.is_registered(a).unwrap());
        s.settle(other).unwrap();

        // Cut short by a crash: the entry stays, the directory is gone; the next open
        // deletes the entry and keeps the rest.
        let last = next_call();
        s.remove_layer(last, b).unwrap();
        drop(s);
        let s = open_layered(tmp.path(), &db);
        assert!(!s.is_registered(b).unwrap(), "deleted at open");
        assert_eq!(s.list_layers(next_call()).unwrap(), vec![c]);
        assert!(s.verify().unwrap().is_empty());
    }

    /// If the call's end cannot register its layers, they are deleted and the call
    /// fails: nothing may name a layer no registry entry names.
    #[test]
    fn a_call_whose_layers_cannot_be_registered_fails_and_they_go() {
        let tmp = tempfile::tempdir_in("/dev/shm").unwrap();
        let (db, full) = crate::kv::tests::filling(&tmp.path().join("root.db"));
        let db = Arc::new(db);
        let s = open_layered(tmp.path(), &db);
        let call = next_call();
        let a = s.create_layer(call, None).unwrap();
        s.work_path(call, a).unwrap();
        // A durable commit that fails leaves redb refusing every write, this one too.
        full.store(true, Ordering::Relaxed);
        db.flush().expect_err("the disk is full");
        let e = s.settle(call).expect_err("the database refuses writes");
        assert!(e.to_string().contains("register the layers"), "{e}");
        assert!(!layer_dir(tmp.path(), a).exists());
        assert!(!tmp.path().join("p").join(WORK_DIR).join(a.to_string()).exists());
        assert!(s.open_layer(call, a).unwrap_err().is_not_found(), "no longer the call's");
    }

    /// A crash before the call's commit or end leaves a layer no registry entry names,
    /// and nothing durable names it either: the next open deletes it and keeps the
    /// registered ones.
    #[test]
    fn a_layer_cut_short_before_its_registration_is_deleted_at_the_next_open() {
        let tmp = tempfile::tempdir_in("/dev/shm").unwrap();
        let (db, s) = layered(tmp.path());
        let kept = next_call();
        let k = s.create_layer(kept, None).unwrap();
        s.settle(kept).unwrap();
        let cut = next_call();
        let lost = s.create_layer(cut, None).unwrap();
        assert!(layer_dir(tmp.path(), lost).is_dir());
        drop(s);
        let s = open_layered(tmp.path(), &db);
        assert!(!layer_dir(tmp.path(), lost).exists(), "reclaimed at open");
        assert!(layer_dir(tmp.path(), k).is_dir());
        assert_eq!(s.list_layers(next_call()).unwrap(), vec![k]);
    }
}
