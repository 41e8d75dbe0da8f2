//! `run` (logical replication, the default source) against real PostgreSQL and
//! MongoDB-wire servers: snapshot then stream, kill -9 at random points,
//! PostgreSQL crashing mid-stream, a late commit, and MongoDB frozen mid-stream
//! (the slot never passes what MongoDB holds; nothing is dead-lettered for it).

mod common;

use activity_event_history::{generate, HistoryOptions};
use common::pipeline::{kill_9, Stage};
use common::services::OwnServices;
use mongodb::bson::doc;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(900);

fn parse_lsn(text: &str) -> u64 {
    let (hi, lo) = text.split_once('/').expect("lsn is X/Y");
    (u64::from_str_radix(hi, 16).expect("hex") << 32) | u64::from_str_radix(lo, 16).expect("hex")
}

/// The slot's confirmed position, if the slot exists yet.
async fn confirmed_flush(stage: &Stage) -> Option<u64> {
    let client = stage.pg.client().await;
    let row = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&stage.slot],
        )
        .await
        .expect("slot query")?;
    row.get::<_, Option<String>>(0).map(|t| parse_lsn(&t))
}

/// The position MongoDB durably holds (the processor's checkpoint).
async fn mongo_checkpoint(stage: &Stage) -> Option<u64> {
    let docs = stage
        .mongo
        .store
        .find("processor_checkpoints", doc! { "_id": &stage.slot }, None)
        .await
        .expect("checkpoint");
    docs.first()
        .and_then(|d| d.get_i64("lsn").ok())
        .map(|l| l as u64)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_20k_history_is_snapshotted_then_streamed_to_the_fold() {
    let stage = Stage::new().await;
    let history = generate(20_000, &HistoryOptions::realistic(20_000));
    // Half exists before the slot (the snapshot), half comes after (the stream).
    stage.load(&history[..10_000]).await;
    stage.run_until_caught_up(&[], &[], LIMIT);
    stage.load(&history[10_000..]).await;
    stage.run_until_caught_up(&[], &[], LIMIT);
    stage.assert_converged(&history, true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_at_random_points_loses_nothing_and_applies_nothing_twice() {
    let stage = Stage::new().await;
    let history = generate(99, &HistoryOptions::realistic(6_000));
    stage.load(&history[..2_000]).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    let mut loaded = 2_000;
    let small_batches = [("BATCH_SIZE", "100".to_string())];
    for round in 0..6 {
        let mut child = stage.spawn(&[], &small_batches);
        std::thread::sleep(Duration::from_millis(rng.gen_range(200..1500)));
        // New rows arrive while it runs (and while it is dead).
        let next = (loaded + 700).min(history.len());
        stage.load(&history[loaded..next]).await;
        loaded = next;
        std::thread::sleep(Duration::from_millis(rng.gen_range(100..800)));
        kill_9(&mut child);
        eprintln!("kill -9 #{} done", round + 1);
    }
    stage.load(&history[loaded..]).await;
    stage.run_until_caught_up(&[], &[], LIMIT);
    stage.assert_converged(&history, true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_late_commit_is_applied_not_skipped() {
    let stage = Stage::new().await;
    // The slot exists first: everything below arrives through the stream.
    stage.run_until_caught_up(&[], &[], LIMIT);
    let (late, early) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let writer_a = stage.pg.client().await;
    writer_a.batch_execute("BEGIN").await.expect("begin");
    writer_a
        .execute(
            "INSERT INTO event_outbox (event_id, aggregate_id, aggregate_type, event_type, payload)
             VALUES ($1, $1, 'User', 'UserCreated', $2)",
            &[&late, &json!({"email": "late@x", "displayName": "Late"})],
        )
        .await
        .expect("insert late");
    let writer_b = stage.pg.client().await;
    writer_b
        .execute(
            "INSERT INTO event_outbox (event_id, aggregate_id, aggregate_type, event_type, payload)
             VALUES ($1, $1, 'User', 'UserCreated', $2)",
            &[&early, &json!({"email": "early@x", "displayName": "Early"})],
        )
        .await
        .expect("insert early");
    stage.run_until_caught_up(&[], &[], LIMIT);
    let before = stage.mongo.read_models().await;
    assert!(before.users.contains_key(&early.to_string()));
    assert!(!before.users.contains_key(&late.to_string()));
    writer_a.batch_execute("COMMIT").await.expect("commit late");
    stage.run_until_caught_up(&[], &[], LIMIT);
    let models = stage.mongo.read_models().await;
    assert_eq!(models.users[&late.to_string()]["display_name"], "Late");
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_crashing_mid_stream_is_survived_and_sigterm_exits_cleanly() {
    let services = OwnServices::up(&["pg", "mongo"]);
    let stage = Stage::on(&services).await;
    let history = generate(4242, &HistoryOptions::realistic(4_000));
    stage.load(&history[..2_000]).await;
    let mut child = stage.spawn(&[], &[("BATCH_SIZE", "100".into())]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    services.control(&["pg-restart", "immediate"]);
    stage.load(&history[2_000..]).await;
    stage.wait_converged(&history, LIMIT).await;
    // SIGTERM: finish, acknowledge, exit 0.
    let pid = child.id().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    let exit =
        common::pipeline::wait_with_timeout_child(&mut child, Duration::from_secs(30), &stage);
    assert_eq!(exit.code(), Some(0), "graceful exit\n{}", stage.log_tail());
    stage.assert_converged(&history, true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_slot_never_passes_what_mongodb_holds_even_when_mongodb_stops() {
    let services = OwnServices::up(&["pg", "mongo"]);
    let stage = Stage::on(&services).await;
    let history = generate(31337, &HistoryOptions::realistic(4_000));
    // The slot first, so that everything after streams.
    stage.run_until_caught_up(&[], &[], LIMIT);
    let mut child = stage.spawn(
        &[],
        &[
            ("BATCH_SIZE", "100".into()),
            ("RETRY_BACKOFF_MAX", "500ms".into()),
        ],
    );
    stage.load(&history[..2_000]).await;
    // While it streams: the slot is never ahead of the checkpoint in MongoDB.
    for _ in 0..10 {
        let slot = confirmed_flush(&stage).await.unwrap_or(0);
        let held = mongo_checkpoint(&stage)
            .await
            .expect("a checkpoint since the first run");
        assert!(slot <= held, "slot {slot:X} ahead of MongoDB {held:X}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // MongoDB stops answering (a frozen server: nothing lost, nothing answered).
    services.control(&["freeze", "mongo"]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let frozen_at = confirmed_flush(&stage).await;
    stage.load(&history[2_000..]).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        confirmed_flush(&stage).await,
        frozen_at,
        "the slot moved while MongoDB was down"
    );
    services.control(&["thaw", "mongo"]);
    stage.wait_converged(&history, LIMIT).await;
    kill_9(&mut child);
    // Nothing was dead-lettered for the outage: only the fold's poison.
    stage.assert_converged(&history, true).await;
}

/// `name=<n>` in the last log line that contains `message`.
fn last_count(log: &str, message: &str, name: &str) -> Option<u64> {
    let line = log.lines().rev().find(|l| l.contains(message))?;
    let start = line.find(&format!(" {name}="))? + name.len() + 2;
    line[start..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_graceful_stop_mid_transaction_leaves_nothing_to_redeliver() {
    let stage = Stage::new().await;
    let history = generate(2718, &HistoryOptions::realistic(6_000));
    stage.run_until_caught_up(&[], &[], LIMIT);
    let info = [
        ("BATCH_SIZE", "100".to_string()),
        ("LOG_LEVEL", "info".to_string()),
    ];
    let mut child = stage.spawn(&[], &info);
    // Transactions of 1,000 rows: most batches end inside one. The stop
    // comes as soon as the first effects are in MongoDB.
    let (first, rest) = history.split_at(3_000);
    stage.load(first).await;
    let deadline = std::time::Instant::now() + LIMIT;
    while stage.mongo.store.count("users").await.unwrap_or(0) == 0 {
        assert!(std::time::Instant::now() < deadline, "{}", stage.log_tail());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = child.id().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(sent.success());
    let exit =
        common::pipeline::wait_with_timeout_child(&mut child, Duration::from_secs(60), &stage);
    assert_eq!(exit.code(), Some(0), "graceful exit\n{}", stage.log_tail());
    // The slot holds the last position MongoDB holds.
    assert_eq!(
        confirmed_flush(&stage).await,
        mongo_checkpoint(&stage).await,
        "the slot did not get the final position"
    );
    stage.load(rest).await;
    stage.run_until_caught_up(&[], &info, LIMIT);
    let log = std::fs::read_to_string(stage.log_path()).unwrap_or_default();
    for line in log.lines().filter(|l| l.contains(" stopped ")) {
        eprintln!("{line}");
    }
    assert_eq!(
        last_count(&log, "stopped", "duplicates"),
        Some(0),
        "the restart re-delivered applied events\n{}",
        stage.log_tail()
    );
    stage.assert_converged(&history, true).await;
    let _ = std::fs::remove_file(stage.log_path());
}
