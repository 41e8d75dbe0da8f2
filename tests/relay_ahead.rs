//! The relay reads, hands to the producer and begins marking the next batch
//! while the last one is delivered (docs/design.md, "Writing ahead"). On a
//! real broker and a real PostgreSQL, with small batches so that the
//! initial snapshot and the stream after it both take many: every event is
//! on the topic exactly once, each aggregate's events on one partition in
//! sequence order, and every outbox row ends `processed`.

mod common;
use common::kafka;

use activity_event_history::{generate, HistoryOptions};
use common::pipeline::Stage;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(300);

#[tokio::test(flavor = "multi_thread")]
async fn batches_written_ahead_publish_every_event_once_in_order_and_mark_every_row() {
    let stage = Stage::new().await;
    let _slots = kafka::Slots(stage.pg.config.clone());
    let topic = kafka::fresh("ahead");
    kafka::create_topic(&topic, 4).await;
    let history = generate(2612, &HistoryOptions::realistic(4_000));
    let (before, after) = history.split_at(2_500);
    stage.load(before).await;

    let log = stage.log_path().with_extension("ahead-relay.log");
    let mut env = stage.env();
    env.extend(kafka::kafka_env(&topic, &kafka::fresh("group")));
    env.push(("RELAY_SLOT", format!("{}_r", stage.slot)));
    // 2,500 snapshot rows in 20 batches, then the stream in batches too.
    env.push(("BATCH_SIZE", "125".into()));
    env.push(("LOG_LEVEL", "info".into()));
    let mut relay = kafka::spawn(&["relay"], &env, &log);
    for chunk in after.chunks(100) {
        stage.load(chunk).await;
    }

    let total = history.len() as i64;
    let deadline = Instant::now() + LIMIT;
    while kafka::processed(&stage).await < total {
        assert!(
            relay.0.try_wait().expect("wait").is_none(),
            "the relay exited\n{}",
            kafka::tail(&log)
        );
        assert!(
            Instant::now() < deadline,
            "not every row was marked processed\n{}",
            kafka::tail(&log)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let consumed = kafka::read_back(&kafka::brokers(), &topic, history.len(), LIMIT).await;
    kafka::terminate(&mut relay, Duration::from_secs(20));

    kafka::assert_each_event_once_in_order(&consumed, &history, &topic, &log);
    assert_eq!(kafka::processed(&stage).await, total);
    let _ = std::fs::remove_file(log);
}
