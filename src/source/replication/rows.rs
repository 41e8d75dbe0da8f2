//! Outbox rows in text form (the snapshot's and the stuck-row sweep's
//! reads, and pgoutput's tuples) into events, or dead letters with whatever
//! could be recovered.

use crate::dead_letter::DeadLetter;
use crate::decode::{decode_text_row, DecodeError, OutboxEvent};
use uuid::Uuid;

/// The outbox columns an event is made of (the others are never read).
pub const EVENT_COLUMNS: [&str; 7] = [
    "event_id",
    "sequence_id",
    "aggregate_id",
    "aggregate_type",
    "event_type",
    "payload",
    "created_at",
];

/// A row of the outbox in text form, or the dead letter of one that does not
/// decode (with whatever could be recovered, and the raw payload as a string).
pub(super) fn decode_row(columns: &[(&str, Option<&str>)]) -> Result<OutboxEvent, Box<DeadLetter>> {
    decode_text_row(columns).map_err(|err| Box::new(malformed_row(columns, &err)))
}

pub(super) fn malformed_row(columns: &[(&str, Option<&str>)], err: &DecodeError) -> DeadLetter {
    let column = |wanted: &str| {
        columns
            .iter()
            .find(|(name, _)| *name == wanted)
            .and_then(|(_, value)| *value)
    };
    let uuid = |wanted: &str| {
        column(wanted)
            .and_then(|text| Uuid::parse_str(text.trim()).ok())
            .unwrap_or_else(Uuid::nil)
    };
    DeadLetter {
        event: OutboxEvent {
            event_id: uuid("event_id"),
            sequence_id: column("sequence_id").and_then(|text| text.trim().parse().ok()),
            aggregate_id: uuid("aggregate_id"),
            aggregate_type: column("aggregate_type").unwrap_or_default().to_string(),
            event_type: column("event_type").unwrap_or_default().to_string(),
            payload: serde_json::Value::String(column("payload").unwrap_or_default().to_string())
                .into(),
            created_at: None,
        },
        error: err.to_string(),
        attempts: 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row<'a>(payload: &'a str, created_at: &'a str) -> Vec<(&'a str, Option<&'a str>)> {
        vec![
            ("event_id", Some("0192f4b7-1c3d-7e4f-9a50-3b6c7d8e9f10")),
            ("sequence_id", Some("7")),
            ("aggregate_id", Some("7d3c9a52-1e4f-4b8a-9c61-2f5e8d7a4b10")),
            ("aggregate_type", Some("User")),
            ("event_type", Some("UserCreated")),
            ("payload", Some(payload)),
            ("status", Some("pending")),
            ("created_at", Some(created_at)),
        ]
    }

    #[test]
    fn a_good_row_is_an_event() {
        let event = decode_row(&row(r#"{"email": "a@b"}"#, "2026-01-02 03:04:05.123456+00"));
        assert!(
            matches!(
                event,
                Ok(OutboxEvent {
                    sequence_id: Some(7),
                    ..
                })
            ),
            "{event:?}"
        );
    }

    #[test]
    fn a_bad_row_is_a_dead_letter_with_what_could_be_recovered() {
        let Err(letter) = decode_row(&row("{not json", "2026-01-02 03:04:05+00")) else {
            panic!("expected a dead letter");
        };
        assert_eq!(
            letter.event.event_id.to_string(),
            "0192f4b7-1c3d-7e4f-9a50-3b6c7d8e9f10"
        );
        assert_eq!(letter.event.sequence_id, Some(7));
        assert_eq!(letter.event.event_type, "UserCreated");
        assert_eq!(letter.event.payload, serde_json::json!("{not json"));
        assert!(
            letter.error.starts_with("payload is not valid json"),
            "{}",
            letter.error
        );
        assert_eq!(letter.attempts, 1);

        let mut columns = row("{}", "2026-01-02 03:04:05+00");
        columns[0].1 = Some("nope");
        let Err(letter) = decode_row(&columns) else {
            panic!("expected a dead letter");
        };
        assert!(letter.event.event_id.is_nil());
    }
}
