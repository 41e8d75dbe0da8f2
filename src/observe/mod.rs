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

/// A heartbeat sent at `sent` came back through the slot: its round trip
/// (from `sent` to now) is recorded, and returned.
pub fn heartbeat_received(sent: SystemTime) -> Duration {
    let round_trip = since(sent);
    if let Some(metrics) = recorder() {
        metrics.heartbeat_received(round_trip);
    }
    round_trip
}
