//! The Kafka paths observed from outside, on the real services: the
//! commit-to-durable latency of `run --source kafka` counts from the commit
//! time the records carry (Debezium's `source.ts_*`, else the record's
//! timestamp), not from `created_at`; the consumer lag per partition shows a
//! backlog and reads 0 once it is drained; and `/readyz` turns 503 naming
//! `kafka` while the broker is frozen (SIGSTOP, a private broker) and 200
//! after, with nothing lost, for the kafka source and for the relay.

mod common;

use activity_event_history::{generate, HistoryOptions};
use activity_event_processor::decode::OutboxEvent;
use activity_event_processor::relay::{partition_for, Encoder, Message, Op, Shape};
use chrono::{DateTime, Utc};
use common::faults::wait_for_line;
use common::kafka;
use common::observe::{events_with, scrape, served_at};
use common::pipeline::Stage;
use common::proxy::{mongodb_address, mongodb_uri_through, Mode, Proxy};
use common::services::OwnServices;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};
use uuid::Uuid;

const LIMIT: Duration = Duration::from_secs(300);
/// `/readyz` must show a cause within this long.
const READINESS: Duration = Duration::from_secs(60);
const LAG: &str = "event_processor_kafka_consumer_lag_messages";

/// `/readyz` until the check `name` is in `state` and the status agrees
/// (503 while it fails, 200 when every check is ok); how long it took.
async fn wait_ready(addr: SocketAddr, name: &str, state: &str, log: &Path) -> Duration {
    let start = Instant::now();
    loop {
        let (status, _, body) = common::observe::request(addr, "/readyz").await;
        let ready: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let check = ready["checks"]
            .as_array()
            .and_then(|checks| checks.iter().find(|check| check["name"] == name))
            .map(|check| check["state"].as_str().unwrap_or_default().to_string());
        let agrees = match state {
            "failing" => status == 503,
            _ => status == 200,
        };
        if check.as_deref() == Some(state) && agrees {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < READINESS,
            "/readyz: check {name} not {state} within {READINESS:?}: {status} {body}\n{}",
            kafka::tail(log)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The lag samples of `topic`, by partition.
fn lags(samples: &BTreeMap<String, f64>, topic: &str) -> BTreeMap<i32, f64> {
    let prefix = format!("{LAG}{{topic=\"{topic}\",partition=\"");
    samples
        .iter()
        .filter_map(|(series, value)| {
            let partition = series.strip_prefix(&prefix)?.strip_suffix("\"}")?;
            Some((partition.parse().ok()?, *value))
        })
        .collect()
}

/// The cumulative count of histogram `name`'s bucket `le`.
fn bucket(samples: &BTreeMap<String, f64>, name: &str, le: f64) -> f64 {
    let prefix = format!("{name}_bucket{{le=\"");
    samples
        .iter()
        .find(|(series, _)| {
            series
                .strip_prefix(&prefix)
                .and_then(|rest| rest.strip_suffix("\"}"))
                .and_then(|bound| bound.parse::<f64>().ok())
                == Some(le)
        })
        .map(|(_, value)| *value)
        .unwrap_or_else(|| panic!("no bucket {le} of {name}"))
}

/// The record of `message` for the partition its aggregate hashes to.
fn record<'a>(message: &'a Message, partitions: usize) -> FutureRecord<'a, Vec<u8>, Vec<u8>> {
    activity_event_processor::relay::record(
        message,
        partition_for(&message.partition_key, partitions),
    )
}

/// Debezium change events of `events` on `topic` (`partitions` of them, each
/// aggregate on its murmur2 partition), as the relay encodes them; awaited.
async fn publish(
    producer: &FutureProducer,
    topic: &str,
    partitions: usize,
    events: &[OutboxEvent],
) {
    let encoder = Encoder::new(Shape::Cdc, false, topic, "outbox.event.", "activity");
    let messages: Vec<Message> = events
        .iter()
        .map(|event| encoder.encode(event, Op::Create, Utc::now()))
        .collect();
    let deliveries: Vec<_> = messages
        .iter()
        .map(|message| {
            producer
                .send_result(record(message, partitions))
                .unwrap_or_else(|(err, _)| panic!("enqueue to {topic}: {err}"))
        })
        .collect();
    for delivery in deliveries {
        delivery
            .await
            .expect("the producer is alive")
            .unwrap_or_else(|(err, _)| panic!("produce to {topic}: {err}"));
    }
}

/// A user created `created_at`, and renamed a moment later.
fn user(created_at: DateTime<Utc>, seq: i64) -> [OutboxEvent; 2] {
    let aggregate = Uuid::new_v4();
    let event = |seq: i64, event_type: &str, payload: serde_json::Value| OutboxEvent {
        event_id: Uuid::new_v4(),
        sequence_id: Some(seq),
        aggregate_id: aggregate,
        aggregate_type: "User".into(),
        event_type: event_type.into(),
        payload: payload.into(),
        created_at: Some(created_at),
    };
    let name = format!("u{seq}");
    [
        event(
            seq,
            "UserCreated",
            json!({"email": format!("{name}@example.com"), "displayName": name}),
        ),
        event(
            seq + 1,
            "UserUpdated",
            json!({"displayName": format!("{name}!")}),
        ),
    ]
}

/// A Debezium change event whose `source.ts_*` (the commit) is `committed`,
/// whatever the row's `created_at`.
fn committed_at(message: &Message, committed: DateTime<Utc>) -> Vec<u8> {
    let mut value: serde_json::Value =
        serde_json::from_slice(&message.value).expect("a change event");
    let source = &mut value["source"];
    source["ts_ms"] = json!(committed.timestamp_millis());
    source["ts_us"] = json!(committed.timestamp_micros());
    source["ts_ns"] = json!(committed.timestamp_micros() * 1000);
    serde_json::to_vec(&value).expect("JSON")
}

/// Events written an hour before their commit (a write side whose
/// `created_at` is the start of a long transaction, or a clock apart): the
/// latency counts from the commit, so every one is far under a minute.
#[tokio::test(flavor = "multi_thread")]
async fn the_latency_counts_from_the_commit_time_the_records_carry() {
    let stage = Stage::new().await;
    let base = kafka::fresh("commit");
    let cdc = format!("{base}.event_outbox");
    let prefix = format!("{base}.outbox.event.");
    let routed = format!("{prefix}User");
    for topic in [&cdc, &routed] {
        kafka::create_topic(topic, 1).await;
    }
    let log = stage.log_path().with_extension("commit.log");
    let mut env = stage.env();
    env.extend(kafka::kafka_env(
        &format!("{cdc},{routed}"),
        &kafka::fresh("group"),
    ));
    env.push(("KAFKA_EVENT_ROUTER_TOPIC_PREFIX", prefix.clone()));
    env.push(("LOG_LEVEL", "info".into()));
    let mut run = kafka::spawn(&["run", "--source", "kafka"], &env, &log);
    let addr = served_at(&log, &mut run).await;
    // Produced once the partitions are this process's: the latency is the
    // pipeline's, not the start's.
    wait_for_line(&log, "kafka partitions assigned", 0, LIMIT).await;

    let hour_ago = Utc::now() - chrono::Duration::hours(1);
    let producer = kafka::producer();
    let mut history = Vec::new();
    // Change events: created_at an hour ago, committed (source.ts_*) now.
    let encoder = Encoder::new(Shape::Cdc, false, &cdc, &prefix, "activity");
    for i in 0..10 {
        for event in user(hour_ago, i * 10) {
            let message = encoder.encode(&event, Op::Create, Utc::now());
            let value = committed_at(&message, Utc::now());
            kafka::produce(
                &producer,
                &cdc,
                Some(0),
                Some(&message.key),
                Some(&value),
                &[],
            )
            .await;
            history.push(event);
        }
    }
    // Tombstones (Debezium's after a delete) carry no event: counted as skipped.
    for _ in 0..3 {
        kafka::produce(&producer, &cdc, Some(0), Some(b"k"), None, &[]).await;
    }
    // Event Router records: createdAt an hour ago, the record's timestamp now.
    let encoder = Encoder::new(Shape::EventRouter, false, &cdc, &prefix, "activity");
    for i in 10..20 {
        for event in user(hour_ago, i * 10) {
            let message = encoder.encode(&event, Op::Create, Utc::now());
            let mut headers: Vec<(String, Option<Vec<u8>>)> = message
                .headers
                .iter()
                .map(|(name, value)| (name.clone(), Some(value.clone())))
                .collect();
            headers.push((
                "createdAt".into(),
                Some(hour_ago.timestamp_millis().to_string().into_bytes()),
            ));
            let value = Some(&message.value[..]);
            kafka::produce(
                &producer,
                &routed,
                Some(0),
                Some(&message.key),
                value,
                &headers,
            )
            .await;
            history.push(event);
        }
    }
    stage.wait_converged(&history, LIMIT).await;

    let total = history.len() as f64;
    let start = Instant::now();
    let samples = loop {
        let samples = scrape(addr).await;
        let counted = samples
            .get("event_processor_commit_to_durable_seconds_count")
            .copied()
            .unwrap_or(0.0);
        if counted >= total || start.elapsed() > LIMIT {
            break samples;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    kafka::terminate(&mut run, Duration::from_secs(20));
    let count = samples["event_processor_commit_to_durable_seconds_count"];
    assert_eq!(count, total, "one latency per applied event");
    let within_a_minute = bucket(&samples, "event_processor_commit_to_durable_seconds", 60.0);
    assert_eq!(
        within_a_minute, count,
        "every latency from the commit, none from created_at (an hour before)"
    );
    assert_eq!(
        events_with(&samples, "skipped"),
        3,
        "the tombstones are counted as skipped"
    );
    let sum = samples["event_processor_commit_to_durable_seconds_sum"];
    assert!(sum < total * 60.0, "{sum}");
    stage.assert_converged(&history, false).await;
    let _ = std::fs::remove_file(log);
}

/// A backlog on four partitions, produced before the consumer starts, drains
/// through a slow MongoDB (every chunk half a second late, until the first sample): the first
/// scrape that shows the partitions shows lag on each, and each reads 0
/// once the read models are complete.
#[tokio::test(flavor = "multi_thread")]
async fn the_consumer_lag_shows_a_backlog_per_partition_and_zero_once_drained() {
    let stage = Stage::new().await;
    let topic = kafka::fresh("lag");
    kafka::create_topic(&topic, 4).await;
    let history = generate(1311, &HistoryOptions::realistic(2_000));
    publish(&kafka::producer(), &topic, 4, &history).await;

    let proxy = Proxy::start(mongodb_address(&stage.mongo.uri));
    proxy.set(Mode::Latency(Duration::from_millis(500)));
    let uri = mongodb_uri_through(&stage.mongo.uri, &proxy);

    let log = stage.log_path().with_extension("lag.log");
    let mut env = stage.env();
    env.extend(kafka::kafka_env(&topic, &kafka::fresh("group")));
    env.push(("MONGODB_URI", uri));
    env.push(("BATCH_SIZE", "50".into()));
    env.push(("LOG_LEVEL", "info".into()));
    let mut run = kafka::spawn(&["run", "--source", "kafka"], &env, &log);
    let addr = served_at(&log, &mut run).await;

    let start = Instant::now();
    let first = loop {
        let lags = lags(&scrape(addr).await, &topic);
        if lags.len() == 4 {
            break lags;
        }
        assert!(lags.is_empty(), "all four partitions at once: {lags:?}");
        assert!(
            start.elapsed() < LIMIT,
            "no lag shown\n{}",
            kafka::tail(&log)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut produced = [0f64; 4];
    for event in &history {
        produced[partition_for(event.aggregate_id.to_string().as_bytes(), 4) as usize] += 1.0;
    }
    eprintln!("first lag sample {first:?} of {produced:?} produced");
    for (partition, lag) in &first {
        assert!(
            *lag > 0.0 && *lag <= produced[*partition as usize],
            "partition {partition}: lag {lag} of {} produced",
            produced[*partition as usize]
        );
    }

    proxy.set(Mode::Pass);
    stage.wait_converged(&history, LIMIT).await;
    let start = Instant::now();
    loop {
        let lags = lags(&scrape(addr).await, &topic);
        if lags.len() == 4 && lags.values().all(|lag| *lag == 0.0) {
            break;
        }
        assert!(
            start.elapsed() < READINESS,
            "the lag never read 0 on every partition: {lags:?}\n{}",
            kafka::tail(&log)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    kafka::terminate(&mut run, Duration::from_secs(20));
    stage.assert_converged(&history, false).await;
    let _ = std::fs::remove_file(log);
}

/// A producer to the private broker that outlasts a freeze: its requests
/// wait for the broker rather than time out and retry.
fn patient_producer(brokers: &str) -> FutureProducer {
    rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("batch.num.messages", "1")
        .set("message.timeout.ms", "300000")
        .set("request.timeout.ms", "120000")
        .set("socket.timeout.ms", "120000")
        .create()
        .expect("producer")
}

/// `run --source kafka` on a broker of the test's own: records are produced
/// before, during and after a freeze of the broker; `/readyz` names `kafka`
/// while it lasts and recovers after; the read models equal the fold.
#[tokio::test(flavor = "multi_thread")]
async fn readiness_fails_while_the_broker_is_frozen_and_the_kafka_source_loses_nothing() {
    let services = OwnServices::up(&["kafka"]);
    let brokers = services.get("KAFKA_BROKERS");
    let stage = Stage::new().await;
    let topic = kafka::fresh("frozen");
    kafka::create_topic_at(&brokers, &topic, 4).await;
    let history = generate(1312, &HistoryOptions::realistic(1_500));
    let (before, rest) = history.split_at(500);
    let (during, after) = rest.split_at(500);
    let producer = patient_producer(&brokers);
    publish(&producer, &topic, 4, before).await;

    let log = stage.log_path().with_extension("frozen-source.log");
    let mut env = stage.env();
    env.extend(kafka::kafka_env(&topic, &kafka::fresh("group")));
    env.push(("KAFKA_BROKERS", brokers.clone()));
    env.push(("LOG_LEVEL", "info".into()));
    let mut run = kafka::spawn(&["run", "--source", "kafka"], &env, &log);
    let addr = served_at(&log, &mut run).await;
    wait_ready(addr, "kafka", "ok", &log).await;
    stage.wait_converged(before, LIMIT).await;

    services.control(&["freeze", "kafka"]);
    // Written while the broker is frozen: on their way once it is back.
    let writer = {
        let (producer, topic, during) = (producer.clone(), topic.clone(), during.to_vec());
        tokio::spawn(async move { publish(&producer, &topic, 4, &during).await })
    };
    let failed = wait_ready(addr, "kafka", "failing", &log).await;
    eprintln!("/readyz 503 naming kafka after {failed:?}");
    services.control(&["thaw", "kafka"]);
    let recovered = wait_ready(addr, "kafka", "ok", &log).await;
    eprintln!("/readyz 200 again after {recovered:?}");
    tokio::time::timeout(LIMIT, writer)
        .await
        .expect("the records written during the freeze are delivered")
        .expect("the writer");
    publish(&producer, &topic, 4, after).await;

    stage.wait_converged(&history, LIMIT).await;
    kafka::terminate(&mut run, Duration::from_secs(20));
    stage.assert_converged(&history, false).await;
    let _ = std::fs::remove_file(log);
}

/// The relay on a broker of the test's own: outbox rows written before,
/// during and after a freeze of the broker; `/readyz` names `kafka` while it
/// lasts and recovers after; every event is on the topic exactly once, each
/// aggregate on one partition in sequence order.
#[tokio::test(flavor = "multi_thread")]
async fn readiness_fails_while_the_broker_is_frozen_and_the_relay_publishes_each_event_once() {
    let services = OwnServices::up(&["kafka"]);
    let brokers = services.get("KAFKA_BROKERS");
    let stage = Stage::new().await;
    let _slots = kafka::Slots(stage.pg.config.clone());
    let topic = kafka::fresh("relayed");
    kafka::create_topic_at(&brokers, &topic, 4).await;
    let history = generate(1313, &HistoryOptions::realistic(1_500));
    let (before, rest) = history.split_at(500);
    let (during, after) = rest.split_at(500);
    stage.load(before).await;

    let log = stage.log_path().with_extension("frozen-relay.log");
    let mut env = stage.env();
    env.extend(kafka::kafka_env(&topic, &kafka::fresh("group")));
    env.push(("KAFKA_BROKERS", brokers.clone()));
    env.push(("RELAY_SLOT", format!("{}_r", stage.slot)));
    env.push(("LOG_LEVEL", "info".into()));
    let mut relay = kafka::spawn(&["relay"], &env, &log);
    let addr = served_at(&log, &mut relay).await;
    wait_ready(addr, "kafka", "ok", &log).await;

    services.control(&["freeze", "kafka"]);
    stage.load(during).await;
    let failed = wait_ready(addr, "kafka", "failing", &log).await;
    eprintln!("/readyz 503 naming kafka after {failed:?}");
    stage.load(&after[..250]).await;
    services.control(&["thaw", "kafka"]);
    let recovered = wait_ready(addr, "kafka", "ok", &log).await;
    eprintln!("/readyz 200 again after {recovered:?}");
    stage.load(&after[250..]).await;

    let total = history.len();
    let consumed = kafka::read_back(&brokers, &topic, total, LIMIT).await;
    kafka::terminate(&mut relay, Duration::from_secs(20));

    kafka::assert_each_event_once_in_order(&consumed, &history, &topic, &log);
    let _ = std::fs::remove_file(log);
}
