//! One Kafka record, owned, and the dead letter of a record that does not
//! decode: whatever ids it still yields, and the raw record itself (topic,
//! partition, offset, key, value and headers) so that nothing is lost.

use crate::dead_letter::DeadLetter;
use crate::decode::{
    decode_message_timed, DecodeError, DecodeOptions, Decoded, OutboxEvent, RawMessage,
    TimedDecoded,
};
use chrono::{DateTime, Utc};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// The most bytes of a key, value or header kept in a dead letter (a MongoDB
/// document holds 16 MiB at most).
const KEEP_BYTES: usize = 256 * 1024;

/// A consumed record.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// The record's timestamp (ms since the epoch; create or log-append
    /// time, whichever the topic keeps), if it has one.
    pub timestamp: Option<i64>,
}

impl Record {
    /// The record's timestamp as a time (`None` for none, or a nonsense one).
    pub fn time(&self) -> Option<DateTime<Utc>> {
        self.timestamp
            .filter(|ms| *ms > 0)
            .and_then(DateTime::from_timestamp_millis)
    }

    /// The record decoded, with its event's commit time: the one the value
    /// says (a Debezium change event's `source.ts_us` / `source.ts_ms`), else
    /// the record's timestamp.
    pub fn decode(&self, options: &DecodeOptions) -> Result<TimedDecoded, DecodeError> {
        let (decoded, committed) = decode_message_timed(&self.raw(), options)?;
        let committed = match decoded {
            Decoded::Event(_) => committed.or_else(|| self.time()),
            Decoded::Skip(_) => None,
        };
        Ok((decoded, committed))
    }

    pub fn raw(&self) -> RawMessage<'_> {
        RawMessage {
            topic: Some(&self.topic),
            key: self.key.as_deref(),
            value: self.value.as_deref(),
            headers: &self.headers,
        }
    }

    /// A stable id for the record's dead letter: a function of its position,
    /// so a redelivered record rewrites the same dead letter. (The event id
    /// a broken record claims is not trusted: it may be the id of a good event.)
    pub fn dead_letter_id(&self) -> Uuid {
        let digest = Sha256::digest(
            format!("kafka\0{}\0{}\0{}", self.topic, self.partition, self.offset).as_bytes(),
        );
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        bytes[6] = (bytes[6] & 0x0f) | 0x80; // version 8: custom
        bytes[8] = (bytes[8] & 0x3f) | 0x80; // RFC 4122 variant
        Uuid::from_bytes(bytes)
    }

    /// The dead letter of a record that failed to decode with `error`.
    pub fn dead_letter(&self, error: &DecodeError, options: &DecodeOptions) -> DeadLetter {
        let found = Recovered::from_record(self, options);
        let mut raw = Map::new();
        raw.insert("source".into(), json!("kafka"));
        raw.insert("topic".into(), json!(self.topic));
        raw.insert("partition".into(), json!(self.partition));
        raw.insert("offset".into(), json!(self.offset));
        raw.insert("key".into(), bytes_json(self.key.as_deref()));
        raw.insert("value".into(), bytes_json(self.value.as_deref()));
        raw.insert(
            "headers".into(),
            Value::Array(
                self.headers
                    .iter()
                    .map(|(name, value)| json!({"name": name, "value": bytes_json(value.as_deref())}))
                    .collect(),
            ),
        );
        raw.insert(
            "event_id".into(),
            found
                .event_id
                .map_or(Value::Null, |id| Value::String(id.to_string())),
        );
        DeadLetter {
            event: OutboxEvent {
                event_id: self.dead_letter_id(),
                sequence_id: found.sequence_id,
                aggregate_id: found.aggregate_id.unwrap_or_else(Uuid::nil),
                aggregate_type: found.aggregate_type.unwrap_or_default(),
                event_type: found.event_type.unwrap_or_default(),
                payload: Value::Object(raw).into(),
                created_at: None,
            },
            error: format!(
                "kafka record {}/{}@{}: {error}",
                self.topic, self.partition, self.offset
            ),
            attempts: 1,
        }
    }
}

/// `null`, `{"text": ...}` for UTF-8, else `{"hex": ...}`; long values cut
/// (with `"truncated": <full length>`).
fn bytes_json(bytes: Option<&[u8]>) -> Value {
    let Some(bytes) = bytes else {
        return Value::Null;
    };
    let kept = &bytes[..bytes.len().min(KEEP_BYTES)];
    let mut out = match std::str::from_utf8(kept) {
        Ok(text) => json!({ "text": text }),
        // A cut may split a character: keep the valid prefix as text.
        Err(err) if err.error_len().is_none() && kept.len() < bytes.len() => {
            json!({ "text": String::from_utf8_lossy(&kept[..err.valid_up_to()]) })
        }
        Err(_) => json!({ "hex": hex(kept) }),
    };
    if kept.len() < bytes.len() {
        out["truncated"] = json!(bytes.len());
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

/// What a broken record still says about its event, read leniently.
#[derive(Debug, Default, PartialEq)]
struct Recovered {
    event_id: Option<Uuid>,
    sequence_id: Option<i64>,
    aggregate_id: Option<Uuid>,
    aggregate_type: Option<String>,
    event_type: Option<String>,
}

impl Recovered {
    fn from_record(record: &Record, options: &DecodeOptions) -> Recovered {
        let mut found = Recovered::default();
        let value: Option<Value> = record
            .value
            .as_deref()
            .and_then(|v| serde_json::from_slice(v).ok());
        if let Some(mut value) = value {
            if value.get("schema").is_some() && value.get("payload").is_some() {
                value = value["payload"].take();
            }
            let row = ["after", "before"]
                .iter()
                .find_map(|side| value.get(*side).filter(|r| r.is_object()))
                .cloned();
            if let Some(row) = row {
                let text = |field: &str| row.get(field).and_then(Value::as_str).map(str::to_string);
                let uuid = |field: &str| text(field).and_then(|t| Uuid::parse_str(t.trim()).ok());
                found.event_id = uuid("event_id");
                found.aggregate_id = uuid("aggregate_id");
                found.aggregate_type = text("aggregate_type");
                found.event_type = text("event_type");
                found.sequence_id = row.get("sequence_id").and_then(Value::as_i64);
            }
        }
        let header = |name: &str| {
            record
                .headers
                .iter()
                .rev()
                .find(|(key, _)| key == name)
                .and_then(|(_, v)| v.as_deref())
                .and_then(|v| std::str::from_utf8(v).ok())
                .map(|t| t.trim().trim_matches('"').to_string())
        };
        found.event_id = found
            .event_id
            .or_else(|| header(&options.event_id_header).and_then(|t| Uuid::parse_str(&t).ok()));
        found.event_type = found
            .event_type
            .or_else(|| header(&options.event_type_header));
        found.sequence_id = found
            .sequence_id
            .or_else(|| header(&options.sequence_id_header).and_then(|t| t.parse().ok()));
        found.aggregate_type = found.aggregate_type.or_else(|| {
            header(&options.aggregate_type_header).or_else(|| {
                let prefix = &options.event_router_topic_prefix;
                record
                    .topic
                    .strip_prefix(prefix.as_str())
                    .filter(|rest| !prefix.is_empty() && !rest.is_empty())
                    .map(str::to_string)
            })
        });
        if found.aggregate_id.is_none() {
            found.aggregate_id = record
                .key
                .as_deref()
                .and_then(|k| std::str::from_utf8(k).ok())
                .map(|k| k.trim().trim_matches('"'))
                .and_then(|k| Uuid::parse_str(k).ok());
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(value: &[u8]) -> Record {
        Record {
            topic: "postgres.activity.event_outbox".into(),
            partition: 2,
            offset: 41,
            key: Some(br#"{"event_id":"0192f4b7-1c3d-7e4f-9a50-3b6c7d8e9f10"}"#.to_vec()),
            value: Some(value.to_vec()),
            headers: vec![
                ("a".into(), Some(b"1".to_vec())),
                ("bin".into(), Some(vec![0xff, 0x00])),
                ("none".into(), None),
            ],
            timestamp: Some(1_789_465_267_538),
        }
    }

    #[test]
    fn a_dead_letter_keeps_the_raw_record_and_what_can_be_recovered() {
        let value = br#"{"before":null,"after":{"event_id":"0192f4b7-1c3d-7e4f-9a50-3b6c7d8e9f10","sequence_id":104,"aggregate_id":"7d3c9a52-1e4f-4b8a-9c61-2f5e8d7a4b10","aggregate_type":"User","event_type":"UserCreated"},"op":"x"}"#;
        let rec = record(value);
        let letter = rec.dead_letter(&DecodeError::NotDebezium, &DecodeOptions::default());
        assert_eq!(letter.event.event_id, rec.dead_letter_id());
        assert_eq!(letter.event.event_id.get_version_num(), 8);
        assert_eq!(letter.event.sequence_id, Some(104));
        assert_eq!(letter.event.event_type, "UserCreated");
        assert_eq!(letter.event.aggregate_type, "User");
        assert_eq!(
            letter.event.aggregate_id.to_string(),
            "7d3c9a52-1e4f-4b8a-9c61-2f5e8d7a4b10"
        );
        let raw = &letter.event.payload.to_json();
        assert_eq!(raw["offset"], 41);
        assert_eq!(raw["partition"], 2);
        assert_eq!(raw["event_id"], "0192f4b7-1c3d-7e4f-9a50-3b6c7d8e9f10");
        assert_eq!(
            raw["value"]["text"],
            std::str::from_utf8(value).unwrap_or("")
        );
        assert_eq!(raw["headers"][1]["value"]["hex"], "ff00");
        assert_eq!(raw["headers"][2]["value"], Value::Null);
        assert!(letter
            .error
            .starts_with("kafka record postgres.activity.event_outbox/2@41: "));
    }

    #[test]
    fn ids_depend_on_the_position_only() {
        let a = record(b"{");
        let mut b = record(b"other");
        assert_eq!(a.dead_letter_id(), b.dead_letter_id());
        b.offset += 1;
        assert_ne!(a.dead_letter_id(), b.dead_letter_id());
    }

    #[test]
    fn long_and_binary_values_are_cut_and_hex_encoded() {
        let long = vec![b'a'; KEEP_BYTES + 10];
        let out = bytes_json(Some(&long));
        assert_eq!(out["truncated"], KEEP_BYTES + 10);
        assert_eq!(out["text"].as_str().map(str::len), Some(KEEP_BYTES));
        assert_eq!(bytes_json(Some(&[0xc3, 0x28]))["hex"], "c328");
        assert_eq!(bytes_json(None), Value::Null);
    }

    /// A fixture record (tests/fixtures/debezium), on `topic`, with the Kafka
    /// timestamp `timestamp`.
    fn fixture(topic: &str, key: &[u8], value: &[u8], timestamp: Option<i64>) -> Record {
        Record {
            topic: topic.into(),
            partition: 0,
            offset: 0,
            key: Some(key.to_vec()),
            value: Some(value.to_vec()),
            headers: Vec::new(),
            timestamp,
        }
    }

    fn commit_micros(record: &Record) -> Option<i64> {
        match record.decode(&DecodeOptions::default()) {
            Ok((Decoded::Event(_), committed)) => committed.map(|t| t.timestamp_micros()),
            other => panic!("expected an event, got {other:?}"),
        }
    }

    macro_rules! debezium {
        ($path:literal) => {
            include_bytes!(concat!("../../../tests/fixtures/debezium/", $path))
        };
    }

    #[test]
    fn a_change_event_commits_at_its_source_time_not_its_created_at_or_kafka_time() {
        // insert_user_created: created_at 09:41:07.509871, committed (source.ts_us)
        // 09:41:07.512394, Kafka time whatever the producer gave.
        let key = debezium!("cdc/schemas-disabled/insert_user_created.key.json");
        for value in [
            &debezium!("cdc/schemas-disabled/insert_user_created.value.json")[..],
            &debezium!("cdc/schemas-enabled/insert_user_created.value.json")[..],
        ] {
            let record = fixture(
                "postgres.activity.event_outbox",
                key,
                value,
                Some(1_900_000_000_000),
            );
            assert_eq!(commit_micros(&record), Some(1_789_465_267_512_394));
        }
        // A snapshot row: the time the snapshot read it.
        let snapshot = fixture(
            "postgres.activity.event_outbox",
            debezium!("cdc/schemas-disabled/snapshot_read_first.key.json"),
            debezium!("cdc/schemas-disabled/snapshot_read_first.value.json"),
            None,
        );
        assert_eq!(commit_micros(&snapshot), Some(1_789_462_798_412_337));
    }

    #[test]
    fn without_a_source_time_the_kafka_timestamp_is_the_commit_time() {
        // Debezium before 2.6 has no ts_us: ts_ms, in milliseconds.
        let value = std::str::from_utf8(debezium!(
            "cdc/schemas-disabled/insert_user_created.value.json"
        ))
        .unwrap_or_default();
        let millis_only = value.replace(r#""ts_us":1789465267512394,"#, "");
        assert_ne!(millis_only, value);
        let record = fixture("t", b"k", millis_only.as_bytes(), None);
        assert_eq!(commit_micros(&record), Some(1_789_465_267_512_000));
        // No source time at all: the record's.
        let bare = millis_only.replace(r#""ts_ms":1789465267512,"#, "");
        assert_ne!(bare, millis_only);
        let record = fixture("t", b"k", bare.as_bytes(), Some(1_789_465_267_600));
        assert_eq!(commit_micros(&record), Some(1_789_465_267_600_000));
        // Nothing either: unknown (the runtime falls back to created_at).
        let record = fixture("t", b"k", bare.as_bytes(), None);
        assert_eq!(commit_micros(&record), None);
    }

    #[test]
    fn an_event_router_record_commits_at_its_kafka_timestamp() {
        // The SMT sets the Kafka timestamp to the envelope's ts_ms
        // (outbox/default/headers/user_created.headers.json: 1789465267538).
        let mut record = fixture(
            "outbox.event.User",
            debezium!("outbox/default/schemas-disabled/user_created.key.json"),
            debezium!("outbox/default/schemas-disabled/user_created.value.json"),
            Some(1_789_465_267_538),
        );
        record.headers = vec![
            (
                "id".into(),
                Some(b"0192f4b7-1c3d-7e4f-9a50-3b6c7d8e9f10".to_vec()),
            ),
            ("eventType".into(), Some(b"UserCreated".to_vec())),
        ];
        assert_eq!(commit_micros(&record), Some(1_789_465_267_538_000));
    }

    #[test]
    fn records_without_an_event_have_no_commit_time() {
        let heartbeat = fixture(
            "__debezium-heartbeat.postgres",
            b"k",
            br#"{"ts_ms":1789466761337}"#,
            Some(1),
        );
        let decoded = heartbeat.decode(&DecodeOptions::default());
        assert!(
            matches!(decoded, Ok((Decoded::Skip(_), None))),
            "{decoded:?}"
        );
    }
}
