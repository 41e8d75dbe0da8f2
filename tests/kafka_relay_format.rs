//! The relay writes Debezium's own message format: the seed events (whose ids,
//! payloads and times are those of the fixtures) encoded and relayed through a
//! real broker equal the fixtures of `tests/fixtures/debezium/` field by field,
//! decode back to the same events, and land on the partition the aggregate id
//! picks (the Java client's murmur2, as librdkafka computes it too).

mod common;
use common::kafka;

use activity_event_processor::decode::{
    decode_message, DecodeOptions, Decoded, OutboxEvent, RawMessage,
};
use activity_event_processor::outbox::seed;
use activity_event_processor::relay::{partition_for, Encoder, Message, Op, Shape, SnapshotMark};
use common::pipeline::Stage;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

const TOPIC: &str = "postgres.activity.event_outbox";
const VARIANTS: [(&str, bool); 2] = [("schemas-enabled", true), ("schemas-disabled", false)];
/// The fixtures' insert records, in seed order, and their sequence ids.
const INSERTS: [(&str, &str, i64); 4] = [
    ("insert_user_created", "user_created", 104),
    ("insert_user_updated", "user_updated", 105),
    ("insert_activity_created", "activity_created", 106),
    ("insert_participant_joined", "participant_joined", 107),
];

fn fixture(relative: &str) -> Vec<u8> {
    let path: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/debezium")
        .join(relative);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|e| panic!("not json ({e}): {}", String::from_utf8_lossy(bytes)))
}

/// The fixture's header list (sidecar), as (name, value).
fn fixture_headers(relative: &str) -> Vec<(String, String)> {
    json(&fixture(relative))["headers"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|h| {
                    (
                        h["key"].as_str().unwrap_or_default().to_string(),
                        h["value"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The seed events with the fixtures' sequence ids.
fn seed_events() -> Vec<OutboxEvent> {
    seed::events()
        .into_iter()
        .zip(INSERTS)
        .map(|(e, (_, _, seq))| OutboxEvent {
            event_id: e.event_id,
            sequence_id: Some(seq),
            aggregate_id: e.aggregate_id,
            aggregate_type: e.aggregate_type.to_string(),
            event_type: e.event_type.to_string(),
            payload: e.payload.into(),
            created_at: e.created_at.parse().ok(),
        })
        .collect()
}

/// A relayed change event against its fixture, field by field. What the
/// relay cannot know (commit time, LSNs, transaction id, run id) is checked
/// for its type only; `db` is the database the relay read.
fn assert_same_change_event(message: &Message, name: &str, variant: &str, schemas: bool, db: &str) {
    let label = format!("{name} ({variant})");
    let key = fixture(&format!("cdc/{variant}/{name}.key.json"));
    assert_eq!(
        String::from_utf8_lossy(&message.key),
        String::from_utf8_lossy(&key),
        "key of {label}"
    );
    let expected = json(&fixture(&format!("cdc/{variant}/{name}.value.json")));
    let actual = json(&message.value);
    let (expected, actual) = if schemas {
        assert_eq!(actual["schema"], expected["schema"], "schema of {label}");
        assert_eq!(actual.as_object().map(|o| o.len()), Some(2), "{label}");
        (expected["payload"].clone(), actual["payload"].clone())
    } else {
        (expected, actual)
    };
    let fields = |v: &Value| -> Vec<String> {
        v.as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    };
    // Field order is part of the format (JsonConverter writes schema order).
    let order = |bytes: &[u8], field: &str| String::from_utf8_lossy(bytes).find(field);
    let value_text = &message.value;
    for pair in [
        "\"before\"",
        "\"after\"",
        "\"source\"",
        "\"transaction\"",
        "\"op\"",
    ]
    .windows(2)
    {
        assert!(
            order(value_text, pair[0]) < order(value_text, pair[1]),
            "{label}: {pair:?}"
        );
    }
    assert_eq!(
        fields(&actual),
        fields(&expected),
        "envelope fields of {label}"
    );
    for field in ["before", "after", "transaction", "op"] {
        assert_eq!(actual[field], expected[field], "{field} of {label}");
    }
    assert_eq!(
        fields(&actual["source"]),
        fields(&expected["source"]),
        "source fields of {label}"
    );
    for field in [
        "version",
        "connector",
        "name",
        "snapshot",
        "schema",
        "table",
        "xmin",
        "origin",
        "origin_lsn",
    ] {
        assert_eq!(
            actual["source"][field], expected["source"][field],
            "source.{field} of {label}"
        );
    }
    assert_eq!(actual["source"]["db"], db, "source.db of {label}");
    for field in ["ts_ms", "ts_us", "ts_ns"] {
        assert!(actual[field].is_i64(), "{field} of {label}");
        assert!(
            actual["source"][field].is_i64(),
            "source.{field} of {label}"
        );
    }
    for field in ["sequence", "txId", "lsn"] {
        assert_eq!(
            actual["source"][field],
            Value::Null,
            "source.{field} of {label}"
        );
    }
    // The jsonb text of the payload, byte for byte.
    assert_eq!(
        actual["after"]["payload"].as_str(),
        expected["after"]["payload"].as_str(),
        "payload text of {label}"
    );
    let headers = fixture_headers(&format!("cdc/headers/{name}.headers.json"));
    assert_eq!(message.headers.len(), headers.len(), "headers of {label}");
    for ((name, value), (want_name, want_value)) in message.headers.iter().zip(&headers) {
        assert_eq!(name, want_name, "{label}");
        if name != "__debezium.context.runId" {
            assert_eq!(
                String::from_utf8_lossy(value),
                *want_value,
                "header {name} of {label}"
            );
        }
    }
}

fn raw<'a>(message: &'a Message, headers: &'a [(String, Option<Vec<u8>>)]) -> RawMessage<'a> {
    RawMessage {
        topic: Some(&message.topic),
        key: Some(&message.key),
        value: Some(&message.value),
        headers,
    }
}

fn decoded(message: &Message) -> OutboxEvent {
    let headers: Vec<(String, Option<Vec<u8>>)> = message
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), Some(v.clone())))
        .collect();
    match decode_message(&raw(message, &headers), &DecodeOptions::default()) {
        Ok(Decoded::Event(event)) => event,
        other => panic!("relayed message does not decode: {other:?}"),
    }
}

#[test]
fn encoded_seed_events_equal_the_fixtures_and_decode_back() {
    let now = chrono::Utc::now();
    for (variant, schemas) in VARIANTS {
        let cdc = Encoder::new(Shape::Cdc, schemas, TOPIC, "outbox.event.", "activity");
        let router = Encoder::new(
            Shape::EventRouter,
            schemas,
            TOPIC,
            "outbox.event.",
            "activity",
        );
        for (event, (cdc_name, router_name, _)) in seed_events().iter().zip(INSERTS) {
            let message = cdc.encode(event, Op::Create, now);
            assert_same_change_event(&message, cdc_name, variant, schemas, "activity");
            assert_eq!(&decoded(&message), event, "{cdc_name} round trip");

            let message = router.encode(event, Op::Create, now);
            let dir = format!("outbox/default/{variant}/{router_name}");
            assert_eq!(
                &*message.topic,
                format!("outbox.event.{}", event.aggregate_type)
            );
            assert_eq!(
                message.key,
                fixture(&format!("{dir}.key.json")),
                "{dir} key"
            );
            assert_eq!(
                String::from_utf8_lossy(&message.value),
                String::from_utf8_lossy(&fixture(&format!("{dir}.value.json"))),
                "{dir} value"
            );
            assert_eq!(message.timestamp, Some(now.timestamp_millis()));
            let headers = fixture_headers(&format!(
                "outbox/default/headers/{router_name}.headers.json"
            ));
            // The fixtures' headers, then what `table.fields.additional.placement`
            // adds: eventType and sequenceId.
            let names: Vec<&str> = message.headers.iter().map(|(k, _)| k.as_str()).collect();
            let mut expected: Vec<&str> = headers.iter().map(|(k, _)| k.as_str()).collect();
            expected.extend(["eventType", "sequenceId"]);
            assert_eq!(names, expected, "{dir} headers");
            let id = headers
                .iter()
                .find(|(k, _)| k == "id")
                .map(|(_, v)| v.as_bytes());
            assert_eq!(message.headers[4].1.as_slice(), id.unwrap_or_default());
            let back = decoded(&message);
            let mut want = event.clone();
            want.created_at = None;
            assert_eq!(back, want, "{dir} round trip");
        }
    }
}

#[test]
fn snapshot_rows_are_reads_with_debezium_markers() {
    let encoder = Encoder::new(Shape::Cdc, false, TOPIC, "outbox.event.", "activity");
    let now = chrono::Utc::now();
    let event = &seed_events()[0];
    for (mark, text) in [
        (SnapshotMark::First, "first"),
        (SnapshotMark::Middle, "true"),
        (SnapshotMark::Last, "last"),
    ] {
        let value = json(&encoder.encode(event, Op::Read(mark), now).value);
        assert_eq!(value["op"], "r");
        assert_eq!(value["source"]["snapshot"], text);
        assert_eq!(value["source"]["ts_ms"], now.timestamp_millis());
    }
}

/// The test relay's environment: its own slot and the broker.
fn relay_env(
    stage: &Stage,
    topic: &str,
    extra: &[(&'static str, &str)],
) -> Vec<(&'static str, String)> {
    let mut env = stage.env();
    env.extend(kafka::kafka_env(topic, &kafka::fresh("group")));
    env.push(("RELAY_SLOT", format!("{}_r", stage.slot)));
    for (key, value) in extra {
        env.push((key, value.to_string()));
    }
    env
}

async fn slot_exists(stage: &Stage, slot: &str) -> bool {
    stage
        .pg
        .client()
        .await
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("slots")
        .is_some()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relayed_seed_equals_the_fixtures_on_the_broker() {
    for (variant, schemas) in VARIANTS {
        let stage = Stage::new().await;
        let _slots = kafka::Slots(stage.pg.config.clone());
        // `postgres.` like the fixtures' topic: its first part is Debezium's topic.prefix.
        let topic = format!("postgres.{}", kafka::fresh("relayed"));
        kafka::create_topic(&topic, 4).await;
        let switch = if schemas { "on" } else { "off" };
        let env = relay_env(&stage, &topic, &[("RELAY_SCHEMAS", switch)]);
        let log = stage.log_path();
        let mut relay = kafka::spawn(&["relay"], &env, &log);
        // Streaming (the empty snapshot is done) before the seed commits.
        let slot = format!("{}_r", stage.slot);
        let start = std::time::Instant::now();
        while !slot_exists(&stage, &slot).await {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{}",
                kafka::tail(&log)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let client = stage.pg.client().await;
        client
            .execute(
                "SELECT setval(pg_get_serial_sequence('event_outbox', 'sequence_id'), 103)",
                &[],
            )
            .await
            .expect("setval");
        let mut writer = stage.pg.client().await;
        seed::seed(&mut writer).await.expect("seed");
        let consumed = tokio::task::spawn_blocking({
            let topic = topic.clone();
            move || kafka::consume_until(&topic, Duration::from_secs(60), |got| got.len() >= 4)
        })
        .await
        .expect("consume");
        kafka::terminate(&mut relay, Duration::from_secs(20));
        assert_eq!(consumed.len(), 4, "{}", kafka::tail(&log));
        let events = seed_events();
        for (event, (name, _, _)) in events.iter().zip(INSERTS) {
            let record = consumed
                .iter()
                .find(|c| {
                    c.value.as_deref().is_some_and(|v| {
                        String::from_utf8_lossy(v).contains(&event.event_id.to_string())
                    })
                })
                .unwrap_or_else(|| panic!("{name} was not relayed"));
            let message = Message {
                topic: topic.as_str().into(),
                key: record.key.clone().unwrap_or_default(),
                value: record.value.clone().unwrap_or_default(),
                headers: record
                    .headers
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone().unwrap_or_default()))
                    .collect(),
                timestamp: record.timestamp,
                partition_key: Vec::new(),
            };
            let db = stage.pg.config.database.clone();
            assert_same_change_event(&message, name, variant, schemas, &db);
            assert_eq!(&decoded(&message), event, "{name} relayed round trip");
            assert_eq!(
                record.partition,
                partition_for(event.aggregate_id.to_string().as_bytes(), 4),
                "{name}: the aggregate's partition"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_event_router_shape_and_snapshot_rows_through_the_broker() {
    let stage = Stage::new().await;
    let _slots = kafka::Slots(stage.pg.config.clone());
    // Seeded before the relay starts: these are initial-snapshot rows.
    let mut writer = stage.pg.client().await;
    seed::seed(&mut writer).await.expect("seed");
    let prefix = format!("{}.outbox.event.", kafka::fresh("routed"));
    let cdc_topic = kafka::fresh("snapshot");
    for topic in [
        format!("{prefix}User"),
        format!("{prefix}Activity"),
        cdc_topic.clone(),
    ] {
        kafka::create_topic(&topic, 4).await;
    }
    let log = stage.log_path();
    let mut env = relay_env(&stage, &cdc_topic, &[("RELAY_FORMAT", "outbox")]);
    env.push(("KAFKA_EVENT_ROUTER_TOPIC_PREFIX", prefix.clone()));
    let relay = kafka::spawn(&["relay", "--until-caught-up"], &env, &log);
    kafka::wait_success(relay, Duration::from_secs(120), &log);
    let users = kafka::consume_until(&format!("{prefix}User"), Duration::from_secs(60), |g| {
        g.len() >= 2
    });
    let activities =
        kafka::consume_until(&format!("{prefix}Activity"), Duration::from_secs(60), |g| {
            g.len() >= 2
        });
    assert_eq!(
        (users.len(), activities.len()),
        (2, 2),
        "{}",
        kafka::tail(&log)
    );
    let options = DecodeOptions {
        event_router_topic_prefix: prefix.clone(),
        ..DecodeOptions::default()
    };
    let mut seqs = Vec::new();
    for (aggregate_type, records) in [("User", &users), ("Activity", &activities)] {
        for record in records {
            let topic = format!("{prefix}{aggregate_type}");
            let msg = RawMessage {
                topic: Some(&topic),
                key: record.key.as_deref(),
                value: record.value.as_deref(),
                headers: &record.headers,
            };
            let Ok(Decoded::Event(event)) = decode_message(&msg, &options) else {
                panic!("routed record does not decode: {record:?}");
            };
            assert_eq!(event.aggregate_type, aggregate_type);
            let key = record.key.clone().unwrap_or_default();
            assert_eq!(key, format!("{{\"schema\":{{\"type\":\"string\",\"optional\":false,\"name\":\"io.debezium.data.Uuid\",\"version\":1}},\"payload\":\"{}\"}}", event.aggregate_id).into_bytes());
            assert_eq!(
                record.partition,
                partition_for(&key, 4),
                "keyed like the Java client"
            );
            seqs.push(event.sequence_id);
        }
    }
    seqs.sort();
    assert_eq!(seqs, [Some(1), Some(2), Some(3), Some(4)]);

    // The same rows as change events: the snapshot's reads, first to last.
    let slot = format!("{}_r", stage.slot);
    let client = stage.pg.client().await;
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .expect("drop the relay slot (a new snapshot follows)");
    let env = relay_env(&stage, &cdc_topic, &[("RELAY_SCHEMAS", "off")]);
    let relay = kafka::spawn(&["relay", "--until-caught-up"], &env, &log);
    kafka::wait_success(relay, Duration::from_secs(120), &log);
    let records = kafka::consume_until(&cdc_topic, Duration::from_secs(60), |g| g.len() >= 4);
    let mut reads: Vec<(i64, String)> = records
        .iter()
        .map(|r| {
            let value = json(r.value.as_deref().unwrap_or_default());
            assert_eq!(value["op"], "r");
            (
                value["after"]["sequence_id"].as_i64().unwrap_or_default(),
                value["source"]["snapshot"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    reads.sort();
    let marks: Vec<&str> = reads.iter().map(|(_, m)| m.as_str()).collect();
    assert_eq!(marks, ["first", "true", "true", "last"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn librdkafka_partitions_keys_as_the_relay_does() {
    let topic = kafka::fresh("murmur");
    kafka::create_topic(&topic, 4).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka::brokers())
        .set("partitioner", "murmur2_random")
        .set("batch.num.messages", "1")
        .create()
        .expect("producer");
    for i in 0..40 {
        let key = uuid::Uuid::new_v4().to_string();
        let delivery = producer
            .send(
                FutureRecord::<String, String>::to(&topic)
                    .key(&key)
                    .payload(&format!("{i}")),
                Duration::from_secs(30),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
        assert_eq!(
            delivery.partition,
            partition_for(key.as_bytes(), 4),
            "key {key}"
        );
    }
}
