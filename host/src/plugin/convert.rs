//! Conversions between the host's types and the WIT types, in one place.
//!
//! The WIT `error` variant and [`crate::Error`] have the same seven classes, so a class
//! survives every crossing: guest to host, and host to a policy guest calling `next`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::bindings::types as wit;
use crate::error::Error;
use crate::error::ErrorKind;
use crate::snapshot::{Info, Kind, Labels, Usage};

/// Most bytes of a guest's error message the host keeps.
pub(crate) const MAX_ERROR: usize = 4096;

/// A guest's text as the host repeats it (in logs, in gRPC messages): at most
/// [`MAX_ERROR`] bytes, control characters escaped, so a guest can neither flood nor
/// forge lines.
pub(crate) fn guest_text(text: &str) -> String {
    let mut end = text.len().min(MAX_ERROR);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    // Escaping can make the kept part longer: cut again after it.
    let mut out = super::output::escape(&text[..end]);
    let mut kept = out.len().min(MAX_ERROR);
    while !out.is_char_boundary(kept) {
        kept -= 1;
    }
    out.truncate(kept);
    if end < text.len() || kept < out.len() {
        out.push_str(&format!(" [{} more bytes cut]", text.len() - end));
    }
    out
}

/// How the host names the plugin an error came from, at the start of its message.
pub(crate) const PLUGIN_PREFIX: &str = "plugin \"";

/// A guest's error, with the plugin named so the operator knows where it came from: the
/// innermost plugin, when a policy passes on, unchanged, one of the errors its next
/// snapshotter returned in this call (`passed`). Any other text that claims to come from
/// a plugin is the guest's own, and named as such: a guest cannot pass its words off
/// as another plugin's.
pub(crate) fn error_from_guest(plugin: &str, e: wit::Error, passed: &[String]) -> Error {
    let (kind, msg) = match e {
        wit::Error::NotFound(m) => (crate::ErrorKind::NotFound, m),
        wit::Error::AlreadyExists(m) => (crate::ErrorKind::AlreadyExists, m),
        wit::Error::FailedPrecondition(m) => (crate::ErrorKind::FailedPrecondition, m),
        wit::Error::InvalidArgument(m) => (crate::ErrorKind::InvalidArgument, m),
        wit::Error::NotImplemented(m) => (crate::ErrorKind::NotImplemented, m),
        wit::Error::Unavailable(m) => (crate::ErrorKind::Unavailable, m),
        wit::Error::Internal(m) => (crate::ErrorKind::Internal, m),
    };
    if msg.starts_with(PLUGIN_PREFIX) && passed.contains(&msg) {
        return Error::new(kind, guest_text(&msg));
    }
    Error::new(kind, format!("plugin {plugin:?}: {}", guest_text(&msg)))
}

impl From<Error> for wit::Error {
    fn from(e: Error) -> Self {
        let m = e.message().to_owned();
        match e.kind() {
            ErrorKind::NotFound => wit::Error::NotFound(m),
            ErrorKind::AlreadyExists => wit::Error::AlreadyExists(m),
            ErrorKind::FailedPrecondition => wit::Error::FailedPrecondition(m),
            ErrorKind::InvalidArgument => wit::Error::InvalidArgument(m),
            ErrorKind::NotImplemented => wit::Error::NotImplemented(m),
            ErrorKind::Unavailable => wit::Error::Unavailable(m),
            ErrorKind::Internal => wit::Error::Internal(m),
        }
    }
}

impl From<wit::Kind> for Kind {
    fn from(k: wit::Kind) -> Self {
        match k {
            wit::Kind::View => Kind::View,
            wit::Kind::Active => Kind::Active,
            wit::Kind::Committed => Kind::Committed,
        }
    }
}

impl From<Kind> for wit::Kind {
    fn from(k: Kind) -> Self {
        match k {
            Kind::View => wit::Kind::View,
            Kind::Active => wit::Kind::Active,
            Kind::Committed => wit::Kind::Committed,
        }
    }
}

pub(crate) fn time_from_wit(t: wit::Timestamp) -> SystemTime {
    let nanos = t.nanoseconds.min(999_999_999);
    UNIX_EPOCH
        .checked_add(Duration::new(t.seconds, nanos))
        // A guest sending a time past what SystemTime holds gets the epoch, not a panic.
        .unwrap_or(UNIX_EPOCH)
}

pub(crate) fn time_to_wit(t: SystemTime) -> wit::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    wit::Timestamp { seconds: d.as_secs(), nanoseconds: d.subsec_nanos() }
}

/// Labels from a guest: a repeated key keeps its last value, as a map insert would.
pub(crate) fn labels_from_wit(l: wit::Labels) -> Labels {
    l.into_iter().collect()
}

pub(crate) fn labels_to_wit(l: &Labels) -> wit::Labels {
    l.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

pub(crate) fn info_from_wit(i: wit::Info) -> Info {
    Info {
        name: i.name,
        parent: i.parent,
        kind: i.kind.into(),
        labels: labels_from_wit(i.labels),
        created: time_from_wit(i.created),
        updated: time_from_wit(i.updated),
    }
}

pub(crate) fn info_to_wit(i: &Info) -> wit::Info {
    wit::Info {
        name: i.name.clone(),
        parent: i.parent.clone(),
        kind: i.kind.into(),
        labels: labels_to_wit(&i.labels),
        created: time_to_wit(i.created),
        updated: time_to_wit(i.updated),
    }
}

pub(crate) fn usage_from_wit(u: wit::UsageInfo) -> Usage {
    Usage { size: u.size, inodes: u.inodes }
}

pub(crate) fn usage_to_wit(u: Usage) -> wit::UsageInfo {
    wit::UsageInfo { size: u.size, inodes: u.inodes }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_survives_both_crossings() {
        for kind in [
            crate::ErrorKind::NotFound,
            crate::ErrorKind::AlreadyExists,
            crate::ErrorKind::FailedPrecondition,
            crate::ErrorKind::InvalidArgument,
            crate::ErrorKind::NotImplemented,
            crate::ErrorKind::Unavailable,
            crate::ErrorKind::Internal,
        ] {
            let back = error_from_guest("p", Error::new(kind, "x").into(), &[]);
            assert_eq!(back.kind(), kind);
            assert_eq!(back.message(), "plugin \"p\": x");
        }
    }

    #[test]
    fn guest_text_is_bounded_and_cannot_forge_lines() {
        let forged = "fine\n2026-12-04T00:00:00Z ERROR wasnap: root compromised";
        let e = error_from_guest("p", wit::Error::Internal(forged.into()), &[]);
        assert!(!e.message().contains('\n'), "{}", e.message());
        let flood = "x".repeat(1 << 20);
        let e = error_from_guest("p", wit::Error::Internal(flood), &[]);
        assert!(e.message().len() < MAX_ERROR + 100, "{}", e.message().len());
        assert!(e.message().ends_with("more bytes cut]"));
        // Passed on by a policy, the innermost plugin is named once.
        let inner = error_from_guest("quota", wit::Error::FailedPrecondition("full".into()), &[]);
        let passed = [inner.message().to_owned()];
        let outer = error_from_guest("label", inner.clone().into(), &passed);
        assert_eq!(outer.message(), "plugin \"quota\": full");
        // Text that only claims to come from another plugin is the guest's own.
        let forged = wit::Error::FailedPrecondition("plugin \"quota\": full".into());
        assert_eq!(
            error_from_guest("label", forged, &[]).message(),
            "plugin \"label\": plugin \"quota\": full"
        );
        let changed = wit::Error::FailedPrecondition("plugin \"quota\": full!".into());
        assert_eq!(
            error_from_guest("label", changed, &passed).message(),
            "plugin \"label\": plugin \"quota\": full!"
        );
    }

    #[test]
    fn times_round_trip_and_nonsense_does_not_panic() {
        let now = SystemTime::now();
        assert_eq!(time_from_wit(time_to_wit(now)), now);
        let _ = time_from_wit(wit::Timestamp { seconds: u64::MAX, nanoseconds: u32::MAX });
    }
}
