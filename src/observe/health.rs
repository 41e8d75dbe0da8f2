//! Liveness and readiness: a tick the runtime loop bumps each turn, and named
//! checks that components and samplers set. Each change of a check's state is
//! logged once (warn when it fails, info when it recovers, with how long it
//! lasted), not once per sample.

use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// One check as `/readyz` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    pub name: String,
    /// `ok` or `failing`.
    pub state: &'static str,
    /// Why it fails (`null` when ok).
    pub reason: Option<String>,
    /// When it entered its state (RFC 3339).
    pub since: String,
}

/// The body of `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Readiness {
    pub ready: bool,
    pub checks: Vec<CheckReport>,
}

#[derive(Debug, Clone)]
struct Check {
    failing: Option<String>,
    since: SystemTime,
    since_instant: Instant,
}

/// The health of the process, shared by every component (cloning shares it).
#[derive(Debug, Clone)]
pub struct Health {
    checks: Arc<Mutex<BTreeMap<String, Check>>>,
    started: Instant,
    /// Milliseconds after `started` of the runtime loop's last turn.
    last_tick: Arc<AtomicU64>,
    /// Changes of state are logged (not for a one-shot look).
    logged: bool,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    /// No checks yet, and alive as of now.
    pub fn new() -> Health {
        Health {
            checks: Arc::default(),
            started: Instant::now(),
            last_tick: Arc::new(AtomicU64::new(0)),
            logged: true,
        }
    }

    /// As [`Health::new`], but nothing is logged: for a one-shot look
    /// (`status`), which prints the checks itself.
    pub fn unlogged() -> Health {
        Health {
            logged: false,
            ..Health::new()
        }
    }

    /// Declares a check before its first result: failing, "not checked yet"
    /// (a process is not ready before it has looked).
    pub fn expect(&self, name: &str) {
        let mut checks = self.lock();
        checks.entry(name.to_string()).or_insert_with(|| Check {
            failing: Some("not checked yet".to_string()),
            since: SystemTime::now(),
            since_instant: Instant::now(),
        });
    }

    pub fn set_ok(&self, name: &str) {
        self.set(name, None);
    }

    pub fn set_failing(&self, name: &str, reason: impl Into<String>) {
        self.set(name, Some(reason.into()));
    }

    fn set(&self, name: &str, failing: Option<String>) {
        let logged = self.logged;
        let mut checks = self.lock();
        let now = (SystemTime::now(), Instant::now());
        match checks.get_mut(name) {
            Some(check) => {
                match (&check.failing, &failing) {
                    (None, None) => return,
                    (Some(_), Some(_)) => {
                        // Still failing: the reason may say more now; `since` stays.
                        check.failing = failing;
                        return;
                    }
                    (Some(reason), None) if logged => tracing::info!(
                        check = name,
                        after_seconds = check.since_instant.elapsed().as_secs(),
                        was = %reason,
                        "health check recovered"
                    ),
                    (None, Some(reason)) if logged => {
                        tracing::warn!(check = name, reason = %reason, "health check failing")
                    }
                    _ => {}
                }
                check.failing = failing;
                check.since = now.0;
                check.since_instant = now.1;
            }
            None => {
                if let Some(reason) = failing.as_ref().filter(|_| logged) {
                    tracing::warn!(check = name, reason = %reason, "health check failing");
                }
                checks.insert(
                    name.to_string(),
                    Check {
                        failing,
                        since: now.0,
                        since_instant: now.1,
                    },
                );
            }
        }
    }

    /// Every check, by name; ready when none fails.
    pub fn readiness(&self) -> Readiness {
        let checks: Vec<CheckReport> = self
            .lock()
            .iter()
            .map(|(name, check)| CheckReport {
                name: name.clone(),
                state: if check.failing.is_some() {
                    "failing"
                } else {
                    "ok"
                },
                reason: check.failing.clone(),
                since: chrono::DateTime::<chrono::Utc>::from(check.since)
                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            })
            .collect();
        Readiness {
            ready: checks.iter().all(|check| check.state == "ok"),
            checks,
        }
    }

    /// The runtime loop turned (call it every turn, including idle ones).
    pub fn tick(&self) {
        let elapsed = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_tick.fetch_max(elapsed, Ordering::Relaxed);
    }

    /// How long since the last [`Health::tick`] (or since creation).
    pub fn since_tick(&self) -> Duration {
        let last = Duration::from_millis(self.last_tick.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Check>> {
        // A panic while holding the lock leaves the map whole: keep using it.
        self.checks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Finds a stall: work waits (`backlog > 0`) while the durable position stands
/// still for longer than `threshold`. A position that does not move while
/// there is nothing to do is no stall.
#[derive(Debug)]
pub struct StallWatch<P = u64> {
    threshold: Duration,
    position: Option<P>,
    /// When the position last moved, or the backlog was last empty.
    moving_at: Instant,
}

impl<P: PartialEq> StallWatch<P> {
    pub fn new(threshold: Duration) -> StallWatch<P> {
        StallWatch {
            threshold,
            position: None,
            moving_at: Instant::now(),
        }
    }

    /// Takes one sample; `Some(reason)` while stalled.
    pub fn observe(&mut self, backlog: u64, position: P, now: Instant) -> Option<String> {
        if backlog == 0 || self.position.as_ref() != Some(&position) {
            self.position = Some(position);
            self.moving_at = now;
            return None;
        }
        let still = now.saturating_duration_since(self.moving_at);
        (still > self.threshold)
            .then(|| format!("no progress for {} s while work waits", still.as_secs()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_check_makes_it_unready_and_keeps_its_since() {
        let health = Health::new();
        health.expect("mongodb");
        assert!(!health.readiness().ready);
        assert_eq!(
            health.readiness().checks[0].reason.as_deref(),
            Some("not checked yet")
        );
        health.set_ok("mongodb");
        health.set_ok("postgres");
        assert!(health.readiness().ready);
        health.set_failing("postgres", "connection refused");
        let first = health.readiness();
        assert!(!first.ready);
        let postgres = &first.checks[1];
        assert_eq!(
            (postgres.name.as_str(), postgres.state),
            ("postgres", "failing")
        );
        std::thread::sleep(Duration::from_millis(5));
        health.set_failing("postgres", "timed out");
        let second = health.readiness();
        assert_eq!(second.checks[1].since, postgres.since);
        assert_eq!(second.checks[1].reason.as_deref(), Some("timed out"));
        health.set_ok("postgres");
        assert!(health.readiness().ready);
    }

    #[test]
    fn ticks_are_measured() {
        let health = Health::new();
        std::thread::sleep(Duration::from_millis(30));
        assert!(health.since_tick() >= Duration::from_millis(30));
        health.tick();
        assert!(health.since_tick() < Duration::from_millis(30));
    }

    #[test]
    fn a_stall_is_a_backlog_with_a_still_position() {
        let mut watch = StallWatch::new(Duration::from_secs(30));
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        assert_eq!(watch.observe(10, 100, at(0)), None);
        assert_eq!(watch.observe(10, 100, at(30)), None);
        assert!(watch.observe(10, 100, at(31)).is_some());
        // The position moves: no longer stalled.
        assert_eq!(watch.observe(10, 200, at(32)), None);
        assert_eq!(watch.observe(10, 200, at(50)), None);
        // Nothing waits: standing still is fine, and the clock restarts.
        assert_eq!(watch.observe(0, 200, at(100)), None);
        assert_eq!(watch.observe(5, 200, at(120)), None);
        assert!(watch.observe(5, 200, at(131)).is_some());
    }
}
