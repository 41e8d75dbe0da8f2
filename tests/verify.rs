//! `verify` on the real services: no mismatch after a converged `run` of a
//! generated history (poison and unknown event types included); a field
//! corrupted by hand, a copy corrupted, a missing document, an extra one and
//! a missing dead letter are each named (exit 1); `--aggregate` narrows to
//! one aggregate and the documents that copy it; `--limit` caps what is
//! printed, not what is counted; bad input (an aggregate nothing names
//! included) and unreachable services.

mod common;

use activity_event_history::{generate, HistoryOptions};
use activity_event_processor::projection::fold::{ReadModels, ReferenceFold};
use activity_event_processor::store::mongo::{ACTIVITIES, DEAD_LETTERS, USERS};
use common::pipeline::Stage;
use mongodb::bson::{doc, Document};
use serde_json::Value;
use std::process::Output;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(120);

fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A closed port on this host.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// A stage whose read models are a converged `run` of a generated history
/// with poison, unknown types and events of aggregates never created.
async fn converged(seed: u64, events: usize) -> (Stage, ReadModels, Letters) {
    let stage = Stage::new().await;
    let history = generate(seed, &HistoryOptions::realistic(events));
    stage.load(&history).await;
    stage.run_until_caught_up(&[], &[], LIMIT);
    let fold = ReferenceFold::of(&history);
    let expected = fold.read_models();
    stage.assert_read_models(&expected, true).await;
    assert!(!expected.dead_letters.is_empty(), "the history has poison");
    (stage, expected, fold.dead_letters().clone())
}

/// Dead-lettered events: event id, aggregate id.
type Letters = std::collections::BTreeMap<uuid::Uuid, uuid::Uuid>;

async fn set(stage: &Stage, collection: &str, id: &str, update: Document) {
    let result = stage
        .mongo
        .store
        .database()
        .collection::<Document>(collection)
        .update_one(doc! { "_id": id }, update)
        .await
        .expect("update");
    assert_eq!(result.modified_count, 1, "{collection} {id} changed");
}

async fn delete(stage: &Stage, collection: &str, id: &str) {
    let result = stage
        .mongo
        .store
        .database()
        .collection::<Document>(collection)
        .delete_one(doc! { "_id": id })
        .await
        .expect("delete");
    assert_eq!(result.deleted_count, 1, "{collection} {id} deleted");
}

/// The user ids an activity document names (organizer and participants).
fn members(activity: &Value) -> Vec<String> {
    let mut ids = vec![activity["organizer"]["user_id"]
        .as_str()
        .unwrap_or("")
        .to_string()];
    if let Some(items) = activity["participants"].as_array() {
        ids.extend(
            items
                .iter()
                .filter_map(|p| Some(p["user_id"].as_str()?.to_string())),
        );
    }
    ids
}

/// The hand-made damage: which documents, chosen so that no two touch.
struct Damage {
    renamed_user: String,
    copy_activity: String,
    copy_organizer: String,
    deleted_activity: String,
    extra_user: String,
    deleted_letter: String,
    letter_aggregate: String,
    untouched_user: String,
}

fn choose(expected: &ReadModels, letters: &Letters) -> Damage {
    let organized: Vec<(&String, &Value)> = expected
        .activities
        .iter()
        .filter(|(_, a)| a["organizer"]["display_name"].is_string())
        .collect();
    let (copy_activity, copy_doc) = organized[0];
    let (deleted_activity, deleted_doc) = organized[1];
    let mut related = members(copy_doc);
    related.extend(members(deleted_doc));
    let mut free = expected.users.iter().filter(|(id, user)| {
        !related.contains(id) && user["activities"].as_array().is_some_and(|a| a.is_empty())
    });
    let renamed_user = free.next().expect("a user in no activity").0.clone();
    let untouched_user = free.next().expect("another one").0.clone();
    // A letter of an aggregate that none of the damage above touches.
    let damaged = [
        copy_activity,
        deleted_activity,
        &renamed_user,
        &untouched_user,
    ];
    let apart = |aggregate: &String| {
        let activities = &expected
            .users
            .get(aggregate)
            .map(|u| u["activities"].to_string());
        !related.contains(aggregate)
            && !damaged.contains(&aggregate)
            && !activities.as_ref().is_some_and(|a| {
                a.contains(copy_activity.as_str()) || a.contains(deleted_activity.as_str())
            })
    };
    let (letter, aggregate) = letters
        .iter()
        .map(|(letter, aggregate)| (letter.to_string(), aggregate.to_string()))
        .find(|(_, aggregate)| apart(aggregate))
        .expect("a letter apart from the rest");
    Damage {
        renamed_user,
        copy_activity: copy_activity.clone(),
        copy_organizer: copy_doc["organizer"]["user_id"]
            .as_str()
            .unwrap_or("")
            .into(),
        deleted_activity: deleted_activity.clone(),
        extra_user: uuid::Uuid::new_v4().to_string(),
        deleted_letter: letter,
        letter_aggregate: aggregate,
        untouched_user,
    }
}

async fn damage(stage: &Stage, d: &Damage) {
    let users = USERS;
    set(
        stage,
        users,
        &d.renamed_user,
        doc! { "$set": { "display_name": "Mallory" } },
    )
    .await;
    let organizer = doc! { "$set": { "organizer.display_name": "Eve" } };
    set(stage, ACTIVITIES, &d.copy_activity, organizer).await;
    delete(stage, ACTIVITIES, &d.deleted_activity).await;
    delete(stage, DEAD_LETTERS, &d.deleted_letter).await;
    stage
        .mongo
        .store
        .database()
        .collection::<Document>(users)
        .insert_one(doc! { "_id": &d.extra_user, "email": "x@example.com", "_seq": 1_i64 })
        .await
        .expect("insert the extra user");
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_finds_nothing_on_a_converged_run_and_names_each_damage() {
    let (stage, expected, letters) = converged(1414, 4_000).await;
    let started = Instant::now();
    let out = stage.command(&["verify"], &[]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert_eq!(stdout, "", "no mismatch printed");
    assert!(
        stderr.contains("verify: no mismatches; 4000 outbox rows folded"),
        "{stderr}"
    );
    eprintln!("verify of 4000 rows took {:?}", started.elapsed());

    let d = choose(&expected, &letters);
    damage(&stage, &d).await;
    let out = stage.command(&["verify"], &[]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    let old_name = &expected.users[&d.renamed_user]["display_name"];
    let organizer_name = &expected.activities[&d.copy_activity]["organizer"]["display_name"];
    let wanted = [
        format!(
            "users {} display_name: expected {old_name}, found \"Mallory\"",
            d.renamed_user
        ),
        format!(
            "activities {} organizer.display_name: expected {organizer_name}, found \"Eve\"",
            d.copy_activity
        ),
        format!("activities {}: missing document", d.deleted_activity),
        format!("users {}: extra document", d.extra_user),
        format!("dead_letters {}: missing document", d.deleted_letter),
    ];
    let lines: Vec<&str> = stdout.lines().collect();
    for want in &wanted {
        assert!(
            lines.iter().any(|l| l.starts_with(want.as_str())),
            "{want}\nin:\n{stdout}"
        );
    }
    assert_eq!(lines.len(), wanted.len(), "nothing else:\n{stdout}");
    assert!(stderr.contains("verify: 5 mismatches;"), "{stderr}");

    // --limit: two printed, all five counted.
    let out = stage.command(&["verify", "--limit", "2"], &[]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    assert!(
        stderr.contains("verify: 5 mismatches (2 shown);"),
        "{stderr}"
    );

    // --aggregate: the aggregate's own document, and the copies of it.
    let only = |id: &str| stage.command(&["verify", "--aggregate", id], &[]);
    let out = only(&d.renamed_user);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stdout.lines().collect::<Vec<_>>(), [wanted[0].as_str()]);
    let out = only(&d.copy_organizer);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.starts_with(&wanted[1]), "{stdout}");
    let out = only(&d.deleted_activity);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stdout.starts_with(&wanted[2]), "{stdout}");
    let out = only(&d.letter_aggregate);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stdout.starts_with(&wanted[4]), "{stdout}");
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let out = only(&d.untouched_user);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert_eq!(stdout, "");
    stage.mongo.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_refuses_bad_input_and_says_what_is_unreachable() {
    let stage = Stage::new().await;
    for args in [
        ["verify", "--aggregate", "not-a-uuid"],
        ["verify", "--limit", "-1"],
        ["verify", "--limit", "many"],
    ] {
        let out = stage.command(&args, &[]);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(args[2]),
            "{args:?} names the value: {stderr}"
        );
    }

    let unknown = uuid::Uuid::new_v4().to_string();
    let out = stage.command(&["verify", "--aggregate", &unknown], &[]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let said = format!("error: no outbox row and no read-model document has aggregate {unknown}");
    assert_eq!(stderr.trim_end(), said);

    let secret = "pg-secret-8841";
    let pg_down = [
        ("POSTGRES_PORT", closed_port().to_string()),
        ("POSTGRES_PASSWORD", secret.to_string()),
    ];
    let out = stage.command(&["verify"], &pg_down);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stdout, "");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.starts_with("error: cannot connect to PostgreSQL at"),
        "{stderr}"
    );
    assert!(!stderr.contains(secret), "{stderr}");

    let mongo_secret = "mongo-secret-2207";
    let uri = format!(
        "mongodb://verifier:{mongo_secret}@127.0.0.1:{}/",
        closed_port()
    );
    let started = Instant::now();
    let out = stage.command(&["verify"], &[("MONGODB_URI", uri)]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stdout, "");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.starts_with("error: cannot reach MongoDB at"),
        "{stderr}"
    );
    assert!(!stderr.contains(mongo_secret), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "gave up in time"
    );
    stage.mongo.drop().await;
}

/// The peak RSS in MiB that verify's summary line states.
fn peak_rss_mib(stderr: &str) -> f64 {
    let after = stderr.split("peak RSS ").nth(1).expect("peak RSS stated");
    after
        .split(" MiB")
        .next()
        .and_then(|n| n.parse().ok())
        .expect("MiB")
}

/// A 200k-row outbox against empty read models: every document the fold
/// defines is missing (all counted, none printed with `--limit 0`), and the
/// fold's memory grows with the aggregates, not the rows.
#[tokio::test(flavor = "multi_thread")]
async fn verify_folds_a_200k_outbox_in_bounded_memory() {
    let stage = Stage::new().await;
    let history = generate(2020, &HistoryOptions::realistic(200_000));
    stage.load(&history).await;
    let expected = ReferenceFold::of(&history).read_models();
    let defined = expected.users.len() + expected.activities.len() + expected.dead_letters.len();
    drop(history);
    let started = Instant::now();
    let out = stage.command(&["verify", "--limit", "0"], &[]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stdout, "", "--limit 0 prints none");
    let counted = format!("verify: {defined} mismatches (0 shown); 200000 outbox rows folded");
    assert!(stderr.contains(&counted), "{counted}\nin: {stderr}");
    let peak = peak_rss_mib(&stderr);
    eprintln!(
        "verify of 200k rows: {:?}, peak RSS {peak} MiB",
        started.elapsed()
    );
    assert!(peak < 128.0, "peak RSS {peak} MiB");
    stage.mongo.drop().await;
}
