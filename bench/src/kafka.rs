//! Stage 9: the Kafka path beside the broker's own limits.
//!
//! - the relay (`relay --until-caught-up`, a child process) publishing a fresh
//!   outbox of the generated history, once with `MARK_PROCESSED=false` and
//!   once marking the rows, beside raw produce run twice: an in-process
//!   producer with the relay's delivery settings sending as many messages
//!   of the same sizes (encoded by the relay's own encoder) to a topic of
//!   its own; each with the machine's CPU while it ran;
//! - the kafka source (`run --source kafka --sink discard`, a child process in
//!   a fresh group) reading the relayed topic, beside raw consume: an
//!   in-process consumer counting the same topic's messages, once with all
//!   partitions assigned and once as a fresh group's member (which waits
//!   for the broker's first rebalance as the source does).
//!
//! The topics have 4 partitions and a name unique to the run; they and the
//! database are deleted at the end (best effort). End offsets are not used to
//! tell when a reader is done (tansu's high watermarks come out low): the
//! readers count messages.

mod produce;

use super::child::Child;
use super::report::{Better, Results};
use super::{pg, rate_since, Bench};
use activity_event_processor::config::KafkaConfig;
use activity_event_processor::source::kafka::{base_config, consumer_config, QuietContext};
use activity_event_processor::stats_file::StatsReport;
use anyhow::{anyhow, bail, Context, Result};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use std::time::{Duration, Instant};

const STAGE: &str = "9 kafka";
const PARTITIONS: i32 = 4;
const DATABASE: &str = "aep_bench_kafka";

/// Names unique to one run.
struct Names {
    relayed: String,
    raw: String,
    raw_again: String,
    slot: String,
    /// The relay run that does not mark the rows: its topic and slot.
    unmarked: String,
    unmarked_slot: String,
    group: String,
}

pub async fn stage(bench: &mut Bench) -> Result<()> {
    let secs = chrono::Utc::now().timestamp();
    let names = Names {
        relayed: format!("aep_bench_{secs}"),
        raw: format!("aep_bench_{secs}_raw"),
        raw_again: format!("aep_bench_{secs}_raw_again"),
        slot: format!("aep_bench_relay_{secs}"),
        unmarked: format!("aep_bench_{secs}_unmarked"),
        unmarked_slot: format!("aep_bench_relay_{secs}_unmarked"),
        group: format!("aep_bench_{secs}"),
    };
    let mut kafka = bench.config.kafka.clone();
    kafka.topics = vec![names.relayed.clone()];
    bench.say(&format!(
        "[9/9] kafka: topics {} and {} ({PARTITIONS} partitions) at {}",
        names.relayed, names.raw, kafka.brokers
    ));
    let outcome = measure(bench, &kafka, &names).await;
    // Best effort: a failed stage leaves nothing behind either.
    if let Err(err) = delete_topics(
        &kafka,
        &[
            &names.relayed,
            &names.raw,
            &names.raw_again,
            &names.unmarked,
        ],
    )
    .await
    {
        bench.say(&format!("  cannot delete the bench topics: {err:#}"));
    }
    let _ = pg::drop_database(&bench.admin, DATABASE).await;
    outcome
}

async fn measure(bench: &mut Bench, kafka: &KafkaConfig, names: &Names) -> Result<()> {
    let n = bench.history.len() as u64;
    bench.results.machine.kafka = Some(describe_broker(kafka).await?);
    let lines = activity_event_processor::cli::kafka::create_topics(
        kafka,
        &[
            names.relayed.clone(),
            names.raw.clone(),
            names.raw_again.clone(),
            names.unmarked.clone(),
        ],
        PARTITIONS,
        1,
    )
    .await?;
    for line in lines {
        bench.say(&format!("  {line}"));
    }
    let (pg, client) = pg::fresh_database(&bench.admin, &bench.config.postgres, DATABASE).await?;
    bench.say(&format!("  COPY {n} events"));
    pg::copy(&client, &bench.history).await?;
    drop(client);

    // Raw produce: as many messages of the same sizes, the relay's settings,
    // once before the relay that does not mark and once after it. Each run
    // but the last relay's (which the kafka source reads) has a topic of
    // its own, deleted once it is done: the broker slows as it holds more
    // (tansu keeps everything in memory here: raw produce ran at 32,000
    // msgs/s once it held 600,000 messages, at 59,000 when it held none), so
    // each run starts from a broker that holds nothing.
    let before = produce::raw_produce_measured(bench, kafka, &pg, &names.raw, "first").await?;
    delete_topics(kafka, &[&names.raw]).await?;

    // The relay, from the snapshot of the outbox to the last acknowledged
    // batch: first without marking the rows (which leaves them as they
    // are), then as configured by default, marking them `processed`.
    let unmarked = produce::relay(
        bench,
        kafka,
        &pg,
        &names.unmarked,
        &names.unmarked_slot,
        false,
    )
    .await?;
    delete_topics(kafka, &[&names.unmarked]).await?;
    let after = produce::raw_produce_measured(bench, kafka, &pg, &names.raw_again, "again").await?;
    delete_topics(kafka, &[&names.raw_again]).await?;
    let marked = produce::relay(bench, kafka, &pg, &names.relayed, &names.slot, true).await?;
    {
        use activity_event_processor::stages::Stage;
        bench.stage_breakdown(
            "kafka.relay",
            "9 kafka",
            &marked.report,
            &[Stage::Source, Stage::Write, Stage::Mark, Stage::Acknowledge],
        );
    }
    // What is on the topic: the rows that could be relayed.
    let relayed = marked.report.applied;
    let produce_rate = (before.rate + after.rate) / 2.0;
    let produce_busy = (before.busy + after.busy) / 2.0;

    // The kafka source, from its start to its last durable batch.
    bench.say("[9/9] run --source kafka --sink discard (fresh group)");
    let mut env = bench.child_env(&pg, "unused", "kafka");
    env.extend([
        ("KAFKA_BROKERS", kafka.brokers.clone()),
        ("KAFKA_TOPIC", names.relayed.clone()),
        ("KAFKA_GROUP_ID", names.group.clone()),
        ("KAFKA_SESSION_TIMEOUT", "6s".to_string()),
    ]);
    let started_ms = chrono::Utc::now().timestamp_millis();
    let mut child = Child::spawn(
        &bench.dir,
        "kafka-source",
        &["run", "--source", "kafka", "--sink", "discard"],
        &env,
    )?;
    let progress = bench.progress_fn("kafka source", relayed);
    child
        .wait_done(relayed, Duration::from_secs(120 + relayed / 200), progress)
        .await?;
    let report = child.stop().await?;
    let source_rate = rate_since(&report, started_ms, relayed)?;
    let source_steady = steady_rate(&report, relayed);
    let source_context = ChildCost::of(&report, started_ms, relayed);
    bench.say(&format!(
        "  {source_rate:.0} events/s ({} once the group was joined)",
        source_steady.map_or("-".to_string(), |r| format!("{r:.0}"))
    ));

    // Raw consume of the same topic: assigned its partitions, then as a
    // member of a fresh group, as the source starts (the broker holds a
    // group's first join: tansu about half the session timeout, Kafka
    // `group.initial.rebalance.delay.ms`).
    let mut rates = Vec::new();
    for (what, suffix, join) in [
        ("raw consume", "raw", Join::Assign),
        (
            "raw consume as a fresh group's member",
            "raw_group",
            Join::Subscribe(Duration::from_secs(6)),
        ),
    ] {
        bench.say(&format!("[9/9] {what}: {relayed} messages"));
        let progress = bench.progress_fn(what, relayed);
        let group = format!("{}_{suffix}", names.group);
        let rate = raw_consume(kafka, &names.relayed, &group, relayed, join, progress).await?;
        bench.say(&format!("  {rate:.0} msgs/s"));
        rates.push(rate);
    }
    let (consume_rate, group_rate) = (rates[0], rates[1]);

    let r = &mut bench.results;
    r.push(
        "kafka.message_bytes",
        STAGE,
        "mean relayed message size (key + value)",
        before.mean_bytes,
        "bytes",
        Better::Neither,
    );
    r.push(
        "kafka.relay.events_per_s",
        STAGE,
        "relay: outbox snapshot to acknowledged messages",
        marked.rate,
        "events/s",
        Better::Higher,
    );
    marked.cost.push(r, "relay", "relay");
    for (id, when, rate) in [
        ("before", "first run", before.rate),
        ("after", "second run, between the relays", after.rate),
    ] {
        r.push(
            &format!("kafka.produce.{id}.msgs_per_s"),
            STAGE,
            &format!("raw produce, {when}"),
            rate,
            "msgs/s",
            Better::Higher,
        );
    }
    r.push(
        "kafka.produce.msgs_per_s",
        STAGE,
        "raw produce, idempotent, acks=all (mean of the two)",
        produce_rate,
        "msgs/s",
        Better::Higher,
    );
    r.ratio(
        "kafka.relay_vs_produce",
        STAGE,
        "relay vs raw produce",
        "kafka.relay.events_per_s",
        "kafka.produce.msgs_per_s",
    );
    r.push(
        "kafka.relay_unmarked.events_per_s",
        STAGE,
        "relay with MARK_PROCESSED=false (rows left as they are)",
        unmarked.rate,
        "events/s",
        Better::Higher,
    );
    r.ratio(
        "kafka.relay_unmarked_vs_produce",
        STAGE,
        "relay with MARK_PROCESSED=false vs raw produce",
        "kafka.relay_unmarked.events_per_s",
        "kafka.produce.msgs_per_s",
    );
    // The machine's CPU (every process: the relay, the broker, PostgreSQL)
    // per event: what bounds the relay where the three share the cores.
    let cores = bench.results.machine.cores as f64;
    let r = &mut bench.results;
    for (id, what, busy, rate) in [
        ("relay", "relay", marked.busy, marked.rate),
        (
            "relay_unmarked",
            "relay with MARK_PROCESSED=false",
            unmarked.busy,
            unmarked.rate,
        ),
        ("produce", "raw produce", produce_busy, produce_rate),
    ] {
        r.push(
            &format!("kafka.{id}.machine_busy_cores"),
            STAGE,
            &format!("{what}: machine CPU busy, of {cores:.0} cores"),
            busy,
            "cores",
            Better::Neither,
        );
        r.push(
            &format!("kafka.{id}.machine_cpu_us_per_event"),
            STAGE,
            &format!("{what}: machine CPU per event (every process)"),
            busy * 1e6 / rate.max(1e-9),
            "µs",
            Better::Lower,
        );
    }
    r.push(
        "kafka.source.events_per_s",
        STAGE,
        "kafka source, no-op sink, fresh group",
        source_rate,
        "events/s",
        Better::Higher,
    );
    source_context.push(r, "source", "kafka source");
    if let Some(steady) = source_steady {
        r.push(
            "kafka.source.steady_events_per_s",
            STAGE,
            "kafka source after its first batch (group joined)",
            steady,
            "events/s",
            Better::Higher,
        );
    }
    r.push(
        "kafka.consume.msgs_per_s",
        STAGE,
        "raw consume, 4 partitions from the start",
        consume_rate,
        "msgs/s",
        Better::Higher,
    );
    r.push(
        "kafka.consume_group.msgs_per_s",
        STAGE,
        "raw consume as a fresh group's member (subscribe, 6 s session)",
        group_rate,
        "msgs/s",
        Better::Higher,
    );
    r.ratio(
        "kafka.source_vs_group_consume",
        STAGE,
        "kafka source vs raw consume as a fresh group's member",
        "kafka.source.events_per_s",
        "kafka.consume_group.msgs_per_s",
    );
    r.ratio(
        "kafka.source_vs_consume",
        STAGE,
        "kafka source vs raw consume",
        "kafka.source.events_per_s",
        "kafka.consume.msgs_per_s",
    );
    r.ratio(
        "kafka.source_steady_vs_consume",
        STAGE,
        "kafka source once joined vs raw consume (which assigns, no group join)",
        "kafka.source.steady_events_per_s",
        "kafka.consume.msgs_per_s",
    );
    let _ = pg;
    Ok(())
}

/// Events/s from the first timeline point with events done to the last
/// batch: the rate without the start-up (for the kafka source, the group
/// join, which waits for the broker's `group.initial.rebalance.delay.ms`).
fn steady_rate(report: &StatsReport, events: u64) -> Option<f64> {
    let (t0, done0) = report
        .timeline
        .iter()
        .copied()
        .find(|(_, done)| *done > 0)?;
    let last = report.last_done_unix_ms?;
    let since = report.started_unix_ms as f64 + t0 * 1000.0;
    let seconds = (last as f64 - since) / 1000.0;
    (seconds > 0.0 && events > done0).then(|| (events - done0) as f64 / seconds)
}

/// What explains a child's rate: its start-up and its CPU.
struct ChildCost {
    /// Spawn to its first durable batch, seconds.
    first_batch_s: Option<f64>,
    cpu_us_per_event: f64,
}

impl ChildCost {
    fn of(report: &StatsReport, spawned_ms: i64, events: u64) -> ChildCost {
        ChildCost {
            first_batch_s: report
                .first_done_unix_ms
                .map(|at| (at - spawned_ms).max(0) as f64 / 1000.0),
            cpu_us_per_event: (report.cpu_user_s + report.cpu_system_s) * 1e6
                / events.max(1) as f64,
        }
    }

    fn push(&self, r: &mut Results, id: &str, who: &str) {
        if let Some(seconds) = self.first_batch_s {
            r.push(
                &format!("kafka.{id}.first_batch_s"),
                STAGE,
                &format!("{who}: start to first durable batch"),
                seconds,
                "s",
                Better::Lower,
            );
        }
        r.push(
            &format!("kafka.{id}.cpu_us_per_event"),
            STAGE,
            &format!("{who}: CPU per event"),
            self.cpu_us_per_event,
            "µs",
            Better::Lower,
        );
    }
}

/// "host:port (N broker(s): id@host:port, ...; cluster <id>)", or an error
/// when the brokers cannot be reached.
async fn describe_broker(kafka: &KafkaConfig) -> Result<String> {
    let admin: AdminClient<QuietContext> = base_config(kafka)
        .create_with_context(QuietContext::default())
        .map_err(|e| {
            anyhow!(
                "invalid Kafka configuration: {}",
                kafka.describe_refusal(&e)
            )
        })?;
    let timeout = kafka.timeout;
    let brokers = kafka.brokers.clone();
    tokio::task::spawn_blocking(move || {
        let metadata = admin
            .inner()
            .fetch_metadata(None, timeout)
            .with_context(|| format!("cannot reach the Kafka brokers at {brokers}"))?;
        let list: Vec<String> = metadata
            .brokers()
            .iter()
            .map(|b| format!("{}@{}:{}", b.id(), b.host(), b.port()))
            .collect();
        let mut text = format!("{brokers} ({} broker(s): {}", list.len(), list.join(", "));
        if let Some(cluster) = admin.inner().fetch_cluster_id(timeout) {
            text.push_str(&format!("; cluster {cluster}"));
        }
        text.push(')');
        Ok(text)
    })
    .await
    .context("kafka metadata task failed")?
}

async fn delete_topics(kafka: &KafkaConfig, topics: &[&str]) -> Result<()> {
    let admin: AdminClient<QuietContext> = base_config(kafka)
        .create_with_context(QuietContext::default())
        .map_err(|e| {
            anyhow!(
                "invalid Kafka configuration: {}",
                kafka.describe_refusal(&e)
            )
        })?;
    let options = AdminOptions::new()
        .request_timeout(Some(kafka.timeout))
        .operation_timeout(Some(kafka.timeout));
    for result in admin.delete_topics(topics, &options).await? {
        if let Err((topic, code)) = result {
            if code != RDKafkaErrorCode::UnknownTopicOrPartition {
                bail!("cannot delete topic {topic}: {code}");
            }
        }
    }
    Ok(())
}

/// How the raw consumer gets its partitions.
enum Join {
    /// All of them from the start, no group membership.
    Assign,
    /// Subscribes as a fresh group's member with this session timeout.
    Subscribe(Duration),
}

/// Reads `count` messages of `topic` from the start of its partitions:
/// msgs/s from the assignment or subscription on.
async fn raw_consume(
    kafka: &KafkaConfig,
    topic: &str,
    group: &str,
    count: u64,
    join: Join,
    progress: impl FnMut(u64) + Send + 'static,
) -> Result<f64> {
    let mut config = kafka.clone();
    config.group_id = group.to_string();
    if let Join::Subscribe(session) = join {
        config.session_timeout = session;
    }
    let consumer: BaseConsumer = consumer_config(&config).create().map_err(|e| {
        anyhow!(
            "invalid Kafka consumer configuration: {}",
            config.describe_refusal(&e)
        )
    })?;
    match join {
        Join::Assign => {
            let mut partitions = TopicPartitionList::new();
            for partition in 0..PARTITIONS {
                partitions.add_partition_offset(topic, partition, Offset::Beginning)?;
            }
            consumer.assign(&partitions)?;
        }
        Join::Subscribe(_) => consumer.subscribe(&[topic])?,
    }
    let timeout = Duration::from_secs(120 + count / 200);
    tokio::task::spawn_blocking(move || {
        let mut progress = progress;
        let started = Instant::now();
        let mut read = 0u64;
        while read < count {
            if started.elapsed() > timeout {
                bail!("raw consume read {read} of {count} messages within {timeout:?}");
            }
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(_message)) => {
                    read += 1;
                    if read.is_multiple_of(1000) {
                        progress(read);
                    }
                }
                Some(Err(err)) => tracing::debug!(error = %err, "raw consume poll"),
                None => {}
            }
        }
        Ok(count as f64 / started.elapsed().as_secs_f64().max(1e-6))
    })
    .await
    .context("raw consume task failed")?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_steady_rate_starts_at_the_first_point_with_work_done() {
        let report = StatsReport {
            started_unix_ms: 10_000,
            last_done_unix_ms: Some(12_000),
            timeline: vec![(0.25, 0), (0.5, 1_000), (1.0, 5_000)],
            ..StatsReport::default()
        };
        // From 10.5 s to 12 s: the 9,000 events after the first 1,000.
        assert_eq!(steady_rate(&report, 10_000), Some(6_000.0));
        let idle = StatsReport {
            timeline: vec![(0.25, 0)],
            ..report
        };
        assert_eq!(steady_rate(&idle, 10_000), None);
    }
}
