//! The relay's sink: each event encoded in Debezium's format ([`Encoder`])
//! and produced to Kafka ([`Producer`]); `Ok` once the broker acknowledged
//! every message of the batch (`acks=all`). A malformed outbox row is never
//! published: it comes back as a dead letter (its row is marked `failed`).

use super::{Sink, SinkReport};
use crate::relay::producer::{Producer, Sending};
use crate::relay::{Encoder, Op, RelayError};
use crate::runtime::CrashPoints;
use crate::source::{batch_id, BatchId, SourceBatch};
use crate::stages::Stage;

/// Publishes batches to Kafka.
pub struct KafkaSink {
    encoder: Encoder,
    producer: Producer,
    /// The batches handed to the producer ahead of their `apply`, oldest
    /// first (at most two: the one being applied and the next).
    ahead: std::collections::VecDeque<Ahead>,
}

/// A batch written ahead: which one, and its deliveries.
struct Ahead {
    batch: BatchId,
    sending: Sending,
}

impl KafkaSink {
    pub fn new(encoder: Encoder, producer: Producer) -> KafkaSink {
        KafkaSink {
            encoder,
            producer,
            ahead: std::collections::VecDeque::new(),
        }
    }

    /// Encodes every event of `batch` and hands it to the producer, in order.
    async fn send<A: Sync>(&mut self, batch: &SourceBatch<A>) -> Result<Sending, RelayError> {
        let now = chrono::Utc::now();
        // Each message goes to the client as soon as it is encoded, so the
        // broker is sending the batch's first messages while the rest are
        // encoded.
        let mut sending = Sending::default();
        for (index, event) in batch.events.iter().enumerate() {
            let topic = self.encoder.topic_of(event);
            self.producer.prepare(&topic).await?;
            let op = Op::from(batch.origin(index));
            let committed = batch.commit_time(index);
            let message = self.encoder.encode_committed(event, op, committed, now);
            self.producer.send(&mut sending, &message).await?;
        }
        Ok(sending)
    }

    /// Learns a topic's partitions (every message of an aggregate goes to
    /// the partition its id hashes to).
    pub async fn prepare(&mut self, topic: &str) -> Result<(), RelayError> {
        self.producer.prepare(topic).await.map(|_| ())
    }
}

impl Sink for KafkaSink {
    type Error = RelayError;

    const CRASH_POINTS: CrashPoints = CrashPoints::RELAY;
    const COMPONENT: crate::observe::Component = crate::observe::Component::Kafka;

    async fn apply<A: Sync>(&mut self, batch: &SourceBatch<A>) -> Result<SinkReport, RelayError> {
        let started = std::time::Instant::now();
        // The batch written ahead, if it is this one; otherwise (none, or
        // one the runtime did not apply next) it is sent now. A batch sent
        // twice is a repeat on the topic, which the consumers fence.
        let sending = match self.ahead.pop_front() {
            Some(ahead) if ahead.batch == batch_id(&batch.events) => ahead.sending,
            _ => {
                self.ahead.clear();
                self.send(batch).await?
            }
        };
        self.producer.settle(sending).await?;
        crate::observe::kafka_produced(batch.events.len() as u64);
        for letter in &batch.malformed {
            tracing::error!(event_id = %letter.event.event_id, error = %letter.error, "outbox row cannot be relayed; it is marked failed");
        }
        let mut report = SinkReport {
            applied: batch.events.len(),
            dead_letters: batch.malformed.clone(),
            ..SinkReport::default()
        };
        report.stages.add(Stage::Write, started.elapsed());
        Ok(report)
    }

    /// The producer keeps each partition's messages in order across
    /// batches, and a message never times out locally: a later batch's
    /// message cannot overtake an earlier one's, whichever `apply` settles it.
    const WRITES_AHEAD: bool = true;

    async fn write_ahead<A: Sync>(&mut self, batch: &SourceBatch<A>) {
        match self.send(batch).await {
            Ok(sending) => self.ahead.push_back(Ahead {
                batch: batch_id(&batch.events),
                sending,
            }),
            Err(err) => {
                tracing::debug!(error = %crate::policy::describe(&err), "a batch was not written ahead; it is sent when applied");
            }
        }
    }

    fn interruptible(&self) -> bool {
        true
    }

    async fn close(&mut self) {
        self.producer.flush(std::time::Duration::from_secs(5));
    }
}
