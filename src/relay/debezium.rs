//! Debezium's message format, written byte for byte as Kafka Connect's
//! `JsonConverter` writes it (compact JSON, schema field order, UTF-8, no
//! trailing newline), for the PostgreSQL connector 3.x on the outbox table:
//!
//! * `cdc`: the change-event envelope (`op` `c` for streamed rows, `r` for the
//!   rows of the initial snapshot), key `{"event_id":...}`;
//! * `outbox`: what the Outbox Event Router SMT makes of it (value = the
//!   payload's jsonb text, key = the aggregate id, headers `id`, `eventType`,
//!   `sequenceId`), on `<prefix><aggregate type>`.
//!
//! Both with or without `schemas.enable`. See `tests/fixtures/debezium/README.md`
//! for where each detail comes from. What the relay cannot know is written as
//! Debezium writes an unknown: `txId`, `lsn` and `sequence` are `null` (the
//! capture does not hand them out), `source.ts_*` is the event's `created_at`
//! for streamed rows and the snapshot time for snapshot rows, and the row's
//! bookkeeping columns (`status`, `retry_count`, `last_error`, `lock_id`,
//! `published_at`) show their values at insert.

use super::json;
use crate::decode::{OutboxEvent, Payload};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use std::borrow::Cow;
use std::sync::Arc;

/// The Debezium release whose format is reproduced (`source.version`).
pub const DEBEZIUM_VERSION: &str = "3.6.1.Final";

const ROW_FIELDS: &str = r#"[{"type":"string","optional":false,"name":"io.debezium.data.Uuid","version":1,"field":"event_id"},{"type":"int64","optional":false,"default":0,"field":"sequence_id"},{"type":"string","optional":false,"name":"io.debezium.data.Uuid","version":1,"field":"aggregate_id"},{"type":"string","optional":false,"field":"aggregate_type"},{"type":"string","optional":false,"field":"event_type"},{"type":"string","optional":false,"name":"io.debezium.data.Json","version":1,"field":"payload"},{"type":"string","optional":false,"default":"pending","field":"status"},{"type":"int32","optional":false,"default":0,"field":"retry_count"},{"type":"string","optional":true,"field":"last_error"},{"type":"string","optional":true,"field":"lock_id"},{"type":"string","optional":false,"name":"io.debezium.time.ZonedTimestamp","version":1,"default":"1970-01-01T00:00:00.000000Z","field":"created_at"},{"type":"string","optional":true,"name":"io.debezium.time.ZonedTimestamp","version":1,"field":"published_at"}]"#;

const SOURCE_SCHEMA: &str = r#"{"type":"struct","fields":[{"type":"string","optional":false,"field":"version"},{"type":"string","optional":false,"field":"connector"},{"type":"string","optional":false,"field":"name"},{"type":"int64","optional":false,"field":"ts_ms"},{"type":"string","optional":true,"name":"io.debezium.data.Enum","version":1,"parameters":{"allowed":"true,first,first_in_data_collection,last_in_data_collection,last,false,incremental"},"default":"false","field":"snapshot"},{"type":"string","optional":false,"field":"db"},{"type":"string","optional":true,"field":"sequence"},{"type":"int64","optional":true,"field":"ts_us"},{"type":"int64","optional":true,"field":"ts_ns"},{"type":"string","optional":false,"field":"schema"},{"type":"string","optional":false,"field":"table"},{"type":"int64","optional":true,"field":"txId"},{"type":"int64","optional":true,"field":"lsn"},{"type":"int64","optional":true,"field":"xmin"},{"type":"string","optional":true,"field":"origin"},{"type":"int64","optional":true,"field":"origin_lsn"}],"optional":false,"name":"io.debezium.connector.postgresql.Source","version":1,"field":"source"}"#;

const TRANSACTION_SCHEMA: &str = r#"{"type":"struct","fields":[{"type":"string","optional":false,"field":"id"},{"type":"int64","optional":false,"field":"total_order"},{"type":"int64","optional":false,"field":"data_collection_order"}],"optional":true,"name":"event.block","version":1,"field":"transaction"}"#;

const ENVELOPE_TAIL: &str = r#"{"type":"string","optional":false,"field":"op"},{"type":"int64","optional":true,"field":"ts_ms"},{"type":"int64","optional":true,"field":"ts_us"},{"type":"int64","optional":true,"field":"ts_ns"}"#;

const UUID_KEY_SCHEMA: &str =
    r#"{"type":"string","optional":false,"name":"io.debezium.data.Uuid","version":1}"#;
const JSON_VALUE_SCHEMA: &str =
    r#"{"type":"string","optional":false,"name":"io.debezium.data.Json","version":1}"#;

/// The table the relay reads (`source.schema`, `source.table`, schema names).
const SCHEMA: &str = "public";
const TABLE: &str = "event_outbox";

/// Where a row comes from: a streamed insert, or the initial snapshot (with
/// Debezium's `source.snapshot` marker).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Create,
    Read(SnapshotMark),
}

pub use crate::source::SnapshotMark;

impl From<crate::source::Origin> for Op {
    fn from(origin: crate::source::Origin) -> Op {
        match origin {
            crate::source::Origin::Change => Op::Create,
            crate::source::Origin::Snapshot(mark) => Op::Read(mark),
        }
    }
}

impl Op {
    fn code(self) -> &'static str {
        match self {
            Op::Create => "c",
            Op::Read(_) => "r",
        }
    }

    fn snapshot(self) -> &'static str {
        match self {
            Op::Create => "false",
            Op::Read(SnapshotMark::First) => "first",
            Op::Read(SnapshotMark::Middle) => "true",
            Op::Read(SnapshotMark::Last) => "last",
        }
    }
}

/// One Kafka record to produce.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub topic: Arc<str>,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    /// Shared by the records of one encoder where they carry the same.
    pub headers: Arc<[(String, Vec<u8>)]>,
    /// The record timestamp (ms); `None`: the producer's clock.
    pub timestamp: Option<i64>,
    /// The bytes whose murmur2 hash picks the partition: the aggregate id, so
    /// that one aggregate's events stay in order on one partition.
    pub partition_key: Vec<u8>,
}

/// Which shape the relay writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Cdc,
    EventRouter,
}

/// Turns outbox events into Debezium records.
#[derive(Debug, Clone)]
pub struct Encoder {
    shape: Shape,
    /// Debezium's `topic.prefix`: `source.name` and the schema names' first part.
    prefix: String,
    cdc_topic: Arc<str>,
    router_topic_prefix: String,
    /// The context headers every record carries (one run id per process).
    headers: Arc<[(String, Vec<u8>)]>,
    /// `source.name` and `source.db`, as JSON strings.
    name_json: Vec<u8>,
    db_json: Vec<u8>,
    /// What comes before a record's payload with `schemas.enable`
    /// (`{"schema":...,"payload":`), for change-event keys and values and for
    /// routed keys and values; all empty without.
    key_head: Vec<u8>,
    value_head: Vec<u8>,
    routed_key_head: Vec<u8>,
    routed_value_head: Vec<u8>,
    schemas: bool,
}

/// What comes before the payload of a record whose schema is `schema`.
fn head(schemas: bool, schema: &str) -> Vec<u8> {
    if schemas {
        format!(r#"{{"schema":{schema},"payload":"#).into_bytes()
    } else {
        Vec::new()
    }
}

fn json_string(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    json::push_str(&mut out, text);
    out
}

impl Encoder {
    /// `cdc_topic` is where change events go; its first dot-separated part is
    /// taken as the connector's `topic.prefix` (`postgres` for
    /// `postgres.activity.event_outbox`).
    pub fn new(
        shape: Shape,
        schemas: bool,
        cdc_topic: &str,
        router_topic_prefix: &str,
        database: &str,
    ) -> Encoder {
        let prefix = cdc_topic.split('.').next().unwrap_or(cdc_topic).to_string();
        let names = format!("{prefix}.{SCHEMA}.{TABLE}");
        let row = |field: &str| {
            format!(
                r#"{{"type":"struct","fields":{ROW_FIELDS},"optional":true,"name":"{names}.Value","field":"{field}"}}"#
            )
        };
        let value_schema = format!(
            r#"{{"type":"struct","fields":[{},{},{SOURCE_SCHEMA},{TRANSACTION_SCHEMA},{ENVELOPE_TAIL}],"optional":false,"name":"{names}.Envelope","version":2}}"#,
            row("before"),
            row("after")
        );
        let key_schema = format!(
            r#"{{"type":"struct","fields":[{{"type":"string","optional":false,"name":"io.debezium.data.Uuid","version":1,"field":"event_id"}}],"optional":false,"name":"{names}.Key"}}"#
        );
        let mut encoder = Encoder {
            shape,
            name_json: json_string(&prefix),
            db_json: json_string(database),
            prefix,
            cdc_topic: Arc::from(cdc_topic),
            router_topic_prefix: router_topic_prefix.to_string(),
            headers: Arc::new([]),
            key_head: head(schemas, &key_schema),
            value_head: head(schemas, &value_schema),
            routed_key_head: head(schemas, UUID_KEY_SCHEMA),
            routed_value_head: head(schemas, JSON_VALUE_SCHEMA),
            schemas,
        };
        encoder.headers = encoder.context_headers(&uuid::Uuid::new_v4().to_string());
        encoder
    }

    /// Debezium's per-task run id header (one per relay process).
    pub fn with_run_id(mut self, run_id: &str) -> Encoder {
        self.headers = self.context_headers(run_id);
        self
    }

    /// The topic an event goes to.
    pub fn topic_of(&self, event: &OutboxEvent) -> Arc<str> {
        match self.shape {
            Shape::Cdc => self.cdc_topic.clone(),
            Shape::EventRouter => Arc::from(format!(
                "{}{}",
                self.router_topic_prefix, event.aggregate_type
            )),
        }
    }

    /// The record of one event; `now` is the relay's processing time
    /// (envelope `ts_*`, the snapshot time of `r` rows).
    pub fn encode(&self, event: &OutboxEvent, op: Op, now: DateTime<Utc>) -> Message {
        self.encode_committed(event, op, None, now)
    }

    /// The record of one event committed at `committed` (the change's
    /// `source.ts_*`, as Debezium writes the commit time; the row's
    /// `created_at` where it is unknown).
    pub fn encode_committed(
        &self,
        event: &OutboxEvent,
        op: Op,
        committed: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Message {
        match self.shape {
            Shape::Cdc => self.change_event(event, op, committed, now),
            Shape::EventRouter => self.routed(event, now),
        }
    }

    fn context_headers(&self, run_id: &str) -> Arc<[(String, Vec<u8>)]> {
        [
            (
                "__debezium.context.connectorLogicalName",
                self.prefix.as_str(),
            ),
            ("__debezium.context.taskId", "0"),
            ("__debezium.context.connectorName", "postgresql"),
            ("__debezium.context.runId", run_id),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect()
    }

    /// A record's bytes: `head` (the schema, with `schemas.enable`), what
    /// `body` writes, and the closing brace the head opened.
    fn record(&self, head: &[u8], room: usize, body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut out = Vec::with_capacity(head.len() + room + 1);
        out.extend_from_slice(head);
        body(&mut out);
        if self.schemas {
            out.push(b'}');
        }
        out
    }

    /// The change event, field for field in the order of Debezium's
    /// envelope (`before`, `after`, `source`, `transaction`, `op`, `ts_*`).
    fn change_event(
        &self,
        event: &OutboxEvent,
        op: Op,
        committed: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Message {
        let source_time = match op {
            Op::Create => committed.or(event.created_at).unwrap_or(now),
            Op::Read(_) => now,
        };
        let payload = payload_jsonb(&event.payload);
        let room = 900 + 2 * payload.len() + event.aggregate_type.len() + event.event_type.len();
        let value = self.record(&self.value_head, room, |out| {
            out.extend_from_slice(br#"{"before":null,"after":"#);
            push_row(out, event, &payload);
            out.extend_from_slice(br#","source":{"version":"#);
            json::push_str(out, DEBEZIUM_VERSION);
            out.extend_from_slice(br#","connector":"postgresql","name":"#);
            out.extend_from_slice(&self.name_json);
            out.extend_from_slice(br#","ts_ms":"#);
            json::push_i64(out, source_time.timestamp_millis());
            out.extend_from_slice(br#","snapshot":"#);
            json::push_str(out, op.snapshot());
            out.extend_from_slice(br#","db":"#);
            out.extend_from_slice(&self.db_json);
            out.extend_from_slice(br#","sequence":null,"ts_us":"#);
            json::push_i64(out, source_time.timestamp_micros());
            out.extend_from_slice(br#","ts_ns":"#);
            json::push_i64(out, nanos(source_time));
            out.extend_from_slice(br#","schema":"#);
            json::push_str(out, SCHEMA);
            out.extend_from_slice(br#","table":"#);
            json::push_str(out, TABLE);
            out.extend_from_slice(
                br#","txId":null,"lsn":null,"xmin":null,"origin":null,"origin_lsn":null},"transaction":null,"op":"#,
            );
            json::push_str(out, op.code());
            out.extend_from_slice(br#","ts_ms":"#);
            json::push_i64(out, now.timestamp_millis());
            out.extend_from_slice(br#","ts_us":"#);
            json::push_i64(out, now.timestamp_micros());
            out.extend_from_slice(br#","ts_ns":"#);
            json::push_i64(out, nanos(now));
            out.push(b'}');
        });
        let key = self.record(&self.key_head, 52, |out| {
            out.extend_from_slice(br#"{"event_id":""#);
            json::push_uuid(out, &event.event_id);
            out.extend_from_slice(br#""}"#);
        });
        let mut partition_key = Vec::with_capacity(36);
        json::push_uuid(&mut partition_key, &event.aggregate_id);
        Message {
            topic: self.cdc_topic.clone(),
            key,
            value,
            headers: self.headers.clone(),
            timestamp: None,
            partition_key,
        }
    }

    fn routed(&self, event: &OutboxEvent, now: DateTime<Utc>) -> Message {
        let key = self.record(&self.routed_key_head, 38, |out| {
            out.push(b'"');
            json::push_uuid(out, &event.aggregate_id);
            out.push(b'"');
        });
        let payload = payload_jsonb(&event.payload);
        let value = self.record(&self.routed_value_head, 2 * payload.len() + 2, |out| {
            json::push_str(out, &payload);
        });
        let mut headers = self.headers.to_vec();
        headers.push(("id".into(), event.event_id.to_string().into_bytes()));
        headers.push(("eventType".into(), event.event_type.clone().into_bytes()));
        if let Some(seq) = event.sequence_id {
            headers.push(("sequenceId".into(), seq.to_string().into_bytes()));
        }
        Message {
            topic: self.topic_of(event),
            partition_key: key.clone(),
            key,
            value,
            headers: headers.into(),
            timestamp: Some(now.timestamp_millis()),
        }
    }
}

/// The outbox row as Debezium's `after`: its columns in table order, the
/// bookkeeping columns as they are at insert.
fn push_row(out: &mut Vec<u8>, event: &OutboxEvent, payload: &str) {
    out.extend_from_slice(br#"{"event_id":""#);
    json::push_uuid(out, &event.event_id);
    out.extend_from_slice(br#"","sequence_id":"#);
    json::push_i64(out, event.sequence_id.unwrap_or(0));
    out.extend_from_slice(br#","aggregate_id":""#);
    json::push_uuid(out, &event.aggregate_id);
    out.extend_from_slice(br#"","aggregate_type":"#);
    json::push_str(out, &event.aggregate_type);
    out.extend_from_slice(br#","event_type":"#);
    json::push_str(out, &event.event_type);
    out.extend_from_slice(br#","payload":"#);
    json::push_str(out, payload);
    out.extend_from_slice(
        br#","status":"pending","retry_count":0,"last_error":null,"lock_id":null,"created_at":""#,
    );
    match event.created_at {
        Some(at) => json::push_zoned_timestamp(out, at),
        None => out.extend_from_slice(b"1970-01-01T00:00:00.000000Z"),
    }
    out.extend_from_slice(br#"","published_at":null}"#);
}

fn nanos(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros().saturating_mul(1000)
}

fn to_json<T: Serialize>(value: &T) -> String {
    // Serializing plain structs, strings and numbers cannot fail.
    serde_json::to_string(value).unwrap_or_default()
}

/// Debezium's `ZonedTimestamp` of a `timestamptz` column: UTC, six fraction digits.
pub fn zoned_timestamp(t: DateTime<Utc>) -> String {
    let mut out = Vec::with_capacity(27);
    json::push_zoned_timestamp(&mut out, t);
    String::from_utf8(out).unwrap_or_default()
}

/// The payload as PostgreSQL's jsonb text: the text the source delivered
/// (pgoutput and the polling query send the column's jsonb output, which is
/// what Debezium publishes), or rendered from the value like jsonb would.
pub fn payload_jsonb(payload: &Payload) -> Cow<'_, str> {
    if let Some(text) = payload.delivered_text() {
        return Cow::Borrowed(text);
    }
    match payload.value() {
        Some(value) => Cow::Owned(jsonb_text(&value)),
        None => payload.text(),
    }
}

/// A JSON value as PostgreSQL prints a `jsonb`: object keys shortest first,
/// then bytewise; `", "` and `": "` separators. Numbers are printed from
/// their parsed value, which is PostgreSQL's text for integers and for
/// decimals without trailing zeros.
pub fn jsonb_text(value: &Value) -> String {
    let mut out = String::new();
    write_jsonb(value, &mut out);
    out
}

fn write_jsonb(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|(a, _), (b, _)| a.len().cmp(&b.len()).then_with(|| a.cmp(b)));
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&to_json(key));
                out.push_str(": ");
                write_jsonb(item, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_jsonb(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&to_json(other)),
    }
}

#[cfg(test)]
mod tests;
