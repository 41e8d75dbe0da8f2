//! The observability server on the real network stack: a `/metrics` scrape
//! parses as Prometheus text and shows what was recorded; `/readyz` names a
//! failing check; `/healthz` follows the runtime loop; the heartbeat is
//! written and read back through a slot.

mod common;

use activity_event_processor::config::SourceKind;
use activity_event_processor::observe::heartbeat::{
    self, heartbeat_sent_at, parse_logical_message, HEARTBEAT_PREFIX,
};
use activity_event_processor::observe::{
    parse_metrics_addr, Component, Health, Outcome, DEFAULT_METRICS_ADDR,
};
use activity_event_processor::policy::RetryClass;
use common::observe::*;
use common::TestDb;
use std::time::{Duration, Instant, SystemTime};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn a_scrape_parses_and_shows_what_was_recorded() {
    let metrics = fresh_metrics();
    let (server, shutdown) = start_server(metrics, Health::new()).await;
    assert!(server.local_addr.ip().is_loopback());
    assert!(DEFAULT_METRICS_ADDR.ip().is_loopback());
    assert_eq!(
        parse_metrics_addr("127.0.0.1:9464"),
        Ok(Some(DEFAULT_METRICS_ADDR))
    );

    metrics.events(SourceKind::Replication, "UserCreated", Outcome::Received, 5);
    metrics.events(SourceKind::Replication, "UserCreated", Outcome::Applied, 4);
    metrics.events(
        SourceKind::Replication,
        "UserCreated",
        Outcome::DeadLettered,
        1,
    );
    metrics.events(SourceKind::Replication, "Nonsense", Outcome::UnknownType, 2);
    metrics.batch(7);
    for millis in [3, 40, 40, 2_000] {
        metrics.commit_to_durable(Duration::from_millis(millis));
    }
    metrics.ingestion(Duration::from_millis(2));
    metrics.mongo(2, 9);
    metrics.kafka_produced(11);
    metrics.kafka_consumer_lag("activity.events", 3, 42);
    metrics.retry(Component::Postgres, RetryClass::Connection);
    metrics.retry(Component::Postgres, RetryClass::Connection);
    metrics.dead_letters(1, Some(Duration::from_secs(90)));
    metrics.last_progress();
    metrics.slot_lag(1234);
    metrics.polling_backlog(6, Some(Duration::from_secs(3)));

    let (status, body) = get(&server, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    let samples = parse_exposition(&body);
    let events = |event_type: &str, outcome: &str| {
        sample(
            &samples,
            &format!(
                "event_processor_events_total{{source=\"replication\",event_type=\"{event_type}\",outcome=\"{outcome}\"}}"
            ),
        )
    };
    assert_eq!(events("UserCreated", "received"), 5.0);
    assert_eq!(events("UserCreated", "applied"), 4.0);
    assert_eq!(events("UserCreated", "dead_lettered"), 1.0);
    assert_eq!(events("other", "unknown_type"), 2.0);
    assert_eq!(sample(&samples, "event_processor_batches_total"), 1.0);
    assert_eq!(sample(&samples, "event_processor_batch_size_sum"), 7.0);
    let latency = |le: &str| {
        sample(
            &samples,
            &format!("event_processor_commit_to_durable_seconds_bucket{{le=\"{le}\"}}"),
        )
    };
    assert_eq!(latency("0.0025"), 0.0);
    assert_eq!(latency("0.005"), 1.0);
    assert_eq!(latency("0.05"), 3.0);
    assert_eq!(latency("2.5"), 4.0);
    assert_eq!(latency("+Inf"), 4.0);
    assert_eq!(
        sample(&samples, "event_processor_commit_to_durable_seconds_count"),
        4.0
    );
    assert_eq!(
        sample(&samples, "event_processor_ingestion_seconds_count"),
        1.0
    );
    assert_eq!(
        sample(&samples, "event_processor_mongodb_round_trips_total"),
        2.0
    );
    assert_eq!(
        sample(&samples, "event_processor_mongodb_documents_written_total"),
        9.0
    );
    assert_eq!(
        sample(&samples, "event_processor_kafka_messages_produced_total"),
        11.0
    );
    assert_eq!(
        sample(
            &samples,
            "event_processor_kafka_consumer_lag_messages{topic=\"activity.events\",partition=\"3\"}"
        ),
        42.0
    );
    assert_eq!(
        sample(
            &samples,
            "event_processor_retries_total{component=\"postgres\",class=\"connection\"}"
        ),
        2.0
    );
    assert_eq!(sample(&samples, "event_processor_dead_letters"), 1.0);
    assert_eq!(
        sample(&samples, "event_processor_dead_letters_oldest_age_seconds"),
        90.0
    );
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64();
    let progress = sample(&samples, "event_processor_last_progress_timestamp_seconds");
    assert!((now - progress).abs() < 60.0, "{progress} vs {now}");
    assert_eq!(
        sample(&samples, "event_processor_replication_slot_lag_bytes"),
        1234.0
    );
    assert_eq!(
        sample(&samples, "event_processor_polling_backlog_rows"),
        6.0
    );
    assert_eq!(
        sample(
            &samples,
            &format!(
                "event_processor_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        1.0
    );
    assert!(sample(&samples, "process_resident_memory_bytes") > 0.0);
    assert!(sample(&samples, "process_open_fds") > 0.0);
    assert!(sample(&samples, "process_start_time_seconds") <= now + 1.0);
    assert!(samples.contains_key("process_cpu_seconds_total"));

    shutdown.cancel();
    tokio::time::timeout(PATIENCE, server.task)
        .await
        .expect("the server stops on shutdown")
        .expect("the server task ends well");
}

#[tokio::test]
async fn readyz_names_a_failing_check_and_healthz_follows_the_loop() {
    let health = Health::new();
    let (server, shutdown) = start_server(fresh_metrics(), health.clone()).await;
    health.set_ok("postgres");
    health.set_ok("mongodb");
    let (status, body) = get(&server, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(ready["ready"], true);
    assert_eq!(ready["checks"].as_array().map(Vec::len), Some(2));

    health.set_failing("mongodb", "MongoDB did not answer a ping within 2 s");
    let (status, body) = get(&server, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(ready["ready"], false);
    let mongodb = ready["checks"]
        .as_array()
        .and_then(|checks| checks.iter().find(|c| c["name"] == "mongodb"))
        .expect("the mongodb check is named");
    assert_eq!(mongodb["state"], "failing");
    assert_eq!(
        mongodb["reason"],
        "MongoDB did not answer a ping within 2 s"
    );
    assert!(
        chrono::DateTime::parse_from_rfc3339(mongodb["since"].as_str().expect("since")).is_ok(),
        "{mongodb}"
    );
    health.set_ok("mongodb");
    assert_eq!(get(&server, "/readyz").await.0, 200);

    // Alive while the loop turns; not once it has been silent too long.
    health.tick();
    assert_eq!(get(&server, "/healthz").await.0, 200);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (status, body) = get(&server, "/healthz").await;
    assert_eq!(status, 503, "{body}");
    health.tick();
    assert_eq!(get(&server, "/healthz").await.0, 200);
    assert_eq!(get(&server, "/nothing-here").await.0, 404);
    shutdown.cancel();
}

#[tokio::test]
async fn heartbeats_are_written_and_read_back_through_a_slot() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let slot = slot_name();
    client
        .batch_execute("CREATE PUBLICATION aep_heartbeat_test FOR TABLE event_outbox")
        .await
        .expect("a publication for pgoutput");
    create_slot(&client, &slot).await;

    let metrics = fresh_metrics();
    let shutdown = CancellationToken::new();
    let emitter = tokio::spawn(heartbeat::run_emitter(
        db.config.clone(),
        Duration::from_millis(200),
        metrics,
        shutdown.clone(),
    ));
    let start = Instant::now();
    let mut heartbeats = Vec::new();
    while heartbeats.len() < 3 {
        assert!(
            start.elapsed() < PATIENCE,
            "no 3 heartbeats: {heartbeats:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let rows = client
            .query(
                "SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL,
                    'proto_version', '1', 'publication_names', 'aep_heartbeat_test',
                    'messages', 'true')",
                &[&slot],
            )
            .await
            .expect("peek at the slot");
        heartbeats = rows
            .iter()
            .filter_map(|row| {
                let data: Vec<u8> = row.get(0);
                let message = parse_logical_message(&data)?;
                (message.prefix == HEARTBEAT_PREFIX).then_some(())?;
                let sent = heartbeat_sent_at(message.prefix, message.content)?;
                Some((message.transactional, message.lsn, sent))
            })
            .collect();
    }
    shutdown.cancel();
    tokio::time::timeout(PATIENCE, emitter)
        .await
        .expect("the emitter stops on shutdown")
        .expect("the emitter never panics");
    for (transactional, lsn, sent) in &heartbeats {
        assert!(*transactional, "{heartbeats:?}");
        assert!(*lsn > 0);
        let age = sent.elapsed().expect("sent in the past");
        assert!(age < PATIENCE, "{age:?}");
    }
    assert!(
        heartbeats
            .windows(2)
            .all(|w| w[0].1 < w[1].1 && w[0].2 < w[1].2),
        "{heartbeats:?}"
    );
    assert!(metrics
        .render()
        .contains("event_processor_heartbeats_emitted_total"));
    let emitted = sample(
        &parse_exposition(&metrics.render()),
        "event_processor_heartbeats_emitted_total",
    );
    assert!(emitted >= heartbeats.len() as f64, "{emitted}");
    drop_slot(&client, &slot).await;
}
