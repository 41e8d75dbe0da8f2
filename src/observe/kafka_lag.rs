//! The kafka source's consumer lag per partition
//! (`event_processor_kafka_consumer_lag_messages`), sampled every few seconds
//! through the source's [`LagProbe`] on a blocking thread: the consumer's own
//! polling is never waited for, nor does it wait for this.

use super::metrics::Metrics;
use super::samplers::{unless_shutdown, Sampling, Ticker};
use crate::source::kafka::{LagProbe, PartitionLag};
use std::collections::BTreeSet;
use tokio_util::sync::CancellationToken;

pub struct KafkaLagSampler {
    pub probe: LagProbe,
    pub sampling: Sampling,
    pub metrics: &'static Metrics,
}

impl KafkaLagSampler {
    /// Samples until `shutdown`, or until the source's consumer is closed.
    /// A partition this process no longer consumes loses its series; a sample
    /// that fails (brokers unreachable: the `kafka` check says so) leaves the
    /// last values.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut shown: BTreeSet<(String, i32)> = BTreeSet::new();
        let mut ticker = Ticker::new(self.sampling.interval);
        while ticker.next(&shutdown).await {
            let (probe, timeout) = (self.probe.clone(), self.sampling.timeout);
            let read = tokio::task::spawn_blocking(move || probe.read(timeout));
            match unless_shutdown(&shutdown, read).await {
                None | Some(Ok(None)) => return,
                Some(Ok(Some(Ok(lags)))) => shown = self.show(lags, shown),
                Some(Ok(Some(Err(err)))) => {
                    tracing::debug!(error = %err, "cannot read the kafka consumer lag")
                }
                Some(Err(err)) => tracing::debug!(error = %err, "the kafka lag sample failed"),
            }
        }
    }

    /// Records `lags`, drops the series of partitions gone since `before`;
    /// returns the partitions shown now.
    fn show(
        &self,
        lags: Vec<PartitionLag>,
        before: BTreeSet<(String, i32)>,
    ) -> BTreeSet<(String, i32)> {
        let mut now = BTreeSet::new();
        for lag in lags {
            self.metrics
                .kafka_consumer_lag(&lag.topic, lag.partition, lag.messages);
            now.insert((lag.topic, lag.partition));
        }
        for (topic, partition) in before.difference(&now) {
            self.metrics.kafka_consumer_lag_gone(topic, *partition);
        }
        now
    }
}
