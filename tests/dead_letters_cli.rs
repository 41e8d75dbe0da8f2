//! `dead-letters` on the real services, where the command meets trouble or
//! bad input: MongoDB or PostgreSQL unreachable changes nothing, Ctrl-C
//! stops a waiting retry with nothing changed, `discard` keeps the letter
//! with its reason, and bad input is refused (`tests/dead_letters.rs` has
//! the retries that succeed).

mod common;

use activity_event_processor::sink::deferral;
use common::kafka::{self, Slots};
use common::letters::{
    audit, closed_port, finish, letter_ids, row_count, stage_with_letters, succeeded, text, LIMIT,
};
use common::pipeline::Stage;
use mongodb::bson::{doc, Document};
use std::time::{Duration, Instant};
use uuid::Uuid;

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
