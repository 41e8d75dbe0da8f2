//! The runtime's counting into the stats file.

use super::settle::count;
use super::*;
use crate::dead_letter::DeadLetter;

/// What the relay's sink reports (published events applied, unpublishable
/// rows dead-lettered) reaches the stats file through the runtime's count.
#[test]
fn the_stats_file_counts_published_batches() {
    let dir = tempfile::tempdir().expect("temp folder");
    let path = dir.path().join("stats.json");
    let stats = Arc::new(Stats::default());
    let file = StatsFile::new(path.clone(), stats.clone());
    let event = |created_at| crate::decode::OutboxEvent {
        event_id: uuid::Uuid::new_v4(),
        sequence_id: Some(1),
        aggregate_id: uuid::Uuid::new_v4(),
        aggregate_type: "User".into(),
        event_type: "UserCreated".into(),
        payload: serde_json::json!({"email": "a@example.com", "displayName": "A"}).into(),
        created_at,
    };
    let now = chrono::Utc::now();
    let events = [event(Some(now)), event(Some(now)), event(None)];
    let letter = |event: &crate::decode::OutboxEvent| DeadLetter {
        event: event.clone(),
        error: "malformed".into(),
        attempts: 1,
    };
    let published = |events: &[crate::decode::OutboxEvent], dead: usize| SinkReport {
        applied: events.len(),
        dead_letters: (0..dead).map(|_| letter(&events[0])).collect(),
        ..SinkReport::default()
    };
    let committed: Vec<_> = events.iter().map(|event| event.created_at).collect();
    file.durable(&committed);
    count(&stats, &published(&events, 0), Some(&file));
    file.durable(&committed[..1]);
    count(&stats, &published(&events[..1], 2), Some(&file));
    file.write(true).expect("write");
    let report: crate::stats_file::StatsReport =
        serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("parse");
    assert_eq!(report.applied, 4);
    assert_eq!(report.dead_lettered, 2);
    assert_eq!(report.done, 6);
    assert_eq!(report.batches, 2);
    assert!(report.last_done_unix_ms.is_some());
    // Commit-to-durable latency of the events that have a `created_at`.
    assert_eq!(report.latency.count, 3);
}
