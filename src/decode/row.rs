//! An outbox row in PostgreSQL's text form: the tuples of logical replication
//! (pgoutput sends every column as text) and rows read by the polling source.

use super::error::{excerpt, DecodeError};
use super::json::{parse_payload_text, parse_uuid};
use super::timestamp;
use super::OutboxEvent;

/// Decodes one outbox row given as `(column name, text value)` pairs; `None` is SQL NULL.
///
/// Reads `event_id`, `sequence_id`, `aggregate_id`, `aggregate_type`, `event_type`,
/// `payload` (jsonb text) and `created_at` (timestamptz text such as
/// `2026-11-25 10:52:19.123456+00`); other columns are ignored. `sequence_id` and
/// `created_at` may be missing (then `None`); the rest are required.
pub fn decode_text_row(columns: &[(&str, Option<&str>)]) -> Result<OutboxEvent, DecodeError> {
    let mut row = TextRow::default();
    for &(name, value) in columns {
        let slot = match name {
            "event_id" => &mut row.event_id,
            "sequence_id" => &mut row.sequence_id,
            "aggregate_id" => &mut row.aggregate_id,
            "aggregate_type" => &mut row.aggregate_type,
            "event_type" => &mut row.event_type,
            "payload" => &mut row.payload,
            "created_at" => &mut row.created_at,
            _ => continue,
        };
        *slot = Column::Given(value);
    }
    row.into_event()
}

/// A column as given: not in the tuple at all, or its text (`None` = NULL).
#[derive(Debug, Default, Clone, Copy)]
enum Column<'a> {
    #[default]
    Missing,
    Given(Option<&'a str>),
}

impl<'a> Column<'a> {
    fn required(self, field: &'static str) -> Result<&'a str, DecodeError> {
        match self {
            Self::Missing => Err(DecodeError::MissingField(field)),
            Self::Given(None) => Err(DecodeError::NullField(field)),
            Self::Given(Some(text)) => Ok(text),
        }
    }

    fn optional(self) -> Option<&'a str> {
        match self {
            Self::Missing => None,
            Self::Given(value) => value,
        }
    }
}

#[derive(Debug, Default)]
struct TextRow<'a> {
    event_id: Column<'a>,
    sequence_id: Column<'a>,
    aggregate_id: Column<'a>,
    aggregate_type: Column<'a>,
    event_type: Column<'a>,
    payload: Column<'a>,
    created_at: Column<'a>,
}

impl TextRow<'_> {
    fn into_event(self) -> Result<OutboxEvent, DecodeError> {
        let event_id = uuid(self.event_id, "event_id")?;
        let sequence_id = self
            .sequence_id
            .optional()
            .map(|text| {
                text.trim()
                    .parse::<i64>()
                    .map_err(|_| DecodeError::InvalidValue {
                        field: "sequence_id",
                        expected: "64-bit signed integer",
                        value: excerpt(text),
                    })
            })
            .transpose()?;
        let aggregate_id = uuid(self.aggregate_id, "aggregate_id")?;
        let aggregate_type = self.aggregate_type.required("aggregate_type")?.to_owned();
        let event_type = self.event_type.required("event_type")?.to_owned();
        let payload = parse_payload_text(self.payload.required("payload")?)?;
        let created_at = self
            .created_at
            .optional()
            .map(|text| {
                timestamp::parse_postgres(text).ok_or_else(|| DecodeError::InvalidValue {
                    field: "created_at",
                    expected: "timestamp",
                    value: excerpt(text),
                })
            })
            .transpose()?;
        Ok(OutboxEvent {
            event_id,
            sequence_id,
            aggregate_id,
            aggregate_type,
            event_type,
            payload,
            created_at,
        })
    }
}

fn uuid(column: Column<'_>, field: &'static str) -> Result<uuid::Uuid, DecodeError> {
    let text = column.required(field)?;
    parse_uuid(text).ok_or_else(|| DecodeError::InvalidValue {
        field,
        expected: "uuid",
        value: excerpt(text),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{DateTime, Utc};
    use serde_json::json;

    const EVENT_ID: &str = "0192f4b7-1c3d-7e4f-9a50-3b6c7d8e9f10";
    const USER_ID: &str = "7d3c9a52-1e4f-4b8a-9c61-2f5e8d7a4b10";

    fn full_row(created_at: &str) -> Vec<(&str, Option<&str>)> {
        vec![
            ("event_id", Some(EVENT_ID)),
            ("sequence_id", Some("104")),
            ("aggregate_id", Some(USER_ID)),
            ("aggregate_type", Some("User")),
            ("event_type", Some("UserCreated")),
            (
                "payload",
                Some(r#"{"email": "a@example.com", "displayName": "A"}"#),
            ),
            ("status", Some("pending")),
            ("retry_count", Some("0")),
            ("last_error", None),
            ("created_at", Some(created_at)),
            ("published_at", None),
        ]
    }

    fn message(result: Result<OutboxEvent, DecodeError>) -> String {
        match result {
            Ok(event) => panic!("expected an error, got {event:?}"),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn a_pgoutput_tuple_becomes_an_event() {
        let event = decode_text_row(&full_row("2026-11-25 10:52:19.123456+00"));
        let expected_time: DateTime<Utc> =
            "2026-11-25T10:52:19.123456Z".parse().unwrap_or_default();
        assert_eq!(
            event.ok(),
            Some(OutboxEvent {
                event_id: EVENT_ID.parse().unwrap_or_default(),
                sequence_id: Some(104),
                aggregate_id: USER_ID.parse().unwrap_or_default(),
                aggregate_type: "User".into(),
                event_type: "UserCreated".into(),
                payload: json!({"email": "a@example.com", "displayName": "A"}).into(),
                created_at: Some(expected_time),
            })
        );
    }

    #[test]
    fn offsets_and_fractions_vary() {
        let event = decode_text_row(&full_row("2026-11-25 16:22:19+05:30"));
        let created_at = event.ok().and_then(|e| e.created_at);
        assert_eq!(
            created_at.map(|t| t.to_rfc3339()),
            Some("2026-11-25T10:52:19+00:00".to_string())
        );
    }

    #[test]
    fn optional_columns_may_be_missing() {
        let columns: Vec<_> = full_row("x")
            .into_iter()
            .filter(|(name, _)| !matches!(*name, "sequence_id" | "created_at"))
            .collect();
        let event = decode_text_row(&columns);
        assert!(matches!(
            event,
            Ok(OutboxEvent {
                sequence_id: None,
                created_at: None,
                ..
            })
        ));
    }

    #[test]
    fn bad_columns_are_named() {
        let mut row = full_row("2026-11-25 10:52:19+00");
        row[1].1 = Some("one hundred");
        assert_eq!(
            message(decode_text_row(&row)),
            "field `sequence_id` is not a valid 64-bit signed integer: `one hundred`"
        );

        let mut row = full_row("yesterday");
        row[5].1 = Some(r#"{"email": "#);
        assert!(message(decode_text_row(&row)).starts_with("payload is not valid json: "));

        let row = full_row("yesterday");
        assert_eq!(
            message(decode_text_row(&row)),
            "field `created_at` is not a valid timestamp: `yesterday`"
        );

        let mut row = full_row("2026-11-25 10:52:19+00");
        row[0].1 = None;
        assert_eq!(message(decode_text_row(&row)), "field `event_id` is null");

        let row: Vec<_> = full_row("2026-11-25 10:52:19+00")
            .into_iter()
            .filter(|(name, _)| *name != "event_type")
            .collect();
        assert_eq!(message(decode_text_row(&row)), "missing field `event_type`");

        let mut row = full_row("2026-11-25 10:52:19+00");
        row[2].1 = Some("not-a-uuid");
        assert_eq!(
            message(decode_text_row(&row)),
            "field `aggregate_id` is not a valid uuid: `not-a-uuid`"
        );
    }
}
