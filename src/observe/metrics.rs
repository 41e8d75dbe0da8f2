//! Every metric the processor exports, declared once with its help text, and
//! the typed calls that record them. Names follow the Prometheus conventions:
//! base units (`_seconds`, `_bytes`), counters end in `_total`, labels are
//! bounded (an event type the handler registry does not know is `other`).

use crate::config::SourceKind;
use crate::policy::RetryClass;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The `Content-Type` of what [`Metrics::render`] writes.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Seconds from an event's commit to its effect being durable (or to its
/// receipt): a few milliseconds when the stream keeps up, tens of seconds
/// behind a backlog or a retried outage; past a minute is `+Inf`.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0,
];

/// Events per batch: one event on a quiet outbox up to the batch size limit
/// (`BATCH_SIZE`, 1,000 by default; up to 10,000).
pub const BATCH_SIZE_BUCKETS: [f64; 12] = [
    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 10000.0,
];

/// What became of an event (the `outcome` label of `events_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// Handed over by the capture (counted once per delivery).
    Received,
    /// Its effect is durable in the read models.
    Applied,
    /// At or below its aggregate's `_seq`: a re-delivery, fenced.
    Duplicate,
    /// Written to `dead_letters`.
    DeadLettered,
    /// No handler for its type (the counted "unmatched" path).
    UnknownType,
    /// Passed over on purpose (another table, an event for another aggregate kind).
    Skipped,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Received => "received",
            Outcome::Applied => "applied",
            Outcome::Duplicate => "duplicate",
            Outcome::DeadLettered => "dead_lettered",
            Outcome::UnknownType => "unknown_type",
            Outcome::Skipped => "skipped",
        }
    }
}

/// Which part of the processor retried (the `component` label of `retries_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    Postgres,
    Replication,
    Mongodb,
    Kafka,
}

impl Component {
    pub fn as_str(self) -> &'static str {
        match self {
            Component::Postgres => "postgres",
            Component::Replication => "replication",
            Component::Mongodb => "mongodb",
            Component::Kafka => "kafka",
        }
    }
}

fn source_label(source: SourceKind) -> &'static str {
    match source {
        SourceKind::Replication => "replication",
        SourceKind::Polling => "polling",
        SourceKind::Kafka => "kafka",
    }
}

/// The event type as a label: a type of the handler registry, else `other`
/// (a type name comes from the outbox, so it could take any value).
pub fn event_type_label(event_type: &str) -> &'static str {
    crate::route::HANDLERS
        .iter()
        .map(|(name, _)| *name)
        .find(|name| *name == event_type)
        .unwrap_or("other")
}

type Labels<const N: usize> = [(&'static str, &'static str); N];
type FloatGauge = Gauge<f64, AtomicU64>;

/// The registry and every metric in it.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    events: Family<Labels<3>, Counter>,
    batches: Counter,
    batch_size: Histogram,
    commit_to_durable: Histogram,
    ingestion: Histogram,
    mongo_round_trips: Counter,
    mongo_documents: Counter,
    kafka_produced: Counter,
    kafka_consumer_lag: Family<Vec<(&'static str, String)>, Gauge>,
    retries: Family<Labels<2>, Counter>,
    dead_letters: Gauge,
    dead_letters_oldest_age: FloatGauge,
    last_progress: FloatGauge,
    slot_lag: Gauge,
    checkpoint_lsn: Gauge,
    polling_backlog: Gauge,
    polling_oldest_age: FloatGauge,
    heartbeats_emitted: Counter,
    heartbeat_round_trip: FloatGauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry of its own with every metric registered (tests use one each;
    /// the process uses [`install`]'s).
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let latency = || Histogram::new(LATENCY_BUCKETS);
        let metrics = Metrics {
            events: Family::default(),
            batches: Counter::default(),
            batch_size: Histogram::new(BATCH_SIZE_BUCKETS),
            commit_to_durable: latency(),
            ingestion: latency(),
            mongo_round_trips: Counter::default(),
            mongo_documents: Counter::default(),
            kafka_produced: Counter::default(),
            kafka_consumer_lag: Family::default(),
            retries: Family::default(),
            dead_letters: Gauge::default(),
            dead_letters_oldest_age: FloatGauge::default(),
            last_progress: FloatGauge::default(),
            slot_lag: Gauge::default(),
            checkpoint_lsn: Gauge::default(),
            polling_backlog: Gauge::default(),
            polling_oldest_age: FloatGauge::default(),
            heartbeats_emitted: Counter::default(),
            heartbeat_round_trip: FloatGauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "event_processor_events",
            "Events by capture source, event type (other: a type without handler) and outcome: \
             received, applied, duplicate (fenced re-delivery), dead_lettered, unknown_type, skipped",
            metrics.events.clone(),
        );
        registry.register(
            "event_processor_batches",
            "Batches whose effects became durable",
            metrics.batches.clone(),
        );
        registry.register(
            "event_processor_batch_size",
            "Events per batch",
            metrics.batch_size.clone(),
        );
        registry.register(
            "event_processor_commit_to_durable_seconds",
            "Seconds from an event's commit in PostgreSQL (Kafka: the record or Debezium \
             source timestamp; polling: created_at) to its effect being durable in MongoDB",
            metrics.commit_to_durable.clone(),
        );
        registry.register(
            "event_processor_ingestion_seconds",
            "Seconds from an event's commit to its receipt by the processor",
            metrics.ingestion.clone(),
        );
        registry.register(
            "event_processor_mongodb_round_trips",
            "Write commands sent to MongoDB",
            metrics.mongo_round_trips.clone(),
        );
        registry.register(
            "event_processor_mongodb_documents_written",
            "Read-model and dead-letter documents written to MongoDB",
            metrics.mongo_documents.clone(),
        );
        registry.register(
            "event_processor_kafka_messages_produced",
            "Messages the relay's producer had acknowledged by Kafka",
            metrics.kafka_produced.clone(),
        );
        registry.register(
            "event_processor_kafka_consumer_lag_messages",
            "Messages between the group's committed offset and the high watermark of each partition this process consumes (kafka source)",
            metrics.kafka_consumer_lag.clone(),
        );
        registry.register(
            "event_processor_retries",
            "Attempts that failed with a transient error and were retried, by component and error class",
            metrics.retries.clone(),
        );
        registry.register(
            "event_processor_dead_letters",
            "Documents in the dead_letters collection",
            metrics.dead_letters.clone(),
        );
        registry.register(
            "event_processor_dead_letters_oldest_age_seconds",
            "Age of the oldest dead letter (first failure), 0 when there is none",
            metrics.dead_letters_oldest_age.clone(),
        );
        registry.register(
            "event_processor_last_progress_timestamp_seconds",
            "Unix time at which a batch last became durable",
            metrics.last_progress.clone(),
        );
        registry.register(
            "event_processor_replication_slot_lag_bytes",
            "Bytes of WAL between pg_current_wal_lsn() and the durable checkpoint",
            metrics.slot_lag.clone(),
        );
        registry.register(
            "event_processor_checkpoint_lsn",
            "The durable checkpoint's LSN, as a number of bytes",
            metrics.checkpoint_lsn.clone(),
        );
        registry.register(
            "event_processor_polling_backlog_rows",
            "Outbox rows pending, claimed or to be retried",
            metrics.polling_backlog.clone(),
        );
        registry.register(
            "event_processor_polling_oldest_pending_age_seconds",
            "Age (since created_at) of the oldest unfinished outbox row, 0 when there is none",
            metrics.polling_oldest_age.clone(),
        );
        registry.register(
            "event_processor_heartbeats_emitted",
            "Heartbeat logical messages written to the WAL",
            metrics.heartbeats_emitted.clone(),
        );
        registry.register(
            "event_processor_heartbeat_round_trip_seconds",
            "Seconds from the last heartbeat's emission to its receipt through the slot",
            metrics.heartbeat_round_trip.clone(),
        );
        registry.register(
            "event_processor_build",
            "Version of the running processor",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        registry.register_collector(Box::new(super::process::ProcessCollector::new()));
        Metrics {
            registry,
            ..metrics
        }
    }

    /// The whole registry in the Prometheus text format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; a metric that could not encode
        // would leave the text short, not the process down.
        let _ = prometheus_text::encode(&mut out, &self.registry);
        out
    }

    /// `n` events of `event_type` from `source` came to `outcome`.
    pub fn events(&self, source: SourceKind, event_type: &str, outcome: Outcome, n: u64) {
        self.events
            .get_or_create(&[
                ("source", source_label(source)),
                ("event_type", event_type_label(event_type)),
                ("outcome", outcome.as_str()),
            ])
            .inc_by(n);
    }

    /// A batch of `size` events became durable.
    pub fn batch(&self, size: usize) {
        self.batches.inc();
        self.batch_size.observe(size as f64);
    }

    /// One event's commit-to-durable latency.
    pub fn commit_to_durable(&self, latency: Duration) {
        self.commit_to_durable.observe(latency.as_secs_f64());
    }

    /// One event's commit-to-received latency.
    pub fn ingestion(&self, latency: Duration) {
        self.ingestion.observe(latency.as_secs_f64());
    }

    pub fn mongo(&self, round_trips: u64, documents: u64) {
        self.mongo_round_trips.inc_by(round_trips);
        self.mongo_documents.inc_by(documents);
    }

    pub fn kafka_produced(&self, n: u64) {
        self.kafka_produced.inc_by(n);
    }

    pub fn kafka_consumer_lag(&self, topic: &str, partition: i32, lag: i64) {
        self.kafka_consumer_lag
            .get_or_create(&lag_labels(topic, partition))
            .set(lag);
    }

    /// The partition is no longer this process's: its lag is not shown.
    pub fn kafka_consumer_lag_gone(&self, topic: &str, partition: i32) {
        self.kafka_consumer_lag
            .remove(&lag_labels(topic, partition));
    }

    /// A transient error of `component`, of the kind `class` (a bounded
    /// set: [`RetryClass`]), is retried.
    pub fn retry(&self, component: Component, class: RetryClass) {
        self.retries
            .get_or_create(&[("component", component.as_str()), ("class", class.label())])
            .inc();
    }

    /// The dead letters' count and the age of the oldest (`None`: there is none).
    pub fn dead_letters(&self, count: u64, oldest_age: Option<Duration>) {
        self.dead_letters.set(saturating_i64(count));
        self.dead_letters_oldest_age
            .set(oldest_age.map_or(0.0, |age| age.as_secs_f64()));
    }

    /// A batch just became durable.
    pub fn last_progress(&self) {
        self.last_progress.set(unix_seconds(SystemTime::now()));
    }

    pub fn slot_lag(&self, bytes: u64) {
        self.slot_lag.set(saturating_i64(bytes));
    }

    pub fn checkpoint_lsn(&self, lsn: u64) {
        self.checkpoint_lsn.set(saturating_i64(lsn));
    }

    pub fn polling_backlog(&self, rows: u64, oldest_age: Option<Duration>) {
        self.polling_backlog.set(saturating_i64(rows));
        self.polling_oldest_age
            .set(oldest_age.map_or(0.0, |age| age.as_secs_f64()));
    }

    pub fn heartbeat_emitted(&self) {
        self.heartbeats_emitted.inc();
    }

    /// A heartbeat came back through the slot `round_trip` after it was sent.
    pub fn heartbeat_received(&self, round_trip: Duration) {
        self.heartbeat_round_trip.set(round_trip.as_secs_f64());
    }
}

fn lag_labels(topic: &str, partition: i32) -> Vec<(&'static str, String)> {
    vec![
        ("topic", topic.to_string()),
        ("partition", partition.to_string()),
    ]
}

fn saturating_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

pub(super) fn unix_seconds(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64())
}

static GLOBAL: OnceLock<Metrics> = OnceLock::new();

/// The process's metrics, registered on first use (calling it again returns
/// the same registry).
pub fn install() -> &'static Metrics {
    GLOBAL.get_or_init(Metrics::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|line| line.starts_with(prefix))
    }

    #[test]
    fn what_is_recorded_is_rendered() {
        let metrics = Metrics::new();
        metrics.events(SourceKind::Polling, "UserCreated", Outcome::Applied, 3);
        metrics.events(SourceKind::Polling, "NoSuchType", Outcome::UnknownType, 1);
        metrics.batch(3);
        metrics.commit_to_durable(Duration::from_millis(30));
        metrics.retry(Component::Mongodb, RetryClass::Timeout);
        metrics.slot_lag(4096);
        let text = metrics.render();
        assert!(
            text.contains(
                "event_processor_events_total{source=\"polling\",event_type=\"UserCreated\",outcome=\"applied\"} 3"
            ),
            "{text}"
        );
        assert!(text.contains(
            "event_processor_events_total{source=\"polling\",event_type=\"other\",outcome=\"unknown_type\"} 1"
        ));
        assert_eq!(
            line(&text, "event_processor_batches_total"),
            Some("event_processor_batches_total 1")
        );
        assert!(text.contains("event_processor_commit_to_durable_seconds_bucket{le=\"0.05\"} 1"));
        assert!(text.contains("event_processor_commit_to_durable_seconds_bucket{le=\"0.025\"} 0"));
        assert!(text.contains("event_processor_commit_to_durable_seconds_count 1"));
        assert!(text
            .contains("event_processor_retries_total{component=\"mongodb\",class=\"timeout\"} 1"));
        assert!(text.contains("event_processor_replication_slot_lag_bytes 4096"));
        assert!(text.contains("event_processor_build_info{version=\""));
        assert!(text.contains("# HELP event_processor_events_total "));
    }

    #[test]
    fn a_partition_s_lag_goes_when_the_partition_does() {
        let metrics = Metrics::new();
        metrics.kafka_consumer_lag("outbox", 0, 12);
        metrics.kafka_consumer_lag("outbox", 1, 0);
        let text = metrics.render();
        assert!(text.contains(
            "event_processor_kafka_consumer_lag_messages{topic=\"outbox\",partition=\"0\"} 12"
        ));
        metrics.kafka_consumer_lag_gone("outbox", 0);
        let text = metrics.render();
        assert!(!text.contains("partition=\"0\""), "{text}");
        assert!(text.contains(
            "event_processor_kafka_consumer_lag_messages{topic=\"outbox\",partition=\"1\"} 0"
        ));
    }

    #[test]
    fn buckets_rise() {
        assert!(LATENCY_BUCKETS.windows(2).all(|pair| pair[0] < pair[1]));
        assert!(BATCH_SIZE_BUCKETS.windows(2).all(|pair| pair[0] < pair[1]));
    }
}
