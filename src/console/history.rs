//! The last 15 minutes of the processor's own metrics: one [`Reading`] of
//! the registry every [`INTERVAL`], kept in a ring, from which the console
//! computes rates and the commit-to-read-model latency percentiles (from
//! the histogram's bucket deltas, as Prometheus' `histogram_quantile` does).

use crate::observe::metrics::LATENCY_BUCKETS;
use crate::observe::Metrics;
use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

/// How often a reading is kept.
pub const INTERVAL: Duration = Duration::from_secs(5);

/// How far back the console looks.
pub const WINDOW: Duration = Duration::from_secs(15 * 60);

/// What the console needs of one look at the registry.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub at: SystemTime,
    /// `events_total` by outcome (every source and type summed).
    pub applied: u64,
    pub dead_lettered: u64,
    pub duplicates: u64,
    pub unknown_types: u64,
    /// Cumulative counts of `commit_to_durable_seconds`, one per bucket of
    /// [`LATENCY_BUCKETS`], then `+Inf`.
    pub latency: Vec<u64>,
    pub dead_letters: Option<u64>,
    pub oldest_dead_letter_seconds: Option<f64>,
    pub slot_lag_bytes: u64,
    pub backlog_rows: u64,
    /// `(topic, partition, messages)`.
    pub consumer_lag: Vec<(String, i32, i64)>,
}

impl Reading {
    /// Reads the registry now (from its text form: the one view of every
    /// series the registry gives).
    pub fn take(metrics: &Metrics) -> Reading {
        Reading::parse(&metrics.render(), SystemTime::now())
    }

    /// Reads the Prometheus text `text`, taken at `at`.
    pub fn parse(text: &str, at: SystemTime) -> Reading {
        let mut reading = Reading {
            at,
            applied: 0,
            dead_lettered: 0,
            duplicates: 0,
            unknown_types: 0,
            latency: vec![0; LATENCY_BUCKETS.len() + 1],
            dead_letters: None,
            oldest_dead_letter_seconds: None,
            slot_lag_bytes: 0,
            backlog_rows: 0,
            consumer_lag: Vec::new(),
        };
        for line in text.lines().filter(|line| !line.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.trim_end_matches('}')),
                None => (series, ""),
            };
            let count = value.max(0.0) as u64;
            match name {
                "event_processor_events_total" => match label(labels, "outcome") {
                    Some("applied") => reading.applied += count,
                    Some("dead_lettered") => reading.dead_lettered += count,
                    Some("duplicate") => reading.duplicates += count,
                    Some("unknown_type") => reading.unknown_types += count,
                    _ => {}
                },
                "event_processor_commit_to_durable_seconds_bucket" => {
                    let index = match label(labels, "le") {
                        Some("+Inf") => Some(LATENCY_BUCKETS.len()),
                        Some(le) => le.parse::<f64>().ok().and_then(|le| {
                            LATENCY_BUCKETS
                                .iter()
                                .position(|bound| (bound - le).abs() < 1e-9)
                        }),
                        None => None,
                    };
                    if let Some(slot) = index.and_then(|i| reading.latency.get_mut(i)) {
                        *slot = count;
                    }
                }
                "event_processor_dead_letters" => reading.dead_letters = Some(count),
                "event_processor_dead_letters_oldest_age_seconds" => {
                    reading.oldest_dead_letter_seconds = Some(value)
                }
                "event_processor_replication_slot_lag_bytes" => reading.slot_lag_bytes = count,
                "event_processor_polling_backlog_rows" => reading.backlog_rows = count,
                "event_processor_kafka_consumer_lag_messages" => {
                    let topic = label(labels, "topic").unwrap_or_default().to_string();
                    let partition = label(labels, "partition")
                        .and_then(|p| p.parse().ok())
                        .unwrap_or(-1);
                    reading.consumer_lag.push((topic, partition, value as i64));
                }
                _ => {}
            }
        }
        reading
    }
}

/// The value of `key` in a label list such as `a="x",b="y"` (label values
/// here are bounded names: no escaped quotes or commas).
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    labels.split(',').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == key).then(|| v.trim_matches('"'))
    })
}

/// The readings of the last [`WINDOW`], oldest first.
#[derive(Debug, Default)]
pub struct History {
    readings: VecDeque<Reading>,
}

/// One interval of the throughput chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Rate {
    pub at: SystemTime,
    pub applied_per_second: f64,
    pub dead_lettered_per_second: f64,
}

impl History {
    /// Keeps `reading`, forgetting what is older than the window.
    pub fn push(&mut self, reading: Reading) {
        let cutoff = reading.at.checked_sub(WINDOW);
        self.readings.push_back(reading);
        while let (Some(first), Some(cutoff)) = (self.readings.front(), cutoff) {
            if first.at >= cutoff {
                break;
            }
            self.readings.pop_front();
        }
    }

    /// The oldest reading kept.
    pub fn first(&self) -> Option<&Reading> {
        self.readings.front()
    }

    /// The rate of each interval, up to `now` (the reading just taken).
    pub fn rates(&self, now: &Reading) -> Vec<Rate> {
        self.readings
            .iter()
            .chain(std::iter::once(now))
            .collect::<Vec<_>>()
            .windows(2)
            .filter_map(|pair| {
                let seconds = pair[1].at.duration_since(pair[0].at).ok()?.as_secs_f64();
                (seconds > 0.0).then(|| Rate {
                    at: pair[1].at,
                    applied_per_second: pair[1].applied.saturating_sub(pair[0].applied) as f64
                        / seconds,
                    dead_lettered_per_second: pair[1]
                        .dead_lettered
                        .saturating_sub(pair[0].dead_lettered)
                        as f64
                        / seconds,
                })
            })
            .collect()
    }
}

/// The `q` quantile (0..1) of the latencies observed between `from` and
/// `to` (cumulative bucket counts), by linear interpolation inside the
/// bucket it falls in; `None` when nothing was observed. A quantile in
/// the `+Inf` bucket is the highest finite bound (the true value is higher).
pub fn quantile(from: &[u64], to: &[u64], q: f64) -> Option<f64> {
    let counts: Vec<u64> = to
        .iter()
        .zip(from.iter().chain(std::iter::repeat(&0)))
        .map(|(to, from)| to.saturating_sub(*from))
        .collect();
    let total = *counts.last()?;
    if total == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let mut lower_bound = 0.0;
    let mut below = 0;
    for (index, cumulative) in counts.iter().enumerate() {
        let Some(&upper) = LATENCY_BUCKETS.get(index) else {
            return LATENCY_BUCKETS.last().copied();
        };
        if *cumulative as f64 >= rank {
            let inside = cumulative.saturating_sub(below);
            if inside == 0 {
                return Some(upper);
            }
            let fraction = (rank - below as f64) / inside as f64;
            return Some(lower_bound + (upper - lower_bound) * fraction);
        }
        lower_bound = upper;
        below = *cumulative;
    }
    LATENCY_BUCKETS.last().copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SourceKind;
    use crate::observe::Outcome;

    #[test]
    fn a_reading_sums_the_registry() {
        let metrics = Metrics::new();
        metrics.events(SourceKind::Polling, "UserCreated", Outcome::Applied, 3);
        metrics.events(SourceKind::Polling, "ActivityLogged", Outcome::Applied, 2);
        metrics.events(SourceKind::Polling, "Nope", Outcome::UnknownType, 1);
        metrics.events(SourceKind::Polling, "UserCreated", Outcome::DeadLettered, 4);
        metrics.events(SourceKind::Polling, "UserCreated", Outcome::Duplicate, 6);
        metrics.commit_to_durable(Duration::from_millis(30));
        metrics.dead_letters(4, Some(Duration::from_secs(90)));
        metrics.kafka_consumer_lag("outbox", 2, 17);
        metrics.polling_backlog(8, None);
        let reading = Reading::take(&metrics);
        assert_eq!(
            (
                reading.applied,
                reading.unknown_types,
                reading.dead_lettered,
                reading.duplicates
            ),
            (5, 1, 4, 6)
        );
        assert_eq!(reading.latency.len(), LATENCY_BUCKETS.len() + 1);
        assert_eq!(reading.latency[4], 0, "0.025");
        assert_eq!(reading.latency[5], 1, "0.05");
        assert_eq!(reading.latency[LATENCY_BUCKETS.len()], 1, "+Inf");
        assert_eq!(reading.dead_letters, Some(4));
        assert_eq!(reading.oldest_dead_letter_seconds, Some(90.0));
        assert_eq!(reading.consumer_lag, vec![("outbox".to_string(), 2, 17)]);
        assert_eq!(reading.backlog_rows, 8);
    }

    #[test]
    fn quantiles_come_from_the_bucket_deltas() {
        let zero = vec![0; LATENCY_BUCKETS.len() + 1];
        assert_eq!(quantile(&zero, &zero, 0.5), None);
        // 100 observations, all in (0.01, 0.025]; earlier ones do not count.
        let mut before = zero.clone();
        before.iter_mut().skip(9).for_each(|c| *c = 50);
        let mut after = before.clone();
        after.iter_mut().skip(4).for_each(|c| *c += 100);
        let p50 = quantile(&before, &after, 0.5).unwrap_or_default();
        assert!((p50 - 0.0175).abs() < 1e-9, "{p50}");
        let p99 = quantile(&before, &after, 0.99).unwrap_or_default();
        assert!(p99 > 0.024 && p99 <= 0.025, "{p99}");
        // Past the last bound: the last bound.
        let mut slow = zero.clone();
        slow[LATENCY_BUCKETS.len()] = 3;
        assert_eq!(quantile(&zero, &slow, 0.5), Some(60.0));
    }

    #[test]
    fn the_ring_keeps_fifteen_minutes_and_rates_use_the_intervals() {
        let mut history = History::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let reading = |s: u64, applied: u64| Reading {
            at: t0 + Duration::from_secs(s),
            applied,
            ..Reading::parse("", t0)
        };
        for step in 0..=200 {
            history.push(reading(step * 5, step * 10));
        }
        let first = history.first().map(|r| r.at);
        assert_eq!(first, Some(t0 + Duration::from_secs(1000 - 900)));
        let rates = history.rates(&reading(1005, 2010));
        assert_eq!(rates.len(), 181);
        assert!(rates
            .iter()
            .all(|r| (r.applied_per_second - 2.0).abs() < 1e-9));
    }
}
