//! MongoDB's error codes, and what each means for the write that got it.
//! Errors are sorted by code (and the driver's labels and kinds), never by
//! the text of their message.
//!
//! - **transient** ([`RETRYABLE_CODES`]): not primary, shutting down, network:
//!   retried forever with backoff;
//! - **fatal** ([`FATAL_CODES`]): nothing an event holds can cause it, and
//!   retrying cannot fix it (rights, credentials, the database or server set
//!   up unlike the processor needs): the process stops with what to do;
//! - **refusal**: every other code of a write command. The server refused
//!   what was written (a document over 16 MB, a value it does not take, a
//!   field name it does not allow): the events behind those documents are
//!   isolated and dead-lettered, the rest of their batch applies.

use super::mongo::StoreError;
use crate::policy::{RetryClass, Summarise, Summarised};

/// Server codes that mean "try again" (not primary, shutting down, network).
pub const RETRYABLE_CODES: &[i32] = &[
    6, 7, 89, 91, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436,
];

const GRANT: &str = "grant the MongoDB user readWrite on MONGODB_DB";
const SETUP: &str = "point MONGODB_DB at a database of plain collections the user may write";
const VERSION: &str = "use MongoDB 6, 7 or 8";
const MAJORITY: &str = "writes need w: majority: run MongoDB as a replica set";

/// Server codes that stop the process, each with what to do about it.
pub const FATAL_CODES: &[(i32, &str)] = &[
    (11, GRANT),                                                // UserNotFound
    (13, GRANT),                                                // Unauthorized
    (18, "check the credentials in MONGODB_URI"),               // AuthenticationFailed
    (20, SETUP),                                                // IllegalOperation
    (59, VERSION),                                              // CommandNotFound
    (72, MAJORITY),                                             // InvalidOptions
    (73, SETUP),                                                // InvalidNamespace
    (79, MAJORITY),                                             // UnknownReplWriteConcern
    (100, MAJORITY),                                            // UnsatisfiableWriteConcern
    (115, VERSION),                                             // CommandNotSupported
    (166, SETUP),                                               // CommandNotSupportedOnView
    (8000, "check the cluster's limits and the user's rights"), // AtlasError
    (13297, SETUP),                                             // DatabaseDifferCase
    (14031, "free disk space on the MongoDB server"),           // OutOfDiskSpace
];

/// What a server error code means for a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeClass {
    Transient,
    /// Stop; the advice says what to do.
    Fatal(&'static str),
    /// The written documents are at fault.
    Refusal,
}

pub fn classify(code: i32) -> CodeClass {
    if RETRYABLE_CODES.contains(&code) {
        return CodeClass::Transient;
    }
    match FATAL_CODES.iter().find(|(c, _)| *c == code) {
        Some((_, advice)) => CodeClass::Fatal(advice),
        None => CodeClass::Refusal,
    }
}

/// What kind of outage a transient server code is: network codes
/// `connection`, time limits `timeout`, shutting down and not primary
/// `unavailable`, a write conflict `conflict`.
pub fn retry_class(code: i32) -> RetryClass {
    match code {
        6 | 7 | 9001 => RetryClass::Connection, // HostUnreachable, HostNotFound, SocketException
        50 | 64 | 89 | 202 | 262 => RetryClass::Timeout, // MaxTimeMSExpired, WriteConcernFailed, NetworkTimeout, ..., ExceededTimeLimit
        91 | 189 | 10107 | 11600 | 11602 | 13435 | 13436 => RetryClass::Unavailable, // shutdown, stepped down, not primary
        112 => RetryClass::Conflict, // WriteConflict
        _ => RetryClass::Other,
    }
}

/// Longest server message kept in an error (messages can quote documents).
const MESSAGE_MAX: usize = 160;

/// `text` cut to at most `max` bytes at a character boundary (`...` marks a cut).
pub fn shorten(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max.saturating_sub(3);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// The error for a write to `collection` that the server failed with `code`.
pub fn write_error(collection: &str, code: i32, message: &str) -> StoreError {
    let message = shorten(message, MESSAGE_MAX);
    match classify(code) {
        CodeClass::Transient => StoreError::transient(
            retry_class(code),
            format!("writing {collection}: {message} (code {code})"),
        ),
        CodeClass::Fatal(advice) => StoreError::fatal(format!(
            "writing {collection}: {message} (code {code}): {advice}"
        )),
        CodeClass::Refusal => StoreError::Refused(Refusal {
            collection: collection.to_string(),
            code,
            message,
        }),
    }
}

/// How the message of a [`Refusal`] begins (and so the error of the dead
/// letter of an event the server refused): `verify` finds such letters by it.
pub const REFUSED: &str = "mongodb refused the write";

/// The server refused a write because of what it held.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("mongodb refused the write to {collection}: {message} (code {code})")]
pub struct Refusal {
    pub collection: String,
    pub code: i32,
    pub message: String,
}

/// The MongoDB driver's error, shown as [`describe`] summarises it: the
/// driver's own `Display` is its debug dump (hundreds of characters on one
/// line, labels and all).
pub type DriverError = Summarised<mongodb::error::Error>;

impl Summarise for mongodb::error::Error {
    fn summary(&self) -> String {
        describe(self)
    }
}

/// One short line for a driver error: its kind, code and message, without
/// the server's raw reply or the driver's debug output.
pub fn describe(err: &mongodb::error::Error) -> String {
    use mongodb::error::{ErrorKind, WriteFailure};
    let text = match err.kind.as_ref() {
        ErrorKind::Command(c) => format!(
            "{} (code {} {})",
            shorten(&c.message, MESSAGE_MAX),
            c.code,
            c.code_name
        ),
        ErrorKind::Write(WriteFailure::WriteError(w)) => {
            format!("{} (code {})", shorten(&w.message, MESSAGE_MAX), w.code)
        }
        ErrorKind::Write(WriteFailure::WriteConcernError(w)) => format!(
            "write concern: {} (code {})",
            shorten(&w.message, MESSAGE_MAX),
            w.code
        ),
        ErrorKind::Authentication { message, .. } => format!("authentication failed: {message}"),
        ErrorKind::Io(io) => io.to_string(),
        ErrorKind::ServerSelection { message, .. } => server_selection(message),
        other => other.to_string(),
    };
    shorten(&text, 2 * MESSAGE_MAX)
}

/// A server selection that timed out, in one line: the driver's message
/// describes the whole topology (debug output); only each server's address
/// and error are kept.
fn server_selection(message: &str) -> String {
    let servers: Vec<String> = message
        .split("Address: ")
        .skip(1)
        .filter_map(|server| {
            let (address, rest) = server.split_once(',')?;
            let error = rest.split_once("Error: ")?.1;
            let error = error.strip_prefix("Kind: ").unwrap_or(error);
            let error = error.split(", labels:").next().unwrap_or(error);
            Some(format!(
                "{address}: {}",
                error.trim_end_matches([' ', '}', ']'])
            ))
        })
        .collect();
    if servers.is_empty() {
        "no server available within the server selection timeout".to_string()
    } else {
        format!(
            "no server available within the server selection timeout ({})",
            servers.join("; ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_says_so_first() {
        let refusal = Refusal {
            collection: "users".into(),
            code: 2,
            message: "bad date".into(),
        };
        assert!(refusal.to_string().starts_with(REFUSED), "{refusal}");
    }

    #[test]
    fn codes_are_sorted_into_three_classes() {
        assert_eq!(classify(10107), CodeClass::Transient);
        assert_eq!(classify(13), CodeClass::Fatal(GRANT));
        assert_eq!(classify(17420), CodeClass::Refusal);
        assert_eq!(classify(2), CodeClass::Refusal);
        assert!(matches!(
            write_error("users", 10334, "too large"),
            StoreError::Refused(Refusal { code: 10334, .. })
        ));
        let fatal = write_error("users", 13, &"not authorized ".repeat(100)).to_string();
        assert!(fatal.len() < 250, "{fatal}");
        assert!(fatal.ends_with(GRANT), "{fatal}");
    }

    /// The driver's own words for a dead port (2.x), and a topology without
    /// a server error.
    #[test]
    fn a_server_selection_timeout_is_one_line() {
        let message = "Server selection timeout: No available servers. Topology: { Type: Single, \
            Servers: [ { Address: 127.0.0.1:1, Type: Unknown, Error: Kind: I/O error: Connection \
            refused (os error 111), labels: {\"RetryableError\", \"SystemOverloadedError\"}, \
            source: None, server response: None } ] }";
        assert_eq!(
            server_selection(message),
            "no server available within the server selection timeout \
             (127.0.0.1:1: I/O error: Connection refused (os error 111))"
        );
        assert_eq!(
            server_selection("Server selection timeout: None of the available servers suitable"),
            "no server available within the server selection timeout"
        );
    }

    /// Real driver errors: I/O errors by kind, and a server selection that
    /// times out on a dead port (`unavailable`, said in one line).
    #[tokio::test]
    async fn driver_errors_are_sorted_into_retry_classes() {
        use crate::policy::Classify;
        use std::io::{Error, ErrorKind};
        let io = |kind| mongodb::error::Error::from(Error::from(kind));
        assert_eq!(
            io(ErrorKind::ConnectionRefused).retry_class(),
            RetryClass::Connection
        );
        assert_eq!(io(ErrorKind::TimedOut).retry_class(), RetryClass::Timeout);
        let store = StoreError::from(io(ErrorKind::ConnectionReset));
        assert_eq!(store.retry_class(), RetryClass::Connection);
        assert_eq!(retry_class(10107), RetryClass::Unavailable);
        assert_eq!(retry_class(112), RetryClass::Conflict);
        assert_eq!(retry_class(89), RetryClass::Timeout);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        let port = listener.local_addr().expect("its address").port();
        drop(listener);
        let uri = format!(
            "mongodb://127.0.0.1:{port}/?directConnection=true&serverSelectionTimeoutMS=300"
        );
        let client = mongodb::Client::with_uri_str(&uri).await.expect("a client");
        let err = client
            .database("x")
            .run_command(mongodb::bson::doc! { "ping": 1 })
            .await
            .expect_err("nothing listens there");
        assert_eq!(err.retry_class(), RetryClass::Unavailable, "{err:?}");
        let line = describe(&err);
        assert!(line.starts_with("no server available"), "{line}");
        assert!(line.contains(&format!("127.0.0.1:{port}")), "{line}");
        assert!(!line.contains("Topology"), "{line}");
    }

    #[test]
    fn shorten_cuts_at_a_character_boundary() {
        assert_eq!(shorten("abc", 3), "abc");
        assert_eq!(shorten("abcdef", 5), "ab...");
        assert_eq!(shorten("ééééé", 6), "é...");
    }
}
