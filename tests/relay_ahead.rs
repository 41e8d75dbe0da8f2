//! The relay reads, hands to the producer and begins marking the next batch
//! while the last one is delivered (docs/design.md, "Writing ahead"). On a
//! real broker and a real PostgreSQL, with small batches so that the
//! initial snapshot and the stream after it both take many: every event is
//! on the topic exactly once, each aggregate's events on one partition in
//! sequence order, and every outbox row ends `processed`.

mod common;
use common::kafka;

use activity_event_history::{generate, HistoryOptions};
use activity_event_processor::decode::{decode_message, DecodeOptions, Decoded, RawMessage};
use common::pipeline::Stage;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use uuid::Uuid;

const LIMIT: Duration = Duration::from_secs(300);

async fn processed(stage: &Stage) -> i64 {
    stage
        .pg
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM event_outbox WHERE status = 'processed'",
            &[],
        )
        .await
        .expect("count processed")
        .get(0)
}

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
    while processed(&stage).await < total {
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

    let expected = history.len();
    let consumed = tokio::task::spawn_blocking({
        let topic = topic.clone();
        move || {
            // Everything, then a few seconds more for any repeat to show.
            let mut complete: Option<Instant> = None;
            kafka::consume_until(&topic, LIMIT, |got| {
                if got.len() >= expected && complete.is_none() {
                    complete = Some(Instant::now());
                }
                complete.is_some_and(|at| at.elapsed() > Duration::from_secs(5))
            })
        }
    })
    .await
    .expect("read the topic back");
    kafka::terminate(&mut relay, Duration::from_secs(20));

    let mut seen: HashMap<Uuid, usize> = HashMap::new();
    let mut by_aggregate: HashMap<Uuid, Vec<(i32, i64, Option<i64>)>> = HashMap::new();
    for record in &consumed {
        let raw = RawMessage {
            topic: Some(&topic),
            key: record.key.as_deref(),
            value: record.value.as_deref(),
            headers: &record.headers,
        };
        let Ok(Decoded::Event(event)) = decode_message(&raw, &DecodeOptions::default()) else {
            panic!("not an event: {record:?}");
        };
        *seen.entry(event.event_id).or_default() += 1;
        by_aggregate.entry(event.aggregate_id).or_default().push((
            record.partition,
            record.offset,
            event.sequence_id,
        ));
    }
    let missing = history
        .iter()
        .filter(|e| !seen.contains_key(&e.event_id))
        .count();
    assert_eq!(missing, 0, "events not on the topic\n{}", kafka::tail(&log));
    let repeated: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        repeated.is_empty(),
        "events on the topic more than once (no crash happened): {repeated:?}"
    );
    assert_eq!(consumed.len(), expected);
    for (aggregate, mut records) in by_aggregate {
        records.sort_by_key(|(partition, offset, _)| (*partition, *offset));
        assert!(
            records.windows(2).all(|w| w[0].0 == w[1].0),
            "aggregate {aggregate} on more than one partition: {records:?}"
        );
        assert!(
            records.windows(2).all(|w| w[0].2 < w[1].2),
            "aggregate {aggregate} out of sequence order: {records:?}"
        );
    }
    assert_eq!(processed(&stage).await, total);
    let _ = std::fs::remove_file(log);
}
