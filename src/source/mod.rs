//! Capture: where events come from. Each source yields batches of decoded
//! events together with the token that acknowledges them; the pipeline
//! acknowledges a batch only after MongoDB durably holds its effects.
//!
//! Contract for every source:
//! - at-least-once: an event may come again (after a restart, a reconnect, a
//!   rebalance); the projections fence duplicates, so a source never needs to
//!   de-duplicate;
//! - per-aggregate order: the events of one aggregate come in `sequence_id`
//!   order (across aggregates any order is fine);
//! - acknowledge after durable: [`Source::ack`] is the only thing that may move
//!   the source's persistent position (slot LSN, outbox status, Kafka offset),
//!   and the pipeline calls it, in batch order, only for batches whose effects
//!   are durable.

pub mod kafka;
pub mod polling;
pub mod replication;

use crate::decode::OutboxEvent;
use crate::projection::DeadLetter;

/// What a batch's acknowledgement carries back to its source.
#[derive(Debug, Clone, PartialEq)]
pub enum AckToken {
    /// Logical replication: the end LSN of the last transaction in the batch.
    Lsn(u64),
    /// Polling: the claimed rows, by event id, with the claim's lock id.
    Claimed {
        lock_id: String,
        event_ids: Vec<uuid::Uuid>,
    },
    /// Kafka: per (topic, partition), the highest offset of the batch.
    Kafka(kafka::KafkaAck),
}

/// A batch of events from a source.
#[derive(Debug, Clone)]
pub struct SourceBatch {
    pub events: Vec<OutboxEvent>,
    /// Records that could not be decoded: dead-lettered by the pipeline with
    /// their raw form, never dropped.
    pub malformed: Vec<DeadLetter>,
    pub ack: AckToken,
}

/// What the pipeline did with a batch, for the source's bookkeeping.
#[derive(Debug, Clone, Default)]
pub struct BatchOutcome {
    /// Dead-lettered events (the outbox row becomes `failed`).
    pub dead_letters: Vec<DeadLetter>,
    /// Events to try again later (outbox `retry`), with the error.
    pub retry: Vec<(OutboxEvent, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Connection lost, server restarting...: reconnect with backoff.
    #[error("{0}")]
    Transient(String),
    /// Misconfiguration or a state that retrying cannot fix: stop with this message.
    #[error("{0}")]
    Fatal(String),
}

impl SourceError {
    pub fn is_transient(&self) -> bool {
        matches!(self, SourceError::Transient(_))
    }
}

/// Progress of a source against the outbox, for `status` and the progress line.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Backlog {
    /// Events committed but not yet acknowledged, when the source can tell.
    pub remaining: Option<u64>,
}

/// One capture method.
#[allow(async_fn_in_trait)]
pub trait Source {
    /// The next batch of at most `max_events`, waiting at most `max_wait` for
    /// the first one. `Ok(None)`: nothing arrived in time (the pipeline uses
    /// the pause to acknowledge and report progress).
    async fn next_batch(
        &mut self,
        max_events: usize,
        max_wait: std::time::Duration,
    ) -> Result<Option<SourceBatch>, SourceError>;

    /// The batch with this token is durable in MongoDB (with these dead letters
    /// and retries): move the persistent position past it.
    async fn ack(&mut self, token: AckToken, outcome: &BatchOutcome) -> Result<(), SourceError>;

    /// Called while idle: keep the upstream position alive (e.g. confirm the
    /// slot so the database does not retain WAL).
    async fn idle(&mut self) -> Result<(), SourceError> {
        Ok(())
    }

    /// The last batch ended inside a transaction: on a graceful stop, the
    /// pipeline takes batches until this is false, so that the position it
    /// acknowledges last covers everything it applied (a restart then
    /// re-delivers nothing already applied).
    fn mid_transaction(&self) -> bool {
        false
    }

    /// True once every event committed before the source started has been
    /// delivered and acknowledged (for `run --until-caught-up`).
    async fn caught_up(&mut self) -> Result<bool, SourceError>;

    /// What is left to do, if the source can tell cheaply.
    async fn backlog(&mut self) -> Result<Backlog, SourceError> {
        Ok(Backlog::default())
    }
}
