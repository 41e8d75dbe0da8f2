//! The measurement hook `bench` reads from a `run` it starts: a JSON file,
//! rewritten every 100 ms while the process runs and once more at exit, with
//! the counters, a throughput timeline, the process's own CPU time and peak
//! RSS, and (at exit) the commit-to-durable latency of every event applied.
//!
//! Latency is "now, once the batch's effects are durable" minus the event's
//! `created_at`; the benchmark inserts its events with `created_at` set to
//! `clock_timestamp()` in single-statement transactions, so that is the
//! commit-to-read-model latency, over-stated by the commit's own duration.

use crate::counters::Stats;
use crate::decode::OutboxEvent;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What the file holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ProbeReport {
    /// Events handled (applied, duplicate, unmatched or dead-lettered).
    pub done: u64,
    pub applied: u64,
    /// Events delivered again (after a reconnect) that had already taken effect.
    pub duplicates: u64,
    pub dead_lettered: u64,
    pub batches: u64,
    pub round_trips: u64,
    pub documents_written: u64,
    /// Wall clock (Unix ms) when the process started and when the last batch
    /// became durable.
    pub started_unix_ms: i64,
    pub last_done_unix_ms: Option<i64>,
    pub first_done_unix_ms: Option<i64>,
    /// The process's CPU time so far, seconds.
    pub cpu_user_s: f64,
    pub cpu_system_s: f64,
    /// Peak resident set size (VmHWM), bytes.
    pub peak_rss_bytes: u64,
    /// (seconds since start, events done), every 250 ms.
    pub timeline: Vec<(f64, u64)>,
    /// Commit-to-durable latency of every applied event, microseconds
    /// (written at exit only).
    pub latencies_us: Vec<u64>,
    /// True in the final write.
    pub finished: bool,
}

/// Shared between the pipeline workers and the writer task.
pub struct Probe {
    path: PathBuf,
    stats: Arc<Stats>,
    started_unix_ms: i64,
    /// Record every event's latency (off for the memory measurement).
    latency: bool,
    state: Mutex<ProbeState>,
}

#[derive(Default)]
struct ProbeState {
    first_done_unix_ms: Option<i64>,
    last_done_unix_ms: Option<i64>,
    timeline: Vec<(f64, u64)>,
    latencies_us: Vec<u64>,
}

fn now_unix_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Probe {
    pub fn new(path: PathBuf, stats: Arc<Stats>, latency: bool) -> Arc<Probe> {
        Arc::new(Probe {
            path,
            stats,
            started_unix_ms: now_unix_ms(),
            latency,
            state: Mutex::new(ProbeState::default()),
        })
    }

    /// The effects of these events are durable in MongoDB: their latency.
    pub fn durable(&self, events: &[OutboxEvent]) {
        if !self.latency {
            return;
        }
        let now = chrono::Utc::now();
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        for event in events {
            if let Some(created) = event.created_at {
                let micros = (now - created).num_microseconds().unwrap_or(i64::MAX);
                state.latencies_us.push(micros.max(0) as u64);
            }
        }
    }

    /// A batch is finished (effects, checkpoint, acknowledgement).
    pub fn batch_done(&self) {
        let now_ms = now_unix_ms();
        if let Ok(mut state) = self.state.lock() {
            state.first_done_unix_ms.get_or_insert(now_ms);
            state.last_done_unix_ms = Some(now_ms);
        }
    }

    fn report(&self, finished: bool) -> ProbeReport {
        let stats = &self.stats;
        let (user, system) = cpu_seconds().unwrap_or_default();
        let mut report = ProbeReport {
            done: stats.done(),
            applied: stats.applied.load(Ordering::Relaxed),
            duplicates: stats.duplicates.load(Ordering::Relaxed),
            dead_lettered: stats.dead_lettered.load(Ordering::Relaxed),
            batches: stats.batches.load(Ordering::Relaxed),
            round_trips: stats.round_trips.load(Ordering::Relaxed),
            documents_written: stats.documents_written.load(Ordering::Relaxed),
            started_unix_ms: self.started_unix_ms,
            cpu_user_s: user,
            cpu_system_s: system,
            peak_rss_bytes: peak_rss_bytes().unwrap_or(0),
            finished,
            ..ProbeReport::default()
        };
        if let Ok(mut state) = self.state.lock() {
            let t = (now_unix_ms() - self.started_unix_ms) as f64 / 1000.0;
            state.timeline.push((t, report.done));
            report.first_done_unix_ms = state.first_done_unix_ms;
            report.last_done_unix_ms = state.last_done_unix_ms;
            report.timeline = state.timeline.clone();
            if finished {
                report.latencies_us = std::mem::take(&mut state.latencies_us);
            }
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

    /// Rewrites the file every 250 ms until `stop`.
    pub fn spawn_writer(self: &Arc<Self>, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let probe = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {
                        if let Err(err) = probe.write(false) {
                            tracing::warn!(path = %probe.path.display(), error = %err, "cannot write the bench report");
                        }
                    }
                }
            }
        })
    }
}

/// This process's (user, system) CPU seconds, from `/proc/self/stat`.
pub fn cpu_seconds() -> Option<(f64, f64)> {
    let (user, system, _, _) = stat_ticks()?;
    Some((user, system))
}

/// CPU seconds of the children this process has waited for (user + system).
pub fn children_cpu_seconds() -> Option<f64> {
    let (_, _, user, system) = stat_ticks()?;
    Some(user + system)
}

/// (utime, stime, cutime, cstime) of this process, in seconds.
fn stat_ticks() -> Option<(f64, f64, f64, f64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime is field 14 of the whole line, i.e. index 11 after "state".
    let tick = |i: usize| -> Option<f64> { fields.get(i)?.parse::<f64>().ok() };
    let hz = 100.0; // USER_HZ is 100 on every Linux ABI.
    Some((
        tick(11)? / hz,
        tick(12)? / hz,
        tick(13)? / hz,
        tick(14)? / hz,
    ))
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
        assert!(children_cpu_seconds().is_some());
    }

    #[test]
    fn records_latency_and_progress() {
        let dir = std::env::temp_dir().join(format!("probe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("report.json");
        let stats = Arc::new(Stats::default());
        let probe = Probe::new(path.clone(), stats.clone(), true);
        let mut event =
            crate::history::generate(1, &crate::history::HistoryOptions::realistic(1)).remove(0);
        event.created_at = Some(chrono::Utc::now() - chrono::Duration::milliseconds(20));
        stats.applied.fetch_add(1, Ordering::Relaxed);
        probe.durable(&[event]);
        probe.batch_done();
        probe.write(true).expect("write");
        let report: ProbeReport =
            serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("parse");
        assert_eq!(report.done, 1);
        assert!(report.finished);
        assert_eq!(report.latencies_us.len(), 1);
        assert!(
            report.latencies_us[0] >= 20_000,
            "{:?}",
            report.latencies_us
        );
        assert!(report.last_done_unix_ms.is_some());
        assert_eq!(report.timeline.last().map(|p| p.1), Some(1));
        let _ = std::fs::remove_dir_all(dir);
    }
}
