//! Dead letters: events that will never apply, kept with why. Sources make
//! them of records that do not decode; sinks of events that cannot take
//! effect; the runtime hands them back to the source (an outbox row becomes
//! `failed`).
//!
//! Once written (`dead_letters`, see `projection::letters`), an operator
//! manages them ([`records`], [`audit`], [`manage`]): a letter is *retried*
//! by re-emitting its event at the end of the outbox ([`reemit`]), or
//! *discarded* with a reason; either way it moves to the audit collection,
//! never deleted silently (README, "Dead letters").

pub mod audit;
pub mod manage;
pub mod records;
pub mod reemit;

use crate::decode::OutboxEvent;

/// An event that will never apply, with why.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub event: OutboxEvent,
    pub error: String,
    pub attempts: u32,
}
