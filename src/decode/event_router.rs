//! Output of Debezium's Outbox Event Router SMT
//! (`io.debezium.transforms.outbox.EventRouter`).
//!
//! The record value is the `payload` column: a JSON string holding the jsonb text
//! (double encoded), or the parsed object with `table.expand.json.payload=true`; with
//! `schemas.enable=true` either sits in JsonConverter's `{"schema","payload"}`
//! wrapper. The key is the aggregate id (a JSON string, plain text or schema-wrapped).
//! The event id arrives in header `id`; the aggregate type in the topic name
//! `outbox.event.<aggregate type>`. The event type, sequence id and creation time
//! arrive only where `table.fields.additional.placement` puts them into headers.
//!
//! Header values are what Connect's `SimpleHeaderConverter` writes: the plain UTF-8
//! text of a string (`0192f4b7-…`), though a JSON-quoted string (`"0192f4b7-…"`) is
//! accepted too.

use super::error::{excerpt, DecodeError};
use super::json::{json_error, parse_payload_text, parse_uuid};
use super::timestamp;
use super::{DecodeOptions, Decoded, OutboxEvent, Payload, RawMessage};
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::borrow::Cow;
use uuid::Uuid;

/// Decodes one event router record whose value is not a Kafka null.
pub(crate) fn decode(
    msg: &RawMessage<'_>,
    value: &[u8],
    options: &DecodeOptions,
) -> Result<Decoded, DecodeError> {
    let payload = payload(value)?;
    let aggregate_id = aggregate_id(msg.key)?;
    let event_id = event_id(msg, &options.event_id_header)?;
    let event_type = match header(msg, &options.event_type_header)? {
        Some(text) if !text.trim().is_empty() => text.into_owned(),
        Some(text) => {
            return Err(DecodeError::InvalidHeader {
                name: options.event_type_header.clone(),
                expected: "event type",
                value: excerpt(&text),
            })
        }
        None => {
            return Err(DecodeError::MissingEventType(
                options.event_type_header.clone(),
            ))
        }
    };
    let aggregate_type = aggregate_type(msg, options)?;
    let sequence_id = sequence_id(msg, &options.sequence_id_header)?;
    let created_at = created_at(msg, &options.created_at_header)?;
    Ok(Decoded::Event(OutboxEvent {
        event_id,
        sequence_id,
        aggregate_id,
        aggregate_type,
        event_type,
        payload,
        created_at,
    }))
}

fn utf8(bytes: &[u8], what: impl FnOnce() -> String) -> Result<&str, DecodeError> {
    std::str::from_utf8(bytes).map_err(|cause| DecodeError::NotUtf8 {
        what: what(),
        cause,
    })
}

/// JsonConverter's `{"schema":{…},"payload":…}` around a value, unwrapped.
fn unwrap_schema(value: Value) -> Value {
    match value {
        Value::Object(map) if is_schema_wrapper(&map) => map
            .into_iter()
            .find_map(|(name, value)| (name == "payload").then_some(value))
            .unwrap_or(Value::Null),
        other => other,
    }
}

fn is_schema_wrapper(map: &serde_json::Map<String, Value>) -> bool {
    let schema_like = match map.get("schema") {
        Some(Value::Null) => true,
        Some(Value::Object(schema)) => schema.contains_key("type"),
        _ => false,
    };
    map.len() == 2 && schema_like && map.contains_key("payload")
}

/// The record value as the event payload.
fn payload(value: &[u8]) -> Result<Payload, DecodeError> {
    let text = utf8(value, || "value".to_string())?;
    let parsed: Value = serde_json::from_str(text).map_err(|cause| json_error("value", cause))?;
    match unwrap_schema(parsed) {
        Value::String(jsonb) => parse_payload_text(&jsonb),
        Value::Null => Err(DecodeError::NullField("payload")),
        other => Ok(other.into()),
    }
}

/// The aggregate id from the Kafka key.
fn aggregate_id(key: Option<&[u8]>) -> Result<Uuid, DecodeError> {
    let key = key.ok_or(DecodeError::MissingKey)?;
    let text = utf8(key, || "key".to_string())?.trim();
    let id: Cow<'_, str> = if text.starts_with(['"', '{']) {
        let parsed: Value = serde_json::from_str(text).map_err(|cause| json_error("key", cause))?;
        match unwrap_schema(parsed) {
            Value::String(id) => Cow::Owned(id),
            other => return Err(DecodeError::InvalidKey(excerpt(&other.to_string()))),
        }
    } else {
        Cow::Borrowed(text)
    };
    parse_uuid(&id).ok_or_else(|| DecodeError::InvalidKey(excerpt(&id)))
}

/// The text of the last header called `name`; JSON quotes, if any, removed.
fn header<'a>(msg: &RawMessage<'a>, name: &str) -> Result<Option<Cow<'a, str>>, DecodeError> {
    let Some((_, value)) = msg.headers.iter().rev().find(|(key, _)| key == name) else {
        return Ok(None);
    };
    let bytes = value
        .as_deref()
        .ok_or_else(|| DecodeError::NullHeader(name.to_string()))?;
    let text = utf8(bytes, || format!("header `{name}`"))?;
    Ok(Some(unquote(text)))
}

/// `"abc"` (a JSON string, as JsonConverter-based header converters write it) -> `abc`;
/// anything else as is.
fn unquote(text: &str) -> Cow<'_, str> {
    let trimmed = text.trim();
    if trimmed.len() >= 2 && trimmed.starts_with('"') && trimmed.ends_with('"') {
        match serde_json::from_str::<String>(trimmed) {
            Ok(unquoted) => Cow::Owned(unquoted),
            Err(_) => Cow::Borrowed(&trimmed[1..trimmed.len() - 1]),
        }
    } else {
        Cow::Borrowed(text)
    }
}

fn event_id(msg: &RawMessage<'_>, name: &str) -> Result<Uuid, DecodeError> {
    let text = header(msg, name)?.ok_or_else(|| DecodeError::MissingEventId(name.to_string()))?;
    parse_uuid(&text).ok_or_else(|| DecodeError::InvalidHeader {
        name: name.to_string(),
        expected: "uuid",
        value: excerpt(&text),
    })
}

/// From the aggregate type header if there is one, else from the topic name.
fn aggregate_type(msg: &RawMessage<'_>, options: &DecodeOptions) -> Result<String, DecodeError> {
    if let Some(text) = header(msg, &options.aggregate_type_header)? {
        if !text.trim().is_empty() {
            return Ok(text.into_owned());
        }
    }
    let prefix = &options.event_router_topic_prefix;
    let topic = msg.topic.ok_or_else(|| DecodeError::MissingTopic {
        prefix: prefix.clone(),
        header: options.aggregate_type_header.clone(),
    })?;
    match topic.strip_prefix(prefix.as_str()) {
        Some(aggregate_type) if !aggregate_type.is_empty() => Ok(aggregate_type.to_string()),
        _ => Err(DecodeError::TopicWithoutAggregateType {
            topic: excerpt(topic),
            prefix: prefix.clone(),
            header: options.aggregate_type_header.clone(),
        }),
    }
}

fn sequence_id(msg: &RawMessage<'_>, name: &str) -> Result<Option<i64>, DecodeError> {
    let Some(text) = header(msg, name)? else {
        return Ok(None);
    };
    text.trim()
        .parse::<i64>()
        .map(Some)
        .map_err(|_| DecodeError::InvalidHeader {
            name: name.to_string(),
            expected: "64-bit signed integer",
            value: excerpt(&text),
        })
}

fn created_at(msg: &RawMessage<'_>, name: &str) -> Result<Option<DateTime<Utc>>, DecodeError> {
    let Some(text) = header(msg, name)? else {
        return Ok(None);
    };
    timestamp::parse_header(&text)
        .map(Some)
        .ok_or_else(|| DecodeError::InvalidHeader {
            name: name.to_string(),
            expected: "timestamp",
            value: excerpt(&text),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const EVENT_ID: &str = "0192f4b7-1c3d-7e4f-9a50-3b6c7d8e9f10";
    const USER_ID: &str = "7d3c9a52-1e4f-4b8a-9c61-2f5e8d7a4b10";
    const DOUBLE_ENCODED: &str = r#""{\"email\": \"a@example.com\"}""#;

    fn headers(pairs: &[(&str, &str)]) -> Vec<(String, Option<Vec<u8>>)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Some(v.as_bytes().to_vec())))
            .collect()
    }

    fn standard_headers() -> Vec<(String, Option<Vec<u8>>)> {
        headers(&[
            ("__debezium.context.taskId", "0"),
            ("id", EVENT_ID),
            ("eventType", "UserCreated"),
        ])
    }

    fn run(
        key: &str,
        value: &str,
        headers: &[(String, Option<Vec<u8>>)],
    ) -> Result<Decoded, DecodeError> {
        let msg = RawMessage {
            topic: Some("outbox.event.User"),
            key: Some(key.as_bytes()),
            value: Some(value.as_bytes()),
            headers,
        };
        decode(&msg, value.as_bytes(), &DecodeOptions::default())
    }

    fn event(key: &str, value: &str, headers: &[(String, Option<Vec<u8>>)]) -> OutboxEvent {
        match run(key, value, headers) {
            Ok(Decoded::Event(event)) => event,
            other => panic!("expected an event, got {other:?}"),
        }
    }

    fn error(key: &str, value: &str, headers: &[(String, Option<Vec<u8>>)]) -> String {
        match run(key, value, headers) {
            Err(err) => err.to_string(),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn a_default_event_router_record() {
        let event = event(
            &format!("\"{USER_ID}\""),
            DOUBLE_ENCODED,
            &standard_headers(),
        );
        assert_eq!(event.event_id.to_string(), EVENT_ID);
        assert_eq!(event.aggregate_id.to_string(), USER_ID);
        assert_eq!(event.aggregate_type, "User");
        assert_eq!(event.event_type, "UserCreated");
        assert_eq!(event.payload, json!({"email": "a@example.com"}));
        assert_eq!(event.sequence_id, None);
        assert_eq!(event.created_at, None);
    }

    #[test]
    fn keys_and_values_in_every_shape() {
        let expected = event(USER_ID, DOUBLE_ENCODED, &standard_headers());
        let keys = [
            format!("\"{USER_ID}\""),
            format!(
                r#"{{"schema":{{"type":"string","optional":false,"name":"io.debezium.data.Uuid","version":1}},"payload":"{USER_ID}"}}"#
            ),
        ];
        let values = [
            DOUBLE_ENCODED.to_string(),
            r#"{"email":"a@example.com"}"#.to_string(),
            format!(r#"{{"schema":{{"type":"string","name":"io.debezium.data.Json"}},"payload":{DOUBLE_ENCODED}}}"#),
            r#"{"schema":{"type":"struct","fields":[],"name":"payload"},"payload":{"email":"a@example.com"}}"#.to_string(),
        ];
        for key in &keys {
            for value in &values {
                assert_eq!(
                    event(key, value, &standard_headers()),
                    expected,
                    "{key} {value}"
                );
            }
        }
    }

    #[test]
    fn quoted_headers_and_optional_headers() {
        let headers = headers(&[
            ("id", &format!("\"{EVENT_ID}\"")),
            ("eventType", "\"UserCreated\""),
            ("sequenceId", "104"),
            ("createdAt", "2026-09-15T09:41:07.509871Z"),
            ("aggregateType", "Member"),
        ]);
        let event = event(USER_ID, DOUBLE_ENCODED, &headers);
        assert_eq!(event.event_id.to_string(), EVENT_ID);
        assert_eq!(event.event_type, "UserCreated");
        assert_eq!(event.sequence_id, Some(104));
        assert_eq!(event.aggregate_type, "Member");
        assert_eq!(
            event.created_at.map(|t| t.timestamp_micros()),
            Some(1_789_465_267_509_871)
        );
    }

    #[test]
    fn the_last_header_of_a_name_wins() {
        let mut headers = standard_headers();
        headers.push(("eventType".into(), Some(b"UserUpdated".to_vec())));
        assert_eq!(
            event(USER_ID, DOUBLE_ENCODED, &headers).event_type,
            "UserUpdated"
        );
    }

    #[test]
    fn a_missing_event_type_says_how_to_configure_it() {
        let headers = headers(&[("id", EVENT_ID)]);
        assert_eq!(
            error(USER_ID, DOUBLE_ENCODED, &headers),
            "missing header `eventType` with the event type: debezium's outbox event router adds it \
             only with `table.fields.additional.placement=event_type:header:eventType`"
        );
    }

    #[test]
    fn problems_are_named() {
        let standard = standard_headers();
        assert!(error(USER_ID, r#""{\"email\": ""#, &standard)
            .starts_with("payload is not valid json: "));
        assert!(error(USER_ID, r#"{"email""#, &standard).starts_with("value is not valid json: "));
        assert_eq!(error(USER_ID, "null", &standard), "field `payload` is null");
        assert_eq!(
            error("\"nope\"", DOUBLE_ENCODED, &standard),
            "kafka key is not an aggregate id: expected a uuid (plain, as a json string or schema-wrapped), got `nope`"
        );
        assert_eq!(
            error(USER_ID, DOUBLE_ENCODED, &headers(&[("eventType", "UserCreated")])),
            "missing header `id` with the event id: the outbox event router adds it from `table.field.event.id`"
        );
        let mut bad_sequence = standard.clone();
        bad_sequence.push(("sequenceId".into(), Some(b"x1".to_vec())));
        assert_eq!(
            error(USER_ID, DOUBLE_ENCODED, &bad_sequence),
            "header `sequenceId` is not a valid 64-bit signed integer: `x1`"
        );
        let mut null_id = standard.clone();
        null_id.push(("id".into(), None));
        assert_eq!(
            error(USER_ID, DOUBLE_ENCODED, &null_id),
            "header `id` has a null value"
        );
        let mut not_utf8 = standard;
        not_utf8.push(("eventType".into(), Some(vec![0xff, 0xfe])));
        assert!(error(USER_ID, DOUBLE_ENCODED, &not_utf8)
            .starts_with("header `eventType` is not valid utf-8"));
    }

    #[test]
    fn the_topic_must_name_the_aggregate_type() {
        let headers = standard_headers();
        for topic in [
            Some("outbox.event."),
            Some("postgres.activity.event_outbox"),
            None,
        ] {
            let msg = RawMessage {
                topic,
                key: Some(USER_ID.as_bytes()),
                value: Some(DOUBLE_ENCODED.as_bytes()),
                headers: &headers,
            };
            let result = decode(&msg, DOUBLE_ENCODED.as_bytes(), &DecodeOptions::default());
            let message = result.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(
                message.contains("outbox.event.<aggregate type>"),
                "{message}"
            );
        }
    }

    #[test]
    fn a_missing_key_is_an_error() {
        let headers = standard_headers();
        let msg = RawMessage {
            topic: Some("outbox.event.User"),
            key: None,
            value: Some(DOUBLE_ENCODED.as_bytes()),
            headers: &headers,
        };
        let result = decode(&msg, DOUBLE_ENCODED.as_bytes(), &DecodeOptions::default());
        assert!(matches!(result, Err(DecodeError::MissingKey)));
    }
}
