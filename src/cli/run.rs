//! `run`: the main job. Follows the outbox and keeps the read models current
//! until SIGINT/SIGTERM (or, with `--until-caught-up`, until every row committed
//! before the start is applied or dead-lettered).
//!
//! Shutdown order: stop intake, finish the batch in flight, acknowledge, exit 0.
//! A second signal (or SHUTDOWN_TIMEOUT) drops the batch in flight at once:
//! still safe, since nothing is acknowledged before it is durable.

use crate::checkpoint::MongoCheckpoint;
use crate::config::{Config, SourceKind};
use crate::pipeline::{OutboxMarker, Pipeline, Stats};
use crate::policy::Backoff;
use crate::projection::Projector;
use crate::source::kafka::KafkaSource;
use crate::source::polling::PollingSource;
use crate::source::replication::{
    self, LoadPosition, ReplicationOptions, ReplicationSource, Resume, SlotOwner,
};
use crate::source::SourceError;
use crate::stats_file::StatsFile;
use crate::store::mongo::{redact_uri, MongoStore};
use clap::Args;
use std::sync::Arc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

#[derive(Args, Debug, Default)]
pub struct RunArgs {
    /// Capture method (overrides SOURCE): replication, polling or kafka.
    #[arg(long, value_name = "SOURCE")]
    pub source: Option<String>,
    /// Polling workers in this process (overrides POLL_WORKERS).
    #[arg(long, value_name = "N")]
    pub workers: Option<String>,
    /// Most events per batch (overrides BATCH_SIZE).
    #[arg(long, value_name = "N")]
    pub batch_size: Option<String>,
    /// Exit 0 once every outbox row committed before the start is applied or dead-lettered.
    #[arg(long)]
    pub until_caught_up: bool,
    /// `discard`: nothing is written (measures the capture alone;
    /// replication resumes from the slot's own position).
    #[arg(long, hide = true, value_name = "SINK", default_value = "project")]
    pub sink: String,
    #[command(flatten)]
    pub stats: super::StatsFileArgs,
}

impl RunArgs {
    pub fn overrides(&self) -> Vec<(&'static str, &String)> {
        [
            ("SOURCE", &self.source),
            ("POLL_WORKERS", &self.workers),
            ("BATCH_SIZE", &self.batch_size),
        ]
        .into_iter()
        .filter_map(|(key, value)| value.as_ref().map(|v| (key, v)))
        .collect()
    }
}

/// Connects to MongoDB, retrying while it is unreachable (a transient state),
/// until it answers or shutdown is requested.
async fn connect_store(
    config: &Config,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<MongoStore>> {
    let uri = config.mongodb.uri.expose();
    let mut backoff = Backoff::new(config.pipeline.backoff_initial, config.pipeline.backoff_max);
    loop {
        match MongoStore::connect(uri, &config.mongodb.database).await {
            Ok(store) => {
                store
                    .ensure_indexes()
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot create the read-model indexes: {e}"))?;
                return Ok(Some(store));
            }
            Err(err) if err.is_transient() => {
                let delay = backoff.next_delay();
                tracing::warn!(uri = %redact_uri(uri), error = %err, retry_in_ms = delay.as_millis() as u64, "mongodb unreachable; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(err) => anyhow::bail!("cannot use MongoDB at {}: {err}", redact_uri(uri)),
        }
    }
}

/// Joins the consumer group, retrying while the brokers are unreachable;
/// `None` when shutdown came first.
async fn start_kafka(
    config: &Config,
    store: Option<&MongoStore>,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<KafkaSource>> {
    let mut backoff = Backoff::new(config.pipeline.backoff_initial, config.pipeline.backoff_max);
    loop {
        match KafkaSource::start(&config.kafka, &config.pipeline, store.cloned()).await {
            Ok(source) => return Ok(Some(source)),
            Err(err) if err.is_transient() => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "cannot start the kafka consumer; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(err) => anyhow::bail!("{err}"),
        }
    }
}

/// Waits until this process owns the slot, retrying while PostgreSQL is
/// unreachable; `false` when shutdown came first.
pub(crate) async fn acquire(
    owner: &SlotOwner,
    config: &Config,
    shutdown: &CancellationToken,
) -> anyhow::Result<bool> {
    let mut backoff = Backoff::new(config.pipeline.backoff_initial, config.pipeline.backoff_max);
    loop {
        match owner.acquire(shutdown).await {
            Ok(owned) => return Ok(owned),
            Err(err) if err.is_transient() => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "cannot take the slot ownership; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(false),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(err) => anyhow::bail!("{err}"),
        }
    }
}

/// The replication position MongoDB holds, read on every (re)connect.
fn checkpoint_loader(checkpoint: MongoCheckpoint) -> LoadPosition {
    Arc::new(move || {
        let checkpoint = checkpoint.clone();
        Box::pin(async move {
            checkpoint.load().await.map_err(|err| {
                let text = format!("cannot read the checkpoint: {err}");
                if err.is_transient() {
                    SourceError::Transient(text)
                } else {
                    SourceError::Fatal(text)
                }
            })
        })
    })
}

/// What every polling worker of this process starts its `lock_id` with.
fn worker_prefix() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    let mut prefix = format!("{host}:{}:w", std::process::id());
    // Room for the worker index and the lease (`lock_id` is 100 characters).
    while prefix.len() > 70 {
        prefix.remove(0);
    }
    prefix
}

/// The identity polling workers write into `lock_id`.
fn worker_identity(index: usize) -> String {
    format!("{}{index}", worker_prefix())
}

/// After a hard stop (second signal, or the shutdown timeout): the polling
/// claims of this process go back to `pending` rather than waiting for their
/// lease. Bounded: a database that does not answer leaves them to the lease.
pub async fn release_after_hard_stop(config: &Config) {
    if config.source != SourceKind::Polling {
        return;
    }
    let released = tokio::time::timeout(
        std::time::Duration::from_secs(3),
        crate::source::polling::release_claims(&config.postgres, &worker_prefix()),
    )
    .await;
    match released {
        Ok(Ok(rows)) => tracing::warn!(rows, "hard stop: released the claimed rows"),
        Ok(Err(err)) => {
            tracing::warn!(error = %err, "hard stop: claims left to expire with their lease")
        }
        Err(_) => tracing::warn!("hard stop: claims left to expire with their lease"),
    }
}

/// Runs the pipeline until done; `shutdown` stops intake gracefully.
pub async fn run(
    config: Config,
    args: &RunArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let discard = match args.sink.as_str() {
        "project" => false,
        "discard" => true,
        other => anyhow::bail!("--sink `{other}` is not one of: project, discard"),
    };
    let store = if discard {
        None
    } else {
        match connect_store(&config, &shutdown).await? {
            Some(store) => Some(store),
            None => return Ok(()),
        }
    };
    let projector = store.clone().map(Projector::new);
    let stats = Arc::new(Stats::default());
    super::with_stats_file(&args.stats, stats.clone(), |file| {
        run_source(&config, args, shutdown, store, projector, &stats, file)
    })
    .await
}

#[allow(clippy::too_many_arguments)]
async fn run_source(
    config: &Config,
    args: &RunArgs,
    shutdown: CancellationToken,
    store: Option<MongoStore>,
    projector: Option<Projector>,
    stats: &Arc<Stats>,
    stats_file: Option<Arc<StatsFile>>,
) -> anyhow::Result<()> {
    tracing::info!(
        source = ?config.source,
        postgres = %config.postgres.display_target(),
        mongodb = %redact_uri(config.mongodb.uri.expose()),
        database = %config.mongodb.database,
        "starting"
    );
    match config.source {
        SourceKind::Replication => {
            let checkpoint = store
                .as_ref()
                .map(|store| MongoCheckpoint::new(store.clone(), config.replication.slot.clone()));
            let owner = SlotOwner::new(&config.postgres, &config.replication.slot);
            if !acquire(&owner, config, &shutdown).await? {
                return Ok(());
            }
            let resume = match &checkpoint {
                Some(checkpoint) => Resume::Load(checkpoint_loader(checkpoint.clone())),
                // No effects to protect: the slot's own position will do.
                None => Resume::At(
                    replication::slot_position(&config.postgres, &config.replication.slot)
                        .await
                        .map_err(|e| anyhow::anyhow!("{e}"))?,
                ),
            };
            let options = ReplicationOptions {
                slot: config.replication.slot.clone(),
                publication: config.replication.publication.clone(),
                sweep: config.pipeline.mark_processed && checkpoint.is_some(),
            };
            let mut backoff =
                Backoff::new(config.pipeline.backoff_initial, config.pipeline.backoff_max);
            let source = loop {
                let started = ReplicationSource::start(
                    &config.postgres,
                    options.clone(),
                    owner.clone(),
                    resume.clone(),
                )
                .await;
                match started {
                    Ok(source) => break source,
                    Err(err) if err.is_transient() => {
                        let delay = backoff.next_delay();
                        tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "cannot start replication; retrying");
                        tokio::select! {
                            _ = shutdown.cancelled() => return Ok(()),
                            _ = tokio::time::sleep(delay) => {}
                        }
                    }
                    Err(err) => anyhow::bail!("{err}"),
                }
            };
            let marker = (config.pipeline.mark_processed && checkpoint.is_some())
                .then(|| OutboxMarker::new(config.postgres.clone()));
            let pipeline = Pipeline {
                source,
                projector,
                checkpoint,
                marker,
                config: config.pipeline.clone(),
                shutdown,
                stats: stats.clone(),
                until_caught_up: args.until_caught_up,
                report_progress: true,
                stats_file: stats_file.clone(),
            };
            let result = pipeline.run().await;
            owner.release().await;
            result?;
        }
        SourceKind::Polling => {
            let mut workers = JoinSet::new();
            for index in 0..config.polling.workers {
                let source = PollingSource::start(
                    &config.postgres,
                    config.polling.clone(),
                    worker_identity(index),
                )
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
                let pipeline = Pipeline {
                    source,
                    projector: projector.clone(),
                    checkpoint: None,
                    marker: None,
                    config: config.pipeline.clone(),
                    shutdown: shutdown.clone(),
                    stats: stats.clone(),
                    until_caught_up: args.until_caught_up,
                    report_progress: index == 0,
                    stats_file: stats_file.clone(),
                };
                workers.spawn(pipeline.run());
            }
            while let Some(result) = workers.join_next().await {
                if let Err(err) = result.map_err(|e| anyhow::anyhow!("worker crashed: {e}"))? {
                    shutdown.cancel();
                    return Err(err.into());
                }
            }
        }
        SourceKind::Kafka => {
            let Some(source) = start_kafka(config, store.as_ref(), &shutdown).await? else {
                return Ok(());
            };
            let kafka_stats = source.stats();
            let mut projector = projector;
            if let Some(projector) = projector.as_mut() {
                // An aggregate's creation may still be on its way (another
                // partition): the source retries such events, then dead-letters.
                projector.dead_letter_races = false;
            }
            let pipeline = Pipeline {
                source,
                projector,
                checkpoint: None,
                marker: None,
                config: config.pipeline.clone(),
                shutdown,
                stats: stats.clone(),
                until_caught_up: args.until_caught_up,
                report_progress: true,
                stats_file: stats_file.clone(),
            };
            pipeline.run().await?;
            let relaxed = std::sync::atomic::Ordering::Relaxed;
            tracing::info!(
                records = kafka_stats.records.load(relaxed),
                skipped = ?kafka_stats.skipped(),
                malformed = kafka_stats.malformed.load(relaxed),
                deferred = kafka_stats.deferred.load(relaxed),
                retried = kafka_stats.retried.load(relaxed),
                expired = kafka_stats.expired.load(relaxed),
                out_of_order = kafka_stats.out_of_order.load(relaxed),
                "kafka records"
            );
        }
    }
    tracing::info!(
        applied = stats.applied.load(std::sync::atomic::Ordering::Relaxed),
        duplicates = stats.duplicates.load(std::sync::atomic::Ordering::Relaxed),
        unmatched = stats.unmatched.load(std::sync::atomic::Ordering::Relaxed),
        dead_lettered = stats
            .dead_lettered
            .load(std::sync::atomic::Ordering::Relaxed),
        dead_letters_again = stats
            .dead_letters_again
            .load(std::sync::atomic::Ordering::Relaxed),
        "stopped"
    );
    Ok(())
}

/// First SIGINT/SIGTERM: graceful; second (or the timeout): `hard` fires.
pub fn watch_signals(
    shutdown: CancellationToken,
    hard: CancellationToken,
    timeout: std::time::Duration,
) {
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!(
            "shutting down: finishing the batch in flight (a second signal stops at once)"
        );
        shutdown.cancel();
        tokio::select! {
            _ = wait_for_signal() => tracing::warn!("second signal: stopping now"),
            _ = tokio::time::sleep(timeout) => tracing::warn!("shutdown timed out: stopping now"),
        }
        hard.cancel();
    });
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
