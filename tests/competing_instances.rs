//! Competing instances, as production starts them: two replication processes
//! at once (with no slot yet, and with one), a standby that takes over from a
//! killed owner, two relays on one relay slot, and polling processes joining
//! and leaving, all under a concurrent writer. Each ends with the read models
//! equal to the reference fold and every outbox row finished.

mod common;
use common::kafka;

use activity_event_history::{generate, HistoryOptions};
use common::faults::write_slowly;
use common::pipeline::{kill_9, Stage};
use std::process::Child;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(120);

struct Killed(Vec<Child>);

impl Drop for Killed {
    fn drop(&mut self) {
        for child in &mut self.0 {
            kill_9(child);
        }
    }
}

/// Two `run` processes started together while ~200 rows/s are written; with
/// `slot_first`, the slot exists already (a first run made it).
async fn two_replication_processes(seed: u64, slot_first: bool) {
    let stage = Stage::new().await;
    let _slots = kafka::Slots(stage.pg.config.clone());
    let history = generate(seed, &HistoryOptions::realistic(1_500));
    let (first, rest) = history.split_at(300);
    stage.load(first).await;
    if slot_first {
        stage.run_until_caught_up(&[], &[], LIMIT);
    }
    let info = [("LOG_LEVEL", "info".to_string())];
    let writer = write_slowly(&stage, rest, 10, Duration::from_millis(50));
    let children = Killed(vec![stage.spawn(&[], &info), stage.spawn(&[], &info)]);
    writer.await;
    stage.wait_converged(&history, LIMIT).await;
    drop(children);
    // A later run agrees that everything is done, and changes nothing.
    stage.run_until_caught_up(&[], &[], LIMIT);
    stage.assert_converged(&history, true).await;
    let log = std::fs::read_to_string(stage.log_path()).unwrap_or_default();
    assert!(
        !log.contains("dropped the replication slot"),
        "a slot was dropped:\n{}",
        stage.log_tail()
    );
    assert!(
        log.contains("standing by to take over"),
        "the second process did not stand by:\n{}",
        stage.log_tail()
    );
    let _ = std::fs::remove_file(stage.log_path());
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replication_processes_on_a_fresh_database_lose_nothing() {
    for round in 0..3 {
        two_replication_processes(700 + round, false).await;
        eprintln!("round {} converged", round + 1);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replication_processes_on_an_existing_slot_lose_nothing() {
    for round in 0..2 {
        two_replication_processes(800 + round, true).await;
        eprintln!("round {} converged", round + 1);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_takes_over_within_seconds_of_the_owners_kill_9() {
    let stage = Stage::new().await;
    let _slots = kafka::Slots(stage.pg.config.clone());
    let history = generate(900, &HistoryOptions::realistic(2_000));
    let (first, rest) = history.split_at(1_000);
    stage.load(first).await;
    let info = [("LOG_LEVEL", "info".to_string())];
    let mut owner = stage.spawn(&[], &info);
    stage.wait_converged(first, LIMIT).await;
    let mut standby = Killed(vec![stage.spawn(&[], &info)]);
    let deadline = Instant::now() + LIMIT;
    while !std::fs::read_to_string(stage.log_path())
        .unwrap_or_default()
        .contains("standing by to take over")
    {
        assert!(Instant::now() < deadline, "{}", stage.log_tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    kill_9(&mut owner);
    let killed = Instant::now();
    let killed_at = chrono::Utc::now();
    stage.load(rest).await;
    stage.wait_converged(&history, LIMIT).await;
    let applied = killed.elapsed();
    // When the standby streamed again, from its own log.
    let log = std::fs::read_to_string(stage.log_path()).unwrap_or_default();
    let streaming = log
        .lines()
        .skip_while(|l| !l.contains("took over the replication slot"))
        .find(|l| l.contains("replication streaming"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .unwrap_or_else(|| panic!("the standby never streamed:\n{}", stage.log_tail()));
    let takeover = (streaming.with_timezone(&chrono::Utc) - killed_at)
        .to_std()
        .unwrap_or_default();
    eprintln!(
        "the standby streamed {takeover:?} after the owner's kill -9, \
         and had applied the 1,000 events written after it {applied:?} after it"
    );
    assert!(
        takeover < Duration::from_secs(10),
        "take-over took {takeover:?}\n{}",
        stage.log_tail()
    );
    assert!(
        standby.0[0].try_wait().expect("wait").is_none(),
        "the standby exited\n{}",
        stage.log_tail()
    );
    kill_9(&mut standby.0[0]);
    stage.run_until_caught_up(&[], &[], LIMIT);
    stage.assert_converged(&history, true).await;
    let log = std::fs::read_to_string(stage.log_path()).unwrap_or_default();
    assert!(
        log.contains("took over the replication slot"),
        "{}",
        stage.log_tail()
    );
    let _ = std::fs::remove_file(stage.log_path());
}

#[tokio::test(flavor = "multi_thread")]
async fn two_relays_on_one_slot_publish_every_row() {
    let stage = Stage::new().await;
    let _slots = kafka::Slots(stage.pg.config.clone());
    let topic = kafka::fresh("competing");
    kafka::create_topic(&topic, 2).await;
    let env = stage.kafka_env(&topic);
    let log = stage.log_path();
    let history = generate(901, &HistoryOptions::realistic(1_200));
    let (first, rest) = history.split_at(200);
    stage.load(first).await;
    let a = kafka::spawn(&["relay"], &env, &log);
    let b = kafka::spawn(&["relay"], &env, &log);
    write_slowly(&stage, rest, 10, Duration::from_millis(50)).await;
    let deadline = Instant::now() + LIMIT;
    loop {
        let done = common::faults::statuses(&stage).await;
        let finished: i64 = done
            .iter()
            .filter(|(status, _)| status == "processed" || status == "failed")
            .map(|(_, n)| n)
            .sum();
        if finished == history.len() as i64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "relayed {done:?} of {}\n{}",
            history.len(),
            kafka::tail(&log)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop((a, b));
    let wanted: std::collections::BTreeSet<String> =
        history.iter().map(|e| e.event_id.to_string()).collect();
    let (seen, records) = kafka::published_ids(&topic, &wanted, LIMIT);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("standing by to take over"),
        "{}",
        kafka::tail(&log)
    );
    assert!(!text.contains("dropped the replication slot"));
    let missing: Vec<&String> = wanted.difference(&seen).collect();
    assert!(
        missing.is_empty(),
        "{} of {} rows never published ({} records): {:?}",
        missing.len(),
        wanted.len(),
        records,
        &missing[..missing.len().min(5)]
    );
    let _ = std::fs::remove_file(&log);
}

#[tokio::test(flavor = "multi_thread")]
async fn polling_processes_joining_and_leaving_lose_nothing() {
    let stage = Stage::new().await;
    let history = generate(902, &HistoryOptions::realistic(3_000));
    let (first, rest) = history.split_at(500);
    stage.load(first).await;
    let polling = ["--source", "polling", "--workers", "2"];
    let mut steady = Killed(vec![stage.spawn(&polling, &[])]);
    let writer = write_slowly(&stage, rest, 25, Duration::from_millis(50));
    let churn = async {
        for round in 0..4 {
            let mut guest = stage.spawn(&polling, &[]);
            tokio::time::sleep(Duration::from_millis(700)).await;
            if round % 2 == 0 {
                kill_9(&mut guest);
            } else {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &guest.id().to_string()])
                    .status();
                let status = common::pipeline::wait_with_timeout_child(
                    &mut guest,
                    Duration::from_secs(30),
                    &stage,
                );
                assert_eq!(status.code(), Some(0), "{}", stage.log_tail());
            }
        }
    };
    tokio::join!(writer, churn);
    stage.wait_converged(&history, LIMIT).await;
    kill_9(&mut steady.0[0]);
    // Claims of the killed guests expire (POLL_LEASE=10s) and are applied.
    stage.run_until_caught_up(&["--source", "polling"], &[], LIMIT);
    stage.assert_converged(&history, true).await;
    let _ = std::fs::remove_file(stage.log_path());
}
