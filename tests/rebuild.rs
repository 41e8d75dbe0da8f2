//! `rebuild` on the real services: under a continuous writer and a live
//! `run`, with a reader polling the live collections every 50 ms, the
//! reader never finds a collection missing or empty, a corrupted document is
//! repaired, and afterwards `verify` finds nothing; killed with kill -9
//! mid-build, the live models are untouched and a rerun (which says it
//! starts over) converges; a second rebuild is refused while one runs;
//! Ctrl-C before the swap exits 130 and changes nothing; `--dry-run` names a
//! corrupted field and swaps nothing.

mod common;

use activity_event_history::{generate, HistoryOptions};
use activity_event_processor::decode::OutboxEvent;
use activity_event_processor::store::mongo::{ACTIVITIES, USERS};
use common::kafka::Proc;
use common::pipeline::{binary, kill_9, wait_with_timeout, Stage};
use mongodb::bson::{doc, Document};
use std::collections::BTreeSet;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(180);

fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `event-processor rebuild <args>` in the background, its output to `log`.
fn spawn_rebuild(stage: &Stage, args: &[&str], log: &std::path::Path) -> Child {
    let mut command = Command::new(binary());
    command.arg("rebuild").args(args).env_clear();
    for key in ["PATH", "HOME"] {
        if let Ok(value) = std::env::var(key) {
            command.env(key, value);
        }
    }
    for (key, value) in stage.env() {
        command.env(key, value);
    }
    let file = std::fs::File::create(log).expect("rebuild log");
    let err = file.try_clone().expect("rebuild log");
    command
        .current_dir(std::env::temp_dir())
        .stdout(Stdio::from(file))
        .stderr(Stdio::from(err))
        .spawn()
        .expect("spawn event-processor rebuild")
}

/// A user that no event of `rest` touches (nor copies: its email is
/// copied nowhere), with the live document's email.
async fn untouched_user(stage: &Stage, rest: &[OutboxEvent]) -> (String, String) {
    let touched: BTreeSet<uuid::Uuid> = rest.iter().map(|e| e.aggregate_id).collect();
    let users = stage
        .mongo
        .store
        .find(USERS, doc! {}, Some(doc! { "email": 1 }))
        .await
        .expect("users");
    users
        .iter()
        .find_map(|u| {
            let id = u.get_str("_id").ok()?;
            let parsed = uuid::Uuid::parse_str(id).ok()?;
            let email = u.get_str("email").ok()?;
            (!touched.contains(&parsed)).then(|| (id.to_string(), email.to_string()))
        })
        .expect("a user the rest of the history does not touch")
}

async fn email_of(stage: &Stage, id: &str) -> String {
    let found = stage
        .mongo
        .store
        .find(USERS, doc! { "_id": id }, None)
        .await
        .expect("user");
    found
        .first()
        .and_then(|d| d.get_str("email").ok())
        .unwrap_or("(missing)")
        .to_string()
}

async fn corrupt_email(stage: &Stage, id: &str) {
    let result = stage
        .mongo
        .store
        .database()
        .collection::<Document>(USERS)
        .update_one(
            doc! { "_id": id },
            doc! { "$set": { "email": "corrupted@example.invalid" } },
        )
        .await
        .expect("corrupt");
    assert_eq!(result.modified_count, 1);
}

/// The collections of the stage's database.
async fn collections(stage: &Stage) -> Vec<String> {
    stage
        .mongo
        .store
        .database()
        .list_collection_names()
        .await
        .expect("list collections")
}

#[tokio::test(flavor = "multi_thread")]
async fn rebuild_under_a_writer_and_a_reader_never_shows_a_missing_collection_and_converges() {
    let stage = Stage::new().await;
    // More than the writer gets to write: it writes until the rebuild ends.
    let history = generate(4242, &HistoryOptions::realistic(30_000));
    let (first, rest) = history.split_at(3_000);
    stage.load(first).await;
    stage.run_until_caught_up(&[], &[], LIMIT);
    let (user, email) = untouched_user(&stage, rest).await;
    corrupt_email(&stage, &user).await;
    // Killed when dropped, also when the test fails.
    let live = Proc(stage.spawn(&[], &[]));

    // The reader: every 50 ms, each live collection is there and not empty.
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let reader = {
        let store = stage.mongo.store.clone();
        let (stop, reads) = (stop.clone(), reads.clone());
        tokio::spawn(async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                for name in [USERS, ACTIVITIES] {
                    match store
                        .database()
                        .collection::<Document>(name)
                        .find_one(doc! {})
                        .await
                    {
                        Ok(Some(_)) => {}
                        Ok(None) => failures.push(format!("{name} was empty or missing")),
                        Err(err) => failures.push(format!("{name}: {err}")),
                    }
                }
                reads.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            failures
        })
    };
    // The writer: the rest of the history, a little at a time (50 events/s:
    // each catch-up pass must apply more than the writer adds meanwhile, also
    // on a loaded two-core machine beside the other tests), until the
    // rebuild has ended.
    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let rest = rest.to_vec();
        let writing = writing.clone();
        let client = stage.pg.client().await;
        tokio::spawn(async move {
            let mut written = 0;
            for chunk in rest.chunks(5) {
                if !writing.load(Ordering::SeqCst) {
                    break;
                }
                activity_event_processor::outbox::load::copy_events(&client, chunk)
                    .await
                    .expect("insert");
                written += chunk.len();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            written
        })
    };

    let log = stage.log_path().with_file_name("rebuild.log");
    let rebuild = spawn_rebuild(&stage, &["--batch-size", "500"], &log);
    let status = wait_with_timeout(rebuild, LIMIT, &stage);
    let said = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        status.success(),
        "rebuild failed: {status}\n{said}\n{}",
        stage.log_tail()
    );
    assert!(said.contains("swapped in"), "{said}");
    // Shown with `--nocapture` (the README's example session).
    eprintln!("{said}");
    assert!(said.contains("building ["), "progress shown: {said}");

    writing.store(false, Ordering::SeqCst);
    let written = writer.await.expect("writer");
    stop.store(true, Ordering::SeqCst);
    let failures = reader.await.expect("reader");
    assert!(
        reads.load(Ordering::SeqCst) > 10,
        "the reader read throughout"
    );
    assert!(failures.is_empty(), "the reader saw: {failures:?}\n{said}");
    assert!(
        written < rest.len(),
        "the writer ran out of events before the rebuild ended: make the history longer"
    );

    // The live processor goes on on the new collections.
    let written = &history[..first.len() + written];
    stage.wait_converged(written, LIMIT).await;
    assert_eq!(
        email_of(&stage, &user).await,
        email,
        "the rebuild repaired the corrupted email"
    );
    drop(live);
    stage.assert_verified();
    let left: Vec<String> = collections(&stage)
        .await
        .into_iter()
        .filter(|c| c.ends_with("__rebuild"))
        .collect();
    assert!(left.is_empty(), "no shadow collection left: {left:?}");
    assert!(
        !stage
            .log_tail()
            .contains("the rebuild that paused the writers stopped beating"),
        "the processor never had to void the pause\n{}",
        stage.log_tail()
    );
}

/// The rebuild's control document.
async fn control(stage: &Stage) -> Option<Document> {
    stage
        .mongo
        .store
        .database()
        .collection::<Document>("processor_control")
        .find_one(doc! { "_id": "rebuild" })
        .await
        .expect("control")
}

/// Waits until the rebuild's control document shows it building with rows
/// done (it must not exit first).
async fn wait_until_building(stage: &Stage, rebuild: &mut Proc, log: &std::path::Path) {
    let deadline = Instant::now() + LIMIT;
    while !control(stage)
        .await
        .is_some_and(|c| c.get_str("phase") == Ok("building") && c.get_i64("done").unwrap_or(0) > 0)
    {
        assert!(
            Instant::now() < deadline && rebuild.0.try_wait().expect("wait").is_none(),
            "the rebuild never got to building: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rebuild_killed_mid_way_leaves_the_live_models_and_a_rerun_converges() {
    let stage = Stage::new().await;
    let history = generate(777, &HistoryOptions::realistic(4_000));
    stage.load(&history).await;
    stage.run_until_caught_up(&[], &[], LIMIT);
    let before = stage.mongo.read_models().await;

    let log = stage.log_path().with_file_name("rebuild-killed.log");
    let mut first = Proc(spawn_rebuild(&stage, &["--batch-size", "20"], &log));
    wait_until_building(&stage, &mut first, &log).await;
    // One at a time: a second rebuild is refused while the first runs.
    let second = stage.command(&["rebuild"], &[]);
    let (_, err) = text(&second);
    assert_eq!(second.status.code(), Some(1), "{err}");
    assert!(err.contains("another rebuild is running"), "{err}");

    kill_9(&mut first.0);
    assert_eq!(
        stage.mongo.read_models().await,
        before,
        "the live read models are as they were"
    );
    assert!(
        collections(&stage)
            .await
            .iter()
            .any(|c| c == "users__rebuild"),
        "a half-built shadow is left"
    );

    let rerun = stage.command(&["rebuild"], &[]);
    let (out, err) = text(&rerun);
    assert_eq!(rerun.status.code(), Some(0), "{out}{err}");
    assert!(
        err.contains("starts over"),
        "the rerun says what became of the shadow: {err}"
    );
    assert!(out.contains("swapped in"), "{out}");
    stage.assert_converged(&history, false).await;
    stage.assert_verified();
    let state = control(&stage).await.expect("control");
    assert_eq!(state.get_str("state"), Ok("done"), "{state}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_names_what_would_change_and_swaps_nothing() {
    let stage = Stage::new().await;
    let history = generate(99, &HistoryOptions::realistic(3_000));
    stage.load(&history).await;
    stage.run_until_caught_up(&[], &[], LIMIT);
    let (user, email) = untouched_user(&stage, &[]).await;
    corrupt_email(&stage, &user).await;

    let dry = stage.command(&["rebuild", "--dry-run"], &[]);
    let (out, err) = text(&dry);
    // Shown with `--nocapture` (the README's example session).
    eprintln!("{out}");
    assert_eq!(dry.status.code(), Some(0), "{out}{err}");
    assert!(
        out.contains(&format!("users {user} email: the rebuild has \"{email}\", the live model \"corrupted@example.invalid\"")),
        "{out}"
    );
    assert!(out.contains("1 of "), "one document would change: {out}");
    assert!(out.contains(" 0 differ at different positions"), "{out}");
    assert!(out.contains("nothing swapped"), "{out}");
    assert_eq!(
        email_of(&stage, &user).await,
        "corrupted@example.invalid",
        "the live model is untouched"
    );
    let left: Vec<String> = collections(&stage)
        .await
        .into_iter()
        .filter(|c| c.ends_with("__rebuild"))
        .collect();
    assert!(left.is_empty(), "the dry run drops its shadow: {left:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_before_the_swap_changes_nothing_and_drops_the_shadow() {
    let stage = Stage::new().await;
    let history = generate(31, &HistoryOptions::realistic(3_000));
    stage.load(&history).await;
    stage.run_until_caught_up(&[], &[], LIMIT);
    let before = stage.mongo.read_models().await;

    let log = stage.log_path().with_file_name("rebuild-interrupted.log");
    let mut rebuild = Proc(spawn_rebuild(&stage, &["--batch-size", "20"], &log));
    wait_until_building(&stage, &mut rebuild, &log).await;
    let sent = Command::new("kill")
        .args(["-INT", &rebuild.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(sent.success());
    let stopped = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = rebuild.0.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < stopped,
            "the rebuild did not stop on SIGINT"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let said = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(status.code(), Some(130), "{said}");
    assert!(said.contains("interrupted before the swap"), "{said}");
    assert_eq!(
        stage.mongo.read_models().await,
        before,
        "the live read models are as they were"
    );
    let left: Vec<String> = collections(&stage)
        .await
        .into_iter()
        .filter(|c| c.ends_with("__rebuild"))
        .collect();
    assert!(left.is_empty(), "the shadow is dropped: {left:?}");
    let state = control(&stage).await.expect("control");
    assert_eq!(state.get_str("state"), Ok("interrupted"), "{state}");
    assert!(
        matches!(state.get("pause"), Some(mongodb::bson::Bson::Null)),
        "{state}"
    );
}
