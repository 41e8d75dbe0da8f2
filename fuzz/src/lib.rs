//! Helpers shared by the fuzz targets under `fuzz_targets/`.

use activity_event_processor::decode::OutboxEvent;
use chrono::{DateTime, Datelike, SecondsFormat, Utc};
use serde_json::Value;

/// Whether two JSON values are the same, numbers compared by value: serde_json
/// reads a float to within an ulp or two, so `parse(print(x))` may differ from `x`
/// in the last digit.
pub fn json_close(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            if x.is_f64() || y.is_f64() {
                match (x.as_f64(), y.as_f64()) {
                    (Some(x), Some(y)) => x == y || (x - y).abs() <= 1e-12 * x.abs().max(y.abs()),
                    _ => false,
                }
            } else {
                x == y
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_close(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(key, x)| y.get(key).is_some_and(|y| json_close(x, y)))
        }
        _ => a == b,
    }
}

/// Panics unless `got` is `want`, the payload compared with [`json_close`].
pub fn assert_same_event(want: &OutboxEvent, got: &OutboxEvent, context: &str) {
    let same = want.event_id == got.event_id
        && want.sequence_id == got.sequence_id
        && want.aggregate_id == got.aggregate_id
        && want.aggregate_type == got.aggregate_type
        && want.event_type == got.event_type
        && want.created_at == got.created_at
        && json_close(&want.payload.to_json(), &got.payload.to_json());
    assert!(
        same,
        "{context}: round trip changed the event\nwant {want:?}\n got {got:?}"
    );
}

/// Whether RFC 3339 and PostgreSQL's four-digit years can write `t`.
pub fn four_digit_year(t: &DateTime<Utc>) -> bool {
    (0..=9999).contains(&t.year())
}

/// `t` as RFC 3339 in UTC (`2026-09-15T09:41:07.509871Z`), if its year has four digits.
pub fn rfc3339(t: &DateTime<Utc>) -> Option<String> {
    four_digit_year(t).then(|| t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
}

/// `t` as PostgreSQL prints a `timestamptz` in UTC (`2026-11-25 10:52:19.123456+00`),
/// if its year has four digits.
pub fn postgres_text(t: &DateTime<Utc>) -> Option<String> {
    four_digit_year(t).then(|| t.format("%Y-%m-%d %H:%M:%S%.f+00").to_string())
}
