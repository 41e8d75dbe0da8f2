//! Decode: every message shape the processor accepts, turned into [`OutboxEvent`].
//!
//! Sources hand raw input here; nothing downstream knows which shape an event came in.
//!
//! Three carriers exist:
//!
//! * an outbox row in PostgreSQL's text form (logical replication tuples, polling):
//!   [`decode_text_row`];
//! * a Debezium change event from Kafka (JsonConverter, with or without the
//!   `{"schema","payload"}` wrapper), plus the heartbeat, transaction-metadata and
//!   tombstone records that travel beside it: [`decode_message`];
//! * the output of Debezium's Outbox Event Router SMT (the value is the payload, the
//!   ids and the event type ride in the key and headers): [`decode_message`].
//!
//! A Kafka record either yields an event, is skipped for a named reason
//! ([`SkipReason`]), or fails with a [`DecodeError`]. Every `DecodeError` is permanent:
//! the same bytes will never decode, so the caller dead-letters the raw message.
//! Nothing here panics on input.

mod debezium;
mod deep;
mod error;
mod event_router;
mod json;
mod payload;
mod row;
// Public, but hidden, for the fuzz targets under fuzz/.
#[doc(hidden)]
pub mod timestamp;

pub use error::{DecodeError, RowOp};
pub use payload::Payload;
pub use row::decode_text_row;

use chrono::{DateTime, Utc};
use serde::Serialize;
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

/// One domain event from the outbox, whatever carried it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutboxEvent {
    pub event_id: Uuid,
    /// The outbox's `sequence_id`; `None` where the carrier does not say it
    /// (an Outbox Event Router message without a `sequenceId` header).
    pub sequence_id: Option<i64>,
    pub aggregate_id: Uuid,
    pub aggregate_type: String,
    pub event_type: String,
    pub payload: Payload,
    /// When the write side committed the event; `None` where the carrier does not say it.
    pub created_at: Option<DateTime<Utc>>,
}

/// What one Kafka record amounts to.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    /// An outbox event to route and project.
    Event(OutboxEvent),
    /// A record that carries no new event; the caller acknowledges it and moves on.
    Skip(SkipReason),
}

/// Why a well-formed record carries no event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SkipReason {
    /// A Kafka null value (Debezium's tombstone after a delete).
    Tombstone,
    /// A Debezium heartbeat record.
    Heartbeat,
    /// A Debezium transaction-metadata record (BEGIN or END).
    Transaction,
    /// An update of an outbox row (`op=u`): status bookkeeping, never a new event.
    Update,
    /// A delete of an outbox row (`op=d`): clean-up, never a new event.
    Delete,
    /// A truncate of the outbox table (`op=t`).
    Truncate,
}

impl SkipReason {
    /// The reason as a bounded metric label and CLI word.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tombstone => "tombstone",
            Self::Heartbeat => "heartbeat",
            Self::Transaction => "transaction",
            Self::Update => "update",
            Self::Delete => "delete",
            Self::Truncate => "truncate",
        }
    }
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One Kafka record as the consumer received it.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawMessage<'a> {
    pub topic: Option<&'a str>,
    /// `None` is a Kafka null key (truncate records have one).
    pub key: Option<&'a [u8]>,
    /// `None` is a Kafka null value (a tombstone).
    pub value: Option<&'a [u8]>,
    /// Header name and raw bytes, in record order; a later header of the same name wins.
    pub headers: &'a [(String, Option<Vec<u8>>)],
}

/// Which producer wrote the records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MessageFormat {
    /// Decide per record: a topic with the event router prefix, or a value that is not
    /// a Debezium envelope, heartbeat or transaction record, is event router output.
    #[default]
    Auto,
    /// Debezium change events of the outbox table (plus heartbeats and transaction records).
    Cdc,
    /// Debezium Outbox Event Router output.
    EventRouter,
}

impl MessageFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Cdc => "cdc",
            Self::EventRouter => "event-router",
        }
    }
}

impl fmt::Display for MessageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MessageFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "cdc" => Ok(Self::Cdc),
            "event-router" => Ok(Self::EventRouter),
            other => Err(format!(
                "unknown message format `{other}`: expected auto, cdc or event-router"
            )),
        }
    }
}

/// How to read Kafka records; the defaults match Debezium's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeOptions {
    pub format: MessageFormat,
    /// The event router's topics are `<prefix><aggregate type>`
    /// (`route.topic.replacement=outbox.event.${routedByValue}`).
    pub event_router_topic_prefix: String,
    /// Header with the event type (`table.fields.additional.placement=event_type:header:eventType`).
    pub event_type_header: String,
    /// Header with the event id (the event router always adds it, as `id`).
    pub event_id_header: String,
    /// Optional header with the sequence id (`sequence_id:header:sequenceId`).
    pub sequence_id_header: String,
    /// Optional header with the aggregate type (`aggregate_type:header:aggregateType`); when
    /// absent the aggregate type is read from the topic.
    pub aggregate_type_header: String,
    /// Optional header with the creation time (`created_at:header:createdAt`).
    pub created_at_header: String,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        Self {
            format: MessageFormat::Auto,
            event_router_topic_prefix: "outbox.event.".to_string(),
            event_type_header: "eventType".to_string(),
            event_id_header: "id".to_string(),
            sequence_id_header: "sequenceId".to_string(),
            aggregate_type_header: "aggregateType".to_string(),
            created_at_header: "createdAt".to_string(),
        }
    }
}

/// A record's decoding and the commit time in the source database it
/// carries, if it carries one ([`decode_message_timed`]).
pub type TimedDecoded = (Decoded, Option<DateTime<Utc>>);

/// Debezium's heartbeat topics are `<topic.heartbeat.prefix>.<topic.prefix>`.
const HEARTBEAT_TOPIC_PREFIX: &str = "__debezium-heartbeat";

/// Decodes one Kafka record.
///
/// A null value is a tombstone in every format. In [`MessageFormat::Auto`], a record on
/// a topic that starts with the event router prefix is event router output; otherwise
/// the value's shape decides (a Debezium envelope has `op`/`before`/`after`/`source`).
pub fn decode_message(
    msg: &RawMessage<'_>,
    options: &DecodeOptions,
) -> Result<Decoded, DecodeError> {
    decode_message_timed(msg, options).map(|(decoded, _)| decoded)
}

/// [`decode_message`], with the commit time in the source database that the
/// record carries, if it carries one: a Debezium change event's `source.ts_us`
/// (else `source.ts_ms`). Event Router output carries none in its value (its
/// Kafka timestamp is the envelope's `ts_ms`: the caller reads that).
pub fn decode_message_timed(
    msg: &RawMessage<'_>,
    options: &DecodeOptions,
) -> Result<TimedDecoded, DecodeError> {
    let Some(value) = msg.value else {
        return Ok((Decoded::Skip(SkipReason::Tombstone), None));
    };
    if msg
        .topic
        .is_some_and(|topic| topic.starts_with(HEARTBEAT_TOPIC_PREFIX))
    {
        return Ok((Decoded::Skip(SkipReason::Heartbeat), None));
    }
    let routed = || event_router::decode(msg, value, options).map(|decoded| (decoded, None));
    match options.format {
        MessageFormat::EventRouter => routed(),
        MessageFormat::Cdc => debezium::decode(value)?.ok_or(DecodeError::NotDebezium),
        MessageFormat::Auto => {
            let prefix = options.event_router_topic_prefix.as_str();
            let by_topic =
                !prefix.is_empty() && msg.topic.is_some_and(|topic| topic.starts_with(prefix));
            if by_topic {
                return routed();
            }
            match debezium::decode(value)? {
                Some(found) => Ok(found),
                None => routed(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INSERT: &str = r#"{"before":null,"after":{"event_id":"0192f4b7-1c3d-7e4f-9a50-3b6c7d8e9f10","sequence_id":104,"aggregate_id":"7d3c9a52-1e4f-4b8a-9c61-2f5e8d7a4b10","aggregate_type":"User","event_type":"UserCreated","payload":"{\"email\": \"a@example.com\"}","created_at":"2026-09-15T09:41:07.509871Z"},"source":{"snapshot":"false"},"transaction":null,"op":"c","ts_ms":1}"#;

    fn message<'a>(topic: Option<&'a str>, value: Option<&'a [u8]>) -> RawMessage<'a> {
        RawMessage {
            topic,
            key: None,
            value,
            headers: &[],
        }
    }

    #[test]
    fn skip_reasons_have_their_labels() {
        let labels: Vec<&str> = [
            SkipReason::Tombstone,
            SkipReason::Heartbeat,
            SkipReason::Transaction,
            SkipReason::Update,
            SkipReason::Delete,
            SkipReason::Truncate,
        ]
        .iter()
        .map(|r| r.as_str())
        .collect();
        assert_eq!(
            labels,
            [
                "tombstone",
                "heartbeat",
                "transaction",
                "update",
                "delete",
                "truncate"
            ]
        );
    }

    #[test]
    fn a_null_value_is_a_tombstone_in_every_format() {
        for format in [
            MessageFormat::Auto,
            MessageFormat::Cdc,
            MessageFormat::EventRouter,
        ] {
            let options = DecodeOptions {
                format,
                ..DecodeOptions::default()
            };
            let decoded = decode_message(&message(Some("t"), None), &options);
            assert!(matches!(decoded, Ok(Decoded::Skip(SkipReason::Tombstone))));
        }
    }

    #[test]
    fn auto_detects_a_change_event() {
        let decoded = decode_message(
            &message(
                Some("postgres.activity.event_outbox"),
                Some(INSERT.as_bytes()),
            ),
            &DecodeOptions::default(),
        );
        let Ok(Decoded::Event(event)) = decoded else {
            panic!("expected an event, got {decoded:?}");
        };
        assert_eq!(event.sequence_id, Some(104));
        assert_eq!(event.event_type, "UserCreated");
    }

    #[test]
    fn cdc_format_rejects_what_is_not_debezium() {
        let options = DecodeOptions {
            format: MessageFormat::Cdc,
            ..DecodeOptions::default()
        };
        let err = decode_message(&message(None, Some(br#""{}""#)), &options);
        assert!(matches!(err, Err(DecodeError::NotDebezium)), "{err:?}");
    }

    #[test]
    fn heartbeat_topics_are_skipped_whatever_the_value() {
        let decoded = decode_message(
            &message(
                Some("__debezium-heartbeat.postgres"),
                Some(b"{\"ts_ms\":1}"),
            ),
            &DecodeOptions {
                format: MessageFormat::EventRouter,
                ..DecodeOptions::default()
            },
        );
        assert!(matches!(decoded, Ok(Decoded::Skip(SkipReason::Heartbeat))));
    }

    #[test]
    fn the_event_router_prefix_wins_over_the_value_shape() {
        // An expanded payload that happens to have an `op` member is still a payload.
        let headers = vec![
            (
                "id".to_string(),
                Some(b"0192f4b7-1c3d-7e4f-9a50-3b6c7d8e9f10".to_vec()),
            ),
            ("eventType".to_string(), Some(b"ThingDone".to_vec())),
        ];
        let msg = RawMessage {
            topic: Some("outbox.event.Thing"),
            key: Some(b"\"7d3c9a52-1e4f-4b8a-9c61-2f5e8d7a4b10\""),
            value: Some(br#"{"op":"c","after":null}"#),
            headers: &headers,
        };
        let decoded = decode_message(&msg, &DecodeOptions::default());
        let Ok(Decoded::Event(event)) = decoded else {
            panic!("expected an event, got {decoded:?}");
        };
        assert_eq!(event.payload, serde_json::json!({"op": "c", "after": null}));
        assert_eq!(event.aggregate_type, "Thing");
    }

    #[test]
    fn an_empty_prefix_does_not_claim_every_topic() {
        let options = DecodeOptions {
            event_router_topic_prefix: String::new(),
            ..DecodeOptions::default()
        };
        let decoded = decode_message(
            &message(
                Some("postgres.activity.event_outbox"),
                Some(INSERT.as_bytes()),
            ),
            &options,
        );
        assert!(matches!(decoded, Ok(Decoded::Event(_))), "{decoded:?}");
    }

    #[test]
    fn message_formats_parse_from_their_names() {
        for format in [
            MessageFormat::Auto,
            MessageFormat::Cdc,
            MessageFormat::EventRouter,
        ] {
            assert_eq!(format.as_str().parse::<MessageFormat>(), Ok(format));
        }
        assert!("kafka".parse::<MessageFormat>().is_err());
    }
}
