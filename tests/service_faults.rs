//! Services misbehaving under a running pipeline: PostgreSQL terminating the
//! processor's backends again and again (replication and polling), and the
//! Kafka broker frozen under a relay and a consumer. Each ends with the read
//! models equal to the reference fold and every outbox row finished.

mod common;
use common::kafka;

use activity_event_history::{generate, HistoryOptions};
use common::pipeline::{kill_9, Stage};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(180);

/// Terminates every backend of the processor in this stage's database (its
/// walsender, its ownership session, its marker and polling connections).
async fn terminate_processor_backends(stage: &Stage) -> i64 {
    let client = stage.pg.client().await;
    let rows = client
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()
               AND application_name = 'activity-event-processor'",
            &[],
        )
        .await
        .expect("terminate backends");
    rows.len() as i64
}

async fn survives_terminations(args: &[&str], seed: u64) {
    let stage = Stage::new().await;
    let _slots = kafka::Slots(stage.pg.config.clone());
    let history = generate(seed, &HistoryOptions::realistic(3_000));
    let mut child = stage.spawn(args, &[("BATCH_SIZE", "100".into())]);
    let mut terminated = 0;
    for chunk in history.chunks(600) {
        stage.load(chunk).await;
        tokio::time::sleep(Duration::from_millis(700)).await;
        terminated += terminate_processor_backends(&stage).await;
    }
    assert!(
        terminated >= 5,
        "only {terminated} backends were terminated"
    );
    stage.wait_converged(&history, LIMIT).await;
    kill_9(&mut child);
    stage.run_until_caught_up(args, &[], LIMIT);
    stage.assert_converged(&history, true).await;
    let _ = std::fs::remove_file(stage.log_path());
}

#[tokio::test(flavor = "multi_thread")]
async fn replication_survives_postgres_terminating_its_backends() {
    survives_terminations(&[], 5150).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn polling_survives_postgres_terminating_its_backends() {
    survives_terminations(&["--source", "polling", "--workers", "2"], 5151).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_broker_delays_the_kafka_path_and_loses_nothing() {
    // A private broker: freezing the shared one would stall other tests.
    let services = common::services::OwnServices::up(&["pg", "mongo", "kafka"]);
    let stage = Stage::on(&services).await;
    let _slots = kafka::Slots(stage.pg.config.clone());
    let brokers = services.get("KAFKA_BROKERS");
    let topic = kafka::fresh("frozen");
    let mut env = stage.env();
    env.extend(kafka::kafka_env(&topic, &kafka::fresh("group")));
    env.retain(|(key, _)| *key != "KAFKA_BROKERS");
    env.push(("KAFKA_BROKERS", brokers));
    let log = stage.log_path();
    let create = kafka::spawn(
        &["kafka", "topics", "create", "--partitions", "2"],
        &env,
        &log,
    );
    kafka::wait_success(create, Duration::from_secs(60), &log);

    let history = generate(5152, &HistoryOptions::realistic(2_000));
    let (first, rest) = history.split_at(1_000);
    stage.load(first).await;
    let relay = kafka::spawn(&["relay"], &env, &log);
    let consumer = kafka::spawn(&["run", "--source", "kafka"], &env, &log);
    stage.wait_converged(first, LIMIT).await;
    services.control(&["freeze", "kafka"]);
    stage.load(rest).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    services.control(&["thaw", "kafka"]);
    stage.wait_converged(&history, LIMIT).await;
    drop((relay, consumer));
    let _ = std::fs::remove_file(&log);
}
