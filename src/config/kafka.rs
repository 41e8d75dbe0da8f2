//! The Kafka part of the configuration: brokers, topics, the consumer group,
//! passthrough librdkafka properties, and the relay.

use super::keys::edit_distance;
use super::parse::Reader;
use super::redact::scrub;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaConfRes;
use std::fmt;
use std::time::Duration;

/// Extra librdkafka properties (`key=value,key=value`), passed through as they
/// are. Values may be credentials (`sasl.password`): `Debug` shows the keys only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct KafkaProperties(pub Vec<(String, String)>);

impl fmt::Debug for KafkaProperties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(key, _)| format!("{key}=***")))
            .finish()
    }
}

/// What `relay` writes: Debezium change events or Outbox Event Router records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayFormat {
    /// The change-event envelope of the outbox table, on one topic.
    Cdc,
    /// The Event Router shape, on `<prefix><aggregate type>`.
    Outbox,
}

/// Where `relay` reads the outbox from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelaySource {
    Replication,
    Polling,
}

impl From<RelaySource> for super::SourceKind {
    fn from(source: RelaySource) -> Self {
        match source {
            RelaySource::Replication => super::SourceKind::Replication,
            RelaySource::Polling => super::SourceKind::Polling,
        }
    }
}

/// The relay: outbox -> Kafka, in Debezium's message format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayConfig {
    /// The relay's own replication slot (the processor's slot is not shared).
    pub slot: String,
    pub format: RelayFormat,
    /// JsonConverter `schemas.enable`: `{"schema":..,"payload":..}` or the bare payload.
    pub schemas: bool,
    pub source: RelaySource,
}

/// Kafka: the consumer of `run --source kafka`, the relay's producer, topic admin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Topics the consumer subscribes to; the relay writes change events to the first.
    pub topics: Vec<String>,
    pub group_id: String,
    pub format: crate::decode::MessageFormat,
    pub event_router_topic_prefix: String,
    pub session_timeout: Duration,
    /// Longest wait for a broker answer to an admin or metadata request.
    pub timeout: Duration,
    /// Properties for every client (security settings, ...).
    pub client_config: KafkaProperties,
    pub consumer_config: KafkaProperties,
    pub producer_config: KafkaProperties,
    pub relay: RelayConfig,
}

/// librdkafka properties the processor sets itself: overriding them would
/// break a guarantee (offsets committed only after MongoDB holds the effects,
/// the relay's idempotent, ordered delivery).
const RESERVED_CONSUMER: &[&str] = &[
    "enable.auto.commit",
    "enable.auto.offset.store",
    "group.id",
    "isolation.level",
];
const RESERVED_PRODUCER: &[&str] = &[
    "enable.idempotence",
    "acks",
    "request.required.acks",
    "transactional.id",
    "max.in.flight.requests.per.connection",
    "max.in.flight",
];

impl Reader<'_> {
    /// `key=value,key=value`; an empty value means none.
    pub(super) fn properties(&mut self, key: &str, reserved: &[&str]) -> KafkaProperties {
        let raw = self.string(key);
        let mut pairs = Vec::new();
        for item in raw.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            match item.split_once('=') {
                Some((name, value)) if !name.trim().is_empty() => {
                    let name = name.trim();
                    let value = value.trim();
                    if reserved.contains(&name) {
                        self.problem(
                            key,
                            format!("`{name}` is set by the processor and cannot be overridden"),
                        );
                    } else if let Some(problem) = property_problem(name, value) {
                        self.problem(key, problem);
                    } else {
                        pairs.push((name.to_string(), value.to_string()));
                    }
                }
                _ => {
                    // The item may hold a credential: name it by position only.
                    let position = pairs.len() + 1;
                    self.problem(key, format!("item {position} is not of the form key=value"));
                }
            }
        }
        KafkaProperties(pairs)
    }

    /// A comma-separated list of Kafka topic names.
    pub(super) fn topics(&mut self, key: &str) -> Vec<String> {
        let raw = self.string(key);
        let topics: Vec<String> = raw
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_string)
            .collect();
        if topics.is_empty() {
            self.problem(key, "must name at least one topic");
        }
        for topic in &topics {
            if !is_topic_name(topic) {
                self.problem(
                    key,
                    format!("`{topic}` is not a Kafka topic name (1-249 characters of a-z, A-Z, 0-9, '.', '_', '-')"),
                );
            }
        }
        topics
    }
}

/// Why librdkafka refuses `name=value` on its own, if it does, in words that
/// never include the value.
fn property_problem(name: &str, value: &str) -> Option<String> {
    let err = ClientConfig::new()
        .set(name, value)
        .create_native_config()
        .err()?;
    Some(describe_refusal(&err, &[value]))
}

/// Properties whose misspelling is worth a suggestion: the security settings.
const WELL_KNOWN: &[&str] = &[
    "security.protocol",
    "sasl.mechanism",
    "sasl.mechanisms",
    "sasl.username",
    "sasl.password",
    "sasl.oauthbearer.client.id",
    "sasl.oauthbearer.client.secret",
    "sasl.oauthbearer.token.endpoint.url",
    "ssl.ca.location",
    "ssl.certificate.location",
    "ssl.key.location",
    "ssl.key.password",
    "ssl.keystore.location",
    "ssl.keystore.password",
];

/// librdkafka's refusal of a configuration, without any value in it: its own
/// message names the value (`No such configuration property: "sasl.pasword"
/// sasl.pasword <value>`), so it is rewritten, and any text of it that does
/// reach the message is cleared of `values`.
pub fn describe_refusal(err: &KafkaError, values: &[&str]) -> String {
    match err {
        KafkaError::ClientConfig(RDKafkaConfRes::RD_KAFKA_CONF_UNKNOWN, _, name, _) => {
            let suggestion = WELL_KNOWN
                .iter()
                .filter(|known| edit_distance(known, name) <= 2)
                .min_by_key(|known| edit_distance(known, name))
                .map(|known| format!("; did you mean `{known}`?"))
                .unwrap_or_default();
            format!("`{name}` is not a librdkafka property{suggestion}")
        }
        KafkaError::ClientConfig(_, description, name, value) => {
            let mut all = values.to_vec();
            all.push(value);
            format!(
                "`{name}` has an invalid value ({})",
                scrub(description, &all)
            )
        }
        other => scrub(&other.to_string(), values),
    }
}

impl KafkaConfig {
    /// librdkafka's refusal of a client built from this configuration,
    /// without any value of `KAFKA_CONFIG`, `KAFKA_CONSUMER_CONFIG` or
    /// `KAFKA_PRODUCER_CONFIG` in it.
    pub fn describe_refusal(&self, err: &KafkaError) -> String {
        let values: Vec<&str> = [
            &self.client_config,
            &self.consumer_config,
            &self.producer_config,
        ]
        .iter()
        .flat_map(|properties| properties.0.iter().map(|(_, value)| value.as_str()))
        .collect();
        describe_refusal(err, &values)
    }
}

/// Kafka's rule for topic names.
pub fn is_topic_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

pub(super) fn kafka_config(r: &mut Reader<'_>, replication_slot: &str) -> KafkaConfig {
    let brokers = r.non_empty("KAFKA_BROKERS");
    for broker in brokers.split(',').map(str::trim) {
        let valid = broker.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !brokers.is_empty() && !valid {
            r.problem("KAFKA_BROKERS", format!("`{broker}` is not host:port"));
        }
    }
    let topics = r.topics("KAFKA_TOPIC");
    let group_id = r.non_empty("KAFKA_GROUP_ID");
    let format_raw = r.string("KAFKA_FORMAT");
    let format = format_raw.parse().unwrap_or_else(|_| {
        r.problem(
            "KAFKA_FORMAT",
            format!("`{format_raw}` is not one of: auto, cdc, event-router"),
        );
        crate::decode::MessageFormat::Auto
    });
    let event_router_topic_prefix = r.string("KAFKA_EVENT_ROUTER_TOPIC_PREFIX");
    let session_timeout = r.duration("KAFKA_SESSION_TIMEOUT");
    if session_timeout.is_zero() {
        r.problem("KAFKA_SESSION_TIMEOUT", "must be greater than zero");
    }
    let timeout = r.duration("KAFKA_TIMEOUT");
    if timeout.is_zero() {
        r.problem("KAFKA_TIMEOUT", "must be greater than zero");
    }
    let client_config = r.properties(
        "KAFKA_CONFIG",
        &[RESERVED_CONSUMER, RESERVED_PRODUCER].concat(),
    );
    let consumer_config = r.properties("KAFKA_CONSUMER_CONFIG", RESERVED_CONSUMER);
    let producer_config = r.properties("KAFKA_PRODUCER_CONFIG", RESERVED_PRODUCER);

    let mut slot = r.string("RELAY_SLOT");
    if slot.is_empty() {
        slot = format!("{replication_slot}_relay");
    }
    // The relay takes its first snapshot through `<slot>_init`.
    let valid_slot = slot.len() <= 58
        && slot
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !valid_slot {
        r.problem(
            "RELAY_SLOT",
            format!("`{slot}` must be 1-58 characters of a-z, 0-9 and _ (set RELAY_SLOT when REPLICATION_SLOT is long)"),
        );
    }
    let format_raw = r.string("RELAY_FORMAT");
    let relay_format = match format_raw.to_ascii_lowercase().as_str() {
        "cdc" => RelayFormat::Cdc,
        "outbox" => RelayFormat::Outbox,
        _ => {
            r.problem(
                "RELAY_FORMAT",
                format!("`{format_raw}` is not one of: cdc, outbox"),
            );
            RelayFormat::Cdc
        }
    };
    let schemas = r.boolean("RELAY_SCHEMAS");
    let source_raw = r.string("RELAY_SOURCE");
    let relay_source = match source_raw.to_ascii_lowercase().as_str() {
        "replication" => RelaySource::Replication,
        "polling" => RelaySource::Polling,
        _ => {
            r.problem(
                "RELAY_SOURCE",
                format!("`{source_raw}` is not one of: replication, polling"),
            );
            RelaySource::Replication
        }
    };
    KafkaConfig {
        brokers,
        topics,
        group_id,
        format,
        event_router_topic_prefix,
        session_timeout,
        timeout,
        client_config,
        consumer_config,
        producer_config,
        relay: RelayConfig {
            slot,
            format: relay_format,
            schemas,
            source: relay_source,
        },
    }
}
