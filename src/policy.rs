//! Failure policy (docs/design.md section 6): the classes an error is sorted
//! into, and the backoff between retries of transient ones. A leaf module:
//! the error types implement [`Classify`] where they are defined.

use rand::Rng;
use std::time::Duration;

/// What to do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Database or network down, server restarting, not primary: retry with
    /// backoff, forever; never dead-letter for it.
    Transient,
    /// The event itself is wrong: dead-letter it (after `MAX_RETRIES` when an
    /// ordering race could explain it) and go on.
    Permanent,
    /// Nothing retrying can fix (misconfiguration, foreign data in the read
    /// models): stop with an operator-facing message.
    Fatal,
}

/// The one classification of errors: each error type implements it beside
/// its definition (by codes and kinds, never message text), and every call
/// site that can retry, dead-letter or stop decides with it (the runtime's
/// [`crate::runtime::Retry`] and the sinks).
pub trait Classify {
    fn class(&self) -> ErrorClass;

    /// For a transient error, what kind of outage it is (the `class` of
    /// `event_processor_retries_total`); [`RetryClass::Other`] unless the
    /// type can tell.
    fn retry_class(&self) -> RetryClass {
        RetryClass::Other
    }
}

/// What kind of outage a retried error is, as an operator acts on it: a
/// bounded set, the `class` label of `event_processor_retries_total`
/// (docs/operating.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RetryClass {
    /// The connection could not be made or was lost: refused, reset, closed
    /// by the peer, a name that does not resolve (look at the network and
    /// whether the server runs).
    Connection,
    /// No answer in time (a frozen or overloaded server, a partition).
    Timeout,
    /// The server answered that it cannot serve now: starting up, shutting
    /// down, the connection ended by an administrator, too many
    /// connections, not primary, no server fit to select.
    Unavailable,
    /// Another writer or process was in the way: a serialization failure, a
    /// deadlock, a write conflict, the slot or its ownership held elsewhere.
    Conflict,
    /// Anything else retried.
    Other,
}

impl RetryClass {
    pub const ALL: [RetryClass; 5] = [
        RetryClass::Connection,
        RetryClass::Timeout,
        RetryClass::Unavailable,
        RetryClass::Conflict,
        RetryClass::Other,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            RetryClass::Connection => "connection",
            RetryClass::Timeout => "timeout",
            RetryClass::Unavailable => "unavailable",
            RetryClass::Conflict => "conflict",
            RetryClass::Other => "other",
        }
    }

    /// An I/O error of a connection, by its kind: timed out, or else the
    /// connection itself (refused, reset, aborted, a name not resolved...).
    pub fn of_io(err: &std::io::Error) -> RetryClass {
        match err.kind() {
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => RetryClass::Timeout,
            _ => RetryClass::Connection,
        }
    }

    /// The first I/O error among `err` and its causes, by [`Self::of_io`].
    pub fn of_io_cause(err: &(dyn std::error::Error + 'static)) -> Option<RetryClass> {
        let mut cause = Some(err);
        while let Some(next) = cause {
            if let Some(io) = next.downcast_ref::<std::io::Error>() {
                return Some(RetryClass::of_io(io));
            }
            cause = next.source();
        }
        None
    }
}

impl Classify for std::convert::Infallible {
    fn class(&self) -> ErrorClass {
        match *self {}
    }
}

/// An error and its causes, on one line (for logs; a stop prints the chain
/// itself).
pub fn describe(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(next) = cause {
        let more = next.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = next.source();
    }
    text
}

/// A library error whose own `Display` is no good on one line (a debug
/// dump, or a cause repeated), as its one-line [`Summarise::summary`].
pub trait Summarise {
    fn summary(&self) -> String;
}

/// A library's error shown as its summary; `Debug` and [`Summarised::get`]
/// give all of it.
pub struct Summarised<E>(pub E);

impl<E> Summarised<E> {
    /// The library's error itself.
    pub fn get(&self) -> &E {
        &self.0
    }
}

impl<E: Summarise> std::fmt::Display for Summarised<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.summary())
    }
}

impl<E: std::fmt::Debug> std::fmt::Debug for Summarised<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.0, f)
    }
}

impl<E: Summarise + std::fmt::Debug> std::error::Error for Summarised<E> {}

/// Capped exponential backoff with jitter (each pause between half and all of
/// its ceiling), so that many processes do not retry in step.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial: initial.max(Duration::from_millis(1)),
            max: max.max(initial),
            attempt: 0,
        }
    }

    /// The next pause: random in `[c/2, c]` with `c = min(max, initial * 2^attempt)`.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .initial
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let millis = ceiling.as_millis().max(1) as u64;
        Duration::from_millis(rand::thread_rng().gen_range(millis / 2..=millis))
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_are_sorted_by_kind() {
        use std::io::{Error, ErrorKind};
        for kind in [
            ErrorKind::ConnectionRefused,
            ErrorKind::ConnectionReset,
            ErrorKind::ConnectionAborted,
            ErrorKind::BrokenPipe,
            ErrorKind::UnexpectedEof,
            ErrorKind::Other,
        ] {
            assert_eq!(
                RetryClass::of_io(&Error::from(kind)),
                RetryClass::Connection
            );
        }
        assert_eq!(
            RetryClass::of_io(&Error::from(ErrorKind::TimedOut)),
            RetryClass::Timeout
        );
        // Found below a wrapper.
        #[derive(Debug, thiserror::Error)]
        #[error("wrapped")]
        struct Wrapped(#[source] Error);
        let wrapped = Wrapped(Error::from(ErrorKind::TimedOut));
        assert_eq!(RetryClass::of_io_cause(&wrapped), Some(RetryClass::Timeout));
        assert_eq!(
            RetryClass::of_io_cause(&std::fmt::Error),
            None,
            "no I/O error at all"
        );
        let labels: Vec<_> = RetryClass::ALL.iter().map(|c| c.label()).collect();
        assert_eq!(
            labels,
            ["connection", "timeout", "unavailable", "conflict", "other"]
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<Duration> = (0..10).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] <= Duration::from_millis(100));
        assert!(delays[0] >= Duration::from_millis(50));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)));
        assert!(delays[9] >= Duration::from_secs(1), "{delays:?}");
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
