//! `relay` (outbox -> Kafka in Debezium's format) and `kafka topics create`.

use super::flags::{self, Overrides};
use crate::config::{Config, KafkaConfig};
use crate::counters::Stats;
use crate::relay;
use crate::source::kafka::{base_config, is_unreachable, topic_partitions, QuietContext};
use clap::{Args, Subcommand};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::error::RDKafkaErrorCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

#[derive(Args, Debug, Default)]
pub struct RelayArgs {
    /// `--format`, `--schemas`, `--source`, `--topic`, `--batch-size`.
    #[command(flatten)]
    pub flags: Overrides<flags::Relay>,
    /// Exit 0 once every outbox row committed before the start is published.
    #[arg(long)]
    pub until_caught_up: bool,
    // In the stats file, published events count as applied and
    // unpublishable rows as dead-lettered.
    #[command(flatten)]
    pub stats: super::StatsFileArgs,
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
    observing: &super::observing::Observing,
) -> anyhow::Result<()> {
    let stats = Arc::new(Stats::default());
    // Published events count as applied, unpublishable rows as dead-lettered.
    super::with_stats_file(&args.stats, stats.clone(), |stats_file| async {
        let shared = observing.shared(
            &config,
            config.kafka.relay.source.into(),
            shutdown,
            stats.clone(),
            args.until_caught_up,
            stats_file,
        );
        relay::run(&config, &shared)
            .await
            .map_err(anyhow::Error::from)
    })
    .await?;
    tracing::info!(
        relayed = stats.applied.load(Ordering::Relaxed),
        batches = stats.batches.load(Ordering::Relaxed),
        unpublishable = stats.dead_lettered.load(Ordering::Relaxed),
        "relay stopped"
    );
    Ok(())
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
