//! `run` and `relay` observed: the server of `/metrics`, `/healthz` and
//! `/readyz` on `METRICS_ADDR`, the [`Health`] the runtime and the samplers
//! share, and the samplers of the source in use (docs/operating.md).

use crate::config::Config;
use crate::observe::{self, Health, Observed, Server};
use std::net::SocketAddr;
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
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Observing {
    /// Serves on `config.metrics_addr` (nothing when it is `off`).
    pub async fn start(config: &Config) -> Result<Observing, ListenError> {
        let health = Health::new();
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();
        if let Some(addr) = config.metrics_addr {
            let observed = Observed {
                metrics: observe::install(),
                health: health.clone(),
                live_within: live_within(config),
            };
            let Server { task, .. } = observe::serve(addr, observed, stop.clone())
                .await
                .map_err(|source| ListenError { addr, source })?;
            tasks.push(task);
        }
        Ok(Observing {
            health,
            stop,
            tasks,
        })
    }

    /// Stops the server and the samplers.
    pub async fn stop(self) {
        self.stop.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// `/healthz` fails when the runtime loop has not turned for this long: a
/// retry pause (up to `RETRY_BACKOFF_MAX`) ticks before and after it, so
/// twice that, and never under a minute.
fn live_within(config: &Config) -> Duration {
    (config.pipeline.backoff_max * 2).max(Duration::from_secs(60))
}
