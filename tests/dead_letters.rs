//! `dead-letters` on the real services: events dead-lettered because their
//! aggregate was never created are retried once the creations are in the
//! outbox, and the read models then equal the reference fold of the outbox
//! as it stands (re-emitted rows included); a retry concurrent with `run`
//! and with another retry, or run again, re-emits each letter once; a
//! retry stopped between the outbox and the audit finishes on rerun;
//! MongoDB or PostgreSQL unreachable changes nothing; `discard` keeps the
//! letter with its reason; bad input is refused.

mod common;

use activity_event_history::{generate, HistoryOptions};
use activity_event_processor::dead_letter::reemit::new_event_id;
use activity_event_processor::decode::OutboxEvent;
use activity_event_processor::projection::fold::{ReadModels, ReferenceFold};
use activity_event_processor::sink::deferral;
use common::kafka::{self, Slots};
use common::mongo::{fail_command, fail_command_off, FAILPOINT};
use common::pipeline::{kill_9, Stage};
use mongodb::bson::{doc, Document};
use std::collections::{BTreeSet, HashMap};
use std::process::Output;
use std::time::{Duration, Instant};
use uuid::Uuid;

const LIMIT: Duration = Duration::from_secs(120);
const AUDIT: &str = "dead_letters_audit";

/// A generated history without poison, split into the events the outbox
/// gets first and the creations of the `withhold` aggregates with the most
/// later events (their events dead-letter until the creations come). The
/// creations have no `sequence_id`: inserted later, they get new ones.
fn missing_creations(
    seed: u64,
    events: usize,
    withhold: usize,
) -> (Vec<OutboxEvent>, Vec<OutboxEvent>) {
    let options = HistoryOptions {
        poison_per_mille: 0,
        unknown_per_mille: 0,
        chaos_per_mille: 0,
        ..HistoryOptions::realistic(events)
    };
    let history = generate(seed, &options);
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
async fn stage_with_letters(seed: u64, withhold: usize) -> (Stage, Vec<OutboxEvent>) {
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

async fn ids_in(stage: &Stage, collection: &str) -> BTreeSet<String> {
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

async fn letter_ids(stage: &Stage) -> BTreeSet<String> {
    ids_in(stage, "dead_letters").await
}

async fn audit(stage: &Stage) -> Vec<Document> {
    stage
        .mongo
        .store
        .find(AUDIT, doc! {}, None)
        .await
        .expect("audit")
}

/// The fold of the outbox as it now stands, its dead letters less those
/// moved to the audit collection (retried or discarded).
async fn fold_of_outbox(stage: &Stage) -> ReadModels {
    let mut expected = ReferenceFold::of(&stage.outbox_events().await).read_models();
    let audited = ids_in(stage, AUDIT).await;
    expected.dead_letters.retain(|id| !audited.contains(id));
    expected
}

async fn wait_fold_of_outbox(stage: &Stage) {
    let start = Instant::now();
    while stage.mongo.read_models().await != fold_of_outbox(stage).await {
        assert!(
            start.elapsed() < LIMIT,
            "no convergence\n{}",
            stage.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// How many outbox rows each of `ids` has, and their statuses.
async fn rows_of(stage: &Stage, ids: &[Uuid]) -> Vec<(Uuid, String)> {
    let rows = stage
        .pg
        .client()
        .await
        .query(
            "SELECT event_id, status FROM event_outbox WHERE event_id = ANY($1)",
            &[&ids],
        )
        .await
        .expect("rows");
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

async fn row_count(stage: &Stage) -> i64 {
    let client = stage.pg.client().await;
    let row = client
        .query_one("SELECT count(*) FROM event_outbox", &[])
        .await
        .expect("count");
    row.get(0)
}

/// One new row per letter, `processed`, or `failed` where the fold of the
/// outbox dead-letters it (a duplicate creation fails again); most succeed.
async fn assert_rows_finished(stage: &Stage, letters: &BTreeSet<String>) {
    let failing = ReferenceFold::of(&stage.outbox_events().await)
        .read_models()
        .dead_letters;
    let rows = rows_of(stage, &new_ids(letters)).await;
    assert_eq!(rows.len(), letters.len(), "one new row per letter");
    for (id, status) in &rows {
        let expected = if failing.contains(&id.to_string()) {
            "failed"
        } else {
            "processed"
        };
        assert_eq!(status, expected, "re-emitted row {id}");
    }
    let processed = rows.iter().filter(|(_, s)| s == "processed").count();
    assert!(
        processed * 2 > rows.len(),
        "most retried events take effect: {rows:?}"
    );
}

/// Drops the test's MongoDB database and its log.
async fn finish(stage: Stage) {
    let _ = std::fs::remove_file(stage.log_path());
    stage.mongo.drop().await;
}

fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).to_string(),
        String::from_utf8_lossy(&output.stderr).to_string(),
    )
}

fn succeeded(output: &Output, what: &str) -> String {
    let (out, err) = text(output);
    assert!(
        output.status.success(),
        "{what}: {:?}\n{out}\n{err}",
        output.status
    );
    out
}

fn new_ids(letters: &BTreeSet<String>) -> Vec<Uuid> {
    letters.iter().map(|id| new_event_id(id)).collect()
}

/// (a): the creations come late; `retry --all` then makes the read models
/// the fold of the outbox as it stands, and the re-emitted rows end processed.
#[tokio::test(flavor = "multi_thread")]
async fn retry_all_after_the_missing_creations_gives_the_fold_of_the_outbox() {
    let (stage, withheld) = stage_with_letters(7001, 4).await;
    let _slots = Slots(stage.pg.config.clone());
    let letters = letter_ids(&stage).await;
    stage.load(&withheld).await;
    stage.run_until_caught_up(&[], &[], LIMIT);
    let before = stage.mongo.read_models().await;

    let out = succeeded(
        &stage.command(&["dead-letters", "retry", "--all"], &[]),
        "retry",
    );
    assert_eq!(
        out.matches(": re-emitted as ").count(),
        letters.len(),
        "{out}"
    );
    assert!(
        letter_ids(&stage).await.is_empty(),
        "the letters moved to the audit"
    );
    stage.run_until_caught_up(&[], &[], LIMIT);

    let expected = fold_of_outbox(&stage).await;
    stage.assert_read_models(&expected, false).await;
    assert_ne!(
        stage.mongo.read_models().await,
        before,
        "the retried events took effect"
    );
    assert_rows_finished(&stage, &letters).await;
    // `verify` agrees: the retried letters are in the audit, where it looks.
    let verified = stage.command(&["verify"], &[]);
    assert_eq!(
        verified.status.code(),
        Some(0),
        "verify: {}",
        String::from_utf8_lossy(&verified.stdout)
    );
    for record in audit(&stage).await {
        assert_eq!(record.get_str("action"), Ok("retried"), "{record}");
        let id = record.get_str("_id").expect("id");
        assert_eq!(
            record.get_str("new_event_id"),
            Ok(new_event_id(id).to_string().as_str())
        );
        assert!(record
            .get_document("letter")
            .is_ok_and(|l| l.contains_key("error")));
    }
    finish(stage).await;
}

/// (b): two retries at once while `run` (polling) runs, then a third and one
/// by id: each letter is re-emitted exactly once, and takes effect.
#[tokio::test(flavor = "multi_thread")]
async fn retries_beside_run_and_each_other_re_emit_each_letter_once() {
    let (stage, withheld) = stage_with_letters(7002, 3).await;
    let _slots = Slots(stage.pg.config.clone());
    let letters = letter_ids(&stage).await;
    let mut run = stage.spawn(&["--source", "polling"], &[]);
    stage.load(&withheld).await;
    common::faults::wait_finished(&stage, LIMIT, &stage.log_path()).await;
    let rows_before = row_count(&stage).await;

    let both: Vec<_> = (0..2)
        .map(|_| {
            let env = stage.env();
            std::thread::spawn(move || {
                common::run_binary(&["dead-letters", "retry", "--all"], &env)
            })
        })
        .collect();
    let outs: Vec<String> = both
        .into_iter()
        .map(|t| succeeded(&t.join().expect("retry thread"), "concurrent retry"))
        .collect();
    let all = outs.concat();
    for id in &letters {
        let fresh = all
            .lines()
            .filter(|l| l.starts_with(&format!("{id} ")) && l.contains(": re-emitted as "))
            .count();
        assert_eq!(
            fresh, 1,
            "{id} re-emitted once:\n{}\n---\n{}",
            outs[0], outs[1]
        );
    }
    // A third run finds none of them (only the own letters of re-emitted
    // events that failed again: duplicate creations).
    let again = succeeded(
        &stage.command(&["dead-letters", "retry", "--all"], &[]),
        "third retry",
    );
    assert!(
        letters.iter().all(|id| !again.contains(id.as_str())),
        "{again}"
    );
    let one = letters.iter().next().expect("a letter");
    let by_id = succeeded(
        &stage.command(&["dead-letters", "retry", one], &[]),
        "retry by id",
    );
    assert!(by_id.contains("already retried"), "{by_id}");

    wait_fold_of_outbox(&stage).await;
    common::faults::wait_finished(&stage, LIMIT, &stage.log_path()).await;
    kill_9(&mut run);
    // One new row per "re-emitted" line of all the runs (the letters of
    // re-emitted duplicate creations that failed again included), and no
    // letter re-emitted in two lines.
    let fresh: Vec<&str> = [all.as_str(), again.as_str()]
        .iter()
        .flat_map(|out| out.lines())
        .filter(|l| l.contains(": re-emitted as "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let distinct: BTreeSet<&str> = fresh.iter().copied().collect();
    assert_eq!(distinct.len(), fresh.len(), "a letter re-emitted twice");
    assert_eq!(
        row_count(&stage).await,
        rows_before + fresh.len() as i64,
        "one row per re-emission"
    );
    assert_rows_finished(&stage, &letters).await;
    stage
        .assert_read_models(&fold_of_outbox(&stage).await, false)
        .await;
    finish(stage).await;
}

/// The step between the outbox and the audit interrupted (MongoDB refuses
/// the audit writes until `--wait` runs out): the rerun finds the rows it
/// inserted and only finishes the move. The creations never came, so most
/// re-emitted events fail again, each with a dead letter of its own.
#[tokio::test(flavor = "multi_thread")]
async fn a_retry_stopped_before_the_audit_finishes_on_rerun_without_re_emitting() {
    let _failpoint = FAILPOINT.lock().await;
    let (stage, _withheld) = stage_with_letters(7003, 2).await;
    let _slots = Slots(stage.pg.config.clone());
    let letters = letter_ids(&stage).await;
    let rows_before = row_count(&stage).await;
    let app = format!("dlq-{}", &Uuid::new_v4().simple().to_string()[..8]);
    let uri = [("MONGODB_URI", format!("{}&appName={app}", stage.mongo.uri))];
    fail_command(&stage.mongo.store, &app, &["update"], 91, None).await;
    let stopped = stage.command(&["dead-letters", "retry", "--all", "--wait", "3s"], &uri);
    fail_command_off(&stage.mongo.store).await;
    let (_, err) = text(&stopped);
    assert_eq!(stopped.status.code(), Some(1), "{err}");
    assert!(
        err.contains("waiting for it") && err.contains("run the same command again"),
        "{err}"
    );
    let inserted = rows_of(&stage, &new_ids(&letters)).await.len();
    assert!(inserted >= 1, "the first aggregate's rows are in");
    assert_eq!(letter_ids(&stage).await, letters, "no letter moved");

    let out = succeeded(
        &stage.command(&["dead-letters", "retry", "--all"], &uri),
        "rerun",
    );
    assert_eq!(out.matches("not again").count(), inserted, "{out}");
    assert_eq!(
        out.matches(": re-emitted as ").count(),
        letters.len() - inserted,
        "{out}"
    );
    assert_eq!(row_count(&stage).await, rows_before + letters.len() as i64);
    stage.run_until_caught_up(&[], &[], LIMIT);
    let renewed: BTreeSet<String> = new_ids(&letters).iter().map(Uuid::to_string).collect();
    let now = letter_ids(&stage).await;
    assert!(
        !now.is_empty() && now.is_subset(&renewed),
        "the letters now are the re-emitted events' own: {now:?}"
    );
    stage
        .assert_read_models(&fold_of_outbox(&stage).await, false)
        .await;
    finish(stage).await;
}

/// A closed port on this host.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// MongoDB unreachable: retry waits, says so, gives up after `--wait`;
/// PostgreSQL unreachable: says so at once. Neither changes anything.
#[tokio::test(flavor = "multi_thread")]
async fn retry_without_mongodb_or_the_outbox_changes_nothing() {
    let (stage, _withheld) = stage_with_letters(7004, 1).await;
    let _slots = Slots(stage.pg.config.clone());
    let letters = letter_ids(&stage).await;
    let rows_before = row_count(&stage).await;

    let mongo_down = [(
        "MONGODB_URI",
        format!("mongodb://127.0.0.1:{}/?retryWrites=false", closed_port()),
    )];
    let started = Instant::now();
    let out = stage.command(
        &["dead-letters", "retry", "--all", "--wait", "2s"],
        &mongo_down,
    );
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("MongoDB unreachable, waiting for it"), "{err}");
    assert!(err.contains("nothing changed"), "{err}");
    assert!(started.elapsed() >= Duration::from_secs(2), "it waited");

    let pg_down = [("POSTGRES_PORT", closed_port().to_string())];
    let out = stage.command(&["dead-letters", "retry", "--all"], &pg_down);
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("the outbox, which is unreachable: nothing changed"),
        "{err}"
    );

    assert_eq!(row_count(&stage).await, rows_before);
    assert_eq!(letter_ids(&stage).await, letters);
    assert!(audit(&stage).await.is_empty());
    finish(stage).await;
}

/// (c) and the bad input: list, show, export, discard with a reason (then
/// in `list --discarded`), unknown ids, an empty collection, bad values.
#[tokio::test(flavor = "multi_thread")]
async fn discard_keeps_the_letter_with_its_reason_and_bad_input_is_refused() {
    let empty = Stage::new().await;
    let out = succeeded(
        &empty.command(&["dead-letters", "list"], &[]),
        "list of none",
    );
    assert_eq!(out, "no dead letters\n");
    let out = succeeded(
        &empty.command(&["dead-letters", "retry", "--all"], &[]),
        "retry none",
    );
    assert!(out.contains("nothing to do"), "{out}");
    assert_eq!(
        succeeded(
            &empty.command(&["dead-letters", "export"], &[]),
            "export none"
        ),
        ""
    );
    finish(empty).await;

    let (stage, _withheld) = stage_with_letters(7005, 2).await;
    let _slots = Slots(stage.pg.config.clone());
    let letters = letter_ids(&stage).await;
    let (first, second) = {
        let mut it = letters.iter();
        (
            it.next().expect("one").clone(),
            it.next().expect("two").clone(),
        )
    };
    let table = succeeded(&stage.command(&["dead-letters", "list"], &[]), "list");
    assert!(
        table.starts_with("ID ") && table.contains("ATTEMPTS"),
        "{table}"
    );
    assert!(
        letters.iter().all(|id| table.contains(id.as_str())),
        "{table}"
    );
    let json = succeeded(
        &stage.command(&["dead-letters", "list", "--json"], &[]),
        "list --json",
    );
    let rows: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(rows.len(), letters.len());
    assert!(rows
        .iter()
        .all(|r| r["attempts"].as_i64() >= Some(1) && r["last_failed_at"].is_string()));
    let shown = succeeded(
        &stage.command(&["dead-letters", "show", &first, "--json"], &[]),
        "show",
    );
    let shown: serde_json::Value = serde_json::from_str(&shown).expect("show json");
    assert_eq!(shown["id"], first.as_str());
    assert!(shown["payload"].is_object(), "{shown}");
    let export = succeeded(
        &stage.command(&["dead-letters", "export", "--format", "jsonl"], &[]),
        "export",
    );
    assert_eq!(export.lines().count(), letters.len());

    let reason = "imported by mistake (ticket 42)";
    let out = succeeded(
        &stage.command(
            &["dead-letters", "discard", &first, "--reason", reason],
            &[],
        ),
        "discard",
    );
    assert!(
        out.contains(first.as_str()) && out.contains("discarded"),
        "{out}"
    );
    let discarded = succeeded(
        &stage.command(&["dead-letters", "list", "--discarded"], &[]),
        "list --discarded",
    );
    assert!(
        discarded.contains(&first) && discarded.contains(reason),
        "{discarded}"
    );
    assert!(!discarded.contains(&second), "{discarded}");
    let listed = succeeded(&stage.command(&["dead-letters", "list"], &[]), "list after");
    assert!(
        !listed.contains(&first) && listed.contains(&second),
        "{listed}"
    );
    let again = succeeded(
        &stage.command(
            &["dead-letters", "discard", &first, "--reason", "again"],
            &[],
        ),
        "discard again",
    );
    assert!(
        again.contains("already discarded") && again.contains(reason),
        "{again}"
    );

    let rows_before = row_count(&stage).await;
    let unknown = Uuid::new_v4().to_string();
    let out = stage.command(&["dead-letters", "retry", &unknown, &second], &[]);
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&unknown) && err.contains("nothing changed"),
        "{err}"
    );
    assert_eq!(row_count(&stage).await, rows_before);
    assert!(letter_ids(&stage).await.contains(&second));
    let out = stage.command(&["dead-letters", "show", &unknown], &[]);
    assert_eq!(out.status.code(), Some(1));

    // A provisional letter (the kafka consumer still tries its event) is
    // left alone.
    let waiting = Uuid::new_v4().to_string();
    let provisional = doc! {
        "_id": &waiting, "sequence_id": 9_000_i64, "aggregate_type": "User",
        "aggregate_id": Uuid::new_v4().to_string(), "event_type": "UserUpdated",
        "payload": { "displayName": "Later" }, "attempts": 1_i64,
        "error": format!("user not found ({}; tried 1 of 5 times)", deferral::WAITING),
    };
    stage
        .mongo
        .store
        .database()
        .collection::<Document>("dead_letters")
        .insert_one(provisional)
        .await
        .expect("provisional letter");
    let out = succeeded(
        &stage.command(&["dead-letters", "retry", &waiting], &[]),
        "retry waiting",
    );
    assert!(out.contains("the kafka consumer still tries it"), "{out}");
    assert!(letter_ids(&stage).await.contains(&waiting));
    assert_eq!(row_count(&stage).await, rows_before);

    for bad in [
        vec!["dead-letters", "discard", &second],
        vec!["dead-letters", "discard", &second, "--reason", " "],
        vec!["dead-letters", "retry"],
        vec!["dead-letters", "retry", "not-a-uuid"],
        vec!["dead-letters", "retry", &second, "--all"],
        vec!["dead-letters", "list", "--since", "5 parsecs"],
        vec!["dead-letters", "export", "--format", "csv"],
        vec!["prune"],
        vec!["prune", "--older-than", "soon"],
        vec!["prune", "--older-than", "-3d"],
    ] {
        let out = stage.command(&bad, &[]);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", text(&out).1);
    }
    assert!(letter_ids(&stage).await.contains(&second));
    assert_eq!(row_count(&stage).await, rows_before);
    finish(stage).await;
}

/// Waits until no letter is provisional: with the kafka source an event
/// whose aggregate is missing waits (its letter says so) until its last try.
async fn wait_final_letters(stage: &Stage, log: &std::path::Path) {
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

/// With the kafka source the re-emitted rows travel through the relay like
/// any other row, and the read models end as the fold of the outbox.
#[tokio::test(flavor = "multi_thread")]
async fn with_the_kafka_source_re_emitted_rows_travel_through_the_relay() {
    let stage = Stage::new().await;
    let _slots = Slots(stage.pg.config.clone());
    let topic = kafka::fresh("retry");
    kafka::create_topic(&topic, 2).await;
    let mut env = stage.env();
    env.extend(kafka::kafka_env(&topic, &kafka::fresh("group")));
    env.push(("MAX_RETRIES", "1".into()));
    let log = stage.log_path();
    let relay = || {
        let child = kafka::spawn(&["relay", "--until-caught-up"], &env, &log);
        kafka::wait_success(child, LIMIT, &log);
    };
    let (kept, withheld) = missing_creations(7006, 160, 2);
    stage.load(&kept).await;
    relay();
    let mut consumer = kafka::spawn(&["run", "--source", "kafka"], &env, &log);
    wait_final_letters(&stage, &log).await;
    stage.load(&withheld).await;
    relay();
    wait_fold_of_outbox(&stage).await;
    let letters = letter_ids(&stage).await;

    let out = succeeded(
        &stage.command(&["dead-letters", "retry", "--all"], &env),
        "retry",
    );
    assert_eq!(
        out.matches(": re-emitted as ").count(),
        letters.len(),
        "{out}"
    );
    relay();
    wait_fold_of_outbox(&stage).await;
    kafka::terminate(&mut consumer, Duration::from_secs(10));
    let rows = rows_of(&stage, &new_ids(&letters)).await;
    assert_eq!(rows.len(), letters.len(), "one new row per letter");
    let still = letter_ids(&stage).await;
    assert!(letters.iter().all(|id| !still.contains(id)), "{still:?}");
    finish(stage).await;
}

/// Ctrl-C while `retry` waits for MongoDB stops it (exit 130), nothing changed.
#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_stops_a_waiting_retry_with_nothing_changed() {
    let (stage, _withheld) = stage_with_letters(7007, 1).await;
    let _slots = Slots(stage.pg.config.clone());
    let rows_before = row_count(&stage).await;
    let mut env = stage.env();
    env.push((
        "MONGODB_URI",
        format!("mongodb://127.0.0.1:{}/?retryWrites=false", closed_port()),
    ));
    let log = stage.log_path();
    let args = ["dead-letters", "retry", "--all", "--wait", "60s"];
    let mut child = kafka::spawn(&args, &env, &log);
    common::faults::wait_for_line(&log, "MongoDB unreachable, waiting for it", 0, LIMIT).await;
    let interrupted = Instant::now();
    let signal = std::process::Command::new("kill")
        .args(["-INT", &child.0.id().to_string()])
        .status()
        .expect("kill -INT");
    assert!(signal.success());
    let status = common::crash::wait_exit(&mut child, Duration::from_secs(15)).await;
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(130),
        "{}",
        kafka::tail(&log)
    );
    assert!(interrupted.elapsed() < Duration::from_secs(15));
    assert!(
        kafka::tail(&log).contains("interrupted: nothing changed"),
        "{}",
        kafka::tail(&log)
    );
    assert_eq!(row_count(&stage).await, rows_before);
    finish(stage).await;
}

/// A write transaction in flight: `retry` waits for it without holding the
/// write side up (another insert meanwhile is not kept waiting long), gives
/// up after `--wait` having re-emitted nothing, and goes through once it
/// commits.
#[tokio::test(flavor = "multi_thread")]
async fn a_write_in_flight_holds_retry_off_without_holding_writers_up() {
    let (stage, _withheld) = stage_with_letters(7008, 1).await;
    let _slots = Slots(stage.pg.config.clone());
    let letters = letter_ids(&stage).await;
    let insert = "INSERT INTO event_outbox (event_id, aggregate_id, aggregate_type, event_type, payload)
                  VALUES ($1, $2, 'User', 'UserCreated', '{\"email\": \"w@example.com\", \"displayName\": \"W\"}')";
    let mut held = stage.pg.client().await;
    let in_flight = held.transaction().await.expect("begin");
    let held_id = Uuid::new_v4();
    in_flight
        .execute(insert, &[&held_id, &Uuid::new_v4()])
        .await
        .expect("insert in flight");

    let env = stage.env();
    let retry = std::thread::spawn(move || {
        common::run_binary(&["dead-letters", "retry", "--all", "--wait", "4s"], &env)
    });
    let writer = stage.pg.client().await;
    let mut slowest = Duration::ZERO;
    while !retry.is_finished() {
        let started = Instant::now();
        writer
            .execute(insert, &[&Uuid::new_v4(), &Uuid::new_v4()])
            .await
            .expect("insert beside the retry");
        slowest = slowest.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = retry.join().expect("retry thread");
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("the outbox stayed locked"), "{err}");
    assert!(
        slowest < Duration::from_secs(2),
        "a writer waited {slowest:?}"
    );
    assert!(rows_of(&stage, &new_ids(&letters)).await.is_empty());

    in_flight.commit().await.expect("commit");
    succeeded(
        &stage.command(&["dead-letters", "retry", "--all"], &[]),
        "retry",
    );
    assert_eq!(
        rows_of(&stage, &new_ids(&letters)).await.len(),
        letters.len()
    );
    finish(stage).await;
}
