//! Every conversion between the SDK's types and the generated WIT types, in one place.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::Error;
use crate::layers::Layer;
use crate::types::{Info, Kind, Labels, Mount, OverlayFlags, Usage};
use crate::wit::wasnap::snapshotter::types as w;

impl From<Kind> for w::Kind {
    fn from(k: Kind) -> Self {
        match k {
            Kind::View => w::Kind::View,
            Kind::Active => w::Kind::Active,
            Kind::Committed => w::Kind::Committed,
        }
    }
}

impl From<w::Kind> for Kind {
    fn from(k: w::Kind) -> Self {
        match k {
            w::Kind::View => Kind::View,
            w::Kind::Active => Kind::Active,
            w::Kind::Committed => Kind::Committed,
        }
    }
}

/// A time as the WIT carries it; times before the epoch (which no snapshot has) become
/// the epoch.
pub(crate) fn timestamp(t: SystemTime) -> w::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    w::Timestamp { seconds: d.as_secs(), nanoseconds: d.subsec_nanos() }
}

/// A time from the WIT; one too far in the future to represent saturates rather than
/// panicking, since it may come from another plugin.
pub(crate) fn system_time(t: w::Timestamp) -> SystemTime {
    Duration::from_secs(t.seconds)
        .checked_add(Duration::from_nanos(u64::from(t.nanoseconds)))
        .and_then(|d| UNIX_EPOCH.checked_add(d))
        .unwrap_or(UNIX_EPOCH + Duration::from_secs(u64::from(u32::MAX)))
}

/// Labels as the WIT carries them: pairs, sorted by key.
pub(crate) fn wit_labels(labels: &Labels) -> w::Labels {
    labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Labels from the WIT; should a key repeat, the last value wins.
pub(crate) fn labels(pairs: w::Labels) -> Labels {
    pairs.into_iter().collect()
}

impl From<Info> for w::Info {
    fn from(i: Info) -> Self {
        w::Info {
            labels: wit_labels(&i.labels),
            name: i.name,
            parent: i.parent,
            kind: i.kind.into(),
            created: timestamp(i.created),
            updated: timestamp(i.updated),
        }
    }
}

impl From<w::Info> for Info {
    fn from(i: w::Info) -> Self {
        Info {
            name: i.name,
            parent: i.parent,
            kind: i.kind.into(),
            labels: labels(i.labels),
            created: system_time(i.created),
            updated: system_time(i.updated),
        }
    }
}

impl From<Usage> for w::UsageInfo {
    fn from(u: Usage) -> Self {
        w::UsageInfo { size: u.size, inodes: u.inodes }
    }
}

impl From<w::UsageInfo> for Usage {
    fn from(u: w::UsageInfo) -> Self {
        Usage { size: u.size, inodes: u.inodes }
    }
}

impl From<Mount> for w::Mount {
    fn from(m: Mount) -> Self {
        match m {
            Mount::Bind { layer, readonly } => {
                w::Mount::Bind(w::BindMount { layer: layer.0, readonly })
            }
            Mount::Overlay { lowers, upper, flags } => {
                let mut f = w::OverlayFlags::empty();
                f.set(w::OverlayFlags::INDEX_OFF, flags.index_off);
                f.set(w::OverlayFlags::USERXATTR, flags.userxattr);
                f.set(w::OverlayFlags::VOLATILE, flags.volatile);
                w::Mount::Overlay(w::OverlayMount {
                    lowers: lowers.into_iter().map(|l| l.0).collect(),
                    upper: upper.map(|u| u.0),
                    flags: f,
                })
            }
            Mount::Passed(i) => w::Mount::Passed(i),
        }
    }
}

impl From<w::Mount> for Mount {
    fn from(m: w::Mount) -> Self {
        match m {
            w::Mount::Bind(b) => Mount::Bind { layer: Layer(b.layer), readonly: b.readonly },
            w::Mount::Overlay(o) => Mount::Overlay {
                lowers: o.lowers.into_iter().map(Layer).collect(),
                upper: o.upper.map(Layer),
                flags: OverlayFlags {
                    index_off: o.flags.contains(w::OverlayFlags::INDEX_OFF),
                    userxattr: o.flags.contains(w::OverlayFlags::USERXATTR),
                    volatile: o.flags.contains(w::OverlayFlags::VOLATILE),
                },
            },
            w::Mount::Passed(i) => Mount::Passed(i),
        }
    }
}

impl From<Error> for w::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::NotFound(m) => w::Error::NotFound(m),
            Error::AlreadyExists(m) => w::Error::AlreadyExists(m),
            Error::FailedPrecondition(m) => w::Error::FailedPrecondition(m),
            Error::InvalidArgument(m) => w::Error::InvalidArgument(m),
            Error::NotImplemented(m) => w::Error::NotImplemented(m),
            Error::Unavailable(m) => w::Error::Unavailable(m),
            Error::Internal(m) => w::Error::Internal(m),
        }
    }
}

impl From<w::Error> for Error {
    fn from(e: w::Error) -> Self {
        match e {
            w::Error::NotFound(m) => Error::NotFound(m),
            w::Error::AlreadyExists(m) => Error::AlreadyExists(m),
            w::Error::FailedPrecondition(m) => Error::FailedPrecondition(m),
            w::Error::InvalidArgument(m) => Error::InvalidArgument(m),
            w::Error::NotImplemented(m) => Error::NotImplemented(m),
            w::Error::Unavailable(m) => Error::Unavailable(m),
            w::Error::Internal(m) => Error::Internal(m),
        }
    }
}

/// Converts every item of a list.
pub(crate) fn all<A, B: From<A>>(v: Vec<A>) -> Vec<B> {
    v.into_iter().map(B::from).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_survives_the_round_trip() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
        let mut labels = Labels::new();
        labels.insert("b".into(), "2".into());
        labels.insert("a".into(), "1".into());
        let info = Info {
            name: "ns/1/k".into(),
            parent: Some("ns/0/p".into()),
            kind: Kind::Committed,
            labels,
            created: t,
            updated: t + Duration::from_nanos(1),
        };
        let wit: w::Info = info.clone().into();
        assert_eq!(wit.labels[0].0, "a");
        assert_eq!(Info::from(wit), info);
    }

    #[test]
    fn errors_keep_class_and_message() {
        for e in [
            Error::NotFound("a".into()),
            Error::AlreadyExists("b".into()),
            Error::FailedPrecondition("c".into()),
            Error::InvalidArgument("d".into()),
            Error::NotImplemented("e".into()),
            Error::Unavailable("f".into()),
            Error::Internal("g".into()),
        ] {
            assert_eq!(Error::from(w::Error::from(e.clone())), e);
        }
    }

    #[test]
    fn absurd_timestamps_do_not_panic() {
        let t = system_time(w::Timestamp { seconds: u64::MAX, nanoseconds: u32::MAX });
        assert!(t > UNIX_EPOCH);
    }
}
