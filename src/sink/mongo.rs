//! The activity read models in MongoDB ([`Projector`]), as a sink.

use super::deferral::{self, Deferral, DeferralStats, Verdict};
use super::{Sink, SinkReport};
use crate::dead_letter::DeadLetter;
use crate::decode::OutboxEvent;
use crate::projection::{BatchReport, Projector};
use crate::rebuild::gate::Gate;
use crate::source::{Retried, SourceBatch};
use crate::stages::Stage;
use crate::store::mongo::StoreError;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use uuid::Uuid;

/// Projects batches into the read models and writes the dead letters of
/// malformed records.
#[derive(Clone)]
pub struct MongoSink {
    projector: Projector,
    /// Set: events whose aggregate does not exist yet are deferred.
    deferral: Option<Deferral>,
    /// A batch whose events are durable and whose dead letters are not yet
    /// (its report, the letters to write): a retry of the same batch writes
    /// only the letters (the events' effects are not counted twice).
    half_done: Option<(SinkReport, Vec<DeadLetter>)>,
    /// Set: the read models are written only through it, so that a rebuild
    /// can pause this process for its swap ([`crate::rebuild::gate`]).
    gate: Option<Gate>,
    /// The gate's pause count when the cache was last known good.
    pauses: u64,
}

impl MongoSink {
    pub fn new(projector: Projector) -> MongoSink {
        MongoSink {
            projector,
            deferral: None,
            half_done: None,
            gate: None,
            pauses: 0,
        }
    }

    /// Writes the read models only through `gate` (a rebuild's swap pauses it).
    pub fn gated(mut self, gate: Gate) -> MongoSink {
        self.gate = Some(gate);
        self
    }

    /// Events whose aggregate does not exist yet are handed back
    /// ([`SinkReport::deferred`]) rather than dead-lettered at once, up to
    /// `max_retries` tries: for a source where an aggregate's creation may
    /// arrive later (Kafka). See [`deferral`].
    pub fn deferring(mut self, max_retries: u32) -> MongoSink {
        self.projector.dead_letter_races = false;
        self.deferral = Some(Deferral::new(max_retries));
        self
    }

    /// What became of retried events (with [`MongoSink::deferring`]).
    pub fn deferral_stats(&self) -> Option<Arc<DeferralStats>> {
        self.deferral.as_ref().map(|d| d.stats.clone())
    }

    /// Judges the batch's retried events: the events to apply, and the dead
    /// letters of those that can no longer apply.
    async fn judge<A>(
        &self,
        batch: &SourceBatch<A>,
        deferral: &Deferral,
        letters: &mut Vec<DeadLetter>,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        let retried: HashMap<Uuid, &Retried> =
            batch.retried.iter().map(|r| (r.event_id, r)).collect();
        let due: Vec<&OutboxEvent> = batch
            .events
            .iter()
            .filter(|e| retried.contains_key(&e.event_id))
            .collect();
        let fences = deferral::fences(self.projector.store(), &due).await?;
        let mut keep = Vec::with_capacity(batch.events.len());
        for event in &batch.events {
            let Some(tried) = retried.get(&event.event_id) else {
                keep.push(event.clone());
                continue;
            };
            let fence = fences
                .get(&(event.aggregate_type.clone(), event.aggregate_id))
                .copied();
            match deferral.judge(event, tried, fence) {
                Verdict::Settled => {}
                Verdict::Dead(letter) => letters.push(*letter),
                Verdict::Retry => keep.push(event.clone()),
            }
        }
        Ok(keep)
    }

    /// Records newly deferred events (provisional dead letters) and
    /// withdraws the records of retried events that took effect.
    async fn record<A>(
        &self,
        batch: &SourceBatch<A>,
        deferral: &Deferral,
        report: &mut SinkReport,
        letters: &[DeadLetter],
    ) -> Result<(), StoreError> {
        let retried: BTreeSet<Uuid> = batch.retried.iter().map(|r| r.event_id).collect();
        let provisional: Vec<DeadLetter> = report
            .deferred
            .iter()
            .filter(|(event, _)| !retried.contains(&event.event_id))
            .map(|(event, error)| deferral.provisional(event, error))
            .collect();
        if !provisional.is_empty() {
            self.projector
                .write_dead_letters(&provisional, &mut report.round_trips)
                .await?;
        }
        let unsettled: BTreeSet<Uuid> = report
            .deferred
            .iter()
            .map(|(e, _)| e.event_id)
            .chain(report.dead_letters.iter().map(|d| d.event.event_id))
            .chain(letters.iter().map(|d| d.event.event_id))
            .collect();
        let applied: Vec<Uuid> = retried.difference(&unsettled).copied().collect();
        deferral::withdraw(self.projector.store(), &applied).await
    }

    /// The batch's events into the read models; the dead letters still to write.
    async fn project<A>(
        &mut self,
        batch: &SourceBatch<A>,
    ) -> Result<(SinkReport, Vec<DeadLetter>), StoreError> {
        let _pass = match &self.gate {
            Some(gate) => {
                let pass = gate.enter().await?;
                // A rebuild may have swapped the collections: nothing cached
                // from before is to be trusted.
                let pauses = gate.pauses();
                if pauses != self.pauses {
                    self.pauses = pauses;
                    self.projector.clear_cache();
                }
                Some(pass)
            }
            None => None,
        };
        let mut letters = batch.malformed.clone();
        let deferral = self.deferral.clone();
        let report = match &deferral {
            Some(deferral) if !batch.retried.is_empty() => {
                let events = self.judge(batch, deferral, &mut letters).await?;
                self.projector.apply(&events).await?
            }
            _ => self.projector.apply(&batch.events).await?,
        };
        let mut report = sink_report(report);
        if let Some(deferral) = &deferral {
            // A failure here repeats the batch: applying it again changes
            // nothing, and a retried event that took effect is then settled.
            self.record(batch, deferral, &mut report, &letters).await?;
        }
        Ok((report, letters))
    }
}

fn sink_report(report: BatchReport) -> SinkReport {
    SinkReport {
        applied: report.applied,
        duplicates: report.duplicates,
        unmatched: report.unmatched,
        dead_letters: report.dead_letters,
        letters_again: report.letters_again,
        deferred: report
            .deferred
            .into_iter()
            .map(|(event, err)| (event, err.to_string()))
            .collect(),
        round_trips: report.round_trips,
        documents_written: report.documents_written,
        stages: report.stages,
    }
}

impl Sink for MongoSink {
    type Error = StoreError;

    async fn apply<A: Sync>(&mut self, batch: &SourceBatch<A>) -> Result<SinkReport, StoreError> {
        let (mut report, letters) = match self.half_done.take() {
            Some(half_done) => half_done,
            None => self.project(batch).await?,
        };
        if !letters.is_empty() {
            let started = std::time::Instant::now();
            let written = self
                .projector
                .write_dead_letters(&letters, &mut report.round_trips)
                .await;
            report.stages.lap(Stage::DeadLetters, started);
            match written {
                Ok(again) => report.letters_again += again,
                Err(err) => {
                    self.half_done = Some((report, letters));
                    return Err(err);
                }
            }
            report.dead_letters.extend(letters);
        }
        Ok(report)
    }

    async fn close(&mut self) {
        if let Some(gate) = &self.gate {
            gate.close().await;
        }
    }
}
