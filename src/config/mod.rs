//! Configuration: environment variables (optionally from a `.env` file), overridden
//! by command-line flags, validated at start-up with one message per problem.
//!
//! Loading takes a plain map so tests can feed it; nothing here reads the process
//! environment by itself except [`env_map`].

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// The variables as one map: key -> value.
pub type EnvMap = BTreeMap<String, String>;

/// A value that must never appear in logs, errors or `Debug` output.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that needs it (a connection).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// One problem with one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Every problem found, one line each.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
    #[error("cannot read env file {path}: {source}")]
    EnvFileRead {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A line that does not parse: named by number and key, never by its value.
    #[error("env file {path}, line {line}{}: {problem}", key.as_ref().map(|k| format!(", key {k}")).unwrap_or_default())]
    EnvFileLine {
        path: String,
        line: usize,
        key: Option<String>,
        problem: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where the PostgreSQL outbox lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresConfig {
    pub host: String,
    pub port: u16,
    pub database: String,
    pub user: String,
    pub password: Secret,
    pub connect_timeout: Duration,
}

impl PostgresConfig {
    /// `host:port/database`, safe to print.
    pub fn display_target(&self) -> String {
        format!("{}:{}/{}", self.host, self.port, self.database)
    }

    pub fn to_client_config(&self) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host(&self.host)
            .port(self.port)
            .dbname(&self.database)
            .user(&self.user)
            .application_name("activity-event-processor")
            .connect_timeout(self.connect_timeout);
        if !self.password.expose().is_empty() {
            config.password(self.password.expose());
        }
        config
    }
}

/// Where the read models live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MongoConfig {
    /// May carry credentials: print it with [`redact_uri`].
    pub uri: Secret,
    pub database: String,
}

/// Which capture method feeds the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Replication,
    Polling,
    Kafka,
}

impl SourceKind {
    pub fn parse(raw: &str) -> Option<SourceKind> {
        match raw.to_ascii_lowercase().as_str() {
            "replication" => Some(SourceKind::Replication),
            "polling" => Some(SourceKind::Polling),
            "kafka" => Some(SourceKind::Kafka),
            _ => None,
        }
    }
}

/// Logical replication capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationConfig {
    pub slot: String,
    pub publication: String,
}

/// Polling capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollingConfig {
    pub workers: usize,
    pub lease: Duration,
    pub interval: Duration,
}

/// The processing loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineConfig {
    pub batch_size: usize,
    pub batch_wait: Duration,
    pub max_retries: u32,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub mark_processed: bool,
    pub shutdown_timeout: Duration,
}

/// The whole configuration of one process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub postgres: PostgresConfig,
    pub mongodb: MongoConfig,
    pub source: SourceKind,
    pub replication: ReplicationConfig,
    pub polling: PollingConfig,
    pub pipeline: PipelineConfig,
    pub kafka: KafkaConfig,
    pub log_level: String,
    pub log_format: LogFormat,
}

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
        "LOG_LEVEL",
        "info",
        "tracing filter: error, warn, info, debug, trace or a directive list",
    ),
    ("LOG_FORMAT", "text", "text or json"),
];

fn default_of(key: &str) -> &'static str {
    KEYS.iter()
        .find(|(k, _, _)| *k == key)
        .map(|(_, d, _)| *d)
        .unwrap_or("")
}

/// Reads keys from a map, collecting problems instead of stopping at the first.
struct Reader<'a> {
    env: &'a EnvMap,
    problems: Vec<Problem>,
}

impl<'a> Reader<'a> {
    fn raw(&self, key: &str) -> String {
        self.env
            .get(key)
            .cloned()
            .unwrap_or_else(|| default_of(key).to_string())
    }

    fn problem(&mut self, key: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.to_string(),
            message: message.into(),
        });
    }

    fn string(&mut self, key: &str) -> String {
        self.raw(key).trim().to_string()
    }

    fn non_empty(&mut self, key: &str) -> String {
        let value = self.string(key);
        if value.is_empty() {
            self.problem(key, "must not be empty");
        }
        value
    }

    fn port(&mut self, key: &str) -> u16 {
        let raw = self.string(key);
        match raw.parse::<u16>() {
            Ok(port) if port > 0 => port,
            _ => {
                self.problem(key, format!("`{raw}` is not a port number (1-65535)"));
                0
            }
        }
    }

    fn positive(&mut self, key: &str) -> u64 {
        let raw = self.string(key);
        match raw.parse::<u64>() {
            Ok(n) if n > 0 => n,
            _ => {
                self.problem(key, format!("`{raw}` is not a positive whole number"));
                1
            }
        }
    }

    fn boolean(&mut self, key: &str) -> bool {
        let raw = self.string(key);
        match raw.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => true,
            "false" | "0" | "no" | "off" => false,
            _ => {
                self.problem(key, format!("`{raw}` is not true or false"));
                false
            }
        }
    }

    fn identifier(&mut self, key: &str) -> String {
        let value = self.string(key);
        let valid = !value.is_empty()
            && value.len() <= 63
            && value
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            self.problem(
                key,
                format!("`{value}` must be 1-63 characters of a-z, 0-9 and _"),
            );
        }
        value
    }

    fn duration(&mut self, key: &str) -> Duration {
        let raw = self.string(key);
        match parse_duration(&raw) {
            Some(duration) => duration,
            None => {
                self.problem(
                    key,
                    format!("`{raw}` is not a duration (use e.g. 250ms, 10s, 5m)"),
                );
                Duration::ZERO
            }
        }
    }
}

/// Parses `250ms`, `10s`, `5m`, `1h`; a bare number means seconds.
pub fn parse_duration(raw: &str) -> Option<Duration> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (digits, unit) = raw.split_at(split);
    let amount: u64 = digits.parse().ok()?;
    let millis = match unit.trim() {
        "ms" => amount,
        "" | "s" => amount.checked_mul(1_000)?,
        "m" => amount.checked_mul(60_000)?,
        "h" => amount.checked_mul(3_600_000)?,
        _ => return None,
    };
    Some(Duration::from_millis(millis))
}

impl Config {
    /// Builds and validates the configuration from a map of variables.
    pub fn from_env(env: &EnvMap) -> Result<Config, ConfigError> {
        let mut r = Reader {
            env,
            problems: Vec::new(),
        };
        for key in env.keys() {
            if let Some(known) = misspelt(key) {
                r.problem(key, format!("unknown key; did you mean {known}?"));
            }
        }
        let postgres = PostgresConfig {
            host: r.non_empty("POSTGRES_HOST"),
            port: r.port("POSTGRES_PORT"),
            database: r.non_empty("POSTGRES_DB"),
            user: r.non_empty("POSTGRES_USER"),
            password: Secret::new(r.raw("POSTGRES_PASSWORD")),
            connect_timeout: r.duration("POSTGRES_CONNECT_TIMEOUT"),
        };
        let mongo_uri = r.non_empty("MONGODB_URI");
        if let Some(problem) = redact::uri_problem(&mongo_uri) {
            r.problem("MONGODB_URI", problem);
        }
        let mongodb = MongoConfig {
            uri: Secret::new(mongo_uri),
            database: r.non_empty("MONGODB_DB"),
        };
        let source_raw = r.string("SOURCE");
        let source = SourceKind::parse(&source_raw).unwrap_or_else(|| {
            r.problem(
                "SOURCE",
                format!("`{source_raw}` is not one of: replication, polling, kafka"),
            );
            SourceKind::Replication
        });
        let replication = ReplicationConfig {
            slot: r.identifier("REPLICATION_SLOT"),
            publication: r.identifier("PUBLICATION"),
        };
        let polling = PollingConfig {
            workers: r.positive("POLL_WORKERS") as usize,
            lease: r.duration("POLL_LEASE"),
            interval: r.duration("POLL_INTERVAL"),
        };
        let pipeline = PipelineConfig {
            batch_size: r.positive("BATCH_SIZE") as usize,
            batch_wait: r.duration("BATCH_WAIT"),
            max_retries: r.positive("MAX_RETRIES").min(u64::from(u32::MAX)) as u32,
            backoff_initial: r.duration("RETRY_BACKOFF_INITIAL"),
            backoff_max: r.duration("RETRY_BACKOFF_MAX"),
            mark_processed: r.boolean("MARK_PROCESSED"),
            shutdown_timeout: r.duration("SHUTDOWN_TIMEOUT"),
        };
        let kafka = kafka::kafka_config(&mut r, &replication.slot);
        let log_level = r.non_empty("LOG_LEVEL");
        let log_format = match r.string("LOG_FORMAT").to_ascii_lowercase().as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                r.problem("LOG_FORMAT", format!("`{other}` is not one of: text, json"));
                LogFormat::Text
            }
        };
        if postgres.connect_timeout.is_zero() && r.problems.is_empty() {
            r.problem("POSTGRES_CONNECT_TIMEOUT", "must be greater than zero");
        }
        if r.problems.is_empty() {
            Ok(Config {
                postgres,
                mongodb,
                source,
                replication,
                polling,
                pipeline,
                kafka,
                log_level,
                log_format,
            })
        } else {
            Err(ConfigError::Invalid(r.problems))
        }
    }
}

/// A key that looks like one of ours but is not (a typo would otherwise be
/// silently ignored and its default used).
fn misspelt(key: &str) -> Option<&'static str> {
    if KEYS.iter().any(|(k, _, _)| *k == key) {
        return None;
    }
    let prefix = key.split('_').next().unwrap_or("");
    if !matches!(
        prefix,
        "POSTGRES" | "MONGODB" | "KAFKA" | "POLL" | "REPLICATION" | "BATCH" | "RETRY" | "RELAY"
    ) {
        return None;
    }
    KEYS.iter()
        .map(|(k, _, _)| *k)
        .filter(|k| k.starts_with(prefix))
        .min_by_key(|k| edit_distance(k, key))
        .filter(|k| edit_distance(k, key) <= 3)
}

fn edit_distance(a: &str, b: &str) -> usize {
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

mod env_file;
mod kafka;
mod redact;
#[cfg(test)]
mod tests;

pub use env_file::env_map;
pub use kafka::{
    is_topic_name, KafkaConfig, KafkaProperties, RelayConfig, RelayFormat, RelaySource,
};
pub use redact::{redact_uri, scrub, uri_secrets};
