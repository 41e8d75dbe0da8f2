//! The pgoutput decoder of the replication source, on a stream of messages.
//!
//! Input: the XLogData payloads of one replication connection, each as a big-endian
//! `u16` length and that many bytes (the last one may be cut short).
//!
//! Properties: no panic; a `Begin` carries the commit time of its bytes, a
//! `Commit` the end LSN of its bytes; a heartbeat is an `M` message; a decoded
//! outbox insert, written back as an insert of the real outbox table, decodes to
//! the same event; a dead letter says what is wrong.

#![no_main]

use activity_event_processor::decode::OutboxEvent;
use activity_event_processor::source::replication::pgoutput::{Decoder, WalItem};
use activity_event_processor_fuzz::{assert_same_event, postgres_text};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut decoder = Decoder::default();
    for message in frames(data) {
        match decoder.decode(message) {
            Ok(WalItem::Begin { committed }) => {
                assert_eq!(message.first(), Some(&b'B'));
                let bytes: [u8; 8] = message[9..17].try_into().expect("a begin has 21 bytes");
                let micros = i64::from_be_bytes(bytes);
                if let Some(at) = committed {
                    let since_2000 = at.timestamp_micros() - 946_684_800_000_000;
                    assert_eq!(since_2000, micros, "the commit time of the Begin");
                }
            }
            Ok(WalItem::Heartbeat { .. }) => assert_eq!(message.first(), Some(&b'M')),
            Ok(WalItem::Commit { end_lsn }) => {
                assert_eq!(message.first(), Some(&b'C'));
                let bytes: [u8; 8] = message[10..18].try_into().expect("a commit has 18 bytes");
                assert_eq!(end_lsn, u64::from_be_bytes(bytes));
            }
            Ok(WalItem::Insert(Ok(event))) => round_trip(&event),
            Ok(WalItem::Insert(Err(letter))) => {
                assert!(!letter.error.is_empty(), "a dead letter without its error");
                assert_eq!(letter.attempts, 1);
            }
            Ok(WalItem::Other) | Err(_) => {}
        }
    }
});

/// Length-prefixed messages.
fn frames(mut data: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        if data.len() < 2 {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([data[0], data[1]]));
        let rest = &data[2..];
        let (message, tail) = rest.split_at(len.min(rest.len()));
        data = tail;
        Some(message)
    })
}

/// The columns of `activity.event_outbox`, in table order.
const COLUMNS: [&str; 12] = [
    "event_id",
    "sequence_id",
    "aggregate_id",
    "aggregate_type",
    "event_type",
    "payload",
    "status",
    "retry_count",
    "last_error",
    "lock_id",
    "created_at",
    "published_at",
];

fn relation(id: u32) -> Vec<u8> {
    let mut m = vec![b'R'];
    m.extend(id.to_be_bytes());
    m.extend(b"public\0event_outbox\0d");
    m.extend((COLUMNS.len() as u16).to_be_bytes());
    for column in COLUMNS {
        m.push(0);
        m.extend(column.as_bytes());
        m.push(0);
        m.extend(25u32.to_be_bytes());
        m.extend((-1i32).to_be_bytes());
    }
    m
}

fn insert(id: u32, values: &[Option<String>]) -> Vec<u8> {
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
                m.extend(text.as_bytes());
            }
        }
    }
    m
}

/// The event as PostgreSQL would send its row, decoded again.
fn round_trip(event: &OutboxEvent) {
    let mut want = event.clone();
    let created_at = event.created_at.as_ref().and_then(postgres_text);
    if created_at.is_none() {
        want.created_at = None;
    }
    let row = [
        Some(event.event_id.to_string()),
        event.sequence_id.map(|n| n.to_string()),
        Some(event.aggregate_id.to_string()),
        Some(event.aggregate_type.clone()),
        Some(event.event_type.clone()),
        Some(event.payload.to_string()),
        Some("pending".to_string()),
        Some("0".to_string()),
        None,
        None,
        created_at,
        None,
    ];
    let mut decoder = Decoder::default();
    assert!(matches!(
        decoder.decode(&relation(16_386)),
        Ok(WalItem::Other)
    ));
    match decoder.decode(&insert(16_386, &row)) {
        Ok(WalItem::Insert(Ok(got))) => assert_same_event(&want, &got, "pgoutput"),
        other => panic!("the event written back does not decode: {other:?}\nevent {event:?}"),
    }
}
