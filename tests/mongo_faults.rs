//! MongoDB failing under a running pipeline, through the server's `failCommand`
//! failpoint aimed at the processor alone (its `appName`): transient errors
//! with the retryable label on `update` and on `find`, dropped connections,
//! each retried without dead-lettering anything. The URI carries no
//! `heartbeatFrequencyMS`, as a user's would not: the processor's own default
//! must make recovery prompt. Prints how long the faults cost.

mod common;
use common::kafka;

use activity_event_history::{generate, HistoryOptions};
use common::mongo::{fail_command_off, FAILPOINT};
use common::pipeline::{kill_9, Stage};
use mongodb::bson::{doc, Document};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(300);

/// `failCommand` for the next `times` `commands` of the client named `app`.
async fn arm(stage: &Stage, app: &str, commands: &[&str], times: i32, data: Document) {
    let mut data = data;
    data.insert("failCommands", commands.to_vec());
    data.insert("appName", app);
    stage
        .mongo
        .store
        .client()
        .database("admin")
        .run_command(doc! {
            "configureFailPoint": "failCommand",
            "mode": { "times": times },
            "data": data,
        })
        .await
        .expect("configureFailPoint (services.sh starts the server with test commands)");
}

/// The test URI without its heartbeat setting, named `app`.
fn uri_for(stage: &Stage, app: &str) -> String {
    let uri = stage.mongo.uri.replace("&heartbeatFrequencyMS=500", "");
    let uri = uri.replace("heartbeatFrequencyMS=500&", "");
    let joiner = if uri.contains('?') { '&' } else { '?' };
    format!("{uri}{joiner}appName={app}")
}

/// Runs the processor through `faults` armed one after the other while a
/// history is written, and returns how long convergence took.
async fn converges_through(seed: u64, faults: &[(&[&str], i32, Document)]) -> Duration {
    let _failpoint = FAILPOINT.lock().await;
    let stage = Stage::new().await;
    let _slots = kafka::Slots(stage.pg.config.clone());
    let app = format!("aep-faults-{seed}");
    let history = generate(seed, &HistoryOptions::realistic(1_500));
    let (first, rest) = history.split_at(500);
    stage.load(first).await;
    let env = [
        ("MONGODB_URI", uri_for(&stage, &app)),
        ("BATCH_SIZE", "100".to_string()),
    ];
    let mut child = stage.spawn(&[], &env);
    stage.wait_converged(first, LIMIT).await;
    let started = Instant::now();
    for (commands, times, data) in faults {
        arm(&stage, &app, commands, *times, data.clone()).await;
    }
    for chunk in rest.chunks(100) {
        stage.load(chunk).await;
    }
    stage.wait_converged(&history, LIMIT).await;
    let took = started.elapsed();
    fail_command_off(&stage.mongo.store).await;
    kill_9(&mut child);
    // Nothing was dead-lettered for the faults: the fold's poison only.
    stage.assert_converged(&history, true).await;
    let _ = std::fs::remove_file(stage.log_path());
    took
}

#[tokio::test(flavor = "multi_thread")]
async fn transient_write_errors_are_retried_promptly() {
    let retryable = doc! { "errorCode": 91, "errorLabels": ["RetryableWriteError"] };
    let took = converges_through(6001, &[(&["update"], 20, retryable)]).await;
    eprintln!("20 transient update faults (code 91, RetryableWriteError): converged in {took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn transient_read_errors_and_dropped_connections_are_retried() {
    let not_primary = doc! { "errorCode": 10107 };
    let took = converges_through(6002, &[(&["find"], 10, not_primary)]).await;
    eprintln!("10 not-primary faults on find: converged in {took:?}");
    let dropped = doc! { "closeConnection": true };
    let took = converges_through(6003, &[(&["update", "find"], 10, dropped)]).await;
    eprintln!("10 dropped connections on update and find: converged in {took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transient_error_while_the_indexes_are_made_at_start_is_retried() {
    let _failpoint = FAILPOINT.lock().await;
    let stage = Stage::new().await;
    let _slots = kafka::Slots(stage.pg.config.clone());
    let app = "aep-faults-indexes";
    let history = generate(6004, &HistoryOptions::realistic(200));
    stage.load(&history).await;
    // Armed before the process starts: its first index creations fail.
    let not_primary = doc! { "errorCode": 10107 };
    arm(&stage, app, &["createIndexes"], 3, not_primary).await;
    let status = common::pipeline::wait_with_timeout(
        stage.spawn(
            &["--until-caught-up"],
            &[("MONGODB_URI", uri_for(&stage, app))],
        ),
        LIMIT,
        &stage,
    );
    fail_command_off(&stage.mongo.store).await;
    let log = std::fs::read_to_string(stage.log_path()).unwrap_or_default();
    assert!(status.success(), "{status:?}\n{log}");
    assert!(log.contains("mongodb unreachable; retrying"), "{log}");
    stage.assert_converged(&history, true).await;
    let _ = std::fs::remove_file(stage.log_path());
}
