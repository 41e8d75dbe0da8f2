//! The pieces of a Debezium record, written straight into the record's bytes:
//! JSON strings escaped exactly as `serde_json` escapes them, integers,
//! UUIDs and `ZonedTimestamp`s, with no intermediate `String` and no
//! formatting machinery. The relay encodes every outbox row with these (see
//! docs/design.md, section 3); the unit tests hold them to `serde_json`'s
//! and `chrono`'s output.

use chrono::{DateTime, Datelike, Timelike, Utc};

const HEX: &[u8; 16] = b"0123456789abcdef";

/// `"text"`, escaped as `serde_json` does: `"`, `\`, and the control
/// characters (`\b \t \n \f \r`, the others as `\u00XX`); everything else,
/// non-ASCII included, as it is.
pub(super) fn push_str(out: &mut Vec<u8>, text: &str) {
    let bytes = text.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut start = 0;
    for (i, &byte) in bytes.iter().enumerate() {
        if byte >= 0x20 && byte != b'"' && byte != b'\\' {
            continue;
        }
        out.extend_from_slice(&bytes[start..i]);
        match byte {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0x08 => out.extend_from_slice(b"\\b"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            0x0c => out.extend_from_slice(b"\\f"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(byte >> 4)],
                HEX[usize::from(byte & 0xf)],
            ]),
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

pub(super) fn push_i64(out: &mut Vec<u8>, n: i64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// A UUID's hyphenated lower-case text, unquoted.
pub(super) fn push_uuid(out: &mut Vec<u8>, id: &uuid::Uuid) {
    let mut buffer = uuid::Uuid::encode_buffer();
    out.extend_from_slice(id.hyphenated().encode_lower(&mut buffer).as_bytes());
}

/// Debezium's `ZonedTimestamp` of a `timestamptz`, unquoted: UTC, six
/// fraction digits (`2026-09-15T09:41:07.509870Z`), the microseconds
/// truncated as `chrono`'s `%.6f` does.
pub(super) fn push_zoned_timestamp(out: &mut Vec<u8>, t: DateTime<Utc>) {
    let (year, nanos) = (t.year(), t.nanosecond());
    // Years of five digits or before year 0, and leap seconds, are rare
    // enough to take chrono's way.
    if !(0..=9999).contains(&year) || nanos >= 1_000_000_000 {
        out.extend_from_slice(t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string().as_bytes());
        return;
    }
    push_digits(out, year as u32, 4, b'-');
    push_digits(out, t.month(), 2, b'-');
    push_digits(out, t.day(), 2, b'T');
    push_digits(out, t.hour(), 2, b':');
    push_digits(out, t.minute(), 2, b':');
    push_digits(out, t.second(), 2, b'.');
    push_digits(out, nanos / 1_000, 6, b'Z');
}

/// `value`'s last `width` (at most 6) decimal digits, zero-padded, then `then`.
fn push_digits(out: &mut Vec<u8>, value: u32, width: usize, then: u8) {
    let mut buffer = [b'0'; 7];
    let mut value = value;
    for slot in buffer[..width].iter_mut().rev() {
        *slot = b'0' + (value % 10) as u8;
        value /= 10;
    }
    buffer[width] = then;
    out.extend_from_slice(&buffer[..=width]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn escaped(text: &str) -> String {
        let mut out = Vec::new();
        push_str(&mut out, text);
        String::from_utf8(out).unwrap_or_default()
    }

    #[test]
    fn every_ascii_character_is_escaped_as_serde_json_escapes_it() {
        for byte in 0u8..=0x7f {
            let text = format!("a{}b", char::from(byte));
            assert_eq!(
                escaped(&text),
                serde_json::to_string(&text).unwrap_or_default(),
                "byte {byte:#04x}"
            );
        }
    }

    proptest! {
        #[test]
        fn strings_are_escaped_as_serde_json_escapes_them(text in any::<String>()) {
            prop_assert_eq!(escaped(&text), serde_json::to_string(&text).unwrap_or_default());
        }

        #[test]
        fn integers_print_as_display_prints_them(n in any::<i64>()) {
            let mut out = Vec::new();
            push_i64(&mut out, n);
            prop_assert_eq!(out, n.to_string().into_bytes());
        }

        #[test]
        fn timestamps_print_as_chrono_prints_them(
            seconds in -80_000_000_000i64..300_000_000_000i64,
            nanos in 0u32..2_000_000_000u32,
        ) {
            let Some(t) = DateTime::<Utc>::from_timestamp(seconds, nanos) else {
                return Ok(());
            };
            let mut out = Vec::new();
            push_zoned_timestamp(&mut out, t);
            prop_assert_eq!(
                String::from_utf8(out).unwrap_or_default(),
                t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
            );
        }
    }

    #[test]
    fn uuids_print_hyphenated_in_lower_case() {
        let id = uuid::Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        let mut out = Vec::new();
        push_uuid(&mut out, &id);
        assert_eq!(out, id.to_string().into_bytes());
    }
}
