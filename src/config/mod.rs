//! Configuration: environment variables (optionally from a `.env` file), overridden
//! by command-line flags, validated at start-up with one message per problem.
//!
//! Loading takes a plain map so tests can feed it; nothing here reads the process
//! environment by itself except [`env_map`]. The parts: the key table and the
//! flags that override keys (`keys`), parsing and validation (`parse`), the
//! `.env` file (`env_file`), the Kafka settings (`kafka`), the drivers'
//! configuration made from ours (`client`) and keeping secrets out of
//! messages (`redact`).

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
    /// The key as the user gave it: the flag that set it (`--workers`), or
    /// the environment key.
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
    #[error("cannot read env file {path}")]
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

/// Where the read models live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MongoConfig {
    /// May carry credentials: print it with [`redact_uri`].
    pub uri: Secret,
    pub database: String,
    /// Values per `$in` when reading documents by a list of ids.
    pub read_chunk: usize,
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
    /// Read-model documents kept in memory across batches (0: none).
    pub document_cache: usize,
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
    /// Where `/metrics`, `/healthz` and `/readyz` are served (`None`: off).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// What the console asks for (required when `metrics_addr` is not loopback).
    pub console_token: Option<Secret>,
    /// How often the replication source's heartbeat is written (`None`: off).
    pub heartbeat_interval: Option<Duration>,
    pub log_level: String,
    pub log_format: LogFormat,
}

mod client;
mod env_file;
mod kafka;
mod keys;
mod parse;
mod redact;
#[cfg(test)]
pub(crate) mod tests;

pub use env_file::env_map;
pub use kafka::{
    is_topic_name, KafkaConfig, KafkaProperties, RelayConfig, RelayFormat, RelaySource,
};
pub use keys::{Flag, GLOBAL_FLAGS, KEYS, RELAY_FLAGS, RUN_FLAGS};
pub use parse::parse_duration;
pub use redact::{redact_uri, scrub, uri_secrets};
