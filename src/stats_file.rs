//! The stats file (`run --stats-file PATH`, `relay --stats-file PATH`): a
//! JSON document with the process's counters, a throughput timeline, its CPU
//! time and peak RSS, and the distribution of commit-to-durable latencies,
//! rewritten every 250 ms while the process runs and once more at exit. The
//! README ("Stats file") documents every field.
//!
//! Latency is "now, once the batch's effects are durable (or, for `relay`,
//! published)" minus the event's `created_at`: the time from the event's
//! INSERT to its effects being durable, over-stated by the length of the
//! transaction that wrote it. It is kept as a histogram whose buckets are
//! under 1% wide, so the file stays small however long the process runs.

use crate::counters::Stats;
use crate::stages::{StageReport, StageTimes};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Version of the file's layout (raised when a field changes meaning).
pub const FORMAT: u32 = 1;

/// How often the file is rewritten while the process runs.
const EVERY: Duration = Duration::from_millis(250);

/// The timeline holds at most this many points: when it is full, every
/// other point is dropped and the spacing doubles.
const TIMELINE_POINTS: usize = 2048;

/// What the file holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StatsReport {
    pub format: u32,
    pub pid: u32,
    /// Events handled: applied + duplicates + unmatched + dead_lettered.
    pub done: u64,
    pub applied: u64,
    /// Events delivered again (after a reconnect) that had already taken effect.
    pub duplicates: u64,
    /// Events of a type no handler knows.
    pub unmatched: u64,
    pub dead_lettered: u64,
    /// Dead letters written again for a re-delivered event (not in `done`).
    pub dead_letters_again: u64,
    pub batches: u64,
    /// MongoDB round trips and documents written by the projections.
    pub round_trips: u64,
    pub documents_written: u64,
    /// Wall clock (Unix ms) when the process started, when its first and
    /// its last batch were finished, and when the file was written.
    pub started_unix_ms: i64,
    pub first_done_unix_ms: Option<i64>,
    pub last_done_unix_ms: Option<i64>,
    pub written_unix_ms: i64,
    /// The process's CPU time so far, seconds.
    pub cpu_user_s: f64,
    pub cpu_system_s: f64,
    /// Peak resident set size (VmHWM), bytes.
    pub peak_rss_bytes: u64,
    /// (seconds since start, `done`) pairs over the whole run: one every
    /// 250 ms at first, the spacing doubling whenever 2048 points are reached.
    pub timeline: Vec<(f64, u64)>,
    /// Commit-to-durable latency of every applied event of every finished
    /// batch (the events whose effect the batch made durable).
    pub latency: LatencyReport,
    /// Time spent in each stage of the finished batches, microseconds by
    /// stage (`source`, `load`, `fold`, `dead_letters`, `write`, `refresh`,
    /// `checkpoint`, `mark`, `acknowledge`).
    #[serde(default)]
    pub stages: StageReport,
    /// True in the final write, at exit.
    pub finished: bool,
}

/// A latency distribution, microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LatencyReport {
    /// Events measured (those with a `created_at`).
    pub count: u64,
    pub min_us: u64,
    pub max_us: u64,
    pub sum_us: u64,
    /// `(low_us, high_us, count)`: `count` events took from `low_us` to
    /// `high_us` inclusive; only buckets with events, lowest first. A bucket
    /// is at most 1/128 of its `low_us` wide (exact below 128 µs).
    pub buckets: Vec<(u64, u64, u64)>,
}

/// Bits of sub-bucket per power of two: 2^7 = 128 buckets per doubling.
const SUB_BITS: u32 = 7;
const SUB: u64 = 1 << SUB_BITS;
/// Enough buckets for every u64.
const BUCKETS: usize = ((64 - SUB_BITS as usize) + 1) * SUB as usize;

/// The bucket of a value: exact below 128, then 128 buckets per power of two.
fn bucket_of(value: u64) -> usize {
    if value < SUB {
        return value as usize;
    }
    let exponent = 63 - value.leading_zeros();
    let shift = exponent - SUB_BITS;
    let sub = (value >> shift) - SUB;
    ((u64::from(shift) + 1) * SUB + sub) as usize
}

/// The values a bucket holds, inclusive.
fn bucket_bounds(index: usize) -> (u64, u64) {
    let index = index as u64;
    if index < SUB {
        return (index, index);
    }
    let shift = index / SUB - 1;
    let low = (SUB + index % SUB) << shift;
    (low, low + ((1u64 << shift) - 1))
}

struct Histogram {
    counts: Vec<u64>,
    count: u64,
    min: u64,
    max: u64,
    sum: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            count: 0,
            min: u64::MAX,
            max: 0,
            sum: 0,
        }
    }
}

impl Histogram {
    fn record(&mut self, value: u64) {
        if let Some(count) = self.counts.get_mut(bucket_of(value)) {
            *count += 1;
        }
        self.count += 1;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        self.sum = self.sum.saturating_add(value);
    }

    fn report(&self) -> LatencyReport {
        let buckets = self
            .counts
            .iter()
            .enumerate()
            .filter(|(_, &count)| count > 0)
            .map(|(index, &count)| {
                let (low, high) = bucket_bounds(index);
                (low, high, count)
            })
            .collect();
        LatencyReport {
            count: self.count,
            min_us: if self.count == 0 { 0 } else { self.min },
            max_us: self.max,
            sum_us: self.sum,
            buckets,
        }
    }
}

/// The throughput timeline, bounded.
struct Timeline {
    points: Vec<(f64, u64)>,
    spacing: f64,
}

impl Default for Timeline {
    fn default() -> Self {
        Timeline {
            points: Vec::new(),
            spacing: EVERY.as_secs_f64(),
        }
    }
}

impl Timeline {
    fn push(&mut self, seconds: f64, done: u64) {
        // A little slack: the writer's ticks are not exactly `spacing` apart.
        let due = self
            .points
            .last()
            .is_none_or(|&(last, _)| seconds - last >= self.spacing * 0.9);
        if !due {
            return;
        }
        if self.points.len() >= TIMELINE_POINTS {
            let mut index = 0;
            self.points.retain(|_| {
                index += 1;
                index % 2 == 1
            });
            self.spacing *= 2.0;
        }
        self.points.push((seconds, done));
    }
}

/// Shared between the pipeline workers and the writer task.
pub struct StatsFile {
    path: PathBuf,
    stats: Arc<Stats>,
    started_unix_ms: i64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    first_done_unix_ms: Option<i64>,
    last_done_unix_ms: Option<i64>,
    timeline: Timeline,
    latency: Histogram,
    stages: StageTimes,
}

fn now_unix_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl StatsFile {
    /// A stats file at `path` reporting `stats` (written by [`StatsFile::write`]).
    pub fn new(path: PathBuf, stats: Arc<Stats>) -> Arc<StatsFile> {
        Arc::new(StatsFile {
            path,
            stats,
            started_unix_ms: now_unix_ms(),
            state: Mutex::new(State::default()),
        })
    }

    /// The effects of events committed at these times are durable: their
    /// latency (an event whose commit time is unknown is left out).
    pub fn durable(&self, committed: &[Option<DateTime<Utc>>]) {
        let now = Utc::now();
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        for committed in committed.iter().flatten() {
            let micros = (now - *committed).num_microseconds().unwrap_or(i64::MAX);
            state.latency.record(micros.max(0) as u64);
        }
    }

    /// A finished batch spent these times in its stages.
    pub fn stages(&self, times: &StageTimes) {
        if let Ok(mut state) = self.state.lock() {
            state.stages.absorb(times);
        }
    }

    /// A batch is finished (effects, checkpoint, acknowledgement) and counted.
    pub fn batch_done(&self) {
        let now_ms = now_unix_ms();
        if let Ok(mut state) = self.state.lock() {
            state.first_done_unix_ms.get_or_insert(now_ms);
            state.last_done_unix_ms = Some(now_ms);
        }
    }

    fn report(&self, finished: bool) -> StatsReport {
        let stats = &self.stats;
        let load = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
        let (user, system) = cpu_seconds().unwrap_or_default();
        let now_ms = now_unix_ms();
        let mut report = StatsReport {
            format: FORMAT,
            pid: std::process::id(),
            done: stats.done(),
            applied: load(&stats.applied),
            duplicates: load(&stats.duplicates),
            unmatched: load(&stats.unmatched),
            dead_lettered: load(&stats.dead_lettered),
            dead_letters_again: load(&stats.dead_letters_again),
            batches: load(&stats.batches),
            round_trips: load(&stats.round_trips),
            documents_written: load(&stats.documents_written),
            started_unix_ms: self.started_unix_ms,
            written_unix_ms: now_ms,
            cpu_user_s: user,
            cpu_system_s: system,
            peak_rss_bytes: peak_rss_bytes().unwrap_or(0),
            finished,
            ..StatsReport::default()
        };
        if let Ok(mut state) = self.state.lock() {
            let seconds = (now_ms - self.started_unix_ms) as f64 / 1000.0;
            state.timeline.push(seconds, report.done);
            report.first_done_unix_ms = state.first_done_unix_ms;
            report.last_done_unix_ms = state.last_done_unix_ms;
            report.timeline = state.timeline.points.clone();
            report.latency = state.latency.report();
            report.stages = state.stages.by_name();
        }
        report
    }

    /// Writes the file (atomically: a reader never sees half of it).
    pub fn write(&self, finished: bool) -> std::io::Result<()> {
        let report = self.report(finished);
        let text = serde_json::to_vec(&report).map_err(std::io::Error::other)?;
        let partial = self.path.with_extension("partial");
        std::fs::write(&partial, text)?;
        std::fs::rename(&partial, &self.path)
    }

    /// Runs `job` while the file is rewritten every 250 ms, then writes it a
    /// last time (`finished`); an error writing that last one is returned.
    pub async fn around<T>(
        self: &Arc<Self>,
        job: impl Future<Output = T>,
    ) -> (T, std::io::Result<()>) {
        let stop = CancellationToken::new();
        let writer = self.spawn_writer(stop.clone());
        let output = job.await;
        stop.cancel();
        let _ = writer.await;
        (output, self.write(true))
    }

    fn spawn_writer(self: &Arc<Self>, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let file = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(EVERY);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {
                        if let Err(err) = file.write(false) {
                            tracing::warn!(path = %file.path.display(), error = %err, "cannot write the stats file");
                        }
                    }
                }
            }
        })
    }
}

/// This process's (user, system) CPU seconds, from `/proc/self/stat`.
fn cpu_seconds() -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime is field 14 of the whole line, i.e. index 11 after "state".
    let tick = |i: usize| -> Option<f64> { fields.get(i)?.parse::<f64>().ok() };
    let hz = 100.0; // USER_HZ is 100 on every Linux ABI.
    Some((tick(11)? / hz, tick(12)? / hz))
}

/// Peak resident set size of this process, bytes (`VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn committed(age: chrono::Duration) -> Option<DateTime<Utc>> {
        Some(Utc::now() - age)
    }

    #[test]
    fn reads_its_own_cpu_and_memory() {
        // Burn a little CPU so the figure cannot be zero by accident.
        let mut x = 0u64;
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_millis(50) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        let (user, system) = cpu_seconds().expect("cpu");
        assert!(user + system > 0.0, "cpu {user} {system}");
        let rss = peak_rss_bytes().expect("rss");
        assert!(rss > 1024 * 1024, "rss {rss}");
    }

    #[test]
    fn every_value_falls_in_a_narrow_bucket_of_its_own() {
        let mut previous_high = None;
        for index in 0..BUCKETS {
            let (low, high) = bucket_bounds(index);
            assert!(low <= high);
            assert_eq!(bucket_of(low), index, "low of {index}");
            assert_eq!(bucket_of(high), index, "high of {index}");
            if let Some(previous) = previous_high {
                assert_eq!(low, previous + 1, "buckets are contiguous at {index}");
            }
            assert!((high - low) as f64 <= low as f64 / 128.0, "bucket {index}");
            previous_high = Some(high);
        }
        assert_eq!(previous_high, Some(u64::MAX));
    }

    #[test]
    fn the_timeline_stays_bounded_and_spans_the_run() {
        let mut timeline = Timeline::default();
        for i in 0..10_000u64 {
            timeline.push(i as f64 * 0.25, i);
        }
        assert!(timeline.points.len() <= TIMELINE_POINTS);
        assert_eq!(timeline.points.first(), Some(&(0.0, 0)));
        let last = timeline.points.last().expect("points").0;
        assert!(last > 2490.0, "last point at {last}");
        assert!(timeline.points.windows(2).all(|w| w[0].0 < w[1].0));
    }

    #[test]
    fn records_latency_and_progress() {
        let dir = tempfile::tempdir().expect("temp folder");
        let path = dir.path().join("stats.json");
        let stats = Arc::new(Stats::default());
        let file = StatsFile::new(path.clone(), stats.clone());
        stats.applied.fetch_add(2, Ordering::Relaxed);
        stats.batches.fetch_add(1, Ordering::Relaxed);
        file.durable(&[
            committed(chrono::Duration::milliseconds(20)),
            None,
            committed(chrono::Duration::milliseconds(300)),
        ]);
        let mut times = StageTimes::default();
        times.add(crate::stages::Stage::Write, Duration::from_millis(7));
        file.stages(&times);
        file.stages(&times);
        file.batch_done();
        file.write(true).expect("write");
        let report: StatsReport =
            serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("parse");
        assert_eq!(report.format, FORMAT);
        assert_eq!(report.stages["write"], 14_000);
        assert_eq!(report.stages["load"], 0);
        assert_eq!(report.done, 2);
        assert_eq!(report.batches, 1);
        assert!(report.finished);
        let latency = &report.latency;
        assert_eq!(latency.count, 2);
        assert!(
            latency.min_us >= 20_000 && latency.min_us < 300_000,
            "{latency:?}"
        );
        assert!(latency.max_us >= 300_000, "{latency:?}");
        assert_eq!(latency.buckets.len(), 2, "{latency:?}");
        assert_eq!(latency.buckets.iter().map(|b| b.2).sum::<u64>(), 2);
        for (value, bucket) in [latency.min_us, latency.max_us]
            .iter()
            .zip(&latency.buckets)
        {
            assert!(
                bucket.0 <= *value && *value <= bucket.1,
                "{value} in {bucket:?}"
            );
        }
        assert!(report.last_done_unix_ms.is_some());
        assert_eq!(report.timeline.last().map(|p| p.1), Some(2));
    }
}
