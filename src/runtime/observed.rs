//! What the runtime records into the metrics (docs/operating.md): events by
//! source, type and outcome, batches, MongoDB writes and the latencies, once
//! a batch is durable and acknowledged.

use crate::config::SourceKind;
use crate::decode::OutboxEvent;
use crate::observe::{self, metrics::event_type_label, Outcome};
use crate::sink::SinkReport;
use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, SystemTime};
use uuid::Uuid;

/// Events of a batch as they arrive: received, and commit-to-received.
/// `committed` holds each event's commit time (`SourceBatch::commit_times`).
pub(super) fn received(
    source: SourceKind,
    events: &[OutboxEvent],
    committed: &[Option<DateTime<Utc>>],
    malformed: usize,
) {
    let mut by_type: BTreeMap<&'static str, u64> = BTreeMap::new();
    let now = SystemTime::now();
    for (event, committed) in events.iter().zip(committed) {
        *by_type
            .entry(event_type_label(&event.event_type))
            .or_default() += 1;
        if let Some(committed) = committed {
            observe::ingestion(elapsed(*committed, now));
        }
    }
    if malformed > 0 {
        *by_type.entry("other").or_default() += malformed as u64;
    }
    for (event_type, n) in by_type {
        observe::events(source, event_type, Outcome::Received, n);
    }
}

/// Per event of a batch, what the sink's report makes of it: `Applied`,
/// `Duplicate` or `UnknownType`, `None` for one dead-lettered or deferred
/// (those are counted from the report's own lists).
///
/// The sink reports how many events were applied, fenced as duplicates or
/// unmatched, not which: the events that neither were dead-lettered nor
/// deferred nor of an unknown type count as applied in batch order, the rest
/// as duplicates. The totals are exact; a batch that mixes event types and
/// holds duplicates may attribute a duplicate to the wrong type.
pub(super) fn outcomes(events: &[OutboxEvent], report: &SinkReport) -> Vec<Option<Outcome>> {
    let set_aside: HashSet<Uuid> = report
        .dead_letters
        .iter()
        .map(|letter| letter.event.event_id)
        .chain(report.deferred.iter().map(|(event, _)| event.event_id))
        .collect();
    let (mut applied, mut unmatched) = (report.applied, report.unmatched);
    events
        .iter()
        .map(|event| {
            if set_aside.contains(&event.event_id) {
                None
            } else if unmatched > 0 && event_type_label(&event.event_type) == "other" {
                unmatched -= 1;
                Some(Outcome::UnknownType)
            } else if applied > 0 {
                applied -= 1;
                Some(Outcome::Applied)
            } else {
                Some(Outcome::Duplicate)
            }
        })
        .collect()
}

/// The commit times of the applied events (`outcomes` of the batch).
pub(super) fn applied_commit_times(
    committed: &[Option<DateTime<Utc>>],
    outcomes: &[Option<Outcome>],
) -> Vec<Option<DateTime<Utc>>> {
    committed
        .iter()
        .zip(outcomes)
        .filter(|(_, outcome)| **outcome == Some(Outcome::Applied))
        .map(|(committed, _)| *committed)
        .collect()
}

/// A batch whose effects are durable: every event's outcome (`outcomes`),
/// the batch, the MongoDB writes, and the commit-to-durable latency of each
/// applied event. The commit time is the carrier's where it says it, else
/// the event's `created_at` (`SourceBatch::commit_time`).
pub(super) fn durable(
    source: SourceKind,
    events: &[OutboxEvent],
    committed: &[Option<DateTime<Utc>>],
    outcomes: &[Option<Outcome>],
    report: &SinkReport,
) {
    let mut counts: BTreeMap<(&'static str, Outcome), u64> = BTreeMap::new();
    let mut add = |event_type: &str, outcome: Outcome| {
        *counts
            .entry((event_type_label(event_type), outcome))
            .or_default() += 1;
    };
    for letter in &report.dead_letters {
        add(&letter.event.event_type, Outcome::DeadLettered);
    }
    for (event, outcome) in events.iter().zip(outcomes) {
        if let Some(outcome) = outcome {
            add(&event.event_type, *outcome);
        }
    }
    let now = SystemTime::now();
    for committed in applied_commit_times(committed, outcomes)
        .into_iter()
        .flatten()
    {
        observe::commit_to_durable(elapsed(committed, now));
    }
    for ((event_type, outcome), n) in counts {
        observe::events(source, event_type, outcome, n);
    }
    let dead: HashSet<Uuid> = report
        .dead_letters
        .iter()
        .map(|letter| letter.event.event_id)
        .collect();
    observe::batch(
        events.len()
            + report
                .dead_letters
                .len()
                .saturating_sub(dead_in(events, &dead)),
    );
    if report.round_trips > 0 || report.documents_written > 0 {
        observe::mongo(u64::from(report.round_trips), report.documents_written);
    }
}

/// From a commit to `now` (one clock reading a batch), zero if the clocks
/// disagree.
fn elapsed(commit: DateTime<Utc>, now: SystemTime) -> Duration {
    now.duration_since(commit.into()).unwrap_or_default()
}

/// How many of `events` are among the dead letters.
fn dead_in(events: &[OutboxEvent], dead: &HashSet<Uuid>) -> usize {
    events
        .iter()
        .filter(|event| dead.contains(&event.event_id))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dead_letter::DeadLetter;

    fn event(event_type: &str, minute: u32) -> OutboxEvent {
        OutboxEvent {
            event_id: Uuid::new_v4(),
            sequence_id: Some(i64::from(minute)),
            aggregate_id: Uuid::new_v4(),
            aggregate_type: "User".into(),
            event_type: event_type.into(),
            payload: serde_json::json!({}).into(),
            created_at: format!("2026-01-01T00:{minute:02}:00Z").parse().ok(),
        }
    }

    #[test]
    fn only_the_applied_events_are_measured() {
        let events = [
            event("UserCreated", 1),
            event("UserCreated", 2),
            event("NoSuchType", 3),
            event("UserRenamed", 4),
            event("UserCreated", 5),
        ];
        // The second is dead-lettered, the third unknown, the fourth
        // deferred; of the other two, one took effect and one was fenced.
        let report = SinkReport {
            applied: 1,
            unmatched: 1,
            dead_letters: vec![DeadLetter {
                event: events[1].clone(),
                error: "bad".into(),
                attempts: 1,
            }],
            deferred: vec![(events[3].clone(), "not created yet".into())],
            ..SinkReport::default()
        };
        let outcomes = outcomes(&events, &report);
        assert_eq!(
            outcomes,
            [
                Some(Outcome::Applied),
                None,
                Some(Outcome::UnknownType),
                None,
                Some(Outcome::Duplicate)
            ]
        );
        let committed: Vec<_> = events.iter().map(|event| event.created_at).collect();
        assert_eq!(
            applied_commit_times(&committed, &outcomes),
            [events[0].created_at]
        );
    }
}
