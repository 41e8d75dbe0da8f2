//! Counters of the Kafka records that did not simply become applied events.

use crate::decode::SkipReason;
use std::sync::atomic::{AtomicU64, Ordering};

const SKIP_REASONS: [SkipReason; 6] = [
    SkipReason::Tombstone,
    SkipReason::Heartbeat,
    SkipReason::Transaction,
    SkipReason::Update,
    SkipReason::Delete,
    SkipReason::Truncate,
];

#[derive(Debug, Default)]
pub struct KafkaStats {
    pub records: AtomicU64,
    skipped: [AtomicU64; 6],
    /// Records that did not decode (dead-lettered raw).
    pub malformed: AtomicU64,
    /// Events whose aggregate did not exist when first applied.
    pub deferred: AtomicU64,
    /// Tries after the first.
    pub retried: AtomicU64,
}

impl KafkaStats {
    pub fn skip(&self, reason: SkipReason) {
        if let Some(i) = SKIP_REASONS.iter().position(|r| *r == reason) {
            self.skipped[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Skipped records per reason (reasons never seen left out).
    pub fn skipped(&self) -> Vec<(&'static str, u64)> {
        SKIP_REASONS
            .iter()
            .zip(&self.skipped)
            .map(|(reason, n)| (reason.as_str(), n.load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_counts_are_kept_per_reason() {
        let stats = KafkaStats::default();
        stats.skip(SkipReason::Update);
        stats.skip(SkipReason::Update);
        stats.skip(SkipReason::Tombstone);
        assert_eq!(stats.skipped(), [("tombstone", 1), ("update", 2)]);
    }
}
