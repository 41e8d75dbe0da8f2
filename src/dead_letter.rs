//! Dead letters: events that will never apply, kept with why. Sources make
//! them of records that do not decode; sinks of events that cannot take
//! effect; the runtime hands them back to the source (an outbox row becomes
//! `failed`).

use crate::decode::OutboxEvent;

/// An event that will never apply, with why.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub event: OutboxEvent,
    pub error: String,
    pub attempts: u32,
}
