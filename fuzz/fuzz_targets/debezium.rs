//! The Debezium change-event decoder (`KAFKA_FORMAT=cdc`), on arbitrary record values.
//!
//! Properties: no panic; where the cdc format decodes a value, auto-detection on
//! the change-event topic gives the same answer; a decoded event, written back as
//! a change event (bare and schema-wrapped), decodes to the same event.

#![no_main]

use activity_event_processor::decode::{
    decode_message, DecodeOptions, Decoded, MessageFormat, OutboxEvent, RawMessage,
};
use activity_event_processor_fuzz::{assert_same_event, rfc3339};
use libfuzzer_sys::fuzz_target;
use serde_json::json;

const TOPIC: &str = "postgres.activity.event_outbox";

fn decode(value: &[u8], format: MessageFormat) -> Result<Decoded, String> {
    let msg = RawMessage {
        topic: Some(TOPIC),
        key: None,
        value: Some(value),
        headers: &[],
    };
    let options = DecodeOptions {
        format,
        ..DecodeOptions::default()
    };
    decode_message(&msg, &options).map_err(|err| err.to_string())
}

fuzz_target!(|data: &[u8]| {
    let cdc = decode(data, MessageFormat::Cdc);
    let auto = decode(data, MessageFormat::Auto);
    if let Ok(decoded) = &cdc {
        assert_eq!(auto.as_ref().ok(), Some(decoded), "auto disagrees with cdc");
    }
    if let Err(err) = &cdc {
        assert!(!err.is_empty(), "an error without a message");
    }
    if let Ok(Decoded::Event(event)) = &cdc {
        round_trip(event);
    }
});

/// The event as Debezium would write its insert, decoded again.
fn round_trip(event: &OutboxEvent) {
    let mut want = event.clone();
    let created_at = event.created_at.as_ref().and_then(rfc3339);
    if created_at.is_none() {
        want.created_at = None;
    }
    let envelope = json!({
        "before": null,
        "after": {
            "event_id": event.event_id.to_string(),
            "sequence_id": event.sequence_id,
            "aggregate_id": event.aggregate_id.to_string(),
            "aggregate_type": event.aggregate_type,
            "event_type": event.event_type,
            "payload": event.payload.to_string(),
            "status": "pending",
            "created_at": created_at,
        },
        "source": {"snapshot": "false", "table": "event_outbox"},
        "transaction": null,
        "op": "c",
        "ts_ms": 1,
    });
    let wrapped = json!({"schema": {"type": "struct", "fields": []}, "payload": envelope});
    for value in [envelope, wrapped] {
        match decode(value.to_string().as_bytes(), MessageFormat::Cdc) {
            Ok(Decoded::Event(got)) => assert_same_event(&want, &got, "debezium"),
            other => panic!("the event written back does not decode: {other:?}\nvalue {value}"),
        }
    }
}
