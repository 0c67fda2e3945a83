//! Between the host's types and the wire's: snapshots, mounts, leases, times, errors.
//!
//! Errors map the way containerd's `errdefs` map them, so containerd reads a wasnap
//! error as it would its own: the code carries the class, the message is the error's
//! text ending in its class (`snapshot "k": not found`), which containerd strips and
//! re-wraps.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tonic::{Code, Status};
use wasnap::metadata::{Lease, Resource};
use wasnap::{Error, ErrorKind, Info, Kind, Mount, Usage};

use crate::proto::{leases as lpb, snapshots as spb, types as tpb};

/// The gRPC status for a host error.
pub fn status(e: &Error) -> Status {
    let code = match e.kind() {
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::NotImplemented => Code::Unimplemented,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::Internal => Code::Internal,
    };
    Status::new(code, e.to_string())
}

/// The host error for a gRPC status (what a client gets back).
pub fn error(s: &Status) -> Error {
    let kind = match s.code() {
        Code::NotFound => ErrorKind::NotFound,
        Code::AlreadyExists => ErrorKind::AlreadyExists,
        Code::FailedPrecondition => ErrorKind::FailedPrecondition,
        Code::InvalidArgument | Code::OutOfRange => ErrorKind::InvalidArgument,
        Code::Unimplemented => ErrorKind::NotImplemented,
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => ErrorKind::Unavailable,
        _ => ErrorKind::Internal,
    };
    let msg = s.message();
    let suffix = format!(": {kind}");
    let msg = msg.strip_suffix(&suffix).unwrap_or(msg);
    let msg = if msg.is_empty() { format!("daemon answered {:?}", s.code()) } else { msg.into() };
    Error::new(kind, msg)
}

/// A protobuf timestamp.
pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let (seconds, nanos) = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos() as i32),
        Err(e) => {
            let d = e.duration();
            let (mut s, mut n) = (-(d.as_secs() as i64), -(d.subsec_nanos() as i32));
            if n < 0 {
                s -= 1;
                n += 1_000_000_000;
            }
            (s, n)
        }
    };
    prost_types::Timestamp { seconds, nanos }
}

/// A time from a protobuf timestamp (the epoch if absent or out of range).
pub fn time(t: Option<&prost_types::Timestamp>) -> SystemTime {
    let Some(t) = t else { return UNIX_EPOCH };
    let nanos = t.nanos.clamp(0, 999_999_999) as u32;
    if t.seconds >= 0 {
        UNIX_EPOCH + Duration::new(t.seconds as u64, nanos)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.seconds.unsigned_abs())
            + Duration::from_nanos(nanos.into())
    }
}

/// A snapshot kind on the wire.
pub fn kind(k: Kind) -> spb::Kind {
    match k {
        Kind::View => spb::Kind::View,
        Kind::Active => spb::Kind::Active,
        Kind::Committed => spb::Kind::Committed,
    }
}

/// A snapshot kind from the wire; `UNKNOWN` is invalid.
pub fn kind_from(k: i32) -> Result<Kind, Error> {
    match spb::Kind::try_from(k) {
        Ok(spb::Kind::View) => Ok(Kind::View),
        Ok(spb::Kind::Active) => Ok(Kind::Active),
        Ok(spb::Kind::Committed) => Ok(Kind::Committed),
        _ => Err(Error::invalid_argument(format!(
            "snapshot kind {k} is not one of view, active, committed"
        ))),
    }
}

/// Snapshot info on the wire.
pub fn info(i: Info) -> spb::Info {
    spb::Info {
        name: i.name,
        parent: i.parent.unwrap_or_default(),
        kind: kind(i.kind).into(),
        created_at: Some(timestamp(i.created)),
        updated_at: Some(timestamp(i.updated)),
        labels: i.labels.into_iter().collect(),
    }
}

/// Snapshot info from the wire. An unknown kind is read as active (an update request
/// need not carry one; only the name and labels of an update matter).
pub fn info_from(i: spb::Info) -> Info {
    Info {
        kind: kind_from(i.kind).unwrap_or(Kind::Active),
        created: time(i.created_at.as_ref()),
        updated: time(i.updated_at.as_ref()),
        name: i.name,
        parent: Some(i.parent).filter(|p| !p.is_empty()),
        labels: i.labels.into_iter().collect(),
    }
}

/// A mount on the wire.
pub fn mount(m: Mount) -> tpb::Mount {
    tpb::Mount { r#type: m.kind, source: m.source, target: m.target, options: m.options }
}

/// A mount from the wire.
pub fn mount_from(m: tpb::Mount) -> Mount {
    Mount { kind: m.r#type, source: m.source, target: m.target, options: m.options }
}

/// Usage on the wire (saturating at `i64::MAX`).
pub fn usage(u: Usage) -> spb::UsageResponse {
    let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    spb::UsageResponse { size: clamp(u.size), inodes: clamp(u.inodes) }
}

/// Usage from the wire (negative values read as 0).
pub fn usage_from(u: spb::UsageResponse) -> Usage {
    Usage { size: u.size.max(0) as u64, inodes: u.inodes.max(0) as u64 }
}

/// A lease on the wire.
pub fn lease(l: Lease) -> lpb::Lease {
    lpb::Lease {
        id: l.id,
        created_at: Some(timestamp(l.created)),
        labels: l.labels.into_iter().collect(),
    }
}

/// A lease from the wire.
pub fn lease_from(l: lpb::Lease) -> Lease {
    Lease { id: l.id, created: time(l.created_at.as_ref()), labels: l.labels.into_iter().collect() }
}

/// A lease resource on the wire.
pub fn resource(r: Resource) -> lpb::Resource {
    lpb::Resource { id: r.id, r#type: r.kind }
}

/// A lease resource from the wire.
pub fn resource_from(r: lpb::Resource) -> Resource {
    Resource { id: r.id, kind: r.r#type }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_round_trip_with_their_class() {
        for e in [
            Error::not_found("snapshot \"k\""),
            Error::already_exists("x"),
            Error::failed_precondition("x"),
            Error::invalid_argument("x"),
            Error::not_implemented("x"),
            Error::unavailable("x"),
            Error::internal("x"),
        ] {
            let s = status(&e);
            assert!(s.message().ends_with(&e.kind().to_string()), "{s:?}");
            assert_eq!(error(&s), e);
        }
        assert_eq!(status(&Error::not_found("k")).code(), Code::NotFound);
        assert_eq!(status(&Error::not_implemented("k")).code(), Code::Unimplemented);
    }

    #[test]
    fn times_round_trip_including_before_the_epoch() {
        for t in [
            UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789),
            UNIX_EPOCH - Duration::new(5, 250_000_000),
            UNIX_EPOCH,
        ] {
            assert_eq!(time(Some(&timestamp(t))), t);
        }
    }
}
