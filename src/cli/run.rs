//! `run`: the main job. Follows the outbox and keeps the read models current
//! until SIGINT/SIGTERM (or, with `--until-caught-up`, until every row committed
//! before the start is applied or dead-lettered).
//!
//! Shutdown order: stop intake, finish the batch in flight, acknowledge, exit 0.
//! A second signal (or SHUTDOWN_TIMEOUT) drops the batch in flight at once:
//! still safe, since nothing is acknowledged before it is durable.

use super::flags::{self, Overrides};
use crate::checkpoint::MongoCheckpoint;
use crate::config::{Config, SourceKind};
use crate::counters::Stats;
use crate::observe::Component;
use crate::policy::{describe, Classify, ErrorClass};
use crate::projection::Projector;
use crate::rebuild::gate::Gate;
use crate::runtime::{OutboxMarker, Pipeline, Retry, Shared};
use crate::sink::{DiscardSink, MongoSink, Sink};
use crate::source::kafka::KafkaSource;
use crate::source::polling::PollingSource;
use crate::source::replication::{
    self, LoadPosition, ReplicationOptions, ReplicationSource, Resume, SlotOwner,
};
use crate::source::SourceError;
use crate::store::mongo::{redact_uri, MongoStore};

use clap::Args;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

#[derive(Args, Debug, Default)]
pub struct RunArgs {
    /// `--source`, `--workers`, `--batch-size`.
    #[command(flatten)]
    pub flags: Overrides<flags::Run>,
    /// Exit 0 once every outbox row committed before the start is applied or dead-lettered.
    #[arg(long)]
    pub until_caught_up: bool,
    /// Where events go: `project` (the read models in MongoDB) or `discard`
    /// (nothing is written and every event counts as applied, to measure a
    /// source alone; no checkpoint is kept, so replication resumes from the
    /// slot's own position).
    #[arg(long, value_name = "project|discard", default_value = "project")]
    pub sink: String,
    #[command(flatten)]
    pub stats: super::StatsFileArgs,
}

/// Connects to MongoDB and creates the read models' indexes, retrying
/// while it is unreachable (a transient state, also while the indexes are
/// made), until it answers or shutdown is requested.
async fn connect_store(config: &Config, retry: &Retry) -> anyhow::Result<Option<MongoStore>> {
    let uri = config.mongodb.uri.expose();
    let at = redact_uri(uri);
    let at = |source| MongoAt {
        uri: at.clone(),
        source,
    };
    let connected = retry
        .run(Component::Mongodb, "mongodb unreachable", async || {
            let store = MongoStore::connect(uri, &config.mongodb.database)
                .await
                .map_err(|source| Failed::Connect(at(source)))?
                .with_read_chunk(config.mongodb.read_chunk);
            store
                .ensure_indexes()
                .await
                .map_err(|source| Failed::Indexes(at(source)))?;
            Ok(store)
        })
        .await;
    match connected {
        Ok(store) => Ok(store),
        Err(Failed::Connect(e)) => Err(anyhow::anyhow!(
            "cannot use MongoDB at {}: {}",
            e.uri,
            describe(&e.source)
        )),
        Err(Failed::Indexes(e)) => {
            Err(anyhow::Error::new(e.source).context("cannot create the read-model indexes"))
        }
    }
}

/// Which step of [`connect_store`] failed.
#[derive(Debug, thiserror::Error)]
enum Failed {
    #[error(transparent)]
    Connect(MongoAt),
    #[error("cannot create the read-model indexes")]
    Indexes(#[source] MongoAt),
}

impl Classify for Failed {
    fn class(&self) -> ErrorClass {
        match self {
            Failed::Connect(e) | Failed::Indexes(e) => e.class(),
        }
    }

    fn retry_class(&self) -> crate::policy::RetryClass {
        match self {
            Failed::Connect(e) | Failed::Indexes(e) => e.source.retry_class(),
        }
    }
}

/// A MongoDB error with the (redacted) URI it concerns, for the retry log.
#[derive(Debug, thiserror::Error)]
#[error("mongodb at {uri}")]
struct MongoAt {
    uri: String,
    #[source]
    source: crate::store::mongo::StoreError,
}

impl Classify for MongoAt {
    fn class(&self) -> ErrorClass {
        self.source.class()
    }

    fn retry_class(&self) -> crate::policy::RetryClass {
        self.source.retry_class()
    }
}

/// Joins the consumer group, retrying while the brokers are unreachable;
/// `None` when shutdown came first.
async fn start_kafka(config: &Config, retry: &Retry) -> anyhow::Result<Option<KafkaSource>> {
    retry
        .run(
            Component::Kafka,
            "cannot start the kafka consumer",
            async || KafkaSource::start(&config.kafka, &config.pipeline).await,
        )
        .await
        .map_err(anyhow::Error::new)
}

/// Waits until this process owns the slot, retrying while PostgreSQL is
/// unreachable; `false` when shutdown came first.
async fn acquire(owner: &SlotOwner, retry: &Retry) -> anyhow::Result<bool> {
    let owned = retry
        .run(
            Component::Postgres,
            "cannot take the slot ownership",
            async || owner.acquire(retry.shutdown()).await,
        )
        .await
        .map_err(anyhow::Error::new)?;
    Ok(owned == Some(true))
}

/// The replication position MongoDB holds, read on every (re)connect.
fn checkpoint_loader(checkpoint: MongoCheckpoint) -> LoadPosition {
    Arc::new(move || {
        let checkpoint = checkpoint.clone();
        Box::pin(async move {
            checkpoint
                .load()
                .await
                .map_err(|err| SourceError::failed("cannot read the checkpoint", err))
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
    observing: &super::observing::Observing,
) -> anyhow::Result<()> {
    let discard = match args.sink.as_str() {
        "project" => false,
        "discard" => true,
        other => anyhow::bail!("--sink `{other}` is not one of: project, discard"),
    };
    let retry =
        Retry::new(&config.pipeline, shutdown.clone()).with_health(observing.health.clone());
    let store = if discard {
        None
    } else {
        match connect_store(&config, &retry).await? {
            Some(store) => Some(store),
            None => return Ok(()),
        }
    };
    let stats = Arc::new(Stats::default());
    let result = super::with_stats_file(&args.stats, stats.clone(), |stats_file| async {
        let shared = observing.shared(
            &config,
            config.source,
            shutdown,
            stats.clone(),
            args.until_caught_up,
            stats_file,
        );
        match store {
            Some(store) => {
                let gate = Gate::start(store.clone(), shared.shutdown.clone());
                let projector =
                    Projector::new(store.clone()).cached(config.pipeline.document_cache);
                let mut sink = MongoSink::new(projector).gated(gate);
                if config.source == SourceKind::Kafka {
                    // An aggregate's creation may still be on its way (another
                    // partition): the source tries such events again.
                    sink = sink.deferring(config.pipeline.max_retries);
                }
                let deferral = sink.deferral_stats();
                let result = run_source(&config, &shared, Some(store), sink).await;
                if let Some(deferral) = deferral {
                    tracing::info!(
                        expired = deferral.expired.load(Ordering::Relaxed),
                        out_of_order = deferral.out_of_order.load(Ordering::Relaxed),
                        "deferred events dead-lettered"
                    );
                }
                result
            }
            None => run_source(&config, &shared, None, DiscardSink).await,
        }
    })
    .await;
    result?;
    let count = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
    tracing::info!(
        applied = count(&stats.applied),
        duplicates = count(&stats.duplicates),
        unmatched = count(&stats.unmatched),
        dead_lettered = count(&stats.dead_lettered),
        dead_letters_again = count(&stats.dead_letters_again),
        checkpoint_refused = count(&stats.checkpoint_refused),
        "stopped"
    );
    Ok(())
}

/// The configured source into `sink` (`store`: the read models, when the
/// sink is theirs; it holds the replication checkpoint).
async fn run_source<K: Sink + Clone + 'static>(
    config: &Config,
    shared: &Shared,
    store: Option<MongoStore>,
    sink: K,
) -> anyhow::Result<()> {
    tracing::info!(
        source = ?config.source,
        postgres = %config.postgres.display_target(),
        mongodb = %redact_uri(config.mongodb.uri.expose()),
        database = %config.mongodb.database,
        "starting"
    );
    match config.source {
        SourceKind::Replication => run_replication(config, shared, store, sink).await,
        SourceKind::Polling => {
            let mut workers = JoinSet::new();
            for index in 0..config.polling.workers {
                let source = PollingSource::start(
                    &config.postgres,
                    config.polling.clone(),
                    worker_identity(index),
                )
                .await
                .map_err(anyhow::Error::new)?;
                let pipeline = Pipeline::new(source, sink.clone(), shared);
                let pipeline = if index == 0 {
                    pipeline
                } else {
                    pipeline.quiet()
                };
                workers.spawn(pipeline.run());
            }
            while let Some(result) = workers.join_next().await {
                if let Err(err) = result.map_err(|e| anyhow::anyhow!("worker crashed: {e}"))? {
                    shared.shutdown.cancel();
                    return Err(err.into());
                }
            }
            Ok(())
        }
        SourceKind::Kafka => {
            let retry = Retry::new(&config.pipeline, shared.shutdown.clone())
                .with_health(shared.health.clone());
            let Some(source) = start_kafka(config, &retry).await? else {
                return Ok(());
            };
            let kafka_stats = source.stats();
            let lag = sample_lag(config, &source);
            let result = Pipeline::new(source, sink, shared).run().await;
            drop(lag);
            result?;
            let relaxed = Ordering::Relaxed;
            tracing::info!(
                records = kafka_stats.records.load(relaxed),
                skipped = ?kafka_stats.skipped(),
                malformed = kafka_stats.malformed.load(relaxed),
                deferred = kafka_stats.deferred.load(relaxed),
                retried = kafka_stats.retried.load(relaxed),
                "kafka records"
            );
            Ok(())
        }
    }
}

/// Starts the consumer lag sampler of `source` (when the metrics are
/// served); it stops when the returned guard is dropped, or the consumer
/// closes.
fn sample_lag(config: &Config, source: &KafkaSource) -> tokio_util::sync::DropGuard {
    let stop = CancellationToken::new();
    if config.metrics_addr.is_some() {
        let sampler = crate::observe::kafka_lag::KafkaLagSampler {
            probe: source.lag_probe(),
            sampling: crate::observe::samplers::Sampling::default(),
            metrics: crate::observe::install(),
        };
        tokio::spawn(sampler.run(stop.clone()));
    }
    stop.drop_guard()
}

/// Replication: own the slot, resume from the MongoDB checkpoint (or, with
/// nothing to protect, from the slot's own position), run, release the slot.
async fn run_replication<K: Sink>(
    config: &Config,
    shared: &Shared,
    store: Option<MongoStore>,
    sink: K,
) -> anyhow::Result<()> {
    let retry =
        Retry::new(&config.pipeline, shared.shutdown.clone()).with_health(shared.health.clone());
    let checkpoint =
        store.map(|store| MongoCheckpoint::new(store, config.replication.slot.clone()));
    let owner = SlotOwner::new(&config.postgres, &config.replication.slot);
    if !acquire(&owner, &retry).await? {
        return Ok(());
    }
    let resume = match &checkpoint {
        Some(checkpoint) => Resume::Load(checkpoint_loader(checkpoint.clone())),
        // No effects to protect: the slot's own position will do.
        None => Resume::At(
            replication::slot_position(&config.postgres, &config.replication.slot)
                .await
                .map_err(anyhow::Error::new)?,
        ),
    };
    let options = ReplicationOptions {
        slot: config.replication.slot.clone(),
        publication: config.replication.publication.clone(),
        sweep: config.pipeline.mark_processed && checkpoint.is_some(),
    };
    let started = retry
        .run(
            Component::Replication,
            "cannot start replication",
            async || {
                ReplicationSource::start(
                    &config.postgres,
                    options.clone(),
                    owner.clone(),
                    resume.clone(),
                )
                .await
            },
        )
        .await
        .map_err(anyhow::Error::new)?;
    let Some(source) = started else {
        return Ok(());
    };
    let marker = (config.pipeline.mark_processed && checkpoint.is_some())
        .then(|| OutboxMarker::new(config.postgres.clone()));
    let result = Pipeline::new(source, sink, shared)
        .with_checkpoint(checkpoint)
        .with_marker(marker)
        .run()
        .await;
    owner.release().await;
    Ok(result?)
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
