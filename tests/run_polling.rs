//! `run --source polling` against real PostgreSQL and MongoDB-wire servers:
//! convergence on a large history, kill -9 at random points, late commits,
//! per-aggregate order across workers, and claims of a dead worker taken over.

mod common;

use activity_event_history::{generate, HistoryOptions};
use common::pipeline::{kill_9, Stage};
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(600);

#[tokio::test(flavor = "multi_thread")]
async fn a_20k_history_drains_to_the_fold() {
    let stage = Stage::new().await;
    let history = generate(20_000, &HistoryOptions::realistic(20_000));
    stage.load(&history).await;
    stage.run_until_caught_up(&["--source", "polling", "--workers", "2"], &[], LIMIT);
    stage.assert_converged(&history, true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_at_random_points_loses_nothing_and_applies_nothing_twice() {
    let stage = Stage::new().await;
    let history = generate(77, &HistoryOptions::realistic(6_000));
    stage.load(&history).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(77);
    let small_batches = [("BATCH_SIZE", "50".to_string())];
    for _ in 0..6 {
        let mut child = stage.spawn(&["--source", "polling", "--workers", "2"], &small_batches);
        std::thread::sleep(Duration::from_millis(rng.gen_range(300..1500)));
        kill_9(&mut child);
    }
    // The dead workers' claims wait out their 10 s lease, then are taken over.
    stage.run_until_caught_up(&["--source", "polling"], &[], LIMIT);
    stage.assert_converged(&history, true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_late_commit_is_applied_not_skipped() {
    let stage = Stage::new().await;
    let user = uuid::Uuid::new_v4();
    let late = uuid::Uuid::new_v4();
    // Transaction A takes a sequence_id first and commits last.
    let writer_a = stage.pg.client().await;
    writer_a.batch_execute("BEGIN").await.expect("begin");
    writer_a
        .execute(
            "INSERT INTO event_outbox (event_id, aggregate_id, aggregate_type, event_type, payload)
             VALUES ($1, $2, 'User', 'UserCreated', $3)",
            &[
                &late,
                &late,
                &json!({"email": "late@x", "displayName": "Late"}),
            ],
        )
        .await
        .expect("insert late");
    let writer_b = stage.pg.client().await;
    writer_b
        .execute(
            "INSERT INTO event_outbox (event_id, aggregate_id, aggregate_type, event_type, payload)
             VALUES (gen_random_uuid(), $1, 'User', 'UserCreated', $2)",
            &[&user, &json!({"email": "early@x", "displayName": "Early"})],
        )
        .await
        .expect("insert early");
    stage.run_until_caught_up(&["--source", "polling"], &[], LIMIT);
    writer_a.batch_execute("COMMIT").await.expect("commit late");
    stage.run_until_caught_up(&["--source", "polling"], &[], LIMIT);
    let models = stage.mongo.read_models().await;
    assert_eq!(models.users[&late.to_string()]["display_name"], "Late");
    assert_eq!(models.users[&user.to_string()]["display_name"], "Early");
}

#[tokio::test(flavor = "multi_thread")]
async fn three_workers_keep_each_aggregates_order_and_take_over_dead_claims() {
    let stage = Stage::new().await;
    // Few aggregates, many renames each: the final names depend on order.
    let mut options = HistoryOptions::realistic(3_000);
    options.users = 6;
    options.activities = 4;
    let history = generate(5150, &options);
    stage.load(&history).await;
    // A worker that claims rows and dies holding them.
    let client = stage.pg.client().await;
    let claimed = client
        .execute(
            "UPDATE event_outbox SET status = 'processing', lock_id = 'dead-worker|0'
             WHERE sequence_id IN (SELECT sequence_id FROM event_outbox ORDER BY sequence_id LIMIT 20)",
            &[],
        )
        .await
        .expect("claim");
    assert_eq!(claimed, 20);
    stage.run_until_caught_up(
        &["--source", "polling", "--workers", "3"],
        &[("BATCH_SIZE", "25".into())],
        LIMIT,
    );
    stage.assert_converged(&history, true).await;
}

/// Rows in `processing` (claimed and not finished).
async fn claimed(stage: &Stage) -> i64 {
    stage
        .pg
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM event_outbox WHERE status = 'processing'",
            &[],
        )
        .await
        .expect("count claims")
        .get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_sigterm_gives_the_claims_back() {
    let services = common::services::OwnServices::up(&["pg", "mongo"]);
    let stage = Stage::on(&services).await;
    let history = generate(78, &HistoryOptions::realistic(2_000));
    stage.load(&history).await;
    let mut child = stage.spawn(
        &["--source", "polling", "--workers", "2"],
        &[("BATCH_SIZE", "500".into()), ("POLL_LEASE", "300s".into())],
    );
    // MongoDB stops answering mid-run: the batches in flight cannot finish.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    services.control(&["freeze", "mongo"]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        claimed(&stage).await > 0,
        "nothing claimed\n{}",
        stage.log_tail()
    );
    let pid = child.id().to_string();
    for _ in 0..2 {
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(sent.success());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let exit =
        common::pipeline::wait_with_timeout_child(&mut child, Duration::from_secs(30), &stage);
    assert_eq!(exit.code(), Some(130), "hard stop\n{}", stage.log_tail());
    // Released at once, not after the 300 s lease.
    assert_eq!(claimed(&stage).await, 0, "{}", stage.log_tail());
    services.control(&["thaw", "mongo"]);
    stage.run_until_caught_up(&["--source", "polling"], &[], LIMIT);
    stage.assert_converged(&history, true).await;
}

/// `name=<n>` in the last `stopped` line of the stage's log.
fn stopped_count(stage: &Stage, name: &str) -> u64 {
    let log = std::fs::read_to_string(stage.log_path()).unwrap_or_default();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains(" stopped "))
        .unwrap_or_else(|| panic!("no stopped line\n{}", stage.log_tail()));
    let start = line
        .find(&format!(" {name}="))
        .unwrap_or_else(|| panic!("no {name} in {line}"))
        + name.len()
        + 2;
    line[start..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number for {name} in {line}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redelivered_history_is_counted_as_redelivered() {
    let stage = Stage::new().await;
    let history = generate(79, &HistoryOptions::realistic(1_000));
    stage.load(&history).await;
    let info = [("LOG_LEVEL", "info".to_string())];
    stage.run_until_caught_up(&["--source", "polling"], &info, LIMIT);
    stage.assert_converged(&history, true).await;
    // Everything comes again, as after a lost acknowledgement.
    stage
        .pg
        .client()
        .await
        .execute(
            "UPDATE event_outbox SET status = 'pending', lock_id = NULL",
            &[],
        )
        .await
        .expect("reset the outbox");
    stage.run_until_caught_up(&["--source", "polling"], &info, LIMIT);
    stage.assert_converged(&history, true).await;
    let letters = stage.mongo.read_models().await.dead_letters.len() as u64;
    // No dead letter is counted as new; an event that changed nothing the
    // first time (a join of a participant already there) moved no fence and
    // goes through its handler again, so a few count as applied.
    assert_eq!(
        stopped_count(&stage, "dead_lettered"),
        0,
        "{}",
        stage.log_tail()
    );
    assert_eq!(stopped_count(&stage, "dead_letters_again"), letters);
    let applied = stopped_count(&stage, "applied");
    assert!(
        applied * 20 < history.len() as u64,
        "applied again: {applied}"
    );
    assert_eq!(
        applied
            + stopped_count(&stage, "duplicates")
            + stopped_count(&stage, "unmatched")
            + stopped_count(&stage, "dead_letters_again"),
        history.len() as u64
    );
    let _ = std::fs::remove_file(stage.log_path());
}
