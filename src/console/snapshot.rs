//! The body of `GET /api/console`: what the page shows, one JSON object
//! (README, "Console"). Its shape is stable: fields are added, never
//! renamed or removed, without a new [`VERSION`] (tests/console_api.rs
//! pins it).

use super::history::{quantile, History, Rate, Reading, WINDOW};
use crate::dead_letter::records::{rfc3339, Letter};
use crate::observe::health::{CheckReport, Readiness};
use crate::observe::samplers::CHECK_PROGRESS;
use serde::Serialize;
use std::time::SystemTime;

/// The shape's version.
pub const VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub version: u32,
    /// `run` or `relay`.
    pub process: &'static str,
    /// `replication`, `polling` or `kafka`.
    pub source: &'static str,
    /// The processor's version.
    pub build: &'static str,
    pub generated_at: String,
    /// `running`, `degraded` (a readiness check fails), `stalled` (the
    /// `progress` check fails: work waits, nothing moves) or `rebuilding`.
    pub state: &'static str,
    /// The failing readiness checks.
    pub failing: Vec<CheckReport>,
    pub checks: Vec<CheckReport>,
    pub throughput: Throughput,
    pub latency: Latency,
    pub lag: Lag,
    pub counts: Counts,
    pub dead_letters: DeadLetters,
    /// `null` unless a rebuild is under way.
    pub rebuild: Option<Rebuild>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub window_seconds: u64,
    pub interval_seconds: u64,
    /// Averages over the window.
    pub applied_per_second: f64,
    pub dead_lettered_per_second: f64,
    /// One point per interval, oldest first.
    pub samples: Vec<RateSample>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RateSample {
    pub at: String,
    pub applied_per_second: f64,
    pub dead_lettered_per_second: f64,
}

/// Commit to read model (`commit_to_durable_seconds`), over the window.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub events: u64,
    /// `null` when no event was applied in the window; past the
    /// histogram's last bound (60 s), that bound (the value is at least it).
    pub p50_seconds: Option<f64>,
    pub p99_seconds: Option<f64>,
}

/// How far behind the capture is: the field of the source in use is set,
/// the others are `null` (empty for `consumer`).
#[derive(Debug, Clone, Serialize)]
pub struct Lag {
    pub slot_bytes: Option<u64>,
    pub backlog_rows: Option<u64>,
    pub consumer: Vec<PartitionLag>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PartitionLag {
    pub topic: String,
    pub partition: i32,
    pub messages: i64,
}

/// Since the process started.
#[derive(Debug, Clone, Serialize)]
pub struct Counts {
    pub applied: u64,
    pub duplicates: u64,
    pub unknown_types: u64,
    pub dead_lettered: u64,
    /// In the `dead_letters` collection now (`null`: not known, e.g. the relay).
    pub dead_letters: Option<u64>,
    pub oldest_dead_letter_age_seconds: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeadLetters {
    /// Whether this process manages dead letters (`false` for the relay).
    pub available: bool,
    /// Why `latest` may be out of date (MongoDB did not answer); `null` if not.
    pub error: Option<String>,
    /// The most recent, newest first.
    pub latest: Vec<LetterRow>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LetterRow {
    pub id: String,
    pub event_type: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub error: String,
    pub attempts: i64,
    pub first_failed_at: Option<String>,
    pub last_failed_at: Option<String>,
}

impl From<&Letter> for LetterRow {
    fn from(letter: &Letter) -> LetterRow {
        LetterRow {
            id: letter.id.clone(),
            event_type: letter.event_type.clone(),
            aggregate_type: letter.aggregate_type.clone(),
            aggregate_id: letter.aggregate_id.clone(),
            error: letter.error.clone(),
            attempts: letter.attempts,
            first_failed_at: letter.first_failed_at.as_ref().map(rfc3339),
            last_failed_at: letter.last_failed_at.as_ref().map(rfc3339),
        }
    }
}

/// The rebuild's control document (`processor_control`, `_id: "rebuild"`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rebuild {
    pub state: String,
    pub phase: String,
    pub done: u64,
    pub total: u64,
}

/// Which lag figure applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LagKind {
    Slot,
    Backlog,
    Consumer,
}

/// What a snapshot is made of besides the registry.
pub struct Parts<'a> {
    pub process: &'static str,
    pub source: &'static str,
    pub lag: LagKind,
    pub readiness: Readiness,
    pub history: &'a History,
    pub now: Reading,
    pub dead_letters: DeadLetters,
    pub rebuild: Option<Rebuild>,
}

pub fn build(parts: Parts<'_>) -> Snapshot {
    let Parts {
        process,
        source,
        lag,
        readiness,
        history,
        now,
        dead_letters,
        rebuild,
    } = parts;
    let failing: Vec<CheckReport> = readiness
        .checks
        .iter()
        .filter(|check| check.state != "ok")
        .cloned()
        .collect();
    let state = if rebuild.is_some() {
        "rebuilding"
    } else if failing.iter().any(|check| check.name == CHECK_PROGRESS) {
        "stalled"
    } else if !failing.is_empty() {
        "degraded"
    } else {
        "running"
    };
    let first = history.first().unwrap_or(&now);
    let seconds = now
        .at
        .duration_since(first.at)
        .map_or(0.0, |d| d.as_secs_f64());
    let average = |from: u64, to: u64| {
        if seconds > 0.0 {
            to.saturating_sub(from) as f64 / seconds
        } else {
            0.0
        }
    };
    let rates = history.rates(&now);
    let total = |reading: &Reading| reading.latency.last().copied().unwrap_or(0);
    let events = total(&now).saturating_sub(total(first));
    let counts = Counts {
        applied: now.applied,
        duplicates: now.duplicates,
        unknown_types: now.unknown_types,
        dead_lettered: now.dead_lettered,
        dead_letters: now.dead_letters.filter(|_| dead_letters.available),
        oldest_dead_letter_age_seconds: now
            .oldest_dead_letter_seconds
            .filter(|_| dead_letters.available),
    };
    Snapshot {
        version: VERSION,
        process,
        source,
        build: env!("CARGO_PKG_VERSION"),
        generated_at: time(now.at),
        state,
        failing,
        checks: readiness.checks,
        throughput: Throughput {
            window_seconds: WINDOW.as_secs(),
            interval_seconds: super::history::INTERVAL.as_secs(),
            applied_per_second: average(first.applied, now.applied),
            dead_lettered_per_second: average(first.dead_lettered, now.dead_lettered),
            samples: rates.iter().map(sample).collect(),
        },
        latency: Latency {
            events,
            p50_seconds: quantile(&first.latency, &now.latency, 0.5),
            p99_seconds: quantile(&first.latency, &now.latency, 0.99),
        },
        lag: Lag {
            slot_bytes: (lag == LagKind::Slot).then_some(now.slot_lag_bytes),
            backlog_rows: (lag == LagKind::Backlog).then_some(now.backlog_rows),
            consumer: now
                .consumer_lag
                .iter()
                .filter(|_| lag == LagKind::Consumer)
                .map(|(topic, partition, messages)| PartitionLag {
                    topic: topic.clone(),
                    partition: *partition,
                    messages: *messages,
                })
                .collect(),
        },
        counts,
        dead_letters,
        rebuild,
    }
}

fn sample(rate: &Rate) -> RateSample {
    RateSample {
        at: time(rate.at),
        applied_per_second: rate.applied_per_second,
        dead_lettered_per_second: rate.dead_lettered_per_second,
    }
}

fn time(at: SystemTime) -> String {
    rfc3339(&chrono::DateTime::<chrono::Utc>::from(at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::Health;

    fn state(health: &Health, rebuild: Option<Rebuild>) -> (&'static str, Vec<String>) {
        let history = History::default();
        let snapshot = build(Parts {
            process: "run",
            source: "replication",
            lag: LagKind::Slot,
            readiness: health.readiness(),
            history: &history,
            now: Reading::parse("", SystemTime::now()),
            dead_letters: DeadLetters {
                available: true,
                error: None,
                latest: Vec::new(),
            },
            rebuild,
        });
        let failing = snapshot.failing.iter().map(|c| c.name.clone()).collect();
        (snapshot.state, failing)
    }

    #[test]
    fn the_state_follows_the_checks_and_the_rebuild() {
        let health = Health::unlogged();
        health.set_ok("postgres");
        health.set_ok(CHECK_PROGRESS);
        assert_eq!(state(&health, None), ("running", vec![]));
        health.set_failing("mongodb", "ping timed out");
        assert_eq!(state(&health, None), ("degraded", vec!["mongodb".into()]));
        health.set_failing(CHECK_PROGRESS, "no progress for 31 s while work waits");
        assert_eq!(
            state(&health, None).0,
            "stalled",
            "a stall says more than a failing dependency"
        );
        let rebuild = Rebuild {
            state: "building".into(),
            phase: "users".into(),
            done: 1,
            total: 2,
        };
        assert_eq!(state(&health, Some(rebuild)).0, "rebuilding");
    }

    #[test]
    fn only_the_lag_of_the_source_in_use_is_given() {
        let text = "event_processor_replication_slot_lag_bytes 10\n\
                    event_processor_polling_backlog_rows 3\n";
        let history = History::default();
        let lag = |kind| {
            build(Parts {
                process: "relay",
                source: "polling",
                lag: kind,
                readiness: Health::unlogged().readiness(),
                history: &history,
                now: Reading::parse(text, SystemTime::now()),
                dead_letters: DeadLetters {
                    available: false,
                    error: None,
                    latest: Vec::new(),
                },
                rebuild: None,
            })
        };
        let slot = lag(LagKind::Slot);
        assert_eq!(
            (slot.lag.slot_bytes, slot.lag.backlog_rows),
            (Some(10), None)
        );
        let backlog = lag(LagKind::Backlog);
        assert_eq!(
            (backlog.lag.slot_bytes, backlog.lag.backlog_rows),
            (None, Some(3))
        );
        assert_eq!(backlog.counts.dead_letters, None, "the relay keeps none");
    }
}
