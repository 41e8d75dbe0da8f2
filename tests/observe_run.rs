//! `run` observed from outside, on the real services: `/metrics` scraped
//! during and after a drain (polling and replication) counts what the run
//! did, and `/readyz` turns 503 naming MongoDB while it cannot be reached
//! (a blackhole through the fault proxy), and 200 again after, with nothing
//! lost.

mod common;

use activity_event_history::{generate, HistoryOptions};
use activity_event_processor::projection::fold::ReferenceFold;
use common::faults::spawn_run;
use common::kafka;
use common::observe::{events_with as events, scrape, served_at};
use common::pipeline::Stage;
use common::proxy::{socket_addr, Mode, Proxy};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(300);
/// `/readyz` must show a cause within this long.
const READINESS: Duration = Duration::from_secs(60);

/// GET `path`: the status and the body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let (status, _, body) = common::observe::request(addr, path).await;
    (status, body)
}

/// Drains a generated outbox with `args`, scraping during and after.
async fn a_drain_is_counted(seed: u64, args: &[&str]) {
    let stage = Stage::new().await;
    let _slots = kafka::Slots(stage.pg.config.clone());
    let history = generate(seed, &HistoryOptions::realistic(2_000));
    stage.load(&history).await;
    let log = stage.log_path().with_extension("observe.log");
    let mut run = spawn_run(&stage, args, &[], &log);
    let addr = served_at(&log, &mut run).await;
    assert!(addr.ip().is_loopback(), "{addr}");
    // During the drain: the text parses, whatever the counts are yet.
    let during = scrape(addr).await;
    assert!(events(&during, "applied") <= history.len() as u64);
    stage.wait_converged(&history, LIMIT).await;
    let expected = ReferenceFold::of(&history).read_models();
    let total = history.len() as u64;
    let start = Instant::now();
    let after = loop {
        let samples = scrape(addr).await;
        let done = events(&samples, "applied")
            + events(&samples, "dead_lettered")
            + events(&samples, "unknown_type");
        if done == total || start.elapsed() > LIMIT {
            break samples;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let applied = events(&after, "applied");
    let dead = events(&after, "dead_lettered");
    let unknown = events(&after, "unknown_type");
    assert_eq!(
        applied + dead + unknown,
        total,
        "applied {applied} + dead-lettered {dead} + unknown {unknown}"
    );
    assert_eq!(dead, expected.dead_letters.len() as u64, "dead letters");
    assert_eq!(
        events(&after, "duplicate"),
        0,
        "a clean drain fences nothing"
    );
    assert_eq!(
        after["event_processor_commit_to_durable_seconds_count"] as u64, applied,
        "one latency per applied event"
    );
    assert!(after["event_processor_batches_total"] >= 1.0);
    assert!(after["event_processor_mongodb_round_trips_total"] >= 1.0);
    assert!(after["event_processor_last_progress_timestamp_seconds"] > 0.0);
    let (status, body) = get(addr, "/healthz").await;
    assert_eq!(status, 200, "{body}");
    drop(run);
    stage.assert_converged(&history, true).await;
    let _ = std::fs::remove_file(log);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_polling_drain_is_counted() {
    a_drain_is_counted(1301, &["--source", "polling"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replication_drain_is_counted() {
    a_drain_is_counted(1302, &["--source", "replication"]).await;
}

/// `/readyz` until its status is `status` (and, when failing, its body
/// names `naming`); how long it took.
async fn wait_ready(addr: SocketAddr, status: u16, naming: &str) -> Duration {
    let start = Instant::now();
    loop {
        let (now, body) = get(addr, "/readyz").await;
        if now == status && body.contains(naming) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < READINESS,
            "/readyz not {status} naming {naming} within {READINESS:?}: {now} {body}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_fails_while_mongodb_is_unreachable_and_recovers() {
    let stage = Stage::new().await;
    let history = generate(1303, &HistoryOptions::realistic(1_500));
    let (first, rest) = history.split_at(300);
    stage.load(first).await;
    let mongo = stage.mongo.uri.clone();
    let host_port = mongo
        .strip_prefix("mongodb://")
        .and_then(|rest| rest.split(['/', '?']).next())
        .and_then(|hp| hp.rsplit_once(':'))
        .expect("host:port in the MongoDB URI");
    let proxy = Proxy::start(socket_addr(host_port.0, host_port.1));
    let query = mongo.split_once('?').map(|(_, q)| q).unwrap_or("");
    let uri = format!(
        "mongodb://{}/?directConnection=true&{query}",
        proxy.address()
    );
    let log = stage.log_path().with_extension("readyz.log");
    let mut run = spawn_run(
        &stage,
        &["--source", "polling"],
        &[("MONGODB_URI", uri)],
        &log,
    );
    let addr = served_at(&log, &mut run).await;
    wait_ready(addr, 200, "mongodb").await;
    proxy.set(Mode::Blackhole);
    stage.load(rest).await;
    let failed = wait_ready(addr, 503, "mongodb").await;
    eprintln!("/readyz 503 naming mongodb after {failed:?}");
    proxy.set(Mode::Pass);
    let recovered = wait_ready(addr, 200, "mongodb").await;
    eprintln!("/readyz 200 again after {recovered:?}");
    stage.wait_converged(&history, LIMIT).await;
    drop(run);
    stage.assert_converged(&history, true).await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("recovered"),
        "the outage's end is logged:\n{text}"
    );
    let _ = std::fs::remove_file(log);
}
