//! The relay's Kafka producer: idempotent, `acks=all`, no local message
//! timeout (a timed-out message would leave a gap that later messages of its
//! partition jump), partitions chosen by the aggregate id's murmur2 hash (the
//! Java client's default partitioner), and a batch is done only when the
//! broker acknowledged every message of it.

use super::debezium::Message;
use super::RelayError;
use crate::config::KafkaConfig;
use crate::policy::{Classify, ErrorClass, RetryClass};
use crate::source::kafka::{base_config, topic_partitions, QuietContext};
use crate::telemetry::Chain;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer as _};
use std::collections::{HashMap, VecDeque};
use std::time::Duration;

/// Kafka's `Utils.murmur2` (the Java client's default partitioner hash).
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let length = data.len();
    let mut h: u32 = SEED ^ (length as u32);
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() == 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The record that produces `message` to `partition`.
pub fn record(message: &Message, partition: i32) -> FutureRecord<'_, Vec<u8>, Vec<u8>> {
    let mut headers = OwnedHeaders::new_with_capacity(message.headers.len());
    for (name, value) in message.headers.iter() {
        headers = headers.insert(Header {
            key: name,
            value: Some(value),
        });
    }
    let record = FutureRecord::to(&message.topic)
        .key(&message.key)
        .payload(&message.value)
        .partition(partition)
        .headers(headers);
    match message.timestamp {
        Some(at) => record.timestamp(at),
        None => record,
    }
}

/// The partition the Java client's default partitioner picks for `key`.
pub fn partition_for(key: &[u8], partitions: usize) -> i32 {
    let positive = (murmur2(key) & 0x7fff_ffff) as u32;
    (positive % (partitions.max(1) as u32)) as i32
}

/// Why a batch was not delivered: what failed, and the client's error
/// when there is one.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// Send the whole batch again after a pause (duplicates are fine).
    #[error("{what}")]
    Retry {
        what: String,
        #[source]
        source: Option<KafkaError>,
    },
    /// Retrying cannot fix it.
    #[error("{what}")]
    Fatal {
        what: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

pub struct Producer {
    config: KafkaConfig,
    inner: FutureProducer<QuietContext>,
    /// Partition counts of the topics seen, read once (partitions added to a
    /// topic later move aggregates: restart the relay after adding them).
    partitions: HashMap<String, usize>,
}

/// The relay's producer: idempotent, `acks=all`, no local timeout, murmur2
/// partitions.
pub fn create(config: &KafkaConfig) -> Result<FutureProducer<QuietContext>, RelayError> {
    let mut client = base_config(config);
    client
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "0")
        .set("partitioner", "murmur2_random")
        // A missing topic is an error, not a topic with the broker's default
        // partition count: partitions decide how far consumers scale.
        .set("allow.auto.create.topics", "false");
    for (key, value) in &config.producer_config.0 {
        client.set(key, value);
    }
    client
        .create_with_context(QuietContext::default())
        .map_err(|e| {
            RelayError::Fatal(format!(
                "invalid Kafka producer configuration: {}",
                config.describe_refusal(&e)
            ))
        })
}

impl Producer {
    pub fn new(config: &KafkaConfig) -> Result<Producer, RelayError> {
        Ok(Producer {
            config: config.clone(),
            inner: create(config)?,
            partitions: HashMap::new(),
        })
    }

    /// Learns a topic's partition count; a missing topic or an unreachable
    /// broker is an error (the second one transient).
    pub async fn prepare(&mut self, topic: &str) -> Result<usize, RelayError> {
        if let Some(count) = self.partitions.get(topic) {
            return Ok(*count);
        }
        let producer = self.inner.clone();
        let brokers = self.config.brokers.clone();
        let timeout = self.config.timeout;
        let topics = vec![topic.to_string()];
        let counts = tokio::task::spawn_blocking(move || {
            topic_partitions(producer.client(), &brokers, &topics, timeout)
        })
        .await
        .map_err(|e| RelayError::Fatal(format!("kafka metadata task failed: {e}")))?
        .map_err(|e| {
            if e.class() == ErrorClass::Transient {
                RelayError::Transient(Chain(&e).to_string())
            } else {
                RelayError::Fatal(Chain(&e).to_string())
            }
        })?;
        let count = counts.first().map_or(1, |(_, n)| *n);
        tracing::info!(topic, partitions = count, "relaying to topic");
        self.partitions.insert(topic.to_string(), count);
        Ok(count)
    }

    /// Hands `message` to the client (after the messages sent before it
    /// into `sending`); the broker may be sending it while the caller
    /// encodes the next. A full local queue waits for the oldest delivery.
    pub async fn send(
        &mut self,
        sending: &mut Sending,
        message: &Message,
    ) -> Result<(), DeliveryError> {
        let count = self.partitions.get(&*message.topic).copied().unwrap_or(1);
        let mut record = record(message, partition_for(&message.partition_key, count));
        loop {
            match self.inner.send_result(record) {
                Ok(future) => {
                    sending.pending.push_back(future);
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    match sending.pending.pop_front() {
                        Some(future) => {
                            if let Err(err) = settle(future).await {
                                sending.first_error.get_or_insert(err);
                            }
                        }
                        None => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
                Err((err, _)) => return Err(self.classify(err)),
            }
        }
    }

    /// Waits until the broker acknowledged every message of `sending`.
    pub async fn settle(&mut self, sending: Sending) -> Result<(), DeliveryError> {
        let Sending {
            mut pending,
            mut first_error,
        } = sending;
        let total = pending.len();
        let mut since = std::time::Instant::now();
        while let Some(mut future) = pending.pop_front() {
            // Messages never time out locally: while the broker is away this
            // waits, saying so now and then.
            let settled = loop {
                match tokio::time::timeout(STILL_WAITING, &mut future).await {
                    Ok(result) => break result,
                    Err(_) => {
                        tracing::warn!(
                            unacknowledged = pending.len() + 1,
                            batch = total,
                            waiting_s = since.elapsed().as_secs(),
                            brokers = %self.config.brokers,
                            "kafka has not acknowledged the batch yet; waiting"
                        );
                    }
                }
            };
            since = std::time::Instant::now();
            if let Err(err) = settle_result(settled) {
                first_error.get_or_insert(err);
            }
        }
        match first_error {
            None => Ok(()),
            Some(err) => Err(self.classify(err)),
        }
    }

    /// Sorts a delivery failure; a producer in a fatal state (e.g. the broker
    /// forgot its producer id) is replaced, and the batch sent again.
    fn classify(&mut self, err: KafkaError) -> DeliveryError {
        if let Some((code, reason)) = self.inner.client().fatal_error() {
            tracing::warn!(%code, reason, "the kafka producer failed fatally; starting a new one");
            match create(&self.config) {
                Ok(fresh) => self.inner = fresh,
                Err(e) => {
                    return DeliveryError::Fatal {
                        what: "cannot start a new kafka producer".into(),
                        source: Some(Box::new(e)),
                    }
                }
            }
            return DeliveryError::Retry {
                what: format!("kafka producer failed ({code}: {reason})"),
                source: None,
            };
        }
        match err.rdkafka_error_code() {
            Some(
                RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::MessageBatchTooLarge
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed
                | RDKafkaErrorCode::InvalidRecord
                | RDKafkaErrorCode::InvalidTopic
                | RDKafkaErrorCode::UnknownTopic
                | RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::UnknownPartition,
            ) => DeliveryError::Fatal {
                what: "kafka refused a message".into(),
                source: Some(Box::new(err)),
            },
            _ => DeliveryError::Retry {
                what: "kafka delivery failed".into(),
                source: Some(err),
            },
        }
    }

    /// Waits (up to `timeout`) for what is still queued; for a clean exit.
    pub fn flush(&self, timeout: Duration) {
        let _ = self.inner.flush(timeout);
    }
}

/// The kind of a delivery failure that is retried, for
/// `event_processor_retries_total{class}`.
pub fn retry_class(err: &KafkaError) -> RetryClass {
    match err.rdkafka_error_code() {
        Some(
            RDKafkaErrorCode::BrokerTransportFailure
            | RDKafkaErrorCode::AllBrokersDown
            | RDKafkaErrorCode::Resolve
            | RDKafkaErrorCode::NetworkException,
        ) => RetryClass::Connection,
        Some(
            RDKafkaErrorCode::MessageTimedOut
            | RDKafkaErrorCode::OperationTimedOut
            | RDKafkaErrorCode::RequestTimedOut,
        ) => RetryClass::Timeout,
        Some(
            RDKafkaErrorCode::LeaderNotAvailable
            | RDKafkaErrorCode::NotLeaderForPartition
            | RDKafkaErrorCode::BrokerNotAvailable
            | RDKafkaErrorCode::NotEnoughReplicas
            | RDKafkaErrorCode::NotEnoughReplicasAfterAppend
            | RDKafkaErrorCode::KafkaStorageError
            | RDKafkaErrorCode::NotController,
        ) => RetryClass::Unavailable,
        _ => RetryClass::Other,
    }
}

/// The deliveries of a batch being sent ([`Producer::send`]), in order.
#[derive(Default)]
pub struct Sending {
    pending: VecDeque<DeliveryFuture>,
    /// The first delivery found failed while the queue was full.
    first_error: Option<KafkaError>,
}

/// How long a delivery may be outstanding before the relay says it waits.
const STILL_WAITING: Duration = Duration::from_secs(30);

async fn settle(future: DeliveryFuture) -> Result<(), KafkaError> {
    settle_result(future.await)
}

fn settle_result(
    result: Result<
        rdkafka::producer::future_producer::OwnedDeliveryResult,
        futures::channel::oneshot::Canceled,
    >,
) -> Result<(), KafkaError> {
    match result {
        Ok(Ok(_delivery)) => Ok(()),
        Ok(Err((err, _message))) => Err(err),
        Err(_canceled) => Err(KafkaError::Canceled),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retried_delivery_failures_are_sorted_for_the_retries_metric() {
        let class = |code| retry_class(&KafkaError::MessageProduction(code));
        assert_eq!(
            class(RDKafkaErrorCode::BrokerTransportFailure),
            RetryClass::Connection
        );
        assert_eq!(
            class(RDKafkaErrorCode::MessageTimedOut),
            RetryClass::Timeout
        );
        assert_eq!(
            class(RDKafkaErrorCode::NotEnoughReplicas),
            RetryClass::Unavailable
        );
        assert_eq!(class(RDKafkaErrorCode::InvalidRecord), RetryClass::Other);
        let relayed = RelayError::Delivery(DeliveryError::Retry {
            what: "kafka delivery failed".into(),
            source: Some(KafkaError::MessageProduction(
                RDKafkaErrorCode::AllBrokersDown,
            )),
        });
        assert_eq!(relayed.retry_class(), RetryClass::Connection);
    }

    #[test]
    fn murmur2_matches_the_java_client() {
        // Kafka's own test vectors (clients UtilsTest.testMurmur2).
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (data, expected) in cases {
            assert_eq!(murmur2(data), expected, "{}", String::from_utf8_lossy(data));
        }
    }

    #[test]
    fn partitions_are_in_range_and_stable() {
        let key = b"7d3c9a52-1e4f-4b8a-9c61-2f5e8d7a4b10";
        let p = partition_for(key, 4);
        assert!((0..4).contains(&p));
        assert_eq!(p, partition_for(key, 4));
        assert_eq!(partition_for(key, 1), 0);
        assert_eq!(partition_for(key, 0), 0);
    }
}
