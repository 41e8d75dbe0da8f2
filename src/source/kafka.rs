//! Kafka capture: a consumer-group member reading Debezium change events (or
//! Outbox Event Router output) from `KAFKA_TOPIC`. N processes in one group
//! (`KAFKA_GROUP_ID`) share the partitions; Kafka moves a dead member's
//! partitions to the others.
//!
//! Offsets: nothing is committed automatically. A batch's offsets are
//! committed (per partition, the batch's highest offset + 1, synchronously) in
//! [`Source::ack`], which the pipeline calls in batch order once MongoDB holds
//! the batch's effects; so a partition's committed offset never passes an
//! unfinished message. A rebalance can only happen while this source polls,
//! which it does only after the previous batch was acknowledged: a revoked
//! partition's finished work is therefore committed, and what the source
//! fetched of it but had not handed out is dropped (the new owner reads it again
//! from the committed offset).
//!
//! Records: each one is decoded with [`Record::decode`]; records that
//! carry no event (tombstones, heartbeats, updates, ...) are counted and
//! skipped; a record that does not decode becomes a dead letter holding the raw
//! record, and its partition goes on. An event's commit time
//! ([`SourceBatch::committed`]) is the Debezium change event's `source.ts_us` /
//! `source.ts_ms` (the commit in the source database), else the record's
//! timestamp (Event Router output: the envelope's `ts_ms`).
//!
//! Out of order: an event whose aggregate does not exist yet (with plain
//! Debezium change events keyed by `event_id`, the aggregate's creation may sit
//! in another partition) comes back from the sink as deferred: it waits and is
//! handed out again with backoff, marked [`crate::source::Retried`], until the
//! sink applies or dead-letters it (after `MAX_RETRIES` tries, or at once when
//! later events of its aggregate took effect meanwhile: see
//! `sink::deferral`). While it waits, its partition's commit stays below it.
//!
//! Lag: [`KafkaSource::lag_probe`] hands out a weak handle on the consumer
//! through which a sampler reads, per assigned partition, the committed
//! offset and the high watermark ([`LagProbe`]).
mod client;
mod lag;
mod record;
mod retry;
mod stats;
mod waiting;

pub use client::{
    base_config, consumer_config, is_unreachable, topic_partitions, QuietContext, TopicError,
};
pub use lag::{LagProbe, PartitionLag};
pub use record::Record;
pub use stats::KafkaStats;

use super::{Backlog, BatchOutcome, Source, SourceBatch, SourceError};
use crate::config::{KafkaConfig, PipelineConfig};
use crate::dead_letter::DeadLetter;
use crate::decode::{DecodeOptions, Decoded, SkipReason};
use crate::failpoint::{self, crash_point};
use crate::policy::{describe, Classify, ErrorClass};
use client::{blocking, describe_tps, lock, poll_records, positions, GroupContext, Partitions, Tp};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use retry::{Fresh, InFlight, Retries, Timed};
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// Deferred events at which the source stops taking new records until some
/// are settled (bounded memory).
const WAITING_LIMIT: usize = 10_000;

/// What a Kafka batch's acknowledgement carries.
#[derive(Debug, Clone, PartialEq)]
pub struct KafkaAck {
    /// The source's number for the batch.
    pub batch: u64,
    /// Per (topic, partition), the highest offset of the batch's records.
    pub offsets: Vec<(String, i32, i64)>,
}

/// A consumer-group member feeding the pipeline.
pub struct KafkaSource {
    /// `None` only while dropping.
    consumer: Option<Arc<BaseConsumer<GroupContext>>>,
    partitions: Arc<Mutex<Partitions>>,
    config: KafkaConfig,
    decode: DecodeOptions,
    /// Events waiting for their aggregate.
    retries: Retries,
    in_flight: VecDeque<InFlight>,
    next_batch: u64,
    /// Per partition, the offset after the highest acknowledged record.
    acked: BTreeMap<Tp, i64>,
    /// `--until-caught-up`: per partition, the end offset to reach.
    targets: BTreeMap<Tp, i64>,
    stats: Arc<KafkaStats>,
    skips_seen: HashSet<SkipReason>,
}

impl KafkaSource {
    /// Checks that the topics exist, joins the group and subscribes.
    pub async fn start(
        config: &KafkaConfig,
        pipeline: &PipelineConfig,
    ) -> Result<KafkaSource, SourceError> {
        let partitions = Arc::new(Mutex::new(Partitions::default()));
        let consumer: BaseConsumer<GroupContext> = consumer_config(config)
            .create_with_context(GroupContext::new(partitions.clone()))
            .map_err(|e| {
                SourceError::Fatal(format!(
                    "invalid Kafka consumer configuration: {}",
                    config.describe_refusal(&e)
                ))
            })?;
        let consumer = Arc::new(consumer);
        let (checked, topics, brokers, timeout) = (
            consumer.clone(),
            config.topics.clone(),
            config.brokers.clone(),
            config.timeout,
        );
        blocking(move || topic_partitions(checked.client(), &brokers, &topics, timeout))
            .await?
            .map_err(|e| match e {
                e if e.class() == ErrorClass::Transient => SourceError::Transient(describe(&e)),
                e => SourceError::Fatal(describe(&e)),
            })?;
        let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|e| SourceError::Fatal(format!("cannot subscribe to {topics:?}: {e}")))?;
        tracing::info!(brokers = %config.brokers, topics = ?config.topics, group = %config.group_id, "kafka consumer subscribed");
        let stats = Arc::new(KafkaStats::default());
        Ok(KafkaSource {
            consumer: Some(consumer),
            partitions,
            config: config.clone(),
            decode: DecodeOptions {
                format: config.format,
                event_router_topic_prefix: config.event_router_topic_prefix.clone(),
                ..DecodeOptions::default()
            },
            retries: Retries::new(
                (pipeline.backoff_initial, pipeline.backoff_max),
                stats.clone(),
            ),
            in_flight: VecDeque::new(),
            next_batch: 0,
            acked: BTreeMap::new(),
            targets: BTreeMap::new(),
            stats,
            skips_seen: HashSet::new(),
        })
    }

    pub fn stats(&self) -> Arc<KafkaStats> {
        self.stats.clone()
    }

    /// A handle to read the consumer lag of this member's partitions with
    /// (see [`LagProbe`]).
    pub fn lag_probe(&self) -> LagProbe {
        LagProbe {
            consumer: self
                .consumer
                .as_ref()
                .map_or_else(Weak::new, Arc::downgrade),
            partitions: self.partitions.clone(),
        }
    }

    fn consumer(&self) -> Result<Arc<BaseConsumer<GroupContext>>, SourceError> {
        self.consumer
            .clone()
            .ok_or_else(|| SourceError::Fatal("the kafka consumer is closed".into()))
    }

    /// Drops what is held of partitions revoked since the last call.
    fn forget_revoked(&mut self) {
        let revoked = std::mem::take(&mut lock(&self.partitions).revoked);
        for tp in &revoked {
            self.retries.waiting.forget(tp);
            self.acked.remove(tp);
            self.targets.remove(tp);
        }
    }

    /// Polls up to `max` records, waiting at most `wait` in all, and decodes
    /// them on the same blocking thread (a large poll on more than one).
    async fn poll(&self, max: usize, wait: Duration) -> Result<Vec<Polled>, SourceError> {
        let consumer = self.consumer()?;
        let partitions = self.partitions.clone();
        let options = self.decode.clone();
        let (records, error) = blocking(move || {
            let (records, error) = poll_records(&consumer, &partitions, max, wait);
            (decode_all(records, &options), error)
        })
        .await?;
        if let Some(err) = error {
            if records.is_empty() {
                tracing::debug!(error = %err, "kafka poll");
            }
        }
        Ok(records)
    }

    fn decode_into(
        &mut self,
        records: Vec<Polled>,
        events: &mut Vec<Timed>,
        malformed: &mut Vec<DeadLetter>,
        flight: &mut InFlight,
        highest: &mut BTreeMap<Tp, i64>,
    ) {
        let mut skipped = 0;
        for (record, decoded) in records {
            self.stats.records.fetch_add(1, Ordering::Relaxed);
            let tp = (record.topic.clone(), record.partition);
            let top = highest.entry(tp.clone()).or_insert(record.offset);
            *top = (*top).max(record.offset);
            match decoded {
                Ok((Decoded::Event(event), committed)) => {
                    flight.fresh.push(Fresh {
                        id: event.event_id,
                        tp,
                        offset: record.offset,
                        committed,
                    });
                    events.push((event, committed));
                }
                Ok((Decoded::Skip(reason), _)) => {
                    self.stats.skip(reason);
                    skipped += 1;
                    if self.skips_seen.insert(reason) {
                        tracing::debug!(
                            reason = reason.as_str(),
                            topic = %record.topic,
                            "skipping kafka records that carry no event (counted, logged once per reason)"
                        );
                    }
                }
                Err(err) => {
                    self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                    malformed.push(record.dead_letter(&err, &self.decode));
                }
            }
        }
        if skipped > 0 {
            // Counted once per poll, not per record (a lookup each).
            crate::observe::events(
                crate::config::SourceKind::Kafka,
                "other",
                crate::observe::Outcome::Skipped,
                skipped,
            );
        }
    }

    /// Commits, per partition, everything acknowledged and not held back by
    /// a deferred event.
    async fn commit(&mut self) -> Result<(), SourceError> {
        let due = {
            let mut partitions = lock(&self.partitions);
            for (tp, next) in &self.acked {
                if !partitions.assigned.contains(tp) {
                    continue;
                }
                let target = match self.retries.waiting.lowest_hold(tp) {
                    Some(held) => held.min(*next),
                    None => *next,
                };
                let entry = partitions.commitable.entry(tp.clone()).or_insert(target);
                *entry = (*entry).max(target);
            }
            partitions.due(None)
        };
        if due.count() == 0 {
            return Ok(());
        }
        let consumer = self.consumer()?;
        let committed = due.clone();
        crash_point(failpoint::KAFKA_BEFORE_COMMIT);
        match blocking(move || consumer.commit(&committed, CommitMode::Sync)).await? {
            Ok(()) => {
                lock(&self.partitions).record_commit(&due);
                crash_point(failpoint::KAFKA_AFTER_COMMIT);
                Ok(())
            }
            Err(err) => Err(SourceError::Transient(format!(
                "cannot commit kafka offsets (they are committed with the next batch): {err}"
            ))),
        }
    }
}

/// A polled record with what it decoded to.
type Polled = (
    Record,
    Result<crate::decode::TimedDecoded, crate::decode::DecodeError>,
);

/// Records per decoding thread below which one thread decodes them all.
const DECODE_SPLIT: usize = 128;

/// Decodes `records` in order, splitting a large poll over the available
/// cores: decoding (JSON parsing of whole change events) is most of the
/// source's own work, and the pipeline waits for it.
fn decode_all(records: Vec<Record>, options: &DecodeOptions) -> Vec<Polled> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(records.len() / DECODE_SPLIT)
        .min(4);
    if threads <= 1 {
        return records
            .into_iter()
            .map(|record| {
                let decoded = record.decode(options);
                (record, decoded)
            })
            .collect();
    }
    let per_thread = records.len().div_ceil(threads);
    let decoded: Vec<_> = std::thread::scope(|scope| {
        let parts: Vec<_> = records
            .chunks(per_thread)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .map(|record| record.decode(options))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        parts
            .into_iter()
            .flat_map(|part| {
                part.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    });
    records.into_iter().zip(decoded).collect()
}

impl Drop for KafkaSource {
    fn drop(&mut self) {
        // Leaving the group commits what is due (revocation) and blocks for a
        // moment: off the async workers where possible.
        let Some(consumer) = self.consumer.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(move || drop(consumer))
            }
            _ => drop(consumer),
        }
    }
}

impl Source for KafkaSource {
    async fn next_batch(
        &mut self,
        max_events: usize,
        max_wait: Duration,
    ) -> Result<Option<SourceBatch<KafkaAck>>, SourceError> {
        self.forget_revoked();
        let max_events = max_events.max(1);
        let mut events = Vec::new();
        let mut malformed = Vec::new();
        let mut flight = InFlight::default();
        let mut retried = Vec::new();
        let now = Instant::now();
        let due = self.retries.waiting.take_due(now, max_events);
        self.retries
            .hand_out(due, &mut events, &mut retried, &mut flight);
        let room = max_events.saturating_sub(events.len() + malformed.len());
        let mut highest = BTreeMap::new();
        let have_work = !events.is_empty() || !malformed.is_empty();
        let until_due = self
            .retries
            .waiting
            .next_due()
            .map(|at| at.saturating_duration_since(now));
        let wait = match (have_work, until_due) {
            (true, _) => Duration::ZERO,
            (false, Some(left)) => left.min(max_wait),
            (false, None) => max_wait,
        };
        if room > 0 && self.retries.waiting.held() < WAITING_LIMIT {
            let polled = Instant::now();
            let records = self.poll(room, wait).await?;
            let (count, polled) = (records.len(), polled.elapsed());
            if count > 0 {
                tracing::debug!(
                    records = count,
                    poll_ms = polled.as_secs_f64() * 1e3,
                    "kafka poll"
                );
            }
            self.forget_revoked();
            self.decode_into(
                records,
                &mut events,
                &mut malformed,
                &mut flight,
                &mut highest,
            );
        } else if !have_work {
            tokio::time::sleep(wait).await;
        }
        if events.is_empty() && malformed.is_empty() && highest.is_empty() {
            return Ok(None);
        }
        // Within a batch, one aggregate's events in sequence order (a topic
        // keyed by event_id may interleave them across partitions).
        events.sort_by_key(|(event, _)| event.sequence_id);
        let (events, committed): (Vec<_>, Vec<_>) = events.into_iter().unzip();
        self.next_batch += 1;
        flight.batch = self.next_batch;
        self.in_flight.push_back(flight);
        let ack = KafkaAck {
            batch: self.next_batch,
            offsets: highest
                .into_iter()
                .map(|((topic, partition), offset)| (topic, partition, offset))
                .collect(),
        };
        let mut batch = SourceBatch::new(events, malformed, ack);
        batch.retried = retried;
        batch.committed = committed;
        Ok(Some(batch))
    }

    type Ack = KafkaAck;

    async fn ack(&mut self, ack: KafkaAck, outcome: &BatchOutcome) -> Result<(), SourceError> {
        let flight = loop {
            match self.in_flight.pop_front() {
                Some(flight) if flight.batch == ack.batch => break Some(flight),
                Some(flight) if flight.batch < ack.batch => {
                    // Never acknowledged (its batch was abandoned): its holds stay
                    // until a rebalance or restart redelivers it.
                    tracing::warn!(batch = flight.batch, "a kafka batch was never acknowledged");
                }
                Some(flight) => {
                    self.in_flight.push_front(flight);
                    break None;
                }
                None => break None,
            }
        };
        let Some(flight) = flight else {
            return Err(SourceError::Fatal(format!(
                "acknowledgement of unknown kafka batch {}",
                ack.batch
            )));
        };
        self.retries.settle(flight, outcome)?;
        for (topic, partition, offset) in ack.offsets {
            let next = self.acked.entry((topic, partition)).or_insert(offset + 1);
            *next = (*next).max(offset + 1);
        }
        self.commit().await
    }

    async fn idle(&mut self) -> Result<(), SourceError> {
        self.commit().await
    }

    /// Every assigned partition is read up to the end it had when first
    /// checked, and everything read is settled. Against tansu the end offsets
    /// can be wrong (the test broker, tansu): tests there watch the read models
    /// instead.
    async fn caught_up(&mut self) -> Result<bool, SourceError> {
        if !self.in_flight.is_empty() || !self.retries.idle() {
            return Ok(false);
        }
        let assigned = lock(&self.partitions).assigned.clone();
        if assigned.is_empty() {
            return Ok(false);
        }
        let consumer = self.consumer()?;
        let timeout = self.config.timeout;
        let known: Vec<Tp> = self.targets.keys().cloned().collect();
        let found = blocking(move || positions(&consumer, &assigned, &known, timeout))
            .await?
            .map_err(|e| SourceError::Transient(format!("cannot read kafka offsets: {e}")))?;
        let mut done = true;
        for (tp, at, end) in found {
            if let Some(end) = end {
                self.targets.insert(tp.clone(), end);
            }
            if self.targets.get(&tp).is_some_and(|end| at < *end) {
                done = false;
            }
        }
        if done {
            let assigned = lock(&self.partitions).assigned.clone();
            tracing::info!(partitions = %describe_tps(&assigned), "kafka partitions read to their end");
        }
        Ok(done)
    }

    async fn backlog(&mut self) -> Result<Backlog, SourceError> {
        Ok(Backlog::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_poll_decodes_in_order_as_one_thread_would() {
        let options = DecodeOptions::default();
        let records: Vec<Record> = (0..1_000)
            .map(|i| Record {
                topic: "t".into(),
                partition: i % 3,
                offset: i64::from(i),
                key: None,
                value: (i % 7 != 0).then(|| {
                    if i % 5 == 0 {
                        b"not json".to_vec()
                    } else {
                        format!(
                            r#"{{"op":"c","source":{{"ts_ms":{i}}},"after":{{"event_id":"00000000-0000-0000-0000-{i:012}","sequence_id":{i},"aggregate_id":"00000000-0000-0000-0001-{i:012}","aggregate_type":"User","event_type":"UserRegistered","payload":"{{}}","created_at":1700000000000000}}}}"#
                        )
                        .into_bytes()
                    }
                }),
                headers: Vec::new(),
                timestamp: None,
            })
            .collect();
        let one: Vec<String> = records
            .iter()
            .map(|r| format!("{:?}", r.decode(&options)))
            .collect();
        let polled = decode_all(records, &options);
        assert_eq!(polled.len(), 1_000);
        for (i, (record, decoded)) in polled.iter().enumerate() {
            assert_eq!(record.offset, i as i64);
            assert_eq!(format!("{decoded:?}"), one[i]);
        }
        assert!(one.iter().any(|d| d.starts_with("Ok((Event")), "{}", one[1]);
        assert!(one.iter().any(|d| d.starts_with("Err")));
    }

    #[test]
    fn the_source_can_move_between_threads() {
        fn send<T: Send>() {}
        send::<KafkaSource>();
    }
}
