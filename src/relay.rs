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
pub(crate) mod producer;

pub use debezium::{jsonb_text, zoned_timestamp, Encoder, Message, Op, Shape, SnapshotMark};
pub use producer::{create as create_producer, murmur2, partition_for};

use crate::checkpoint::mark_outbox;
use crate::config::{Config, RelayFormat, RelaySource};
use crate::decode::OutboxEvent;
use crate::failpoint::{self, crash_point};
use crate::outbox;
use crate::policy::Backoff;
use crate::source::polling::PollingSource;
use crate::source::replication::SlotOwner;
use crate::source::{BatchOutcome, SourceError};
use capture::{Capture, Captured, SlotCapture};
use producer::{DeliveryError, Producer};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Unreachable broker or database: retried with backoff.
    #[error("{0}")]
    Transient(String),
    /// Stop with this message.
    #[error("{0}")]
    Fatal(String),
}

impl From<SourceError> for RelayError {
    fn from(err: SourceError) -> Self {
        match err {
            SourceError::Transient(text) => RelayError::Transient(text),
            SourceError::Fatal(text) => RelayError::Fatal(text),
        }
    }
}

/// Called once a batch is published (the broker acknowledged every message
/// of it): the events relayed, and how many rows of the batch could not be.
pub type OnPublished = Arc<dyn Fn(&[OutboxEvent], usize) + Send + Sync>;

#[derive(Clone, Default)]
pub struct RelayOptions {
    /// Stop once everything committed before the start is published.
    pub until_caught_up: bool,
    /// Told of every published batch (the stats file).
    pub on_published: Option<OnPublished>,
}

impl std::fmt::Debug for RelayOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayOptions")
            .field("until_caught_up", &self.until_caught_up)
            .field("on_published", &self.on_published.is_some())
            .finish()
    }
}

/// What the relay did.
#[derive(Debug, Default)]
pub struct RelayStats {
    pub relayed: AtomicU64,
    pub batches: AtomicU64,
    /// Outbox rows that do not decode (never published; marked `failed`).
    pub unpublishable: AtomicU64,
}

/// Runs the relay until shutdown (or, with `until_caught_up`, until caught up).
pub async fn run(
    config: &Config,
    options: &RelayOptions,
    shutdown: CancellationToken,
) -> Result<RelayStats, RelayError> {
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
    let mut relay = Relay {
        config,
        encoder,
        producer: Producer::new(kafka)?,
        shutdown: shutdown.clone(),
        marker: None,
        stats: RelayStats::default(),
        on_published: options.on_published.clone(),
    };
    if shape == Shape::Cdc && !relay.prepare(&topic).await? {
        return Ok(relay.stats);
    }
    let Some(mut capture) = relay.start_capture().await? else {
        return Ok(relay.stats);
    };
    tracing::info!(
        format = ?kafka.relay.format,
        schemas = kafka.relay.schemas,
        source = ?kafka.relay.source,
        topic = %if shape == Shape::Cdc { topic.clone() } else { format!("{}<aggregate type>", kafka.event_router_topic_prefix) },
        "relay started"
    );
    let pipeline = &config.pipeline;
    let mut backoff = Backoff::new(pipeline.backoff_initial, pipeline.backoff_max);
    let started = Instant::now();
    let mut last_report = Instant::now();
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        let next = tokio::select! {
            biased;
            // Shutdown first: nothing read is acknowledged, so nothing is lost.
            _ = shutdown.cancelled() => break,
            next = capture.next_batch(pipeline.batch_size, pipeline.batch_wait) => next,
        };
        match next {
            Ok(Some(captured)) => {
                backoff.reset();
                if !relay.publish(&mut capture, captured).await? {
                    break;
                }
            }
            Ok(None) => {
                if let Err(err) = capture.idle().await {
                    tracing::warn!(error = %err, "idle keep-alive failed");
                }
                if options.until_caught_up {
                    match capture.caught_up().await {
                        Ok(true) => {
                            tracing::info!("relay caught up");
                            break;
                        }
                        Ok(false) => {}
                        Err(err) if err.is_transient() => {
                            tracing::warn!(error = %err, "cannot check progress")
                        }
                        Err(err) => return Err(err.into()),
                    }
                }
            }
            Err(err) if err.is_transient() => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "outbox capture unavailable; retrying");
                if relay.pause(delay).await {
                    break;
                }
            }
            Err(err) => return Err(err.into()),
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = Instant::now();
            let relayed = relay.stats.relayed.load(Ordering::Relaxed);
            let rate = relayed as f64 / started.elapsed().as_secs_f64().max(0.001);
            tracing::info!(relayed, rate = rate.round() as u64, "relay progress");
        }
    }
    relay.producer.flush(Duration::from_secs(5));
    Ok(relay.stats)
}

struct Relay<'a> {
    config: &'a Config,
    encoder: Encoder,
    producer: Producer,
    shutdown: CancellationToken,
    /// Marks relayed rows `processed` (replication capture with MARK_PROCESSED).
    marker: Option<Client>,
    stats: RelayStats,
    on_published: Option<OnPublished>,
}

impl Relay<'_> {
    /// Sleeps `delay` unless shutdown comes first (then `true`).
    async fn pause(&self, delay: Duration) -> bool {
        tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => true,
            _ = tokio::time::sleep(delay) => false,
        }
    }

    /// Learns a topic's partitions, retrying while the brokers are
    /// unreachable; `false` on shutdown.
    async fn prepare(&mut self, topic: &str) -> Result<bool, RelayError> {
        let pipeline = &self.config.pipeline;
        let mut backoff = Backoff::new(pipeline.backoff_initial, pipeline.backoff_max);
        loop {
            match self.producer.prepare(topic).await {
                Ok(_) => return Ok(true),
                Err(RelayError::Transient(err)) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "kafka unavailable; retrying");
                    if self.pause(delay).await {
                        return Ok(false);
                    }
                }
                Err(err) => return Err(err),
            }
        }
    }

    async fn start_capture(&mut self) -> Result<Option<Capture>, RelayError> {
        let config = self.config;
        let mut backoff =
            Backoff::new(config.pipeline.backoff_initial, config.pipeline.backoff_max);
        loop {
            let started = match config.kafka.relay.source {
                RelaySource::Replication => {
                    let owner = SlotOwner::new(&config.postgres, &config.kafka.relay.slot);
                    match owner.acquire(&self.shutdown).await {
                        Ok(false) => return Ok(None),
                        Ok(true) => SlotCapture::start(
                            &config.postgres,
                            owner,
                            &config.kafka.relay.slot,
                            &config.replication.publication,
                        )
                        .await
                        .map(Capture::Replication),
                        Err(err) => Err(err),
                    }
                }
                RelaySource::Polling => {
                    PollingSource::start(&config.postgres, config.polling.clone(), identity())
                        .await
                        .map(Capture::Polling)
                }
            };
            match started {
                Ok(capture) => return Ok(Some(capture)),
                Err(err) if err.is_transient() => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "cannot start the outbox capture; retrying");
                    if self.pause(delay).await {
                        return Ok(None);
                    }
                }
                Err(err) => return Err(err.into()),
            }
        }
    }

    /// Produces a batch, waits for the broker, then acknowledges the capture.
    /// `false`: shutdown came first (nothing acknowledged).
    async fn publish(
        &mut self,
        capture: &mut Capture,
        captured: Captured,
    ) -> Result<bool, RelayError> {
        let Captured { batch, ops } = captured;
        let now = chrono::Utc::now();
        let mut messages = Vec::with_capacity(batch.events.len());
        for (event, op) in batch.events.iter().zip(ops) {
            let topic = self.encoder.topic_of(event);
            if !self.prepare(&topic).await? {
                return Ok(false);
            }
            messages.push(self.encoder.encode(event, op, now));
        }
        for letter in &batch.malformed {
            self.stats.unpublishable.fetch_add(1, Ordering::Relaxed);
            tracing::error!(event_id = %letter.event.event_id, error = %letter.error, "outbox row cannot be relayed; it is marked failed");
        }
        let pipeline = &self.config.pipeline;
        let mut backoff = Backoff::new(pipeline.backoff_initial, pipeline.backoff_max);
        crash_point(failpoint::RELAY_BEFORE_DELIVERY);
        loop {
            let delivered = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Ok(false),
                delivered = self.producer.deliver(&messages) => delivered,
            };
            match delivered {
                Ok(()) => break,
                Err(DeliveryError::Retry(err)) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "sending the batch again");
                    if self.pause(delay).await {
                        return Ok(false);
                    }
                }
                Err(DeliveryError::Fatal(err)) => return Err(RelayError::Fatal(err)),
            }
        }
        crash_point(failpoint::RELAY_AFTER_DELIVERY);
        let outcome = BatchOutcome {
            dead_letters: batch.malformed.clone(),
            retry: Vec::new(),
        };
        if matches!(capture, Capture::Replication(_)) && self.config.pipeline.mark_processed {
            let ids: Vec<uuid::Uuid> = batch.events.iter().map(|e| e.event_id).collect();
            if !self.mark(&ids, &outcome).await {
                return Ok(false);
            }
        }
        crash_point(failpoint::RELAY_BEFORE_CAPTURE_ACK);
        if let Err(err) = capture.ack(batch.ack.clone(), &outcome).await {
            // Published already: a lost acknowledgement only repeats messages.
            tracing::warn!(error = %err, "acknowledging the capture failed; some messages may be relayed again");
        }
        crash_point(failpoint::RELAY_AFTER_CAPTURE_ACK);
        self.stats
            .relayed
            .fetch_add(messages.len() as u64, Ordering::Relaxed);
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        if let Some(on_published) = &self.on_published {
            on_published(&batch.events, batch.malformed.len());
        }
        Ok(true)
    }

    /// Marks published rows `processed` (and unpublishable ones `failed`),
    /// retrying while PostgreSQL is away; `false` on shutdown.
    async fn mark(&mut self, ids: &[uuid::Uuid], outcome: &BatchOutcome) -> bool {
        let pipeline = &self.config.pipeline;
        let mut backoff = Backoff::new(pipeline.backoff_initial, pipeline.backoff_max);
        loop {
            if self.marker.as_ref().is_none_or(Client::is_closed) {
                self.marker = outbox::connect(&self.config.postgres).await.ok();
            }
            let result = match &self.marker {
                Some(client) => mark_outbox(client, ids, &outcome.dead_letters)
                    .await
                    .map_err(|e| outbox::describe(&e)),
                None => Err("no connection".to_string()),
            };
            match result {
                Ok(()) => return true,
                Err(err) => {
                    self.marker = None;
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "marking relayed rows failed; retrying");
                    if self.pause(delay).await {
                        return false;
                    }
                }
            }
        }
    }
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
