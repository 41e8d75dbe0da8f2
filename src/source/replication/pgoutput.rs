//! The few `pgoutput` messages (protocol 1, no streaming) the outbox needs,
//! read straight from the frame's bytes: `Begin`, `Commit`, `Relation` (the
//! column names) and `Insert` (the row as text). Everything else is skipped.
//! An insert is decoded without allocating: its text columns are borrowed
//! from the frame and handed to [`decode_row`].
//!
//! Format: <https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html>

use super::{decode_row, EVENT_COLUMNS};
use crate::dead_letter::DeadLetter;
use crate::decode::{DecodeError, OutboxEvent};

/// The table whose inserts are events.
const OUTBOX: &str = "event_outbox";

/// What one pgoutput message means to us.
#[derive(Debug)]
// `Insert` is the common case: boxing it would cost an allocation per event.
#[allow(clippy::large_enum_variant)]
pub enum WalItem {
    Begin,
    /// An outbox row, or the dead letter of one that does not decode.
    Insert(Result<OutboxEvent, Box<DeadLetter>>),
    /// The end of a transaction: resuming at `end_lsn` skips it.
    Commit {
        end_lsn: u64,
    },
    /// Anything else (relations, other tables, other operations).
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
            b'B' => Ok(WalItem::Begin),
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
        assert!(matches!(decoder.decode(b"B........"), Ok(WalItem::Begin)));
        decoder
            .decode(&relation(8, "noise", &["x"]))
            .expect("relation");
        assert!(matches!(
            decoder.decode(&insert(8, &[Some(b"1")])),
            Ok(WalItem::Other)
        ));
        assert!(matches!(decoder.decode(b"Yxyz"), Ok(WalItem::Other)));
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
