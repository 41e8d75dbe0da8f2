//! The one retry loop: an operation is tried until it succeeds, fails in a
//! way that is not transient ([`Classify`]), or shutdown is requested. Each
//! pause is [`Backoff`]'s (capped, exponential, jittered).
//!
//! An outage is logged twice, not once per attempt: at warn when it starts
//! ("... ; retrying", with the error), at info when it ends (how long, how
//! many attempts); the attempts between are at debug, unless their error
//! differs from the last one logged (a new cause is logged at warn). While it lasts the
//! component's health check fails (`/readyz`) and each attempt counts in
//! `event_processor_retries_total`, by its error's [`RetryClass`].

use crate::config::PipelineConfig;
use crate::observe::{self, Component, Health};
use crate::policy::{describe, Backoff, Classify, ErrorClass, RetryClass};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Retries with backoff until success, a non-transient error, or shutdown.
#[derive(Debug, Clone)]
pub struct Retry {
    initial: Duration,
    max: Duration,
    shutdown: CancellationToken,
    health: Option<Health>,
}

impl Retry {
    pub fn new(config: &PipelineConfig, shutdown: CancellationToken) -> Retry {
        Retry {
            initial: config.backoff_initial,
            max: config.backoff_max,
            shutdown,
            health: None,
        }
    }

    /// Outages fail the component's check in `health` while they last (and
    /// each pause ticks its liveness: the process is alive, waiting).
    pub fn with_health(mut self, health: Health) -> Retry {
        self.health = Some(health);
        self
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
        component: Component,
        what: &str,
        mut attempt: impl AsyncFnMut() -> Result<T, E>,
    ) -> Result<Option<T>, E>
    where
        E: Classify + std::error::Error,
    {
        let mut attempts = self.attempts(component, what);
        loop {
            if let Some(done) = attempts.settle(attempt().await).await {
                return done;
            }
        }
    }

    /// The same loop, written out by the caller (where a closure cannot
    /// borrow what the attempt needs, or the attempt races shutdown):
    /// `loop { if let Some(done) = attempts.settle(try().await).await { break done } }`.
    pub fn attempts<'a>(&'a self, component: Component, what: &'a str) -> Attempts<'a> {
        Attempts {
            retry: self,
            outage: Outage::new(component, what),
            backoff: self.backoff(),
        }
    }

    /// Sleeps `delay` unless shutdown comes first (then `false`).
    pub async fn pause(&self, delay: Duration) -> bool {
        self.tick();
        let slept = tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        };
        self.tick();
        slept
    }

    fn tick(&self) {
        if let Some(health) = &self.health {
            health.tick();
        }
    }

    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }
}

/// The name of the check an outage of `component` fails (apart from the
/// samplers' own `postgres`, `mongodb`, `kafka`, which a working ping would
/// turn ok while writes still fail).
fn check_of(component: Component) -> &'static str {
    match component {
        Component::Postgres => "runtime_postgres",
        Component::Replication => "runtime_replication",
        Component::Mongodb => "runtime_mongodb",
        Component::Kafka => "runtime_kafka",
    }
}

/// One outage of one operation: when it began and how many attempts failed.
#[derive(Debug)]
pub struct Outage<'a> {
    component: Component,
    what: &'a str,
    began: Option<(Instant, u32)>,
    /// The error last logged at warn: a different one is news, logged too.
    last_error: String,
}

impl<'a> Outage<'a> {
    pub fn new(component: Component, what: &'a str) -> Outage<'a> {
        Outage {
            component,
            what,
            began: None,
            last_error: String::new(),
        }
    }

    /// A transient failure of the kind `class`: logged (warn the first
    /// time, debug after), counted, the check failing; then the pause.
    /// `false` when shutdown came first.
    pub async fn failed(
        &mut self,
        retry: &Retry,
        error: &str,
        class: RetryClass,
        backoff: &mut Backoff,
    ) -> bool {
        let delay = backoff.next_delay();
        let attempt = backoff.attempts();
        observe::retry(self.component, class);
        let retry_in_ms = delay.as_millis() as u64;
        match &mut self.began {
            None => {
                self.began = Some((Instant::now(), 1));
                self.last_error = error.to_string();
                let class = class.label();
                tracing::warn!(
                    error,
                    class,
                    attempt,
                    retry_in_ms,
                    "{}; retrying",
                    self.what
                );
                if let Some(health) = &retry.health {
                    health.set_failing(check_of(self.component), format!("{}: {error}", self.what));
                }
            }
            Some((_, failures)) => {
                *failures += 1;
                if error == self.last_error {
                    tracing::debug!(error, attempt, retry_in_ms, "{}; retrying", self.what);
                } else {
                    self.last_error = error.to_string();
                    tracing::warn!(error, attempt, retry_in_ms, "{}; still retrying", self.what);
                }
            }
        }
        retry.pause(delay).await
    }

    /// The operation succeeded: an outage in progress ends (logged once at
    /// info, the check ok again).
    pub fn recovered(&mut self, retry: &Retry) {
        let Some((began, failures)) = self.began.take() else {
            return;
        };
        tracing::info!(
            after_seconds = began.elapsed().as_secs_f64(),
            failed_attempts = failures,
            "{}: recovered",
            self.what
        );
        if let Some(health) = &retry.health {
            health.set_ok(check_of(self.component));
        }
    }
}

/// The tries of one operation (see [`Retry::attempts`]).
pub struct Attempts<'a> {
    retry: &'a Retry,
    outage: Outage<'a>,
    backoff: Backoff,
}

impl Attempts<'_> {
    /// Sorts one try: `None` to try again (after the pause); else what the
    /// loop ends with, as [`Retry::run`] returns it (`Ok(Some)` success,
    /// `Ok(None)` shutdown during the pause, `Err` not transient).
    pub async fn settle<T, E>(&mut self, tried: Result<T, E>) -> Option<Result<Option<T>, E>>
    where
        E: Classify + std::error::Error,
    {
        match tried {
            Ok(value) => {
                self.outage.recovered(self.retry);
                Some(Ok(Some(value)))
            }
            Err(err) => match self.again(err).await {
                Ok(true) => None,
                Ok(false) => Some(Ok(None)),
                Err(err) => Some(Err(err)),
            },
        }
    }

    /// After a failed try: `Ok(true)` to try again (after the pause),
    /// `Ok(false)` when shutdown came during the pause, `Err` when the error
    /// is not transient.
    async fn again<E>(&mut self, err: E) -> Result<bool, E>
    where
        E: Classify + std::error::Error,
    {
        if err.class() != ErrorClass::Transient {
            return Err(err);
        }
        Ok(self
            .outage
            .failed(
                self.retry,
                &describe(&err),
                err.retry_class(),
                &mut self.backoff,
            )
            .await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::SourceError;

    fn retry(shutdown: CancellationToken) -> Retry {
        Retry::new(&super::super::tests::quick_config(1), shutdown)
    }

    #[tokio::test]
    async fn transient_errors_are_retried_and_others_returned() {
        let mut tries = 0;
        let done = retry(CancellationToken::new())
            .run(Component::Postgres, "flaky", async || {
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
            .run(Component::Postgres, "broken", async || {
                Err(SourceError::Fatal("misconfigured".into()))
            })
            .await;
        assert!(fatal.is_err());
    }

    #[tokio::test]
    async fn an_outage_fails_its_check_until_it_ends() {
        let health = Health::new();
        let retry = retry(CancellationToken::new()).with_health(health.clone());
        let state = |health: &Health| {
            health
                .readiness()
                .checks
                .iter()
                .find(|check| check.name == "runtime_mongodb")
                .map(|check| check.state)
        };
        let mut seen = Vec::new();
        let done = retry
            .run(Component::Mongodb, "mongodb unreachable", async || {
                seen.push(state(&health));
                if seen.len() < 3 {
                    Err(SourceError::Transient("down".into()))
                } else {
                    Ok(())
                }
            })
            .await
            .expect("done");
        assert_eq!(done, Some(()));
        assert_eq!(seen, [None, Some("failing"), Some("failing")]);
        assert_eq!(state(&health), Some("ok"));
        assert!(health.readiness().ready);
    }

    #[tokio::test]
    async fn shutdown_stops_the_retries() {
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let stopped: Option<()> = retry(shutdown)
            .run(Component::Postgres, "down", async || {
                Err(SourceError::Transient("down".into()))
            })
            .await
            .expect("no error");
        assert_eq!(stopped, None);
    }
}
