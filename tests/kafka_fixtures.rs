//! Every message of `tests/fixtures/debezium/` (both converter variants, in
//! manifest order), produced raw to the topics Debezium would use, consumed by
//! `run --source kafka`: the read models equal the reference fold of the events
//! the fixtures carry, every record that does not decode is one dead letter
//! holding the raw record, records without an event are skipped and counted,
//! and a bad record does not stop its partition.

mod common;
use common::kafka;

use activity_event_processor::decode::{decode_message, DecodeOptions, Decoded, SkipReason};
use activity_event_processor::projection::fold::ReferenceFold;
use activity_event_processor::source::kafka::Record;
use activity_event_processor::store::mongo::DEAD_LETTERS;
use common::pipeline::Stage;
use mongodb::bson::doc;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

fn read(relative: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/debezium")
        .join(relative);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn json(relative: &str) -> Value {
    serde_json::from_slice(&read(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

/// One fixture record: where Debezium would have put it, and its bytes.
struct Fixture {
    id: String,
    kind: String,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Vec<(String, Option<Vec<u8>>)>,
}

fn fixtures() -> Vec<Fixture> {
    let manifest = json("manifest.json");
    let mut out = Vec::new();
    for entry in manifest["messages"].as_array().expect("messages") {
        for variant in ["schemas-enabled", "schemas-disabled"] {
            let files = &entry["files"][variant];
            if !files.is_object() {
                continue;
            }
            let flag = |name: &str| files[name].as_bool().unwrap_or(false);
            let mut headers = Vec::new();
            if let Some(sidecar) = entry["files"]["headers"].as_str() {
                for h in json(sidecar)["headers"].as_array().into_iter().flatten() {
                    headers.push((
                        h["key"].as_str().unwrap_or_default().to_string(),
                        h["value"].as_str().map(|v| v.as_bytes().to_vec()),
                    ));
                }
            }
            out.push(Fixture {
                id: format!("{} ({variant})", entry["id"].as_str().unwrap_or_default()),
                kind: entry["kind"].as_str().unwrap_or_default().to_string(),
                key: files["key"]
                    .as_str()
                    .filter(|_| !flag("key_is_kafka_null"))
                    .map(read),
                value: files["value"]
                    .as_str()
                    .filter(|_| !flag("value_is_kafka_null"))
                    .map(read),
                headers,
            });
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn every_fixture_message_gives_the_expected_read_models_and_dead_letters() {
    let stage = Stage::new().await;
    let base = kafka::fresh("fx");
    let prefix = format!("{base}.outbox.event.");
    let topic_of = |kind: &str, fixture: &Fixture| -> String {
        match kind {
            "heartbeat" => format!("__debezium-heartbeat.{base}"),
            "transaction" => format!("{base}.transaction"),
            "outbox" if fixture.id.contains("user_") => format!("{prefix}User"),
            "outbox" => format!("{prefix}Activity"),
            _ => format!("{base}.event_outbox"),
        }
    };
    let topics = [
        format!("{base}.event_outbox"),
        format!("{base}.transaction"),
        format!("__debezium-heartbeat.{base}"),
        format!("{prefix}User"),
        format!("{prefix}Activity"),
    ];
    for topic in &topics {
        // One partition each: the offsets (and so the dead letters' ids) are known.
        kafka::create_topic(topic, 1).await;
    }
    let options = DecodeOptions {
        event_router_topic_prefix: prefix.clone(),
        ..DecodeOptions::default()
    };
    let producer = kafka::producer();
    let mut events = Vec::new();
    let mut malformed = BTreeMap::new();
    let mut skipped: BTreeMap<&'static str, u64> = BTreeMap::new();
    for fixture in fixtures() {
        let topic = topic_of(&fixture.kind, &fixture);
        let (partition, offset) = kafka::produce(
            &producer,
            &topic,
            Some(0),
            fixture.key.as_deref(),
            fixture.value.as_deref(),
            &fixture.headers,
        )
        .await;
        // What the processor must make of it, by the library's own decoder.
        let record = Record {
            topic,
            partition,
            offset,
            key: fixture.key.clone(),
            value: fixture.value.clone(),
            headers: fixture.headers.clone(),
            timestamp: None,
        };
        match decode_message(&record.raw(), &options) {
            Ok(Decoded::Event(event)) => events.push(event),
            Ok(Decoded::Skip(reason)) => *skipped.entry(reason.as_str()).or_default() += 1,
            Err(_) => {
                malformed.insert(
                    record.dead_letter_id().to_string(),
                    (fixture.id.clone(), record),
                );
            }
        }
    }
    assert!(events.len() >= 14, "valid change events: {}", events.len());
    assert!(
        malformed.len() >= 10,
        "malformed records: {}",
        malformed.len()
    );
    for reason in [
        SkipReason::Update,
        SkipReason::Delete,
        SkipReason::Tombstone,
        SkipReason::Heartbeat,
        SkipReason::Transaction,
    ] {
        assert!(skipped.contains_key(reason.as_str()), "no {reason} fixture");
    }
    let mut expected = ReferenceFold::of(&events).read_models();
    expected.dead_letters.extend(malformed.keys().cloned());

    let log = stage.log_path();
    let mut env = stage.env();
    env.extend(kafka::kafka_env(&topics.join(","), &kafka::fresh("group")));
    env.push(("KAFKA_EVENT_ROUTER_TOPIC_PREFIX", prefix.clone()));
    env.push(("LOG_LEVEL", "info".into()));
    let mut consumer = kafka::spawn(&["run", "--source", "kafka"], &env, &log);
    let start = Instant::now();
    loop {
        let actual = stage.mongo.read_models().await;
        if actual == expected {
            break;
        }
        if start.elapsed() > Duration::from_secs(120) {
            eprintln!("{}", kafka::tail(&log));
            assert_eq!(actual.dead_letters, expected.dead_letters, "dead letters");
            assert_eq!(actual.users, expected.users, "users");
            assert_eq!(actual.activities, expected.activities, "activities");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    kafka::terminate(&mut consumer, Duration::from_secs(20));

    // A malformed record's dead letter holds the raw record.
    let (id, (fixture, record)) = malformed
        .iter()
        .find(|(_, (name, _))| name.starts_with("malformed/truncated_json"))
        .expect("a truncated fixture");
    let letters = stage
        .mongo
        .store
        .find(DEAD_LETTERS, doc! { "_id": id }, None)
        .await
        .expect("dead letters");
    let letter = letters
        .first()
        .unwrap_or_else(|| panic!("no dead letter for {fixture}"));
    let payload = letter.get_document("payload").expect("payload");
    assert_eq!(payload.get_str("topic").ok(), Some(record.topic.as_str()));
    let offset = match payload.get("offset") {
        Some(mongodb::bson::Bson::Int32(n)) => Some(i64::from(*n)),
        Some(mongodb::bson::Bson::Int64(n)) => Some(*n),
        _ => None,
    };
    assert_eq!(offset, Some(record.offset));
    let value = payload.get_document("value").expect("value");
    assert_eq!(
        value.get_str("text").ok().map(str::as_bytes),
        record.value.as_deref(),
        "the raw value"
    );
    let error = letter.get_str("error").unwrap_or_default();
    assert!(error.contains("value is not valid json"), "{error}");

    // Skips are counted per reason (logged when the consumer stops).
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains("kafka records"))
        .unwrap_or_else(|| panic!("no summary line\n{}", kafka::tail(&log)));
    let counted: Vec<String> = skipped
        .iter()
        .map(|(r, n)| format!("(\"{r}\", {n})"))
        .collect();
    for item in &counted {
        assert!(line.contains(item.as_str()), "{item} not in {line}");
    }
    assert!(
        line.contains(&format!("malformed={}", malformed.len())),
        "{line}"
    );
}
