//! Removing backend snapshots no record names, without racing a create that adopts one.
//!
//! A backend that de-duplicates layers by `containerd.io/snapshot.ref` answers a create
//! with already-exists when it holds the target; the create then records the backend
//! snapshot it found ([`super::Snapshotter`]'s adoption). That snapshot may be one whose
//! last record was just removed, with its removal queued or running, or one a failed
//! call made and is about to discard. Checking the records before the removal is not
//! enough: the adoption may commit between the check and the removal.
//!
//! So every removal of a backend key that may be unnamed first marks the key *doomed*,
//! then checks that no record or commit under way names it, and only then removes it.
//! An adoption takes the lock that marking needs, waits while the key is doomed, asks
//! the backend whether it still holds the key, and writes its record, all holding that
//! lock. A removal that begins after the adoption took it finds the adoption's record
//! and keeps the data; one that began before is waited out, and one that ended before
//! has left nothing for the backend to report: either way the create starts over and
//! makes the snapshot anew.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::MetaDb;
use super::db::BKEYS;
use crate::error::Result;

/// The doomed backend keys of one snapshotter, and how to tell whether one is named.
#[derive(Debug)]
pub(super) struct Unnamed {
    db: Arc<MetaDb>,
    sn: String,
    /// Doomed keys, each with how many removals hold it.
    doomed: Mutex<HashMap<String, usize>>,
    /// Signalled whenever a key stops being doomed.
    cleared: Condvar,
}

/// What [`Unnamed::remove`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// The backend was asked, and removed it.
    Removed,
    /// A record or a commit under way names the key (a create adopted it): kept.
    Named,
}

impl Unnamed {
    pub(super) fn new(db: Arc<MetaDb>, sn: &str) -> Self {
        Unnamed { db, sn: sn.to_owned(), doomed: Mutex::default(), cleared: Condvar::new() }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, usize>> {
        self.doomed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks `bkey` doomed until the guard drops: no create adopts it meanwhile.
    pub(super) fn doom(&self, bkey: &str) -> Doomed<'_> {
        *self.lock().entry(bkey.to_owned()).or_default() += 1;
        Doomed { unnamed: self, bkey: bkey.to_owned() }
    }

    /// Whether a record, or a commit under way, names `bkey`.
    pub(super) fn named(&self, bkey: &str) -> Result<bool> {
        let sn = self.sn.as_str();
        self.db.read_with(|txn| {
            if txn.open_multimap_table(BKEYS)?.get((sn, bkey))?.next().is_some() {
                return Ok(true);
            }
            let intents = super::db::intents(txn, sn)?;
            Ok(intents.iter().any(|(_, _, i)| i.bname == bkey || i.bkey == bkey))
        })
    }

    /// Runs `remove` (the backend's removal of `bkey`) unless a record names `bkey`
    /// once it is doomed. A failed check removes nothing.
    pub(super) fn remove(
        &self,
        bkey: &str,
        remove: impl FnOnce() -> Result<()>,
    ) -> Result<Outcome> {
        let _doomed = self.doom(bkey);
        if self.named(bkey)? {
            tracing::debug!(snapshotter = %self.sn, bkey,
                "kept a backend snapshot a create adopted before its removal");
            return Ok(Outcome::Named);
        }
        remove().map(|()| Outcome::Removed)
    }

    /// Holds the lock an adoption writes its record under, once `bkey` is not doomed:
    /// waits up to `wait` for removals of it to end; None if one is still running then.
    /// With the lock held no removal can begin, but one may have begun and ended since
    /// the backend was asked: the caller checks the backend still holds `bkey`.
    pub(super) fn adopt(&self, bkey: &str, wait: Duration) -> Option<Adoption<'_>> {
        let until = Instant::now() + wait;
        let mut doomed = self.lock();
        while doomed.contains_key(bkey) {
            let left = until.checked_duration_since(Instant::now())?;
            doomed = self.cleared.wait_timeout(doomed, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        Some(Adoption { _guard: doomed })
    }
}

/// A doomed key; no longer doomed when dropped.
#[must_use]
pub(super) struct Doomed<'a> {
    unnamed: &'a Unnamed,
    bkey: String,
}

impl Drop for Doomed<'_> {
    fn drop(&mut self) {
        let mut doomed = self.unnamed.lock();
        if let Some(n) = doomed.get_mut(&self.bkey) {
            *n -= 1;
            if *n == 0 {
                doomed.remove(&self.bkey);
            }
        }
        drop(doomed);
        self.unnamed.cleared.notify_all();
    }
}

/// Held while an adoption writes its record: no key is doomed meanwhile.
pub(super) struct Adoption<'a> {
    _guard: MutexGuard<'a, HashMap<String, usize>>,
}
