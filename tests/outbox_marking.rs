//! Outbox marking: a batch's rows become `processed` only once its effects
//! are durable, and also when they reach the capture before their commit is
//! visible.
//!
//! Rows that reach the capture before their commit is visible: the walsender
//! sends a transaction once its commit record is flushed; the committing
//! session makes it visible only afterwards, and with a synchronous standby
//! only once the standby confirms. Here a private PostgreSQL names a standby
//! that never comes, so a writer's commit stays invisible for as long as the
//! test wants while the relay already publishes its rows. The marking
//! statement cannot see them then; they must still end `processed`.

mod common;
use common::faults::statuses;
use common::kafka;
use common::pipeline::Stage;
use common::services::OwnServices;

use activity_event_history::{generate, HistoryOptions};
use activity_event_processor::outbox::load::copy_events;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(90);

/// Waits until the outbox has `rows` rows, every one `processed` or
/// `failed` (the processor dead-letters the history's poison events).
async fn wait_finished(stage: &Stage, rows: i64, log: &std::path::Path) {
    let deadline = Instant::now() + LIMIT;
    loop {
        let now = statuses(stage).await;
        let finished: i64 = now
            .iter()
            .filter(|(status, _)| status == "processed" || status == "failed")
            .map(|(_, n)| n)
            .sum();
        let total: i64 = now.iter().map(|(_, n)| n).sum();
        if finished == rows && total == rows {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "outbox {now:?}, wanted {rows} rows finished\n{}",
            kafka::tail(log)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How many outbox rows this session sees.
async fn visible(stage: &Stage) -> i64 {
    statuses(stage).await.iter().map(|(_, n)| n).sum()
}

/// `ALTER SYSTEM` (alone: it refuses a transaction block), then a reload.
async fn reconfigure(admin: &tokio_postgres::Client, statement: &str) {
    admin.batch_execute(statement).await.expect(statement);
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .expect("reload the configuration");
}

/// A stage on a private PostgreSQL whose sessions commit without waiting
/// for a standby (only [`hold_commit`]'s writer asks to wait).
async fn stage() -> (OwnServices, Stage, tokio_postgres::Client) {
    let services = OwnServices::up(&["pg"]);
    let stage = Stage::on_postgres(&services).await;
    let admin = stage.pg.client().await;
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{}\" SET synchronous_commit = local",
            stage.pg.config.database
        ))
        .await
        .expect("synchronous_commit for the database");
    (services, stage, admin)
}

/// Names a synchronous standby that never comes and commits `rows` in a
/// session that waits for it: the commit is in the WAL (and decoded) but
/// invisible until [`release`].
async fn hold_commit(
    stage: &Stage,
    admin: &tokio_postgres::Client,
    rows: &[activity_event_processor::decode::OutboxEvent],
) -> tokio::task::JoinHandle<Result<u64, activity_event_processor::outbox::OutboxError>> {
    reconfigure(
        admin,
        "ALTER SYSTEM SET synchronous_standby_names = 'a_standby_that_never_comes'",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let writer = stage.pg.client().await;
    writer
        .batch_execute("SET synchronous_commit = on")
        .await
        .expect("synchronous_commit for the writer");
    let rows = rows.to_vec();
    tokio::spawn(async move { copy_events(&writer, &rows).await })
}

/// The held rows are still invisible; after long enough for a marking
/// statement to have missed them, the standby is forgotten, the commit ends
/// and every row must end finished.
async fn release_when_missed(
    stage: &Stage,
    admin: &tokio_postgres::Client,
    commit: tokio::task::JoinHandle<Result<u64, activity_event_processor::outbox::OutboxError>>,
    visible_before: usize,
    rows: usize,
    log: &std::path::Path,
) {
    assert_eq!(
        visible(stage).await,
        visible_before as i64,
        "the waiting commit's rows are visible already"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!commit.is_finished(), "the writer's commit did not wait");
    reconfigure(admin, "ALTER SYSTEM RESET synchronous_standby_names").await;
    let copied = tokio::time::timeout(LIMIT, commit)
        .await
        .expect("the writer's commit ends once no standby is named")
        .expect("writer task")
        .expect("copy the held rows");
    assert_eq!(copied, (rows - visible_before) as u64);
    wait_finished(stage, rows as i64, log).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rows_published_before_their_commit_is_visible_end_processed() {
    let (_services, stage, admin) = stage().await;
    let _slots = kafka::Slots(stage.pg.config.clone());
    let topic = kafka::fresh("late");
    kafka::create_topic(&topic, 1).await;
    let mut env = stage.kafka_env(&topic);
    env.push(("BATCH_WAIT", "50ms".into()));
    let log = stage.log_path();
    let history = generate(77, &HistoryOptions::realistic(120));
    let (first, late) = history.split_at(100);
    stage.load(first).await;
    let relay = kafka::spawn(&["relay"], &env, &log);
    wait_finished(&stage, first.len() as i64, &log).await;

    let commit = hold_commit(&stage, &admin, late).await;
    // The relay publishes the rows while their commit still waits.
    let wanted: BTreeSet<String> = late.iter().map(|e| e.event_id.to_string()).collect();
    let (seen, _) = kafka::published_ids(&topic, &wanted, LIMIT);
    assert!(
        wanted.is_subset(&seen),
        "the relay did not publish the rows whose commit waits\n{}",
        kafka::tail(&log)
    );
    release_when_missed(&stage, &admin, commit, first.len(), history.len(), &log).await;
    drop(relay);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_processor_marks_them_without_a_sweep() {
    let (_services, stage, admin) = stage().await;
    let _slots = kafka::Slots(stage.pg.config.clone());
    let history = generate(78, &HistoryOptions::realistic(120));
    let (first, late) = history.split_at(100);
    stage.load(first).await;
    let extra = [
        ("LOG_LEVEL", "info".to_string()),
        ("BATCH_WAIT", "50ms".to_string()),
    ];
    let _run = kafka::Proc(stage.spawn(&[], &extra));
    let log = stage.log_path();
    wait_finished(&stage, first.len() as i64, &log).await;

    let commit = hold_commit(&stage, &admin, late).await;
    // Applied while their commit still waits.
    stage.wait_converged(&history, LIMIT).await;
    release_when_missed(&stage, &admin, commit, first.len(), history.len(), &log).await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !text.contains("were never applied"),
        "the rows were left to the sweep:\n{}",
        kafka::tail(&log)
    );
}

/// The batch's update is begun beside its write and committed by `finish`:
/// before that no other session sees it, and `abort` undoes it.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_is_marked_only_when_finished_and_abort_undoes_it() {
    use activity_event_processor::runtime::OutboxMarker;
    use activity_event_processor::source::BatchOutcome;
    let stage = Stage::new().await;
    let history = generate(79, &HistoryOptions::realistic(40));
    stage.load(&history).await;
    let (first, second) = history.split_at(20);
    let pending = |n: usize| [("pending".to_string(), n as i64)];
    let mut marker = OutboxMarker::new(stage.pg.config.clone());

    marker.begin(first).await;
    assert_eq!(
        statuses(&stage).await,
        pending(history.len()),
        "visible before finish"
    );
    marker.abort().await;
    assert_eq!(
        statuses(&stage).await,
        pending(history.len()),
        "abort kept it"
    );
    // A finish after an abort marks the plain way.
    marker
        .finish(first, &BatchOutcome::default())
        .await
        .expect("mark the first half");
    assert_eq!(
        statuses(&stage).await,
        [
            ("pending".to_string(), second.len() as i64),
            ("processed".to_string(), first.len() as i64)
        ]
    );

    let outcome = refused(&second[0], 3);
    marker.begin(second).await;
    assert_eq!(
        statuses(&stage).await,
        [
            ("pending".to_string(), second.len() as i64),
            ("processed".to_string(), first.len() as i64)
        ],
        "visible before finish"
    );
    marker
        .finish(second, &outcome)
        .await
        .expect("mark the second half");
    assert_eq!(
        statuses(&stage).await,
        [
            ("failed".to_string(), 1),
            ("processed".to_string(), (history.len() - 1) as i64)
        ]
    );
}

/// Working ahead: a batch's update is told to commit while the next batch's
/// is still open. The commit lands without waiting for `finish` (which then
/// only waits for it), and the next batch's rows stay `pending` to other
/// sessions until that batch is committed in turn.
#[tokio::test(flavor = "multi_thread")]
async fn a_commit_told_ahead_lands_while_the_next_batch_stays_open() {
    use activity_event_processor::runtime::OutboxMarker;
    use activity_event_processor::source::BatchOutcome;
    let stage = Stage::new().await;
    let history = generate(83, &HistoryOptions::realistic(40));
    stage.load(&history).await;
    let (first, second) = history.split_at(20);
    let mut marker = OutboxMarker::new(stage.pg.config.clone());
    let split = [
        ("pending".to_string(), second.len() as i64),
        ("processed".to_string(), first.len() as i64),
    ];

    marker.begin(first).await;
    marker.begin(second).await;
    marker.commit(first, &BatchOutcome::default());
    let deadline = Instant::now() + Duration::from_secs(10);
    while statuses(&stage).await != split {
        assert!(
            Instant::now() < deadline,
            "the first batch's commit did not land on its own: {:?}",
            statuses(&stage).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    marker
        .finish(first, &BatchOutcome::default())
        .await
        .expect("finish the first batch");
    assert_eq!(statuses(&stage).await, split, "the second batch is open");

    let outcome = refused(&second[3], 2);
    marker
        .finish(second, &outcome)
        .await
        .expect("finish the second batch");
    assert_eq!(
        statuses(&stage).await,
        [
            ("failed".to_string(), 1),
            ("processed".to_string(), (history.len() - 1) as i64)
        ]
    );
}

/// A batch's outcome with `event` dead-lettered ("refused") after `attempts`.
fn refused(
    event: &activity_event_processor::decode::OutboxEvent,
    attempts: u32,
) -> activity_event_processor::source::BatchOutcome {
    activity_event_processor::source::BatchOutcome {
        dead_letters: vec![activity_event_processor::dead_letter::DeadLetter {
            event: event.clone(),
            error: "refused".into(),
            attempts,
        }],
        ..Default::default()
    }
}
