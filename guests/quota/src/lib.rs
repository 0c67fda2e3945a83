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
//! The policy keeps no state: it counts through the next snapshotter (`list`, `usage`)
//! on every call it checks, so it is right after restarts, across instances, and when
//! snapshots are made or removed behind it. Two prepares racing for the last slot could
//! both pass a count taken before either exists, so a prepare counts again after its
//! snapshot is made and removes it if the namespace went over the limit: the limit
//! holds, and in the worst case both racers are refused.

use serde::Deserialize;
use wasnap_sdk::{Config, Error, Info, Kind, Labels, Mount, Next, Policy, Result, WALK_PAGE, log};

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

    /// Refuses a new snapshot in `ns` if a limit is reached: the active count only for an
    /// active snapshot.
    fn admit(&self, next: &Next, ns: &str, active: bool) -> Result<()> {
        let max_active = self.max_active.filter(|_| active);
        if max_active.is_none() && self.max_bytes.is_none() {
            return Ok(());
        }
        let t = self.tally(next, ns, self.max_bytes.is_some())?;
        if let Some(limit) = max_active
            && t.active >= limit
        {
            return Err(Self::active_error(ns, t.active, limit));
        }
        if let Some(limit) = self.max_bytes
            && t.bytes >= limit
        {
            return Err(Error::FailedPrecondition(format!(
                "quota: {} {} {} bytes (limit {limit})",
                subject(ns),
                verb(ns, "uses", "use"),
                t.bytes
            )));
        }
        Ok(())
    }
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
        self.admit(next, ns, true)?;
        let mounts = next.prepare(key, parent, labels)?;
        if let Some(limit) = self.max_active {
            // Another prepare may have passed the same count meanwhile: count again, now
            // that this snapshot is there, and take it back if there are too many (or if
            // they cannot be counted: the call fails, so it must leave nothing).
            let refusal = match self.tally(next, ns, false) {
                Ok(after) if after.active <= limit => None,
                Ok(after) => Some(Self::active_error(ns, after.active - 1, limit)),
                Err(e) => Some(e),
            };
            if let Some(refusal) = refusal {
                if let Err(e) = next.remove(key) {
                    log::warn(format_args!("quota: could not take back {key:?}: {e}"));
                }
                return Err(refusal);
            }
        }
        Ok(mounts)
    }

    fn view(
        &self,
        next: &Next,
        key: &str,
        parent: Option<&str>,
        labels: &Labels,
    ) -> Result<Vec<Mount>> {
        self.admit(next, namespace_of(key), false)?;
        next.view(key, parent, labels)
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
