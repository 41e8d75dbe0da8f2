//! The Kafka path end to end, on real servers: `relay` publishes a generated
//! 20k-event outbox to a 4-partition topic, two `run --source kafka` processes
//! in one consumer group project it, and the read models must equal the
//! reference fold, although the relay is killed with SIGKILL twice (during its
//! initial snapshot and while streaming) and one consumer is killed with
//! SIGKILL mid-stream (the other takes over its partitions).

mod common;
use common::kafka;

use activity_event_history::{generate, HistoryOptions};
use activity_event_processor::projection::fold::ReferenceFold;
use activity_event_processor::store::mongo::USERS;
use common::pipeline::Stage;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(600);

/// Polls `probe` until it reaches `at_least` (panics after `LIMIT`).
async fn wait_for<F, Fut>(what: &str, at_least: i64, stage: &Stage, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = i64>,
{
    let start = Instant::now();
    loop {
        let now = probe().await;
        if now >= at_least {
            eprintln!("{what}: {now} after {:?}", start.elapsed());
            return;
        }
        assert!(
            start.elapsed() < LIMIT,
            "{what} stayed at {now} < {at_least}\n{}",
            kafka::tail(&stage.log_path())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relayed_20k_history_converges_in_a_group_of_two_through_kill_9s() {
    let stage = Stage::new().await;
    let _slots = kafka::Slots(stage.pg.config.clone());
    let topic = kafka::fresh("outbox");
    kafka::create_topic(&topic, 4).await;
    let log = stage.log_path();
    let mut env = stage.env();
    env.extend(kafka::kafka_env(&topic, &kafka::fresh("group")));
    let history = generate(6, &HistoryOptions::realistic(20_000));
    let expected = ReferenceFold::of(&history).read_models();
    let (before, after) = history.split_at(10_000);
    stage.load(before).await;
    let started = Instant::now();

    // Info logs of the survivor and the relay, to check what they did.
    let mut info = env.clone();
    info.push(("LOG_LEVEL", "info".into()));
    let b_log = log.with_extension("b.log");
    let relay_log = log.with_extension("relay.log");

    let consume = ["run", "--source", "kafka"];
    let mut a = kafka::spawn(&consume, &env, &log);
    let mut b = kafka::spawn(&consume, &info, &b_log);

    // The relay dies while publishing its initial snapshot...
    let mut relay = kafka::spawn(&["relay"], &info, &relay_log);
    wait_for("published before the first kill", 2_000, &stage, || {
        kafka::processed(&stage)
    })
    .await;
    kafka::kill_9(&mut relay);
    let mut relay = kafka::spawn(&["relay"], &info, &relay_log);
    // ... and while streaming rows committed after it (ten transactions).
    for chunk in after.chunks(1_000) {
        stage.load(chunk).await;
    }
    wait_for("published before the second kill", 14_000, &stage, || {
        kafka::processed(&stage)
    })
    .await;
    kafka::kill_9(&mut relay);
    let mut relay = kafka::spawn(&["relay"], &info, &relay_log);

    // One consumer dies mid-stream; the other takes over its partitions.
    let users = || async { stage.mongo.store.count(USERS).await.unwrap_or(0) as i64 };
    wait_for(
        "users projected before the consumer kill",
        300,
        &stage,
        users,
    )
    .await;
    kafka::kill_9(&mut a);

    let deadline = Instant::now() + LIMIT;
    loop {
        let actual = stage.mongo.read_models().await;
        if actual == expected {
            break;
        }
        assert!(
            b.0.try_wait().expect("wait").is_none(),
            "the surviving consumer exited\n{}",
            kafka::tail(&b_log)
        );
        if Instant::now() > deadline {
            eprintln!("{}\n{}", kafka::tail(&log), kafka::tail(&b_log));
            stage.assert_converged(&history, false).await;
            panic!("the read models differ from the fold");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    eprintln!(
        "converged after {:?}: {} users, {} activities, {} dead letters",
        started.elapsed(),
        expected.users.len(),
        expected.activities.len(),
        expected.dead_letters.len()
    );
    assert_eq!(
        kafka::processed(&stage).await,
        20_000,
        "the relay published every row"
    );
    kafka::terminate(&mut relay, Duration::from_secs(20));
    kafka::terminate(&mut b, Duration::from_secs(20));

    // The survivor held some partitions, then all four.
    let b_text = std::fs::read_to_string(&b_log).unwrap_or_default();
    let assignments: Vec<&str> = b_text
        .lines()
        .filter(|l| l.contains("kafka partitions assigned"))
        .collect();
    assert!(
        assignments.iter().any(|l| !l.contains("[0,1,2,3]")),
        "the survivor never shared the topic: {assignments:#?}"
    );
    assert!(
        assignments
            .last()
            .is_some_and(|l| l.contains(&format!("{topic}[0,1,2,3]"))),
        "the survivor did not take over every partition: {assignments:#?}"
    );
    // The first relay died in its snapshot, so the second took it again; the
    // third resumed from the slot the second had finished the snapshot on.
    let relay_text = std::fs::read_to_string(&relay_log).unwrap_or_default();
    let starts: Vec<&str> = relay_text
        .lines()
        .filter(|l| l.contains("relay taking the initial snapshot") || l.contains("relay resuming"))
        .collect();
    assert_eq!(starts.len(), 3, "{starts:#?}");
    assert!(
        starts[0].contains("initial snapshot") && starts[1].contains("initial snapshot"),
        "{starts:#?}"
    );
    assert!(starts[2].contains("resuming"), "{starts:#?}");
    for path in [&b_log, &relay_log] {
        let _ = std::fs::remove_file(path);
    }
}
