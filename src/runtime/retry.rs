//! The one retry loop: an operation is tried until it succeeds, fails in a
//! way that is not transient ([`Classify`]), or shutdown is requested. Every
//! retry is logged ("... ; retrying", with the attempt and the pause) and
//! paused by [`Backoff`] (capped, exponential, jittered).

use crate::config::PipelineConfig;
use crate::policy::{describe, Backoff, Classify, ErrorClass};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Retries with backoff until success, a non-transient error, or shutdown.
#[derive(Debug, Clone)]
pub struct Retry {
    initial: Duration,
    max: Duration,
    shutdown: CancellationToken,
}

impl Retry {
    pub fn new(config: &PipelineConfig, shutdown: CancellationToken) -> Retry {
        Retry {
            initial: config.backoff_initial,
            max: config.backoff_max,
            shutdown,
        }
    }

    /// A fresh backoff with this helper's pauses.
    pub fn backoff(&self) -> Backoff {
        Backoff::new(self.initial, self.max)
    }

    /// Runs `attempt` until it succeeds (`Ok(Some)`), fails other than
    /// transiently (`Err`, for the caller to sort), or shutdown comes during
    /// a pause (`Ok(None)`). `what` says what failed, as in "mongodb
    /// unreachable".
    pub async fn run<T, E>(
        &self,
        what: &str,
        mut attempt: impl AsyncFnMut() -> Result<T, E>,
    ) -> Result<Option<T>, E>
    where
        E: Classify + std::error::Error,
    {
        let mut attempts = self.attempts(what);
        loop {
            match attempt().await {
                Ok(value) => return Ok(Some(value)),
                Err(err) => {
                    if !attempts.again(err).await? {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// The same loop, written out by the caller (where a closure cannot
    /// borrow what the attempt needs, or the attempt races shutdown):
    /// `loop { match try().await { Ok(v) => break, Err(e) => if
    /// !attempts.again(e).await? { stop } } }`.
    pub fn attempts<'a>(&'a self, what: &'a str) -> Attempts<'a> {
        Attempts {
            retry: self,
            what,
            backoff: self.backoff(),
        }
    }

    /// Logs a transient failure and pauses; `false` when shutdown came first.
    pub async fn wait(&self, what: &str, error: &str, backoff: &mut Backoff) -> bool {
        let delay = backoff.next_delay();
        tracing::warn!(
            error,
            attempt = backoff.attempts(),
            retry_in_ms = delay.as_millis() as u64,
            "{what}; retrying"
        );
        self.pause(delay).await
    }

    /// Sleeps `delay` unless shutdown comes first (then `false`).
    pub async fn pause(&self, delay: Duration) -> bool {
        tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }

    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }
}

/// The tries of one operation (see [`Retry::attempts`]).
pub struct Attempts<'a> {
    retry: &'a Retry,
    what: &'a str,
    backoff: Backoff,
}

impl Attempts<'_> {
    /// After a failed try: `Ok(true)` to try again (after the pause),
    /// `Ok(false)` when shutdown came during the pause, `Err` when the error
    /// is not transient.
    pub async fn again<E>(&mut self, err: E) -> Result<bool, E>
    where
        E: Classify + std::error::Error,
    {
        if err.class() != ErrorClass::Transient {
            return Err(err);
        }
        Ok(self
            .retry
            .wait(self.what, &describe(&err), &mut self.backoff)
            .await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::SourceError;

    fn retry(shutdown: CancellationToken) -> Retry {
        let config = PipelineConfig {
            batch_size: 1,
            batch_wait: Duration::from_millis(1),
            max_retries: 1,
            backoff_initial: Duration::from_millis(1),
            backoff_max: Duration::from_millis(2),
            mark_processed: false,
            shutdown_timeout: Duration::from_secs(1),
        };
        Retry::new(&config, shutdown)
    }

    #[tokio::test]
    async fn transient_errors_are_retried_and_others_returned() {
        let mut tries = 0;
        let done = retry(CancellationToken::new())
            .run("flaky", async || {
                tries += 1;
                if tries < 3 {
                    Err(SourceError::Transient("down".into()))
                } else {
                    Ok(tries)
                }
            })
            .await
            .expect("done");
        assert_eq!(done, Some(3));
        let fatal: Result<Option<()>, _> = retry(CancellationToken::new())
            .run("broken", async || {
                Err(SourceError::Fatal("misconfigured".into()))
            })
            .await;
        assert!(fatal.is_err());
    }

    #[tokio::test]
    async fn shutdown_stops_the_retries() {
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let stopped: Option<()> = retry(shutdown)
            .run("down", async || Err(SourceError::Transient("down".into())))
            .await
            .expect("no error");
        assert_eq!(stopped, None);
    }
}
