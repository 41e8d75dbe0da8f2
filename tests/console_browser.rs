//! The console in headless Chromium (tests/common/webdriver.rs) against a
//! running processor on a private set of services: the page loads without
//! an error, its applied count rises while a history drains, a dead letter
//! shows, its Retry applies it once its cause is fixed, and the state turns
//! to degraded, naming `mongodb`, while MongoDB is frozen (SIGSTOP).
//!
//! Screenshots of the page, healthy and degraded, go to
//! `target/console-screenshots/`; with `CONSOLE_SCREENSHOTS_DIR=docs` they
//! are also copied there (the README shows those).

mod common;

use activity_event_processor::decode::OutboxEvent;
use common::kafka::Proc;
use common::observe::served_at;
use common::pipeline::Stage;
use common::services::OwnServices;
use common::webdriver::Browser;
use mongodb::bson::{doc, Document};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(120);

/// A history without poison, less the creation of one aggregate with a
/// few later events (they dead-letter until it comes, and the page lists
/// them all); the creation has no `sequence_id`, to get a new one.
fn one_missing_creation(seed: u64, events: usize) -> (Vec<OutboxEvent>, Vec<OutboxEvent>) {
    let history = common::letters::clean_history(seed, events);
    let later = |aggregate: uuid::Uuid| {
        history
            .iter()
            .filter(|e| e.aggregate_id == aggregate && !e.event_type.ends_with("Created"))
            .count()
    };
    let chosen = history
        .iter()
        .find(|e| e.event_type.ends_with("Created") && (2..=4).contains(&later(e.aggregate_id)))
        .map(|e| e.event_id)
        .expect("an aggregate with a few events");
    let (mut withheld, kept): (Vec<OutboxEvent>, Vec<OutboxEvent>) =
        history.into_iter().partition(|e| e.event_id == chosen);
    for e in &mut withheld {
        e.sequence_id = None;
    }
    (kept, withheld)
}

/// The events as if committed now (the generated histories' `created_at`
/// lie in the past), so that the page's commit-to-read-model latency is
/// the processor's own.
fn committed_now(events: &[OutboxEvent]) -> Vec<OutboxEvent> {
    let now = chrono::Utc::now();
    events
        .iter()
        .cloned()
        .map(|mut e| {
            e.created_at = Some(now);
            e
        })
        .collect()
}

fn number(text: &str) -> u64 {
    text.replace(',', "").trim().parse().unwrap_or(0)
}

/// Writes the screenshot under target/, and copies it to
/// `CONSOLE_SCREENSHOTS_DIR` when that is set.
async fn screenshot(browser: &Browser, name: &str) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let path = root.join("target/console-screenshots").join(name);
    // The top of the page, whatever a click scrolled to.
    browser.script("window.scrollTo(0, 0); return null;").await;
    browser.screenshot(&path).await;
    if let Ok(dir) = std::env::var("CONSOLE_SCREENSHOTS_DIR") {
        let dir = root.join(dir);
        std::fs::create_dir_all(&dir).expect("the screenshots' folder");
        std::fs::copy(&path, dir.join(name)).expect("copy the screenshot");
    }
}

async fn assert_no_errors(browser: &Browser, when: &str) {
    let errors = browser.errors().await;
    assert!(errors.is_empty(), "{when}: the page reported {errors:?}");
}

/// The status of the outbox row of `event_id`, if there is one.
async fn row_status(stage: &Stage, event_id: &str) -> Option<String> {
    let id: uuid::Uuid = event_id.parse().ok()?;
    let client = stage.pg.client().await;
    client
        .query_opt(
            "SELECT status::text FROM event_outbox WHERE event_id = $1",
            &[&id],
        )
        .await
        .expect("read the outbox")
        .map(|row| row.get(0))
}

async fn wait_until<F, Fut>(what: &str, stage: &Stage, check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(
            start.elapsed() < LIMIT,
            "{what}: not after {LIMIT:?}\n{}",
            stage.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_follows_a_running_processor() {
    let services = OwnServices::up(&["pg", "mongo"]);
    let stage = Stage::on(&services).await;
    let logs = tempfile::tempdir().expect("a folder for the logs");
    // One aggregate's creation is withheld: its events dead-letter.
    let (kept, withheld) = one_missing_creation(1801, 3_000);
    let (first, rest) = kept.split_at(200);
    stage.load(&committed_now(first)).await;
    let env = [
        ("LOG_LEVEL", "info".to_string()),
        ("BATCH_SIZE", "50".to_string()),
    ];
    let mut process = Proc(stage.spawn(&["--source", "polling"], &env));
    let addr = served_at(&stage.log_path(), &mut process).await;
    let browser = Browser::start(&logs.path().join("chromedriver.log")).await;
    browser.open(&format!("http://{addr}/")).await;
    browser
        .wait_text("#state", LIMIT, |state| state == "running")
        .await;
    assert_no_errors(&browser, "loaded").await;

    // The applied count rises while the history drains.
    let mut seen = vec![number(&browser.text("#applied").await)];
    for chunk in rest.chunks(400) {
        stage.load(&committed_now(chunk)).await;
        tokio::time::sleep(Duration::from_millis(1200)).await;
        seen.push(number(&browser.text("#applied").await));
    }
    let mut rising = seen.clone();
    rising.dedup();
    assert!(
        rising.len() >= 3 && rising.windows(2).all(|w| w[0] < w[1]),
        "the applied count did not rise: {seen:?}"
    );

    // A dead letter shows, with its buttons.
    browser
        .wait_text("#dead-letters", LIMIT, |count| number(count) > 0)
        .await;
    let letters = stage
        .mongo
        .store
        .database()
        .collection::<Document>("dead_letters");
    let aggregate = withheld[0].aggregate_id.to_string();
    let earliest = letters
        .find_one(doc! { "aggregate_id": &aggregate })
        .sort(doc! { "sequence_id": 1 })
        .await
        .expect("read the dead letters")
        .expect("a dead letter");
    let id = earliest.get_str("_id").expect("an id").to_string();
    let row = format!("#letters tr[data-id=\"{id}\"]");
    browser
        .wait_text(&row, LIMIT, |text| text.contains("Retry"))
        .await;
    browser
        .wait_text("#applied", LIMIT, |applied| {
            number(applied) + 50 >= (kept.len() as u64).saturating_sub(100)
        })
        .await;
    browser
        .wait_text("#state", LIMIT, |state| state == "running")
        .await;
    // Long enough for a few points of the throughput chart.
    tokio::time::sleep(Duration::from_secs(6)).await;
    screenshot(&browser, "console-healthy.png").await;
    assert_no_errors(&browser, "with a dead letter").await;

    // Its cause fixed (the creation comes), Retry applies it.
    stage.load(&committed_now(&withheld)).await;
    let creation = withheld[0].event_id.to_string();
    wait_until("the creation applied", &stage, || async {
        row_status(&stage, &creation).await.as_deref() == Some("processed")
    })
    .await;
    browser.click(&format!("{row} button.retry")).await;
    let notice = browser
        .wait_text("#notice", LIMIT, |text| text.contains("re-emitted as"))
        .await;
    let emitted = notice
        .split("re-emitted as ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_default()
        .to_string();
    wait_until("the re-emitted event applied", &stage, || async {
        row_status(&stage, &emitted).await.as_deref() == Some("processed")
    })
    .await;
    let again = letters
        .count_documents(doc! { "_id": &emitted })
        .await
        .expect("count");
    assert_eq!(again, 0, "the re-emitted event was dead-lettered again");
    // The letter leaves the list.
    let absent = format!(
        "return document.querySelector('{}') === null;",
        row.replace('\'', "\\'")
    );
    let start = Instant::now();
    while browser.script(&absent).await != serde_json::Value::Bool(true) {
        assert!(start.elapsed() < LIMIT, "the letter stays in the list");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_no_errors(&browser, "after Retry").await;

    // MongoDB frozen: degraded, naming the check.
    services.control(&["freeze", "mongo"]);
    let failing = browser
        .wait_text("#state", LIMIT, |state| state == "degraded")
        .await;
    assert_eq!(failing, "degraded");
    let named = browser.text("#failing").await;
    assert!(named.contains("mongodb"), "{named}");
    screenshot(&browser, "console-degraded.png").await;
    assert_no_errors(&browser, "degraded").await;
    services.control(&["thaw", "mongo"]);
    browser
        .wait_text("#state", LIMIT, |state| state == "running")
        .await;
    browser.close().await;
    drop(process);
    stage.mongo.drop().await;
}
