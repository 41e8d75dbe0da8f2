//! A dead letter must survive a crash even when a later event of its batch
//! moves its aggregate's fence past it: `UserUpdated` for a user not created
//! yet (a dead letter in the reference fold), then that user's `UserCreated`,
//! in one batch. After the crash the redelivered `UserUpdated` is fenced off
//! as already seen, so its dead letter must have been durable before the
//! `UserCreated` was.
//!
//! Needs the `failpoints` feature, like `tests/fault_matrix.rs`.

#[cfg(not(feature = "failpoints"))]
#[test]
fn the_crash_tests_need_the_failpoints_feature() {
    panic!(
        "tests/crash_dead_letters.rs needs the crash points, which only a build with the \
         `failpoints` feature has: run it with\n    cargo test --features failpoints --test \
         crash_dead_letters\n(scripts/test.sh runs every test with --features failpoints)"
    );
}

#[cfg(feature = "failpoints")]
mod common;

#[cfg(feature = "failpoints")]
mod crashes {
    use super::common::crash;
    use super::common::kafka::{self, Slots};
    use super::common::pipeline::Stage;
    use activity_event_processor::decode::OutboxEvent;
    use activity_event_processor::failpoint;
    use chrono::{DateTime, Utc};
    use serde_json::json;
    use std::time::Duration;
    use uuid::Uuid;

    const LIMIT: Duration = Duration::from_secs(90);

    fn event(seq: i64, user: Uuid, event_type: &str, payload: serde_json::Value) -> OutboxEvent {
        OutboxEvent {
            event_id: Uuid::new_v4(),
            sequence_id: Some(seq),
            aggregate_id: user,
            aggregate_type: "User".into(),
            event_type: event_type.into(),
            payload: payload.into(),
            created_at: DateTime::<Utc>::from_timestamp(1_790_000_000 + seq, 0),
        }
    }

    /// An update of a user before its creation, the creation, and another user.
    fn history() -> Vec<OutboxEvent> {
        let (early, other) = (Uuid::new_v4(), Uuid::new_v4());
        vec![
            event(1, early, "UserUpdated", json!({"displayName": "Too Early"})),
            event(
                2,
                early,
                "UserCreated",
                json!({"email": "early@example.com", "displayName": "Early"}),
            ),
            event(
                3,
                other,
                "UserCreated",
                json!({"email": "other@example.com", "displayName": "Other"}),
            ),
        ]
    }

    /// Replication: `point` armed at the first batch, then a restart; the
    /// read models, and with `check_outbox` the outbox rows, must match.
    async fn replication_crashing_at(point: &str, check_outbox: bool) {
        let stage = Stage::new().await;
        let _slots = Slots(stage.pg.config.clone());
        let history = history();
        stage.load(&history).await;
        let log = stage.log_path();
        let mut child = crash::spawn(&["run"], &crash::armed(&stage.env(), point, 0), &log);
        let crashed = crash::aborted_at(&mut child, point, &log, LIMIT).await;
        assert!(crashed.is_ok(), "{crashed:?}\n{}", stage.log_tail());
        crash::run_until_caught_up(&[], &stage.env(), &log, LIMIT).await;
        stage.assert_converged(&history, check_outbox).await;
        let _ = std::fs::remove_file(&log);
    }

    /// The batch's own writes are durable, what comes after them not yet.
    #[tokio::test(flavor = "multi_thread")]
    async fn replication_crashing_inside_the_sink_write() {
        replication_crashing_at(failpoint::PROJECTION_AFTER_OWN_WRITES, true).await;
    }

    /// The batch is durable in MongoDB, its outbox rows are not marked yet:
    /// the redelivered update must still mark its row `failed`.
    #[tokio::test(flavor = "multi_thread")]
    async fn replication_crashing_before_the_outbox_is_marked() {
        replication_crashing_at(failpoint::PIPELINE_BEFORE_MARK_OUTBOX, true).await;
    }

    /// Kafka: the consumer defers the update (its user may be created in
    /// another partition) and dies after the batch's writes, before the
    /// acknowledgement would have recorded the deferred event.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_kafka_consumer_crashing_after_the_sink_write_of_a_deferred_event() {
        let stage = Stage::new().await;
        let _slots = Slots(stage.pg.config.clone());
        let topic = kafka::fresh("deferred");
        kafka::create_topic(&topic, 1).await;
        let mut env = stage.env();
        env.extend(kafka::kafka_env(&topic, &kafka::fresh("group")));
        let history = history();
        stage.load(&history).await;
        let log = stage.log_path();
        let relay = crash::spawn(&["relay", "--until-caught-up"], &env, &log);
        kafka::wait_success(relay, LIMIT, &log);
        let point = failpoint::PIPELINE_AFTER_SINK_WRITE;
        let consume = ["run", "--source", "kafka"];
        let mut child = crash::spawn(&consume, &crash::armed(&env, point, 0), &log);
        let crashed = crash::aborted_at(&mut child, point, &log, LIMIT).await;
        assert!(crashed.is_ok(), "{crashed:?}\n{}", stage.log_tail());
        let _consumer = crash::spawn(&consume, &env, &log);
        stage.wait_converged(&history, LIMIT).await;
        stage.assert_converged(&history, false).await;
        let _ = std::fs::remove_file(&log);
    }
}
