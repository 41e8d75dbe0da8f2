//! `run` and `relay` observed: the server of `/metrics`, `/healthz` and
//! `/readyz` on `METRICS_ADDR`, the [`Health`] the runtime and the samplers
//! share, the samplers of the source in use, and the heartbeat of the
//! replication source (docs/operating.md).

use crate::config::{Config, SourceKind};
use crate::console::access::Access;
use crate::console::snapshot::LagKind;
use crate::console::{Console, Settings};
use crate::counters::Stats;
use crate::observe::samplers::{
    BacklogSampler, KafkaSampler, MongoSampler, Sampling, SlotLagSampler,
};
use crate::observe::{self, Health, Observed, Server};
use crate::runtime::Shared;
use crate::stats_file::StatsFile;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The metrics server could not listen: the operator's to fix (exit 2).
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot serve /metrics on METRICS_ADDR {addr}: {source}; \
     give a free address (port 0 picks one) or METRICS_ADDR=off"
)]
pub struct ListenError {
    addr: SocketAddr,
    #[source]
    source: std::io::Error,
}

/// What a running `run` or `relay` is observed by. Stopped with
/// [`Observing::stop`] once the job has returned, so that a graceful
/// shutdown is observed to its end.
pub struct Observing {
    pub health: Health,
    /// The LSN of the last acknowledged batch (replication), for the slot
    /// lag and the stall rule; 0 before the first.
    pub durable_lsn: Arc<AtomicU64>,
    /// Events acknowledged so far (polling), for the stall rule.
    pub acknowledged: Arc<AtomicU64>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Observing {
    /// Serves on `config.metrics_addr`, with the console of `process`;
    /// with `off` nothing is served and nothing recorded.
    pub async fn start(config: &Config, process: Process) -> Result<Observing, ListenError> {
        let health = Health::new();
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();
        if config.metrics_addr.is_none() {
            observe::stop_recording();
        }
        if let Some(addr) = config.metrics_addr {
            let observed = Observed {
                metrics: observe::install(),
                health: health.clone(),
                live_within: live_within(config),
                console: Some(Console::new(
                    console_settings(config, addr, process),
                    observe::install(),
                    health.clone(),
                )),
            };
            let Server { task, .. } = observe::serve(addr, observed, stop.clone())
                .await
                .map_err(|source| ListenError { addr, source })?;
            tasks.push(task);
        }
        Ok(Observing {
            health,
            durable_lsn: Arc::default(),
            acknowledged: Arc::default(),
            stop,
            tasks,
        })
    }

    /// What the runtime's workers share, observed through this: the
    /// health, and the positions the samplers read.
    pub fn shared(
        &self,
        config: &Config,
        source: SourceKind,
        shutdown: CancellationToken,
        stats: Arc<Stats>,
        until_caught_up: bool,
        stats_file: Option<Arc<StatsFile>>,
    ) -> Shared {
        Shared {
            config: config.pipeline.clone(),
            source,
            shutdown,
            stats,
            until_caught_up,
            stats_file,
            health: self.health.clone(),
            durable_lsn: self.durable_lsn.clone(),
            acknowledged: self.acknowledged.clone(),
        }
    }

    /// Starts the samplers of what this process depends on: the capture
    /// (`source`, with `slot` for replication), MongoDB when `mongodb` (the
    /// read models are the sink), Kafka when `kafka` (the kafka source, the
    /// relay's topic). Nothing is sampled when the server is off.
    pub fn sample(&mut self, config: &Config, capture: Capture<'_>, mongodb: bool, kafka: bool) {
        if config.metrics_addr.is_none() {
            return;
        }
        let sampling = Sampling::default();
        let metrics = observe::install();
        let health = self.health.clone();
        match capture {
            Capture::Replication { slot } => self.spawn(
                SlotLagSampler {
                    pg: config.postgres.clone(),
                    slot: slot.to_string(),
                    durable_lsn: self.durable_lsn.clone(),
                    acknowledged: self.acknowledged.clone(),
                    sampling,
                    health: health.clone(),
                    metrics,
                }
                .run(self.stop.clone()),
            ),
            Capture::Polling => self.spawn(
                BacklogSampler {
                    pg: config.postgres.clone(),
                    acknowledged: self.acknowledged.clone(),
                    sampling,
                    health: health.clone(),
                    metrics,
                }
                .run(self.stop.clone()),
            ),
            Capture::Kafka => {}
        }
        if mongodb {
            self.spawn(
                MongoSampler {
                    uri: config.mongodb.uri.expose().to_string(),
                    database: config.mongodb.database.clone(),
                    sampling,
                    health: health.clone(),
                    metrics,
                }
                .run(self.stop.clone()),
            );
        }
        if kafka {
            let mut client = crate::source::kafka::base_config(&config.kafka);
            // A metadata request for a missing topic must not create it
            // (a producer's requests would, by librdkafka's default).
            client.set("allow.auto.create.topics", "false");
            self.spawn(
                KafkaSampler {
                    client,
                    topic: config.kafka.topics.first().cloned(),
                    sampling,
                    health,
                }
                .run(self.stop.clone()),
            );
        }
    }

    /// Starts the heartbeat emitter when `capture` is the replication source
    /// and `HEARTBEAT_INTERVAL` is not `off`; it runs whether or not the
    /// metrics are served (it also moves an idle slot), until [`Self::stop`].
    pub fn heartbeat(&mut self, config: &Config, capture: Capture<'_>) {
        let (Capture::Replication { .. }, Some(interval)) = (capture, config.heartbeat_interval)
        else {
            return;
        };
        self.spawn(observe::heartbeat::run_emitter(
            config.postgres.clone(),
            interval,
            observe::install(),
            self.stop.clone(),
        ));
    }

    fn spawn(&mut self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.tasks.push(tokio::spawn(task));
    }

    /// Stops the server, the samplers and the heartbeat.
    pub async fn stop(self) {
        self.stop.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Which process is observed, for its console.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Process {
    /// `run`; `project`: its sink is the read models (it has dead letters).
    Run {
        project: bool,
    },
    Relay,
}

fn console_settings(config: &Config, addr: SocketAddr, process: Process) -> Settings {
    let (name, source) = match process {
        Process::Run { .. } => ("run", config.source),
        Process::Relay => ("relay", SourceKind::from(config.kafka.relay.source)),
    };
    let (source, lag) = match source {
        SourceKind::Replication => ("replication", LagKind::Slot),
        SourceKind::Polling => ("polling", LagKind::Backlog),
        SourceKind::Kafka => ("kafka", LagKind::Consumer),
    };
    let mongodb = (process == Process::Run { project: true })
        .then(|| (config.mongodb.uri.clone(), config.mongodb.database.clone()));
    Settings {
        process: name,
        source,
        lag,
        mongodb,
        postgres: config.postgres.clone(),
        pipeline: config.pipeline.clone(),
        access: Access::new(addr, config.console_token.as_ref()),
    }
}

/// The capture a process samples.
#[derive(Debug, Clone, Copy)]
pub enum Capture<'a> {
    Replication { slot: &'a str },
    Polling,
    Kafka,
}

impl<'a> Capture<'a> {
    /// `run`'s capture.
    pub fn of_run(config: &'a Config) -> Capture<'a> {
        match config.source {
            SourceKind::Replication => Capture::Replication {
                slot: &config.replication.slot,
            },
            SourceKind::Polling => Capture::Polling,
            SourceKind::Kafka => Capture::Kafka,
        }
    }
}

/// `/healthz` fails when the runtime loop has not turned for this long: a
/// retry pause (up to `RETRY_BACKOFF_MAX`) ticks before and after it, so
/// twice that, and never under a minute.
fn live_within(config: &Config) -> Duration {
    (config.pipeline.backoff_max * 2).max(Duration::from_secs(60))
}
