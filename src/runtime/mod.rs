//! The runtime: one loop that ties a [`Source`] to a [`Sink`], used by `run`
//! (replication, polling and Kafka sources into the MongoDB sink, or the
//! discard sink) and by `relay` (replication or polling into the Kafka sink).
//!
//! Order of a batch, and why: the sink's effects (and dead letters) first;
//! then the checkpoint and the outbox marks, which describe effects that are
//! now durable; the source's acknowledgement last. A crash anywhere
//! re-delivers the batch, which the sink absorbs (see docs/design.md, "The
//! runtime").
//!
//! Every error is sorted by [`crate::policy::Classify`]: a transient one is
//! retried with backoff, forever ([`Retry`]); an event at fault is
//! dead-lettered inside the sink; anything else stops the runtime with
//! [`PipelineError`]. A shutdown request stops intake; the batch in flight
//! is finished, or abandoned unacknowledged during a retry's pause.

mod crash_points;
mod deliver;
mod marker;
mod observed;
mod progress;
mod retry;
mod settle;

pub use crate::counters::Stats;
pub use crash_points::CrashPoints;
pub use marker::{MarkError, OutboxMarker};
pub use retry::{Outage, Retry};

use crate::checkpoint::MongoCheckpoint;
use crate::config::{PipelineConfig, SourceKind};
use crate::observe::Component;
use crate::policy::{describe, Classify, ErrorClass};
use crate::sink::{Sink, SinkReport};
use crate::source::{BatchOutcome, Source, SourceBatch};
use crate::stages::{Stage, StageTimes};
use crate::stats_file::StatsFile;
use crash_points::crash_at;
use progress::Progress;
use std::sync::Arc;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// Why the runtime stopped before it was asked to.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// Retrying cannot fix this: `what` says what failed and what to do.
    #[error("{what}")]
    Stopped {
        what: String,
        #[source]
        cause: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl PipelineError {
    fn stop(
        what: impl Into<String>,
        cause: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        PipelineError::Stopped {
            what: what.into(),
            cause: Box::new(cause),
        }
    }
}

/// What the workers of one process share.
#[derive(Clone)]
pub struct Shared {
    pub config: PipelineConfig,
    /// Which capture feeds the workers (the `source` label of the metrics).
    pub source: SourceKind,
    /// Cancelled on the first signal: stop intake.
    pub shutdown: CancellationToken,
    pub stats: Arc<Stats>,
    /// Stop once everything committed before the start is done.
    pub until_caught_up: bool,
    /// The stats file (`durable` after each sink write, `batch_done` after
    /// counting).
    pub stats_file: Option<Arc<StatsFile>>,
    /// The checks `/readyz` shows, and the liveness tick of `/healthz`.
    pub health: crate::observe::Health,
    /// The LSN of the last acknowledged batch (sources with LSNs).
    pub durable_lsn: Arc<std::sync::atomic::AtomicU64>,
    /// Events acknowledged so far.
    pub acknowledged: Arc<std::sync::atomic::AtomicU64>,
}

/// A batch taken from the source and not applied yet, with its events'
/// commit times and the time its stages took so far.
/// Where the sink writes ahead and the source hands out ahead, the runtime
/// holds one such batch while it takes the next: the next batch is read and
/// handed to the sink while this one is being delivered, and batches are
/// still applied, saved and acknowledged one by one, in order (see
/// docs/design.md, "The runtime").
struct Held<A> {
    batch: SourceBatch<A>,
    committed: Vec<Option<chrono::DateTime<chrono::Utc>>>,
    stages: StageTimes,
}

/// What the source handed out while the last batch was delivered, and how
/// long the runtime waited for it after that delivery.
struct ReadOn<A> {
    fetched: Result<Option<SourceBatch<A>>, crate::source::SourceError>,
    waited: std::time::Duration,
}

/// A batch whose effects are durable and whose outbox marks are committing:
/// where the runtime works ahead, it takes and writes the next batch while
/// they do, and acknowledges this one after (see docs/design.md, "The
/// runtime").
struct Settling<A> {
    batch: SourceBatch<A>,
    committed: Vec<Option<chrono::DateTime<chrono::Utc>>>,
    report: SinkReport,
    outcome: BatchOutcome,
    outcomes: Vec<Option<crate::observe::Outcome>>,
    stages: StageTimes,
}

/// One worker: a source, a sink, and what lies between.
pub struct Pipeline<S: Source, K: Sink> {
    source: S,
    sink: K,
    checkpoint: Option<MongoCheckpoint>,
    marker: Option<OutboxMarker>,
    /// The batch delivered last, still to acknowledge (working ahead only).
    settling: Option<Settling<S::Ack>>,
    shared: Shared,
    retry: Retry,
    report_progress: bool,
}

impl<S: Source, K: Sink> Pipeline<S, K> {
    pub fn new(source: S, sink: K, shared: &Shared) -> Pipeline<S, K> {
        Pipeline {
            source,
            sink,
            checkpoint: None,
            marker: None,
            settling: None,
            retry: Retry::new(&shared.config, shared.shutdown.clone())
                .with_health(shared.health.clone()),
            shared: shared.clone(),
            report_progress: true,
        }
    }

    /// Saves each acknowledged LSN ([`Source::lsn_of`]) here first.
    pub fn with_checkpoint(mut self, checkpoint: Option<MongoCheckpoint>) -> Self {
        self.checkpoint = checkpoint;
        self
    }

    /// Marks each batch's outbox rows before acknowledging it.
    pub fn with_marker(mut self, marker: Option<OutboxMarker>) -> Self {
        self.marker = marker;
        self
    }

    /// Another worker of the process prints the progress line.
    pub fn quiet(mut self) -> Self {
        self.report_progress = false;
        self
    }

    /// Runs until shutdown (or, with `until_caught_up`, until caught up).
    pub async fn run(mut self) -> Result<(), PipelineError> {
        let mut progress = Progress::new(self.shared.stats.clone());
        let result = self.intake(&mut progress).await;
        if result.is_ok() {
            self.mark_late().await;
            self.source.close().await;
        }
        self.sink.close().await;
        if self.report_progress {
            progress.finish();
        }
        result
    }

    async fn intake(&mut self, progress: &mut Progress) -> Result<(), PipelineError> {
        let mut backoff = self.retry.backoff();
        let mut outage = Outage::new(source_component(self.shared.source), "source unavailable");
        let (size, wait) = (self.shared.config.batch_size, self.shared.config.batch_wait);
        // A batch taken, and written ahead, but not applied yet: the next
        // batch is taken while it is being delivered (see `Held`).
        let mut held: Option<Held<S::Ack>> = None;
        // The next batch, read while the last one was delivered (see
        // `finish_reading_on`), and how long its reading outlasted that.
        let mut read_on: Option<ReadOn<S::Ack>> = None;
        loop {
            self.shared.health.tick();
            if held.is_some() && !self.ahead() {
                if let Some(batch) = held.take() {
                    if !self.finish(batch, false).await? {
                        return Ok(());
                    }
                }
            }
            // A transaction half applied is finished first, so that the last
            // acknowledged position covers it (a second signal still stops at once).
            if self.shared.shutdown.is_cancelled()
                && !self.source.mid_transaction()
                && read_on.is_none()
            {
                if let Some(batch) = held.take() {
                    self.finish(batch, false).await?;
                }
                self.settle_earlier().await?;
                tracing::info!("intake stopped");
                return Ok(());
            }
            self.mark_late().await;
            let asked = Instant::now();
            // With a batch on its way, take only what is there already: its
            // acknowledgement must not wait for a quiet source.
            let wait = if held.is_some() {
                std::time::Duration::ZERO
            } else {
                wait
            };
            let (fetched, waited) = match read_on.take() {
                Some(ReadOn { fetched, waited }) => (fetched, Some(waited)),
                None => (self.source.next_batch(size, wait).await, None),
            };
            if !matches!(fetched, Ok(Some(_))) {
                // Nothing new (or a failure): the batch on its way is
                // finished first.
                if let Some(batch) = held.take() {
                    if !self.finish(batch, false).await? {
                        return Ok(());
                    }
                    if matches!(fetched, Ok(None)) {
                        continue;
                    }
                }
                // A batch read on and left settling is acknowledged now,
                // not when the next batch comes.
                if !self.settle_earlier().await? {
                    return Ok(());
                }
            }
            match fetched {
                Ok(Some(batch)) => {
                    let mut stages = StageTimes::default();
                    stages.add(Stage::Source, waited.unwrap_or_else(|| asked.elapsed()));
                    crash_at(K::CRASH_POINTS.after_decode);
                    backoff.reset();
                    outage.recovered(&self.retry);
                    let committed = batch.commit_times();
                    observed::received(
                        self.shared.source,
                        &batch.events,
                        &committed,
                        batch.malformed.len(),
                    );
                    if K::WRITES_AHEAD {
                        let started = Instant::now();
                        self.sink.write_ahead(&batch).await;
                        // Its rows' update too, uncommitted until it is durable.
                        if let Some(marker) = self.marker.as_mut() {
                            marker.begin(&batch.events).await;
                        }
                        stages.lap(Stage::Write, started);
                    }
                    let batch = Held {
                        batch,
                        committed,
                        stages,
                    };
                    // The earlier batch's acknowledgement waits for its
                    // marks, which commit while this one is being delivered.
                    if let Some(earlier) = held.take() {
                        if !self.finish(earlier, true).await? {
                            return Ok(());
                        }
                    }
                    if self.ahead() {
                        held = Some(batch);
                    } else if self.source.fetch_ahead() && !self.shared.shutdown.is_cancelled() {
                        // Once stopping, nothing more is read ahead: the
                        // batch read on is applied and intake stops.
                        match self.finish_reading_on(batch, size, wait).await? {
                            Some(next) => read_on = Some(next),
                            None => return Ok(()),
                        }
                    } else if !self.finish(batch, false).await? {
                        return Ok(());
                    }
                }
                Ok(None) => {
                    backoff.reset();
                    outage.recovered(&self.retry);
                    if self.idle().await? {
                        return Ok(());
                    }
                }
                Err(err) if err.class() == ErrorClass::Transient => {
                    let error = describe(&err);
                    let class = err.retry_class();
                    if !outage
                        .failed(&self.retry, &error, class, &mut backoff)
                        .await
                    {
                        return Ok(());
                    }
                }
                Err(err) => return Err(PipelineError::stop("the source stopped", err)),
            }
            if self.report_progress {
                progress.tick(&mut self.source).await;
            }
        }
    }

    /// The next batch may be taken before the last one is applied: the sink
    /// writes ahead and the source can hand out batches ahead.
    fn ahead(&self) -> bool {
        K::WRITES_AHEAD && self.source.fetch_ahead()
    }

    /// Applies a batch taken earlier and acknowledges it, after the batch
    /// left settling before it; with `keep` (working ahead) its own
    /// acknowledgement waits until the next batch is delivered, while its
    /// marks commit. `false`: shutdown came first.
    async fn finish(&mut self, held: Held<S::Ack>, keep: bool) -> Result<bool, PipelineError> {
        let delivered = self.delivery().deliver_held::<S>(held).await?;
        self.delivered(delivered, keep).await
    }

    /// After a batch's delivery: the batch left settling before it is
    /// acknowledged, then this one, or with `keep` it is left settling in
    /// turn. `false`: shutdown came first (`None`: the delivery was cut
    /// short).
    async fn delivered(
        &mut self,
        delivered: Option<Settling<S::Ack>>,
        keep: bool,
    ) -> Result<bool, PipelineError> {
        let Some(delivered) = delivered else {
            // The batch before it is durable and marked: it is acknowledged.
            self.settle_earlier().await?;
            return Ok(false);
        };
        if !self.settle_earlier().await? {
            return Ok(false);
        }
        if keep {
            self.settling = Some(delivered);
            return Ok(true);
        }
        self.settle(delivered).await
    }

    /// Every part a delivery uses, borrowed apart from the source.
    fn parts(&mut self) -> (&mut S, deliver::Delivery<'_, K>) {
        let delivery = deliver::Delivery {
            sink: &mut self.sink,
            checkpoint: self.checkpoint.as_ref(),
            marker: &mut self.marker,
            shared: &self.shared,
            retry: &self.retry,
        };
        (&mut self.source, delivery)
    }

    fn delivery(&mut self) -> deliver::Delivery<'_, K> {
        self.parts().1
    }

    /// Applies a batch, reading the next batch from the source while the
    /// sink delivers this one (the source hands out ahead, and the sink
    /// applies batches one after another; the next batch holds what arrived
    /// until this one is delivered), then acknowledges the batch
    /// before it; this one is left settling until the next is delivered (or
    /// the source goes quiet, or intake stops). `None`: shutdown came first
    /// (what was read ahead comes again after a start).
    async fn finish_reading_on(
        &mut self,
        held: Held<S::Ack>,
        size: usize,
        wait: std::time::Duration,
    ) -> Result<Option<ReadOn<S::Ack>>, PipelineError> {
        let (source, mut delivery) = self.parts();
        // The batch read on takes what comes until this one is delivered.
        let applied = CancellationToken::new();
        let delivering = async {
            let delivered = delivery.deliver_held::<S>(held).await;
            applied.cancel();
            (delivered, Instant::now())
        };
        let reading = async {
            let fetched = source.next_batch_reading_on(size, wait, &applied).await;
            (fetched, Instant::now())
        };
        let ((delivered, delivered_at), (fetched, read_at)) = tokio::join!(delivering, reading);
        // This one waits (its marks committing) until the next is delivered:
        // acknowledgements overlap the next batch's apply.
        if !self.delivered(delivered?, true).await? {
            return Ok(None);
        }
        Ok(Some(ReadOn {
            fetched,
            waited: read_at.saturating_duration_since(delivered_at),
        }))
    }

    /// Nothing came: keep the source alive; `true` once caught up (with
    /// `until_caught_up`).
    async fn idle(&mut self) -> Result<bool, PipelineError> {
        if let Err(err) = self.source.idle().await {
            if err.class() != ErrorClass::Transient {
                return Err(PipelineError::stop("the source's keep-alive failed", err));
            }
            tracing::warn!(error = %describe(&err), "idle keep-alive failed");
        }
        if !self.shared.until_caught_up {
            return Ok(false);
        }
        match self.source.caught_up().await {
            Ok(true) => {
                tracing::info!("caught up");
                Ok(true)
            }
            Ok(false) => Ok(false),
            Err(err) if err.class() == ErrorClass::Transient => {
                tracing::warn!(error = %describe(&err), "cannot check progress");
                Ok(false)
            }
            Err(err) => Err(PipelineError::stop("cannot check progress", err)),
        }
    }
}

/// What a source's outage is counted and checked as.
fn source_component(source: SourceKind) -> Component {
    match source {
        SourceKind::Replication => Component::Replication,
        SourceKind::Polling => Component::Postgres,
        SourceKind::Kafka => Component::Kafka,
    }
}

#[cfg(test)]
mod tests;
