//! The samplers on the real services: slot lag, a stall and a dropped slot;
//! PostgreSQL stopped; the polling backlog; MongoDB and Kafka frozen (each
//! frozen or stopped server is a private one, never the shared one).

mod common;

use activity_event_processor::observe::samplers::{
    BacklogSampler, KafkaSampler, MongoSampler, Sampling, SlotLagSampler, CHECK_KAFKA,
    CHECK_MONGODB, CHECK_POSTGRES, CHECK_PROGRESS, CHECK_SLOT,
};
use activity_event_processor::observe::Health;
use common::observe::*;
use common::services::OwnServices;
use common::TestDb;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn the_slot_lag_sampler_sees_lag_a_stall_and_a_dropped_slot() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let slot = slot_name();
    create_slot(&client, &slot).await;
    client
        .batch_execute("CREATE TABLE filler (x text)")
        .await
        .expect("a table to write WAL with");

    let metrics = fresh_metrics();
    let health = Health::new();
    let durable = Arc::new(AtomicU64::new(current_lsn(&client).await));
    let acknowledged = Arc::new(AtomicU64::new(0));
    let shutdown = CancellationToken::new();
    let sampler = tokio::spawn(
        SlotLagSampler {
            pg: db.config.clone(),
            slot: slot.clone(),
            durable_lsn: durable.clone(),
            acknowledged: acknowledged.clone(),
            sampling: quick(),
            health: health.clone(),
            metrics,
        }
        .run(shutdown.clone()),
    );
    let (server, server_shutdown) = start_server(metrics, health.clone()).await;
    let lag = || async {
        let (_, body) = get(&server, "/metrics").await;
        sample(
            &parse_exposition(&body),
            "event_processor_replication_slot_lag_bytes",
        )
    };
    wait_check(&health, CHECK_SLOT, "ok").await;
    wait_check(&health, CHECK_POSTGRES, "ok").await;

    // WAL is written while the checkpoint stands still: the lag grows...
    let mut seen = Vec::new();
    for _ in 0..3 {
        client
            .batch_execute(
                "INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 200)",
            )
            .await
            .expect("write WAL");
        let written = current_lsn(&client).await - durable.load(Ordering::Acquire);
        let start = Instant::now();
        loop {
            let lag = lag().await;
            if lag >= written as f64 {
                seen.push(lag);
                break;
            }
            assert!(
                start.elapsed() < PATIENCE,
                "lag {lag} never reached {written}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    assert!(seen[0] >= 200_000.0, "{seen:?}");
    // ...and after `stall_after` of that, progress fails and /readyz says so.
    let took = wait_check(&health, CHECK_PROGRESS, "failing").await;
    assert!(took < Duration::from_secs(30), "{took:?}");
    let (status, body) = get(&server, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no progress"), "{body}");
    // An initial snapshot's batches are acknowledged while the checkpoint
    // stays at the slot's start: that is progress...
    acknowledged.fetch_add(1000, Ordering::Release);
    wait_check(&health, CHECK_PROGRESS, "ok").await;
    // ...until they stop as well.
    wait_check(&health, CHECK_PROGRESS, "failing").await;
    // The checkpoint catches up: progress is ok again.
    durable.store(current_lsn(&client).await, Ordering::Release);
    wait_check(&health, CHECK_PROGRESS, "ok").await;

    // The slot is dropped: the slot check fails, naming it; back when it is back.
    drop_slot(&client, &slot).await;
    wait_check(&health, CHECK_SLOT, "failing").await;
    let (status, body) = get(&server, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let check = ready["checks"]
        .as_array()
        .and_then(|checks| checks.iter().find(|c| c["name"] == CHECK_SLOT))
        .expect("the slot check is named");
    assert_eq!(check["state"], "failing");
    assert!(
        check["reason"]
            .as_str()
            .is_some_and(|reason| reason.contains(&slot) && reason.contains("does not exist")),
        "{check}"
    );
    create_slot(&client, &slot).await;
    durable.store(current_lsn(&client).await, Ordering::Release);
    wait_check(&health, CHECK_SLOT, "ok").await;
    wait_check(&health, CHECK_PROGRESS, "ok").await;
    let (status, body) = get(&server, "/readyz").await;
    assert_eq!(status, 200, "{body}");

    shutdown.cancel();
    server_shutdown.cancel();
    stopped(sampler).await;
    drop_slot(&client, &slot).await;
}

#[tokio::test]
async fn the_postgres_check_fails_while_the_server_is_down_and_recovers() {
    // A cluster of this test's own: the shared one is never stopped.
    let services = OwnServices::up(&["pg"]);
    let pg = common::postgres_config_at(
        &services.get("POSTGRES_HOST"),
        &services.get("POSTGRES_PORT"),
        "postgres",
    );
    let health = Health::new();
    let shutdown = CancellationToken::new();
    let sampler = tokio::spawn(
        SlotLagSampler {
            pg,
            slot: slot_name(),
            durable_lsn: Arc::new(AtomicU64::new(0)),
            acknowledged: Arc::new(AtomicU64::new(0)),
            sampling: quick(),
            health: health.clone(),
            metrics: fresh_metrics(),
        }
        .run(shutdown.clone()),
    );
    wait_check(&health, CHECK_POSTGRES, "ok").await;
    // No such slot: said so, by name.
    wait_check(&health, CHECK_SLOT, "failing").await;
    services.control(&["pg-stop", "fast"]);
    let took = wait_check(&health, CHECK_POSTGRES, "failing").await;
    assert!(took < Duration::from_secs(60), "{took:?}");
    services.control(&["pg-start"]);
    wait_check(&health, CHECK_POSTGRES, "ok").await;
    shutdown.cancel();
    stopped(sampler).await;
}

#[tokio::test]
async fn the_backlog_sampler_counts_unfinished_rows_and_sees_a_stall() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO event_outbox (event_id, aggregate_id, aggregate_type, event_type, payload, created_at)
             SELECT gen_random_uuid(), gen_random_uuid(), 'User', 'UserCreated', '{}', now() - interval '2 minutes'
             FROM generate_series(1, 7)",
        )
        .await
        .expect("insert pending rows");
    let metrics = fresh_metrics();
    let health = Health::new();
    let acknowledged = Arc::new(AtomicU64::new(0));
    let shutdown = CancellationToken::new();
    let sampler = tokio::spawn(
        BacklogSampler {
            pg: db.config.clone(),
            acknowledged: acknowledged.clone(),
            sampling: quick(),
            health: health.clone(),
            metrics,
        }
        .run(shutdown.clone()),
    );
    wait_check(&health, CHECK_POSTGRES, "ok").await;
    let samples = parse_exposition(&metrics.render());
    assert_eq!(
        sample(&samples, "event_processor_polling_backlog_rows"),
        7.0
    );
    let age = sample(
        &samples,
        "event_processor_polling_oldest_pending_age_seconds",
    );
    assert!((119.0..600.0).contains(&age), "{age}");

    // Nothing is acknowledged while 7 rows wait: a stall.
    wait_check(&health, CHECK_PROGRESS, "failing").await;
    // The rows are done (and acknowledged): no backlog, no stall.
    client
        .batch_execute("UPDATE event_outbox SET status = 'processed', published_at = now()")
        .await
        .expect("finish the rows");
    acknowledged.fetch_add(7, Ordering::Release);
    wait_check(&health, CHECK_PROGRESS, "ok").await;
    let start = Instant::now();
    while sample(
        &parse_exposition(&metrics.render()),
        "event_processor_polling_backlog_rows",
    ) != 0.0
    {
        assert!(start.elapsed() < PATIENCE, "the backlog never read 0");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let samples = parse_exposition(&metrics.render());
    assert_eq!(
        sample(
            &samples,
            "event_processor_polling_oldest_pending_age_seconds"
        ),
        0.0
    );
    shutdown.cancel();
    stopped(sampler).await;
}

#[tokio::test]
async fn the_mongodb_ping_goes_red_on_a_frozen_server_and_green_after() {
    // A server of this test's own: the shared one is never frozen.
    let services = OwnServices::up(&["mongo"]);
    let uri = services.get("MONGODB_URI");
    let database = format!(
        "aep_test_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let mongo = mongodb::Client::with_uri_str(&uri).await.expect("a client");
    mongo
        .database(&database)
        .collection::<mongodb::bson::Document>("dead_letters")
        .insert_one(mongodb::bson::doc! {
            "_id": "one",
            "first_failed_at": mongodb::bson::DateTime::from_system_time(
                SystemTime::now() - Duration::from_secs(120)),
        })
        .await
        .expect("write a dead letter");

    let metrics = fresh_metrics();
    let health = Health::new();
    let shutdown = CancellationToken::new();
    let sampler = tokio::spawn(
        MongoSampler {
            uri: uri.clone(),
            database: database.clone(),
            sampling: Sampling {
                interval: Duration::from_millis(500),
                timeout: Duration::from_secs(3),
                stall_after: Duration::from_secs(30),
            },
            health: health.clone(),
            metrics,
        }
        .run(shutdown.clone()),
    );
    wait_check(&health, CHECK_MONGODB, "ok").await;
    let start = Instant::now();
    loop {
        let samples = parse_exposition(&metrics.render());
        if sample(&samples, "event_processor_dead_letters") == 1.0 {
            let age = sample(&samples, "event_processor_dead_letters_oldest_age_seconds");
            assert!((119.0..600.0).contains(&age), "{age}");
            break;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "the dead letter was never counted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    services.control(&["freeze", "mongo"]);
    let took = wait_check(&health, CHECK_MONGODB, "failing").await;
    services.control(&["thaw", "mongo"]);
    assert!(took < Duration::from_secs(60), "{took:?}");
    let readiness = health.readiness();
    assert!(
        readiness.checks[0]
            .reason
            .as_deref()
            .is_some_and(|reason| reason.contains("ping") || reason.contains("MongoDB")),
        "{readiness:?}"
    );
    wait_check(&health, CHECK_MONGODB, "ok").await;

    shutdown.cancel();
    stopped(sampler).await;
}

#[tokio::test]
async fn the_kafka_check_goes_red_on_a_frozen_broker_and_green_after() {
    // A broker of this test's own: the shared one is never frozen.
    let services = OwnServices::up(&["kafka"]);
    let mut client = rdkafka::ClientConfig::new();
    client.set("bootstrap.servers", services.get("KAFKA_BROKERS"));
    let health = Health::new();
    let shutdown = CancellationToken::new();
    let sampler = tokio::spawn(
        KafkaSampler {
            client,
            topic: None,
            sampling: Sampling {
                interval: Duration::from_millis(500),
                timeout: Duration::from_secs(3),
                stall_after: Duration::from_secs(30),
            },
            health: health.clone(),
        }
        .run(shutdown.clone()),
    );
    wait_check(&health, CHECK_KAFKA, "ok").await;
    services.control(&["freeze", "kafka"]);
    let took = wait_check(&health, CHECK_KAFKA, "failing").await;
    services.control(&["thaw", "kafka"]);
    assert!(took < Duration::from_secs(60), "{took:?}");
    wait_check(&health, CHECK_KAFKA, "ok").await;
    shutdown.cancel();
    stopped(sampler).await;
}

#[tokio::test]
async fn one_look_of_each_sampler_fills_the_checks_a_status_shows() {
    let db = TestDb::migrated().await;
    let health = Health::new();
    let sampling = Sampling::default();
    let metrics = fresh_metrics();
    let slot = slot_name();
    SlotLagSampler {
        pg: db.config.clone(),
        slot: slot.clone(),
        durable_lsn: Arc::new(AtomicU64::new(0)),
        acknowledged: Arc::new(AtomicU64::new(0)),
        sampling,
        health: health.clone(),
        metrics,
    }
    .check_once()
    .await;
    MongoSampler {
        uri: common::mongo::mongodb_uri(),
        database: "aep_test_status".into(),
        sampling,
        health: health.clone(),
        metrics,
    }
    .check_once()
    .await;
    let mut client = rdkafka::ClientConfig::new();
    client.set(
        "bootstrap.servers",
        std::env::var("KAFKA_BROKERS").expect("KAFKA_BROKERS is set by the services script"),
    );
    KafkaSampler {
        client,
        topic: None,
        sampling,
        health: health.clone(),
    }
    .check_once()
    .await;
    let readiness = health.readiness();
    let state = |name: &str| {
        readiness
            .checks
            .iter()
            .find(|check| check.name == name)
            .map(|check| (check.state, check.reason.clone()))
    };
    assert_eq!(state(CHECK_POSTGRES), Some(("ok", None)), "{readiness:?}");
    assert_eq!(state(CHECK_MONGODB), Some(("ok", None)), "{readiness:?}");
    assert_eq!(state(CHECK_KAFKA), Some(("ok", None)), "{readiness:?}");
    let (slot_state, reason) = state(CHECK_SLOT).expect("the slot check is there");
    assert_eq!(slot_state, "failing");
    assert!(
        reason.is_some_and(|reason| reason.contains(&slot)),
        "{readiness:?}"
    );
    assert!(!readiness.ready);
}

/// The sampler task ends (its shutdown was cancelled) without a panic.
async fn stopped(sampler: tokio::task::JoinHandle<()>) {
    tokio::time::timeout(PATIENCE, sampler)
        .await
        .expect("the sampler stops on shutdown")
        .expect("the sampler never panics");
}
