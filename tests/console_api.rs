//! The console's HTTP side on the real services: the shape of `GET
//! /api/console` (pinned: the README documents it), the page, Discard, and
//! the guards (a loopback host, `X-Console: 1`, the same origin, the token,
//! nothing served off loopback without one).

mod common;

use activity_event_processor::config::{Config, EnvMap, Secret};
use activity_event_processor::console::access::Access;
use activity_event_processor::console::snapshot::LagKind;
use activity_event_processor::console::{Console, Settings};
use activity_event_processor::observe::{serve, Health, Observed, Outcome, Server};
use activity_event_processor::rebuild::gate::{CONTROL, REBUILD_ID};
use activity_event_processor::store::mongo::DEAD_LETTERS;
use common::console::{http, shape, snapshot};
use common::mongo::TestMongo;
use common::observe::fresh_metrics;
use common::TestDb;
use mongodb::bson::{doc, DateTime, Document};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

struct Served {
    server: Server,
    stop: CancellationToken,
    mongo: TestMongo,
    _pg: TestDb,
}

async fn served(access: impl Fn(std::net::SocketAddr) -> Access) -> Served {
    let pg = TestDb::migrated().await;
    let mongo = TestMongo::create().await;
    let metrics = fresh_metrics();
    let health = Health::new();
    health.set_ok("postgres");
    health.set_failing("mongodb", "ping timed out");
    metrics.events(
        activity_event_processor::config::SourceKind::Polling,
        "UserCreated",
        Outcome::Applied,
        7,
    );
    metrics.polling_backlog(3, None);
    metrics.dead_letters(1, Some(Duration::from_secs(5)));
    let pipeline = Config::from_env(&EnvMap::new())
        .expect("the defaults are valid")
        .pipeline;
    let addr = "127.0.0.1:0".parse().expect("an address");
    let console = Console::new(
        Settings {
            process: "run",
            source: "polling",
            lag: LagKind::Backlog,
            mongodb: Some((Secret::new(mongo.uri.clone()), mongo.name.clone())),
            postgres: pg.config.clone(),
            pipeline,
            access: access(addr),
        },
        metrics,
        health.clone(),
    );
    // After the console's first reading: in its window.
    metrics.commit_to_durable(Duration::from_millis(20));
    let stop = CancellationToken::new();
    let observed = Observed {
        metrics,
        health,
        live_within: Duration::from_secs(60),
        console: Some(console),
    };
    let server = serve(addr, observed, stop.clone())
        .await
        .expect("binds a loopback port");
    Served {
        server,
        stop,
        mongo,
        _pg: pg,
    }
}

fn letter(id: &str) -> Document {
    doc! {
        "_id": id,
        "sequence_id": 12_i64,
        "aggregate_type": "user",
        "aggregate_id": "u-1",
        "event_type": "UserRenamed",
        "payload": { "name": "x" },
        "error": "no user u-1",
        "attempts": 3_i64,
        "first_failed_at": DateTime::now(),
        "last_failed_at": DateTime::now(),
    }
}

/// Waits until the console's view of MongoDB shows `letters` letters.
async fn wait_letters(served: &Served, letters: usize) -> Value {
    let start = Instant::now();
    loop {
        let snapshot = snapshot(served.server.local_addr).await;
        if snapshot["dead_letters"]["latest"].as_array().map(Vec::len) == Some(letters) {
            return snapshot;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the console does not show {letters} letters: {snapshot}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn the_json_has_a_stable_shape() {
    let served = served(|addr| Access::new(addr, None)).await;
    let db = served.mongo.store.database();
    let id = uuid::Uuid::new_v4().to_string();
    db.collection::<Document>(DEAD_LETTERS)
        .insert_one(letter(&id))
        .await
        .expect("a letter");
    db.collection::<Document>(CONTROL)
        .insert_one(doc! {
            "_id": REBUILD_ID, "state": "building", "phase": "users", "done": 5_i64, "total": 10_i64,
        })
        .await
        .expect("a rebuild");
    let snapshot = wait_letters(&served, 1).await;
    let expected = json!({
        "version": "number",
        "process": "string",
        "source": "string",
        "build": "string",
        "generated_at": "string",
        "state": "string",
        "failing": [{ "name": "string", "state": "string", "reason": "string", "since": "string" }],
        "checks": [{ "name": "string", "state": "string", "reason": "string", "since": "string" }],
        "throughput": {
            "window_seconds": "number",
            "interval_seconds": "number",
            "applied_per_second": "number",
            "dead_lettered_per_second": "number",
            "samples": [{ "at": "string", "applied_per_second": "number", "dead_lettered_per_second": "number" }],
        },
        "latency": { "events": "number", "p50_seconds": "number", "p99_seconds": "number" },
        "lag": { "slot_bytes": "null", "backlog_rows": "number", "consumer": [] },
        "counts": {
            "applied": "number",
            "duplicates": "number",
            "unknown_types": "number",
            "dead_lettered": "number",
            "dead_letters": "number",
            "oldest_dead_letter_age_seconds": "number",
        },
        "dead_letters": {
            "available": "bool",
            "error": "null",
            "latest": [{
                "id": "string",
                "event_type": "string",
                "aggregate_type": "string",
                "aggregate_id": "string",
                "error": "string",
                "attempts": "number",
                "first_failed_at": "string",
                "last_failed_at": "string",
            }],
        },
        "rebuild": { "state": "string", "phase": "string", "done": "number", "total": "number" },
    });
    assert_eq!(
        shape(&snapshot),
        expected,
        "the shape changed: {snapshot:#}"
    );
    assert_eq!(snapshot["version"], 1);
    assert_eq!(snapshot["state"], "rebuilding");
    assert_eq!(snapshot["failing"][0]["name"], "mongodb");
    assert_eq!(snapshot["counts"]["applied"], 7);
    assert_eq!(snapshot["lag"]["backlog_rows"], 3);
    assert_eq!(snapshot["latency"]["events"], 1);
    let p50 = snapshot["latency"]["p50_seconds"]
        .as_f64()
        .unwrap_or_default();
    assert!(p50 > 0.01 && p50 <= 0.025, "{p50}");
    assert_eq!(snapshot["dead_letters"]["latest"][0]["id"], id.as_str());
    assert_eq!(snapshot["rebuild"]["done"], 5);

    // Without a rebuild, a failing check is "degraded".
    db.collection::<Document>(CONTROL)
        .update_one(
            doc! { "_id": REBUILD_ID },
            doc! { "$set": { "state": "done" } },
        )
        .await
        .expect("done");
    let start = Instant::now();
    while snapshot_of(&served).await["state"] != "degraded" {
        assert!(start.elapsed() < Duration::from_secs(30), "not degraded");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    served.stop.cancel();
    served.mongo.drop().await;
}

async fn snapshot_of(served: &Served) -> Value {
    snapshot(served.server.local_addr).await
}

#[tokio::test]
async fn the_page_is_served_whole_and_discard_moves_a_letter() {
    let served = served(|addr| Access::new(addr, None)).await;
    let addr = served.server.local_addr;
    let (status, head, page) = http(addr, "GET", "/", &[], "").await;
    assert_eq!(status, 200, "{page}");
    assert!(head
        .to_ascii_lowercase()
        .contains("content-type: text/html"));
    assert!(page.contains("window.__consoleErrors"));
    assert!(
        !page.contains("src=\"http"),
        "nothing is fetched from elsewhere"
    );

    let id = uuid::Uuid::new_v4().to_string();
    served
        .mongo
        .store
        .database()
        .collection::<Document>(DEAD_LETTERS)
        .insert_one(letter(&id))
        .await
        .expect("a letter");
    wait_letters(&served, 1).await;
    let path = format!("/api/dead-letters/{id}/discard");
    let json = ("Content-Type", "application/json");
    let change = ("X-Console", "1");
    // A reason is required.
    let (status, _, body) = http(addr, "POST", &path, &[json, change], r#"{"reason":" "}"#).await;
    assert_eq!(status, 400, "{body}");
    let (status, _, body) = http(
        addr,
        "POST",
        &path,
        &[json, change, ("Origin", &format!("http://{addr}"))],
        r#"{"reason":"a test letter"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let done: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(done["outcome"], "discarded", "{done}");
    wait_letters(&served, 0).await;
    let audited = served
        .mongo
        .store
        .find("dead_letters_audit", doc! { "_id": &id }, None)
        .await
        .expect("the audit");
    assert_eq!(audited.len(), 1, "{audited:?}");
    let (status, _, _) = http(
        addr,
        "POST",
        &path,
        &[json, change],
        r#"{"reason":"again"}"#,
    )
    .await;
    assert_eq!(status, 404, "gone");
    served.stop.cancel();
    served.mongo.drop().await;
}

#[tokio::test]
async fn cross_site_requests_are_refused() {
    let served = served(|addr| Access::new(addr, None)).await;
    let addr = served.server.local_addr;
    let id = uuid::Uuid::new_v4();
    let path = format!("/api/dead-letters/{id}/retry");
    let json = ("Content-Type", "application/json");
    // A form of another site: no X-Console header.
    let (status, _, body) = http(addr, "POST", &path, &[json], "{}").await;
    assert_eq!(status, 403, "{body}");
    let evil = ("Origin", "http://evil.example");
    let (status, _, body) =
        http(addr, "POST", &path, &[json, ("X-Console", "1"), evil], "{}").await;
    assert_eq!(status, 403, "{body}");
    // A page of another site whose name was rebound to this host.
    let rebound = ("Host", "evil.example:9464");
    for path in ["/", "/api/console"] {
        let (status, _, body) = http(addr, "GET", path, &[rebound], "").await;
        assert_eq!(status, 403, "{path}: {body}");
    }
    // The metrics stay as they are.
    let (status, _, _) = http(addr, "GET", "/metrics", &[rebound], "").await;
    assert_eq!(status, 200);
    served.stop.cancel();
    served.mongo.drop().await;
}

#[tokio::test]
async fn off_loopback_the_token_is_required() {
    let everywhere: std::net::SocketAddr = "0.0.0.0:9464".parse().expect("an address");
    // No token: not served, and the page says why.
    let refused = served(|_| Access::new(everywhere, None)).await;
    let addr = refused.server.local_addr;
    let (status, _, page) = http(addr, "GET", "/", &[], "").await;
    assert_eq!(status, 403);
    assert!(page.contains("CONSOLE_TOKEN"), "{page}");
    let (status, _, _) = http(addr, "GET", "/api/console", &[], "").await;
    assert_eq!(status, 403);
    let (status, _, _) = http(addr, "GET", "/readyz", &[], "").await;
    assert_eq!(status, 503, "/readyz is served (and says mongodb fails)");
    refused.stop.cancel();
    refused.mongo.drop().await;

    let token = "console-token-3f9a";
    let served = served(|_| Access::new(everywhere, Some(&Secret::new(token)))).await;
    let addr = served.server.local_addr;
    let (status, _, page) = http(addr, "GET", "/", &[], "").await;
    assert_eq!(status, 401);
    assert!(!page.contains(token));
    let wrong = ("Authorization", "Bearer nope");
    let (status, _, _) = http(addr, "GET", "/api/console", &[wrong], "").await;
    assert_eq!(status, 401);
    let bearer = format!("Bearer {token}");
    let (status, _, _) = http(
        addr,
        "GET",
        "/api/console",
        &[("Authorization", &bearer)],
        "",
    )
    .await;
    assert_eq!(status, 200);
    // `/?token=` once: a cookie (not the token itself), then the page.
    let (status, head, _) = http(addr, "GET", &format!("/?token={token}"), &[], "").await;
    assert_eq!(status, 303, "{head}");
    assert!(!head.contains(token), "{head}");
    let cookie = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("set-cookie")
                .then(|| value.trim())
        })
        .and_then(|v| v.split(';').next())
        .expect("a cookie")
        .to_string();
    let (status, _, page) = http(addr, "GET", "/", &[("Cookie", &cookie)], "").await;
    assert_eq!(status, 200);
    assert!(!page.contains(token));
    served.stop.cancel();
    served.mongo.drop().await;
}
