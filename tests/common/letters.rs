//! Dead letters on a stage of their own, for the `dead-letters` tests:
//! histories whose events dead-letter until their aggregates' creations
//! come, and what the outbox, the dead letters and the audit then hold.

use super::kafka;
use super::pipeline::Stage;
use activity_event_history::{generate, HistoryOptions};
use activity_event_processor::decode::OutboxEvent;
use mongodb::bson::{doc, Document};
use std::collections::{BTreeSet, HashMap};
use std::process::Output;
use std::time::{Duration, Instant};
use uuid::Uuid;

pub const LIMIT: Duration = Duration::from_secs(120);

pub const AUDIT: &str = "dead_letters_audit";

/// A generated history without poison, split into the events the outbox
/// gets first and the creations of the `withhold` aggregates with the most
/// later events (their events dead-letter until the creations come). The
/// creations have no `sequence_id`: inserted later, they get new ones.
pub fn missing_creations(
    seed: u64,
    events: usize,
    withhold: usize,
) -> (Vec<OutboxEvent>, Vec<OutboxEvent>) {
    let history = clean_history(seed, events);
    let mut later: HashMap<Uuid, usize> = HashMap::new();
    for e in &history {
        if !e.event_type.ends_with("Created") {
            *later.entry(e.aggregate_id).or_default() += 1;
        }
    }
    let mut creations: Vec<&OutboxEvent> = history
        .iter()
        .filter(|e| e.event_type.ends_with("Created"))
        .collect();
    creations.sort_by_key(|e| std::cmp::Reverse(later.get(&e.aggregate_id).copied().unwrap_or(0)));
    let chosen: BTreeSet<Uuid> = creations
        .iter()
        .take(withhold)
        .map(|e| e.event_id)
        .collect();
    let (mut withheld, kept): (Vec<OutboxEvent>, Vec<OutboxEvent>) = history
        .into_iter()
        .partition(|e| chosen.contains(&e.event_id));
    for e in &mut withheld {
        e.sequence_id = None;
    }
    (kept, withheld)
}

/// A stage whose outbox holds `kept`, applied by a replication run: its
/// dead letters are the events of the withheld aggregates.
pub async fn stage_with_letters(seed: u64, withhold: usize) -> (Stage, Vec<OutboxEvent>) {
    let stage = Stage::new().await;
    let (kept, withheld) = missing_creations(seed, 240, withhold);
    stage.load(&kept).await;
    stage.run_until_caught_up(&[], &[], LIMIT);
    assert!(
        letter_ids(&stage).await.len() > withhold,
        "the history dead-letters the withheld aggregates' events"
    );
    (stage, withheld)
}

pub async fn ids_in(stage: &Stage, collection: &str) -> BTreeSet<String> {
    stage
        .mongo
        .store
        .find(collection, doc! {}, None)
        .await
        .expect("read")
        .iter()
        .map(|d| d.get_str("_id").expect("string _id").to_string())
        .collect()
}

pub async fn letter_ids(stage: &Stage) -> BTreeSet<String> {
    ids_in(stage, "dead_letters").await
}

pub async fn audit(stage: &Stage) -> Vec<Document> {
    stage
        .mongo
        .store
        .find(AUDIT, doc! {}, None)
        .await
        .expect("audit")
}

pub async fn row_count(stage: &Stage) -> i64 {
    let client = stage.pg.client().await;
    let row = client
        .query_one("SELECT count(*) FROM event_outbox", &[])
        .await
        .expect("count");
    row.get(0)
}

/// Drops the test's MongoDB database and its log.
pub async fn finish(stage: Stage) {
    let _ = std::fs::remove_file(stage.log_path());
    stage.mongo.drop().await;
}

pub fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).to_string(),
        String::from_utf8_lossy(&output.stderr).to_string(),
    )
}

pub fn succeeded(output: &Output, what: &str) -> String {
    let (out, err) = text(output);
    assert!(
        output.status.success(),
        "{what}: {:?}\n{out}\n{err}",
        output.status
    );
    out
}

/// A closed port on this host.
pub fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// Waits until no letter is provisional: with the kafka source an event
/// whose aggregate is missing waits (its letter says so) until its last try.
pub async fn wait_final_letters(stage: &Stage, log: &std::path::Path) {
    let start = Instant::now();
    loop {
        let letters = stage
            .mongo
            .store
            .find("dead_letters", doc! {}, None)
            .await
            .expect("letters");
        let waiting = letters.iter().any(|d| {
            d.get_str("error")
                .unwrap_or_default()
                .contains("waiting for")
        });
        if !letters.is_empty() && !waiting {
            return;
        }
        assert!(
            start.elapsed() < LIMIT,
            "letters still provisional\n{}",
            kafka::tail(log)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A realistic history without poison, unknown types or chaos.
pub fn clean_history(seed: u64, events: usize) -> Vec<OutboxEvent> {
    let options = HistoryOptions {
        poison_per_mille: 0,
        unknown_per_mille: 0,
        chaos_per_mille: 0,
        ..HistoryOptions::realistic(events)
    };
    generate(seed, &options)
}
