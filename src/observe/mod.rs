//! What an operator sees of a running processor: Prometheus metrics, the
//! heartbeat through the slot, and the `/healthz` and `/readyz` checks
//! (docs/operating.md lists them all).
//!
//! - [`metrics`]: every metric, declared once; the free functions below
//!   record into the process's registry ([`install`]);
//! - [`health`]: the liveness tick, the named readiness checks, the stall rule;
//! - [`server`]: `/metrics`, `/healthz`, `/readyz` on `METRICS_ADDR`;
//! - [`samplers`]: slot lag, polling backlog, MongoDB ping, each a task on a
//!   connection of its own;
//! - [`kafka_lag`]: the kafka source's consumer lag per partition;
//! - [`heartbeat`]: the logical message written every `HEARTBEAT_INTERVAL`
//!   and the reading of it on the replication side;
//! - [`process`]: the standard `process_*` metrics from `/proc`.

pub mod health;
pub mod heartbeat;
pub mod kafka_lag;
pub mod metrics;
pub mod process;
pub mod samplers;
pub mod server;

pub use health::{Health, Readiness, StallWatch};
pub use metrics::{install, Component, Metrics, Outcome};
pub use server::{parse_metrics_addr, serve, Observed, Server, DEFAULT_METRICS_ADDR};

use crate::config::SourceKind;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

/// Whether the free functions below record (true unless [`stop_recording`]).
static RECORDING: AtomicBool = AtomicBool::new(true);

/// Nothing is recorded from now on: a process with `METRICS_ADDR=off` has
/// nobody to read its metrics, so it does not pay for them.
pub fn stop_recording() {
    RECORDING.store(false, Ordering::Relaxed);
}

/// The registry to record into, `None` once recording stopped.
fn recorder() -> Option<&'static Metrics> {
    RECORDING.load(Ordering::Relaxed).then(install)
}

/// `n` events of `event_type` from `source` came to `outcome`. Each call
/// looks its counter up (a hash and a read lock): count a batch per type and
/// outcome, not each event.
pub fn events(source: SourceKind, event_type: &str, outcome: Outcome, n: u64) {
    if let Some(metrics) = recorder() {
        metrics.events(source, event_type, outcome, n);
    }
}

/// A batch of `size` events became durable; the last-progress time moves.
pub fn batch(size: usize) {
    if let Some(metrics) = recorder() {
        metrics.batch(size);
        metrics.last_progress();
    }
}

/// One event's effect became durable `latency` after its commit.
pub fn commit_to_durable(latency: Duration) {
    if let Some(metrics) = recorder() {
        metrics.commit_to_durable(latency);
    }
}

/// One event was received `latency` after its commit.
pub fn ingestion(latency: Duration) {
    if let Some(metrics) = recorder() {
        metrics.ingestion(latency);
    }
}

/// Time from `commit` until now, zero if the clocks disagree and the commit
/// looks to be in the future.
pub fn since(commit: SystemTime) -> Duration {
    commit.elapsed().unwrap_or_default()
}

/// The time of a pgoutput timestamp (the commit time of `Begin`):
/// microseconds since 2000-01-01 00:00 UTC.
pub fn pg_timestamp(micros: i64) -> SystemTime {
    // 2000-01-01 is 946,684,800 s after the Unix epoch.
    const PG_EPOCH: Duration = Duration::from_secs(946_684_800);
    let epoch = SystemTime::UNIX_EPOCH + PG_EPOCH;
    let offset = Duration::from_micros(micros.unsigned_abs());
    if micros >= 0 {
        epoch + offset
    } else {
        epoch - offset
    }
}

/// A transient error of `component`, of the kind `class`, is retried.
pub fn retry(component: Component, class: crate::policy::RetryClass) {
    if let Some(metrics) = recorder() {
        metrics.retry(component, class);
    }
}

/// The dead letters' count and the age of the oldest.
pub fn dead_letters(count: u64, oldest_age: Option<Duration>) {
    if let Some(metrics) = recorder() {
        metrics.dead_letters(count, oldest_age);
    }
}

/// A batch became durable now (also done by [`batch`]).
pub fn last_progress() {
    if let Some(metrics) = recorder() {
        metrics.last_progress();
    }
}

/// MongoDB write commands sent and documents written.
pub fn mongo(round_trips: u64, documents: u64) {
    if let Some(metrics) = recorder() {
        metrics.mongo(round_trips, documents);
    }
}

/// Messages the relay's producer had acknowledged.
pub fn kafka_produced(n: u64) {
    if let Some(metrics) = recorder() {
        metrics.kafka_produced(n);
    }
}

/// Messages between a partition's committed offset and its end.
pub fn kafka_consumer_lag(topic: &str, partition: i32, lag: i64) {
    if let Some(metrics) = recorder() {
        metrics.kafka_consumer_lag(topic, partition, lag);
    }
}

/// The replication source saw a logical message: if it is a heartbeat, its
/// round trip is recorded (and returned).
pub fn heartbeat_received(prefix: &str, content: &[u8]) -> Option<Duration> {
    let sent = heartbeat::heartbeat_sent_at(prefix, content)?;
    let round_trip = since(sent);
    if let Some(metrics) = recorder() {
        metrics.heartbeat_received(round_trip);
    }
    Some(round_trip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgoutput_timestamps_count_from_2000() {
        let at = |micros| {
            chrono::DateTime::<chrono::Utc>::from(pg_timestamp(micros))
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        };
        assert_eq!(at(0), "2000-01-01T00:00:00.000000Z");
        assert_eq!(at(1_500_000), "2000-01-01T00:00:01.500000Z");
        assert_eq!(at(-1), "1999-12-31T23:59:59.999999Z");
    }
}
