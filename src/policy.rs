//! Failure policy (docs/design.md section 6): how each error is sorted, and the
//! backoff between retries of transient ones.

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

/// The one place errors are sorted.
pub trait Classify {
    fn class(&self) -> ErrorClass;
}

impl Classify for crate::store::mongo::StoreError {
    fn class(&self) -> ErrorClass {
        use crate::store::mongo::StoreError;
        match self {
            StoreError::Transient { .. } => ErrorClass::Transient,
            // The written documents are at fault: their events are isolated
            // and dead-lettered (`projection::isolate`).
            StoreError::Refused(_) => ErrorClass::Permanent,
            StoreError::Fatal { .. } => ErrorClass::Fatal,
        }
    }
}

impl Classify for crate::source::SourceError {
    fn class(&self) -> ErrorClass {
        if self.is_transient() {
            ErrorClass::Transient
        } else {
            ErrorClass::Fatal
        }
    }
}

impl Classify for crate::route::HandlerError {
    fn class(&self) -> ErrorClass {
        ErrorClass::Permanent
    }
}

impl Classify for crate::decode::DecodeError {
    fn class(&self) -> ErrorClass {
        ErrorClass::Permanent
    }
}

impl Classify for tokio_postgres::Error {
    fn class(&self) -> ErrorClass {
        use tokio_postgres::error::SqlState;
        match self.code() {
            None => ErrorClass::Transient,
            Some(code)
                if code == &SqlState::ADMIN_SHUTDOWN
                    || code == &SqlState::CRASH_SHUTDOWN
                    || code == &SqlState::CANNOT_CONNECT_NOW
                    || code == &SqlState::T_R_SERIALIZATION_FAILURE
                    || code == &SqlState::T_R_DEADLOCK_DETECTED
                    || code == &SqlState::TOO_MANY_CONNECTIONS =>
            {
                ErrorClass::Transient
            }
            Some(_) => ErrorClass::Fatal,
        }
    }
}

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
