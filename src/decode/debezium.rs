//! Debezium PostgreSQL-connector records of the outbox table, as Kafka Connect's
//! JsonConverter writes them (with `schemas.enable` on or off).
//!
//! * change events: `op` `c` (insert) and `r` (snapshot read, whatever the
//!   `source.snapshot` marker) carry the row in `after`; `u`, `d` and `t` are skipped,
//!   since outbox rows are insert-only and updates and deletes are the write side's
//!   bookkeeping;
//! * heartbeats (`{"ts_ms":…}`) and transaction-metadata records
//!   (`{"status":"BEGIN"|"END","id":…}`) are skipped.
//!
//! Fields are read by name, unknown fields ignored, so the Debezium 2.x and 3.x
//! envelopes (`ts_us`/`ts_ns`, the moved `transaction` block, `source.origin`) read alike.
//!
//! A change event also says when its transaction committed in the source
//! database: `source.ts_us` (2.6+), else `source.ts_ms` (for snapshot rows, the
//! time the snapshot read them). Only the metrics read it, so a missing or odd
//! value makes it unknown and never fails the event.

use super::error::{excerpt, DecodeError, RowOp};
use super::json::{from_bytes, Member, Payload, Scalar, Seen};
use super::timestamp::{self, EpochUnit};
use super::{Decoded, OutboxEvent, SkipReason, TimedDecoded};
use chrono::{DateTime, Utc};
use serde::Deserialize;

/// Every top-level member any Debezium record of interest has. With the schema
/// wrapper, `schema` and `payload` are set and the record is inside `payload`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Record<'a> {
    schema: Seen,
    #[serde(borrow)]
    payload: Member<Box<Record<'a>>>,
    before: Seen,
    #[serde(borrow)]
    after: Member<RowImage<'a>>,
    #[serde(borrow)]
    source: Member<SourceBlock<'a>>,
    #[serde(borrow)]
    op: Scalar<'a>,
    #[serde(borrow)]
    ts_ms: Scalar<'a>,
    #[serde(borrow)]
    status: Scalar<'a>,
    #[serde(borrow)]
    id: Scalar<'a>,
}

/// The columns of an outbox row image (`after`) that make an event.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RowImage<'a> {
    #[serde(borrow)]
    event_id: Scalar<'a>,
    #[serde(borrow)]
    sequence_id: Scalar<'a>,
    #[serde(borrow)]
    aggregate_id: Scalar<'a>,
    #[serde(borrow)]
    aggregate_type: Scalar<'a>,
    #[serde(borrow)]
    event_type: Scalar<'a>,
    #[serde(borrow)]
    payload: Payload<'a>,
    #[serde(borrow)]
    created_at: Scalar<'a>,
}

/// The members of the envelope's `source` block that are read: the commit time.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct SourceBlock<'a> {
    #[serde(borrow)]
    ts_ms: Scalar<'a>,
    #[serde(borrow)]
    ts_us: Scalar<'a>,
}

impl SourceBlock<'_> {
    /// When the change committed in the source database: `ts_us`, else
    /// `ts_ms`; `None` when neither is a positive epoch integer.
    fn committed(&self) -> Option<DateTime<Utc>> {
        let at = |value: &Scalar<'_>, unit| match value {
            Scalar::Int(n) if *n > 0 => timestamp::from_epoch(*n, unit),
            _ => None,
        };
        at(&self.ts_us, EpochUnit::Micros).or_else(|| at(&self.ts_ms, EpochUnit::Millis))
    }
}

impl Record<'_> {
    /// JsonConverter's `{"schema":…,"payload":…}` around a record.
    fn is_schema_wrapper(&self) -> bool {
        !self.schema.is_absent()
            && matches!(self.payload, Member::Present(_))
            && !self.is_change_event()
    }

    fn is_change_event(&self) -> bool {
        !self.op.is_absent()
            || !self.before.is_absent()
            || !self.after.is_absent()
            || !self.source.is_absent()
    }

    fn is_transaction(&self) -> bool {
        matches!(self.status.as_str(), Some("BEGIN" | "END")) && self.id.as_str().is_some()
    }

    fn is_heartbeat(&self) -> bool {
        matches!(self.ts_ms, Scalar::Int(_)) && self.status.is_absent() && self.id.is_absent()
    }
}

/// Decodes a Debezium record, with the commit time a change event gives;
/// `Ok(None)` when the value is no Debezium record at all (so the caller may try
/// another format).
pub(crate) fn decode(value: &[u8]) -> Result<Option<TimedDecoded>, DecodeError> {
    let top: Member<Record<'_>> = from_bytes(value, "value")?;
    let Member::Present(mut record) = top else {
        return Ok(None);
    };
    let wrapped = record.is_schema_wrapper();
    if wrapped {
        if let Member::Present(inner) = std::mem::take(&mut record.payload) {
            record = *inner;
        }
    }
    if record.is_change_event() {
        let committed = match &record.source {
            Member::Present(source) => source.committed(),
            _ => None,
        };
        let unit_from_schema = || wrapped.then(|| created_at_unit(value)).flatten();
        return change_event(record, unit_from_schema).map(|decoded| Some((decoded, committed)));
    }
    if record.is_transaction() {
        return Ok(Some((Decoded::Skip(SkipReason::Transaction), None)));
    }
    if record.is_heartbeat() {
        return Ok(Some((Decoded::Skip(SkipReason::Heartbeat), None)));
    }
    Ok(None)
}

fn change_event(
    record: Record<'_>,
    unit_from_schema: impl FnOnce() -> Option<EpochUnit>,
) -> Result<Decoded, DecodeError> {
    let op = match &record.op {
        Scalar::Str(op) => op,
        Scalar::Absent => return Err(DecodeError::MissingField("op")),
        Scalar::Null => return Err(DecodeError::NullField("op")),
        other => {
            return Err(DecodeError::WrongType {
                field: "op",
                expected: "string",
                got: other.kind(),
            })
        }
    };
    let row_op = match op.as_ref() {
        "c" => RowOp::Create,
        "r" => RowOp::Read,
        "u" => return Ok(Decoded::Skip(SkipReason::Update)),
        "d" => return Ok(Decoded::Skip(SkipReason::Delete)),
        "t" => return Ok(Decoded::Skip(SkipReason::Truncate)),
        "m" => return Err(DecodeError::LogicalMessage),
        other => return Err(DecodeError::UnknownOp(excerpt(other))),
    };
    let row = match record.after {
        Member::Present(row) => row,
        Member::Absent => return Err(DecodeError::MissingAfter(row_op)),
        Member::Null => return Err(DecodeError::NullAfter(row_op)),
        Member::Mistyped(got) => {
            return Err(DecodeError::WrongType {
                field: "after",
                expected: "object",
                got,
            })
        }
    };
    row.into_event(unit_from_schema).map(Decoded::Event)
}

impl RowImage<'_> {
    fn into_event(
        self,
        unit_from_schema: impl FnOnce() -> Option<EpochUnit>,
    ) -> Result<OutboxEvent, DecodeError> {
        Ok(OutboxEvent {
            event_id: self.event_id.required_uuid("event_id")?,
            sequence_id: self.sequence_id.optional_i64("sequence_id")?,
            aggregate_id: self.aggregate_id.required_uuid("aggregate_id")?,
            aggregate_type: self
                .aggregate_type
                .required_str("aggregate_type")?
                .to_owned(),
            event_type: self.event_type.required_str("event_type")?.to_owned(),
            payload: self.payload.into_json()?,
            created_at: created_at(&self.created_at, unit_from_schema)?,
        })
    }
}

/// `created_at`: a ZonedTimestamp string, or an epoch integer whose unit the schema
/// names (else it is inferred from the magnitude).
fn created_at(
    value: &Scalar<'_>,
    unit_from_schema: impl FnOnce() -> Option<EpochUnit>,
) -> Result<Option<DateTime<Utc>>, DecodeError> {
    let invalid = |value: String| DecodeError::InvalidValue {
        field: "created_at",
        expected: "timestamp",
        value,
    };
    match value {
        Scalar::Absent | Scalar::Null => Ok(None),
        Scalar::Str(text) => timestamp::parse_rfc3339(text)
            .map(Some)
            .ok_or_else(|| invalid(excerpt(text))),
        Scalar::Int(n) => {
            let unit = unit_from_schema().unwrap_or_else(|| EpochUnit::guess(*n));
            timestamp::from_epoch(*n, unit)
                .map(Some)
                .ok_or_else(|| invalid(n.to_string()))
        }
        Scalar::BigInt(n) => Err(invalid(n.to_string())),
        other => Err(DecodeError::WrongType {
            field: "created_at",
            expected: "string or integer",
            got: other.kind(),
        }),
    }
}

/// The Connect schema, only as deep as needed to find the type name of `after.created_at`.
#[derive(Debug, Deserialize)]
struct SchemaDoc {
    #[serde(default)]
    schema: Option<SchemaNode>,
}

#[derive(Debug, Deserialize)]
struct SchemaNode {
    #[serde(default)]
    field: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    fields: Option<Vec<SchemaNode>>,
}

impl SchemaNode {
    fn child(&self, field: &str) -> Option<&SchemaNode> {
        self.fields
            .as_deref()?
            .iter()
            .find(|node| node.field.as_deref() == Some(field))
    }
}

/// The epoch unit the embedded schema gives `after.created_at` (a rare path: Debezium
/// writes `timestamptz` as a string; integers come from `timestamp` columns).
fn created_at_unit(value: &[u8]) -> Option<EpochUnit> {
    let doc: SchemaDoc = serde_json::from_slice(value).ok()?;
    let name = doc
        .schema?
        .child("after")?
        .child("created_at")?
        .name
        .clone()?;
    EpochUnit::from_schema_name(&name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ROW: &str = r#"{"event_id":"0192f4b7-1c3d-7e4f-9a50-3b6c7d8e9f10","sequence_id":104,"aggregate_id":"7d3c9a52-1e4f-4b8a-9c61-2f5e8d7a4b10","aggregate_type":"User","event_type":"UserCreated","payload":"{\"email\": \"a@example.com\"}","status":"pending","created_at":"2026-09-15T09:41:07.509871Z"}"#;

    fn envelope(op: &str, after: &str) -> String {
        format!(
            r#"{{"before":null,"after":{after},"source":{{"snapshot":"false","schema":"public"}},"transaction":null,"op":"{op}","ts_ms":1}}"#
        )
    }

    fn decoded(value: &str) -> Result<Option<Decoded>, DecodeError> {
        decode(value.as_bytes()).map(|found| found.map(|(decoded, _)| decoded))
    }

    fn committed_micros(value: &str) -> Option<i64> {
        match decode(value.as_bytes()) {
            Ok(Some((_, committed))) => committed.map(|t| t.timestamp_micros()),
            other => panic!("expected a record, got {other:?}"),
        }
    }

    fn event(value: &str) -> OutboxEvent {
        match decoded(value) {
            Ok(Some(Decoded::Event(event))) => event,
            other => panic!("expected an event, got {other:?}"),
        }
    }

    fn error(value: &str) -> String {
        match decoded(value) {
            Err(err) => err.to_string(),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn inserts_and_snapshot_reads_are_events() {
        for op in ["c", "r"] {
            let event = event(&envelope(op, ROW));
            assert_eq!(event.sequence_id, Some(104));
            assert_eq!(event.aggregate_type, "User");
            assert_eq!(event.payload, json!({"email": "a@example.com"}));
            assert_eq!(
                event.created_at.map(|t| t.timestamp_micros()),
                Some(1_789_465_267_509_871)
            );
        }
    }

    #[test]
    fn the_schema_wrapper_is_unwrapped() {
        let wrapped = format!(
            r#"{{"schema":{{"type":"struct","fields":[]}},"payload":{}}}"#,
            envelope("c", ROW)
        );
        assert_eq!(event(&wrapped), event(&envelope("c", ROW)));
    }

    #[test]
    fn other_ops_are_skipped_with_their_reason() {
        let cases = [
            ("u", SkipReason::Update),
            ("d", SkipReason::Delete),
            ("t", SkipReason::Truncate),
        ];
        for (op, reason) in cases {
            let value = envelope(op, "null");
            assert!(
                matches!(decoded(&value), Ok(Some(Decoded::Skip(r))) if r == reason),
                "{op}"
            );
        }
        // An update whose TOASTed payload is the placeholder is still just an update.
        let toasted = ROW.replace(
            r#""{\"email\": \"a@example.com\"}""#,
            r#""__debezium_unavailable_value""#,
        );
        assert!(matches!(
            decoded(&envelope("u", &toasted)),
            Ok(Some(Decoded::Skip(SkipReason::Update)))
        ));
    }

    #[test]
    fn the_toast_placeholder_never_becomes_a_payload() {
        let toasted = ROW.replace(
            r#""{\"email\": \"a@example.com\"}""#,
            r#""__debezium_unavailable_value""#,
        );
        let message = error(&envelope("c", &toasted));
        assert!(
            message.contains("__debezium_unavailable_value"),
            "{message}"
        );
        assert!(message.contains("REPLICA IDENTITY FULL"), "{message}");
    }

    #[test]
    fn heartbeats_and_transaction_records_are_skipped() {
        assert!(matches!(
            decoded(r#"{"ts_ms":1789466761337}"#),
            Ok(Some(Decoded::Skip(SkipReason::Heartbeat)))
        ));
        assert!(matches!(
            decoded(
                r#"{"status":"END","id":"7803:999961592","event_count":2,"data_collections":[{"data_collection":"public.event_outbox","event_count":2}],"ts_ms":1}"#
            ),
            Ok(Some(Decoded::Skip(SkipReason::Transaction)))
        ));
    }

    #[test]
    fn other_json_is_not_debezium() {
        for value in [r#""{\"a\":1}""#, r#"{"email":"a"}"#, "null", "[1]", "3"] {
            assert!(matches!(decoded(value), Ok(None)), "{value}");
        }
    }

    #[test]
    fn malformed_change_events_name_the_problem() {
        let without_op = envelope("c", ROW).replace(r#""op":"c","#, "");
        assert_eq!(error(&without_op), "missing field `op`");
        assert_eq!(
            error(&envelope("x", ROW)),
            "unknown op `x`: expected one of c, r, u, d, t"
        );
        let without_after = envelope("c", ROW).replace(&format!(r#""after":{ROW},"#), "");
        assert_eq!(
            error(&without_after),
            "missing field `after` in a create (op=c) event"
        );
        assert_eq!(
            error(&envelope("r", "null")),
            "field `after` is null in a read (op=r) event"
        );
        assert_eq!(
            error(&envelope("c", r#""row""#)),
            "field `after` has the wrong type: expected object, got string"
        );
        let text_sequence = ROW.replace(r#""sequence_id":104"#, r#""sequence_id":"104""#);
        assert_eq!(
            error(&envelope("c", &text_sequence)),
            "field `sequence_id` has the wrong type: expected integer, got string"
        );
        assert!(error(r#"{"op":"c","after":{"#).starts_with("value is not valid json: "));
        assert!(error(&envelope("m", "null")).contains("logical decoding message"));
    }

    #[test]
    fn created_at_may_be_an_epoch_integer() {
        let micros = ROW.replace(r#""2026-09-15T09:41:07.509871Z""#, "1789465267509871");
        let event = event(&envelope("c", &micros));
        assert_eq!(
            event.created_at.map(|t| t.timestamp_micros()),
            Some(1_789_465_267_509_871)
        );
        // With a schema, its logical type name decides the unit.
        let millis_row = ROW.replace(r#""2026-09-15T09:41:07.509871Z""#, "1000");
        let wrapped = format!(
            r#"{{"schema":{{"type":"struct","fields":[{{"type":"struct","field":"after","fields":[{{"type":"int64","name":"io.debezium.time.MicroTimestamp","field":"created_at"}}]}}]}},"payload":{}}}"#,
            envelope("c", &millis_row)
        );
        assert_eq!(
            event_created_micros(&wrapped),
            Some(1000),
            "the schema says microseconds"
        );
    }

    fn event_created_micros(value: &str) -> Option<i64> {
        event(value).created_at.map(|t| t.timestamp_micros())
    }

    #[test]
    fn the_commit_time_is_the_source_block_s() {
        let with = |source: &str| {
            envelope("c", ROW).replace(
                r#""source":{"snapshot":"false","schema":"public"}"#,
                &format!(r#""source":{source}"#),
            )
        };
        let both = with(r#"{"ts_ms":1789465267512,"snapshot":"false","ts_us":1789465267512394}"#);
        assert_eq!(committed_micros(&both), Some(1_789_465_267_512_394));
        let millis = with(r#"{"ts_ms":1789465267512,"snapshot":"false"}"#);
        assert_eq!(committed_micros(&millis), Some(1_789_465_267_512_000));
        // Unknown, never an error: the event itself is fine.
        for odd in [
            r#"{"snapshot":"false"}"#,
            r#"{"ts_ms":"1789465267512"}"#,
            r#"{"ts_ms":0}"#,
            r#"{"ts_ms":null,"ts_us":1.5}"#,
            "null",
            r#""postgres""#,
        ] {
            assert_eq!(committed_micros(&with(odd)), None, "{odd}");
            assert_eq!(event(&with(odd)), event(&envelope("c", ROW)), "{odd}");
        }
        // The envelope's own `ts_ms` (when Debezium processed it) is not the commit time.
        assert_eq!(committed_micros(&envelope("c", ROW)), None);
        assert_eq!(committed_micros(r#"{"ts_ms":1789466761337}"#), None);
    }
}
