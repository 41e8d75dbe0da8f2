//! Sinks: where a batch's events take effect. The runtime ([`crate::runtime`])
//! hands each batch to its sink, and acknowledges the batch to its source only
//! after the sink said the effects are durable.
//!
//! Contract for every sink:
//! - [`Sink::apply`] applies one batch (its events and its malformed records,
//!   which the sink keeps as dead letters or refuses to pass on);
//! - `Ok` means the effects are durable: a crash after it loses nothing;
//! - the input is at-least-once: an event may come again (after a crash, a
//!   reconnect, a retry of the same batch), and applying it again must change
//!   nothing (the projections fence it; the Kafka topic takes a duplicate its
//!   consumers fence);
//! - `Err` is sorted by [`Classify`]: the runtime retries a transient error
//!   with the same batch, and stops on any other (an event at fault is
//!   dead-lettered inside the sink and reported, never returned as an error);
//! - the [`SinkReport`] says what became of every event.
//!
//! Sinks: [`MongoSink`] (the activity read models), [`KafkaSink`] (the relay's
//! Debezium-format topic), [`DiscardSink`] (nothing; for measuring a source).

pub mod deferral;
mod discard;
mod kafka;
mod mongo;

pub use discard::DiscardSink;
pub use kafka::KafkaSink;
pub use mongo::MongoSink;

use crate::dead_letter::DeadLetter;
use crate::decode::OutboxEvent;
use crate::policy::Classify;
use crate::source::SourceBatch;
use std::future::Future;

/// What one batch did in a sink.
#[derive(Debug, Default, Clone)]
pub struct SinkReport {
    /// Events that took effect.
    pub applied: usize,
    /// Events that had taken effect before (redelivered).
    pub duplicates: usize,
    /// Events of a type no handler takes (counted, skipped).
    pub unmatched: usize,
    /// Events (and malformed records) that will never apply.
    pub dead_letters: Vec<DeadLetter>,
    /// Of `dead_letters`, those written before (a re-delivered event that
    /// fails again): counted apart, not as new dead letters.
    pub letters_again: usize,
    /// Events whose aggregate does not exist yet: handed back to the source
    /// to try again later, with why.
    pub deferred: Vec<(OutboxEvent, String)>,
    /// Requests to the sink's server.
    pub round_trips: u32,
    pub documents_written: u64,
    /// Where the sink's time went.
    pub stages: crate::stages::StageTimes,
}

/// Where a batch's events take effect (see the module's contract).
pub trait Sink: Send {
    type Error: std::error::Error + Classify + Send + Sync + 'static;

    /// The crash points around this sink's write (`failpoint`).
    const CRASH_POINTS: crate::runtime::CrashPoints = crate::runtime::CrashPoints::RUN;

    /// What this sink's outages are counted and checked as (`/readyz`).
    const COMPONENT: crate::observe::Component = crate::observe::Component::Mongodb;

    /// Applies one batch; `Ok` once its effects are durable.
    fn apply<A: Sync>(
        &mut self,
        batch: &SourceBatch<A>,
    ) -> impl Future<Output = Result<SinkReport, Self::Error>> + Send;

    /// The sink keeps its writes in order across batches on its own (the
    /// Kafka producer: one ordered queue per partition), so a batch may be
    /// handed over ([`Sink::write_ahead`]) before the one before it is
    /// durable; [`Sink::apply`] then only waits for it.
    const WRITES_AHEAD: bool = false;

    /// Starts writing `batch`, the next one [`Sink::apply`] will get, while
    /// the batch before it may still be on its way. Best effort: whatever
    /// fails here, `apply` does again (a repeat the consumers fence).
    fn write_ahead<A: Sync>(&mut self, _batch: &SourceBatch<A>) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// A graceful stop may abandon a write in flight (it is not
    /// acknowledged, so it comes again): for a sink whose write can wait for
    /// a server indefinitely.
    fn interruptible(&self) -> bool {
        false
    }

    /// Called once, when the runtime stops.
    fn close(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }
}
