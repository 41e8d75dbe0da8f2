//! librdkafka clients as this process configures them: the consumer's group
//! membership (rebalances commit finished work and nothing else), the shared
//! client settings, and librdkafka's own log lines routed into `tracing`
//! without flooding it while a broker is down.

use super::record::Record;
use super::SourceError;
use crate::config::KafkaConfig;
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A topic partition.
pub type Tp = (String, i32);

/// How often the same librdkafka complaint may be logged.
const LOG_EVERY: Duration = Duration::from_secs(30);

/// The settings every client of ours starts from: brokers, a client id, and
/// the user's `KAFKA_CONFIG` (security settings and the like).
pub fn base_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.brokers)
        .set("client.id", "activity-event-processor")
        .set(
            "socket.connection.setup.timeout.ms",
            millis(config.timeout).to_string(),
        )
        .set_log_level(RDKafkaLogLevel::Info);
    for (key, value) in &config.client_config.0 {
        client.set(key, value);
    }
    client
}

/// How long the fetcher waits before looking again at a full local queue.
pub const FETCH_QUEUE_BACKOFF_MS: u64 = 50;

/// The consumer of `run --source kafka`: a group member that never commits by
/// itself and starts a new group at the earliest offsets.
pub fn consumer_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = base_config(config);
    let session = millis(config.session_timeout).max(1);
    client
        .set("group.id", &config.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        // librdkafka's default (1 s) idles the fetcher whenever its queue is
        // full; a consumer slower than the broker then drains the queue and
        // waits out the rest of the second (docs/design.md section 7).
        .set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS.to_string())
        .set("session.timeout.ms", session.to_string())
        .set(
            "heartbeat.interval.ms",
            (session / 3).clamp(1, 3000).to_string(),
        );
    for (key, value) in &config.consumer_config.0 {
        client.set(key, value);
    }
    client
}

pub fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// librdkafka logs every failed connection attempt; say each thing once per
/// [`LOG_EVERY`].
#[derive(Default)]
pub struct LogGate {
    last: Mutex<HashMap<String, Instant>>,
}

impl LogGate {
    fn admit(&self, key: &str) -> bool {
        let mut last = lock(&self.last);
        let now = Instant::now();
        match last.get(key) {
            Some(at) if now.duration_since(*at) < LOG_EVERY => false,
            _ => {
                if last.len() > 1000 {
                    last.clear();
                }
                last.insert(key.to_string(), now);
                true
            }
        }
    }

    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error
            | RDKafkaLogLevel::Warning => {
                // "Connect to ipv4#127.0.0.1:9092 failed: ... (after 0ms in state CONNECT)"
                let key = message.split(" (after").next().unwrap_or(message);
                if self.admit(key) {
                    tracing::warn!(facility, "kafka: {message}");
                }
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::debug!(facility, "kafka: {message}")
            }
            RDKafkaLogLevel::Debug => tracing::trace!(facility, "kafka: {message}"),
        }
    }

    fn error(&self, error: &KafkaError, reason: &str) {
        let text = format!("{error}: {reason}");
        if self.admit(&text) {
            tracing::warn!("kafka: {text}");
        }
    }
}

/// The context of producers and admin clients: logs only.
#[derive(Default)]
pub struct QuietContext {
    gate: LogGate,
}

impl ClientContext for QuietContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.gate.log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.gate.error(&error, reason);
    }
}

/// What the consumer's rebalance callbacks and the source share.
#[derive(Debug, Default)]
pub struct Partitions {
    /// The partitions this member holds now.
    pub assigned: BTreeSet<Tp>,
    /// Per partition, the offset up to which (exclusive) MongoDB durably holds
    /// the effects of every message: what may be committed.
    pub commitable: BTreeMap<Tp, i64>,
    /// Per partition, the offset last committed.
    pub committed: BTreeMap<Tp, i64>,
    /// Partitions revoked since the source last looked: it drops what it
    /// holds of them (their new owner reads them again).
    pub revoked: Vec<Tp>,
    /// Bumped on every assignment change.
    pub generation: u64,
}

impl Partitions {
    /// The offsets that may be committed and are not yet, of `only` if given.
    pub fn due(&self, only: Option<&BTreeSet<Tp>>) -> TopicPartitionList {
        let mut list = TopicPartitionList::new();
        for (tp, offset) in &self.commitable {
            if only.is_some_and(|set| !set.contains(tp)) || !self.assigned.contains(tp) {
                continue;
            }
            if self.committed.get(tp).is_some_and(|done| done >= offset) {
                continue;
            }
            // Only fails for a negative partition, which the broker never hands out.
            let _ = list.add_partition_offset(&tp.0, tp.1, Offset::Offset(*offset));
        }
        list
    }

    /// Records a successful commit of `list`.
    pub fn record_commit(&mut self, list: &TopicPartitionList) {
        for element in list.elements() {
            if let Offset::Offset(offset) = element.offset() {
                let tp = (element.topic().to_string(), element.partition());
                let entry = self.committed.entry(tp).or_insert(offset);
                *entry = (*entry).max(offset);
            }
        }
    }
}

pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain bookkeeping: keep using it.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The consumer's context: on revocation, commits what MongoDB holds of the
/// revoked partitions (and nothing beyond it) and tells the source to drop the
/// rest; on assignment, records the new partitions (they resume from their
/// committed offsets, or the earliest for a new group).
pub struct GroupContext {
    pub partitions: Arc<Mutex<Partitions>>,
    gate: LogGate,
}

impl GroupContext {
    pub fn new(partitions: Arc<Mutex<Partitions>>) -> GroupContext {
        GroupContext {
            partitions,
            gate: LogGate::default(),
        }
    }
}

impl ClientContext for GroupContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.gate.log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.gate.error(&error, reason);
    }
}

fn tps(list: &TopicPartitionList) -> BTreeSet<Tp> {
    list.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(list) = rebalance else {
            if let Rebalance::Error(err) = rebalance {
                tracing::warn!(error = %err, "kafka rebalance failed");
            }
            return;
        };
        let revoked = tps(list);
        // Finished work of the revoked partitions: commit it now, while they
        // are still ours. (The source commits after every batch, so this is
        // only what a failed commit left behind.)
        let due = lock(&self.partitions).due(Some(&revoked));
        if due.count() > 0 {
            match consumer.commit(&due, CommitMode::Sync) {
                Ok(()) => lock(&self.partitions).record_commit(&due),
                Err(err) => {
                    tracing::warn!(error = %err, "cannot commit the offsets of revoked partitions; their new owner repeats some messages")
                }
            }
        }
        let mut partitions = lock(&self.partitions);
        for tp in &revoked {
            partitions.assigned.remove(tp);
            partitions.commitable.remove(tp);
            partitions.committed.remove(tp);
            partitions.revoked.push(tp.clone());
        }
        partitions.generation += 1;
        tracing::info!(
            partitions = %describe_tps(&revoked),
            lost = consumer.assignment_lost(),
            "kafka partitions revoked"
        );
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            let assigned = tps(list);
            let mut partitions = lock(&self.partitions);
            partitions.assigned.extend(assigned.iter().cloned());
            partitions.generation += 1;
            tracing::info!(partitions = %describe_tps(&assigned), "kafka partitions assigned");
        }
    }
}

/// `topic[0,1,2] other[3]`, for logs.
pub fn describe_tps(set: &BTreeSet<Tp>) -> String {
    let mut by_topic: BTreeMap<&str, Vec<i32>> = BTreeMap::new();
    for (topic, partition) in set {
        by_topic.entry(topic).or_default().push(*partition);
    }
    if by_topic.is_empty() {
        return "none".into();
    }
    by_topic
        .iter()
        .map(|(topic, ps)| {
            let list: Vec<String> = ps.iter().map(i32::to_string).collect();
            format!("{topic}[{}]", list.join(","))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether a broker-facing error means "cannot reach it" (retry) rather than
/// "it said no".
pub fn is_unreachable(err: &KafkaError) -> bool {
    matches!(
        err.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::OperationTimedOut
                | RDKafkaErrorCode::RequestTimedOut
                | RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::Resolve
                | RDKafkaErrorCode::NetworkException
                | RDKafkaErrorCode::BrokerNotAvailable
                | RDKafkaErrorCode::CoordinatorNotAvailable
                | RDKafkaErrorCode::CoordinatorLoadInProgress
                | RDKafkaErrorCode::NotCoordinator
                | RDKafkaErrorCode::LeaderNotAvailable
                | RDKafkaErrorCode::NotLeaderForPartition
        )
    )
}

/// Checks that every topic exists (one metadata request each). Returns the
/// partition count per topic; a missing topic or an unreachable broker is an
/// error with one line of explanation.
pub fn topic_partitions<C: ClientContext>(
    client: &rdkafka::client::Client<C>,
    brokers: &str,
    topics: &[String],
    timeout: Duration,
) -> Result<Vec<(String, usize)>, TopicError> {
    let mut counts = Vec::with_capacity(topics.len());
    for topic in topics {
        let metadata = client.fetch_metadata(Some(topic), timeout).map_err(|err| {
            if is_unreachable(&err) {
                TopicError::Unreachable {
                    brokers: brokers.to_string(),
                    timeout,
                    source: err,
                }
            } else {
                TopicError::Metadata {
                    topic: topic.clone(),
                    source: err,
                }
            }
        })?;
        let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
            return Err(TopicError::Missing(topic.clone()));
        };
        match found.error() {
            None if !found.partitions().is_empty() => {
                counts.push((topic.clone(), found.partitions().len()))
            }
            None => return Err(TopicError::Missing(topic.clone())),
            Some(code) => {
                let code = RDKafkaErrorCode::from(code);
                if matches!(
                    code,
                    RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic
                ) {
                    return Err(TopicError::Missing(topic.clone()));
                }
                if matches!(code, RDKafkaErrorCode::LeaderNotAvailable) {
                    return Err(TopicError::NoLeader {
                        topic: topic.clone(),
                        brokers: brokers.to_string(),
                    });
                }
                return Err(TopicError::Broker {
                    topic: topic.clone(),
                    code,
                });
            }
        }
    }
    Ok(counts)
}

#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error("cannot reach the Kafka brokers at {brokers} within {timeout:?}")]
    Unreachable {
        brokers: String,
        timeout: Duration,
        #[source]
        source: KafkaError,
    },
    /// A topic being created, or one whose leader moves.
    #[error("topic `{topic}` has no leader yet at {brokers}")]
    NoLeader { topic: String, brokers: String },
    #[error("topic `{0}` does not exist: create it with `event-processor kafka topics create --partitions N {0}`")]
    Missing(String),
    #[error("cannot read the metadata of topic `{topic}`")]
    Metadata {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error("topic `{topic}`: {code}")]
    Broker {
        topic: String,
        code: RDKafkaErrorCode,
    },
}

/// Runs a blocking librdkafka call on the blocking pool.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, SourceError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SourceError::Fatal(format!("kafka client task failed: {e}")))
}

/// Polls until `max` records or `wait` has passed. Records of partitions
/// revoked meanwhile are dropped: they are no longer ours to hand out.
pub fn poll_records(
    consumer: &BaseConsumer<GroupContext>,
    partitions: &Mutex<Partitions>,
    max: usize,
    wait: Duration,
) -> (Vec<Record>, Option<rdkafka::error::KafkaError>) {
    let generation = lock(partitions).generation;
    let deadline = Instant::now() + wait;
    let mut records = Vec::new();
    let mut error = None;
    while records.len() < max {
        let left = deadline.saturating_duration_since(Instant::now());
        match consumer.poll(left) {
            None => break,
            Some(Ok(message)) => records.push(Record {
                topic: message.topic().to_string(),
                partition: message.partition(),
                offset: message.offset(),
                key: message.key().map(<[u8]>::to_vec),
                value: message.payload().map(<[u8]>::to_vec),
                headers: message
                    .headers()
                    .map(|headers| {
                        headers
                            .iter()
                            .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                            .collect()
                    })
                    .unwrap_or_default(),
                timestamp: message.timestamp().to_millis(),
            }),
            Some(Err(err)) => {
                error = Some(err);
                if left.is_zero() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10).min(left));
            }
        }
        if left.is_zero() {
            break;
        }
    }
    let partitions = lock(partitions);
    if partitions.generation != generation {
        records.retain(|r| {
            let tp = (r.topic.clone(), r.partition);
            partitions.assigned.contains(&tp) && !partitions.revoked.contains(&tp)
        });
    }
    (records, error)
}

/// Per assigned partition: where this member is (its position, else the
/// committed offset, else the start) and, for partitions not seen before, the
/// end offset to reach.
pub fn positions(
    consumer: &BaseConsumer<GroupContext>,
    assigned: &BTreeSet<Tp>,
    known: &[Tp],
    timeout: Duration,
) -> Result<Vec<(Tp, i64, Option<i64>)>, KafkaError> {
    let mut list = TopicPartitionList::new();
    for (topic, partition) in assigned {
        list.add_partition(topic, *partition);
    }
    let committed = consumer.committed_offsets(list, timeout)?;
    let position = consumer.position()?;
    let mut out = Vec::new();
    for (topic, partition) in assigned {
        let offset_of = |l: &TopicPartitionList| match l
            .find_partition(topic, *partition)
            .map(|e| e.offset())
        {
            Some(Offset::Offset(n)) => Some(n),
            _ => None,
        };
        let tp = (topic.clone(), *partition);
        let (low, high) = consumer.fetch_watermarks(topic, *partition, timeout)?;
        let end = (!known.contains(&tp)).then_some(high);
        let at = offset_of(&position)
            .or_else(|| offset_of(&committed))
            .unwrap_or(low);
        out.push((tp, at, end));
    }
    Ok(out)
}

impl crate::policy::Classify for crate::source::kafka::TopicError {
    fn class(&self) -> crate::policy::ErrorClass {
        match self {
            crate::source::kafka::TopicError::Unreachable { .. }
            | crate::source::kafka::TopicError::NoLeader { .. } => {
                crate::policy::ErrorClass::Transient
            }
            _ => crate::policy::ErrorClass::Fatal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_broker_is_the_source_and_not_repeated() {
        let err = TopicError::Unreachable {
            brokers: "127.0.0.1:1".into(),
            timeout: Duration::from_secs(2),
            source: KafkaError::MetadataFetch(RDKafkaErrorCode::BrokerTransportFailure),
        };
        assert_eq!(
            crate::policy::Classify::class(&err),
            crate::policy::ErrorClass::Transient
        );
        let source = std::error::Error::source(&err).expect("the client's error");
        assert_eq!(
            err.to_string(),
            "cannot reach the Kafka brokers at 127.0.0.1:1 within 2s"
        );
        assert!(!err.to_string().contains(&source.to_string()));
    }

    #[test]
    fn the_fetcher_looks_again_soon_at_a_full_queue_unless_the_user_says_otherwise() {
        let env = |pairs: &[(&str, &str)]| {
            let map = crate::config::tests::env(pairs);
            crate::config::Config::from_env(&map).expect("config").kafka
        };
        let ours = consumer_config(&env(&[]));
        assert_eq!(
            ours.get("fetch.queue.backoff.ms"),
            Some(FETCH_QUEUE_BACKOFF_MS.to_string().as_str())
        );
        let theirs = consumer_config(&env(&[(
            "KAFKA_CONSUMER_CONFIG",
            "fetch.queue.backoff.ms=500",
        )]));
        assert_eq!(theirs.get("fetch.queue.backoff.ms"), Some("500"));
    }

    #[test]
    fn due_offsets_are_those_not_yet_committed_of_assigned_partitions() {
        let mut partitions = Partitions::default();
        let a = ("t".to_string(), 0);
        let b = ("t".to_string(), 1);
        let gone = ("t".to_string(), 2);
        partitions.assigned.extend([a.clone(), b.clone()]);
        partitions.commitable.insert(a.clone(), 10);
        partitions.commitable.insert(b.clone(), 5);
        partitions.commitable.insert(gone, 7);
        partitions.committed.insert(b.clone(), 5);
        let due = partitions.due(None);
        assert_eq!(due.count(), 1);
        assert_eq!(due.elements()[0].partition(), 0);
        assert_eq!(due.elements()[0].offset(), Offset::Offset(10));
        partitions.record_commit(&due);
        assert_eq!(partitions.due(None).count(), 0);
        assert_eq!(
            partitions.due(Some(&BTreeSet::from([b.clone()]))).count(),
            0
        );
    }

    #[test]
    fn partitions_print_grouped_by_topic() {
        let set = BTreeSet::from([
            ("a".to_string(), 1),
            ("a".to_string(), 0),
            ("b".to_string(), 3),
        ]);
        assert_eq!(describe_tps(&set), "a[0,1] b[3]");
        assert_eq!(describe_tps(&BTreeSet::new()), "none");
    }

    #[test]
    fn a_repeated_complaint_is_logged_once_per_interval() {
        let gate = LogGate::default();
        assert!(gate.admit("connect failed"));
        assert!(!gate.admit("connect failed"));
        assert!(gate.admit("something else"));
    }
}
