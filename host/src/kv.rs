//! What the metadata layer and the drivers' own record stores share about redb:
//! opening a database file beneath a directory handle, and turning redb's errors into
//! the host's.

use std::fmt::Display;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cap_std::fs::{Dir, OpenOptions};
use redb::backends::FileBackend;

use crate::error::{Error, Result};

/// Opens (creating if needed) the redb database `name` inside `dir`.
///
/// A database held by another process (another wasnap on the same root) is reported as
/// unavailable with a message that says so, not as a corrupt file.
pub(crate) fn open(dir: &Dir, name: &str, what: &str) -> Result<redb::Database> {
    let file = dir
        .open_with(name, OpenOptions::new().read(true).write(true).create(true))
        .map_err(|e| Error::internal(format!("open {what} {name:?}"), e))?
        .into_std();
    let backend = FileBackend::new(file).map_err(|e| db_error(what, name, e))?;
    redb::Builder::new().create_with_backend(backend).map_err(|e| db_error(what, name, e))
}

fn db_error(what: &str, name: &str, e: redb::DatabaseError) -> Error {
    match e {
        redb::DatabaseError::DatabaseAlreadyOpen => Error::Unavailable(format!(
            "{what} {name:?} is in use by another process (is a wasnap daemon running on this root?)"
        )),
        other => Error::internal(format!("open {what} {name:?}"), other),
    }
}

/// Maps any redb error to an internal error with context.
pub(crate) fn err<E: Into<redb::Error>>(context: impl Display) -> impl FnOnce(E) -> Error {
    move |e| Error::internal(context, e.into())
}

/// Shorthand: `.map_err(kv::e)` for redb errors where the operation speaks for itself.
pub(crate) fn e<E: Into<redb::Error>>(e: E) -> Error {
    Error::internal("database", e.into())
}

// Timestamps are stored as nanoseconds since the Unix epoch.

/// Nanoseconds since the Unix epoch, for storing.
pub(crate) fn now_nanos() -> u64 {
    to_nanos(SystemTime::now())
}

pub(crate) fn to_nanos(t: SystemTime) -> u64 {
    // Before 1970 or after 2554 cannot happen on a sane clock; clamp rather than fail.
    t.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

pub(crate) fn from_nanos(n: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(n)
}
