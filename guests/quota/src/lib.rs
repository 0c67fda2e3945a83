//! `quota`: a policy that limits, per namespace, how many active snapshots there may be
//! and how many bytes the namespace's snapshots may use, in front of any snapshotter.
//!
//! The host gives backends keys of the form `<namespace>/<seq>/<key>`; the namespace is
//! the part before the first `/`. Keys without a `/` (a client calling a backend
//! directly, as the conformance suite's backend cases do) all count as one namespace
//! with an empty name, so choosing such keys does not escape the limits.
//!
//! - `max_active`: `prepare` is refused while the namespace has this many active
//!   snapshots. Views and committed snapshots are not active and do not count; `view`
//!   is not limited by it. Commit and remove free a slot.
//! - `max_bytes`: `prepare` and `view` are refused while the namespace's snapshots
//!   (every kind: committed layers hold the bytes that active ones wrote) use this many
//!   bytes or more, as the next snapshotter's `usage` counts them. No size is known
//!   before a snapshot is written, and writes into an active snapshot are not the
//!   snapshotter's to stop, so this is a soft limit: once reached, nothing new is made.
//!
//! Refusals are failed-precondition, e.g. `quota: namespace "ns1" has 3 active
//! snapshots (limit 3)`, and the next snapshotter is not called.
//!
//! **How the active limit holds.** Each namespace's count, and a marker per active key,
//! live in the plugin's key-value store. A prepare *reserves* a slot in one transaction
//! (read the count, refuse at the limit, write count + 1 and the key's marker) before it
//! calls the next snapshotter, and gives the slot back if that fails; commit and remove
//! give it back once they succeed. Transactions that race are retried by the store, so
//! however many instances run, no more prepares than the limit are ever admitted, and a
//! prepare costs two key-value reads, not a walk of the namespace.
//!
//! The count is seeded from the next snapshotter the first time a namespace is seen, so
//! snapshots made before the policy was configured count. A slot held by a snapshot
//! removed behind the policy, or left reserved by a crash, is found when the namespace
//! is at its limit: each marker is checked against the next snapshotter (`stat`), and
//! those no longer active are given back before the prepare is refused. A reservation
//! whose prepare has not been seen to succeed may belong to a prepare still running in
//! another instance, so when its snapshot is missing it is given back only once it is
//! older than [`STALE_SECS`].
//!
//! `max_bytes` keeps no state: it sums `usage` through the next snapshotter on every
//! call it checks.

use serde::Deserialize;
use wasnap_sdk::{
    Config, Error, Info, Kind, Labels, Mount, Next, Policy, Result, WALK_PAGE, kv, log,
};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default)]
    max_active: Option<u64>,
    #[serde(default)]
    max_bytes: Option<u64>,
}

/// The policy: its limits (`None`: not limited).
#[derive(Debug)]
struct Quota {
    max_active: Option<u64>,
    max_bytes: Option<u64>,
}

/// The namespace of a backend key: the part before the first `/`, or the empty
/// namespace for keys without one.
fn namespace_of(key: &str) -> &str {
    key.split_once('/').map_or("", |(ns, _)| ns)
}

/// Whether `name` belongs to namespace `ns`.
fn in_namespace(name: &str, ns: &str) -> bool {
    if ns.is_empty() {
        !name.contains('/')
    } else {
        name.strip_prefix(ns).is_some_and(|rest| rest.starts_with('/'))
    }
}

/// The namespace as error messages name it.
fn subject(ns: &str) -> String {
    if ns.is_empty() { "keys without a namespace".to_owned() } else { format!("namespace {ns:?}") }
}

/// `singular` or `plural`, to agree with [`subject`].
fn verb<'a>(ns: &str, singular: &'a str, plural: &'a str) -> &'a str {
    if ns.is_empty() { plural } else { singular }
}

/// What a namespace holds, as far as the limits care.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Tally {
    active: u64,
    bytes: u64,
}

/// Calls `f` with every snapshot of namespace `ns` that `next` has. Names are walked in
/// ascending order, so for a named namespace the walk starts at its name and stops past
/// its keys.
fn each_in(next: &Next, ns: &str, mut f: impl FnMut(Info) -> Result<()>) -> Result<()> {
    let prefix = format!("{ns}/");
    let mut after: Option<String> = (!ns.is_empty()).then(|| ns.to_owned());
    loop {
        let page = next.list(after.as_deref(), WALK_PAGE)?;
        let full = page.len() == WALK_PAGE as usize;
        for info in page {
            if after.as_deref().is_some_and(|a| info.name.as_str() <= a) {
                // Following a page out of order could loop forever.
                return Err(Error::Internal(format!(
                    "quota: the next snapshotter listed {:?} after {after:?}",
                    info.name
                )));
            }
            after = Some(info.name.clone());
            if in_namespace(&info.name, ns) {
                f(info)?;
            } else if !ns.is_empty() && info.name > prefix && !info.name.starts_with(&prefix) {
                // Past every name of the namespace (those between `ns` and `ns/`, such
                // as `ns.x/...`, are another namespace's and skipped).
                return Ok(());
            }
        }
        if !full {
            return Ok(());
        }
    }
}

impl Quota {
    /// Counts what namespace `ns` holds; bytes only when `bytes` is asked for.
    fn tally(&self, next: &Next, ns: &str, bytes: bool) -> Result<Tally> {
        let mut t = Tally::default();
        each_in(next, ns, |info| {
            if info.kind == Kind::Active {
                t.active += 1;
            }
            if bytes {
                match next.usage(&info.name) {
                    Ok(u) => t.bytes = t.bytes.saturating_add(u.size),
                    // Removed since it was listed: it holds nothing any more.
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e.context(format!("quota: usage of {:?}", info.name))),
                }
            }
            Ok(())
        })
        .map_err(|e| e.context(format!("quota: count the snapshots of {}", subject(ns))))?;
        Ok(t)
    }

    fn active_error(ns: &str, active: u64, limit: u64) -> Error {
        Error::FailedPrecondition(format!(
            "quota: {} {} {active} active snapshots (limit {limit})",
            subject(ns),
            verb(ns, "has", "have")
        ))
    }

    /// Refuses a new snapshot in `ns` if its bytes limit is reached.
    fn admit_bytes(&self, next: &Next, ns: &str) -> Result<()> {
        let Some(limit) = self.max_bytes else { return Ok(()) };
        let t = self.tally(next, ns, true)?;
        if t.bytes >= limit {
            return Err(Error::FailedPrecondition(format!(
                "quota: {} {} {} bytes (limit {limit})",
                subject(ns),
                verb(ns, "uses", "use"),
                t.bytes
            )));
        }
        Ok(())
    }

    /// Seeds the count of `ns` from the next snapshotter, the first time it is seen.
    fn ensure_counted(&self, next: &Next, ns: &str) -> Result<()> {
        if kv::get(&count_key(ns))?.is_some() {
            return Ok(());
        }
        let mut active = Vec::new();
        each_in(next, ns, |info| {
            if info.kind == Kind::Active {
                active.push(info.name);
            }
            Ok(())
        })
        .map_err(|e| e.context(format!("quota: count the snapshots of {}", subject(ns))))?;
        kv::transact(|t| {
            if t.get(&count_key(ns))?.is_some() {
                return Ok(()); // another instance seeded it meanwhile
            }
            t.put_json(&count_key(ns), &(active.len() as u64))?;
            for key in &active {
                t.put_json(&held_key(ns, key), &MADE)?;
            }
            Ok(())
        })
    }

    /// Takes a slot of `ns` for `key`, in one transaction.
    fn reserve(&self, ns: &str, key: &str, limit: u64) -> Result<Reserved> {
        kv::transact(|t| {
            if t.get(&held_key(ns, key))?.is_some() {
                // Active already: the prepare fails as already-exists and must not give
                // back the slot that snapshot holds.
                return Ok(Reserved::AlreadyHeld);
            }
            let n = t.get_json::<u64>(&count_key(ns))?.unwrap_or(0);
            if n >= limit {
                return Ok(Reserved::Full(n));
            }
            t.put_json(&count_key(ns), &(n + 1))?;
            t.put_json(&held_key(ns, key), &Marker { since: now_secs() })?;
            Ok(Reserved::Taken)
        })
    }

    /// Records that the prepare holding `key`'s slot made its snapshot, so that from now
    /// on its absence means it was removed.
    fn made(&self, ns: &str, key: &str) -> Result<()> {
        kv::transact(|t| {
            if t.get(&held_key(ns, key))?.is_some() {
                t.put_json(&held_key(ns, key), &MADE)?;
            }
            Ok(())
        })
    }

    /// Gives back the slot `key` holds in `ns`, if it holds one.
    fn release(&self, ns: &str, key: &str) -> Result<()> {
        kv::transact(|t| {
            if t.get(&held_key(ns, key))?.is_none() {
                return Ok(());
            }
            let n = t.get_json::<u64>(&count_key(ns))?.unwrap_or(0);
            t.put_json(&count_key(ns), &n.saturating_sub(1))?;
            t.delete(&held_key(ns, key));
            Ok(())
        })
    }

    /// Gives back the slots of `ns` whose key is no longer an active snapshot of the
    /// next snapshotter (a crash between reserving and preparing, a commit or remove
    /// cut short after the next snapshotter's, a removal behind the policy).
    fn reconcile(&self, next: &Next, ns: &str) -> Result<()> {
        let prefix = held_key(ns, "");
        let now = now_secs();
        for (name, entry) in kv::scan(&prefix)? {
            let key = &name[prefix.len()..];
            // An unreadable marker is as good as an old one.
            let since = serde_json::from_slice::<Marker>(&entry.value).map_or(0, |m| m.since);
            let stale = match next.stat(key) {
                Ok(info) => info.kind != Kind::Active,
                // Made and gone since; or not made yet (another instance's prepare may
                // be running), where only an old reservation is a crash's leftover.
                Err(e) if e.is_not_found() => since == 0 || now.saturating_sub(since) > STALE_SECS,
                Err(e) => return Err(e.context(format!("quota: check {key:?}"))),
            };
            if stale {
                log::info(format_args!("quota: {key:?} is no longer active; its slot is free"));
                self.release(ns, key)?;
            }
        }
        Ok(())
    }

    /// Reserves a slot for a prepare of `key`, or refuses it; `true` if a slot was
    /// taken (and must be given back if the prepare fails).
    fn take_slot(&self, next: &Next, ns: &str, key: &str) -> Result<bool> {
        let Some(limit) = self.max_active else { return Ok(false) };
        self.ensure_counted(next, ns)?;
        let mut reserved = self.reserve(ns, key, limit)?;
        if matches!(reserved, Reserved::Full(_)) {
            self.reconcile(next, ns)?;
            reserved = self.reserve(ns, key, limit)?;
        }
        match reserved {
            Reserved::Taken => Ok(true),
            Reserved::AlreadyHeld => Ok(false),
            Reserved::Full(n) => Err(Self::active_error(ns, n, limit)),
        }
    }
}

/// How old a reservation whose snapshot was never made must be before it is taken for
/// the leftover of a crash: far longer than any prepare runs.
const STALE_SECS: u64 = 600;

/// What a slot's marker holds: when it was reserved (seconds since the epoch), for a
/// prepare not known to have made its snapshot yet; 0 once it has.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Marker {
    since: u64,
}

/// A marker for a snapshot that exists (or existed).
const MADE: Marker = Marker { since: 0 };

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// What [`Quota::reserve`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reserved {
    Taken,
    AlreadyHeld,
    /// The namespace holds this many, the limit or more.
    Full(u64),
}

/// The key-value key holding the number of active snapshots of `ns`.
fn count_key(ns: &str) -> String {
    format!("count/{ns}")
}

/// The key-value key marking `key` as holding a slot of `ns` (`held/<ns>/` is the
/// prefix of them all; the empty namespace's is `held//`).
fn held_key(ns: &str, key: &str) -> String {
    format!("held/{ns}/{key}")
}

impl Policy for Quota {
    fn init(config: Config) -> Result<Self> {
        let s: Settings = config.parse()?;
        Ok(Quota { max_active: s.max_active, max_bytes: s.max_bytes })
    }

    fn prepare(
        &self,
        next: &Next,
        key: &str,
        parent: Option<&str>,
        labels: &Labels,
    ) -> Result<Vec<Mount>> {
        let ns = namespace_of(key);
        let taken = self.take_slot(next, ns, key)?;
        let made = self.admit_bytes(next, ns).and_then(|()| next.prepare(key, parent, labels));
        if taken {
            let recorded = match &made {
                // The call fails, so it must leave nothing: not even the slot.
                Err(_) => self.release(ns, key),
                Ok(_) => self.made(ns, key),
            };
            if let Err(e) = recorded {
                // Found and fixed when the namespace is next at its limit.
                log::warn(format_args!("quota: could not record the slot of {key:?}: {e}"));
            }
        }
        made
    }

    fn view(
        &self,
        next: &Next,
        key: &str,
        parent: Option<&str>,
        labels: &Labels,
    ) -> Result<Vec<Mount>> {
        self.admit_bytes(next, namespace_of(key))?;
        next.view(key, parent, labels)
    }

    fn commit(&self, next: &Next, name: &str, key: &str, labels: &Labels) -> Result<()> {
        next.commit(name, key, labels)?;
        self.give_back(key);
        Ok(())
    }

    fn remove(&self, next: &Next, key: &str) -> Result<()> {
        next.remove(key)?;
        self.give_back(key);
        Ok(())
    }
}

impl Quota {
    /// After `key` stopped being active: its slot is free. The call itself succeeded, so
    /// a failure here is logged, and the slot is found free when the namespace is next
    /// at its limit.
    fn give_back(&self, key: &str) {
        if self.max_active.is_none() {
            return;
        }
        if let Err(e) = self.release(namespace_of(key), key) {
            log::warn(format_args!("quota: could not give back the slot of {key:?}: {e}"));
        }
    }
}

wasnap_sdk::export_policy!(Quota);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_are_the_part_before_the_first_slash() {
        assert_eq!(namespace_of("ns1/4/a/b"), "ns1");
        assert_eq!(namespace_of("plain"), "");
        assert_eq!(namespace_of("/x"), "");
        assert!(in_namespace("ns1/4/k", "ns1"));
        assert!(!in_namespace("ns10/4/k", "ns1"));
        assert!(!in_namespace("ns1", "ns1"));
        assert!(!in_namespace("ns1.a/4/k", "ns1"));
        assert!(in_namespace("plain", ""));
        assert!(!in_namespace("ns1/4/k", ""));
    }

    #[test]
    fn limits_are_optional_and_unknown_fields_refused() {
        let q = Quota::init(Config::new("null")).unwrap();
        assert_eq!((q.max_active, q.max_bytes), (None, None));
        let q = Quota::init(Config::new(r#"{"max_active": 3}"#)).unwrap();
        assert_eq!((q.max_active, q.max_bytes), (Some(3), None));
        assert!(Quota::init(Config::new(r#"{"max_actives": 3}"#)).is_err());
        assert!(Quota::init(Config::new(r#"{"max_bytes": -1}"#)).is_err());
    }

    #[test]
    fn errors_read_clearly() {
        let e = Quota::active_error("ns1", 3, 3);
        assert_eq!(
            e.to_string(),
            r#"quota: namespace "ns1" has 3 active snapshots (limit 3): failed precondition"#
        );
        assert!(
            Quota::active_error("", 1, 1)
                .message()
                .contains("keys without a namespace have 1 active")
        );
    }
}
