//! Nothing stuck: outbox rows that the capture has passed without applying
//! them (here made on purpose: the slot and the checkpoint are moved past
//! committed rows, as a lost snapshot would leave them) are found by the
//! sweep, applied, reported, and `--until-caught-up` does not claim "caught
//! up" before they are.

mod common;
use common::kafka;

use activity_event_history::{generate, HistoryOptions};
use common::pipeline::Stage;
use mongodb::bson::doc;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);

/// Moves the slot and the processor's checkpoint to the current end of the
/// WAL, past every row committed so far, as if they had been applied.
async fn skip_everything_committed(stage: &Stage) -> u64 {
    let client = stage.pg.client().await;
    let row = client
        .query_one(
            "SELECT (pg_replication_slot_advance($1, pg_current_wal_lsn())).end_lsn::text",
            &[&stage.slot],
        )
        .await
        .expect("advance the slot");
    let text: String = row.get(0);
    let (hi, lo) = text.split_once('/').expect("lsn");
    let lsn = (u64::from_str_radix(hi, 16).expect("hex") << 32)
        | u64::from_str_radix(lo, 16).expect("hex");
    stage
        .mongo
        .store
        .database()
        .collection::<mongodb::bson::Document>("processor_checkpoints")
        .update_one(
            doc! { "_id": &stage.slot },
            doc! { "$set": { "lsn": lsn as i64 } },
        )
        .await
        .expect("move the checkpoint");
    lsn
}

#[tokio::test(flavor = "multi_thread")]
async fn rows_the_capture_passed_are_found_applied_and_reported() {
    let stage = Stage::new().await;
    let _slots = kafka::Slots(stage.pg.config.clone());
    let history = generate(4711, &HistoryOptions::realistic(600));
    let (first, passed) = history.split_at(500);
    stage.load(first).await;
    stage.run_until_caught_up(&[], &[], LIMIT);
    stage.wait_converged(first, LIMIT).await;

    stage.load(passed).await;
    skip_everything_committed(&stage).await;
    let info = [("LOG_LEVEL", "info".to_string())];
    stage.run_until_caught_up(&[], &info, LIMIT);
    stage.assert_converged(&history, true).await;
    let log = std::fs::read_to_string(stage.log_path()).unwrap_or_default();
    let found = log
        .lines()
        .find(|l| l.contains("were never applied"))
        .unwrap_or_else(|| panic!("no sweep report:\n{}", stage.log_tail()));
    assert!(found.contains("rows=100"), "{found}");
    let _ = std::fs::remove_file(stage.log_path());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_running_process_finds_them_too() {
    let stage = Stage::new().await;
    let _slots = kafka::Slots(stage.pg.config.clone());
    let history = generate(4712, &HistoryOptions::realistic(300));
    let (first, passed) = history.split_at(200);
    stage.load(first).await;
    stage.run_until_caught_up(&[], &[], LIMIT);
    stage.load(passed).await;
    skip_everything_committed(&stage).await;
    // No --until-caught-up: the sweep a process runs once its stream keeps
    // up (then every 30 s) finds them.
    let mut child = stage.spawn(&[], &[]);
    stage.wait_converged(&history, LIMIT).await;
    // The outbox is marked after the effects are durable: wait for the marks
    // too before the kill.
    common::faults::wait_finished(&stage, LIMIT, &stage.log_path()).await;
    common::pipeline::kill_9(&mut child);
    stage.assert_converged(&history, true).await;
    let _ = std::fs::remove_file(stage.log_path());
}
