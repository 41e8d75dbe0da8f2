//! What becomes of events the sink deferred (their aggregate did not exist
//! yet; `BatchOutcome::retry`): they wait ([`Waiting`]) and are handed out
//! again, marked [`Retried`], while their offsets hold back their partition's
//! commit. The sink judges a retried event and keeps the record of a waiting
//! one (`sink::deferral`).

use super::client::Tp;
use super::stats::KafkaStats;
use super::waiting::{delay, Deferred, Waiting};
use super::SourceError;
use crate::decode::OutboxEvent;
use crate::source::{BatchOutcome, Retried};
use chrono::{DateTime, Utc};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// An event as handed out, with its commit time (if the record says it).
pub type Timed = (OutboxEvent, Option<DateTime<Utc>>);

/// A new event of a batch in flight.
#[derive(Debug, Clone, PartialEq)]
pub struct Fresh {
    pub id: Uuid,
    pub tp: Tp,
    pub offset: i64,
    pub committed: Option<DateTime<Utc>>,
}

/// A batch handed out and not yet acknowledged: what its events were.
#[derive(Debug, Default)]
pub struct InFlight {
    pub batch: u64,
    /// New events.
    pub fresh: Vec<Fresh>,
    /// Deferred events tried again in this batch.
    pub retried: Vec<Deferred>,
}

pub struct Retries {
    pub waiting: Waiting,
    backoff: (Duration, Duration),
    stats: Arc<KafkaStats>,
}

impl Retries {
    pub fn new(backoff: (Duration, Duration), stats: Arc<KafkaStats>) -> Retries {
        Retries {
            waiting: Waiting::default(),
            backoff,
            stats,
        }
    }

    /// Nothing waits.
    pub fn idle(&self) -> bool {
        self.waiting.held() == 0
    }

    /// Due retries, back into the batch (`events`, with their commit
    /// times), marked as retried.
    pub fn hand_out(
        &mut self,
        due: Vec<Deferred>,
        events: &mut Vec<Timed>,
        retried: &mut Vec<Retried>,
        flight: &mut InFlight,
    ) {
        for deferred in due {
            self.stats.retried.fetch_add(1, Ordering::Relaxed);
            events.push((deferred.event.clone(), deferred.committed));
            retried.push(Retried {
                event_id: deferred.event.event_id,
                attempts: deferred.attempts,
                error: deferred.error.clone(),
            });
            flight.retried.push(deferred);
        }
    }

    /// Takes a batch's outcome into account: which deferred events wait
    /// (again), and which are settled (applied, dead-lettered, or found
    /// applied already).
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
                None => self.waiting.release(&deferred.tp, deferred.offset),
            }
        }
        for fresh in flight.fresh {
            if let Some((event, error)) = take(&fresh.id) {
                self.stats.deferred.fetch_add(1, Ordering::Relaxed);
                self.waiting.hold(&fresh.tp, fresh.offset);
                self.waiting.push(Deferred {
                    event,
                    tp: fresh.tp,
                    offset: fresh.offset,
                    committed: fresh.committed,
                    attempts: 1,
                    due: now + delay(1, initial, max),
                    error,
                });
            }
        }
        match retry.into_iter().find(|(_, left)| !left.is_empty()) {
            Some((id, _)) => Err(SourceError::Fatal(format!(
                "the pipeline asked to retry event {id}, which was not in the batch"
            ))),
            None => Ok(()),
        }
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
            payload: json!({"displayName": "x"}).into(),
            created_at: None,
        }
    }

    fn retries() -> Retries {
        let zero = Duration::from_millis(1);
        Retries::new((zero, zero), Arc::new(KafkaStats::default()))
    }

    fn tp() -> Tp {
        ("t".into(), 0)
    }

    #[test]
    fn a_deferred_event_holds_its_offset_until_settled() {
        let mut retries = retries();
        let e = event(7);
        let flight = InFlight {
            batch: 1,
            fresh: vec![Fresh {
                id: e.event_id,
                tp: tp(),
                offset: 40,
                committed: DateTime::from_timestamp_millis(1_789_465_267_512),
            }],
            ..InFlight::default()
        };
        let outcome = BatchOutcome {
            retry: vec![(e.clone(), "never created".into())],
            ..BatchOutcome::default()
        };
        retries.settle(flight, &outcome).expect("settle");
        assert_eq!(retries.waiting.lowest_hold(&tp()), Some(40));
        assert!(!retries.idle());

        // It is handed out again, marked retried; its retry applies it: the hold goes.
        std::thread::sleep(Duration::from_millis(5));
        let due = retries.waiting.take_due(Instant::now(), 10);
        assert_eq!(due.len(), 1);
        let (mut events, mut retried, mut flight) = (Vec::new(), Vec::new(), InFlight::default());
        retries.hand_out(due, &mut events, &mut retried, &mut flight);
        // With its commit time: its latency counts from the commit, waits included.
        assert_eq!(
            events,
            [(
                e.clone(),
                DateTime::from_timestamp_millis(1_789_465_267_512)
            )]
        );
        assert_eq!(retried[0].attempts, 1);
        assert_eq!(retried[0].error, "never created");
        flight.batch = 2;
        retries
            .settle(flight, &BatchOutcome::default())
            .expect("settle");
        assert_eq!(retries.waiting.lowest_hold(&tp()), None);
        assert!(retries.idle());
    }

    #[test]
    fn a_retry_the_batch_did_not_contain_is_refused() {
        let mut retries = retries();
        let outcome = BatchOutcome {
            retry: vec![(event(1), "x".into())],
            ..BatchOutcome::default()
        };
        assert!(retries.settle(InFlight::default(), &outcome).is_err());
    }
}
