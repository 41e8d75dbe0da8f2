//! What becomes of events whose aggregate did not exist when they were
//! applied (`BatchReport::deferred`, handed back by the pipeline as
//! `BatchOutcome::retry`): they wait ([`Waiting`]) and are tried again, and a
//! provisional dead letter records each one while it waits.
//!
//! Why provisional dead letters: the projections fence an aggregate at the
//! highest `sequence_id` applied. If the process dies while an event waits
//! and a later event creates the aggregate meanwhile, the redelivered copy is
//! fenced off as "already seen" - so the record of the event must already be
//! durable. It is withdrawn if a retry applies the event.

use super::client::Tp;
use super::stats::KafkaStats;
use super::waiting::{delay, Deferred, Waiting};
use super::SourceError;
use crate::decode::OutboxEvent;
use crate::projection::{DeadLetter, Projector};
use crate::source::BatchOutcome;
use crate::store::mongo::{MongoStore, StoreError, ACTIVITIES, DEAD_LETTERS, USERS};
use mongodb::bson::{doc, Bson, Document};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// A batch handed out and not yet acknowledged: what its events were.
#[derive(Debug, Default)]
pub struct InFlight {
    pub batch: u64,
    /// New events: id and position.
    pub fresh: Vec<(Uuid, Tp, i64)>,
    /// Deferred events tried again in this batch.
    pub retried: Vec<Deferred>,
    /// Deferred events settled by this batch (dead-lettered, or found applied).
    pub settled: Vec<(Tp, i64)>,
}

pub struct Retries {
    pub waiting: Waiting,
    /// Reads aggregate fences and writes provisional dead letters; `None`
    /// (a source without a store) skips both.
    store: Option<MongoStore>,
    max_retries: u32,
    backoff: (Duration, Duration),
    /// Provisional dead letters of deferred events, not yet written.
    unrecorded: Vec<DeadLetter>,
    /// Provisional dead letters of events a retry applied, not yet withdrawn.
    unwithdrawn: Vec<Uuid>,
    stats: Arc<KafkaStats>,
}

impl Retries {
    pub fn new(
        store: Option<MongoStore>,
        max_retries: u32,
        backoff: (Duration, Duration),
        stats: Arc<KafkaStats>,
    ) -> Retries {
        Retries {
            waiting: Waiting::default(),
            store,
            max_retries: max_retries.max(1),
            backoff,
            unrecorded: Vec::new(),
            unwithdrawn: Vec::new(),
            stats,
        }
    }

    /// Nothing waits and nothing is left to write.
    pub fn idle(&self) -> bool {
        self.waiting.held() == 0 && self.unrecorded.is_empty() && self.unwithdrawn.is_empty()
    }

    pub fn has_writes(&self) -> bool {
        !self.unrecorded.is_empty() || !self.unwithdrawn.is_empty()
    }

    /// Due retries: dead-lettered when they can no longer take effect (or
    /// have had their tries), else back into the batch (`events`).
    pub async fn judge(
        &mut self,
        due: Vec<Deferred>,
        events: &mut Vec<OutboxEvent>,
        dead: &mut Vec<DeadLetter>,
        flight: &mut InFlight,
    ) {
        let fences = match self.fences(&due).await {
            Ok(fences) => fences,
            Err(err) => {
                tracing::warn!(error = %err, "cannot read aggregate fences; retrying deferred events later");
                let later = Instant::now() + self.backoff.0.max(Duration::from_millis(500));
                for mut deferred in due {
                    deferred.due = later;
                    self.waiting.push(deferred);
                }
                return;
            }
        };
        for deferred in due {
            let event = &deferred.event;
            let seq = event.sequence_id.unwrap_or(i64::MIN);
            let fence = fences
                .get(&(event.aggregate_type.clone(), event.aggregate_id))
                .copied();
            match fence {
                Some(fence) if fence == seq => {
                    // A copy of it (a redelivery) took effect meanwhile.
                    flight.settled.push((deferred.tp.clone(), deferred.offset));
                }
                Some(fence) if fence > seq => {
                    self.stats.out_of_order.fetch_add(1, Ordering::Relaxed);
                    dead.push(DeadLetter {
                        error: format!(
                            "{}; meanwhile later events of {} {} took effect (up to sequence_id {fence}), \
                             so this one arrived out of order and can no longer apply: \
                             partition the topic by aggregate_id",
                            deferred.error, event.aggregate_type, event.aggregate_id
                        ),
                        attempts: deferred.attempts,
                        event: event.clone(),
                    });
                    flight.settled.push((deferred.tp.clone(), deferred.offset));
                }
                _ if deferred.attempts >= self.max_retries => {
                    self.stats.expired.fetch_add(1, Ordering::Relaxed);
                    dead.push(DeadLetter {
                        error: format!("{} (after {} tries)", deferred.error, deferred.attempts),
                        attempts: deferred.attempts,
                        event: event.clone(),
                    });
                    flight.settled.push((deferred.tp.clone(), deferred.offset));
                }
                _ => {
                    self.stats.retried.fetch_add(1, Ordering::Relaxed);
                    events.push(event.clone());
                    flight.retried.push(deferred);
                }
            }
        }
    }

    /// The `_seq` fence of each deferred event's aggregate, where it exists.
    async fn fences(&self, due: &[Deferred]) -> Result<HashMap<(String, Uuid), i64>, StoreError> {
        let mut fences = HashMap::new();
        let Some(store) = &self.store else {
            return Ok(fences);
        };
        for (aggregate_type, collection) in [("User", USERS), ("Activity", ACTIVITIES)] {
            let ids: BTreeSet<String> = due
                .iter()
                .filter(|d| d.event.aggregate_type == aggregate_type)
                .map(|d| d.event.aggregate_id.to_string())
                .collect();
            if ids.is_empty() {
                continue;
            }
            let found = store
                .find_by_ids(
                    collection,
                    ids.into_iter().collect(),
                    Some(doc! { "_seq": 1 }),
                )
                .await?;
            for doc in found {
                if let (Some(id), Some(seq)) = (doc_id(&doc), fence_of(&doc)) {
                    fences.insert((aggregate_type.to_string(), id), seq);
                }
            }
        }
        Ok(fences)
    }

    /// Takes a batch's outcome into account: which deferred events wait
    /// (again), which are settled, and which provisional dead letters to
    /// write or withdraw.
    pub fn settle(&mut self, flight: InFlight, outcome: &BatchOutcome) -> Result<(), SourceError> {
        let now = Instant::now();
        let (initial, max) = self.backoff;
        let mut retry: HashMap<Uuid, VecDeque<(OutboxEvent, String)>> = HashMap::new();
        for (event, error) in &outcome.retry {
            retry
                .entry(event.event_id)
                .or_default()
                .push_back((event.clone(), error.clone()));
        }
        let mut take = |id: &Uuid| retry.get_mut(id).and_then(VecDeque::pop_front);
        for mut deferred in flight.retried {
            match take(&deferred.event.event_id) {
                Some((_, error)) => {
                    deferred.attempts += 1;
                    deferred.error = error;
                    deferred.due = now + delay(deferred.attempts, initial, max);
                    self.waiting.push(deferred);
                }
                None => {
                    let id = deferred.event.event_id;
                    if !outcome.dead_letters.iter().any(|d| d.event.event_id == id) {
                        // Applied at last: its provisional dead letter goes.
                        self.unwithdrawn.push(id);
                    }
                    self.waiting.release(&deferred.tp, deferred.offset);
                }
            }
        }
        for (id, tp, offset) in flight.fresh {
            if let Some((event, error)) = take(&id) {
                self.stats.deferred.fetch_add(1, Ordering::Relaxed);
                self.waiting.hold(&tp, offset);
                self.unrecorded.push(DeadLetter {
                    event: event.clone(),
                    error: format!(
                        "{error} (waiting for its aggregate's creation; tried 1 of {} times)",
                        self.max_retries
                    ),
                    attempts: 1,
                });
                self.waiting.push(Deferred {
                    event,
                    tp,
                    offset,
                    attempts: 1,
                    due: now + delay(1, initial, max),
                    error,
                });
            }
        }
        for (tp, offset) in flight.settled {
            self.waiting.release(&tp, offset);
        }
        match retry.into_iter().find(|(_, left)| !left.is_empty()) {
            Some((id, _)) => Err(SourceError::Fatal(format!(
                "the pipeline asked to retry event {id}, which was not in the batch"
            ))),
            None => Ok(()),
        }
    }

    /// Writes the provisional dead letters of newly deferred events and
    /// withdraws those of events a retry applied. A failure is retried with
    /// the next call (the events stay deferred meanwhile).
    pub async fn record(&mut self) -> Result<(), SourceError> {
        let Some(store) = &self.store else {
            self.unrecorded.clear();
            self.unwithdrawn.clear();
            return Ok(());
        };
        if !self.unrecorded.is_empty() {
            let mut trips = 0;
            Projector::new(store.clone())
                .write_dead_letters(&self.unrecorded, &mut trips)
                .await
                .map_err(|e| {
                    SourceError::Transient(format!(
                        "cannot record deferred events (retried with the next batch): {e}"
                    ))
                })?;
            self.unrecorded.clear();
        }
        if !self.unwithdrawn.is_empty() {
            let ids: Vec<String> = self.unwithdrawn.iter().map(Uuid::to_string).collect();
            store
                .database()
                .collection::<Document>(DEAD_LETTERS)
                .delete_many(doc! { "_id": { "$in": ids } })
                .await
                .map_err(|e| {
                    SourceError::Transient(format!(
                        "cannot withdraw the provisional dead letters of applied events \
                         (retried with the next batch): {e}"
                    ))
                })?;
            self.unwithdrawn.clear();
        }
        Ok(())
    }
}

fn doc_id(doc: &Document) -> Option<Uuid> {
    doc.get_str("_id")
        .ok()
        .and_then(|s| Uuid::parse_str(s).ok())
}

fn fence_of(doc: &Document) -> Option<i64> {
    match doc.get("_seq") {
        Some(Bson::Int64(n)) => Some(*n),
        Some(Bson::Int32(n)) => Some(i64::from(*n)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(seq: i64) -> OutboxEvent {
        OutboxEvent {
            event_id: Uuid::new_v4(),
            sequence_id: Some(seq),
            aggregate_id: Uuid::new_v4(),
            aggregate_type: "User".into(),
            event_type: "UserUpdated".into(),
            payload: json!({"displayName": "x"}),
            created_at: None,
        }
    }

    fn retries(max: u32) -> Retries {
        let zero = Duration::from_millis(1);
        Retries::new(None, max, (zero, zero), Arc::new(KafkaStats::default()))
    }

    fn tp() -> Tp {
        ("t".into(), 0)
    }

    #[test]
    fn a_deferred_event_holds_its_offset_until_settled() {
        let mut retries = retries(2);
        let e = event(7);
        let flight = InFlight {
            batch: 1,
            fresh: vec![(e.event_id, tp(), 40)],
            ..InFlight::default()
        };
        let outcome = BatchOutcome {
            retry: vec![(e.clone(), "never created".into())],
            ..BatchOutcome::default()
        };
        retries.settle(flight, &outcome).expect("settle");
        assert_eq!(retries.waiting.lowest_hold(&tp()), Some(40));
        assert!(!retries.idle());
        assert_eq!(retries.unrecorded.len(), 1);

        // Its retry applies it: the hold goes and the provisional dead letter is withdrawn.
        std::thread::sleep(Duration::from_millis(5));
        let due = retries.waiting.take_due(Instant::now(), 10);
        assert_eq!(due.len(), 1);
        let flight = InFlight {
            batch: 2,
            retried: due,
            ..InFlight::default()
        };
        retries
            .settle(flight, &BatchOutcome::default())
            .expect("settle");
        assert_eq!(retries.waiting.lowest_hold(&tp()), None);
        assert_eq!(retries.unwithdrawn, [e.event_id]);
    }

    #[tokio::test]
    async fn the_last_try_dead_letters() {
        let mut retries = retries(1);
        let e = event(3);
        retries.waiting.hold(&tp(), 5);
        let due = vec![Deferred {
            event: e.clone(),
            tp: tp(),
            offset: 5,
            attempts: 1,
            due: Instant::now(),
            error: "never created".into(),
        }];
        let (mut events, mut dead, mut flight) = (Vec::new(), Vec::new(), InFlight::default());
        retries
            .judge(due, &mut events, &mut dead, &mut flight)
            .await;
        assert!(events.is_empty());
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].error, "never created (after 1 tries)");
        assert_eq!(flight.settled, [(tp(), 5)]);
    }

    #[test]
    fn a_retry_the_batch_did_not_contain_is_refused() {
        let mut retries = retries(2);
        let outcome = BatchOutcome {
            retry: vec![(event(1), "x".into())],
            ..BatchOutcome::default()
        };
        assert!(retries.settle(InFlight::default(), &outcome).is_err());
    }
}
