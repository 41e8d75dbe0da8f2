//! Shared by the `kafka_*` tests: the Kafka-API
//! broker that `scripts/services.sh` starts (tansu), fresh topics, a test
//! producer and consumer with the work-arounds tansu needs
//! (`batch.num.messages=1`, `session.timeout.ms=6000`, earliest offsets, never
//! high watermarks as counts), and the binary run as relay or consumer.

#![allow(dead_code)]

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| {
        panic!(
            "KAFKA_BROKERS is not set: this test needs the Kafka-API broker. Start the services with\n    \
             eval \"$(scripts/services.sh up)\"\n(or run the whole suite with scripts/test.sh)"
        )
    })
}

/// A topic name of this test's own.
pub fn fresh(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

pub async fn create_topic(name: &str, partitions: i32) {
    create_topic_at(&brokers(), name, partitions).await
}

/// [`create_topic`] on the broker at `brokers`.
pub async fn create_topic_at(brokers: &str, name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
    let results = admin
        .create_topics(
            &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create topics");
    for result in results {
        result.unwrap_or_else(|(topic, code)| panic!("cannot create {topic}: {code}"));
    }
}

/// A producer set up as tansu needs in tests (one message per batch).
pub fn producer() -> FutureProducer {
    producer_at(&brokers())
}

/// [`producer`] for the broker at `brokers`.
pub fn producer_at(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("batch.num.messages", "1")
        .set("message.timeout.ms", "300000")
        .create()
        .expect("producer")
}

/// Produces one record; returns its partition and offset.
pub async fn produce(
    producer: &FutureProducer,
    topic: &str,
    partition: Option<i32>,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    headers: &[(String, Option<Vec<u8>>)],
) -> (i32, i64) {
    let mut owned = OwnedHeaders::new();
    for (name, value) in headers {
        owned = owned.insert(Header {
            key: name,
            value: value.as_deref(),
        });
    }
    let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(owned);
    if let Some(key) = key {
        record = record.key(key);
    }
    if let Some(value) = value {
        record = record.payload(value);
    }
    if let Some(partition) = partition {
        record = record.partition(partition);
    }
    let delivery = producer
        .send(record, Duration::from_secs(30))
        .await
        .unwrap_or_else(|(err, _)| panic!("produce to {topic}: {err}"));
    (delivery.partition, delivery.offset)
}

/// One record as read back.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    pub timestamp: Option<i64>,
}

/// Reads `topic` from the start with a group of its own until `done` says so
/// (or `limit` passes: then whatever was read).
pub fn consume_until(
    topic: &str,
    limit: Duration,
    done: impl FnMut(&[Consumed]) -> bool,
) -> Vec<Consumed> {
    consume_until_at(&brokers(), topic, limit, done)
}

/// [`consume_until`] from the broker at `brokers`.
pub fn consume_until_at(
    brokers: &str,
    topic: &str,
    limit: Duration,
    mut done: impl FnMut(&[Consumed]) -> bool,
) -> Vec<Consumed> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", fresh("reader"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let start = Instant::now();
    let mut out = Vec::new();
    while start.elapsed() < limit && !done(&out) {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => out.push(Consumed {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(<[u8]>::to_vec),
                value: m.payload().map(<[u8]>::to_vec),
                headers: m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                            .collect()
                    })
                    .unwrap_or_default(),
                timestamp: m.timestamp().to_millis(),
            }),
            Some(Err(err)) => eprintln!("test consumer: {err}"),
            None => {}
        }
    }
    out
}

/// The `event_id` in a change event's key (`{"event_id": ...}`, bare or
/// inside a JsonConverter envelope's `payload`).
pub fn event_id(key: &[u8]) -> Option<String> {
    let key: serde_json::Value = serde_json::from_slice(key).ok()?;
    let id = key
        .get("event_id")
        .or_else(|| key.get("payload").and_then(|p| p.get("event_id")))?;
    id.as_str().map(str::to_string)
}

/// Reads `topic` from the start until every id of `wanted` is among the
/// change events' keys (or `limit` passes); the ids seen and the records read.
pub fn published_ids(
    topic: &str,
    wanted: &std::collections::BTreeSet<String>,
    limit: Duration,
) -> (std::collections::BTreeSet<String>, usize) {
    let mut seen = std::collections::BTreeSet::new();
    let mut read = 0;
    let records = consume_until(topic, limit, |records| {
        for record in &records[read..] {
            if let Some(id) = record.key.as_deref().and_then(event_id) {
                seen.insert(id);
            }
        }
        read = records.len();
        wanted.is_subset(&seen)
    });
    (seen, records.len())
}

/// A child process that is killed (SIGKILL) when dropped, so that a failing
/// test leaves nothing running.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Drops the replication slots of a test database when dropped (after the
/// processes that use them, before the database: declare it between the two).
pub struct Slots(pub activity_event_processor::config::PostgresConfig);

impl Drop for Slots {
    fn drop(&mut self) {
        let config = self.0.clone();
        super::clean_up(async move {
            let Ok((client, connection)) = config
                .to_client_config()
                .connect(tokio_postgres::NoTls)
                .await
            else {
                return;
            };
            tokio::spawn(connection);
            for _ in 0..50 {
                let dropped = client
                    .query(
                        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
                     WHERE database = current_database() AND NOT active",
                        &[],
                    )
                    .await;
                let left = client
                .query_one(
                    "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()",
                    &[],
                )
                .await
                .map(|row| row.get::<_, i64>(0))
                .unwrap_or(0);
                if dropped.is_ok() && left == 0 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }
}

/// Starts the binary (`relay ...` or `run ...`) with `env` on a clean
/// environment, its log appended to `log`.
pub fn spawn(args: &[&str], env: &[(&'static str, String)], log: &Path) -> Proc {
    let mut command = Command::new(super::pipeline::binary());
    command.args(args);
    spawn_command(command, env, log)
}

/// Starts `command` with only `env` (and PATH, HOME) in its environment, its
/// stderr appended to `log`.
pub fn spawn_command(mut command: Command, env: &[(&'static str, String)], log: &Path) -> Proc {
    command.env_clear();
    for key in ["PATH", "HOME"] {
        if let Ok(value) = std::env::var(key) {
            command.env(key, value);
        }
    }
    // Tests run in parallel: the metrics server takes a free port (`env` may say otherwise).
    command.env("METRICS_ADDR", "127.0.0.1:0");
    for (key, value) in env {
        command.env(key, value);
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    Proc(
        command
            .current_dir(std::env::temp_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .spawn()
            .expect("spawn event-processor"),
    )
}

/// Waits for `child` to exit 0 within `limit`.
pub fn wait_success(mut child: Proc, limit: Duration, log: &Path) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.0.try_wait().expect("wait") {
            assert!(
                status.success(),
                "event-processor failed: {status}\n{}",
                tail(log)
            );
            return;
        }
        if start.elapsed() > limit {
            kill_9(&mut child);
            panic!(
                "event-processor did not finish within {limit:?}\n{}",
                tail(log)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn kill_9(child: &mut Proc) {
    let _ = child.0.kill();
    let _ = child.0.wait();
}

/// SIGTERM: the graceful stop.
pub fn terminate(child: &mut Proc, limit: Duration) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status();
    let start = Instant::now();
    while start.elapsed() < limit {
        if child.0.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    kill_9(child);
}

pub fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// The environment that points the binary at the broker, a topic and a group.
pub fn kafka_env(topics: &str, group: &str) -> Vec<(&'static str, String)> {
    vec![
        ("KAFKA_BROKERS", brokers()),
        ("KAFKA_TOPIC", topics.to_string()),
        ("KAFKA_GROUP_ID", group.to_string()),
        ("KAFKA_SESSION_TIMEOUT", "6s".into()),
        ("KAFKA_PRODUCER_CONFIG", "batch.num.messages=1".into()),
    ]
}

/// Outbox rows marked `processed` (for the relay: published).
pub async fn processed(stage: &super::pipeline::Stage) -> i64 {
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

/// What the relay put on `topic` (`consumed`) holds every event of
/// `history` exactly once, each aggregate's events on one partition in
/// sequence order (`log`: the relay's, shown when an event is missing).
pub fn assert_each_event_once_in_order(
    consumed: &[Consumed],
    history: &[activity_event_processor::decode::OutboxEvent],
    topic: &str,
    log: &Path,
) {
    use activity_event_processor::decode::{decode_message, DecodeOptions, Decoded, RawMessage};
    use std::collections::HashMap;
    use uuid::Uuid;
    let mut seen: HashMap<Uuid, usize> = HashMap::new();
    let mut by_aggregate: HashMap<Uuid, Vec<(i32, i64, Option<i64>)>> = HashMap::new();
    for record in consumed {
        let raw = RawMessage {
            topic: Some(topic),
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
    let repeated: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert_eq!(missing, 0, "events not on the topic\n{}", tail(log));
    assert!(
        repeated.is_empty(),
        "events on the topic more than once: {repeated:?}"
    );
    assert_eq!(consumed.len(), history.len());
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
}

/// Reads `topic` at `brokers` until it holds `count` records, then a few
/// seconds more for any repeat to show.
pub async fn read_back(brokers: &str, topic: &str, count: usize, limit: Duration) -> Vec<Consumed> {
    let (brokers, topic) = (brokers.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let mut complete: Option<Instant> = None;
        consume_until_at(&brokers, &topic, limit, |got| {
            if got.len() >= count && complete.is_none() {
                complete = Some(Instant::now());
            }
            complete.is_some_and(|at| at.elapsed() > Duration::from_secs(5))
        })
    })
    .await
    .expect("read the topic back")
}
