//! The one error type of the SDK, with containerd's error classes.

use std::fmt;

/// A typed failure, with the class (containerd's `errdefs`) that decides how the host and
/// containerd react, and a message that says what was being done to what.
///
/// `Display` appends the class the way containerd's wrapped errors read, e.g.
/// `snapshot "k": not found`. Crossing the WIT boundary keeps the class and the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The named snapshot (or file, or parent) does not exist.
    #[error("{0}: not found")]
    NotFound(String),
    /// Something with that name already exists.
    #[error("{0}: already exists")]
    AlreadyExists(String),
    /// Not allowed in the current state: removing a snapshot with children, committing a
    /// view, a quota reached, a call before `init`.
    #[error("{0}: failed precondition")]
    FailedPrecondition(String),
    /// The request itself is wrong: a bad field path, a bad configuration, a bad path.
    #[error("{0}: invalid argument")]
    InvalidArgument(String),
    /// The plugin does not implement the operation.
    #[error("{0}: not implemented")]
    NotImplemented(String),
    /// Cannot serve now; the caller may retry.
    #[error("{0}: unavailable")]
    Unavailable(String),
    /// Anything else: I/O failures, corrupt records, bugs.
    #[error("{0}: internal")]
    Internal(String),
}

/// The SDK's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The class of an [`Error`], without its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// See [`Error::NotFound`].
    NotFound,
    /// See [`Error::AlreadyExists`].
    AlreadyExists,
    /// See [`Error::FailedPrecondition`].
    FailedPrecondition,
    /// See [`Error::InvalidArgument`].
    InvalidArgument,
    /// See [`Error::NotImplemented`].
    NotImplemented,
    /// See [`Error::Unavailable`].
    Unavailable,
    /// See [`Error::Internal`].
    Internal,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::NotFound => "not found",
            ErrorKind::AlreadyExists => "already exists",
            ErrorKind::FailedPrecondition => "failed precondition",
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::NotImplemented => "not implemented",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Internal => "internal",
        })
    }
}

impl Error {
    /// Builds an error of class `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        let m = message.into();
        match kind {
            ErrorKind::NotFound => Error::NotFound(m),
            ErrorKind::AlreadyExists => Error::AlreadyExists(m),
            ErrorKind::FailedPrecondition => Error::FailedPrecondition(m),
            ErrorKind::InvalidArgument => Error::InvalidArgument(m),
            ErrorKind::NotImplemented => Error::NotImplemented(m),
            ErrorKind::Unavailable => Error::Unavailable(m),
            ErrorKind::Internal => Error::Internal(m),
        }
    }

    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::AlreadyExists(_) => ErrorKind::AlreadyExists,
            Error::FailedPrecondition(_) => ErrorKind::FailedPrecondition,
            Error::InvalidArgument(_) => ErrorKind::InvalidArgument,
            Error::NotImplemented(_) => ErrorKind::NotImplemented,
            Error::Unavailable(_) => ErrorKind::Unavailable,
            Error::Internal(_) => ErrorKind::Internal,
        }
    }

    /// The message, without the class.
    pub fn message(&self) -> &str {
        match self {
            Error::NotFound(m)
            | Error::AlreadyExists(m)
            | Error::FailedPrecondition(m)
            | Error::InvalidArgument(m)
            | Error::NotImplemented(m)
            | Error::Unavailable(m)
            | Error::Internal(m) => m,
        }
    }

    /// Whether this is [`Error::NotFound`].
    pub fn is_not_found(&self) -> bool {
        self.kind() == ErrorKind::NotFound
    }

    /// An internal error that says what was being done when `err` happened.
    pub fn internal(context: impl fmt::Display, err: impl fmt::Display) -> Self {
        Error::Internal(format!("{context}: {err}"))
    }

    /// An I/O failure while doing `context`. Always internal: a file the plugin expected
    /// is not the caller's missing snapshot, so `NotFound` from the OS stays internal.
    pub fn io(context: impl fmt::Display, err: std::io::Error) -> Self {
        Error::internal(context, err)
    }

    /// The same error with `context` in front of its message, keeping the class.
    pub fn context(self, context: impl fmt::Display) -> Self {
        let kind = self.kind();
        Error::new(kind, format!("{context}: {}", self.message()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_reads_like_containerd() {
        let e = Error::NotFound("snapshot \"k\"".into());
        assert_eq!(e.to_string(), "snapshot \"k\": not found");
        let e = e.context("stat");
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert_eq!(e.message(), "stat: snapshot \"k\"");
    }
}
