//! The key table: every environment key with its default and meaning, and
//! the command-line flags that override some of them. The flags are built
//! from this table (`cli::flags`) and the loading reads it
//! ([`Config::load`](super::Config::load)), so a key is named once.

/// Every key, its default and what it means: the source of `.env.example` and the
/// README's table (a test keeps them in step).
pub const KEYS: &[(&str, &str, &str)] = &[
    (
        "POSTGRES_HOST",
        "localhost",
        "PostgreSQL host of the outbox",
    ),
    ("POSTGRES_PORT", "5432", "PostgreSQL port"),
    ("POSTGRES_DB", "activity", "database holding event_outbox"),
    ("POSTGRES_USER", "postgres", "PostgreSQL user"),
    (
        "POSTGRES_PASSWORD",
        "",
        "PostgreSQL password (may be empty; never logged)",
    ),
    (
        "POSTGRES_CONNECT_TIMEOUT",
        "10s",
        "give up connecting after this long",
    ),
    (
        "MONGODB_URI",
        "mongodb://localhost:27017",
        "MongoDB connection string of the read models (credentials never logged)",
    ),
    ("MONGODB_DB", "activity_read", "database of the read models"),
    (
        "MONGODB_READ_CHUNK",
        "64",
        "ids per `$in` when reading read-model documents (1000 suits MongoDB itself)",
    ),
    (
        "SOURCE",
        "replication",
        "capture method: replication, polling or kafka",
    ),
    (
        "REPLICATION_SLOT",
        "activity_event_processor",
        "logical replication slot (created if missing)",
    ),
    (
        "PUBLICATION",
        "activity_event_processor_outbox",
        "publication of the outbox inserts (created if missing)",
    ),
    ("POLL_WORKERS", "1", "polling workers in this process"),
    (
        "POLL_LEASE",
        "30s",
        "a polling claim older than this is taken over (its worker died)",
    ),
    (
        "POLL_INTERVAL",
        "200ms",
        "pause between polls when the outbox is empty",
    ),
    ("BATCH_SIZE", "1000", "most events per batch"),
    ("BATCH_WAIT", "50ms", "longest wait to fill a batch"),
    (
        "DOCUMENT_CACHE",
        "20000",
        "read-model documents kept in memory across batches (0: none)",
    ),
    (
        "MAX_RETRIES",
        "5",
        "attempts before an event that may be a race is dead-lettered",
    ),
    (
        "RETRY_BACKOFF_INITIAL",
        "100ms",
        "first pause after a transient failure",
    ),
    ("RETRY_BACKOFF_MAX", "30s", "cap of the exponential backoff"),
    (
        "MARK_PROCESSED",
        "true",
        "replication: set outbox rows processed once applied (false for write-heavy databases)",
    ),
    (
        "SHUTDOWN_TIMEOUT",
        "30s",
        "longest graceful shutdown before giving up on the batch in flight",
    ),
    (
        "KAFKA_BROKERS",
        "localhost:9092",
        "Kafka bootstrap servers, comma-separated host:port",
    ),
    (
        "KAFKA_TOPIC",
        "postgres.activity.event_outbox",
        "topics the kafka source consumes (comma-separated); the relay writes change events to the first",
    ),
    (
        "KAFKA_GROUP_ID",
        "activity-event-processor",
        "consumer group of the kafka source: instances in one group share the partitions",
    ),
    (
        "KAFKA_FORMAT",
        "auto",
        "message format on the topics: auto (per message), cdc or event-router",
    ),
    (
        "KAFKA_EVENT_ROUTER_TOPIC_PREFIX",
        "outbox.event.",
        "Outbox Event Router topics are <prefix><aggregate type>",
    ),
    (
        "KAFKA_SESSION_TIMEOUT",
        "6s",
        "consumer group session timeout: a dead instance's partitions move after this long",
    ),
    (
        "KAFKA_TIMEOUT",
        "10s",
        "longest wait for the broker to answer a metadata, admin or commit request",
    ),
    (
        "KAFKA_CONFIG",
        "",
        "extra librdkafka properties for every client, key=value,key=value (e.g. security settings; never logged)",
    ),
    (
        "KAFKA_CONSUMER_CONFIG",
        "",
        "extra librdkafka properties for the consumer, key=value,...",
    ),
    (
        "KAFKA_PRODUCER_CONFIG",
        "",
        "extra librdkafka properties for the relay's producer, key=value,... (e.g. batch.num.messages=1)",
    ),
    (
        "RELAY_SLOT",
        "",
        "the relay's replication slot (empty: <REPLICATION_SLOT>_relay)",
    ),
    (
        "RELAY_FORMAT",
        "cdc",
        "relay output: cdc (change events on one topic) or outbox (Event Router shape)",
    ),
    (
        "RELAY_SCHEMAS",
        "on",
        "relay output with JsonConverter schemas (on) or bare payloads (off)",
    ),
    (
        "RELAY_SOURCE",
        "replication",
        "how the relay reads the outbox: replication or polling",
    ),
    (
        "METRICS_ADDR",
        "127.0.0.1:9464",
        "where run and relay serve /metrics, /healthz, /readyz and the console: ip:port (loopback by default; port 0 picks a free one) or off",
    ),
    (
        "CONSOLE_TOKEN",
        "",
        "the console's token (a secret): required, as Authorization: Bearer TOKEN or /?token=TOKEN once, when METRICS_ADDR is not loopback; empty: the console is served on loopback only",
    ),
    (
        "HEARTBEAT_INTERVAL",
        "10s",
        "replication: how often run and relay write a heartbeat through the slot (its round trip is measured; it moves an idle slot); off or 0 disables",
    ),
    (
        "LOG_LEVEL",
        "info",
        "tracing filter: error, warn, info, debug, trace or a directive list",
    ),
    ("LOG_FORMAT", "text", "text or json"),
];

/// A command-line flag that overrides one key: `--{long} <{value_name}>`.
/// Its help is the key's meaning from [`KEYS`] (or its own, where the
/// command uses the key in a narrower sense), naming the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flag {
    pub long: &'static str,
    pub key: &'static str,
    pub value_name: &'static str,
    meaning: Option<&'static str>,
}

const fn flag(long: &'static str, key: &'static str, value_name: &'static str) -> Flag {
    Flag {
        long,
        key,
        value_name,
        meaning: None,
    }
}

/// Flags every command takes.
pub const GLOBAL_FLAGS: &[Flag] = &[
    flag("postgres-host", "POSTGRES_HOST", "HOST"),
    flag("postgres-port", "POSTGRES_PORT", "PORT"),
    flag("postgres-db", "POSTGRES_DB", "NAME"),
    flag("postgres-user", "POSTGRES_USER", "USER"),
    flag("log-level", "LOG_LEVEL", "FILTER"),
    flag("log-format", "LOG_FORMAT", "FORMAT"),
];

/// Flags of `run`.
pub const RUN_FLAGS: &[Flag] = &[
    flag("source", "SOURCE", "SOURCE"),
    flag("workers", "POLL_WORKERS", "N"),
    flag("batch-size", "BATCH_SIZE", "N"),
];

/// Flags of `relay`.
pub const RELAY_FLAGS: &[Flag] = &[
    flag("format", "RELAY_FORMAT", "cdc|outbox"),
    flag("schemas", "RELAY_SCHEMAS", "on|off"),
    flag("source", "RELAY_SOURCE", "replication|polling"),
    Flag {
        meaning: Some("topic of the change events"),
        ..flag("topic", "KAFKA_TOPIC", "NAME")
    },
    flag("batch-size", "BATCH_SIZE", "N"),
];

impl Flag {
    /// What the flag sets, for `--help`: the key's meaning and the key.
    pub fn help(&self) -> String {
        let meaning = self.meaning.unwrap_or_else(|| meaning_of(self.key));
        let mut chars = meaning.chars();
        let first = chars.next().map(|c| c.to_ascii_uppercase());
        format!(
            "{}{} (overrides {})",
            first.map(String::from).unwrap_or_default(),
            chars.as_str(),
            self.key
        )
    }
}

/// The default of `key` (empty for an unknown key).
pub(super) fn default_of(key: &str) -> &'static str {
    KEYS.iter()
        .find(|(k, _, _)| *k == key)
        .map(|(_, d, _)| *d)
        .unwrap_or("")
}

fn meaning_of(key: &str) -> &'static str {
    KEYS.iter()
        .find(|(k, _, _)| *k == key)
        .map(|(_, _, m)| *m)
        .unwrap_or("")
}

/// A key that looks like one of ours but is not (a typo would otherwise be
/// silently ignored and its default used).
pub(super) fn misspelt(key: &str) -> Option<&'static str> {
    if KEYS.iter().any(|(k, _, _)| *k == key) {
        return None;
    }
    let prefix = key.split('_').next().unwrap_or("");
    if !matches!(
        prefix,
        "POSTGRES"
            | "MONGODB"
            | "KAFKA"
            | "POLL"
            | "REPLICATION"
            | "BATCH"
            | "RETRY"
            | "RELAY"
            | "METRICS"
            | "HEARTBEAT"
    ) {
        return None;
    }
    KEYS.iter()
        .map(|(k, _, _)| *k)
        .filter(|k| k.starts_with(prefix))
        .min_by_key(|k| edit_distance(k, key))
        .filter(|k| edit_distance(k, key) <= 3)
}

pub(super) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            let above = row[j + 1];
            row[j + 1] = (diagonal + cost).min(above + 1).min(row[j] + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flag_overrides_a_key_of_the_table() {
        for flags in [GLOBAL_FLAGS, RUN_FLAGS, RELAY_FLAGS] {
            for flag in flags {
                assert!(
                    KEYS.iter().any(|(k, _, _)| *k == flag.key),
                    "--{} overrides unknown {}",
                    flag.long,
                    flag.key
                );
            }
        }
        let workers = RUN_FLAGS
            .iter()
            .find(|f| f.long == "workers")
            .expect("--workers");
        assert_eq!(
            workers.help(),
            "Polling workers in this process (overrides POLL_WORKERS)"
        );
    }
}
