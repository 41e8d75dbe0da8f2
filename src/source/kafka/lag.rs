//! Consumer lag: per partition assigned to this member, the messages between
//! the group's committed offset (this member's position where the group has
//! committed nothing yet, the partition's start where it has not read either)
//! and the partition's high watermark.
//!
//! Read through a [`LagProbe`], a weak handle on the source's consumer: the
//! requests (the committed offsets from the group coordinator, the watermarks
//! from each leader) go out from the caller's thread and wait on queues of
//! their own, so the source's polling is never held up by them, and the probe
//! never keeps a closed source's consumer alive.

use super::client::{lock, GroupContext, Partitions, Tp};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// What the lag sampler reads the source's consumer through.
#[derive(Clone)]
pub struct LagProbe {
    pub(super) consumer: Weak<BaseConsumer<GroupContext>>,
    pub(super) partitions: Arc<Mutex<Partitions>>,
}

/// The lag of one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLag {
    pub topic: String,
    pub partition: i32,
    /// Messages not yet committed by the group (never negative).
    pub messages: i64,
}

impl LagProbe {
    /// Blocking (up to `timeout` per request): the lag of every assigned
    /// partition, in partition order; `None` once the source's consumer is
    /// closed.
    pub fn read(&self, timeout: Duration) -> Option<Result<Vec<PartitionLag>, KafkaError>> {
        let consumer = self.consumer.upgrade()?;
        let assigned = lock(&self.partitions).assigned.clone();
        if assigned.is_empty() {
            return Some(Ok(Vec::new()));
        }
        Some(read(&consumer, assigned.into_iter().collect(), timeout))
    }
}

fn read(
    consumer: &BaseConsumer<GroupContext>,
    assigned: Vec<Tp>,
    timeout: Duration,
) -> Result<Vec<PartitionLag>, KafkaError> {
    let mut list = TopicPartitionList::new();
    for (topic, partition) in &assigned {
        list.add_partition(topic, *partition);
    }
    let committed = offsets(&consumer.committed_offsets(list, timeout)?);
    let position = offsets(&consumer.position()?);
    let mut out = Vec::with_capacity(assigned.len());
    for tp in assigned {
        let (low, high) = consumer.fetch_watermarks(&tp.0, tp.1, timeout)?;
        let from = committed.get(&tp).or(position.get(&tp)).copied();
        out.push(PartitionLag {
            messages: lag(from, low, high),
            topic: tp.0,
            partition: tp.1,
        });
    }
    Ok(out)
}

/// The real offsets of a list (not "invalid", "end", ...).
fn offsets(list: &TopicPartitionList) -> BTreeMap<Tp, i64> {
    list.elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(n) => Some(((e.topic().to_string(), e.partition()), n)),
            _ => None,
        })
        .collect()
}

/// Messages from `from` (the partition's start when unknown, or when
/// retention removed what it points at) to the high watermark `high`.
fn lag(from: Option<i64>, low: i64, high: i64) -> i64 {
    let from = from.unwrap_or(low).max(low);
    high.saturating_sub(from).max(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_counts_from_the_committed_offset_to_the_high_watermark() {
        assert_eq!(lag(Some(40), 0, 100), 60);
        assert_eq!(lag(Some(100), 0, 100), 0);
        // Nothing committed or read: the whole partition.
        assert_eq!(lag(None, 10, 100), 90);
        // Retention removed what the offset points at.
        assert_eq!(lag(Some(3), 10, 100), 90);
        // A watermark read before the commit it trails: never negative.
        assert_eq!(lag(Some(101), 0, 100), 0);
    }

    #[test]
    fn only_real_offsets_count() {
        let mut list = TopicPartitionList::new();
        let _ = list.add_partition_offset("t", 0, Offset::Offset(7));
        let _ = list.add_partition_offset("t", 1, Offset::Invalid);
        let _ = list.add_partition_offset("t", 2, Offset::End);
        assert_eq!(offsets(&list), BTreeMap::from([(("t".to_string(), 0), 7)]));
    }

    #[test]
    fn a_closed_consumer_is_no_longer_read() {
        let probe = LagProbe {
            consumer: Weak::new(),
            partitions: Arc::default(),
        };
        assert!(probe.read(Duration::from_secs(1)).is_none());
    }
}
