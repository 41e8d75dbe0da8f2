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

/// A batch whose effects are durable: every event's outcome, the batch, the
/// MongoDB writes, and the commit-to-durable latency of each applied event.
///
/// The sink reports how many events were applied, fenced as duplicates or
/// unmatched, not which: the events that neither were dead-lettered nor
/// deferred nor of an unknown type count as applied in batch order, the rest
/// as duplicates. The totals are exact; a batch that mixes event types and
/// holds duplicates may attribute a duplicate to the wrong type.
///
/// The commit time is the carrier's where it says it, else the event's
/// `created_at` (`SourceBatch::commit_time`).
pub(super) fn durable(
    source: SourceKind,
    events: &[OutboxEvent],
    committed: &[Option<DateTime<Utc>>],
    report: &SinkReport,
) {
    let mut outcomes: BTreeMap<(&'static str, Outcome), u64> = BTreeMap::new();
    let mut add = |event_type: &str, outcome: Outcome| {
        *outcomes
            .entry((event_type_label(event_type), outcome))
            .or_default() += 1;
    };
    let dead: HashSet<Uuid> = report
        .dead_letters
        .iter()
        .map(|letter| letter.event.event_id)
        .collect();
    let deferred: HashSet<Uuid> = report
        .deferred
        .iter()
        .map(|(event, _)| event.event_id)
        .collect();
    for letter in &report.dead_letters {
        add(&letter.event.event_type, Outcome::DeadLettered);
    }
    let (mut applied, mut unmatched) = (report.applied, report.unmatched);
    let now = SystemTime::now();
    for (event, committed) in events.iter().zip(committed) {
        if dead.contains(&event.event_id) || deferred.contains(&event.event_id) {
            continue;
        }
        if unmatched > 0 && event_type_label(&event.event_type) == "other" {
            unmatched -= 1;
            add(&event.event_type, Outcome::UnknownType);
        } else if applied > 0 {
            applied -= 1;
            add(&event.event_type, Outcome::Applied);
            if let Some(committed) = committed {
                observe::commit_to_durable(elapsed(*committed, now));
            }
        } else {
            add(&event.event_type, Outcome::Duplicate);
        }
    }
    for ((event_type, outcome), n) in outcomes {
        observe::events(source, event_type, outcome, n);
    }
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
