//! The encoder held to Debezium's envelope as serde writes it, and its
//! details (timestamps, the payload's text, schema names, commit times).

use super::*;
use proptest::prelude::*;
use serde_json::json;

#[test]
fn jsonb_orders_keys_by_length_then_bytes() {
    let value = json!({"displayName": "A", "email": "a@x", "roles": ["m", 1, null], "b": {"zz": true, "a": 1.5}, "userId": "u"});
    assert_eq!(
        jsonb_text(&value),
        r#"{"b": {"a": 1.5, "zz": true}, "email": "a@x", "roles": ["m", 1, null], "userId": "u", "displayName": "A"}"#
    );
    assert_eq!(jsonb_text(&json!({})), "{}");
    assert_eq!(jsonb_text(&json!([])), "[]");
    assert_eq!(jsonb_text(&json!("a\"\n\u{1}é")), r#""a\"\n\u0001é""#);
}

/// Debezium's row, as a serde struct in the table's column order: the
/// reference the hand-written encoder is held to.
#[derive(Serialize)]
struct Row<'a> {
    event_id: String,
    sequence_id: i64,
    aggregate_id: String,
    aggregate_type: &'a str,
    event_type: &'a str,
    payload: Cow<'a, str>,
    status: &'static str,
    retry_count: i32,
    last_error: Option<&'a str>,
    lock_id: Option<&'a str>,
    created_at: String,
    published_at: Option<String>,
}

#[derive(Serialize)]
struct SourceInfo<'a> {
    version: &'static str,
    connector: &'static str,
    name: &'a str,
    ts_ms: i64,
    snapshot: &'static str,
    db: &'a str,
    sequence: Option<String>,
    ts_us: i64,
    ts_ns: i64,
    schema: &'static str,
    table: &'static str,
    #[serde(rename = "txId")]
    tx_id: Option<i64>,
    lsn: Option<i64>,
    xmin: Option<i64>,
    origin: Option<String>,
    origin_lsn: Option<i64>,
}

#[derive(Serialize)]
struct Envelope<'a> {
    before: Option<Row<'a>>,
    after: Option<Row<'a>>,
    source: SourceInfo<'a>,
    transaction: Option<()>,
    op: &'static str,
    ts_ms: i64,
    ts_us: i64,
    ts_ns: i64,
}

/// The change event's key and value as serde writes the structs above,
/// wrapped with the encoder's schemas.
fn reference(
    encoder: &Encoder,
    database: &str,
    event: &OutboxEvent,
    op: Op,
    committed: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> (Vec<u8>, Vec<u8>) {
    let source_time = match op {
        Op::Create => committed.or(event.created_at).unwrap_or(now),
        Op::Read(_) => now,
    };
    let row = Row {
        event_id: event.event_id.to_string(),
        sequence_id: event.sequence_id.unwrap_or(0),
        aggregate_id: event.aggregate_id.to_string(),
        aggregate_type: &event.aggregate_type,
        event_type: &event.event_type,
        payload: payload_jsonb(&event.payload),
        status: "pending",
        retry_count: 0,
        last_error: None,
        lock_id: None,
        created_at: event.created_at.map_or_else(
            || "1970-01-01T00:00:00.000000Z".to_string(),
            |t| t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
        ),
        published_at: None,
    };
    let envelope = Envelope {
        before: None,
        after: Some(row),
        source: SourceInfo {
            version: DEBEZIUM_VERSION,
            connector: "postgresql",
            name: &encoder.prefix,
            ts_ms: source_time.timestamp_millis(),
            snapshot: op.snapshot(),
            db: database,
            sequence: None,
            ts_us: source_time.timestamp_micros(),
            ts_ns: nanos(source_time),
            schema: SCHEMA,
            table: TABLE,
            tx_id: None,
            lsn: None,
            xmin: None,
            origin: None,
            origin_lsn: None,
        },
        transaction: None,
        op: op.code(),
        ts_ms: now.timestamp_millis(),
        ts_us: now.timestamp_micros(),
        ts_ns: nanos(now),
    };
    let wrap = |head: &[u8], payload: String| {
        let mut out = head.to_vec();
        out.extend_from_slice(payload.as_bytes());
        if encoder.schemas {
            out.push(b'}');
        }
        out
    };
    (
        wrap(
            &encoder.key_head,
            format!(r#"{{"event_id":"{}"}}"#, event.event_id),
        ),
        wrap(&encoder.value_head, to_json(&envelope)),
    )
}

fn any_time() -> impl Strategy<Value = DateTime<Utc>> {
    (-5_000_000_000i64..5_000_000_000i64, 0u32..1_000_000_000u32)
        .prop_map(|(seconds, nanos)| DateTime::from_timestamp(seconds, nanos).unwrap_or_default())
}

fn any_event() -> impl Strategy<Value = OutboxEvent> {
    (
        any::<u128>(),
        any::<u128>(),
        proptest::option::of(any::<i64>()),
        any::<String>(),
        any::<String>(),
        any::<String>(),
        any::<bool>(),
        proptest::option::of(any_time()),
    )
        .prop_map(
            |(
                id,
                aggregate,
                sequence_id,
                aggregate_type,
                event_type,
                text,
                delivered,
                created_at,
            )| {
                let value = json!({"displayName": text, "n": 1.50, "tags": [text, null]});
                let payload = if delivered {
                    // As a source delivers it: jsonb's own text.
                    Payload::from_text(&jsonb_text(&value)).unwrap_or_else(|_| value.into())
                } else {
                    value.into()
                };
                OutboxEvent {
                    event_id: uuid::Uuid::from_u128(id),
                    sequence_id,
                    aggregate_id: uuid::Uuid::from_u128(aggregate),
                    aggregate_type,
                    event_type,
                    payload,
                    created_at,
                }
            },
        )
}

fn any_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        Just(Op::Create),
        Just(Op::Read(SnapshotMark::First)),
        Just(Op::Read(SnapshotMark::Middle)),
        Just(Op::Read(SnapshotMark::Last)),
    ]
}

proptest! {
    /// The hand-written change event is, byte for byte, what serde
    /// writes for Debezium's envelope, with and without schemas.
    #[test]
    fn change_events_are_written_as_serde_writes_the_envelope(
        event in any_event(),
        op in any_op(),
        committed in proptest::option::of(any_time()),
        now in any_time(),
        schemas in any::<bool>(),
        database in any::<String>(),
    ) {
        let encoder = Encoder::new(Shape::Cdc, schemas, "p\"x.activity.event_outbox", "x.", &database);
        let message = encoder.encode_committed(&event, op, committed, now);
        let (key, value) = reference(&encoder, &database, &event, op, committed, now);
        prop_assert_eq!(String::from_utf8_lossy(&message.value), String::from_utf8_lossy(&value));
        prop_assert_eq!(message.key, key);
        prop_assert_eq!(message.partition_key, event.aggregate_id.to_string().into_bytes());
    }

    /// A routed record's value is the payload's jsonb text as a JSON string.
    #[test]
    fn routed_values_are_the_payload_as_a_json_string(event in any_event(), schemas in any::<bool>()) {
        let encoder = Encoder::new(Shape::EventRouter, schemas, "p.activity.event_outbox", "outbox.event.", "db");
        let message = encoder.encode(&event, Op::Create, Utc::now());
        let body = to_json(&payload_jsonb(&event.payload));
        let expected = if schemas {
            format!(r#"{{"schema":{JSON_VALUE_SCHEMA},"payload":{body}}}"#)
        } else {
            body
        };
        prop_assert_eq!(String::from_utf8_lossy(&message.value), expected);
        let key = format!(r#""{}""#, event.aggregate_id);
        let expected_key = if schemas {
            format!(r#"{{"schema":{UUID_KEY_SCHEMA},"payload":{key}}}"#)
        } else {
            key
        };
        prop_assert_eq!(message.key, expected_key.into_bytes());
    }
}

fn user_created(payload: Payload, created_at: Option<DateTime<Utc>>) -> OutboxEvent {
    OutboxEvent {
        event_id: uuid::Uuid::nil(),
        sequence_id: Some(1),
        aggregate_id: uuid::Uuid::nil(),
        aggregate_type: "User".into(),
        event_type: "UserCreated".into(),
        payload,
        created_at,
    }
}

#[test]
fn the_payload_goes_out_as_the_source_delivered_it() {
    // A numeric's trailing zero is PostgreSQL's and Debezium's text, not
    // what a parsed value prints.
    let text = r#"{"price": 1.50, "displayName": "A"}"#;
    let delivered = Payload::from_text(text).expect("well-formed");
    assert_eq!(payload_jsonb(&delivered), text);
    let built = Payload::from(json!({"displayName": "A", "price": 1.50}));
    assert_eq!(
        payload_jsonb(&built),
        r#"{"price": 1.5, "displayName": "A"}"#
    );
    let encoder = Encoder::new(Shape::Cdc, false, "p.activity.event_outbox", "x.", "db");
    let event = user_created(delivered, None);
    let message = encoder.encode(&event, Op::Create, Utc::now());
    let value: serde_json::Value = serde_json::from_slice(&message.value).unwrap_or_default();
    assert_eq!(value["after"]["payload"], json!(text));
}

#[test]
fn timestamps_have_six_fraction_digits() {
    let t: DateTime<Utc> = "2026-09-15T09:41:07.50987Z".parse().unwrap_or_default();
    assert_eq!(zoned_timestamp(t), "2026-09-15T09:41:07.509870Z");
    let whole: DateTime<Utc> = "2026-09-15T09:41:07Z".parse().unwrap_or_default();
    assert_eq!(zoned_timestamp(whole), "2026-09-15T09:41:07.000000Z");
}

#[test]
fn the_topic_prefix_names_the_schemas() {
    let encoder = Encoder::new(
        Shape::Cdc,
        true,
        "dbserver1.inventory.outbox",
        "outbox.event.",
        "db",
    );
    assert!(String::from_utf8_lossy(&encoder.value_head)
        .ends_with(r#""name":"dbserver1.public.event_outbox.Envelope","version":2},"payload":"#));
    assert_eq!(encoder.prefix, "dbserver1");
}

#[test]
fn a_change_carries_its_commit_time_in_source() {
    let encoder = Encoder::new(Shape::Cdc, false, "p.activity.event_outbox", "x.", "db");
    let at = |text: &str| -> DateTime<Utc> { text.parse().unwrap_or_default() };
    let event = user_created(json!({}).into(), Some(at("2026-01-01T00:00:00Z")));
    let now = at("2026-01-01T02:00:00Z");
    let source_ms = |message: &Message| {
        let value: serde_json::Value = serde_json::from_slice(&message.value).unwrap_or_default();
        value["source"]["ts_ms"].as_i64()
    };
    let committed = at("2026-01-01T01:00:00Z");
    let message = encoder.encode_committed(&event, Op::Create, Some(committed), now);
    assert_eq!(source_ms(&message), Some(committed.timestamp_millis()));
    // Unknown: the row's created_at.
    let message = encoder.encode(&event, Op::Create, now);
    assert_eq!(
        source_ms(&message),
        event.created_at.map(|t| t.timestamp_millis())
    );
}
