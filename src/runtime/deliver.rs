//! Steps 1-3 of a batch (docs/design.md, "The runtime"): the sink's
//! effects, the checkpoint, and the outbox marks told to commit. It borrows
//! every part of the pipeline but the source, which may meanwhile read the
//! next batch.

use super::crash_points::crash_at;
use super::{observed, Held, PipelineError, Retry, Settling, Shared};
use crate::checkpoint::{CheckpointError, MongoCheckpoint};
use crate::failpoint::crash_point;
use crate::observe::Component;
use crate::policy::describe;
use crate::runtime::OutboxMarker;
use crate::sink::{Sink, SinkReport};
use crate::source::{BatchOutcome, Source, SourceBatch};
use crate::stages::{Stage, StageTimes};
use std::sync::atomic::Ordering;
use std::time::Instant;
use tracing::Instrument;

/// The pipeline's parts a delivery uses.
pub(super) struct Delivery<'a, K: Sink> {
    pub sink: &'a mut K,
    pub checkpoint: Option<&'a MongoCheckpoint>,
    pub marker: &'a mut Option<OutboxMarker>,
    pub shared: &'a Shared,
    pub retry: &'a Retry,
}

impl<K: Sink> Delivery<'_, K> {
    /// [`Delivery::deliver`] of a batch taken earlier, in its span, saying
    /// (at `debug`) how long the source and the delivery took.
    pub(super) async fn deliver_held<S: Source>(
        &mut self,
        held: Held<S::Ack>,
    ) -> Result<Option<Settling<S::Ack>>, PipelineError> {
        let Held {
            batch,
            committed,
            stages,
        } = held;
        let span = tracing::debug_span!("batch", events = batch.events.len());
        let source_ms = stages.micros(Stage::Source) as f64 / 1e3;
        let processing = Instant::now();
        let delivered = self
            .deliver::<S>(batch, committed, stages)
            .instrument(span)
            .await?;
        if delivered.is_some() {
            tracing::debug!(
                source_ms,
                deliver_ms = processing.elapsed().as_secs_f64() * 1e3,
                "batch delivered"
            );
        }
        Ok(delivered)
    }

    /// One batch (`committed`: its events' commit times), in the order of
    /// the module's doc, up to its marks, which are told to commit; `None`:
    /// shutdown came first (nothing acknowledged).
    pub(super) async fn deliver<S: Source>(
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
        let (written, ()) = tokio::join!(self.write::<S>(&batch), async {
            if let Some(marker) = marker.as_mut() {
                marker.begin(&batch.events).await;
            }
        });
        *self.marker = marker;
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
        if !self.save_checkpoint::<S>(&batch.ack).await? {
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
    async fn write<S: Source>(
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
    async fn save_checkpoint<S: Source>(&mut self, ack: &S::Ack) -> Result<bool, PipelineError> {
        let (Some(lsn), Some(checkpoint)) = (S::lsn_of(ack), self.checkpoint) else {
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

    /// Rolls back a marking begun beside a write that did not complete.
    async fn abort_mark(&mut self) {
        if let Some(marker) = self.marker.as_mut() {
            marker.abort().await;
        }
    }
}
