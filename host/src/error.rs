//! The one error type that crosses the host.
//!
//! Its class ([`ErrorKind`]) mirrors containerd's error classes (`errdefs`), so a client
//! that knows containerd (and containerd itself, through the proxy API) handles wasnap's
//! errors exactly as its own. Conversions into transport codes (gRPC, WIT) live at those
//! edges, one `From` impl each; everything inside the host returns this type.
//!
//! There is one way to add context: [`Context::context`] (or its lazy twin
//! [`Context::with_context`]) on any result whose error converts into [`Error`] — this
//! type, `std::io::Error` and redb's errors. It keeps the class, prefixes the message and
//! keeps the original error as the [`source`](std::error::Error::source).

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;

/// The class of an [`Error`]: containerd's error classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The named object does not exist.
    NotFound,
    /// An object with that name already exists.
    AlreadyExists,
    /// The system is not in a state where the operation is allowed (removing a snapshot
    /// that has children, committing a view, ...).
    FailedPrecondition,
    /// The request itself is wrong (a malformed filter, a label that is too long, ...).
    InvalidArgument,
    /// The backend does not implement this operation.
    NotImplemented,
    /// The backend cannot serve now (timed out, shutting down, restarting); retry later.
    Unavailable,
    /// Anything else: I/O failures, corrupt records, bugs. Never the caller's fault.
    Internal,
}

impl ErrorKind {
    /// The class as containerd's messages end with it (`not found`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not found",
            ErrorKind::AlreadyExists => "already exists",
            ErrorKind::FailedPrecondition => "failed precondition",
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::NotImplemented => "not implemented",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A typed failure: a class, a message saying what was being done to what, and the
/// error that caused it, if any.
///
/// `Display` reads like containerd's wrapped errors, `snapshot "k": not found`: the
/// message (which already quotes the cause's text, as containerd's wrapped errors do)
/// followed by the class. The cause itself stays reachable through `source()`.
#[derive(Clone)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<Arc<dyn StdError + Send + Sync>>,
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind).field("message", &self.message);
        if let Some(s) = &self.source {
            d.field("source", s);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.message, self.kind)
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source.as_deref().map(|s| s as &(dyn StdError + 'static))
    }
}

/// Two errors are equal when their class and message are; causes are not compared.
impl PartialEq for Error {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind && self.message == other.message
    }
}

impl Eq for Error {}

impl Error {
    /// An error of class `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error { kind, message: message.into(), source: None }
    }

    /// See [`ErrorKind::NotFound`].
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    /// See [`ErrorKind::AlreadyExists`].
    pub fn already_exists(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::AlreadyExists, message)
    }

    /// See [`ErrorKind::FailedPrecondition`].
    pub fn failed_precondition(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::FailedPrecondition, message)
    }

    /// See [`ErrorKind::InvalidArgument`].
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }

    /// See [`ErrorKind::NotImplemented`].
    pub fn not_implemented(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotImplemented, message)
    }

    /// See [`ErrorKind::Unavailable`].
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }

    /// See [`ErrorKind::Internal`].
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    /// An error of class `kind` caused by `err`: the message is `err`'s text, and `err`
    /// is kept as the source. Add to it with [`Error::context`].
    pub fn from_cause(kind: ErrorKind, err: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        Self::new(kind, String::new()).caused_by(err)
    }

    /// The same error with `err` as its cause; its text becomes the message when there
    /// is none yet.
    #[must_use]
    pub fn caused_by(mut self, err: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        let err: Arc<dyn StdError + Send + Sync> = Arc::from(err.into());
        if self.message.is_empty() {
            self.message = err.to_string();
        }
        self.source = Some(err);
        self
    }

    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message without the class suffix.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Prefixes the message with more context, keeping the class and the cause.
    #[must_use]
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = if self.message.is_empty() {
            context.to_string()
        } else {
            format!("{context}: {}", self.message)
        };
        self
    }

    /// The same error with its message mapped by `f` (for rewriting names in it).
    #[must_use]
    pub fn map_message(mut self, f: impl FnOnce(&str) -> String) -> Self {
        self.message = f(&self.message);
        self
    }

    /// True for [`ErrorKind::NotFound`].
    pub fn is_not_found(&self) -> bool {
        self.kind == ErrorKind::NotFound
    }

    /// True for [`ErrorKind::AlreadyExists`].
    pub fn is_already_exists(&self) -> bool {
        self.kind == ErrorKind::AlreadyExists
    }

    /// The `std::io::Error` this error was caused by, if it was caused by one.
    pub fn io_error(&self) -> Option<&std::io::Error> {
        self.source.as_deref().and_then(|s| s.downcast_ref::<std::io::Error>())
    }
}

/// Filesystem failures the host did not expect are internal; callers that can tell a
/// caller's mistake from a host fault classify before converting.
impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::from_cause(ErrorKind::Internal, e)
    }
}

impl From<rustix::io::Errno> for Error {
    fn from(e: rustix::io::Errno) -> Self {
        std::io::Error::from(e).into()
    }
}

/// A record or message that does not encode or decode is the host's trouble: what it
/// decodes was written by the host.
impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::from_cause(ErrorKind::Internal, e)
    }
}

/// wasmtime's errors (compiling, linking, instantiating) are internal unless the caller
/// classifies them.
impl From<wasmtime::Error> for Error {
    fn from(e: wasmtime::Error) -> Self {
        Error::new(ErrorKind::Internal, format!("{e:#}"))
            .caused_by(Box::<dyn StdError + Send + Sync>::from(e))
    }
}

/// Every redb error is the host's trouble, except a database held by another process,
/// which the opening code reports itself.
macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::from_cause(ErrorKind::Internal, redb::Error::from(e)).context("database")
            }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// Context for results: the one way to say what was being done when something failed.
pub trait Context<T> {
    /// Prefixes the error's message with `context`, keeping its class and cause.
    fn context(self, context: impl fmt::Display) -> Result<T>;

    /// As [`Context::context`], building the context only on failure.
    fn with_context<C: fmt::Display>(self, f: impl FnOnce() -> C) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn context(self, context: impl fmt::Display) -> Result<T> {
        self.map_err(|e| e.into().context(context))
    }

    fn with_context<C: fmt::Display>(self, f: impl FnOnce() -> C) -> Result<T> {
        self.map_err(|e| e.into().context(f()))
    }
}

/// The host's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_keeps_the_class_and_the_cause() {
        let io = std::io::Error::from_raw_os_error(28);
        let e: Result<()> = Err(io).context("write blob").context("ingest sha256:ab");
        let e = e.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Internal);
        assert!(e.to_string().starts_with("ingest sha256:ab: write blob: No space left"), "{e}");
        assert!(e.to_string().ends_with(": internal"), "{e}");
        assert_eq!(e.io_error().and_then(std::io::Error::raw_os_error), Some(28));
        let e = Error::not_found("snapshot \"k\"").context("mounts");
        assert_eq!(e.to_string(), "mounts: snapshot \"k\": not found");
        assert!(e.source().is_none());
    }

    #[test]
    fn a_cause_becomes_the_message_and_stays_the_source() {
        let e = Error::from(std::io::Error::from_raw_os_error(2)).context("open x");
        assert!(e.message().starts_with("open x: No such file"), "{}", e.message());
        assert!(e.source().is_some());
        let e = Error::from_cause(ErrorKind::InvalidArgument, "bad byte").context("parse");
        assert_eq!(e.to_string(), "parse: bad byte: invalid argument");
    }
}
