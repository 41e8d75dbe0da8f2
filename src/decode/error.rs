//! Why a message does not decode. Every variant is permanent: retrying the same
//! bytes gives the same answer, so the message is dead-lettered.

use std::fmt;

/// A message that cannot become an [`OutboxEvent`](super::OutboxEvent).
///
/// Messages are lowercase and name the field (or header, key, topic) at fault, so a
/// dead letter explains itself.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Bytes that are not UTF-8 where text is required.
    #[error("{what} is not valid utf-8: {cause}")]
    NotUtf8 {
        what: String,
        cause: std::str::Utf8Error,
    },
    /// Text that is not JSON (the record value, the key, or the payload column).
    #[error("{what} is not valid json: {cause}")]
    InvalidJson {
        what: &'static str,
        cause: serde_json::Error,
    },
    /// JSON whose structure cannot be read (a duplicate field, say).
    #[error("{what} has an unexpected structure: {cause}")]
    Malformed {
        what: &'static str,
        cause: serde_json::Error,
    },
    /// Cdc format was asked for, but the value is no Debezium record.
    #[error(
        "value is not a debezium change event: it has none of the fields \
         `op`, `before`, `after`, `source` (nor a heartbeat's or transaction record's)"
    )]
    NotDebezium,
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    #[error("field `{0}` is null")]
    NullField(&'static str),
    /// A create or read event without its row image.
    #[error("missing field `after` in a {} (op={}) event", .0.name(), .0.code())]
    MissingAfter(RowOp),
    #[error("field `after` is null in a {} (op={}) event", .0.name(), .0.code())]
    NullAfter(RowOp),
    #[error("unknown op `{0}`: expected one of c, r, u, d, t")]
    UnknownOp(String),
    /// `op=m` is a logical decoding message; Debezium writes those to `<prefix>.message`.
    #[error(
        "op `m` (a logical decoding message) is not a change of the outbox table; \
         such messages belong on debezium's `<topic.prefix>.message` topic"
    )]
    LogicalMessage,
    #[error("field `{field}` has the wrong type: expected {expected}, got {got}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
        got: &'static str,
    },
    /// A value of the right JSON type that still does not parse (a uuid, a timestamp).
    #[error("field `{field}` is not a valid {expected}: `{value}`")]
    InvalidValue {
        field: &'static str,
        expected: &'static str,
        value: String,
    },
    /// Debezium's placeholder for an unchanged TOASTed column reached an event.
    #[error(
        "field `payload` holds debezium's unavailable-value placeholder `__debezium_unavailable_value` \
         instead of the event payload: the column was TOASTed and unchanged; outbox rows are insert-only, \
         so this happens only on updates (which are skipped); if a created row carries it, \
         set `ALTER TABLE event_outbox REPLICA IDENTITY FULL`"
    )]
    UnavailablePayload,
    #[error("missing kafka key: the outbox event router keys each record by its aggregate id (`table.field.event.key=aggregate_id`)")]
    MissingKey,
    #[error("kafka key is not an aggregate id: expected a uuid (plain, as a json string or schema-wrapped), got `{0}`")]
    InvalidKey(String),
    #[error("missing header `{0}` with the event id: the outbox event router adds it from `table.field.event.id`")]
    MissingEventId(String),
    #[error(
        "missing header `{0}` with the event type: debezium's outbox event router adds it only with \
         `table.fields.additional.placement=event_type:header:{0}`"
    )]
    MissingEventType(String),
    #[error("header `{0}` has a null value")]
    NullHeader(String),
    #[error("header `{name}` is not a valid {expected}: `{value}`")]
    InvalidHeader {
        name: String,
        expected: &'static str,
        value: String,
    },
    #[error(
        "missing topic: the outbox event router names the aggregate type in the topic \
         `{prefix}<aggregate type>` (or set header `{header}`)"
    )]
    MissingTopic { prefix: String, header: String },
    #[error(
        "topic `{topic}` does not name an aggregate type: expected `{prefix}<aggregate type>` \
         (or set header `{header}`)"
    )]
    TopicWithoutAggregateType {
        topic: String,
        prefix: String,
        header: String,
    },
}

/// The ops that carry an event: the row image in `after` becomes the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowOp {
    /// `op=c`, an insert.
    Create,
    /// `op=r`, a snapshot read.
    Read,
}

impl RowOp {
    pub fn code(self) -> &'static str {
        match self {
            Self::Create => "c",
            Self::Read => "r",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Read => "read",
        }
    }
}

impl fmt::Display for RowOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// At most this many characters of an offending value go into an error message.
const EXCERPT_CHARS: usize = 64;

/// A bounded copy of an offending value for an error message.
pub(crate) fn excerpt(value: &str) -> String {
    match value.char_indices().nth(EXCERPT_CHARS) {
        None => value.to_string(),
        Some((cut, _)) => format!("{}…", &value[..cut]),
    }
}

impl crate::policy::Classify for crate::decode::DecodeError {
    fn class(&self) -> crate::policy::ErrorClass {
        crate::policy::ErrorClass::Permanent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_problem_and_the_field() {
        assert_eq!(
            DecodeError::MissingAfter(RowOp::Create).to_string(),
            "missing field `after` in a create (op=c) event"
        );
        assert_eq!(
            DecodeError::UnknownOp("x".into()).to_string(),
            "unknown op `x`: expected one of c, r, u, d, t"
        );
        assert_eq!(
            DecodeError::WrongType {
                field: "sequence_id",
                expected: "integer",
                got: "string"
            }
            .to_string(),
            "field `sequence_id` has the wrong type: expected integer, got string"
        );
        let event_type = DecodeError::MissingEventType("eventType".into()).to_string();
        assert!(
            event_type.contains("table.fields.additional.placement=event_type:header:eventType"),
            "{event_type}"
        );
        let toast = DecodeError::UnavailablePayload.to_string();
        assert!(toast.contains("__debezium_unavailable_value"), "{toast}");
        assert!(toast.contains("REPLICA IDENTITY FULL"), "{toast}");
    }

    #[test]
    fn excerpts_are_bounded_on_char_boundaries() {
        assert_eq!(excerpt("short"), "short");
        let long = "é".repeat(100);
        let cut = excerpt(&long);
        assert_eq!(cut.chars().count(), EXCERPT_CHARS + 1);
        assert!(cut.ends_with('…'));
    }
}
