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
mod marker;
mod observed;
mod progress;
mod retry;
mod settle;

pub use crate::counters::Stats;
pub use crash_points::CrashPoints;
pub use marker::{MarkError, OutboxMarker};
pub use retry::{Outage, Retry};

use crate::checkpoint::{CheckpointError, MongoCheckpoint};
use crate::config::{PipelineConfig, SourceKind};
use crate::failpoint::crash_point;
use crate::observe::Component;
use crate::policy::{describe, Classify, ErrorClass};
use crate::sink::{Sink, SinkReport};
use crate::source::{BatchOutcome, Source, SourceBatch};
use crate::stages::{Stage, StageTimes};
use crate::stats_file::StatsFile;
use crash_points::crash_at;
use progress::Progress;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

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
/// commit times, the time its stages took so far, and when it was asked for.
/// Where the sink writes ahead and the source hands out ahead, the runtime
/// holds one such batch while it takes the next: the next batch is read and
/// handed to the sink while this one is being delivered, and batches are
/// still applied, saved and acknowledged one by one, in order (see
/// docs/design.md, "The runtime").
struct Held<A> {
    batch: SourceBatch<A>,
    committed: Vec<Option<chrono::DateTime<chrono::Utc>>>,
    stages: StageTimes,
    asked: Instant,
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
            if self.shared.shutdown.is_cancelled() && !self.source.mid_transaction() {
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
            let fetched = self.source.next_batch(size, wait).await;
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
            }
            match fetched {
                Ok(Some(batch)) => {
                    let mut stages = StageTimes::default();
                    stages.lap(Stage::Source, asked);
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
                        asked,
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
        let Held {
            batch,
            committed,
            stages,
            asked,
        } = held;
        let span = tracing::debug_span!("batch", events = batch.events.len());
        let processing = Instant::now();
        let delivered = self.deliver(batch, committed, stages);
        let Some(delivered) = delivered.instrument(span).await? else {
            // The batch before it is durable and marked: it is acknowledged.
            self.settle_earlier().await?;
            return Ok(false);
        };
        tracing::debug!(
            source_ms = (processing - asked).as_secs_f64() * 1e3,
            deliver_ms = processing.elapsed().as_secs_f64() * 1e3,
            "batch delivered"
        );
        if !self.settle_earlier().await? {
            return Ok(false);
        }
        if keep {
            self.settling = Some(delivered);
            return Ok(true);
        }
        self.settle(delivered).await
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

    /// One batch (`committed`: its events' commit times), in the order of
    /// the module's doc, up to its marks, which are told to commit; `None`:
    /// shutdown came first (nothing acknowledged).
    async fn deliver(
        &mut self,
        batch: SourceBatch<S::Ack>,
        committed: Vec<Option<chrono::DateTime<chrono::Utc>>>,
        mut stages: StageTimes,
    ) -> Result<Option<Settling<S::Ack>>, PipelineError> {
        let points = K::CRASH_POINTS;
        crash_point(points.before_write);
        // The outbox rows' update starts beside the write, uncommitted
        // until the write is durable (see the marker).
        let mut marker = self.marker.take();
        let (written, ()) = tokio::join!(self.write(&batch), async {
            if let Some(marker) = marker.as_mut() {
                marker.begin(&batch.events).await;
            }
        });
        self.marker = marker;
        let report = match written {
            Ok(Some(report)) => report,
            Ok(None) => {
                self.abort_mark().await;
                return Ok(None);
            }
            Err(err) => {
                self.abort_mark().await;
                return Err(err);
            }
        };
        crash_point(points.after_write);
        let outcomes = observed::outcomes(&batch.events, &report);
        if let Some(stats_file) = &self.shared.stats_file {
            stats_file.durable(&observed::applied_commit_times(&committed, &outcomes));
        }
        let outcome = BatchOutcome {
            dead_letters: report.dead_letters.clone(),
            // Deferred (aggregate not created yet): the source tries them again.
            retry: report.deferred.clone(),
        };
        stages.absorb(&report.stages);
        let started = Instant::now();
        if !self.save_checkpoint(&batch.ack).await? {
            self.abort_mark().await;
            return Ok(None);
        }
        stages.lap(Stage::Checkpoint, started);
        if let Some(marker) = self.marker.as_mut() {
            crash_at(points.before_mark);
            marker.commit(&batch.events, &outcome);
        }
        Ok(Some(Settling {
            batch,
            committed,
            report,
            outcome,
            outcomes,
            stages,
        }))
    }

    /// The sink applies the batch, retried while it fails transiently;
    /// `None`: shutdown came first.
    async fn write(
        &mut self,
        batch: &SourceBatch<S::Ack>,
    ) -> Result<Option<SinkReport>, PipelineError> {
        let interruptible = self.sink.interruptible();
        let mut attempts = self.retry.attempts(K::COMPONENT, "writing a batch failed");
        let written = loop {
            let written = if interruptible {
                tokio::select! {
                    biased;
                    // Nothing of it is acknowledged: it comes again.
                    _ = self.shared.shutdown.cancelled() => return Ok(None),
                    written = self.sink.apply(batch) => written,
                }
            } else {
                self.sink.apply(batch).await
            };
            if let Some(done) = attempts.settle(written).await {
                break done;
            }
        };
        written.map_err(|err| {
            PipelineError::stop(
                "the sink refused a batch; fix the cause and start again",
                err,
            )
        })
    }

    /// The MongoDB checkpoint, for a source whose acknowledgement is an LSN.
    /// A save below the stored position is refused, logged and counted.
    async fn save_checkpoint(&mut self, ack: &S::Ack) -> Result<bool, PipelineError> {
        let (Some(lsn), Some(checkpoint)) = (S::lsn_of(ack), &self.checkpoint) else {
            return Ok(true);
        };
        let mut attempts = self
            .retry
            .attempts(Component::Mongodb, "saving the checkpoint failed");
        let saved = loop {
            if let Some(done) = attempts.settle(checkpoint.save(lsn).await).await {
                break done;
            }
        };
        match saved {
            Ok(Some(())) => {}
            Ok(None) => return Ok(false),
            Err(err @ CheckpointError::Backwards { .. }) => {
                tracing::error!(error = %describe(&err), "checkpoint not saved");
                self.shared
                    .stats
                    .checkpoint_refused
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err(err) => {
                return Err(PipelineError::stop(
                    "cannot save the checkpoint; fix MongoDB and start again",
                    err,
                ))
            }
        }
        crash_point(K::CRASH_POINTS.after_checkpoint);
        Ok(true)
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
