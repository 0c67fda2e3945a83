//! The one error type that crosses the host.
//!
//! Its variants mirror containerd's error classes (`errdefs`), so a client that knows
//! containerd (and containerd itself, through the proxy API) handles wasnap's errors
//! exactly as its own. Conversions into transport codes (gRPC, WIT) live at those edges,
//! one `From` impl each; everything inside the host returns this type.

use std::fmt;

/// A typed failure of a snapshotter operation, mirroring containerd's error classes.
///
/// The string is the human part of the message: what was being done to what. `Display`
/// appends the class the way containerd's wrapped errors read, e.g.
/// `snapshot "k" in namespace "default": not found`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The named object does not exist.
    #[error("{0}: not found")]
    NotFound(String),
    /// An object with that name already exists.
    #[error("{0}: already exists")]
    AlreadyExists(String),
    /// The system is not in a state where the operation is allowed
    /// (removing a snapshot that has children, committing a view, ...).
    #[error("{0}: failed precondition")]
    FailedPrecondition(String),
    /// The request itself is wrong (a malformed filter, a label that is too long, ...).
    #[error("{0}: invalid argument")]
    InvalidArgument(String),
    /// The backend does not implement this operation.
    #[error("{0}: not implemented")]
    NotImplemented(String),
    /// The backend cannot serve now (timed out, shutting down, restarting); retry later.
    #[error("{0}: unavailable")]
    Unavailable(String),
    /// Anything else: I/O failures, corrupt records, bugs. Never the caller's fault.
    #[error("{0}: internal")]
    Internal(String),
}

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

    /// The message without the class suffix.
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

    /// Builds an error of the given class.
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

    /// An internal error that says what was being done when `err` happened.
    pub fn internal(context: impl fmt::Display, err: impl fmt::Display) -> Self {
        Error::Internal(format!("{context}: {err}"))
    }

    /// Prefixes the message with more context, keeping the class.
    #[must_use]
    pub fn context(self, context: impl fmt::Display) -> Self {
        let kind = self.kind();
        Error::new(kind, format!("{context}: {}", self.message()))
    }

    /// True for [`Error::NotFound`].
    pub fn is_not_found(&self) -> bool {
        self.kind() == ErrorKind::NotFound
    }

    /// True for [`Error::AlreadyExists`].
    pub fn is_already_exists(&self) -> bool {
        self.kind() == ErrorKind::AlreadyExists
    }
}

/// Adds context to I/O-ish results as an [`Error::Internal`].
pub(crate) trait ResultExt<T> {
    /// Maps the error to `Error::Internal("{context}: {err}")`.
    fn internal(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: fmt::Display> ResultExt<T> for std::result::Result<T, E> {
    fn internal(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::internal(context(), e))
    }
}

/// The host's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
