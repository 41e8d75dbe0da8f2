//! The read-model database's errors and their sorting: by the driver's
//! labels, kinds and codes, never by message text.

use super::codes::{self, DriverError, Refusal, RETRYABLE_CODES};
use crate::policy::RetryClass;
use mongodb::error::{ErrorKind, RETRYABLE_WRITE_ERROR, TRANSIENT_TRANSACTION_ERROR};

/// A failure of the read-model database. `what` says what failed when the
/// driver's error (`source`) does not, or what the server answered when
/// there is no driver error (a statement's code in a write reply).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Worth retrying: the server is down, restarting, unreachable or not primary.
    #[error("mongodb unavailable{}", colon(what))]
    Transient {
        what: String,
        /// What kind of outage (the driver's error says it when there is one).
        retry: RetryClass,
        #[source]
        source: Option<DriverError>,
    },
    /// The server refused a write because of the documents it held (see
    /// [`codes`]): the events behind them are at fault, not the process.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// Will not succeed by retrying (bad credentials, invalid command...): stop.
    #[error("mongodb{}", colon(what))]
    Fatal {
        what: String,
        #[source]
        source: Option<DriverError>,
    },
}

/// `: what`, or nothing when `what` is empty (the source says it all).
fn colon(what: &str) -> String {
    if what.is_empty() {
        String::new()
    } else {
        format!(": {what}")
    }
}

impl StoreError {
    /// A transient failure of the kind `retry` the server reported (or the
    /// processor found) without a driver error.
    pub fn transient(retry: RetryClass, what: impl Into<String>) -> Self {
        StoreError::Transient {
            what: what.into(),
            retry,
            source: None,
        }
    }

    /// A fatal failure the server reported without a driver error.
    pub fn fatal(what: impl Into<String>) -> Self {
        StoreError::Fatal {
            what: what.into(),
            source: None,
        }
    }
}

impl From<mongodb::error::Error> for StoreError {
    fn from(err: mongodb::error::Error) -> Self {
        use crate::policy::Classify;
        let transient = retryable(&err);
        let retry = err.retry_class();
        let source = Some(crate::policy::Summarised(err));
        if transient {
            StoreError::Transient {
                what: String::new(),
                retry,
                source,
            }
        } else {
            StoreError::Fatal {
                what: String::new(),
                source,
            }
        }
    }
}

/// A write command's own failure: sorted by its code like a statement's.
pub(crate) fn write_failure(collection: &str, err: mongodb::error::Error) -> StoreError {
    match err.kind.as_ref() {
        ErrorKind::Command(command) if !retryable(&err) => {
            codes::write_error(collection, command.code, &command.message)
        }
        _ => StoreError::from(err),
    }
}

/// Sorts a driver error: labels, kinds, then codes (never message text).
/// True: transient (see [`Classify`]).
pub(crate) fn retryable(err: &mongodb::error::Error) -> bool {
    if err.contains_label(RETRYABLE_WRITE_ERROR) || err.contains_label(TRANSIENT_TRANSACTION_ERROR)
    {
        return true;
    }
    match err.kind.as_ref() {
        ErrorKind::Io(_)
        | ErrorKind::ConnectionPoolCleared { .. }
        | ErrorKind::ServerSelection { .. } => true,
        ErrorKind::Command(command) => RETRYABLE_CODES.contains(&command.code),
        ErrorKind::Write(mongodb::error::WriteFailure::WriteConcernError(wc)) => {
            RETRYABLE_CODES.contains(&wc.code)
        }
        _ => false,
    }
}

impl crate::policy::Classify for StoreError {
    fn class(&self) -> crate::policy::ErrorClass {
        match self {
            StoreError::Transient { .. } => crate::policy::ErrorClass::Transient,
            // The written documents are at fault: their events are isolated
            // and dead-lettered (`projection::isolate`).
            StoreError::Refused(_) => crate::policy::ErrorClass::Permanent,
            StoreError::Fatal { .. } => crate::policy::ErrorClass::Fatal,
        }
    }

    fn retry_class(&self) -> RetryClass {
        match self {
            StoreError::Transient { retry, .. } => *retry,
            StoreError::Refused(_) | StoreError::Fatal { .. } => RetryClass::Other,
        }
    }
}

/// A MongoDB driver error: labels, kinds, then codes (never message text).
impl crate::policy::Classify for mongodb::error::Error {
    fn class(&self) -> crate::policy::ErrorClass {
        if retryable(self) {
            crate::policy::ErrorClass::Transient
        } else {
            crate::policy::ErrorClass::Fatal
        }
    }

    /// By kind, then by the server's code ([`codes::retry_class`]): an I/O
    /// error is `connection` (`timeout` when it timed out), a cleared pool
    /// `connection`, no server to select `unavailable`.
    fn retry_class(&self) -> RetryClass {
        use mongodb::error::WriteFailure;
        match self.kind.as_ref() {
            ErrorKind::Io(io) => RetryClass::of_io(io),
            ErrorKind::ConnectionPoolCleared { .. } => RetryClass::Connection,
            ErrorKind::ServerSelection { .. } => RetryClass::Unavailable,
            ErrorKind::Command(command) => codes::retry_class(command.code),
            ErrorKind::Write(WriteFailure::WriteConcernError(wc)) => codes::retry_class(wc.code),
            ErrorKind::Write(WriteFailure::WriteError(we)) => codes::retry_class(we.code),
            _ => RetryClass::Other,
        }
    }
}
