//! `relay` (outbox -> Kafka in Debezium's format) and `kafka topics create`.

use crate::config::{Config, KafkaConfig};
use crate::pipeline::Stats;
use crate::relay::{self, OnPublished, RelayOptions};
use crate::source::kafka::{base_config, is_unreachable, topic_partitions, QuietContext};
use crate::stats_file::StatsFile;
use clap::{Args, Subcommand};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::error::RDKafkaErrorCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

#[derive(Args, Debug, Default)]
pub struct RelayArgs {
    /// cdc: change events on one topic; outbox: the Outbox Event Router's shape
    /// on `<prefix><aggregate type>` (overrides RELAY_FORMAT).
    #[arg(long, value_name = "cdc|outbox")]
    pub format: Option<String>,
    /// JsonConverter schemas in keys and values (overrides RELAY_SCHEMAS).
    #[arg(long, value_name = "on|off")]
    pub schemas: Option<String>,
    /// How to read the outbox (overrides RELAY_SOURCE).
    #[arg(long, value_name = "replication|polling")]
    pub source: Option<String>,
    /// Topic of the change events (overrides KAFKA_TOPIC).
    #[arg(long, value_name = "NAME")]
    pub topic: Option<String>,
    /// Most events per batch (overrides BATCH_SIZE).
    #[arg(long, value_name = "N")]
    pub batch_size: Option<String>,
    /// Exit 0 once every outbox row committed before the start is published.
    #[arg(long)]
    pub until_caught_up: bool,
    // In the stats file, published events count as applied and
    // unpublishable rows as dead-lettered.
    #[command(flatten)]
    pub stats: super::StatsFileArgs,
}

impl RelayArgs {
    pub fn overrides(&self) -> Vec<(&'static str, &String)> {
        [
            ("RELAY_FORMAT", &self.format),
            ("RELAY_SCHEMAS", &self.schemas),
            ("RELAY_SOURCE", &self.source),
            ("KAFKA_TOPIC", &self.topic),
            ("BATCH_SIZE", &self.batch_size),
        ]
        .into_iter()
        .filter_map(|(key, value)| value.as_ref().map(|v| (key, v)))
        .collect()
    }
}

#[derive(Args, Debug)]
pub struct KafkaArgs {
    #[command(subcommand)]
    pub command: KafkaCommand,
}

#[derive(Subcommand, Debug)]
pub enum KafkaCommand {
    /// Topic management.
    Topics {
        #[command(subcommand)]
        command: TopicsCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum TopicsCommand {
    /// Create topics that do not exist yet (an existing topic is left as it is).
    Create {
        /// Partitions of each new topic: the most processor instances that can share it.
        #[arg(long, default_value_t = 4, value_name = "N")]
        partitions: i32,
        /// Replicas of each partition.
        #[arg(long, default_value_t = 1, value_name = "N")]
        replication_factor: i32,
        /// Topics to create (default: KAFKA_TOPIC).
        #[arg(value_name = "TOPIC")]
        topics: Vec<String>,
    },
}

/// `relay`: runs until SIGINT/SIGTERM (or caught up).
pub async fn relay(
    config: Config,
    args: &RelayArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let counted = Arc::new(Stats::default());
    let stats = super::with_stats_file(&args.stats, counted.clone(), |file| async move {
        let options = RelayOptions {
            until_caught_up: args.until_caught_up,
            on_published: file.map(|file| stats_hook(file, counted)),
        };
        relay::run(&config, &options, shutdown)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))
    })
    .await?;
    tracing::info!(
        relayed = stats.relayed.load(Ordering::Relaxed),
        batches = stats.batches.load(Ordering::Relaxed),
        unpublishable = stats.unpublishable.load(Ordering::Relaxed),
        "relay stopped"
    );
    Ok(())
}

/// Feeds the stats file from the relay: published events count as applied,
/// unpublishable rows as dead-lettered.
fn stats_hook(file: Arc<StatsFile>, stats: Arc<Stats>) -> OnPublished {
    Arc::new(move |events, unpublishable| {
        stats
            .applied
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        stats
            .dead_lettered
            .fetch_add(unpublishable as u64, Ordering::Relaxed);
        stats.batches.fetch_add(1, Ordering::Relaxed);
        file.durable(events);
        file.batch_done();
    })
}

/// `kafka ...`: one line per topic on stdout; errors as one line.
pub async fn execute(config: &Config, args: &KafkaArgs) -> anyhow::Result<()> {
    match &args.command {
        KafkaCommand::Topics {
            command:
                TopicsCommand::Create {
                    partitions,
                    replication_factor,
                    topics,
                },
        } => {
            let topics = if topics.is_empty() {
                config.kafka.topics.clone()
            } else {
                topics.clone()
            };
            for line in
                create_topics(&config.kafka, &topics, *partitions, *replication_factor).await?
            {
                println!("{line}");
            }
        }
    }
    Ok(())
}

/// Creates the topics that are missing; says what became of each.
pub async fn create_topics(
    config: &KafkaConfig,
    topics: &[String],
    partitions: i32,
    replication_factor: i32,
) -> anyhow::Result<Vec<String>> {
    for topic in topics {
        if !crate::config::is_topic_name(topic) {
            anyhow::bail!("`{topic}` is not a Kafka topic name (1-249 characters of a-z, A-Z, 0-9, '.', '_', '-')");
        }
    }
    if partitions < 1 || replication_factor < 1 {
        anyhow::bail!("--partitions and --replication-factor must be at least 1");
    }
    let admin: AdminClient<QuietContext> = base_config(config)
        .create_with_context(QuietContext::default())
        .map_err(|e| {
            anyhow::anyhow!(
                "invalid Kafka configuration: {}",
                config.describe_refusal(&e)
            )
        })?;
    let admin = std::sync::Arc::new(admin);
    // One round trip first: an unreachable broker is one clear line, not a
    // timeout per topic.
    let probe = admin.clone();
    let timeout = config.timeout;
    tokio::task::spawn_blocking(move || probe.inner().fetch_metadata(None, timeout))
        .await?
        .map_err(|e| {
            if is_unreachable(&e) {
                anyhow::anyhow!(
                    "cannot reach the Kafka brokers at {} within {timeout:?} ({e})",
                    config.brokers
                )
            } else {
                anyhow::anyhow!("kafka brokers at {}: {e}", config.brokers)
            }
        })?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(replication_factor)))
        .collect();
    let options = AdminOptions::new()
        .request_timeout(Some(config.timeout))
        .operation_timeout(Some(config.timeout));
    let results = admin
        .create_topics(&new, &options)
        .await
        .map_err(|e| anyhow::anyhow!("cannot create topics at {}: {e}", config.brokers))?;
    let mut lines = Vec::new();
    for result in results {
        match result {
            Ok(topic) => lines.push(format!(
                "topic {topic}: created with {partitions} partitions"
            )),
            Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => {
                lines.push(format!("topic {topic}: exists"))
            }
            Err((topic, code)) => anyhow::bail!("cannot create topic `{topic}`: {code}"),
        }
    }
    // Report what the broker now says (an existing topic keeps its own count).
    let probe = admin.clone();
    let brokers = config.brokers.clone();
    let wanted = topics.to_vec();
    let counts = tokio::task::spawn_blocking(move || {
        topic_partitions(probe.inner(), &brokers, &wanted, timeout)
    })
    .await?;
    if let Ok(counts) = counts {
        for (line, (_, count)) in lines.iter_mut().zip(counts) {
            if line.ends_with(": exists") {
                line.push_str(&format!(" ({count} partitions)"));
            }
        }
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(created_at: Option<chrono::DateTime<chrono::Utc>>) -> crate::decode::OutboxEvent {
        crate::decode::OutboxEvent {
            event_id: uuid::Uuid::new_v4(),
            sequence_id: Some(1),
            aggregate_id: uuid::Uuid::new_v4(),
            aggregate_type: "User".into(),
            event_type: "UserCreated".into(),
            payload: serde_json::json!({"email": "a@example.com", "displayName": "A"}),
            created_at,
        }
    }

    #[test]
    fn the_stats_file_counts_published_batches() {
        let dir = std::env::temp_dir().join(format!("relay-stats-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("stats.json");
        let stats = Arc::new(Stats::default());
        let file = StatsFile::new(path.clone(), stats.clone());
        let hook = stats_hook(file.clone(), stats);
        let now = chrono::Utc::now();
        let events = [event(Some(now)), event(Some(now)), event(None)];
        hook(&events, 0);
        hook(&events[..1], 2);
        file.write(true).expect("write");
        let report: crate::stats_file::StatsReport =
            serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("parse");
        assert_eq!(report.applied, 4);
        assert_eq!(report.dead_lettered, 2);
        assert_eq!(report.done, 6);
        assert_eq!(report.batches, 2);
        assert!(report.last_done_unix_ms.is_some());
        // Commit-to-published latency of the events that have a `created_at`.
        assert_eq!(report.latency.count, 3);
        let _ = std::fs::remove_dir_all(dir);
    }
}
