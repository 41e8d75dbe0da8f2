//! Events whose aggregate did not exist when they were applied (with a
//! source where an aggregate's creation may arrive later: Kafka topics keyed
//! by `event_id`). The sink hands them back as deferred; the source holds
//! their position and hands them out again, with backoff, marked as
//! [`Retried`]. This module judges a retried event and keeps a record of each
//! one while it waits.
//!
//! Why a provisional dead letter records a deferred event: the projections
//! fence an aggregate at the highest `sequence_id` applied. If the process
//! dies while an event waits and a later event creates the aggregate
//! meanwhile, the redelivered copy is fenced off as "already seen" - so the
//! record of the event must already be durable. It is withdrawn when a retry
//! applies the event.

use crate::dead_letter::DeadLetter;
use crate::decode::OutboxEvent;
use crate::source::Retried;
use crate::store::mongo::{MongoStore, StoreError, ACTIVITIES, DEAD_LETTERS, USERS};
use mongodb::bson::{doc, Document};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use uuid::Uuid;

/// What the error of a provisional dead letter says (the event still
/// waits: `dead-letters retry` leaves such a letter alone).
pub const WAITING: &str = "waiting for its aggregate's creation";

/// What became of retried events.
#[derive(Debug, Default)]
pub struct DeferralStats {
    /// Dead-lettered after `MAX_RETRIES` tries.
    pub expired: AtomicU64,
    /// Dead-lettered because later events of their aggregate took effect
    /// first.
    pub out_of_order: AtomicU64,
}

/// The sink's side of deferred events.
#[derive(Debug, Clone)]
pub struct Deferral {
    pub max_retries: u32,
    pub stats: Arc<DeferralStats>,
}

/// What to do with a retried event.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// A copy of it (a redelivery) took effect meanwhile.
    Settled,
    Dead(Box<DeadLetter>),
    /// Apply it again.
    Retry,
}

impl Deferral {
    pub fn new(max_retries: u32) -> Deferral {
        Deferral {
            max_retries: max_retries.max(1),
            stats: Arc::default(),
        }
    }

    /// A retried event, given its aggregate's fence (`_seq`) if the aggregate exists.
    pub fn judge(&self, event: &OutboxEvent, retried: &Retried, fence: Option<i64>) -> Verdict {
        let seq = event.sequence_id.unwrap_or(i64::MIN);
        match fence {
            Some(fence) if fence == seq => Verdict::Settled,
            Some(fence) if fence > seq => {
                self.stats.out_of_order.fetch_add(1, Ordering::Relaxed);
                Verdict::Dead(Box::new(DeadLetter {
                    error: format!(
                        "{}; meanwhile later events of {} {} took effect (up to sequence_id {fence}), \
                         so this one arrived out of order and can no longer apply: \
                         partition the topic by aggregate_id",
                        retried.error, event.aggregate_type, event.aggregate_id
                    ),
                    attempts: retried.attempts,
                    event: event.clone(),
                }))
            }
            _ if retried.attempts >= self.max_retries => {
                self.stats.expired.fetch_add(1, Ordering::Relaxed);
                Verdict::Dead(Box::new(DeadLetter {
                    error: format!("{} (after {} tries)", retried.error, retried.attempts),
                    attempts: retried.attempts,
                    event: event.clone(),
                }))
            }
            _ => Verdict::Retry,
        }
    }

    /// The provisional dead letter of a newly deferred event.
    pub fn provisional(&self, event: &OutboxEvent, error: &str) -> DeadLetter {
        DeadLetter {
            event: event.clone(),
            error: format!("{error} ({WAITING}; tried 1 of {} times)", self.max_retries),
            attempts: 1,
        }
    }
}

/// The `_seq` fence of each event's aggregate, where it exists.
pub async fn fences(
    store: &MongoStore,
    events: &[&OutboxEvent],
) -> Result<HashMap<(String, Uuid), i64>, StoreError> {
    let mut fences = HashMap::new();
    for (aggregate_type, collection) in [("User", USERS), ("Activity", ACTIVITIES)] {
        let ids: BTreeSet<String> = events
            .iter()
            .filter(|e| e.aggregate_type == aggregate_type)
            .map(|e| e.aggregate_id.to_string())
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

/// Withdraws the provisional dead letters of events a retry applied.
pub async fn withdraw(store: &MongoStore, ids: &[Uuid]) -> Result<(), StoreError> {
    if ids.is_empty() {
        return Ok(());
    }
    let ids: Vec<String> = ids.iter().map(Uuid::to_string).collect();
    store.delete_ids(DEAD_LETTERS, ids).await
}

fn doc_id(doc: &Document) -> Option<Uuid> {
    doc.get_str("_id")
        .ok()
        .and_then(|s| Uuid::parse_str(s).ok())
}

fn fence_of(doc: &Document) -> Option<i64> {
    crate::projection::state::read_i64(doc, "_seq").ok()
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

    fn retried(event: &OutboxEvent, attempts: u32) -> Retried {
        Retried {
            event_id: event.event_id,
            attempts,
            error: "never created".into(),
        }
    }

    #[test]
    fn the_last_try_dead_letters() {
        let deferral = Deferral::new(1);
        let e = event(3);
        let Verdict::Dead(letter) = deferral.judge(&e, &retried(&e, 1), None) else {
            panic!("not dead-lettered");
        };
        assert_eq!(letter.error, "never created (after 1 tries)");
        assert_eq!(deferral.stats.expired.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_fence_settles_or_dead_letters_a_retried_event() {
        let deferral = Deferral::new(8);
        let e = event(5);
        assert_eq!(
            deferral.judge(&e, &retried(&e, 1), Some(5)),
            Verdict::Settled
        );
        assert!(matches!(
            deferral.judge(&e, &retried(&e, 1), Some(9)),
            Verdict::Dead(letter) if letter.error.contains("out of order")
        ));
        assert_eq!(deferral.judge(&e, &retried(&e, 1), Some(2)), Verdict::Retry);
        assert_eq!(deferral.judge(&e, &retried(&e, 1), None), Verdict::Retry);
    }
}
