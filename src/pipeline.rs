//! The loop that ties the stages: take a batch from the source, project it,
//! record the checkpoint, mark the outbox, acknowledge, report progress.
//!
//! Order of a batch, and why: effects (and dead letters) first; then the
//! checkpoint and outbox marks, which describe effects that are now durable;
//! the source's acknowledgement last. A crash anywhere re-delivers the batch,
//! which the fenced projections absorb.
//!
//! Transient failures (MongoDB or PostgreSQL down) are retried with capped,
//! jittered backoff, forever, without dead-lettering anything; a shutdown
//! request during such a wait stops without acknowledging the batch.

use crate::checkpoint::{mark_error, mark_outbox, MongoCheckpoint};
use crate::config::{PipelineConfig, PostgresConfig};
use crate::failpoint::{self, crash_point};
use crate::outbox;
use crate::policy::Backoff;
use crate::projection::{BatchReport, Projector};
use crate::source::{AckToken, BatchOutcome, Source, SourceBatch};
use crate::stats_file::StatsFile;
use std::future::Future;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// Stop: retrying cannot fix this.
    #[error("{0}")]
    Fatal(String),
}

/// Counters shared by the workers of one process.
#[derive(Debug, Default)]
pub struct Stats {
    pub applied: AtomicU64,
    pub duplicates: AtomicU64,
    pub unmatched: AtomicU64,
    pub dead_lettered: AtomicU64,
    /// Dead letters written again for a re-delivered event (not counted in
    /// `dead_lettered`).
    pub dead_letters_again: AtomicU64,
    pub batches: AtomicU64,
    pub round_trips: AtomicU64,
    pub documents_written: AtomicU64,
}

impl Stats {
    /// Events handled, whatever became of them.
    pub fn done(&self) -> u64 {
        self.applied.load(Ordering::Relaxed)
            + self.duplicates.load(Ordering::Relaxed)
            + self.unmatched.load(Ordering::Relaxed)
            + self.dead_lettered.load(Ordering::Relaxed)
    }
}

/// Marks outbox rows after their effects are durable (replication source).
pub struct OutboxMarker {
    pg: PostgresConfig,
    client: Option<Client>,
}

impl OutboxMarker {
    pub fn new(pg: PostgresConfig) -> OutboxMarker {
        OutboxMarker { pg, client: None }
    }

    async fn mark(&mut self, batch: &SourceBatch, outcome: &BatchOutcome) -> Result<(), String> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.client = Some(outbox::connect(&self.pg).await.map_err(|e| e.to_string())?);
        }
        let Some(client) = self.client.as_ref() else {
            return Err("no connection".into());
        };
        let dead: std::collections::BTreeSet<uuid::Uuid> = outcome
            .dead_letters
            .iter()
            .map(|d| d.event.event_id)
            .collect();
        let applied: Vec<uuid::Uuid> = batch
            .events
            .iter()
            .map(|e| e.event_id)
            .filter(|id| !dead.contains(id))
            .collect();
        mark_outbox(client, &applied, &outcome.dead_letters)
            .await
            .map_err(|e| {
                self.client = None;
                mark_error(&e)
            })
    }
}

/// One worker's loop.
pub struct Pipeline<S: Source> {
    pub source: S,
    /// `None`: the discard sink: every event counts as applied and nothing
    /// is written.
    pub projector: Option<Projector>,
    pub checkpoint: Option<MongoCheckpoint>,
    pub marker: Option<OutboxMarker>,
    pub config: PipelineConfig,
    pub shutdown: CancellationToken,
    pub stats: Arc<Stats>,
    pub until_caught_up: bool,
    /// This worker prints the progress line for the process.
    pub report_progress: bool,
    /// The stats file (`--stats-file`), told of every durable batch.
    pub stats_file: Option<Arc<StatsFile>>,
}

enum Step<T> {
    Done(T),
    Interrupted,
}

impl<S: Source> Pipeline<S> {
    /// Runs until shutdown (or, with `until_caught_up`, until caught up).
    pub async fn run(mut self) -> Result<(), PipelineError> {
        let mut backoff = Backoff::new(self.config.backoff_initial, self.config.backoff_max);
        let mut progress = Progress::new(self.stats.clone());
        loop {
            // A transaction half applied is finished first, so that the last
            // acknowledged position covers it (a second signal still stops at once).
            if self.shutdown.is_cancelled() && !self.source.mid_transaction() {
                tracing::info!("intake stopped");
                break;
            }
            match self
                .source
                .next_batch(self.config.batch_size, self.config.batch_wait)
                .await
            {
                Ok(Some(batch)) => {
                    crash_point(failpoint::PIPELINE_AFTER_DECODE);
                    backoff.reset();
                    if let Step::Interrupted = self.process(batch).await? {
                        break;
                    }
                }
                Ok(None) => {
                    if let Err(err) = self.source.idle().await {
                        tracing::warn!(error = %err, "idle keep-alive failed");
                    }
                    if self.until_caught_up {
                        match self.source.caught_up().await {
                            Ok(true) => {
                                tracing::info!("caught up");
                                break;
                            }
                            Ok(false) => {}
                            Err(err) if err.is_transient() => {
                                tracing::warn!(error = %err, "cannot check progress")
                            }
                            Err(err) => return Err(PipelineError::Fatal(err.to_string())),
                        }
                    }
                }
                Err(err) if err.is_transient() => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, attempt = backoff.attempts(), "source unavailable; retrying");
                    if self.pause(delay).await {
                        break;
                    }
                }
                Err(err) => return Err(PipelineError::Fatal(err.to_string())),
            }
            if self.report_progress {
                progress.tick(&mut self.source).await;
            }
        }
        if self.report_progress {
            progress.finish();
        }
        Ok(())
    }

    /// Sleeps `delay` unless shutdown comes first (then `true`).
    async fn pause(&self, delay: Duration) -> bool {
        tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => true,
            _ = tokio::time::sleep(delay) => false,
        }
    }

    /// Retries `attempt` while it fails transiently; a fatal error stops.
    async fn retry<T, E, F, Fut>(
        &self,
        what: &str,
        mut attempt: F,
    ) -> Result<Step<T>, PipelineError>
    where
        E: std::fmt::Display,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, (bool, E)>>,
    {
        let mut backoff = Backoff::new(self.config.backoff_initial, self.config.backoff_max);
        loop {
            match attempt().await {
                Ok(value) => return Ok(Step::Done(value)),
                Err((true, err)) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, attempt = backoff.attempts(), "{what} failed; retrying");
                    if self.pause(delay).await {
                        return Ok(Step::Interrupted);
                    }
                }
                Err((false, err)) => return Err(PipelineError::Fatal(format!("{what}: {err}"))),
            }
        }
    }

    async fn process(&mut self, batch: SourceBatch) -> Result<Step<()>, PipelineError> {
        let span = tracing::debug_span!("batch", events = batch.events.len());
        let _enter = span.enter();
        let Some(projector) = self.projector.clone() else {
            return self.discard(batch).await;
        };
        let events = &batch.events;
        crash_point(failpoint::PIPELINE_BEFORE_SINK_WRITE);
        let report = match self
            .retry("projecting a batch", || async {
                projector
                    .apply(events)
                    .await
                    .map_err(|e| (e.is_transient(), e))
            })
            .await?
        {
            Step::Done(report) => report,
            Step::Interrupted => return Ok(Step::Interrupted),
        };
        crash_point(failpoint::PIPELINE_AFTER_SINK_WRITE);
        if let Some(stats_file) = &self.stats_file {
            stats_file.durable(events);
        }
        let mut outcome = BatchOutcome {
            dead_letters: report.dead_letters.clone(),
            // Deferred (aggregate not created yet): the source tries them again.
            retry: report
                .deferred
                .iter()
                .map(|(event, err)| (event.clone(), err.to_string()))
                .collect(),
        };
        let mut letters_again = report.letters_again;
        if !batch.malformed.is_empty() {
            let malformed = &batch.malformed;
            let written = self
                .retry("writing dead letters", || async {
                    let mut trips = 0;
                    projector
                        .write_dead_letters(malformed, &mut trips)
                        .await
                        .map_err(|e| (e.is_transient(), e))
                })
                .await?;
            match written {
                Step::Interrupted => return Ok(Step::Interrupted),
                Step::Done(again) => letters_again += again,
            }
            outcome.dead_letters.extend(batch.malformed.iter().cloned());
        }
        if let (AckToken::Lsn(lsn), Some(checkpoint)) = (&batch.ack, &self.checkpoint) {
            if *lsn > 0 {
                let saved = self
                    .retry("saving the checkpoint", || async {
                        checkpoint
                            .save(*lsn)
                            .await
                            .map_err(|e| (e.is_transient(), e))
                    })
                    .await?;
                if let Step::Interrupted = saved {
                    return Ok(Step::Interrupted);
                }
                crash_point(failpoint::PIPELINE_AFTER_CHECKPOINT);
            }
        }
        if let Some(mut marker) = self.marker.take() {
            crash_point(failpoint::PIPELINE_BEFORE_MARK_OUTBOX);
            let outcome_ref = &outcome;
            let batch_ref = &batch;
            let marked = {
                let marker_ref = &mut marker;
                let mut backoff =
                    Backoff::new(self.config.backoff_initial, self.config.backoff_max);
                loop {
                    match marker_ref.mark(batch_ref, outcome_ref).await {
                        Ok(()) => break true,
                        Err(err) => {
                            let delay = backoff.next_delay();
                            tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "marking outbox rows failed; retrying");
                            if self.pause(delay).await {
                                break false;
                            }
                        }
                    }
                }
            };
            self.marker = Some(marker);
            if !marked {
                return Ok(Step::Interrupted);
            }
            crash_point(failpoint::PIPELINE_AFTER_MARK_OUTBOX);
        }
        crash_point(failpoint::PIPELINE_BEFORE_SOURCE_ACK);
        if let Err(err) = self.source.ack(batch.ack.clone(), &outcome).await {
            // The effects and the checkpoint are durable; a lost acknowledgement
            // only means the batch may come again, which changes nothing.
            tracing::warn!(error = %err, "acknowledgement failed; the batch may be delivered again");
        }
        crash_point(failpoint::PIPELINE_AFTER_SOURCE_ACK);
        self.count(&report, &outcome, letters_again);
        for letter in &outcome.dead_letters {
            tracing::warn!(event_id = %letter.event.event_id, event_type = %letter.event.event_type, error = %letter.error, "dead-lettered");
        }
        Ok(Step::Done(()))
    }

    /// The no-op sink: acknowledge at once, count every event as applied.
    async fn discard(&mut self, batch: SourceBatch) -> Result<Step<()>, PipelineError> {
        let outcome = BatchOutcome {
            dead_letters: batch.malformed.clone(),
            retry: Vec::new(),
        };
        if let Err(err) = self.source.ack(batch.ack.clone(), &outcome).await {
            tracing::warn!(error = %err, "acknowledgement failed; the batch may be delivered again");
        }
        let report = BatchReport {
            applied: batch.events.len(),
            ..BatchReport::default()
        };
        self.count(&report, &outcome, 0);
        Ok(Step::Done(()))
    }

    /// `letters_again`: of the batch's dead letters, those written before.
    fn count(&self, report: &BatchReport, outcome: &BatchOutcome, letters_again: usize) {
        let stats = &self.stats;
        stats
            .applied
            .fetch_add(report.applied as u64, Ordering::Relaxed);
        stats
            .duplicates
            .fetch_add(report.duplicates as u64, Ordering::Relaxed);
        stats
            .unmatched
            .fetch_add(report.unmatched as u64, Ordering::Relaxed);
        let letters = outcome.dead_letters.len();
        let again = letters_again.min(letters);
        stats
            .dead_lettered
            .fetch_add((letters - again) as u64, Ordering::Relaxed);
        stats
            .dead_letters_again
            .fetch_add(again as u64, Ordering::Relaxed);
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats
            .round_trips
            .fetch_add(u64::from(report.round_trips), Ordering::Relaxed);
        stats
            .documents_written
            .fetch_add(report.documents_written, Ordering::Relaxed);
        if let Some(stats_file) = &self.stats_file {
            stats_file.batch_done();
        }
    }
}

/// The progress line: a rewritten line on a terminal, a log line otherwise.
struct Progress {
    stats: Arc<Stats>,
    started: Instant,
    last: Instant,
    terminal: bool,
    printed: bool,
}

impl Progress {
    fn new(stats: Arc<Stats>) -> Progress {
        let now = Instant::now();
        Progress {
            stats,
            started: now,
            last: now,
            terminal: std::io::stderr().is_terminal(),
            printed: false,
        }
    }

    async fn tick<S: Source>(&mut self, source: &mut S) {
        let every = if self.terminal {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(10)
        };
        if self.last.elapsed() < every {
            return;
        }
        self.last = Instant::now();
        let done = self.stats.done();
        if done == 0 && !self.printed {
            return;
        }
        let elapsed = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = done as f64 / elapsed;
        let remaining = source.backlog().await.ok().and_then(|b| b.remaining);
        let eta = match remaining {
            Some(left) if rate > 0.0 => format!("{:.0}s", left as f64 / rate),
            _ => "-".into(),
        };
        let left = remaining.map_or("?".into(), |r| r.to_string());
        if self.terminal {
            eprint!("\r\x1b[2K{done} events done, {left} remaining, {rate:.0}/s, eta {eta}");
            self.printed = true;
        } else {
            tracing::info!(
                done,
                remaining = left.as_str(),
                rate = rate.round() as u64,
                eta = eta.as_str(),
                "progress"
            );
        }
    }

    fn finish(&self) {
        if self.printed {
            eprintln!();
        }
    }
}
