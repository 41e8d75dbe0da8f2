//! `created_at` in the forms its carriers write it.
//!
//! * Debezium's `io.debezium.time.ZonedTimestamp`: RFC 3339 in UTC with a `Z`, six
//!   fraction digits since 2.2 (variable before), e.g. `2026-09-15T09:41:07.509871Z`.
//! * Epoch integers: `io.debezium.time.Timestamp` / Connect `Timestamp` (milliseconds),
//!   `io.debezium.time.MicroTimestamp` (microseconds), `io.debezium.time.NanoTimestamp`.
//! * PostgreSQL's text output of `timestamptz` (DateStyle ISO), e.g.
//!   `2026-11-25 10:52:19.123456+00`, `2026-11-25 16:22:19+05:30`.

use chrono::{DateTime, FixedOffset, NaiveDateTime, TimeZone, Utc};

/// The unit of an epoch integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpochUnit {
    Millis,
    Micros,
    Nanos,
}

impl EpochUnit {
    /// The unit a Connect/Debezium logical type name implies, if it is a timestamp type.
    pub fn from_schema_name(name: &str) -> Option<Self> {
        match name {
            "io.debezium.time.Timestamp" | "org.apache.kafka.connect.data.Timestamp" => {
                Some(Self::Millis)
            }
            "io.debezium.time.MicroTimestamp" => Some(Self::Micros),
            "io.debezium.time.NanoTimestamp" => Some(Self::Nanos),
            _ => None,
        }
    }

    /// The unit an epoch integer most likely has, when nothing says it: any instant
    /// after 1973 in microseconds exceeds every millisecond value before the year 5138.
    pub fn guess(value: i64) -> Self {
        match value.unsigned_abs() {
            0..=99_999_999_999_999 => Self::Millis,
            100_000_000_000_000..=99_999_999_999_999_999 => Self::Micros,
            _ => Self::Nanos,
        }
    }
}

/// An epoch integer as an instant; `None` if it is out of chrono's range.
pub fn from_epoch(value: i64, unit: EpochUnit) -> Option<DateTime<Utc>> {
    match unit {
        EpochUnit::Millis => DateTime::from_timestamp_millis(value),
        EpochUnit::Micros => DateTime::from_timestamp_micros(value),
        EpochUnit::Nanos => Some(DateTime::from_timestamp_nanos(value)),
    }
}

/// RFC 3339 (`2026-09-15T09:41:07.509871Z`, any offset, any fraction width).
pub fn parse_rfc3339(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text.trim())
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// PostgreSQL's `timestamptz` text output in DateStyle ISO, with an offset of `±HH`,
/// `±HH:MM` or `±HH:MM:SS`; also accepts RFC 3339.
pub fn parse_postgres(text: &str) -> Option<DateTime<Utc>> {
    let text = text.trim();
    if let Some(t) = parse_postgres_fast(text) {
        return Some(t);
    }
    if let Some(t) = parse_rfc3339(text) {
        return Some(t);
    }
    // The offset sign is the first `+`/`-` after the time of day starts.
    let time_start = text.find([' ', 'T'])?;
    let sign_at = time_start + text[time_start..].find(['+', '-'])?;
    let (local, offset) = text.split_at(sign_at);
    let naive = NaiveDateTime::parse_from_str(local, "%Y-%m-%d %H:%M:%S%.f")
        .or_else(|_| NaiveDateTime::parse_from_str(local, "%Y-%m-%dT%H:%M:%S%.f"))
        .ok()?;
    let offset = parse_offset(offset)?;
    offset
        .from_local_datetime(&naive)
        .single()
        .map(|t| t.with_timezone(&Utc))
}

/// PostgreSQL's own output, `YYYY-MM-DD HH:MM:SS[.ffffff]±HH[:MM[:SS]]`, read
/// byte by byte: this runs once per captured row, and a format-string parse
/// costs more than the rest of the row. Anything else falls through to the
/// general parsers.
pub fn parse_postgres_fast(text: &str) -> Option<DateTime<Utc>> {
    let b = text.as_bytes();
    if b.len() < 22
        || b[4] != b'-'
        || b[7] != b'-'
        || !(b[10] == b' ' || b[10] == b'T')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<u32> {
        b.get(range)?.iter().try_fold(0u32, |acc, d| {
            d.is_ascii_digit().then(|| acc * 10 + u32::from(d - b'0'))
        })
    };
    let date = chrono::NaiveDate::from_ymd_opt(num(0..4)? as i32, num(5..7)?, num(8..10)?)?;
    let mut at = 19;
    let mut nanos = 0u32;
    if b.get(at) == Some(&b'.') {
        at += 1;
        let start = at;
        while at < b.len() && b[at].is_ascii_digit() {
            at += 1;
        }
        let digits = at - start;
        if digits == 0 || digits > 9 {
            return None;
        }
        nanos = num(start..at)? * 10u32.pow((9 - digits) as u32);
    }
    let naive = date.and_hms_nano_opt(num(11..13)?, num(14..16)?, num(17..19)?, nanos)?;
    let offset = parse_offset(text.get(at..)?)?;
    offset
        .from_local_datetime(&naive)
        .single()
        .map(|t| t.with_timezone(&Utc))
}

/// `+05`, `-08:00`, `+00:01:15` (historical zones print seconds), read byte
/// by byte like the rest of the fast path.
fn parse_offset(text: &str) -> Option<FixedOffset> {
    let b = text.as_bytes();
    let sign = match b.first()? {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let two = |at: usize| -> Option<i32> {
        match (b.get(at)?, b.get(at + 1)?) {
            (high @ b'0'..=b'9', low @ b'0'..=b'9') => {
                Some(i32::from(high - b'0') * 10 + i32::from(low - b'0'))
            }
            _ => None,
        }
    };
    let seconds = match b.len() {
        3 => two(1)? * 3600,
        6 if b[3] == b':' => two(1)? * 3600 + two(4)? * 60,
        9 if b[3] == b':' && b[6] == b':' => two(1)? * 3600 + two(4)? * 60 + two(7)?,
        _ => return None,
    };
    FixedOffset::east_opt(sign * seconds)
}

/// A header value: RFC 3339, PostgreSQL text or an epoch integer (unit guessed).
pub fn parse_header(text: &str) -> Option<DateTime<Utc>> {
    let text = text.trim();
    if let Ok(value) = text.parse::<i64>() {
        return from_epoch(value, EpochUnit::guess(value));
    }
    parse_postgres(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fast_path_agrees_with_the_general_parser() {
        for text in [
            "2026-11-25 10:52:19.123456+00",
            "2026-11-25 10:52:19+05:30",
            "2026-11-25 10:52:19.5-08",
            "1999-12-31 23:59:59.999999+00:00:15",
            "2026-02-28T01:02:03.000001+01",
        ] {
            let fast = parse_postgres_fast(text).expect(text);
            let (local, offset) = text.split_at(text.rfind(['+', '-']).expect("sign"));
            let naive =
                NaiveDateTime::parse_from_str(&local.replace('T', " "), "%Y-%m-%d %H:%M:%S%.f")
                    .expect("naive");
            let slow = parse_offset(offset)
                .and_then(|o| o.from_local_datetime(&naive).single())
                .map(|t| t.with_timezone(&Utc))
                .expect("slow");
            assert_eq!(fast, slow, "{text}");
        }
        for bad in [
            "2026-13-01 00:00:00+00",
            "2026-11-25 10:52:19.+00",
            "2026-11-25 10:52:19",
            "2026-11-25 25:00:00+00",
        ] {
            assert_eq!(parse_postgres_fast(bad), None, "{bad}");
        }
    }

    #[test]
    fn offsets_have_two_digits_per_part_and_one_to_three_parts() {
        for (text, seconds) in [
            ("+00", 0),
            ("+05:30", 19_800),
            ("-08", -28_800),
            ("-03:30", -12_600),
            ("+00:00:15", 15),
            ("-01:02:03", -3_723),
        ] {
            assert_eq!(parse_offset(text), FixedOffset::east_opt(seconds), "{text}");
        }
        for bad in [
            "",
            "+",
            "05",
            "+5",
            "+5:30",
            "+05:",
            "+05:3",
            "+05:30:1",
            "+05:30:15:00",
            "+0a",
            "+05-30",
            "*05",
            "+05:30:",
            "+99",
        ] {
            assert_eq!(parse_offset(bad), None, "{bad}");
        }
    }

    fn utc(text: &str) -> DateTime<Utc> {
        match DateTime::parse_from_rfc3339(text) {
            Ok(t) => t.with_timezone(&Utc),
            Err(err) => panic!("{text}: {err}"),
        }
    }

    #[test]
    fn zoned_timestamps_of_both_debezium_generations() {
        assert_eq!(
            parse_rfc3339("2026-09-15T09:41:07.509871Z"),
            Some(utc("2026-09-15T09:41:07.509871Z"))
        );
        // Before 2.2 the fraction had a variable width.
        assert_eq!(
            parse_rfc3339("2026-09-15T09:41:07Z"),
            Some(utc("2026-09-15T09:41:07Z"))
        );
        assert_eq!(parse_rfc3339("infinity"), None);
    }

    #[test]
    fn postgres_text_output() {
        let cases = [
            (
                "2026-11-25 10:52:19.123456+00",
                "2026-11-25T10:52:19.123456Z",
            ),
            ("2026-11-25 10:52:19+00", "2026-11-25T10:52:19Z"),
            ("2026-11-25 16:22:19.5+05:30", "2026-11-25T10:52:19.5Z"),
            ("2026-11-25 02:52:19-08", "2026-11-25T10:52:19Z"),
            ("1890-01-01 00:01:15+00:01:15", "1890-01-01T00:00:00Z"),
            ("2026-11-25T10:52:19.1Z", "2026-11-25T10:52:19.1Z"),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_postgres(text), Some(utc(expected)), "{text}");
        }
        for bad in [
            "",
            "infinity",
            "2026-11-25",
            "2026-11-25 10:52:19",
            "2026-11-25 10:52:19+5",
            "2026-11-25 10:52:19+05:",
            "2026-13-25 10:52:19+00",
            "2026-11-25 10:52:19+99",
        ] {
            assert_eq!(parse_postgres(bad), None, "{bad}");
        }
    }

    #[test]
    fn epoch_integers() {
        let t = utc("2026-09-15T09:41:07.509871Z");
        assert_eq!(
            from_epoch(1_789_465_267_509_871, EpochUnit::Micros),
            Some(t)
        );
        assert_eq!(EpochUnit::guess(1_789_465_267_509), EpochUnit::Millis);
        assert_eq!(EpochUnit::guess(1_789_465_267_509_871), EpochUnit::Micros);
        assert_eq!(
            EpochUnit::guess(1_789_465_267_509_871_000),
            EpochUnit::Nanos
        );
        assert_eq!(EpochUnit::guess(i64::MIN), EpochUnit::Nanos);
        assert_eq!(from_epoch(i64::MAX, EpochUnit::Millis), None);
        assert_eq!(
            EpochUnit::from_schema_name("io.debezium.time.MicroTimestamp"),
            Some(EpochUnit::Micros)
        );
        assert_eq!(
            parse_header("1789465267509"),
            Some(utc("2026-09-15T09:41:07.509Z"))
        );
    }
}
