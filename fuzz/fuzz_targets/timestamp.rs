//! The `created_at` parsers, on arbitrary text and epoch integers.
//!
//! Properties: no panic; the byte-by-byte fast path agrees with a plain chrono
//! parse of the same text and with `parse_postgres`; what parses, printed again
//! the way PostgreSQL (in UTC and in another offset) or Debezium print it, parses
//! to the same instant, through the fast path where PostgreSQL printed it; a
//! header that is an integer is that epoch value; epoch conversions invert.

#![no_main]

use activity_event_processor::decode::timestamp::{
    from_epoch, parse_header, parse_postgres, parse_postgres_fast, parse_rfc3339, EpochUnit,
};
use activity_event_processor_fuzz::{four_digit_year, postgres_text, rfc3339};
use chrono::{DateTime, FixedOffset, NaiveDateTime, TimeZone, Timelike, Utc};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    epochs(data);
    let text = String::from_utf8_lossy(data);
    let trimmed = text.trim();

    let fast = parse_postgres_fast(trimmed);
    let general = parse_postgres(&text);
    if let Some(t) = fast {
        assert_eq!(
            general,
            Some(t),
            "parse_postgres disagrees with its fast path"
        );
        assert_eq!(
            reference(trimmed),
            Some(t),
            "the fast path disagrees with chrono"
        );
    }
    if let Some(t) = general {
        reprint(&t, data);
    }
    if let Some(t) = parse_rfc3339(&text) {
        assert_eq!(
            parse_postgres(&text),
            Some(t),
            "parse_postgres refuses RFC 3339"
        );
        reprint(&t, data);
    }
    let header = parse_header(&text);
    match trimmed.parse::<i64>() {
        Ok(n) => assert_eq!(header, from_epoch(n, EpochUnit::guess(n))),
        Err(_) => assert_eq!(
            header, general,
            "a header that is no integer is parsed as text"
        ),
    }
});

/// PostgreSQL's `YYYY-MM-DD HH:MM:SS[.f]±HH[:MM[:SS]]` read with chrono's own parser.
fn reference(text: &str) -> Option<DateTime<Utc>> {
    let sign = text.get(19..)?.find(['+', '-'])? + 19;
    let (local, offset) = text.split_at(sign);
    let local = local.replacen('T', " ", 1);
    let naive = NaiveDateTime::parse_from_str(&local, "%Y-%m-%d %H:%M:%S%.f").ok()?;
    let negative = offset.starts_with('-');
    let fields: Vec<&str> = offset[1..].split(':').collect();
    if fields.is_empty()
        || fields.len() > 3
        || fields
            .iter()
            .any(|f| f.len() != 2 || !f.bytes().all(|b| b.is_ascii_digit()))
    {
        return None;
    }
    let seconds = fields
        .iter()
        .zip([3600, 60, 1])
        .map(|(f, scale)| f.parse::<i32>().unwrap_or(0) * scale)
        .sum::<i32>();
    let offset = FixedOffset::east_opt(if negative { -seconds } else { seconds })?;
    offset
        .from_local_datetime(&naive)
        .single()
        .map(|t| t.with_timezone(&Utc))
}

/// `t` printed as PostgreSQL and Debezium print it parses back to `t`.
fn reprint(t: &DateTime<Utc>, data: &[u8]) {
    // chrono reads a second 60 as a leap second; PostgreSQL never prints one.
    if t.nanosecond() >= 1_000_000_000 {
        return;
    }
    if let Some(text) = postgres_text(t) {
        assert_eq!(
            parse_postgres_fast(&text),
            Some(*t),
            "fast path refuses {text}"
        );
        assert_eq!(parse_postgres(&text), Some(*t), "{text}");
    }
    if let Some(text) = rfc3339(t) {
        assert_eq!(parse_rfc3339(&text), Some(*t), "{text}");
        assert_eq!(parse_postgres(&text), Some(*t), "{text}");
    }
    // The same instant in a zone east or west of UTC, in whole minutes as PostgreSQL has them.
    let minutes = data
        .iter()
        .fold(0i32, |acc, &b| (acc * 31 + i32::from(b)) % 1801)
        - 900;
    if let Some(offset) = FixedOffset::east_opt(minutes * 60) {
        let local = t.with_timezone(&offset);
        if four_digit_year(&local.naive_local().and_utc()) {
            let text = local.format("%Y-%m-%d %H:%M:%S%.f%:z").to_string();
            assert_eq!(
                parse_postgres_fast(&text),
                Some(*t),
                "fast path refuses {text}"
            );
        }
    }
}

/// Epoch integers from the first eight bytes.
fn epochs(data: &[u8]) {
    let Some(bytes) = data.get(..8) else { return };
    let n = i64::from_le_bytes(bytes.try_into().expect("eight bytes"));
    if let Some(t) = from_epoch(n, EpochUnit::Millis) {
        assert_eq!(t.timestamp_millis(), n);
    }
    if let Some(t) = from_epoch(n, EpochUnit::Micros) {
        assert_eq!(t.timestamp_micros(), n);
    }
    let t = from_epoch(n, EpochUnit::Nanos).expect("every i64 is an instant in nanoseconds");
    assert_eq!(t.timestamp_nanos_opt(), Some(n));
    let expected = match n.unsigned_abs() {
        m if m < 100_000_000_000_000 => EpochUnit::Millis,
        m if m < 100_000_000_000_000_000 => EpochUnit::Micros,
        _ => EpochUnit::Nanos,
    };
    assert_eq!(EpochUnit::guess(n), expected);
}
