//! Stage 9's producing side: the relay (a child process, `relay
//! --until-caught-up`) and raw produce of the same messages, each with the
//! machine's CPU while it ran.

use super::{ChildCost, PARTITIONS};
use crate::child::Child;
use crate::{rate_since, Bench};
use activity_event_processor::config::{KafkaConfig, PostgresConfig};
use activity_event_processor::decode::OutboxEvent;
use activity_event_processor::relay::{
    partition_for, record, Encoder, Message, Op, Shape, SnapshotMark,
};
use activity_event_processor::source::kafka::QuietContext;
use activity_event_processor::stats_file::StatsReport;
use anyhow::{bail, Result};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Distinct messages the raw producer cycles through (their sizes follow the
/// history's; holding all of them would cost ~3 KB per event).
const POOL: usize = 10_000;

/// One relay run: its rate, its stats, its cost and the machine's CPU.
pub(super) struct Relayed {
    pub rate: f64,
    pub report: StatsReport,
    pub cost: ChildCost,
    /// Cores busy on the machine while it ran (every process).
    pub busy: f64,
}

/// Relays the outbox of `pg` (an initial snapshot through a fresh `slot`) to
/// `topic`, marking the rows `processed` or leaving them as they are.
pub(super) async fn relay(
    bench: &mut Bench,
    kafka: &KafkaConfig,
    pg: &PostgresConfig,
    topic: &str,
    slot: &str,
    mark: bool,
) -> Result<Relayed> {
    let n = bench.history.len() as u64;
    let what = if mark {
        "relay"
    } else {
        "relay, MARK_PROCESSED=false"
    };
    bench.say(&format!(
        "[9/9] {what} --until-caught-up (replication, initial snapshot)"
    ));
    let mut env = bench.child_env(pg, slot, "replication");
    env.extend([
        ("KAFKA_BROKERS", kafka.brokers.clone()),
        ("KAFKA_TOPIC", topic.to_string()),
        ("RELAY_SLOT", slot.to_string()),
        ("RELAY_SOURCE", "replication".to_string()),
        ("RELAY_FORMAT", "cdc".to_string()),
        ("MARK_PROCESSED", mark.to_string()),
    ]);
    let log = if mark {
        "kafka-relay"
    } else {
        "kafka-relay-unmarked"
    };
    let started_ms = chrono::Utc::now().timestamp_millis();
    let machine = MachineCpu::now();
    let child = Child::spawn(&bench.dir, log, &["relay", "--until-caught-up"], &env)?;
    let progress = bench.progress_fn(what, n);
    let report = child
        .wait_exit(Duration::from_secs(300 + n / 100), progress)
        .await?;
    let busy = machine.busy_cores();
    let rate = rate_since(&report, started_ms, n)?;
    let cost = ChildCost::of(&report, started_ms, n);
    bench.say(&format!(
        "  {rate:.0} events/s ({} messages, {} unpublishable; machine {busy:.2} cores busy)",
        report.applied, report.dead_lettered
    ));
    Ok(Relayed {
        rate,
        report,
        cost,
        busy,
    })
}

/// A raw produce run: msgs/s, the machine's busy cores meanwhile, and the
/// mean size of its messages (key + value).
pub(super) struct Produced {
    pub rate: f64,
    pub busy: f64,
    pub mean_bytes: f64,
}

/// [`raw_produce`] of as many messages as the history has, to `topic`,
/// said and timed with the machine's CPU.
pub(super) async fn raw_produce_measured(
    bench: &mut Bench,
    kafka: &KafkaConfig,
    pg: &PostgresConfig,
    topic: &str,
    which: &str,
) -> Result<Produced> {
    let count = bench.history.len() as u64;
    bench.say(&format!("[9/9] raw produce, {which} run: {count} messages"));
    let pool = message_pool(&bench.history, kafka, topic, &pg.database);
    let mean_bytes = pool
        .iter()
        .map(|m| (m.key.len() + m.value.len()) as f64)
        .sum::<f64>()
        / pool.len().max(1) as f64;
    let progress = bench.progress_fn("raw produce", count);
    let machine = MachineCpu::now();
    let rate = raw_produce(kafka, &pool, count, progress).await?;
    let busy = machine.busy_cores();
    bench.say(&format!(
        "  {rate:.0} msgs/s (machine {busy:.2} cores busy)"
    ));
    Ok(Produced {
        rate,
        busy,
        mean_bytes,
    })
}

/// The machine's CPU time at one moment, from `/proc/stat` (all cores).
pub(super) struct MachineCpu {
    busy: u64,
    total: u64,
}

impl MachineCpu {
    pub fn now() -> MachineCpu {
        let (busy, total) = machine_ticks().unwrap_or((0, 0));
        MachineCpu { busy, total }
    }

    /// Cores busy on average since `self` (0 where `/proc/stat` is missing).
    pub fn busy_cores(&self) -> f64 {
        let Some((busy, total)) = machine_ticks() else {
            return 0.0;
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let total = total.saturating_sub(self.total);
        if total == 0 {
            return 0.0;
        }
        busy.saturating_sub(self.busy) as f64 / total as f64 * cores
    }
}

/// Busy and total ticks of every core: the `cpu` line of `/proc/stat`
/// (user nice system idle iowait irq softirq steal; idle and iowait are
/// not busy).
fn machine_ticks() -> Option<(u64, u64)> {
    ticks_of(&std::fs::read_to_string("/proc/stat").ok()?)
}

fn ticks_of(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|line| line.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|t| t.parse().ok())
        .collect();
    if ticks.len() < 5 {
        return None;
    }
    let total: u64 = ticks.iter().sum();
    Some((total - ticks[3] - ticks[4], total))
}

/// Up to [`POOL`] messages encoded as the relay encodes its snapshot rows,
/// from events spread over the whole history, addressed to `topic`.
pub(super) fn message_pool(
    history: &[OutboxEvent],
    kafka: &KafkaConfig,
    topic: &str,
    database: &str,
) -> Vec<Message> {
    let encoder = Encoder::new(
        Shape::Cdc,
        kafka.relay.schemas,
        topic,
        &kafka.event_router_topic_prefix,
        database,
    );
    let step = history.len().div_ceil(POOL).max(1);
    let now = chrono::Utc::now();
    history
        .iter()
        .step_by(step)
        .map(|event| encoder.encode(event, Op::Read(SnapshotMark::Middle), now))
        .collect()
}

/// The relay's own producer settings.
fn producer(kafka: &KafkaConfig) -> Result<FutureProducer<QuietContext>> {
    activity_event_processor::relay::create_producer(kafka).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Sends `count` messages cycling through `pool` (each to the partition the
/// relay would pick) and waits for every acknowledgement: msgs/s.
pub(super) async fn raw_produce(
    kafka: &KafkaConfig,
    pool: &[Message],
    count: u64,
    mut progress: impl FnMut(u64),
) -> Result<f64> {
    if pool.is_empty() || count == 0 {
        bail!("nothing to produce");
    }
    let producer = producer(kafka)?;
    let started = Instant::now();
    let mut pending: VecDeque<DeliveryFuture> = VecDeque::new();
    let mut acknowledged = 0u64;
    for i in 0..count {
        let message = &pool[(i as usize) % pool.len()];
        let mut record = record(
            message,
            partition_for(&message.partition_key, PARTITIONS as usize),
        );
        loop {
            match producer.send_result(record) {
                Ok(future) => {
                    pending.push_back(future);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    match pending.pop_front() {
                        Some(future) => {
                            settle(future).await?;
                            acknowledged += 1;
                            progress(acknowledged);
                        }
                        None => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
                Err((err, _)) => bail!("raw produce failed: {err}"),
            }
        }
    }
    while let Some(future) = pending.pop_front() {
        settle(future).await?;
        acknowledged += 1;
        if acknowledged.is_multiple_of(1000) {
            progress(acknowledged);
        }
    }
    Ok(count as f64 / started.elapsed().as_secs_f64().max(1e-6))
}

async fn settle(future: DeliveryFuture) -> Result<()> {
    match future.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((err, _))) => bail!("raw produce: a message was not delivered: {err}"),
        Err(_) => bail!("raw produce: a delivery was cancelled"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use activity_event_history::{generate, HistoryOptions};

    #[test]
    fn the_pool_samples_the_whole_history_as_the_relay_encodes_it() {
        let config = activity_event_processor::config::Config::from_env(
            &activity_event_processor::config::EnvMap::new(),
        )
        .expect("default config");
        let history = generate(3, &HistoryOptions::realistic(25_000));
        let pool = message_pool(&history, &config.kafka, "aep_bench_1_raw", "db");
        assert_eq!(pool.len(), 8_334); // every 3rd event
        assert!(pool.iter().all(|m| &*m.topic == "aep_bench_1_raw"));
        let last = &history[24_999]; // 3 * 8_333
        let last_pool = pool.last().expect("messages");
        assert_eq!(
            last_pool.partition_key,
            last.aggregate_id.to_string().into_bytes()
        );
        assert!(String::from_utf8_lossy(&last_pool.value).contains(r#""op":"r""#));
        let small = message_pool(&history[..10], &config.kafka, "t", "db");
        assert_eq!(small.len(), 10);
    }

    #[test]
    fn busy_ticks_leave_out_idle_and_iowait_and_guest_time() {
        // user nice system idle iowait irq softirq steal guest guest_nice
        let stat = "cpu  100 5 40 800 30 2 3 1 50 0\ncpu0 50 2 20 400 15 1 1 0 25 0\n";
        assert_eq!(ticks_of(stat), Some((151, 981)));
        assert_eq!(ticks_of("cpu0 1 2 3 4 5\n"), None);
        assert_eq!(ticks_of("cpu  1 2 3\n"), None);
    }
}
