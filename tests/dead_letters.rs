//! `dead-letters` on the real services: events dead-lettered because their
//! aggregate was never created are retried once the creations are in the
//! outbox, and the read models then equal the reference fold of the outbox
//! as it stands (re-emitted rows included); a retry concurrent with `run`
//! and with another retry, or run again, re-emits each letter once; a
//! retry stopped between the outbox and the audit finishes on rerun; the
//! re-emitted rows travel through the relay with the kafka source; a write
//! in flight holds a retry off (`tests/dead_letters_cli.rs` has the failures
//! and the bad input).

mod common;

use activity_event_processor::dead_letter::reemit::new_event_id;
use activity_event_processor::projection::fold::{ReadModels, ReferenceFold};
use common::kafka::{self, Slots};
use common::letters::{
    audit, finish, ids_in, letter_ids, missing_creations, row_count, stage_with_letters, succeeded,
    text, wait_final_letters, AUDIT, LIMIT,
};
use common::mongo::{fail_command, fail_command_off, FAILPOINT};
use common::pipeline::{kill_9, Stage};
use mongodb::bson::doc;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use uuid::Uuid;

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
    stage.assert_verified();
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
