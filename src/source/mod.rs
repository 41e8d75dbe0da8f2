//! Capture: where events come from. Each source yields batches of decoded
//! events together with the acknowledgement that moves it past them, a value
//! of the source's own type ([`Source::Ack`]); the runtime
//! ([`crate::runtime`]) acknowledges a batch only after the sink durably
//! holds its effects. No source touches the sink's store.
//!
//! Contract for every source:
//! - at-least-once: an event may come again (after a restart, a reconnect, a
//!   rebalance); the projections fence duplicates, so a source never needs to
//!   de-duplicate;
//! - per-aggregate order: the events of one aggregate come in `sequence_id`
//!   order (across aggregates any order is fine);
//! - acknowledge after durable: [`Source::ack`] is the only thing that may move
//!   the source's persistent position (slot LSN, outbox status, Kafka offset),
//!   and the runtime calls it, in batch order, only for batches whose effects
//!   are durable.

pub mod kafka;
pub mod polling;
pub mod replication;

use crate::dead_letter::DeadLetter;
use crate::decode::OutboxEvent;
use crate::policy::{Classify, ErrorClass, RetryClass};

/// A batch of events from a source, with the acknowledgement (`A`, the
/// source's own [`Source::Ack`]) that moves the source past it.
#[derive(Debug, Clone)]
pub struct SourceBatch<A> {
    pub events: Vec<OutboxEvent>,
    /// Records that could not be decoded: dead-lettered by the sink with
    /// their raw form, never dropped.
    pub malformed: Vec<DeadLetter>,
    pub ack: A,
    /// Per event, where it comes from; empty when every event is a change.
    pub origins: Vec<Origin>,
    /// Events of the batch handed out again after the sink deferred them.
    pub retried: Vec<Retried>,
    /// Per event, when its transaction committed, where the carrier says it
    /// (pgoutput's `Begin`, the Kafka record's timestamp); empty when the
    /// source does not know it, and then the event's `created_at` stands in.
    pub committed: Vec<Option<chrono::DateTime<chrono::Utc>>>,
}

/// Which batch `events` are, for matching work begun ahead of a batch's
/// `apply` with the batch itself: their number and first and last event.
pub type BatchId = (usize, Option<uuid::Uuid>, Option<uuid::Uuid>);

pub fn batch_id(events: &[OutboxEvent]) -> BatchId {
    (
        events.len(),
        events.first().map(|e| e.event_id),
        events.last().map(|e| e.event_id),
    )
}

/// An event handed out again after the sink deferred it (its aggregate did
/// not exist yet): its tries so far and why the last one failed.
#[derive(Debug, Clone, PartialEq)]
pub struct Retried {
    pub event_id: uuid::Uuid,
    pub attempts: u32,
    pub error: String,
}

impl<A> SourceBatch<A> {
    /// A batch of changes.
    pub fn new(events: Vec<OutboxEvent>, malformed: Vec<DeadLetter>, ack: A) -> SourceBatch<A> {
        SourceBatch {
            events,
            malformed,
            ack,
            origins: Vec::new(),
            retried: Vec::new(),
            committed: Vec::new(),
        }
    }

    /// When event `index` was committed: the carrier's commit time, or the
    /// event's `created_at` where the carrier does not say it.
    pub fn commit_time(&self, index: usize) -> Option<chrono::DateTime<chrono::Utc>> {
        self.committed
            .get(index)
            .copied()
            .flatten()
            .or_else(|| self.events.get(index).and_then(|event| event.created_at))
    }

    /// Every event's commit time, in batch order (see [`Self::commit_time`]).
    pub fn commit_times(&self) -> Vec<Option<chrono::DateTime<chrono::Utc>>> {
        (0..self.events.len())
            .map(|index| self.commit_time(index))
            .collect()
    }

    /// Where event `index` comes from.
    pub fn origin(&self, index: usize) -> Origin {
        self.origins.get(index).copied().unwrap_or(Origin::Change)
    }
}

/// Where an event comes from: a change committed while the source ran, or a
/// row of an initial snapshot (Debezium's operation `r`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Change,
    Snapshot(SnapshotMark),
}

/// A snapshot row's place in its snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotMark {
    First,
    Middle,
    Last,
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
    /// Connection lost, server restarting...: reconnect with backoff. Its
    /// retry class is `other`: [`SourceError::transient`] says the kind.
    #[error("{0}")]
    Transient(String),
    /// Misconfiguration or a state that retrying cannot fix: stop with this message.
    #[error("{0}")]
    Fatal(String),
    /// A call the source made failed: `what` it was doing, the cause's class
    /// and kind of outage, and the cause when there is one (its text is not
    /// repeated in `what`).
    #[error("{what}")]
    Failed {
        what: String,
        class: ErrorClass,
        retry: RetryClass,
        #[source]
        cause: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl SourceError {
    /// `cause`, sorted by its own class (a permanent one stops a source: no
    /// event is at fault).
    pub fn failed<E>(what: impl Into<String>, cause: E) -> SourceError
    where
        E: Classify + std::error::Error + Send + Sync + 'static,
    {
        let class = match cause.class() {
            ErrorClass::Transient => ErrorClass::Transient,
            _ => ErrorClass::Fatal,
        };
        SourceError::Failed {
            what: what.into(),
            class,
            retry: cause.retry_class(),
            cause: Some(Box::new(cause)),
        }
    }

    /// A transient failure of the kind `retry`, said in `text`.
    pub fn transient(retry: RetryClass, text: impl Into<String>) -> SourceError {
        SourceError::Failed {
            what: text.into(),
            class: ErrorClass::Transient,
            retry,
            cause: None,
        }
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
    ) -> Result<Option<SourceBatch<Self::Ack>>, SourceError>;

    /// [`Source::next_batch`] read on while the sink is still applying the
    /// batch before ([`Source::fetch_ahead`]): until `applied` is cancelled
    /// the batch goes on taking what arrives (up to `max_events`), instead of
    /// ending when the source is briefly quiet, so that it holds everything
    /// that came during the apply; once `applied`, it ends as soon as nothing
    /// more is waiting. A source that cannot tell takes its usual batch.
    async fn next_batch_reading_on(
        &mut self,
        max_events: usize,
        max_wait: std::time::Duration,
        applied: &tokio_util::sync::CancellationToken,
    ) -> Result<Option<SourceBatch<Self::Ack>>, SourceError> {
        let _ = applied;
        self.next_batch(max_events, max_wait).await
    }

    /// What acknowledges a batch of this source (its position): a type of
    /// its own, so that no other source's position can be handed to it.
    type Ack: Clone + std::fmt::Debug + Send + Sync;

    /// The batch with this acknowledgement is durable in the sink (with these
    /// dead letters and retries): move the persistent position past it.
    async fn ack(&mut self, ack: Self::Ack, outcome: &BatchOutcome) -> Result<(), SourceError>;

    /// The WAL position an acknowledgement stands for, if it is one: the
    /// runtime saves it as the MongoDB checkpoint before acknowledging.
    fn lsn_of(_ack: &Self::Ack) -> Option<u64> {
        None
    }

    /// Called while idle: keep the upstream position alive (e.g. confirm the
    /// slot so the database does not retain WAL).
    async fn idle(&mut self) -> Result<(), SourceError> {
        Ok(())
    }

    /// The next batch may be taken before the last one handed out is
    /// acknowledged (acknowledgements still come in batch order): the
    /// runtime then reads it while the sink is still delivering the last one
    /// (and hands it to the sink at once when the sink writes ahead,
    /// [`crate::sink::Sink::WRITES_AHEAD`]).
    fn fetch_ahead(&self) -> bool {
        false
    }

    /// The last batch ended inside a transaction: on a graceful stop, the
    /// pipeline takes batches until this is false, so that the position it
    /// acknowledges last covers everything it applied (a restart then
    /// re-delivers nothing already applied).
    fn mid_transaction(&self) -> bool {
        false
    }

    /// A graceful stop: make sure the upstream holds the last acknowledged
    /// position before the process exits (a restart then re-delivers nothing
    /// already applied). Best effort: a failure is logged, never an error.
    async fn close(&mut self) {}

    /// True once every event committed before the source started has been
    /// delivered and acknowledged (for `run --until-caught-up`).
    async fn caught_up(&mut self) -> Result<bool, SourceError>;

    /// What is left to do, if the source can tell cheaply.
    async fn backlog(&mut self) -> Result<Backlog, SourceError> {
        Ok(Backlog::default())
    }
}

impl Classify for SourceError {
    fn class(&self) -> ErrorClass {
        match self {
            SourceError::Transient(_) => ErrorClass::Transient,
            SourceError::Fatal(_) => ErrorClass::Fatal,
            SourceError::Failed { class, .. } => *class,
        }
    }

    fn retry_class(&self) -> RetryClass {
        match self {
            SourceError::Failed { retry, .. } => *retry,
            SourceError::Transient(_) | SourceError::Fatal(_) => RetryClass::Other,
        }
    }
}
