//! The end of a batch's way through the runtime, once its effects are
//! durable: its outbox marks committed, then the source's acknowledgement
//! and the counters (steps 4 and 5 of docs/design.md, "The runtime").

use super::crash_points::crash_at;
use super::{observed, Pipeline, PipelineError, Settling};
use crate::counters::Stats;
use crate::failpoint::crash_point;
use crate::observe::Component;
use crate::policy::{describe, Classify, ErrorClass};
use crate::sink::{Sink, SinkReport};
use crate::source::{BatchOutcome, Source, SourceBatch};
use crate::stages::Stage;
use crate::stats_file::StatsFile;
use std::sync::atomic::Ordering;
use std::time::Instant;

impl<S: Source, K: Sink> Pipeline<S, K> {
    /// Acknowledges the batch left settling, if any.
    pub(super) async fn settle_earlier(&mut self) -> Result<bool, PipelineError> {
        match self.settling.take() {
            Some(settling) => self.settle(settling).await,
            None => Ok(true),
        }
    }

    /// A delivered batch's marks are committed (waited for), then the source
    /// moves past it; `false`: shutdown came first (nothing acknowledged).
    pub(super) async fn settle(
        &mut self,
        settling: Settling<S::Ack>,
    ) -> Result<bool, PipelineError> {
        let Settling {
            batch,
            committed,
            report,
            outcome,
            outcomes,
            mut stages,
        } = settling;
        let points = K::CRASH_POINTS;
        let started = Instant::now();
        if !self.mark(&batch, &outcome).await? {
            return Ok(false);
        }
        let started = stages.lap(Stage::Mark, started);
        crash_point(points.before_ack);
        let lsn = S::lsn_of(&batch.ack);
        self.acknowledge(batch.ack, &outcome).await?;
        stages.lap(Stage::Acknowledge, started);
        if let Some(stats_file) = &self.shared.stats_file {
            stats_file.stages(&stages);
        }
        if let Some(lsn) = lsn {
            self.shared.durable_lsn.fetch_max(lsn, Ordering::Release);
        }
        self.shared.acknowledged.fetch_add(
            (batch.events.len() + batch.malformed.len()) as u64,
            Ordering::Release,
        );
        crash_point(points.after_ack);
        count(
            &self.shared.stats,
            &report,
            self.shared.stats_file.as_deref(),
        );
        observed::durable(
            self.shared.source,
            &batch.events,
            &committed,
            &outcomes,
            &report,
        );
        for letter in &outcome.dead_letters {
            tracing::warn!(event_id = %letter.event.event_id, event_type = %letter.event.event_type, error = %letter.error, "dead-lettered");
        }
        Ok(true)
    }

    /// Outbox rows of earlier batches that were not visible yet when they
    /// were marked (see the marker); a failure here only delays them.
    pub(super) async fn mark_late(&mut self) {
        let Some(marker) = self.marker.as_mut().filter(|m| m.has_late()) else {
            return;
        };
        if let Err(err) = marker.mark_late().await {
            tracing::warn!(error = %describe(&err), "marking outbox rows failed; trying again later");
        }
    }

    pub(super) async fn mark(
        &mut self,
        batch: &SourceBatch<S::Ack>,
        outcome: &BatchOutcome,
    ) -> Result<bool, PipelineError> {
        let Some(marker) = self.marker.as_mut() else {
            return Ok(true);
        };
        let points = K::CRASH_POINTS;
        let mut attempts = self
            .retry
            .attempts(Component::Postgres, "marking outbox rows failed");
        let marked = loop {
            if let Some(done) = attempts
                .settle(marker.finish(&batch.events, outcome).await)
                .await
            {
                break done;
            }
        };
        match marked {
            Ok(Some(())) => {
                crash_at(points.after_mark);
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(err) => {
                let advice = err.advice();
                Err(PipelineError::stop(format!("stopping ({advice})"), err))
            }
        }
    }

    /// The effects are durable: the source moves past the batch. A
    /// transient failure only means the batch may come again.
    pub(super) async fn acknowledge(
        &mut self,
        ack: S::Ack,
        outcome: &BatchOutcome,
    ) -> Result<(), PipelineError> {
        match self.source.ack(ack, outcome).await {
            Ok(()) => Ok(()),
            Err(err) if err.class() == ErrorClass::Transient => {
                tracing::warn!(error = %describe(&err), "acknowledgement failed; the batch may be delivered again");
                Ok(())
            }
            Err(err) => Err(PipelineError::stop(
                "cannot acknowledge a batch to its source; fix the cause and start again",
                err,
            )),
        }
    }
}

/// Adds what a batch did to the counters, then tells the stats file.
pub(super) fn count(stats: &Stats, report: &SinkReport, stats_file: Option<&StatsFile>) {
    let add = |counter: &std::sync::atomic::AtomicU64, n: u64| {
        counter.fetch_add(n, Ordering::Relaxed);
    };
    add(&stats.applied, report.applied as u64);
    add(&stats.duplicates, report.duplicates as u64);
    add(&stats.unmatched, report.unmatched as u64);
    let letters = report.dead_letters.len();
    let again = report.letters_again.min(letters);
    add(&stats.dead_lettered, (letters - again) as u64);
    add(&stats.dead_letters_again, again as u64);
    add(&stats.batches, 1);
    add(&stats.round_trips, u64::from(report.round_trips));
    add(&stats.documents_written, report.documents_written);
    if let Some(stats_file) = stats_file {
        stats_file.batch_done();
    }
}
