//! Helpers of the observability tests: a server on a loopback port, a plain
//! HTTP GET, a strict reading of the Prometheus text format, waits on health
//! checks, slots of their own.

#![allow(dead_code)]

use activity_event_processor::observe::samplers::Sampling;
use activity_event_processor::observe::{serve, Health, Metrics, Observed, Server};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::types::PgLsn;
use tokio_util::sync::CancellationToken;

/// The longest any single wait may take.
pub const PATIENCE: Duration = Duration::from_secs(60);

pub fn fresh_metrics() -> &'static Metrics {
    Box::leak(Box::new(Metrics::new()))
}

/// Quick sampling, so that each test takes seconds.
pub fn quick() -> Sampling {
    Sampling {
        interval: Duration::from_millis(200),
        timeout: Duration::from_secs(2),
        stall_after: Duration::from_secs(2),
    }
}

pub async fn start_server(
    metrics: &'static Metrics,
    health: Health,
) -> (Server, CancellationToken) {
    let shutdown = CancellationToken::new();
    let server = serve(
        "127.0.0.1:0".parse().expect("an address"),
        Observed {
            metrics,
            health,
            live_within: Duration::from_millis(500),
            console: None,
        },
        shutdown.clone(),
    )
    .await
    .expect("the server binds a loopback port");
    (server, shutdown)
}

/// GET `path`: the status code and the body.
pub async fn get(server: &Server, path: &str) -> (u16, String) {
    let (status, head, body) = request(server.local_addr, path).await;
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "bodies are sent whole: {head}"
    );
    (status, body)
}

/// GET `path` from `addr`: the status code, the head and the body.
pub async fn request(addr: std::net::SocketAddr, path: &str) -> (u16, String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the metrics server");
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send the request");
    let mut response = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut response))
        .await
        .expect("the server answers in time")
        .expect("read the response");
    let response = String::from_utf8(response).expect("an UTF-8 response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("a response has a head and a body");
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("a status line");
    (status, head.to_string(), body.to_string())
}

/// Parses the Prometheus text format (0.0.4) strictly enough to catch a
/// malformed line: every sample's name was declared by a `# TYPE` line
/// (histograms: with `_bucket`, `_sum`, `_count`), labels are `name="value"`
/// pairs, values are numbers. Returns each sample (`name{labels}`) with its value.
pub fn parse_exposition(text: &str) -> BTreeMap<String, f64> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix("# ") {
            let mut parts = comment.splitn(3, ' ');
            let (kind, name, rest) = (parts.next(), parts.next(), parts.next());
            match (kind, name, rest) {
                (Some("HELP"), Some(_), Some(help)) => assert!(!help.is_empty(), "{line}"),
                (Some("TYPE"), Some(name), Some(kind)) => {
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                        "{line}"
                    );
                    assert!(
                        types.insert(name.to_string(), kind.to_string()).is_none(),
                        "declared twice: {line}"
                    );
                }
                _ => panic!("a comment that is neither HELP nor TYPE: {line}"),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            number => number
                .parse()
                .unwrap_or_else(|_| panic!("not a number: {line}")),
        };
        let name = match series.split_once('{') {
            Some((name, labels)) => {
                let labels = labels.strip_suffix('}').expect("labels end with }");
                for pair in split_labels(labels) {
                    let (key, quoted) = pair.split_once('=').expect("label=value");
                    assert!(
                        key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                        "{line}"
                    );
                    assert!(
                        quoted.len() >= 2 && quoted.starts_with('"') && quoted.ends_with('"'),
                        "{line}"
                    );
                }
                name
            }
            None => series,
        };
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{line}"
        );
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                let base = name.strip_suffix(suffix)?;
                (types.get(base).map(String::as_str) == Some("histogram")).then_some(base)
            })
            .unwrap_or(name);
        assert!(types.contains_key(family), "no TYPE for {name}: {line}");
        assert!(
            samples.insert(series.to_string(), value).is_none(),
            "a sample twice: {line}"
        );
    }
    samples
}

/// `a="x",b="y,z"` into its pairs (commas inside quotes stay).
pub fn split_labels(labels: &str) -> Vec<&str> {
    let (mut pairs, mut start, mut quoted, mut escaped) = (Vec::new(), 0, false, false);
    for (i, c) in labels.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                pairs.push(&labels[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < labels.len() {
        pairs.push(&labels[start..]);
    }
    pairs
}

/// Waits until `health`'s check `name` is in `state` (`ok`/`failing`);
/// returns how long it took.
pub async fn wait_check(health: &Health, name: &str, state: &str) -> Duration {
    let start = Instant::now();
    loop {
        let readiness = health.readiness();
        if readiness
            .checks
            .iter()
            .any(|check| check.name == name && check.state == state)
        {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < PATIENCE,
            "check {name} not {state} after {PATIENCE:?}: {readiness:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn sample(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    *samples
        .get(series)
        .unwrap_or_else(|| panic!("no sample {series} in {samples:#?}"))
}

pub async fn current_lsn(client: &tokio_postgres::Client) -> u64 {
    let lsn: PgLsn = client
        .query_one("SELECT pg_current_wal_lsn()", &[])
        .await
        .expect("read the WAL position")
        .get(0);
    u64::from(lsn)
}

pub async fn create_slot(client: &tokio_postgres::Client, slot: &str) {
    client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .expect("create the slot");
}

pub async fn drop_slot(client: &tokio_postgres::Client, slot: &str) {
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .expect("drop the slot");
}

pub fn slot_name() -> String {
    format!(
        "aep_test_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// The address a process given `METRICS_ADDR=127.0.0.1:0` logged that it
/// serves on (at info, in `log`); panics if the process ends first.
pub async fn served_at(
    log: &std::path::Path,
    process: &mut super::kafka::Proc,
) -> std::net::SocketAddr {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let found = text
            .lines()
            .filter(|line| line.contains("serving /metrics"))
            .find_map(|line| line.split("address=").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|addr| addr.parse().ok());
        if let Some(addr) = found {
            return addr;
        }
        assert!(
            process.0.try_wait().expect("wait").is_none(),
            "the process ended:\n{text}"
        );
        assert!(start.elapsed() < PATIENCE, "no address logged:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `/readyz` of a process: its status and its JSON body.
pub async fn readyz(addr: std::net::SocketAddr) -> (u16, serde_json::Value) {
    let (status, _, body) = request(addr, "/readyz").await;
    let json = serde_json::from_str(&body)
        .unwrap_or_else(|err| panic!("/readyz is not JSON ({err}): {body}"));
    (status, json)
}

/// The checks of a `/readyz` body that fail, with their reasons.
pub fn failing(ready: &serde_json::Value) -> Vec<(String, String)> {
    ready["checks"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|check| check["state"] == "failing")
        .map(|check| {
            (
                check["name"].as_str().unwrap_or_default().to_string(),
                check["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Waits until `/readyz` answers 503 with one of `names` failing in its
/// JSON, within `limit`; how long it took, and that check's reason.
pub async fn wait_unready(
    addr: std::net::SocketAddr,
    names: &[&str],
    limit: Duration,
) -> (Duration, String, String) {
    let start = Instant::now();
    loop {
        let (status, ready) = readyz(addr).await;
        let found = failing(&ready)
            .into_iter()
            .find(|(name, _)| names.contains(&name.as_str()));
        match found {
            Some((name, reason)) if status == 503 => return (start.elapsed(), name, reason),
            _ => {}
        }
        assert!(
            start.elapsed() < limit,
            "/readyz not 503 naming one of {names:?} within {limit:?}: {status} {ready}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until `/readyz` answers 200 (every check ok), within `limit`; how
/// long it took.
pub async fn wait_ready(addr: std::net::SocketAddr, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let (status, ready) = readyz(addr).await;
        if status == 200 {
            assert_eq!(ready["ready"], true, "{ready}");
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "/readyz not 200 within {limit:?}: {status} {ready}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The sum of the samples of `name` whose labels satisfy `labels`.
pub fn sum_of(samples: &BTreeMap<String, f64>, name: &str, labels: impl Fn(&str) -> bool) -> f64 {
    samples
        .iter()
        .filter_map(|(series, value)| {
            let rest = series.strip_prefix(name)?;
            let inner = rest.strip_prefix('{')?.strip_suffix('}')?;
            labels(inner).then_some(*value)
        })
        .sum()
}

/// One scrape of `/metrics`, parsed.
pub async fn scrape(addr: std::net::SocketAddr) -> BTreeMap<String, f64> {
    let (status, _, body) = request(addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    parse_exposition(&body)
}

/// The sum of the `event_processor_events_total` samples with `outcome`.
pub fn events_with(samples: &BTreeMap<String, f64>, outcome: &str) -> u64 {
    samples
        .iter()
        .filter(|(series, _)| {
            series.starts_with("event_processor_events_total{")
                && series.contains(&format!("outcome=\"{outcome}\""))
        })
        .map(|(_, value)| *value as u64)
        .sum()
}
