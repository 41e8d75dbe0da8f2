//! The runtime's counting into the stats file, and the order in which it
//! reads, applies and acknowledges batches.

use super::settle::count;
use super::*;
use crate::dead_letter::DeadLetter;
use std::sync::atomic::Ordering;

/// A pipeline configuration with short waits and retries, for tests.
pub(super) fn quick_config(batch_size: usize) -> PipelineConfig {
    PipelineConfig {
        batch_size,
        batch_wait: std::time::Duration::from_millis(1),
        document_cache: 0,
        max_retries: 1,
        backoff_initial: std::time::Duration::from_millis(1),
        backoff_max: std::time::Duration::from_millis(2),
        mark_processed: false,
        shutdown_timeout: std::time::Duration::from_secs(1),
    }
}

/// A `UserCreated` event of a new user.
fn user_created(
    sequence_id: i64,
    created_at: Option<chrono::DateTime<chrono::Utc>>,
) -> crate::decode::OutboxEvent {
    crate::decode::OutboxEvent {
        event_id: uuid::Uuid::new_v4(),
        sequence_id: Some(sequence_id),
        aggregate_id: uuid::Uuid::new_v4(),
        aggregate_type: "User".into(),
        event_type: "UserCreated".into(),
        payload: serde_json::json!({"email": "a@example.com", "displayName": "A"}).into(),
        created_at,
    }
}

/// What the relay's sink reports (published events applied, unpublishable
/// rows dead-lettered) reaches the stats file through the runtime's count.
#[test]
fn the_stats_file_counts_published_batches() {
    let dir = tempfile::tempdir().expect("temp folder");
    let path = dir.path().join("stats.json");
    let stats = Arc::new(Stats::default());
    let file = StatsFile::new(path.clone(), stats.clone());
    let now = chrono::Utc::now();
    let events = [
        user_created(1, Some(now)),
        user_created(1, Some(now)),
        user_created(1, None),
    ];
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

/// The order of a run, as its source and sink saw it.
type Log = Arc<std::sync::Mutex<Vec<String>>>;

fn note(log: &Log, line: String) {
    log.lock().expect("log").push(line);
}

/// A source of `left` one-event batches, numbered from 1, that notes each
/// read (and whether the sink was applying a batch meanwhile) and each
/// acknowledgement; stops the runtime once it has handed out all of them.
struct Scripted {
    left: u64,
    handed: u64,
    ahead: bool,
    applying: Arc<std::sync::atomic::AtomicBool>,
    log: Log,
    shutdown: CancellationToken,
}

impl Scripted {
    /// The next one-event batch, noting its read; none once all are out.
    fn hand_out(&mut self) -> Option<SourceBatch<u64>> {
        if self.handed == self.left {
            self.shutdown.cancel();
            return None;
        }
        self.handed += 1;
        let n = self.handed;
        note(&self.log, format!("read {n}{}", self.during()));
        Some(SourceBatch {
            events: vec![user_created(n as i64, None)],
            malformed: Vec::new(),
            ack: n,
            origins: Vec::new(),
            retried: Vec::new(),
            committed: Vec::new(),
        })
    }

    fn during(&self) -> &'static str {
        if self.applying.load(Ordering::SeqCst) {
            " during apply"
        } else {
            ""
        }
    }
}

impl Source for Scripted {
    type Ack = u64;

    async fn next_batch(
        &mut self,
        _max_events: usize,
        _max_wait: std::time::Duration,
    ) -> Result<Option<SourceBatch<u64>>, crate::source::SourceError> {
        Ok(self.hand_out())
    }

    /// Reads at once, and ends the batch only when the runtime says the
    /// sink is free.
    async fn next_batch_reading_on(
        &mut self,
        _max_events: usize,
        _max_wait: std::time::Duration,
        applied: &CancellationToken,
    ) -> Result<Option<SourceBatch<u64>>, crate::source::SourceError> {
        let batch = self.hand_out();
        applied.cancelled().await;
        note(
            &self.log,
            format!("read {} ends{}", self.handed, self.during()),
        );
        Ok(batch)
    }

    async fn ack(
        &mut self,
        ack: u64,
        _outcome: &BatchOutcome,
    ) -> Result<(), crate::source::SourceError> {
        note(&self.log, format!("ack {ack}"));
        Ok(())
    }

    fn fetch_ahead(&self) -> bool {
        self.ahead
    }

    async fn caught_up(&mut self) -> Result<bool, crate::source::SourceError> {
        Ok(false)
    }
}

/// A sink that takes a while over each batch and notes when it begins and
/// ends.
struct Slow {
    applying: Arc<std::sync::atomic::AtomicBool>,
    log: Log,
}

impl Sink for Slow {
    type Error = crate::source::SourceError;

    async fn apply<A: Sync>(&mut self, batch: &SourceBatch<A>) -> Result<SinkReport, Self::Error> {
        let n = batch.events[0].sequence_id.unwrap_or_default();
        note(&self.log, format!("apply {n} begins"));
        self.applying.store(true, Ordering::SeqCst);
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        self.applying.store(false, Ordering::SeqCst);
        note(&self.log, format!("apply {n} ends"));
        Ok(SinkReport {
            applied: batch.events.len(),
            ..SinkReport::default()
        })
    }
}

/// Runs `batches` batches through the runtime; its log.
async fn scripted_run(batches: u64, ahead: bool) -> Vec<String> {
    let log = Log::default();
    let applying = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let shutdown = CancellationToken::new();
    let shared = Shared {
        config: quick_config(10),
        source: SourceKind::Replication,
        shutdown: shutdown.clone(),
        stats: Arc::new(Stats::default()),
        until_caught_up: false,
        stats_file: None,
        health: crate::observe::Health::new(),
        durable_lsn: Arc::default(),
        acknowledged: Arc::default(),
    };
    let source = Scripted {
        left: batches,
        handed: 0,
        ahead,
        applying: applying.clone(),
        log: log.clone(),
        shutdown,
    };
    let sink = Slow {
        applying,
        log: log.clone(),
    };
    Pipeline::new(source, sink, &shared)
        .quiet()
        .run()
        .await
        .expect("the run ends cleanly");
    let lines = log.lock().expect("log").clone();
    lines
}

/// Where the source hands out ahead, the runtime reads batch n+1 while the
/// sink applies batch n (ending it once n is applied), and acknowledges
/// batch n after n+1 is applied; still each batch is acknowledged only once
/// applied, in order, and the last one as soon as the source goes quiet.
#[tokio::test]
async fn the_next_batch_is_read_while_the_sink_applies_and_batches_stay_in_order() {
    let log = scripted_run(5, true).await;
    let at = |line: String| {
        log.iter()
            .position(|l| *l == line)
            .unwrap_or_else(|| panic!("no `{line}` in {log:?}"))
    };
    for n in 2..=5 {
        assert!(at(format!("read {n} during apply")) < at(format!("apply {} ends", n - 1)));
        // The batch read on ends once the sink is free, before it is applied.
        assert!(at(format!("apply {} ends", n - 1)) < at(format!("read {n} ends")));
        assert!(at(format!("read {n} ends")) < at(format!("apply {n} begins")));
    }
    for n in 1..=5 {
        assert!(
            at(format!("apply {n} ends")) < at(format!("ack {n}")),
            "{log:?}"
        );
        if n < 5 {
            assert!(
                at(format!("apply {} ends", n + 1)) < at(format!("ack {n}")),
                "{log:?}"
            );
            assert!(
                at(format!("ack {n}")) < at(format!("ack {}", n + 1)),
                "{log:?}"
            );
        }
    }
}

/// A source that cannot hand out ahead is read only between batches.
#[tokio::test]
async fn a_source_that_cannot_hand_out_ahead_is_read_between_batches() {
    let log = scripted_run(3, false).await;
    assert!(!log.iter().any(|l| l.ends_with("during apply")), "{log:?}");
    assert_eq!(
        log.iter().filter(|l| l.starts_with("ack")).count(),
        3,
        "{log:?}"
    );
}
