//! `run --source kafka` on its own (records produced by the test): events whose
//! aggregate is not created yet wait and apply, or are dead-lettered (never
//! dropped); offsets are committed per partition after the batch, and a
//! restart resumes from them; a missing topic or an unreachable broker is one
//! clear line.

mod common;
use common::kafka;

use activity_event_processor::decode::OutboxEvent;
use activity_event_processor::projection::fold::{ReadModels, ReferenceFold};
use activity_event_processor::relay::{partition_for, Encoder, Op, Shape};
use activity_event_processor::store::mongo::DEAD_LETTERS;
use common::pipeline::Stage;
use mongodb::bson::doc;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;
use std::time::{Duration, Instant};
use uuid::Uuid;

fn event(seq: i64, aggregate: Uuid, event_type: &str, payload: serde_json::Value) -> OutboxEvent {
    OutboxEvent {
        event_id: Uuid::new_v4(),
        sequence_id: Some(seq),
        aggregate_id: aggregate,
        aggregate_type: "User".into(),
        event_type: event_type.into(),
        payload: payload.into(),
        created_at: chrono::DateTime::from_timestamp(1_790_000_000 + seq, 0),
    }
}

fn created(seq: i64, user: Uuid, name: &str) -> OutboxEvent {
    event(
        seq,
        user,
        "UserCreated",
        json!({"email": format!("{name}@example.com"), "displayName": name}),
    )
}

fn renamed(seq: i64, user: Uuid, name: &str) -> OutboxEvent {
    event(seq, user, "UserUpdated", json!({"displayName": name}))
}

/// A Debezium change event of `event` (keyed by event id, as Debezium keys
/// them) on `partition`; returns the record's offset.
async fn publish(
    producer: &FutureProducer,
    topic: &str,
    partition: i32,
    event: &OutboxEvent,
) -> i64 {
    let message = Encoder::new(Shape::Cdc, false, topic, "outbox.event.", "activity").encode(
        event,
        Op::Create,
        chrono::Utc::now(),
    );
    let (_, offset) = kafka::produce(
        producer,
        topic,
        Some(partition),
        Some(&message.key),
        Some(&message.value),
        &[],
    )
    .await;
    offset
}

async fn wait_for_models(stage: &Stage, expected: &ReadModels, log: &std::path::Path) {
    let start = Instant::now();
    loop {
        let actual = stage.mongo.read_models().await;
        if &actual == expected {
            return;
        }
        if start.elapsed() > Duration::from_secs(120) {
            eprintln!("{}", kafka::tail(log));
            assert_eq!(actual.dead_letters, expected.dead_letters, "dead letters");
            assert_eq!(actual.users, expected.users, "users");
            assert_eq!(actual, *expected);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn dead_letter(stage: &Stage, id: Uuid) -> Option<mongodb::bson::Document> {
    stage
        .mongo
        .store
        .find(DEAD_LETTERS, doc! { "_id": id.to_string() }, None)
        .await
        .expect("dead letters")
        .into_iter()
        .next()
}

async fn wait_for_dead_letter(
    stage: &Stage,
    id: Uuid,
    log: &std::path::Path,
) -> mongodb::bson::Document {
    let start = Instant::now();
    loop {
        if let Some(letter) = dead_letter(stage, id).await {
            return letter;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no dead letter for {id}\n{}",
            kafka::tail(log)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// With change events keyed by event id (plain Debezium), one aggregate's
/// events are spread over partitions and may come out of order.
#[tokio::test(flavor = "multi_thread")]
async fn events_of_an_aggregate_not_created_yet_wait_then_apply_or_are_dead_lettered() {
    let stage = Stage::new().await;
    let topic = kafka::fresh("keyed-by-event");
    kafka::create_topic(&topic, 2).await;
    let log = stage.log_path();
    let mut env = stage.env();
    env.extend(kafka::kafka_env(&topic, &kafka::fresh("group")));
    env.push(("MAX_RETRIES", "8".into()));
    env.push(("RETRY_BACKOFF_INITIAL", "200ms".into()));
    env.push(("RETRY_BACKOFF_MAX", "1s".into()));
    let mut consumer = kafka::spawn(&["run", "--source", "kafka"], &env, &log);
    let producer = kafka::producer();

    // Late creation: the rename waits for it, then applies.
    let (ann, bob, cyd) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let ann_created = created(1, ann, "Ann");
    let ann_renamed = renamed(2, ann, "Ann B.");
    // Overtaken: Bob is renamed before he exists; his creation comes later
    // in sequence, so the rename can never apply in order.
    let bob_renamed = renamed(3, bob, "Bobby");
    let bob_created = created(4, bob, "Bob");
    // Never created at all.
    let cyd_renamed = renamed(5, cyd, "Cyd");

    publish(&producer, &topic, 0, &ann_renamed).await;
    publish(&producer, &topic, 0, &bob_renamed).await;
    publish(&producer, &topic, 0, &cyd_renamed).await;
    // While they wait, provisional dead letters record them.
    let waiting = wait_for_dead_letter(&stage, ann_renamed.event_id, &log).await;
    let error = waiting.get_str("error").unwrap_or_default();
    assert!(
        error.contains("waiting for its aggregate's creation"),
        "{error}"
    );
    wait_for_dead_letter(&stage, bob_renamed.event_id, &log).await;
    publish(&producer, &topic, 1, &ann_created).await;
    publish(&producer, &topic, 1, &bob_created).await;

    let history = [
        ann_created,
        ann_renamed.clone(),
        bob_renamed.clone(),
        bob_created,
        cyd_renamed.clone(),
    ];
    let expected = ReferenceFold::of(&history).read_models();
    assert!(expected
        .dead_letters
        .contains(&bob_renamed.event_id.to_string()));
    assert!(!expected
        .dead_letters
        .contains(&ann_renamed.event_id.to_string()));
    wait_for_models(&stage, &expected, &log).await;
    // The provisional dead letters become final ones.
    let settled = |id: Uuid, words: &'static str| {
        let stage = &stage;
        async move {
            let start = Instant::now();
            loop {
                let letter = dead_letter(stage, id).await.expect("dead letter");
                if letter.get_str("error").unwrap_or_default().contains(words) {
                    return letter;
                }
                assert!(start.elapsed() < Duration::from_secs(60), "{letter}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    settled(bob_renamed.event_id, "arrived out of order").await;
    let cyd = settled(cyd_renamed.event_id, "after 8 tries").await;
    assert_eq!(cyd.get_i64("attempts").ok(), Some(8));
    wait_for_models(&stage, &expected, &log).await;
    kafka::terminate(&mut consumer, Duration::from_secs(20));
}

/// The group's committed offset of each partition.
fn committed(topic: &str, group: &str, partitions: i32) -> Vec<Option<i64>> {
    let consumer: BaseConsumer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", kafka::brokers())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut list = TopicPartitionList::new();
    for p in 0..partitions {
        list.add_partition(topic, p);
    }
    let found = consumer
        .committed_offsets(list, Duration::from_secs(10))
        .expect("committed offsets");
    (0..partitions)
        .map(
            |p| match found.find_partition(topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(n)) => Some(n),
                _ => None,
            },
        )
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn offsets_are_committed_per_partition_and_a_restart_resumes_from_them() {
    let stage = Stage::new().await;
    let topic = kafka::fresh("commits");
    kafka::create_topic(&topic, 2).await;
    let group = kafka::fresh("group");
    let log = stage.log_path();
    let mut env = stage.env();
    env.extend(kafka::kafka_env(&topic, &group));
    env.push(("LOG_LEVEL", "info".into()));
    let producer = kafka::producer();
    let mut history = Vec::new();
    let mut next = [0i64; 2];
    for round in 0..2 {
        for i in 0..15 {
            let user = Uuid::new_v4();
            let event = created(round * 100 + i, user, &format!("u{round}x{i}"));
            let partition = partition_for(user.to_string().as_bytes(), 2);
            let offset = publish(&producer, &topic, partition, &event).await;
            next[partition as usize] = offset + 1;
            history.push(event);
        }
        let mut consumer = kafka::spawn(&["run", "--source", "kafka"], &env, &log);
        wait_for_models(&stage, &ReferenceFold::of(&history).read_models(), &log).await;
        // Committed right after each batch: the offset after the last record.
        let start = Instant::now();
        let want: Vec<Option<i64>> = next.iter().map(|n| Some(*n)).collect();
        while committed(&topic, &group, 2) != want {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "committed {:?}, want {want:?}",
                committed(&topic, &group, 2)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        kafka::terminate(&mut consumer, Duration::from_secs(20));
    }
    // Each run read only what was new to the group: 15 records each.
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let summaries: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("kafka records"))
        .collect();
    assert_eq!(summaries.len(), 2, "{}", kafka::tail(&log));
    for line in summaries {
        assert!(line.contains("records=15 "), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_topic_and_an_unreachable_broker_are_one_clear_line() {
    let stage = Stage::new().await;
    let missing = kafka::fresh("missing");
    let mut env = stage.env();
    env.extend(kafka::kafka_env(&missing, "g"));
    let output = common::run_binary(&["run", "--source", "kafka"], &env);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let expected = format!(
        "error: topic `{missing}` does not exist: create it with `event-processor kafka topics create --partitions N {missing}`"
    );
    assert!(stderr.lines().any(|l| l == expected), "{stderr}");

    let output = common::run_binary(&["relay", "--source", "polling"], &env);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.lines().any(|l| l == expected), "{stderr}");

    let mut env = stage.env();
    env.push(("KAFKA_BROKERS", "127.0.0.1:1".into()));
    env.push(("KAFKA_TIMEOUT", "2s".into()));
    let output = common::run_binary(&["kafka", "topics", "create", "t"], &env);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: cannot reach the Kafka brokers at 127.0.0.1:1 within 2s"),
        "{stderr}"
    );

    // And creating is idempotent.
    let topic = kafka::fresh("created");
    let mut env = stage.env();
    env.push(("KAFKA_BROKERS", kafka::brokers()));
    let first = common::run_binary(
        &["kafka", "topics", "create", "--partitions", "3", &topic],
        &env,
    );
    assert_eq!(
        String::from_utf8_lossy(&first.stdout).trim(),
        format!("topic {topic}: created with 3 partitions"),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let again = common::run_binary(&["kafka", "topics", "create", &topic], &env);
    assert_eq!(
        String::from_utf8_lossy(&again.stdout).trim(),
        format!("topic {topic}: exists (3 partitions)")
    );
}
