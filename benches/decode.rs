//! Decode throughput, one core: each kind of message decoded N times.
//!
//! ```text
//! cargo bench --bench decode            # N = 200000 per kind
//! DECODE_BENCH_N=1000000 cargo bench --bench decode
//! ```
//!
//! A plain `harness = false` program: prints messages/s and MB/s per kind.

use activity_event_processor::decode::{
    decode_message, decode_text_row, DecodeOptions, Decoded, MessageFormat, RawMessage,
};
use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

type Headers = Vec<(String, Option<Vec<u8>>)>;

struct Case {
    name: &'static str,
    topic: &'static str,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Headers,
    format: MessageFormat,
}

fn fixture(relative: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/debezium")
        .join(relative);
    std::fs::read(&path).unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()))
}

fn router_headers() -> Headers {
    [
        ("__debezium.context.connectorLogicalName", "postgres"),
        ("__debezium.context.taskId", "0"),
        ("__debezium.context.connectorName", "postgresql"),
        (
            "__debezium.context.runId",
            "3f6d2a9e-8b41-4c7a-9e05-b2d8c4f1a7e6",
        ),
        ("id", "0192f4b7-1c3d-7e4f-9a50-3b6c7d8e9f10"),
        ("eventType", "UserCreated"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), Some(v.as_bytes().to_vec())))
    .collect()
}

fn cases() -> Vec<Case> {
    let cdc = |name, file: &str| Case {
        name,
        topic: "postgres.activity.event_outbox",
        key: None,
        value: Some(fixture(file)),
        headers: Vec::new(),
        format: MessageFormat::Auto,
    };
    let router = |name, dir: &str| Case {
        name,
        topic: "outbox.event.User",
        key: Some(fixture(&format!("{dir}/user_created.key.json"))),
        value: Some(fixture(&format!("{dir}/user_created.value.json"))),
        headers: router_headers(),
        format: MessageFormat::Auto,
    };
    vec![
        cdc(
            "cdc insert, schemas disabled",
            "cdc/schemas-disabled/insert_user_created.value.json",
        ),
        cdc(
            "cdc insert, schemas enabled",
            "cdc/schemas-enabled/insert_user_created.value.json",
        ),
        Case {
            format: MessageFormat::Cdc,
            ..cdc(
                "cdc insert (ActivityCreated), format=cdc",
                "cdc/schemas-disabled/insert_activity_created.value.json",
            )
        },
        cdc(
            "cdc update (skip)",
            "cdc/schemas-disabled/update_status_identity_full.value.json",
        ),
        Case {
            value: None,
            ..cdc(
                "tombstone (skip)",
                "cdc/schemas-disabled/delete_tombstone.key.json",
            )
        },
        cdc(
            "heartbeat (skip)",
            "heartbeat/schemas-enabled/heartbeat.value.json",
        ),
        cdc(
            "transaction end (skip)",
            "transaction/schemas-disabled/tx7803_end.value.json",
        ),
        router(
            "event router, schemas disabled",
            "outbox/default/schemas-disabled",
        ),
        router(
            "event router, schemas enabled",
            "outbox/default/schemas-enabled",
        ),
        router(
            "event router, expanded, schemas enabled",
            "outbox/expand-json/schemas-enabled",
        ),
        cdc(
            "malformed (payload not json)",
            "malformed/schemas-disabled/payload_not_json.value.json",
        ),
    ]
}

fn report(name: &str, n: u64, bytes_per_message: usize, elapsed: Duration) {
    let secs = elapsed.as_secs_f64().max(f64::EPSILON);
    let rate = n as f64 / secs;
    let mb = rate * bytes_per_message as f64 / 1e6;
    println!(
        "{name:<45} {rate:>12.0} messages/s {mb:>8.1} MB/s {:>8.2} µs/message",
        1e6 / rate
    );
}

fn main() {
    // `cargo bench` passes --bench; under `cargo test --all-targets` this runs as
    // a quick smoke test of every case instead.
    let benchmarking = std::env::args().any(|a| a == "--bench");
    let n: u64 = std::env::var("DECODE_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if benchmarking { 200_000 } else { 100 });
    println!("decode, {n} messages per kind, one thread");
    for case in cases() {
        let options = DecodeOptions {
            format: case.format,
            ..DecodeOptions::default()
        };
        let msg = RawMessage {
            topic: Some(case.topic),
            key: case.key.as_deref(),
            value: case.value.as_deref(),
            headers: &case.headers,
        };
        // Warm up, and make sure the case decodes as intended.
        let outcome = match decode_message(&msg, &options) {
            Ok(Decoded::Event(_)) => "event",
            Ok(Decoded::Skip(reason)) => reason.as_str(),
            Err(_) => "error",
        };
        for _ in 0..n / 10 {
            let _ = black_box(decode_message(black_box(&msg), &options));
        }
        let start = Instant::now();
        for _ in 0..n {
            let _ = black_box(decode_message(black_box(&msg), &options));
        }
        let size = case.value.as_ref().map_or(0, Vec::len);
        report(
            &format!("{} [{outcome}]", case.name),
            n,
            size,
            start.elapsed(),
        );
    }

    let columns: [(&str, Option<&str>); 12] = [
        ("event_id", Some("0192f4b7-1c3d-7e4f-9a50-3b6c7d8e9f10")),
        ("sequence_id", Some("104")),
        ("aggregate_id", Some("7d3c9a52-1e4f-4b8a-9c61-2f5e8d7a4b10")),
        ("aggregate_type", Some("User")),
        ("event_type", Some("UserCreated")),
        (
            "payload",
            Some(
                r#"{"email": "alice.martin@example.com", "roles": ["member"], "locale": "en-GB", "userId": "7d3c9a52-1e4f-4b8a-9c61-2f5e8d7a4b10", "timezone": "Europe/London", "displayName": "Alice Martin", "registeredAt": "2026-09-15T09:41:07.497Z", "marketingOptIn": false}"#,
            ),
        ),
        ("status", Some("pending")),
        ("retry_count", Some("0")),
        ("last_error", None),
        ("lock_id", None),
        ("created_at", Some("2026-09-15 09:41:07.509871+00")),
        ("published_at", None),
    ];
    let start = Instant::now();
    for _ in 0..n {
        let _ = black_box(decode_text_row(black_box(&columns)));
    }
    let size = columns.iter().map(|(_, v)| v.map_or(0, str::len)).sum();
    report("text row (pgoutput / polling)", n, size, start.elapsed());
}
