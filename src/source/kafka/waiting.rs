//! Events whose aggregate did not exist when they were applied: they wait,
//! with backoff, for another try, and until they are settled (applied or
//! dead-lettered) their offsets hold back their partition's commit, so that a
//! crash or a rebalance redelivers them instead of losing them.

use super::client::Tp;
use crate::decode::OutboxEvent;
use crate::policy::Backoff;
use chrono::{DateTime, Utc};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// One deferred event and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Deferred {
    pub event: OutboxEvent,
    pub tp: Tp,
    pub offset: i64,
    /// When its transaction committed, if its record says it.
    pub committed: Option<DateTime<Utc>>,
    /// Tries so far (the first application counts).
    pub attempts: u32,
    pub due: Instant,
    /// Why the last try failed.
    pub error: String,
}

/// The queue of deferred events and the offsets they hold.
#[derive(Debug, Default)]
pub struct Waiting {
    queue: Vec<Deferred>,
    /// Per partition, the offsets of unsettled deferred events (with counts:
    /// the same offset may be held twice by a redelivery).
    holds: BTreeMap<Tp, BTreeMap<i64, u32>>,
}

impl Waiting {
    /// An event's offset is held until [`Waiting::release`].
    pub fn hold(&mut self, tp: &Tp, offset: i64) {
        *self
            .holds
            .entry(tp.clone())
            .or_default()
            .entry(offset)
            .or_default() += 1;
    }

    pub fn release(&mut self, tp: &Tp, offset: i64) {
        let Some(offsets) = self.holds.get_mut(tp) else {
            return;
        };
        if let Some(count) = offsets.get_mut(&offset) {
            *count -= 1;
            if *count == 0 {
                offsets.remove(&offset);
            }
        }
        if offsets.is_empty() {
            self.holds.remove(tp);
        }
    }

    /// Queues an event for its next try (its offset must be held).
    pub fn push(&mut self, deferred: Deferred) {
        self.queue.push(deferred);
    }

    /// Events whose time has come, at most `max`, in `sequence_id` order.
    pub fn take_due(&mut self, now: Instant, max: usize) -> Vec<Deferred> {
        let mut due = Vec::new();
        let mut rest = Vec::with_capacity(self.queue.len());
        for deferred in self.queue.drain(..) {
            if deferred.due <= now && due.len() < max {
                due.push(deferred);
            } else {
                rest.push(deferred);
            }
        }
        self.queue = rest;
        due.sort_by_key(|d| (d.event.sequence_id, d.offset));
        due
    }

    /// When the next queued event is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.queue.iter().map(|d| d.due).min()
    }

    /// The lowest held offset of a partition: nothing at or past it may be committed.
    pub fn lowest_hold(&self, tp: &Tp) -> Option<i64> {
        self.holds
            .get(tp)
            .and_then(|offsets| offsets.keys().next().copied())
    }

    /// Unsettled events (queued or in a batch in flight).
    pub fn held(&self) -> usize {
        self.holds
            .values()
            .flat_map(BTreeMap::values)
            .map(|c| *c as usize)
            .sum()
    }

    /// Forgets revoked partitions: their new owner reads them again from the
    /// committed offset, which is below every hold.
    pub fn forget(&mut self, tp: &Tp) {
        self.holds.remove(tp);
        self.queue.retain(|d| &d.tp != tp);
    }
}

/// The pause before try number `attempts + 1`: capped exponential, jittered.
pub fn delay(attempts: u32, initial: Duration, max: Duration) -> Duration {
    let mut backoff = Backoff::new(initial, max);
    let mut delay = Duration::ZERO;
    for _ in 0..attempts.max(1) {
        delay = backoff.next_delay();
    }
    delay
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deferred(seq: i64, offset: i64, due: Instant) -> Deferred {
        Deferred {
            event: OutboxEvent {
                event_id: uuid::Uuid::new_v4(),
                sequence_id: Some(seq),
                aggregate_id: uuid::Uuid::new_v4(),
                aggregate_type: "User".into(),
                event_type: "UserUpdated".into(),
                payload: serde_json::json!({}).into(),
                created_at: None,
            },
            tp: ("t".into(), 0),
            offset,
            committed: None,
            attempts: 1,
            due,
            error: "never created".into(),
        }
    }

    #[test]
    fn holds_are_counted_and_the_lowest_blocks_the_commit() {
        let mut waiting = Waiting::default();
        let tp: Tp = ("t".into(), 0);
        waiting.hold(&tp, 7);
        waiting.hold(&tp, 3);
        waiting.hold(&tp, 3);
        assert_eq!(waiting.lowest_hold(&tp), Some(3));
        assert_eq!(waiting.held(), 3);
        waiting.release(&tp, 3);
        assert_eq!(waiting.lowest_hold(&tp), Some(3));
        waiting.release(&tp, 3);
        assert_eq!(waiting.lowest_hold(&tp), Some(7));
        waiting.release(&tp, 7);
        assert_eq!(waiting.lowest_hold(&tp), None);
        assert_eq!(waiting.held(), 0);
        waiting.release(&tp, 7);
        assert_eq!(waiting.held(), 0);
    }

    #[test]
    fn due_events_come_in_sequence_order_and_the_rest_wait() {
        let now = Instant::now();
        let mut waiting = Waiting::default();
        waiting.push(deferred(9, 1, now));
        waiting.push(deferred(4, 2, now));
        waiting.push(deferred(5, 3, now + Duration::from_secs(60)));
        let due = waiting.take_due(now, 10);
        let seqs: Vec<Option<i64>> = due.iter().map(|d| d.event.sequence_id).collect();
        assert_eq!(seqs, [Some(4), Some(9)]);
        assert_eq!(waiting.next_due(), Some(now + Duration::from_secs(60)));
        assert!(waiting.take_due(now, 10).is_empty());
    }

    #[test]
    fn forgetting_a_partition_drops_its_events_and_holds() {
        let now = Instant::now();
        let mut waiting = Waiting::default();
        let d = deferred(1, 5, now);
        waiting.hold(&d.tp, d.offset);
        let tp = d.tp.clone();
        waiting.push(d);
        waiting.forget(&tp);
        assert_eq!(waiting.held(), 0);
        assert!(waiting.take_due(now, 10).is_empty());
    }

    #[test]
    fn delays_grow() {
        let initial = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        assert!(delay(1, initial, max) <= initial);
        assert!(delay(4, initial, max) >= Duration::from_millis(400));
        assert!(delay(30, initial, max) <= max);
    }
}
