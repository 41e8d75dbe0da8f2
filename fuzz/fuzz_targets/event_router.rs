//! The Outbox Event Router decoder (`KAFKA_FORMAT=event-router`), on arbitrary records.
//!
//! Input: NUL-separated parts: the topic (empty: none), the key (a lone 0xff byte:
//! a Kafka null), the value (a lone 0xff byte: a Kafka null), then one header per
//! part as `name=value` (no `=`: a null header value).
//!
//! Properties: no panic; on an event router topic, auto-detection gives the same
//! answer as the event-router format; a decoded event carries the id of its last
//! `id` header and a non-blank event type and aggregate type; written back as
//! event router output, it decodes to the same event.

#![no_main]

use activity_event_processor::decode::{
    decode_message, DecodeOptions, Decoded, MessageFormat, OutboxEvent, RawMessage, SkipReason,
};
use activity_event_processor_fuzz::{assert_same_event, rfc3339};
use libfuzzer_sys::fuzz_target;

const PREFIX: &str = "outbox.event.";
const NULL: &[u8] = b"\xff";

type Headers = Vec<(String, Option<Vec<u8>>)>;

fn decode(msg: &RawMessage<'_>, format: MessageFormat) -> Result<Decoded, String> {
    let options = DecodeOptions {
        format,
        ..DecodeOptions::default()
    };
    decode_message(msg, &options).map_err(|err| err.to_string())
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|&b| b == 0);
    let topic = parts
        .next()
        .map(String::from_utf8_lossy)
        .unwrap_or_default();
    let key = parts.next().unwrap_or_default();
    let value = parts.next().unwrap_or_default();
    let headers: Headers = parts
        .map(|part| match part.iter().position(|&b| b == b'=') {
            Some(at) => (
                String::from_utf8_lossy(&part[..at]).into_owned(),
                Some(part[at + 1..].to_vec()),
            ),
            None => (String::from_utf8_lossy(part).into_owned(), None),
        })
        .collect();
    let msg = RawMessage {
        topic: (!topic.is_empty()).then_some(topic.as_ref()),
        key: (key != NULL).then_some(key),
        value: (value != NULL).then_some(value),
        headers: &headers,
    };

    let routed = decode(&msg, MessageFormat::EventRouter);
    if topic.starts_with(PREFIX) {
        let auto = decode(&msg, MessageFormat::Auto);
        assert_eq!(auto, routed, "auto disagrees with event-router on {topic}");
    }
    match &routed {
        Ok(Decoded::Event(event)) => {
            check(&msg, event);
            round_trip(event);
        }
        Ok(Decoded::Skip(reason)) => assert!(
            msg.value.is_none() && *reason == SkipReason::Tombstone
                || topic.starts_with("__debezium-heartbeat") && *reason == SkipReason::Heartbeat,
            "skipped as {reason}"
        ),
        Err(err) => assert!(!err.is_empty(), "an error without a message"),
    }
});

fn check(msg: &RawMessage<'_>, event: &OutboxEvent) {
    let id = msg
        .headers
        .iter()
        .rev()
        .find(|(name, _)| name == "id")
        .and_then(|(_, value)| value.as_deref())
        .expect("an event has its id header");
    let id = std::str::from_utf8(id).expect("an event's id header is utf-8");
    assert_eq!(
        uuid::Uuid::try_parse(unquote(id).trim()).ok(),
        Some(event.event_id),
        "the event id is not the header's {id:?}"
    );
    assert!(!event.event_type.trim().is_empty(), "a blank event type");
    assert!(!event.aggregate_type.is_empty(), "an empty aggregate type");
}

/// A header's text: a JSON string's content, or the text as it is.
fn unquote(text: &str) -> String {
    let trimmed = text.trim();
    if trimmed.len() >= 2 && trimmed.starts_with('"') && trimmed.ends_with('"') {
        serde_json::from_str(trimmed).unwrap_or_else(|_| trimmed[1..trimmed.len() - 1].to_string())
    } else {
        text.to_string()
    }
}

/// The event as the event router would write it (headers JSON-quoted), decoded again.
fn round_trip(event: &OutboxEvent) {
    let mut want = event.clone();
    let quoted = |text: &str| Some(serde_json::Value::from(text).to_string().into_bytes());
    let mut headers: Headers = vec![
        ("id".into(), quoted(&event.event_id.to_string())),
        ("eventType".into(), quoted(&event.event_type)),
    ];
    if let Some(n) = event.sequence_id {
        headers.push(("sequenceId".into(), Some(n.to_string().into_bytes())));
    }
    match event.created_at.as_ref().and_then(rfc3339) {
        Some(text) => headers.push(("createdAt".into(), Some(text.into_bytes()))),
        None => want.created_at = None,
    }
    let topic = format!("{PREFIX}{}", event.aggregate_type);
    let key = event.aggregate_id.to_string();
    let value = serde_json::Value::from(event.payload.to_string()).to_string();
    let msg = RawMessage {
        topic: Some(&topic),
        key: Some(key.as_bytes()),
        value: Some(value.as_bytes()),
        headers: &headers,
    };
    match decode(&msg, MessageFormat::EventRouter) {
        Ok(Decoded::Event(got)) => assert_same_event(&want, &got, "event router"),
        other => panic!("the event written back does not decode: {other:?}\nevent {event:?}"),
    }
}
