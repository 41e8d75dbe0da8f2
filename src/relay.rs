//! `relay`: publishes the outbox to Kafka in Debezium's own message format, so
//! that the Kafka path (`run --source kafka`) also works where no Debezium /
//! Kafka Connect runs: one binary, no JVM.
//!
//! Capture is the replication source on the relay's own slot (or the polling
//! source, where replication is not allowed); each batch is encoded
//! ([`debezium`]), produced by an idempotent producer with `acks=all`, and only
//! once the broker acknowledged every message of the batch is the capture
//! acknowledged (the slot confirmed, or the polled rows marked `processed`,
//! which for the relay means published). A crash anywhere therefore repeats
//! messages on the topic, and loses none; the consumers' fenced projections
//! absorb the repeats. No Kafka transactions are needed.
//!
//! Partitioning: every message of an aggregate goes to the partition that
//! `murmur2(<aggregate id>) mod <partitions>` names (change events keep
//! Debezium's `{"event_id":...}` key and get that partition explicitly; Event
//! Router records are keyed by the aggregate id, as the SMT does, and hashed
//! like the Java client hashes that key), so one aggregate's events stay in
//! order on one partition. Batches are produced one after the other, and a
//! message never times out locally, so no later message of a partition can
//! overtake an earlier one that failed.

mod capture;
pub mod debezium;
mod json;
pub(crate) mod producer;

pub use debezium::{jsonb_text, zoned_timestamp, Encoder, Message, Op, Shape, SnapshotMark};
pub use producer::{create as create_producer, murmur2, partition_for, record};

use crate::config::{Config, RelayFormat, RelaySource};
use crate::observe::Component;
use crate::runtime::{OutboxMarker, Pipeline, PipelineError, Retry, Shared};
use crate::sink::KafkaSink;
use crate::source::polling::PollingSource;
use crate::source::replication::SlotOwner;
use crate::source::SourceError;
use capture::SlotCapture;
use producer::Producer;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Unreachable broker or database: retried with backoff.
    #[error("{0}")]
    Transient(String),
    /// Stop with this message.
    #[error("{0}")]
    Fatal(String),
    /// The outbox capture cannot start.
    #[error("cannot start the outbox capture")]
    Capture(#[source] SourceError),
    /// The runtime stopped.
    #[error(transparent)]
    Stopped(#[from] PipelineError),
    /// The broker did not take a batch.
    #[error(transparent)]
    Delivery(#[from] producer::DeliveryError),
}

/// Runs the relay until shutdown (or, with `until_caught_up`, until caught
/// up), on the runtime shared with `run`: the capture is the source, the
/// topic the sink ([`KafkaSink`]).
pub async fn run(config: &Config, shared: &Shared) -> Result<(), RelayError> {
    let kafka = &config.kafka;
    let topic = kafka
        .topics
        .first()
        .cloned()
        .ok_or_else(|| RelayError::Fatal("KAFKA_TOPIC names no topic".into()))?;
    let shape = match kafka.relay.format {
        RelayFormat::Cdc => Shape::Cdc,
        RelayFormat::Outbox => Shape::EventRouter,
    };
    let encoder = Encoder::new(
        shape,
        kafka.relay.schemas,
        &topic,
        &kafka.event_router_topic_prefix,
        &config.postgres.database,
    );
    let mut sink = KafkaSink::new(encoder, Producer::new(kafka)?);
    let retry =
        Retry::new(&config.pipeline, shared.shutdown.clone()).with_health(shared.health.clone());
    if shape == Shape::Cdc {
        let prepared = retry
            .run(Component::Kafka, "kafka unavailable", async || {
                sink.prepare(&topic).await
            })
            .await?;
        if prepared.is_none() {
            return Ok(());
        }
    }
    let started = |source: &dyn std::fmt::Debug| {
        tracing::info!(
            format = ?kafka.relay.format,
            schemas = kafka.relay.schemas,
            source = ?source,
            topic = %if shape == Shape::Cdc { topic.clone() } else { format!("{}<aggregate type>", kafka.event_router_topic_prefix) },
            "relay started"
        )
    };
    match kafka.relay.source {
        RelaySource::Replication => {
            let Some(capture) = start_slot_capture(config, &retry).await? else {
                return Ok(());
            };
            started(&kafka.relay.source);
            // The relay marks relayed rows `processed` (which for it means published).
            let marker = config
                .pipeline
                .mark_processed
                .then(|| OutboxMarker::new(config.postgres.clone()));
            Pipeline::new(capture, sink, shared)
                .with_marker(marker)
                .run()
                .await?;
        }
        RelaySource::Polling => {
            let polling = retry
                .run(
                    Component::Postgres,
                    "cannot start the outbox capture",
                    async || {
                        PollingSource::start(&config.postgres, config.polling.clone(), identity())
                            .await
                    },
                )
                .await
                .map_err(RelayError::Capture)?;
            let Some(source) = polling else {
                return Ok(());
            };
            started(&kafka.relay.source);
            Pipeline::new(source, sink, shared).run().await?;
        }
    }
    Ok(())
}

/// Owns the relay's slot and starts capturing from it, retrying while
/// PostgreSQL is unreachable; `None` when shutdown came first.
async fn start_slot_capture(
    config: &Config,
    retry: &Retry,
) -> Result<Option<SlotCapture>, RelayError> {
    let relay = &config.kafka.relay;
    let owner = SlotOwner::new(&config.postgres, &relay.slot);
    let started = retry
        .run(
            Component::Replication,
            "cannot start the outbox capture",
            async || {
                if !owner.acquire(retry.shutdown()).await? {
                    return Ok(None);
                }
                SlotCapture::start(
                    &config.postgres,
                    owner.clone(),
                    &relay.slot,
                    &config.replication.publication,
                )
                .await
                .map(Some)
            },
        )
        .await
        .map_err(RelayError::Capture)?;
    Ok(started.flatten())
}

/// `lock_id` of the polling relay: host, process.
fn identity() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    let mut id = format!("relay:{host}:{}", std::process::id());
    id.truncate(80);
    id
}

impl crate::policy::Classify for crate::relay::RelayError {
    fn class(&self) -> crate::policy::ErrorClass {
        match self {
            crate::relay::RelayError::Transient(_) => crate::policy::ErrorClass::Transient,
            crate::relay::RelayError::Capture(err) => err.class(),
            crate::relay::RelayError::Delivery(producer::DeliveryError::Retry { .. }) => {
                crate::policy::ErrorClass::Transient
            }
            crate::relay::RelayError::Delivery(producer::DeliveryError::Fatal { .. }) => {
                crate::policy::ErrorClass::Fatal
            }
            crate::relay::RelayError::Fatal(_) | crate::relay::RelayError::Stopped(_) => {
                crate::policy::ErrorClass::Fatal
            }
        }
    }

    fn retry_class(&self) -> crate::policy::RetryClass {
        match self {
            crate::relay::RelayError::Capture(err) => err.retry_class(),
            crate::relay::RelayError::Delivery(producer::DeliveryError::Retry {
                source: Some(err),
                ..
            }) => producer::retry_class(err),
            _ => crate::policy::RetryClass::Other,
        }
    }
}
