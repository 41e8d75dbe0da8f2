//! The replication source against failures: a database without the outbox,
//! a user without the replication attribute, no free slot, a crash of the
//! server, and a backlog larger than memory should hold. Each test has its own
//! database and slot; the crash test takes [`SERVER`] exclusively.

mod common;

use activity_event_processor::config::PostgresConfig;
use activity_event_processor::policy::{Classify, ErrorClass};
use activity_event_processor::source::replication::{ReplicationSource, Resume, SlotOwner};
use common::replication::*;
use common::TestDb;
use std::time::Duration;
use tokio::time::{timeout, Instant};
use uuid::Uuid;

/// `start` fails with a fatal error (no retry can fix it); its message.
async fn start_fails(config: &PostgresConfig, slot: &SlotGuard) -> String {
    let owner = SlotOwner::new(config, &slot.name);
    let started = ReplicationSource::start(config, slot.options(), owner, Resume::At(None));
    match timeout(PATIENCE, started)
        .await
        .expect("start returns in time")
    {
        Ok(_) => panic!("started, but should not have"),
        Err(err) => {
            assert_ne!(err.class(), ErrorClass::Transient, "{err}");
            err.to_string()
        }
    }
}

#[tokio::test]
async fn a_database_without_the_outbox_is_a_fatal_error_that_says_what_to_do() {
    let _shared = SERVER.read().await;
    let db = TestDb::create().await;
    let slot = SlotGuard::new(&db);
    let err = start_fails(&db.config, &slot).await;
    assert!(err.contains("run `event-processor migrate` first"), "{err}");
}

#[tokio::test]
async fn a_user_without_the_replication_attribute_gets_a_fatal_error_that_says_what_to_do() {
    let _shared = SERVER.read().await;
    let db = TestDb::migrated().await;
    let slot = SlotGuard::new(&db);
    let role = format!("aep_norepl_{}", &Uuid::new_v4().simple().to_string()[..8]);
    let owner = db.client().await;
    // The publication exists (an administrator made it); the role may read the outbox.
    owner
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN NOREPLICATION; GRANT SELECT ON event_outbox TO {role}; \
             CREATE PUBLICATION aep_outbox FOR TABLE event_outbox WITH (publish = 'insert')"
        ))
        .await
        .expect("create the role");
    let mut config = db.config.clone();
    config.user = role.clone();
    let err = start_fails(&config, &slot).await;
    owner
        .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
        .await
        .expect("drop the role");
    let wanted = format!("ALTER ROLE {role} WITH REPLICATION");
    assert!(err.contains(&wanted), "{err}");
}

#[tokio::test]
async fn no_free_replication_slot_is_a_fatal_error_that_says_what_to_do() {
    // Fills every slot of the cluster: no other test may run meanwhile.
    let _exclusive = SERVER.write().await;
    let db = TestDb::migrated().await;
    let slot = SlotGuard::new(&db);
    let client = db.client().await;
    let free: i64 = client
        .query_one(
            "SELECT current_setting('max_replication_slots')::bigint - count(*) FROM pg_replication_slots",
            &[],
        )
        .await
        .expect("count slots")
        .get(0);
    let fillers: Vec<String> = (0..free)
        .map(|i| format!("{}_fill_{i}", slot.name))
        .collect();
    for name in &fillers {
        client
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[name],
            )
            .await
            .expect("fill a slot");
    }
    let err = start_fails(&db.config, &slot).await;
    for name in &fillers {
        client
            .execute("SELECT pg_drop_replication_slot($1)", &[name])
            .await
            .expect("drop a filler slot");
    }
    assert!(err.contains("max_replication_slots"), "{err}");
}

/// This process's resident memory, in kB.
fn rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse().ok())
        .expect("VmRSS in /proc/self/status")
}

#[tokio::test]
async fn a_large_backlog_drains_in_memory_that_does_not_grow_with_it() {
    // Alone, so that other tests' memory does not blur the measure.
    let _exclusive = SERVER.write().await;
    let db = TestDb::migrated().await;
    let slot = SlotGuard::new(&db);
    let client = db.client().await;
    const SNAPSHOT: i64 = 300_000;
    const STREAMED: i64 = 100_000;
    client
        .execute(
            "INSERT INTO event_outbox (event_id, aggregate_id, aggregate_type, event_type, payload) \
             SELECT gen_random_uuid(), gen_random_uuid(), 'User', 'UserCreated', \
                    jsonb_build_object('email', 'u' || i || '@example.com', 'displayName', repeat('x', 200)) \
             FROM generate_series(1, $1::bigint) AS i",
            &[&SNAPSHOT],
        )
        .await
        .expect("fill the outbox");
    let baseline = rss_kb();
    let mut peak = baseline;
    let mut source = start(&db, &slot, None).await;
    let mut events = 0;
    let deadline = Instant::now() + Duration::from_secs(240);
    // The snapshot, then one transaction larger than many batches.
    let mut wrote_streamed = false;
    while events < SNAPSHOT + STREAMED {
        assert!(Instant::now() < deadline, "{events} events after 240 s");
        let Some(batch) = next(&mut source, 1_000).await.expect("next") else {
            continue;
        };
        events += batch.events.len() as i64;
        ack(&mut source, &batch.ack).await;
        drop(batch);
        peak = peak.max(rss_kb());
        if events >= SNAPSHOT && !wrote_streamed {
            insert(&client, STREAMED).await;
            wrote_streamed = true;
        }
    }
    assert_eq!(events, SNAPSHOT + STREAMED);
    let growth_mb = (peak - baseline) / 1024;
    eprintln!("{events} events: resident memory grew by {growth_mb} MB");
    // The backlog is ~150 MB as events: holding it would show.
    assert!(growth_mb < 48, "resident memory grew by {growth_mb} MB");
}

/// `scripts/services.sh pg-restart immediate`: a crash of the server.
async fn crash_and_restart_postgres() {
    let script = std::env::var("SERVICES_SCRIPT")
        .unwrap_or_else(|_| format!("{}/scripts/services.sh", env!("CARGO_MANIFEST_DIR")));
    let restart = tokio::process::Command::new("bash")
        .arg(&script)
        .args(["pg-restart", "immediate"])
        .output();
    let output = timeout(Duration::from_secs(120), restart)
        .await
        .expect("restart in time")
        .expect("run the services script");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "pg-restart failed: {stderr}");
}

#[tokio::test]
async fn a_server_crash_is_survived_without_loss() {
    let _exclusive = SERVER.write().await;
    let db = TestDb::migrated().await;
    let slot = SlotGuard::new(&db);
    let client = db.client().await;
    let before = insert(&client, 300).await;
    let mut source = start(&db, &slot, None).await;
    let mut seen = Seen::default();
    drain(&mut source, &mut seen, &before).await;
    let mut streamed = insert_singly(&client, 100).await;
    // Read and acknowledge some of them, then crash the server.
    read_until(&mut source, &mut seen, &streamed[..40], 10, Ack::Each).await;
    crash_and_restart_postgres().await;
    let client = db.client().await;
    streamed.extend(insert_singly(&client, 50).await);

    let mut transient = 0;
    let deadline = Instant::now() + PATIENCE;
    while !seen.has_all(&streamed) {
        assert!(Instant::now() < deadline, "rows lost after the crash");
        match next(&mut source, 50).await {
            Ok(Some(batch)) => {
                seen.record(&batch);
                ack(&mut source, &batch.ack).await;
            }
            Ok(None) => {}
            Err(err) => {
                assert_eq!(
                    err.class(),
                    ErrorClass::Transient,
                    "a crash is transient: {err}"
                );
                transient += 1;
                // The pipeline's backoff, in small.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    assert!(transient > 0, "the crash went unnoticed");
    eprintln!(
        "after the crash: {transient} transient errors, {} rows delivered twice",
        seen.duplicates()
    );
}
