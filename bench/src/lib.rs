//! The benchmark (`event-processor-bench`, run by `scripts/bench.sh`): every
//! stage of the pipeline measured beside its physical limit, in one run, on
//! fresh databases, so that ratios stay meaningful on a noisy machine. The
//! numbered stages follow the README's "Performance" section:
//!
//! 1. load: a generated history inserted with `COPY`;
//! 2. capture limits: PostgreSQL's own decoding with no client
//!    (`pg_logical_slot_peek_binary_changes`) and `pg_recvlogical` to /dev/null;
//! 3. our capture: `run` with the no-op sink over the same WAL range;
//! 4. polling: `run --source polling` (1 and 4 workers) beside the bare claim query;
//! 5. sink limit: raw batched upserts into the MongoDB-wire server;
//! 6. end to end: outbox to read models with the real projections;
//! 7. latency: commit to read model at half the end-to-end rate;
//! 8. memory: peak RSS draining a large backlog with the no-op sink;
//! 9. Kafka: the relay beside raw produce, the kafka source beside raw consume.
//!
//! Every `run` is a child process (its CPU time and RSS are its own), watched
//! through its stats file (`--stats-file`).

mod callgrind;
mod capture;
pub mod chart;
mod child;
mod fold_writes;
mod judge;
mod kafka;
mod pg;
pub mod report;
pub mod scrape;
mod sink;

use activity_event_history::{generate, HistoryOptions};
use activity_event_processor::config::Config;
use activity_event_processor::decode::OutboxEvent;
use activity_event_processor::stats_file::{LatencyReport, StatsReport};
use activity_event_processor::store::mongo::MongoStore;
use anyhow::{Context, Result};
use child::Child;
use clap::Args;
use mongodb::bson::doc;
use report::{Better, Results};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio_postgres::Client;

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Events in the generated history (stages 1-7 and 9).
    #[arg(long, default_value_t = 200_000, value_name = "N")]
    pub events: usize,
    /// Events written through the MongoDB-wire server (stages 5 and 6): kept
    /// apart because the test server is slow (a few hundred events/s).
    #[arg(long, default_value_t = 50_000, value_name = "N")]
    pub sink_events: usize,
    /// Events in the backlog of the memory stage (no-op sink).
    #[arg(long, default_value_t = 1_000_000, value_name = "N")]
    pub backlog: usize,
    /// Length of the latency stage's steady load, seconds.
    #[arg(long, default_value_t = 60, value_name = "S")]
    pub latency_seconds: u64,
    /// Folder for the JSON result, the charts and the children's logs.
    #[arg(long, default_value = "bench/results", value_name = "DIR")]
    pub out: PathBuf,
    /// An earlier result file: show the change against it.
    #[arg(long, value_name = "FILE")]
    pub compare: Option<PathBuf>,
    /// Stages to leave out, comma-separated: capture, polling, sink,
    /// end-to-end, latency, memory, kafka.
    #[arg(long, value_delimiter = ',', value_name = "STAGES")]
    pub skip: Vec<String>,
    /// Seed of the generated history.
    #[arg(long, default_value_t = 7, value_name = "N")]
    pub seed: u64,
}

const STAGES: [&str; 7] = [
    "capture",
    "polling",
    "sink",
    "end-to-end",
    "latency",
    "memory",
    "kafka",
];

/// The state of one run.
pub struct Bench {
    config: Config,
    args: BenchArgs,
    results: Results,
    /// Logs and reports of the children.
    dir: PathBuf,
    admin: Client,
    history: Vec<OutboxEvent>,
    terminal: bool,
    /// (series name, (seconds, events/s)) for the throughput chart.
    series: Vec<(String, Vec<(f64, f64)>)>,
    latencies_ms: Vec<f64>,
}

/// Runs the benchmark and writes its results; returns the JSON file's path.
pub async fn run(config: Config, args: BenchArgs) -> Result<PathBuf> {
    for stage in &args.skip {
        if !STAGES.contains(&stage.as_str()) {
            anyhow::bail!(
                "--skip `{stage}` is not a stage; stages: {}",
                STAGES.join(", ")
            );
        }
    }
    let earlier = match &args.compare {
        Some(path) => Some(read_results(path)?),
        None => None,
    };
    let started_at = chrono::Utc::now();
    let stamp = started_at.format("%Y%m%dT%H%M%SZ").to_string();
    let dir = args.out.join(format!("{stamp}-logs"));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let admin = activity_event_processor::outbox::connect(&config.postgres).await?;
    let mut bench = Bench {
        results: Results {
            format: report::FORMAT_VERSION,
            started_at: started_at.to_rfc3339(),
            options: serde_json::json!({
                "events": args.events,
                "sink_events": args.sink_events,
                "backlog": args.backlog,
                "latency_seconds": args.latency_seconds,
                "seed": args.seed,
                "batch_size": config.pipeline.batch_size,
                "skip": args.skip,
            }),
            ..Results::default()
        },
        config,
        args,
        dir,
        admin,
        history: Vec::new(),
        terminal: std::io::stderr().is_terminal(),
        series: Vec::new(),
        latencies_ms: Vec::new(),
    };
    let clock = Instant::now();
    bench.results.machine = bench.machine().await;
    bench.say(&format!(
        "bench: {} events, backlog {}, latency {} s; logs in {}",
        bench.args.events,
        bench.args.backlog,
        bench.args.latency_seconds,
        bench.dir.display()
    ));
    let outcome = bench.stages().await;
    bench.results.duration_s = clock.elapsed().as_secs_f64();
    bench.judge();
    let path = bench.args.out.join(format!("{stamp}.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(&bench.results)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    bench.charts(&stamp)?;
    println!("{}", report::table(&bench.results, earlier.as_ref()));
    println!("results: {}", path.display());
    outcome?;
    Ok(path)
}

pub fn read_results(path: &Path) -> Result<Results> {
    let text = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a bench result file", path.display()))
}

impl Bench {
    fn wants(&self, stage: &str) -> bool {
        !self.args.skip.iter().any(|s| s == stage)
    }

    fn say(&self, line: &str) {
        if self.terminal {
            eprint!("\r\x1b[2K");
        }
        eprintln!("{line}");
    }

    /// A progress line: rewritten in place on a terminal, every 10 s otherwise.
    fn progress_fn(&self, what: &str, total: u64) -> impl FnMut(u64) {
        let terminal = self.terminal;
        let what = what.to_string();
        let started = Instant::now();
        let mut last = Instant::now();
        move |done: u64| {
            let every = if terminal {
                Duration::from_millis(250)
            } else {
                Duration::from_secs(10)
            };
            if last.elapsed() < every {
                return;
            }
            last = Instant::now();
            let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-3);
            let line = format!(
                "  {what}: {done}/{total} ({:.0}%), {rate:.0}/s",
                done as f64 * 100.0 / total.max(1) as f64
            );
            if terminal {
                eprint!("\r\x1b[2K{line}");
            } else {
                eprintln!("{line}");
            }
        }
    }

    async fn stages(&mut self) -> Result<()> {
        let n = self.args.events;
        self.say(&format!("[1/9] generating {n} events"));
        self.history = generate(self.args.seed, &HistoryOptions::realistic(n));
        let payload_bytes: usize = self
            .history
            .iter()
            .map(|e| e.payload.to_string().len())
            .sum();
        self.results.push(
            "load.payload_bytes",
            "1 load",
            "mean payload size",
            payload_bytes as f64 / n.max(1) as f64,
            "bytes",
            Better::Neither,
        );
        if self.wants("capture") {
            self.capture().await?;
        } else {
            self.load_only().await?;
        }
        if self.wants("polling") {
            self.polling().await?;
        }
        if self.wants("sink") {
            self.sink_limit().await?;
        }
        if self.wants("end-to-end") {
            self.end_to_end().await?;
        }
        if self.wants("latency") {
            self.latency().await?;
        }
        if self.wants("memory") {
            self.memory().await?;
        }
        if self.wants("kafka") {
            if let Err(err) = kafka::stage(self).await {
                self.say(&format!("  kafka stage failed: {err:#}"));
                self.results.skipped.push(format!("9 kafka: {err:#}"));
            }
        }
        self.cleanup().await;
        Ok(())
    }

    /// Environment for a child `run` against `pg`.
    fn child_env(
        &self,
        pg: &activity_event_processor::config::PostgresConfig,
        slot: &str,
        source: &str,
    ) -> Vec<(&'static str, String)> {
        vec![
            ("POSTGRES_HOST", pg.host.clone()),
            ("POSTGRES_PORT", pg.port.to_string()),
            ("POSTGRES_DB", pg.database.clone()),
            ("POSTGRES_USER", pg.user.clone()),
            ("POSTGRES_PASSWORD", pg.password.expose().to_string()),
            ("MONGODB_URI", self.config.mongodb.uri.expose().to_string()),
            ("REPLICATION_SLOT", slot.to_string()),
            ("PUBLICATION", pg::PUBLICATION.to_string()),
            ("SOURCE", source.to_string()),
            // The processes' logs go to the results' `-logs` folder;
            // BENCH_LOG_LEVEL (a LOG_LEVEL filter) makes them say more.
            (
                "LOG_LEVEL",
                std::env::var("BENCH_LOG_LEVEL").unwrap_or_else(|_| "warn".to_string()),
            ),
        ]
    }

    async fn cleanup(&self) {
        for db in [
            "aep_bench_load",
            "aep_bench_capture",
            "aep_bench_polling",
            "aep_bench_end_to_end",
            "aep_bench_latency",
            "aep_bench_backlog",
        ] {
            let _ = pg::drop_database(&self.admin, db).await;
        }
        if let Ok(store) =
            MongoStore::connect(self.config.mongodb.uri.expose(), "aep_bench_end_to_end").await
        {
            for db in [
                "aep_bench_end_to_end",
                "aep_bench_latency",
                "aep_bench_sink",
            ] {
                let _ = store.client().database(db).drop().await;
            }
        }
    }

    fn charts(&self, stamp: &str) -> Result<()> {
        if !self.latencies_ms.is_empty() {
            let marks: Vec<(&str, f64)> =
                [("p50", 0.5), ("p95", 0.95), ("p99", 0.99), ("max", 1.0)]
                    .into_iter()
                    .filter_map(|(name, p)| percentile(&self.latencies_ms, p).map(|v| (name, v)))
                    .collect();
            let svg = chart::latency_svg(
                "Commit-to-read-model latency at 50% load",
                &self.latencies_ms,
                &marks,
            );
            let path = self.args.out.join(format!("{stamp}-latency.svg"));
            std::fs::write(&path, svg)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        if !self.series.is_empty() {
            let series: Vec<(&str, Vec<(f64, f64)>)> = self
                .series
                .iter()
                .map(|(name, points)| (name.as_str(), points.clone()))
                .collect();
            let svg = chart::throughput_svg("Throughput over time", &series);
            let path = self.args.out.join(format!("{stamp}-throughput.svg"));
            std::fs::write(&path, svg)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        Ok(())
    }

    async fn machine(&self) -> report::Machine {
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let memory_bytes = read("/proc/meminfo")
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024);
        let git = |args: &[&str]| {
            std::process::Command::new("git")
                .args(args)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        };
        let mut git_commit = git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into());
        if git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty()) {
            git_commit.push_str("-dirty");
        }
        let mongodb_version = match MongoStore::connect_within(
            self.config.mongodb.uri.expose(),
            "admin",
            Some(Duration::from_secs(5)),
        )
        .await
        {
            Ok(store) => store
                .database()
                .run_command(doc! { "buildInfo": 1 })
                .await
                .ok()
                .and_then(|d| d.get_str("version").ok().map(str::to_string))
                .unwrap_or_else(|| "unknown".into()),
            Err(_) => "unreachable".into(),
        };
        report::Machine {
            hostname: read("/etc/hostname").trim().to_string(),
            cpu_model,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_bytes,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            postgres_version: pg::server_version(&self.admin).await,
            mongodb_version,
            kafka: None,
            git_commit,
            binary_version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

/// events / (time from `since_ms` to the child's last durable batch).
fn rate_since(report: &StatsReport, since_ms: i64, events: u64) -> Result<f64> {
    if report.done < events {
        anyhow::bail!("the processor handled {} of {events} events", report.done);
    }
    let last = report
        .last_done_unix_ms
        .context("the processor reported no batch")?;
    let seconds = (last - since_ms).max(1) as f64 / 1000.0;
    Ok(events as f64 / seconds)
}

/// Events/s per whole second, from a report's timeline, starting at `since_ms`
/// and ending once `expected` events are done.
fn throughput(report: &StatsReport, since_ms: i64, expected: u64) -> Vec<(f64, f64)> {
    let offset = (since_ms - report.started_unix_ms) as f64 / 1000.0;
    let mut points = Vec::new();
    let mut previous: Option<(f64, u64)> = None;
    for &(t, done) in &report.timeline {
        if previous.is_some_and(|(_, d)| d >= expected) {
            break;
        }
        let t = t - offset;
        if t < 0.0 {
            previous = Some((0.0, done));
            continue;
        }
        match previous {
            Some((pt, pd)) if t - pt >= 1.0 => {
                points.push((t, done.saturating_sub(pd) as f64 / (t - pt)));
                previous = Some((t, done));
            }
            None => previous = Some((t, done)),
            _ => {}
        }
    }
    points
}

/// The latencies of a stats file, milliseconds, sorted: each bucket's events
/// at its upper bound (at most 1/128 above the true value), kept within the
/// exact minimum and maximum.
fn latencies_ms(latency: &LatencyReport) -> Vec<f64> {
    let mut values = Vec::with_capacity(latency.count as usize);
    for &(_, high, count) in &latency.buckets {
        let us = high.clamp(latency.min_us, latency.max_us);
        values.extend(std::iter::repeat_n(us as f64 / 1000.0, count as usize));
    }
    values
}

/// The `p` quantile (0..=1) of sorted values, nearest rank.
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted.get(rank - 1).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 0.5), Some(50.0));
        assert_eq!(percentile(&values, 0.99), Some(99.0));
        assert_eq!(percentile(&values, 1.0), Some(100.0));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn throughput_is_per_second_after_the_start() {
        let report = StatsReport {
            started_unix_ms: 1_000,
            timeline: vec![
                (0.5, 0),
                (1.0, 0),
                (2.0, 100),
                (3.0, 300),
                (3.5, 350),
                (4.0, 400),
            ],
            ..StatsReport::default()
        };
        // The data became visible 1 s after the process started.
        let points = throughput(&report, 2_000, 1_000);
        assert_eq!(points, vec![(1.0, 100.0), (2.0, 200.0), (3.0, 100.0)]);
        // Nothing after the last event.
        let points = throughput(&report, 2_000, 300);
        assert_eq!(points, vec![(1.0, 100.0), (2.0, 200.0)]);
    }

    #[test]
    fn latencies_come_from_the_buckets_within_the_extremes() {
        let latency = LatencyReport {
            count: 4,
            min_us: 1_000,
            max_us: 2_010,
            sum_us: 6_020,
            buckets: vec![(992, 999, 1), (1_000, 1_007, 1), (2_000, 2_015, 2)],
        };
        assert_eq!(latencies_ms(&latency), vec![1.0, 1.007, 2.01, 2.01]);
    }

    #[test]
    fn a_rate_needs_every_event_done() {
        let report = StatsReport {
            done: 10,
            last_done_unix_ms: Some(3_000),
            ..StatsReport::default()
        };
        assert_eq!(rate_since(&report, 1_000, 10).expect("rate"), 5.0);
        assert!(rate_since(&report, 1_000, 11).is_err());
    }
}
