//! A plugin's snapshot records, with containerd's rules for create, commit, update and
//! remove, kept in the host's key-value store ([`kv`](crate::kv)).
//!
//! ```text
//! s/<key>            one JSON Record per snapshot
//! c/<parent>/<key>   "key has parent parent": what makes remove of parent refuse
//! ```
//!
//! (`<parent>` is escaped so that the `/` of backend keys cannot blur the two parts.)
//! Every change is one key-value transaction, so invariants across records (a key used
//! once, no child of a removed parent, commit replacing exactly one active record) hold
//! however many instances of the plugin run at once; a change that loses a race is run
//! again. The layers holding the snapshots' files are made before their record is
//! written and removed after it is gone, so a crash leaves at worst a layer no record
//! names, which [`Store::reclaim_layers`] removes.
//!
//! ```no_run
//! use wasnap_sdk::layers::Layer;
//! use wasnap_sdk::store::Store;
//! use wasnap_sdk::{Kind, Labels};
//! # fn main() -> wasnap_sdk::Result<()> {
//! let store = Store::new();
//! let rec = store.create(Kind::Active, "ns/1/a", None, &Labels::new(), |parent| match parent {
//!     Some(p) => Layer::clone_of(p.layer),
//!     None => Layer::create(),
//! })?;
//! store.commit("ns/2/base", "ns/1/a", &Labels::new())?;
//! # Ok(()) }
//! ```

mod record;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::time::SystemTime;

use crate::error::{Error, Result};
use crate::fieldpath;
use crate::kv::{self, Txn};
use crate::layers::Layer;
use crate::types::{Info, Kind, Labels};
pub use record::Record;

const RECORDS: &str = "s/";
const CHILDREN: &str = "c/";

fn not_found(key: &str) -> Error {
    Error::NotFound(format!("snapshot {key:?}"))
}

/// `%` and `/` escaped, so that `<parent>/<child>` splits one way only.
fn escape(key: &str) -> String {
    key.replace('%', "%25").replace('/', "%2F")
}

/// The record store; see the [module documentation](self).
#[derive(Debug, Clone, Default)]
pub struct Store {
    /// Prepended to every key, so that several stores can share the plugin's key space.
    prefix: String,
}

impl Store {
    /// The store at the root of the plugin's key-value store.
    pub fn new() -> Store {
        Store::default()
    }

    /// A store whose keys all start with `prefix`.
    pub fn with_prefix(prefix: impl Into<String>) -> Store {
        Store { prefix: prefix.into() }
    }

    fn record_key(&self, key: &str) -> String {
        format!("{}{RECORDS}{key}", self.prefix)
    }

    fn children_prefix(&self, parent: &str) -> String {
        format!("{}{CHILDREN}{}/", self.prefix, escape(parent))
    }

    fn child_key(&self, parent: &str, child: &str) -> String {
        format!("{}{child}", self.children_prefix(parent))
    }

    fn decode(key: &str, bytes: &[u8]) -> Result<Record> {
        serde_json::from_slice(bytes)
            .map_err(|e| Error::Internal(format!("corrupt record of {key:?}: {e}")))
    }

    /// The record of `key`, if there is one.
    pub fn find(&self, key: &str) -> Result<Option<Record>> {
        if key.is_empty() {
            return Ok(None);
        }
        match kv::get(&self.record_key(key))? {
            Some(e) => Self::decode(key, &e.value).map(Some),
            None => Ok(None),
        }
    }

    /// The record of `key`; not-found if there is none.
    pub fn get(&self, key: &str) -> Result<Record> {
        self.find(key)?.ok_or_else(|| not_found(key))
    }

    /// The info of `key`, as `stat` returns it.
    pub fn stat(&self, key: &str) -> Result<Info> {
        Ok(self.get(key)?.info())
    }

    fn get_in(&self, txn: &mut Txn, key: &str) -> Result<Option<Record>> {
        match txn.get(&self.record_key(key))? {
            Some(bytes) => Self::decode(key, &bytes).map(Some),
            None => Ok(None),
        }
    }

    fn put_in(&self, txn: &mut Txn, rec: &Record) -> Result<()> {
        txn.put_json(&self.record_key(&rec.name), rec)
    }

    /// Checks that `key` is free and `parent` (if any) exists and is committed, as the
    /// host's native driver answers: already-exists, not-found (parent),
    /// invalid-argument (parent not committed, empty key). Returns the parent's record.
    pub fn check_create(&self, key: &str, parent: Option<&str>) -> Result<Option<Record>> {
        if key.is_empty() {
            return Err(Error::InvalidArgument("snapshot key must not be empty".into()));
        }
        if self.find(key)?.is_some() {
            return Err(Error::AlreadyExists(format!("snapshot {key:?}")));
        }
        let Some(p) = parent else { return Ok(None) };
        let rec = self.find(p)?.ok_or_else(|| Error::NotFound(format!("parent snapshot {p:?}")))?;
        if rec.kind != Kind::Committed {
            return Err(Error::InvalidArgument(format!(
                "parent {p:?} is not a committed snapshot"
            )));
        }
        Ok(Some(rec))
    }

    /// Creates the snapshot `key` of `kind` on `parent`: checks the names, calls `layer`
    /// (with the parent's record) to make its layer, and records it. If the record
    /// cannot be written (another instance took the key, the parent went away) the
    /// layer is removed again.
    pub fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: Option<&str>,
        labels: &Labels,
        layer: impl FnOnce(Option<&Record>) -> Result<Layer>,
    ) -> Result<Record> {
        let parent_rec = self.check_create(key, parent)?;
        let made = layer(parent_rec.as_ref())?;
        let now = SystemTime::now();
        let rec = Record {
            name: key.to_owned(),
            layer: made,
            kind,
            parent: parent.map(str::to_owned),
            labels: labels.clone(),
            created: now,
            updated: now,
            data: None,
        };
        let stored = kv::transact(|txn| {
            if self.get_in(txn, key)?.is_some() {
                return Err(Error::AlreadyExists(format!("snapshot {key:?}")));
            }
            if let Some(p) = parent {
                let prec = self
                    .get_in(txn, p)?
                    .ok_or_else(|| Error::NotFound(format!("parent snapshot {p:?}")))?;
                if prec.kind != Kind::Committed {
                    return Err(Error::InvalidArgument(format!(
                        "parent {p:?} is not a committed snapshot"
                    )));
                }
                // Rewritten unchanged: a remove of the parent racing this create then
                // conflicts with it, and one of the two is run again and sees the other.
                self.put_in(txn, &prec)?;
                txn.put(&self.child_key(p, key), Vec::new());
            }
            self.put_in(txn, &rec)
        });
        if let Err(e) = stored {
            if let Err(undo) = made.remove() {
                crate::log::warn(format_args!(
                    "could not remove {made} of a snapshot that was not recorded: {undo}"
                ));
            }
            return Err(e);
        }
        Ok(rec)
    }

    /// Changes the labels of `info.name` as `fieldpaths` say (see [`fieldpath`]).
    pub fn update(&self, info: &Info, fieldpaths: &[String]) -> Result<Info> {
        kv::transact(|txn| {
            let mut rec = self.get_in(txn, &info.name)?.ok_or_else(|| not_found(&info.name))?;
            fieldpath::apply(&mut rec.labels, &info.labels, fieldpaths, &info.name)?;
            crate::types::validate_labels(&rec.labels)?;
            // Strictly later, even if the clock is coarse or stepped back.
            let next =
                rec.updated.checked_add(std::time::Duration::from_nanos(1)).unwrap_or(rec.updated);
            rec.updated = SystemTime::now().max(next);
            self.put_in(txn, &rec)?;
            Ok(rec.info())
        })
    }

    /// Replaces the plugin's own data kept with `key` (see [`Record::data`]).
    pub fn set_data(&self, key: &str, data: Option<serde_json::Value>) -> Result<Record> {
        kv::transact(|txn| {
            let mut rec = self.get_in(txn, key)?.ok_or_else(|| not_found(key))?;
            rec.data = data.clone();
            self.put_in(txn, &rec)?;
            Ok(rec)
        })
    }

    /// Turns the active snapshot `key` into the committed snapshot `name` with `labels`,
    /// keeping its layer and data: already-exists if `name` is taken, not-found if `key`
    /// is missing, failed-precondition if it is not active. One transaction: the
    /// active record and the committed one never both exist, nor neither.
    pub fn commit(&self, name: &str, key: &str, labels: &Labels) -> Result<Record> {
        if name.is_empty() {
            return Err(Error::InvalidArgument("snapshot name must not be empty".into()));
        }
        kv::transact(|txn| {
            if self.get_in(txn, name)?.is_some() {
                return Err(Error::AlreadyExists(format!("snapshot {name:?}")));
            }
            let rec = self.get_in(txn, key)?.ok_or_else(|| not_found(key))?;
            if rec.kind != Kind::Active {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key:?} is a {} snapshot, only active snapshots can be committed",
                    rec.kind
                )));
            }
            let now = SystemTime::now();
            let committed = Record {
                name: name.to_owned(),
                kind: Kind::Committed,
                labels: labels.clone(),
                created: now,
                updated: now,
                ..rec.clone()
            };
            txn.delete(&self.record_key(key));
            if let Some(p) = &rec.parent {
                txn.delete(&self.child_key(p, key));
                txn.put(&self.child_key(p, name), Vec::new());
            }
            self.put_in(txn, &committed)?;
            Ok(committed)
        })
    }

    /// Forgets `key`, which must have no children, and returns its record: the caller
    /// removes its layer afterwards (a crash in between leaves a layer no record names,
    /// for [`Store::reclaim_layers`]).
    pub fn remove(&self, key: &str) -> Result<Record> {
        kv::transact(|txn| {
            let rec = self.get_in(txn, key)?.ok_or_else(|| not_found(key))?;
            // A create on `key` rewrites its record, so a child recorded after this scan
            // makes this change conflict and run again, seeing it.
            if !kv::range(
                &self.children_prefix(key),
                crate::kv::prefix_end(&self.children_prefix(key)).as_deref(),
                1,
            )?
            .is_empty()
            {
                return Err(Error::FailedPrecondition(format!(
                    "cannot remove snapshot {key:?} with child"
                )));
            }
            txn.delete(&self.record_key(key));
            if let Some(p) = &rec.parent {
                txn.delete(&self.child_key(p, key));
            }
            Ok(rec)
        })
    }

    /// One page of a walk over every snapshot in ascending byte order of name: at most
    /// `limit` infos with names strictly greater than `after`.
    pub fn list(&self, after: Option<&str>, limit: u32) -> Result<Vec<Info>> {
        let base = self.record_key("");
        let start = match after {
            Some(a) => format!("{}\0", self.record_key(a)),
            None => base.clone(),
        };
        let end = kv::prefix_end(&base);
        kv::range(&start, end.as_deref(), limit)?
            .into_iter()
            .map(|(k, e)| Self::decode(&k[base.len()..], &e.value).map(|r| r.info()))
            .collect()
    }

    /// Every record.
    pub fn records(&self) -> Result<Vec<Record>> {
        let base = self.record_key("");
        kv::scan(&base)?
            .into_iter()
            .map(|(k, e)| Self::decode(&k[base.len()..], &e.value))
            .collect()
    }

    /// The layers of `rec` and of its ancestors, `rec`'s first: what an overlay-style
    /// snapshotter stacks.
    pub fn chain(&self, rec: &Record) -> Result<Vec<Layer>> {
        let mut layers = vec![rec.layer];
        let mut next = rec.parent.clone();
        while let Some(p) = next {
            let prec = self.find(&p)?.ok_or_else(|| {
                Error::Internal(format!("record of {:?} names missing parent {p:?}", rec.name))
            })?;
            layers.push(prec.layer);
            next = prec.parent;
            if layers.len() > 100_000 {
                return Err(Error::Internal(format!("the parents of {:?} form a cycle", rec.name)));
            }
        }
        Ok(layers)
    }

    /// Removes every layer of the plugin that no record names (what a crash between
    /// making a layer and recording it left behind), and returns them. Layers another
    /// call is making right now are not listed by the host, so they are spared.
    pub fn reclaim_layers(&self) -> Result<Vec<Layer>> {
        // Layers first, then records: a layer listed here is settled, so its call has
        // ended, and the record it made (if any) is in the records read next.
        let layers = Layer::list()?;
        let named: BTreeSet<Layer> = self.records()?.into_iter().map(|r| r.layer).collect();
        let mut removed = Vec::new();
        for layer in layers.into_iter().filter(|l| !named.contains(l)) {
            match layer.remove() {
                Ok(()) => removed.push(layer),
                Err(Error::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(removed)
    }
}
