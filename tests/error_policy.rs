//! One error policy, a test per class (docs/design.md, "Failure policy"):
//! - transient: the services going away and coming back are retried, forever,
//!   with the retries in the log: `mongo_faults`, `service_faults` and
//!   `network_faults` show it for MongoDB, PostgreSQL and Kafka;
//! - permanent: an event at fault is dead-lettered and the rest goes on:
//!   `sink_refusals` and `crash_dead_letters` show it;
//! - fatal: here. Marking (replication) or claiming (polling) outbox rows
//!   refused for good (SQLSTATE 42501, as when the role lost UPDATE on
//!   `event_outbox`) stops the process with one line that says what to do,
//!   instead of retrying.
//!
//! And the checkpoint, which refuses to move backwards.

mod common;
use common::kafka;

use activity_event_history::{generate, HistoryOptions};
use activity_event_processor::checkpoint::{CheckpointError, MongoCheckpoint};
use common::mongo::TestMongo;
use common::pipeline::{wait_with_timeout, Stage};
use std::time::Duration;

/// Every UPDATE of the outbox fails as it does for a role without the
/// privilege (the test role is a superuser, which no REVOKE touches).
const DENY_UPDATE: &str = "
    CREATE FUNCTION aep_deny_update() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'permission denied for table event_outbox' USING ERRCODE = '42501';
    END $$;
    CREATE TRIGGER aep_deny_update BEFORE UPDATE ON event_outbox
        FOR EACH STATEMENT EXECUTE FUNCTION aep_deny_update();";

/// Loads a history (`seed`), makes every UPDATE on the outbox fail with
/// SQLSTATE 42501, runs `args` to its end: it must fail, with exactly one
/// `error:` line. That line, and the whole log.
async fn refused_run(
    stage: &Stage,
    seed: u64,
    args: &[&str],
    env: &[(&'static str, String)],
) -> (String, String) {
    stage
        .load(&generate(seed, &HistoryOptions::realistic(30)))
        .await;
    stage
        .pg
        .client()
        .await
        .batch_execute(DENY_UPDATE)
        .await
        .expect("deny updates");
    let _ = std::fs::remove_file(stage.log_path());
    let child = stage.spawn(args, env);
    let status = wait_with_timeout(child, Duration::from_secs(90), stage);
    let log = std::fs::read_to_string(stage.log_path()).unwrap_or_default();
    let _ = std::fs::remove_file(stage.log_path());
    assert!(!status.success(), "exited 0:\n{log}");
    let errors: Vec<&str> = log.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{log}");
    (errors[0].to_string(), log)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_outbox_mark_stops_with_one_line_saying_what_to_do() {
    let stage = Stage::new().await;
    let _slots = kafka::Slots(stage.pg.config.clone());
    let (line, log) = refused_run(
        &stage,
        4801,
        &["--source", "replication", "--until-caught-up"],
        &[("MARK_PROCESSED", "true".to_string())],
    )
    .await;
    let line = line.as_str();
    assert!(line.contains("SQLSTATE 42501"), "{line}");
    assert!(line.contains("UPDATE on event_outbox"), "{line}");
    assert!(line.contains("MARK_PROCESSED=false"), "{line}");
    assert!(
        line.matches("permission denied").count() == 1,
        "the cause once: {line}"
    );
    assert!(
        !log.contains("marking outbox rows failed; retrying"),
        "a permanent refusal was retried:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_claim_stops_polling_with_one_line() {
    let stage = Stage::new().await;
    let (line, log) = refused_run(
        &stage,
        4802,
        &["--source", "polling", "--until-caught-up"],
        &[],
    )
    .await;
    assert!(line.contains("cannot claim outbox rows"), "{line}");
    assert!(line.contains("permission denied"), "{line}");
    assert!(!log.contains("retrying"), "a refusal was retried:\n{log}");
}

#[tokio::test]
async fn the_checkpoint_refuses_to_move_backwards() {
    let mongo = TestMongo::create().await;
    let checkpoint = MongoCheckpoint::new(mongo.store.clone(), "slot_a");
    assert_eq!(checkpoint.load().await.expect("load"), None);
    checkpoint.save(0x200).await.expect("first save");
    checkpoint
        .save(0x200)
        .await
        .expect("the same position again");
    match checkpoint.save(0x100).await {
        Err(CheckpointError::Backwards {
            stored, refused, ..
        }) => assert_eq!((stored, refused), (0x200, 0x100)),
        other => panic!("a save below the stored position: {other:?}"),
    }
    assert_eq!(checkpoint.load().await.expect("load"), Some(0x200));
    checkpoint.save(0x300).await.expect("forward");
    assert_eq!(checkpoint.load().await.expect("load"), Some(0x300));
    // Another name is another position.
    let other = MongoCheckpoint::new(mongo.store.clone(), "slot_b");
    other.save(0x10).await.expect("another slot");
    assert_eq!(checkpoint.load().await.expect("load"), Some(0x300));
}
