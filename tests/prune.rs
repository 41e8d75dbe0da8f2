//! (g) `prune --older-than`: deletes only `processed` rows older than the
//! age, in batches, says how many, and keeps every unfinished row
//! (`pending`, `processing`, `retry`) and every `failed` one whatever its
//! age. The capture ignores the DELETEs (here through a publication that
//! publishes them too): a run after the prune converges.

mod common;

use activity_event_history::{generate, HistoryOptions};
use common::kafka::Slots;
use common::pipeline::Stage;
use std::collections::BTreeMap;
use std::time::Duration;
use uuid::Uuid;

const LIMIT: Duration = Duration::from_secs(120);

/// Every row's id and status.
async fn rows(stage: &Stage) -> BTreeMap<Uuid, String> {
    let client = stage.pg.client().await;
    let rows = client
        .query("SELECT event_id, status FROM event_outbox", &[])
        .await
        .expect("rows");
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn prune_deletes_old_processed_rows_only_and_the_capture_ignores_it() {
    let stage = Stage::new().await;
    let _slots = Slots(stage.pg.config.clone());
    let client = stage.pg.client().await;
    // A publication of every operation: the DELETEs reach the capture.
    client
        .batch_execute(&format!(
            "CREATE PUBLICATION {} FOR TABLE event_outbox",
            stage.slot
        ))
        .await
        .expect("publication");
    let history = generate(7100, &HistoryOptions::realistic(400));
    let (first, second) = history.split_at(300);
    stage.load(first).await;
    stage.run_until_caught_up(&[], &[], LIMIT);
    stage.load(second).await;
    // Every row is old but the last 50 of the first part; a few unfinished
    // ones are claimed or waiting to be tried again.
    client
        .batch_execute(
            "UPDATE event_outbox SET created_at = now() - interval '10 days';
             UPDATE event_outbox SET created_at = now()
               WHERE sequence_id IN (SELECT sequence_id FROM event_outbox
                                     WHERE status = 'processed' ORDER BY sequence_id DESC LIMIT 50);
             UPDATE event_outbox SET status = 'processing', lock_id = 'elsewhere'
               WHERE sequence_id IN (SELECT sequence_id FROM event_outbox
                                     WHERE status = 'pending' ORDER BY sequence_id LIMIT 5);
             UPDATE event_outbox SET status = 'retry'
               WHERE sequence_id IN (SELECT sequence_id FROM event_outbox
                                     WHERE status = 'pending' ORDER BY sequence_id LIMIT 5);",
        )
        .await
        .expect("age the rows");
    let before = rows(&stage).await;
    let old_processed = client
        .query_one(
            "SELECT count(*) FROM event_outbox
             WHERE status = 'processed' AND created_at < now() - interval '1 day'",
            &[],
        )
        .await
        .expect("count")
        .get::<_, i64>(0);
    assert!(old_processed > 100, "{old_processed}");
    for status in ["failed", "pending", "processing", "retry"] {
        assert!(before.values().any(|s| s == status), "a {status} row");
    }

    let out = stage.command(&["prune", "--older-than", "1d", "--batch-size", "37"], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("deleted {old_processed} processed rows")),
        "{stdout}"
    );
    let after = rows(&stage).await;
    assert_eq!(after.len() as i64, before.len() as i64 - old_processed);
    for (id, status) in &before {
        if status != "processed" {
            assert_eq!(after.get(id), Some(status), "{status} row {id} kept");
        }
    }
    assert_eq!(
        after.values().filter(|s| *s == "processed").count(),
        50,
        "the recent processed rows are kept"
    );
    let again = stage.command(&["prune", "--older-than", "1d"], &[]);
    assert!(String::from_utf8_lossy(&again.stdout).contains("deleted 0 processed rows"));

    // The claimed and retry rows go back to pending (their worker is gone);
    // the capture then applies the second part past the DELETEs.
    client
        .batch_execute("UPDATE event_outbox SET status = 'pending', lock_id = NULL WHERE status IN ('processing', 'retry')")
        .await
        .expect("release");
    stage.run_until_caught_up(&[], &[], LIMIT);
    stage.wait_converged(&history, LIMIT).await;
    stage.assert_converged(&history, true).await;
    let _ = std::fs::remove_file(stage.log_path());
    stage.mongo.drop().await;
}
