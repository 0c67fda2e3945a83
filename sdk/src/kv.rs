//! The plugin's transactional key-value store, kept by the host and shared by every
//! instance of the plugin.
//!
//! Reads see committed state. A change is a [`Txn`]: reads made through it are
//! remembered with the revision they saw, writes are collected, and
//! [`Txn::commit`] applies the writes only if nothing it read has changed meanwhile
//! (compare-and-swap by revision, as etcd does). [`transact`] runs a closure as such a
//! transaction and runs it again on a conflict, so a read-modify-write stays correct
//! however many instances race:
//!
//! ```no_run
//! # fn main() -> wasnap_sdk::Result<()> {
//! // Reserve one of at most 100 slots, atomically.
//! let taken = wasnap_sdk::kv::transact(|txn| {
//!     let used: u64 = txn.get_json("slots")?.unwrap_or(0);
//!     if used >= 100 {
//!         return Ok(false);
//!     }
//!     txn.put_json("slots", &(used + 1))?;
//!     Ok(true)
//! })?;
//! # Ok(()) }
//! ```
//!
//! Limits: keys at most 1 KiB, values at most 1 MiB, 1024 writes per change; the host
//! bounds the store's total size (`kv_mib`).

use std::collections::BTreeMap;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// A value and its revision, a number that changes on every write of its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The value.
    pub value: Vec<u8>,
    /// Its revision.
    pub revision: u64,
}

/// The entry of `key`, if set.
pub fn get(key: &str) -> Result<Option<Entry>> {
    imp::get(key)
}

/// Keys from `start` (included) up to `end` (excluded; `None`: no end), ascending, at
/// most `limit`.
pub fn range(start: &str, end: Option<&str>, limit: u32) -> Result<Vec<(String, Entry)>> {
    imp::range(start, end, limit)
}

/// Every key starting with `prefix`, ascending, fetched page by page.
pub fn scan(prefix: &str) -> Result<Vec<(String, Entry)>> {
    let end = prefix_end(prefix);
    let mut out: Vec<(String, Entry)> = Vec::new();
    let mut start = prefix.to_owned();
    loop {
        let page = imp::range(&start, end.as_deref(), PAGE)?;
        let full = page.len() == PAGE as usize;
        if let Some((last, _)) = page.last() {
            // The next page starts just after the last key: the key with a NUL appended.
            start = format!("{last}\0");
        }
        out.extend(page);
        if !full {
            return Ok(out);
        }
    }
}

/// Keys a page of [`scan`] asks for.
const PAGE: u32 = 1000;

/// The first string after every string starting with `prefix`, or `None` if there is
/// none (a prefix of only `char::MAX`).
pub(crate) fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(c) = chars.pop() {
        if let Some(next) =
            char::from_u32(c as u32 + 1).or_else(|| char::from_u32(c as u32 + 0x801))
        {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// What a write does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Write {
    Put(String, Vec<u8>),
    Delete(String),
}

/// A change being built: reads remembered, writes collected.
#[derive(Debug, Default)]
pub struct Txn {
    /// Every key read, with the revision seen (`None`: not set).
    checks: BTreeMap<String, Option<u64>>,
    /// The values this change has written, as later reads through it see them.
    writes: BTreeMap<String, Option<Vec<u8>>>,
}

impl Txn {
    /// A new, empty change.
    pub fn new() -> Txn {
        Txn::default()
    }

    /// The value of `key` as this change sees it (its own writes first); the revision
    /// read is checked at commit.
    pub fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>> {
        if let Some(w) = self.writes.get(key) {
            return Ok(w.clone());
        }
        let found = imp::get(key)?;
        self.checks.entry(key.to_owned()).or_insert(found.as_ref().map(|e| e.revision));
        Ok(found.map(|e| e.value))
    }

    /// As [`Txn::get`], decoding JSON.
    pub fn get_json<T: DeserializeOwned>(&mut self, key: &str) -> Result<Option<T>> {
        match self.get(key)? {
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::Internal(format!("corrupt value of {key:?}: {e}"))),
            None => Ok(None),
        }
    }

    /// Requires, at commit, that `key` still has the revision `revision` (`None`: not set).
    pub fn expect(&mut self, key: &str, revision: Option<u64>) {
        self.checks.insert(key.to_owned(), revision);
    }

    /// Sets `key` to `value` at commit.
    pub fn put(&mut self, key: &str, value: Vec<u8>) {
        self.writes.insert(key.to_owned(), Some(value));
    }

    /// As [`Txn::put`], encoding JSON.
    pub fn put_json<T: Serialize>(&mut self, key: &str, value: &T) -> Result<()> {
        let bytes = serde_json::to_vec(value)
            .map_err(|e| Error::Internal(format!("encode the value of {key:?}: {e}")))?;
        self.put(key, bytes);
        Ok(())
    }

    /// Deletes `key` at commit.
    pub fn delete(&mut self, key: &str) {
        self.writes.insert(key.to_owned(), None);
    }

    /// Applies the writes if nothing read has changed; `false` (and nothing written) if
    /// something has.
    pub fn commit(self) -> Result<bool> {
        if self.writes.is_empty() {
            // Nothing to write: the reads were a consistent snapshot only if unchanged.
            return imp::commit(self.checks.into_iter().collect(), Vec::new());
        }
        let writes = self
            .writes
            .into_iter()
            .map(|(k, v)| match v {
                Some(v) => Write::Put(k, v),
                None => Write::Delete(k),
            })
            .collect();
        imp::commit(self.checks.into_iter().collect(), writes)
    }
}

/// Most times [`transact`] runs its closure before giving up as unavailable.
const MAX_ATTEMPTS: u32 = 1000;

/// Runs `f` as a transaction: again from the start while another change gets in first,
/// until it commits. `f` must act only through its [`Txn`] (it may run several times).
/// An error from `f` ends it with nothing written.
pub fn transact<T>(mut f: impl FnMut(&mut Txn) -> Result<T>) -> Result<T> {
    for _ in 0..MAX_ATTEMPTS {
        let mut txn = Txn::new();
        let out = f(&mut txn)?;
        if txn.commit()? {
            return Ok(out);
        }
    }
    Err(Error::Unavailable(format!(
        "a key-value transaction lost {MAX_ATTEMPTS} races in a row; retry later"
    )))
}

#[cfg(target_arch = "wasm32")]
mod imp {
    use super::{Entry, Write};
    use crate::error::Result;
    use crate::wit::wasnap::snapshotter::kv as w;

    pub fn get(key: &str) -> Result<Option<Entry>> {
        Ok(w::get(key)?.map(|e| Entry { value: e.value, revision: e.revision }))
    }

    pub fn range(start: &str, end: Option<&str>, limit: u32) -> Result<Vec<(String, Entry)>> {
        Ok(w::range(start, end, limit)?
            .into_iter()
            .map(|(k, e)| (k, Entry { value: e.value, revision: e.revision }))
            .collect())
    }

    pub fn commit(checks: Vec<(String, Option<u64>)>, writes: Vec<Write>) -> Result<bool> {
        let checks: Vec<w::Check> =
            checks.into_iter().map(|(key, revision)| w::Check { key, revision }).collect();
        let writes: Vec<w::Write> = writes
            .into_iter()
            .map(|wr| match wr {
                Write::Put(k, v) => w::Write::Put((k, v)),
                Write::Delete(k) => w::Write::Delete(k),
            })
            .collect();
        Ok(w::commit(&checks, &writes)?)
    }
}

#[cfg(not(target_arch = "wasm32"))]
use crate::testing::kv as imp;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Harness;

    #[test]
    fn prefix_ends_bound_exactly_the_prefix() {
        assert_eq!(prefix_end("s/").as_deref(), Some("s0"));
        assert_eq!(prefix_end("a").as_deref(), Some("b"));
        assert_eq!(prefix_end(""), None);
    }

    #[test]
    fn a_read_modify_write_retries_until_it_wins() {
        let h = Harness::new_temp();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let h = h.clone();
                std::thread::spawn(move || {
                    let _in = h.enter();
                    for _ in 0..50 {
                        transact(|txn| {
                            let n: u64 = txn.get_json("n")?.unwrap_or(0);
                            txn.put_json("n", &(n + 1))
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        let _in = h.enter();
        let n: u64 = serde_json::from_slice(&get("n").unwrap().unwrap().value).unwrap();
        assert_eq!(n, 400);
    }

    #[test]
    fn scan_pages_through_every_key_of_a_prefix_and_no_other() {
        let h = Harness::new_temp();
        let _in = h.enter();
        for i in 0..2500 {
            transact(|t| {
                t.put(&format!("p/{i:05}"), vec![1]);
                Ok(())
            })
            .unwrap();
        }
        transact(|t| {
            t.put("q", vec![]);
            t.put("p", vec![]);
            Ok(())
        })
        .unwrap();
        let got = scan("p/").unwrap();
        assert_eq!(got.len(), 2500);
        assert_eq!(got[0].0, "p/00000");
    }
}
