//! The replication source's clock and pulse, on the real services:
//! - an event's latency runs from its transaction's commit (pgoutput's
//!   `Begin`), not from the row's `created_at`: a row written with a
//!   `created_at` an hour old is durable within seconds of its commit, for
//!   `run` and for the relay;
//! - the heartbeat (`HEARTBEAT_INTERVAL`): on an idle outbox, while the
//!   database writes other WAL, the slot's `confirmed_flush_lsn` and the
//!   checkpoint move at each heartbeat, its round trip and count show on
//!   `/metrics`, and no event comes of it; `off` writes none; a bad value is
//!   a configuration error (exit 2) naming the key.

mod common;

use activity_event_history::{generate, HistoryOptions};
use activity_event_processor::decode::OutboxEvent;
use common::faults::{confirmed_flush, mongo_checkpoint, spawn_run, wait_for_line};
use common::kafka::{self, Proc};
use common::observe::{events_with, scrape, served_at};
use common::pipeline::Stage;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const LIMIT: Duration = Duration::from_secs(120);

/// `history` written an hour ago, as far as `created_at` says.
fn an_hour_old(history: &[OutboxEvent]) -> Vec<OutboxEvent> {
    let hour_ago = chrono::Utc::now() - chrono::Duration::hours(1);
    history
        .iter()
        .cloned()
        .map(|mut event| {
            event.created_at = Some(hour_ago);
            event
        })
        .collect()
}

/// Scrapes until every event of `history` has come to its end (applied,
/// dead-lettered or of an unknown type).
async fn scrape_done(addr: SocketAddr, history: &[OutboxEvent]) -> BTreeMap<String, f64> {
    let start = Instant::now();
    loop {
        let samples = scrape(addr).await;
        let done = events_with(&samples, "applied")
            + events_with(&samples, "dead_lettered")
            + events_with(&samples, "unknown_type");
        if done >= history.len() as u64 {
            return samples;
        }
        assert!(
            start.elapsed() < LIMIT,
            "{done} of {} events done",
            history.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every latency observed in `histogram` (`..._seconds`) is under 10 s
/// (a loaded machine's few seconds): none runs from the hour-old
/// `created_at`.
fn assert_from_the_commit(samples: &BTreeMap<String, f64>, histogram: &str, at_least: u64) {
    let count = samples[&format!("{histogram}_count")];
    let sum = samples[&format!("{histogram}_sum")];
    assert!(
        count >= at_least as f64,
        "{histogram}: {count} observations"
    );
    let bucket = format!("{histogram}_bucket{{le=\"");
    let under_10s = samples
        .iter()
        .find_map(|(series, value)| {
            let le: f64 = series
                .strip_prefix(&bucket)?
                .strip_suffix("\"}")?
                .parse()
                .ok()?;
            (le == 10.0).then_some(*value)
        })
        .unwrap_or_else(|| panic!("no 10 s bucket of {histogram}"));
    assert_eq!(
        under_10s, count,
        "{histogram}: every latency under 10 s, from the commit (sum {sum} s over {count}: \
         an hour each when measured from created_at)"
    );
    assert!(sum / count < 10.0, "{histogram}: mean {} s", sum / count);
    eprintln!(
        "{histogram}: {count} observations, mean {:.4} s",
        sum / count
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn replication_latency_runs_from_the_commit_not_from_created_at() {
    let stage = Stage::new().await;
    let _slots = kafka::Slots(stage.pg.config.clone());
    let log = stage.log_path().with_extension("commit-time.log");
    let mut run = spawn_run(&stage, &["--source", "replication"], &[], &log);
    let addr = served_at(&log, &mut run).await;
    // Streaming (the empty outbox's snapshot is read): what comes now
    // comes through pgoutput, with its transaction's commit time.
    wait_for_line(&log, "replication streaming", 0, LIMIT).await;
    let history = an_hour_old(&generate(1401, &HistoryOptions::realistic(200)));
    stage.load(&history).await;
    stage.wait_converged(&history, LIMIT).await;
    let samples = scrape_done(addr, &history).await;
    let applied = events_with(&samples, "applied");
    assert!(applied > 0);
    assert_eq!(
        samples["event_processor_commit_to_durable_seconds_count"] as u64,
        applied
    );
    assert_from_the_commit(
        &samples,
        "event_processor_commit_to_durable_seconds",
        applied,
    );
    assert_from_the_commit(&samples, "event_processor_ingestion_seconds", applied);
    drop(run);
    stage.assert_converged(&history, true).await;
    let _ = std::fs::remove_file(log);
}

/// Writes a row to a table of no interest to the processor every 100 ms
/// until `stop`: WAL the slot must move past, with no outbox event.
fn write_other_wal(stage: &Stage, stop: CancellationToken) -> tokio::task::JoinHandle<u64> {
    let config = stage.pg.config.clone();
    tokio::spawn(async move {
        let client = common::connect(&config).await;
        client
            .batch_execute("CREATE TABLE IF NOT EXISTS unrelated (id bigserial PRIMARY KEY, at timestamptz DEFAULT now())")
            .await
            .expect("a table of no interest");
        let mut written = 0;
        while !stop.is_cancelled() {
            client
                .execute("INSERT INTO unrelated DEFAULT VALUES", &[])
                .await
                .expect("write other WAL");
            written += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        written
    })
}

/// The distinct values `read` gives over `span`, read every 250 ms.
async fn watch<F, Fut>(span: Duration, mut read: F) -> Vec<u64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<u64>>,
{
    let start = Instant::now();
    let mut seen: Vec<u64> = Vec::new();
    while start.elapsed() < span {
        if let Some(value) = read().await {
            if seen.last() != Some(&value) {
                seen.push(value);
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    seen
}

#[tokio::test(flavor = "multi_thread")]
async fn heartbeats_move_an_idle_slot_and_measure_the_round_trip() {
    let stage = Stage::new().await;
    let _slots = kafka::Slots(stage.pg.config.clone());
    let log = stage.log_path().with_extension("heartbeat.log");
    let mut run = spawn_run(
        &stage,
        &["--source", "replication"],
        &[("HEARTBEAT_INTERVAL", "1s".into())],
        &log,
    );
    let addr = served_at(&log, &mut run).await;
    wait_for_line(&log, "replication streaming", 0, LIMIT).await;
    let stop = CancellationToken::new();
    let writer = write_other_wal(&stage, stop.clone());
    let before = scrape(addr).await;
    // The position moves at each heartbeat, not only every 10 s (the pace
    // at which it moves past other WAL without one).
    let slot = stage.slot.clone();
    let positions = watch(Duration::from_secs(8), || confirmed_flush(&stage, &slot)).await;
    let checkpoints = watch(Duration::from_secs(4), || mongo_checkpoint(&stage, &slot)).await;
    let after = scrape(addr).await;
    stop.cancel();
    let written = writer.await.expect("the writer");
    assert!(written > 20, "{written} rows of other WAL");
    assert!(
        positions.len() >= 4 && positions.windows(2).all(|pair| pair[0] < pair[1]),
        "the slot's confirmed_flush_lsn over 8 s: {positions:x?}\n{}",
        kafka::tail(&log)
    );
    assert!(
        checkpoints.len() >= 2 && checkpoints.windows(2).all(|pair| pair[0] < pair[1]),
        "the checkpoint over 4 s: {checkpoints:x?}"
    );
    let emitted =
        |samples: &BTreeMap<String, f64>| samples["event_processor_heartbeats_emitted_total"];
    assert!(
        emitted(&after) >= emitted(&before) + 5.0,
        "heartbeats emitted: {} then {}",
        emitted(&before),
        emitted(&after)
    );
    let round_trip = after["event_processor_heartbeat_round_trip_seconds"];
    assert!(
        round_trip > 0.0 && round_trip < 5.0,
        "round trip {round_trip} s"
    );
    eprintln!(
        "heartbeat round trip {round_trip} s; the slot moved {} times in 8 s, the checkpoint {} times in 4 s",
        positions.len() - 1,
        checkpoints.len() - 1
    );
    // No event comes of a heartbeat.
    for outcome in ["received", "applied", "dead_lettered", "unknown_type"] {
        assert_eq!(events_with(&after, outcome), 0, "{outcome}");
    }
    assert_eq!(
        after["event_processor_commit_to_durable_seconds_count"],
        0.0
    );
    let letters = stage
        .mongo
        .store
        .find("dead_letters", mongodb::bson::doc! {}, None)
        .await
        .expect("dead letters");
    assert!(letters.is_empty(), "{letters:?}");
    // And an outbox row written now is applied as usual.
    let history = generate(1402, &HistoryOptions::realistic(50));
    stage.load(&history).await;
    stage.wait_converged(&history, LIMIT).await;
    drop(run);
    stage.assert_converged(&history, true).await;
    let _ = std::fs::remove_file(log);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_heartbeat_off_none_is_written() {
    let stage = Stage::new().await;
    let _slots = kafka::Slots(stage.pg.config.clone());
    let log = stage.log_path().with_extension("heartbeat-off.log");
    let mut run = spawn_run(
        &stage,
        &["--source", "replication"],
        &[("HEARTBEAT_INTERVAL", "off".into())],
        &log,
    );
    let addr = served_at(&log, &mut run).await;
    wait_for_line(&log, "replication streaming", 0, LIMIT).await;
    let stop = CancellationToken::new();
    let writer = write_other_wal(&stage, stop.clone());
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.cancel();
    writer.await.expect("the writer");
    let samples = scrape(addr).await;
    assert_eq!(samples["event_processor_heartbeats_emitted_total"], 0.0);
    assert_eq!(samples["event_processor_heartbeat_round_trip_seconds"], 0.0);
    drop(run);
    let _ = std::fs::remove_file(log);
}

#[test]
fn a_bad_heartbeat_interval_is_a_configuration_error() {
    for command in ["run", "relay"] {
        // Nothing is reachable: the value is refused before anything starts.
        let out = common::run_binary(
            &[command],
            &[
                ("HEARTBEAT_INTERVAL", "often".into()),
                ("POSTGRES_PORT", "1".into()),
            ],
        );
        assert_eq!(out.status.code(), Some(2), "{command}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.starts_with(
                "invalid configuration: HEARTBEAT_INTERVAL: `often` is not a duration"
            ),
            "{command}: {stderr}"
        );
    }
}

/// The relay, on its own slot: the same commit times and heartbeat.
#[tokio::test(flavor = "multi_thread")]
async fn the_relay_measures_from_the_commit_and_moves_its_idle_slot() {
    let stage = Stage::new().await;
    let _slots = kafka::Slots(stage.pg.config.clone());
    let topic = kafka::fresh("heartbeat");
    kafka::create_topic(&topic, 1).await;
    let mut env = stage.env();
    env.extend(kafka::kafka_env(&topic, &kafka::fresh("group")));
    env.push(("LOG_LEVEL", "info".into()));
    env.push(("HEARTBEAT_INTERVAL", "1s".into()));
    let log = stage.log_path().with_extension("relay-heartbeat.log");
    let mut relay = kafka::spawn(&["relay"], &env, &log);
    let addr = served_at(&log, &mut relay).await;
    let slot = format!("{}_relay", stage.slot);
    // `<slot>_relay` exists once the (empty) snapshot is published.
    wait_for_slot(&stage, &slot, &log, &mut relay).await;
    let positions = watch(Duration::from_secs(6), || confirmed_flush(&stage, &slot)).await;
    assert!(
        positions.len() >= 3 && positions.windows(2).all(|pair| pair[0] < pair[1]),
        "the relay slot's confirmed_flush_lsn over 6 s: {positions:x?}\n{}",
        kafka::tail(&log)
    );
    let history = an_hour_old(&generate(1403, &HistoryOptions::realistic(100)));
    stage.load(&history).await;
    let samples = scrape_done(addr, &history).await;
    let published = events_with(&samples, "applied");
    assert_from_the_commit(
        &samples,
        "event_processor_commit_to_durable_seconds",
        published,
    );
    assert!(samples["event_processor_heartbeat_round_trip_seconds"] > 0.0);
    assert!(samples["event_processor_heartbeats_emitted_total"] >= 3.0);
    drop(relay);
    let _ = std::fs::remove_file(log);
}

async fn wait_for_slot(stage: &Stage, slot: &str, log: &Path, process: &mut Proc) {
    let start = Instant::now();
    while confirmed_flush(stage, slot).await.is_none() {
        assert!(
            process.0.try_wait().expect("wait").is_none(),
            "the process ended:\n{}",
            kafka::tail(log)
        );
        assert!(
            start.elapsed() < LIMIT,
            "no slot {slot}:\n{}",
            kafka::tail(log)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
