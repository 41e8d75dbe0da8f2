//! The few `pgoutput` messages (protocol 1, no streaming) the outbox needs,
//! read straight from the frame's bytes: `Begin` (its commit time), `Commit`,
//! `Relation` (the column names), `Insert` (the row as text) and `Message`
//! (the processor's heartbeat). Everything else is skipped.
//! An insert is decoded without allocating: its text columns are borrowed
//! from the frame and handed to [`decode_row`].
//!
//! Format: <https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html>

use super::{decode_row, EVENT_COLUMNS};
use crate::dead_letter::DeadLetter;
use crate::decode::{DecodeError, OutboxEvent};
use crate::observe::heartbeat::{heartbeat_sent_at, parse_logical_message};
use chrono::{DateTime, Utc};
use std::time::SystemTime;

/// The table whose inserts are events.
const OUTBOX: &str = "event_outbox";

/// What one pgoutput message means to us.
#[derive(Debug)]
// `Insert` is the common case: boxing it would cost an allocation per event.
#[allow(clippy::large_enum_variant)]
pub enum WalItem {
    /// A transaction starts; it committed at `committed` (`None`: a time
    /// out of range).
    Begin { committed: Option<DateTime<Utc>> },
    /// An outbox row, or the dead letter of one that does not decode.
    Insert(Result<OutboxEvent, Box<DeadLetter>>),
    /// The end of a transaction: resuming at `end_lsn` skips it.
    Commit { end_lsn: u64 },
    /// A heartbeat of this processor ([`crate::observe::heartbeat`]),
    /// written at `sent_at`: not an event.
    Heartbeat { sent_at: SystemTime },
    /// Anything else (relations, other tables, other operations, other
    /// logical messages).
    Other,
}

/// A table the stream described, by its column positions.
struct Relation {
    id: u32,
    /// The inserts of this table are outbox events.
    outbox: bool,
    /// Per column of the table: its name, if it is one of [`EVENT_COLUMNS`].
    columns: Vec<Option<&'static str>>,
}

/// Decodes the messages of one replication connection (a relation is
/// described once per connection, before its first row).
#[derive(Default)]
pub struct Decoder {
    relations: Vec<Relation>,
}

/// A message that is not what the protocol says it is.
#[derive(Debug, thiserror::Error)]
#[error("malformed pgoutput message: {0}")]
pub struct ProtocolError(&'static str);

impl Decoder {
    /// What one XLogData payload means.
    pub fn decode(&mut self, message: &[u8]) -> Result<WalItem, ProtocolError> {
        let mut r = Reader(message);
        match r.u8()? {
            b'B' => {
                let _final_lsn = r.u64()?;
                let committed = commit_time(r.i64()?);
                let _xid = r.u32()?;
                Ok(WalItem::Begin { committed })
            }
            b'C' => {
                let _flags = r.u8()?;
                let _commit_lsn = r.u64()?;
                Ok(WalItem::Commit { end_lsn: r.u64()? })
            }
            b'R' => {
                self.relation(&mut r)?;
                Ok(WalItem::Other)
            }
            b'I' => self.insert(&mut r),
            b'M' => {
                let message = parse_logical_message(message)
                    .ok_or(ProtocolError("a logical message cut short"))?;
                Ok(heartbeat_sent_at(message.prefix, message.content)
                    .map_or(WalItem::Other, |sent_at| WalItem::Heartbeat { sent_at }))
            }
            _ => Ok(WalItem::Other),
        }
    }

    fn relation(&mut self, r: &mut Reader<'_>) -> Result<(), ProtocolError> {
        let id = r.u32()?;
        let _namespace = r.cstr()?;
        let name = r.cstr()?;
        let _replica_identity = r.u8()?;
        let count = r.u16()?;
        let mut columns = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let _flags = r.u8()?;
            let column = r.cstr()?;
            let _type_oid = r.u32()?;
            let _type_modifier = r.u32()?;
            columns.push(
                EVENT_COLUMNS
                    .iter()
                    .copied()
                    .find(|wanted| *wanted == column),
            );
        }
        let relation = Relation {
            id,
            outbox: name == OUTBOX,
            columns,
        };
        // A relation is described again when its definition changes.
        match self.relations.iter_mut().find(|known| known.id == id) {
            Some(known) => *known = relation,
            None => self.relations.push(relation),
        }
        Ok(())
    }

    fn insert(&self, r: &mut Reader<'_>) -> Result<WalItem, ProtocolError> {
        let id = r.u32()?;
        let relation = self
            .relations
            .iter()
            .find(|known| known.id == id)
            .ok_or(ProtocolError(
                "an insert into a relation that was never described",
            ))?;
        if !relation.outbox {
            return Ok(WalItem::Other);
        }
        if r.u8()? != b'N' {
            return Err(ProtocolError("an insert without its new tuple"));
        }
        let count = usize::from(r.u16()?);
        let mut row = [("", None); EVENT_COLUMNS.len()];
        let mut filled = 0;
        let mut not_utf8 = None;
        for index in 0..count {
            let value = match r.u8()? {
                b't' => {
                    let len = r.u32()? as usize;
                    Some(r.bytes(len)?)
                }
                b'b' => return Err(ProtocolError("a binary column (binary mode is off)")),
                // `n` null, `u` an unchanged TOASTed value (updates only).
                _ => None,
            };
            let Some(name) = relation.columns.get(index).copied().flatten() else {
                continue;
            };
            if filled == row.len() {
                continue;
            }
            let text = match value.map(std::str::from_utf8) {
                Some(Ok(text)) => Some(text),
                Some(Err(cause)) => {
                    not_utf8.get_or_insert((name, cause));
                    None
                }
                None => None,
            };
            row[filled] = (name, text);
            filled += 1;
        }
        let row = &row[..filled];
        let decoded = match not_utf8 {
            None => decode_row(row),
            Some((name, cause)) => {
                let err = DecodeError::NotUtf8 {
                    what: format!("column `{name}`"),
                    cause,
                };
                Err(Box::new(super::rows::malformed_row(row, &err)))
            }
        };
        Ok(WalItem::Insert(decoded))
    }
}

/// A pgoutput timestamp (microseconds since 2000-01-01 00:00 UTC) as a
/// time; `None` past what a time can hold.
pub fn commit_time(micros: i64) -> Option<DateTime<Utc>> {
    /// 2000-01-01 in microseconds since the Unix epoch.
    const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;
    DateTime::from_timestamp_micros(micros.checked_add(PG_EPOCH_MICROS)?)
}

/// A cursor over a message.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn bytes(&mut self, len: usize) -> Result<&'a [u8], ProtocolError> {
        if self.0.len() < len {
            return Err(ProtocolError("truncated"));
        }
        let (head, rest) = self.0.split_at(len);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        let bytes = self.bytes(N)?;
        let mut out = [0; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, ProtocolError> {
        self.array().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Result<u32, ProtocolError> {
        self.array().map(u32::from_be_bytes)
    }

    fn u64(&mut self) -> Result<u64, ProtocolError> {
        self.array().map(u64::from_be_bytes)
    }

    fn i64(&mut self) -> Result<i64, ProtocolError> {
        self.array().map(i64::from_be_bytes)
    }

    /// A NUL-terminated string.
    fn cstr(&mut self) -> Result<&'a str, ProtocolError> {
        let end = self
            .0
            .iter()
            .position(|&b| b == 0)
            .ok_or(ProtocolError("unterminated string"))?;
        let text = std::str::from_utf8(&self.0[..end])
            .map_err(|_| ProtocolError("a name that is not utf-8"))?;
        self.0 = &self.0[end + 1..];
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relation(id: u32, table: &str, columns: &[&str]) -> Vec<u8> {
        let mut m = vec![b'R'];
        m.extend(id.to_be_bytes());
        m.extend(b"public\0");
        m.extend(table.as_bytes());
        m.push(0);
        m.push(b'd');
        m.extend((columns.len() as u16).to_be_bytes());
        for column in columns {
            m.push(0);
            m.extend(column.as_bytes());
            m.push(0);
            m.extend(25u32.to_be_bytes());
            m.extend((-1i32).to_be_bytes());
        }
        m
    }

    fn insert(id: u32, values: &[Option<&[u8]>]) -> Vec<u8> {
        let mut m = vec![b'I'];
        m.extend(id.to_be_bytes());
        m.push(b'N');
        m.extend((values.len() as u16).to_be_bytes());
        for value in values {
            match value {
                None => m.push(b'n'),
                Some(text) => {
                    m.push(b't');
                    m.extend((text.len() as u32).to_be_bytes());
                    m.extend(*text);
                }
            }
        }
        m
    }

    const COLUMNS: [&str; 9] = [
        "event_id",
        "sequence_id",
        "aggregate_id",
        "aggregate_type",
        "event_type",
        "payload",
        "status",
        "last_error",
        "created_at",
    ];

    fn row(payload: &[u8]) -> Vec<Option<&[u8]>> {
        vec![
            Some(b"0192f4b7-1c3d-7e4f-9a50-3b6c7d8e9f10"),
            Some(b"42"),
            Some(b"7d3c9a52-1e4f-4b8a-9c61-2f5e8d7a4b10"),
            Some(b"User"),
            Some(b"UserCreated"),
            Some(payload),
            Some(b"pending"),
            None,
            Some(b"2026-11-25 10:52:19.123456+00"),
        ]
    }

    #[test]
    fn an_outbox_insert_becomes_an_event() {
        let mut decoder = Decoder::default();
        assert!(matches!(
            decoder.decode(&relation(7, "event_outbox", &COLUMNS)),
            Ok(WalItem::Other)
        ));
        let item = decoder.decode(&insert(7, &row(br#"{"email":"a@b"}"#)));
        let Ok(WalItem::Insert(Ok(event))) = item else {
            panic!("expected an event, got {item:?}");
        };
        assert_eq!(event.sequence_id, Some(42));
        assert_eq!(event.event_type, "UserCreated");
        assert_eq!(event.payload, serde_json::json!({"email": "a@b"}));
        assert!(event.created_at.is_some());
    }

    #[test]
    fn transactions_and_other_tables() {
        let mut decoder = Decoder::default();
        let mut commit = vec![b'C', 0];
        commit.extend(5u64.to_be_bytes());
        commit.extend(9u64.to_be_bytes());
        commit.extend(0i64.to_be_bytes());
        assert!(matches!(
            decoder.decode(&commit),
            Ok(WalItem::Commit { end_lsn: 9 })
        ));
        assert!(decoder.decode(b"B........").is_err(), "a Begin cut short");
        decoder
            .decode(&relation(8, "noise", &["x"]))
            .expect("relation");
        assert!(matches!(
            decoder.decode(&insert(8, &[Some(b"1")])),
            Ok(WalItem::Other)
        ));
        assert!(matches!(decoder.decode(b"Yxyz"), Ok(WalItem::Other)));
    }

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
            .collect()
    }

    /// The XLogData payloads of a capture (`fuzz/corpus/pgoutput`): each a
    /// big-endian `u16` length and that many bytes.
    fn frames(mut data: &[u8]) -> Vec<&[u8]> {
        let mut out = Vec::new();
        while let [a, b, rest @ ..] = data {
            let len = usize::from(u16::from_be_bytes([*a, *b])).min(rest.len());
            out.push(&rest[..len]);
            data = &rest[len..];
        }
        out
    }

    fn utc(text: &str) -> DateTime<Utc> {
        text.parse().expect("a time")
    }

    /// Frames PostgreSQL 15 sent for `SELECT pg_logical_emit_message(true,
    /// 'activity-event-processor.heartbeat', 'sent_at_us=1764000000123456')`
    /// (`pg_logical_slot_get_binary_changes`, pgoutput, `messages` on).
    const HEARTBEAT_TRANSACTION: [&str; 3] = [
        "420000000001920ff8000304f7afcad717000002da",
        "4d010000000001920ff861637469766974792d6576656e742d70726f636573736f722e68656172746265\
         6174000000001b73656e745f61745f75733d31373634303030303030313233343536",
        "43000000000001920ff80000000001921028000304f7afcad717",
    ];

    #[test]
    fn begin_carries_the_commit_time() {
        // A transaction PostgreSQL 15 sent: Begin, Relation, Insert, Commit.
        let capture = include_bytes!("../../../fuzz/corpus/pgoutput/tx_insert_user_created");
        let mut decoder = Decoder::default();
        let items: Vec<WalItem> = frames(capture)
            .into_iter()
            .map(|frame| decoder.decode(frame).expect("a real frame decodes"))
            .collect();
        let Some(WalItem::Begin { committed }) = items.first() else {
            panic!("expected a Begin first: {items:?}");
        };
        // 0x000304f24aa0fb2a microseconds after 2000-01-01.
        assert_eq!(*committed, Some(utc("2026-12-06T09:13:30.792746Z")));
        assert!(items
            .iter()
            .any(|item| matches!(item, WalItem::Insert(Ok(_)))));
        assert!(matches!(items.last(), Some(WalItem::Commit { .. })));

        // The layout: Byte1('B') Int64 final_lsn Int64 commit time Int32 xid.
        let mut begin = vec![b'B'];
        begin.extend(0x16_B374_D848u64.to_be_bytes());
        begin.extend(1_500_000i64.to_be_bytes());
        begin.extend(742u32.to_be_bytes());
        assert!(matches!(
            decoder.decode(&begin),
            Ok(WalItem::Begin { committed: Some(at) }) if at == utc("2000-01-01T00:00:01.500Z")
        ));
        let mut before_2000 = begin.clone();
        before_2000[9..17].copy_from_slice(&(-1i64).to_be_bytes());
        assert!(matches!(
            decoder.decode(&before_2000),
            Ok(WalItem::Begin { committed: Some(at) }) if at == utc("1999-12-31T23:59:59.999999Z")
        ));
        // Out of any calendar: no time, and the commit's position still counts.
        let mut far = begin.clone();
        far[9..17].copy_from_slice(&i64::MAX.to_be_bytes());
        assert!(matches!(
            decoder.decode(&far),
            Ok(WalItem::Begin { committed: None })
        ));
        assert!(decoder.decode(&begin[..begin.len() - 1]).is_err());
    }

    #[test]
    fn a_heartbeat_is_read_and_other_logical_messages_are_not_events() {
        let mut decoder = Decoder::default();
        let items: Vec<WalItem> = HEARTBEAT_TRANSACTION
            .iter()
            .map(|frame| decoder.decode(&hex(frame)).expect("a real frame decodes"))
            .collect();
        let sent = std::time::UNIX_EPOCH + std::time::Duration::from_micros(1_764_000_000_123_456);
        assert!(
            matches!(
                items.as_slice(),
                [
                    WalItem::Begin { committed: Some(_) },
                    WalItem::Heartbeat { sent_at },
                    WalItem::Commit { end_lsn: 0x0192_1028 },
                ] if *sent_at == sent
            ),
            "{items:?}"
        );
        // Another prefix (a capture of `pg_logical_emit_message(true,
        // 'prefix', 'hello')`): skipped, inside its transaction.
        let capture = include_bytes!("../../../fuzz/corpus/pgoutput/tx_logical_message");
        let items: Vec<WalItem> = frames(capture)
            .into_iter()
            .map(|frame| decoder.decode(frame).expect("a real frame decodes"))
            .collect();
        assert!(
            matches!(
                items.as_slice(),
                [
                    WalItem::Other,
                    WalItem::Begin { committed: Some(_) },
                    WalItem::Other,
                    WalItem::Commit { .. }
                ]
            ),
            "{items:?}"
        );
        // A heartbeat whose content is not ours is no heartbeat.
        let mut odd = hex(HEARTBEAT_TRANSACTION[1]);
        let last = odd.len() - 1;
        odd[last] = b'x';
        assert!(matches!(decoder.decode(&odd), Ok(WalItem::Other)));
        // One cut short is a protocol error, as any other message.
        assert!(decoder.decode(&odd[..odd.len() - 3]).is_err());
    }

    /// `prune` deletes outbox rows (and an operator may update them): where
    /// a publication publishes those too, they are read past, never events.
    #[test]
    fn deletes_and_updates_of_outbox_rows_are_not_events() {
        let mut decoder = Decoder::default();
        decoder
            .decode(&relation(7, "event_outbox", &COLUMNS))
            .expect("relation");
        let mut delete = insert(7, &row(b"{}"));
        delete[0] = b'D';
        delete[5] = b'K';
        assert!(matches!(decoder.decode(&delete), Ok(WalItem::Other)));
        let mut update = insert(7, &row(b"{}"));
        update[0] = b'U';
        assert!(matches!(decoder.decode(&update), Ok(WalItem::Other)));
    }

    #[test]
    fn bad_rows_are_dead_letters_and_bad_messages_errors() {
        let mut decoder = Decoder::default();
        decoder
            .decode(&relation(7, "event_outbox", &COLUMNS))
            .expect("relation");
        let item = decoder.decode(&insert(7, &row(b"{not json")));
        assert!(
            matches!(&item, Ok(WalItem::Insert(Err(letter))) if letter.error.contains("payload")),
            "{item:?}"
        );
        let item = decoder.decode(&insert(7, &row(b"\xff\xfe")));
        assert!(
            matches!(&item, Ok(WalItem::Insert(Err(letter))) if letter.error.contains("utf-8")),
            "{item:?}"
        );
        let mut truncated = insert(7, &row(b"{}"));
        truncated.truncate(30);
        assert!(decoder.decode(&truncated).is_err());
        assert!(decoder.decode(&insert(99, &[])).is_err());
    }
}
