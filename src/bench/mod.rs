//! `bench`: every stage of the pipeline measured beside its physical limit,
//! in one run, on fresh databases, so that ratios stay meaningful on a noisy
//! machine. The numbered stages follow the README's "Performance" section:
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
//! through the file its hidden `--bench-report` flag writes.

pub mod chart;
mod child;
mod kafka;
mod pg;
pub mod report;

use crate::config::Config;
use crate::decode::OutboxEvent;
use crate::history::{generate, HistoryOptions};
use crate::probe::ProbeReport;
use crate::store::mongo::MongoStore;
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
    let admin = crate::outbox::connect(&config.postgres).await?;
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

    /// Stage 1 alone (when capture is skipped): the COPY rate.
    async fn load_only(&mut self) -> Result<()> {
        let (_, client) =
            pg::fresh_database(&self.admin, &self.config.postgres, "aep_bench_load").await?;
        let rate = pg::copy(&client, &self.history).await?;
        self.results.push(
            "load.copy.rows_per_s",
            "1 load",
            "COPY into the outbox",
            rate,
            "rows/s",
            Better::Higher,
        );
        Ok(())
    }

    /// Stages 1-3 over one WAL range: slots first, then COPY, then each reader.
    async fn capture(&mut self) -> Result<()> {
        let n = self.history.len() as u64;
        let (pg, client) =
            pg::fresh_database(&self.admin, &self.config.postgres, "aep_bench_capture").await?;
        let slots = ["peek", "recv_1", "ours_1", "recv_2", "ours_2"].map(|s| format!("bench_{s}"));
        for slot in &slots {
            pg::create_slot(&client, slot).await?;
        }
        self.say(&format!("  COPY {n} events"));
        let rate = pg::copy(&client, &self.history).await?;
        let end = pg::current_lsn(&client).await?;
        self.results.push(
            "load.copy.rows_per_s",
            "1 load",
            "COPY into the outbox",
            rate,
            "rows/s",
            Better::Higher,
        );
        self.say(&format!("  {rate:.0} rows/s"));

        self.say("[2/9] capture limits: server-side decoding, pg_recvlogical");
        let peek = pg::peek_rate(&client, &slots[0], n).await?;
        self.results.push(
            "capture.peek.events_per_s",
            "2 capture limits",
            "server-side pgoutput decoding, no client",
            peek,
            "events/s",
            Better::Higher,
        );
        // Two rounds, alternating, best of each: the first reader of a WAL
        // range pays for reading it from disk.
        let mut recv = Vec::new();
        let mut ours = Vec::new();
        for round in 0..2 {
            self.say(&format!("[2/9] pg_recvlogical, round {}", round + 1));
            recv.push(pg::recvlogical(&pg, &slots[1 + 2 * round], &end, n).await?);
            self.say(&format!(
                "[3/9] our replication capture, round {}",
                round + 1
            ));
            let started_ms = chrono::Utc::now().timestamp_millis();
            let child = Child::spawn(
                &self.dir,
                &format!("capture-{}", round + 1),
                &["run", "--sink", "discard", "--until-caught-up"],
                &self.child_env(&pg, &slots[2 + 2 * round], "replication"),
            )?;
            let progress = self.progress_fn("capture", n);
            let report = child.wait_exit(Duration::from_secs(600), progress).await?;
            ours.push((
                rate_since(&report, started_ms, n)?,
                report.cpu_user_s + report.cpu_system_s,
            ));
        }
        let best = |v: &[(f64, f64)]| {
            v.iter()
                .copied()
                .fold((0.0f64, f64::INFINITY), |(r, c), (rate, cpu)| {
                    (r.max(rate), c.min(cpu))
                })
        };
        let (recv_rate, recv_cpu) = best(&recv);
        let (our_rate, our_cpu) = best(&ours);
        let stage = "2 capture limits";
        self.results.push(
            "capture.recvlogical.events_per_s",
            stage,
            "pg_recvlogical to /dev/null (best of 2)",
            recv_rate,
            "events/s",
            Better::Higher,
        );
        self.results.push(
            "capture.recvlogical.cpu_us_per_event",
            stage,
            "pg_recvlogical CPU per event",
            recv_cpu * 1e6 / n as f64,
            "µs",
            Better::Lower,
        );
        let stage = "3 our capture";
        self.results.push(
            "capture.ours.events_per_s",
            stage,
            "replication source, no-op sink (best of 2)",
            our_rate,
            "events/s",
            Better::Higher,
        );
        self.results.push(
            "capture.ours.cpu_us_per_event",
            stage,
            "our CPU per event",
            our_cpu * 1e6 / n as f64,
            "µs",
            Better::Lower,
        );
        self.results.ratio(
            "capture.ours_vs_recvlogical",
            stage,
            "events/s vs pg_recvlogical",
            "capture.ours.events_per_s",
            "capture.recvlogical.events_per_s",
        );
        self.results.ratio(
            "capture.ours_vs_peek",
            stage,
            "events/s vs server-side decoding",
            "capture.ours.events_per_s",
            "capture.peek.events_per_s",
        );
        if let (Some(o), Some(r)) = (
            self.results.get("capture.ours.cpu_us_per_event"),
            self.results.get("capture.recvlogical.cpu_us_per_event"),
        ) {
            if r > 0.0 {
                self.results.push(
                    "capture.cpu_vs_recvlogical",
                    stage,
                    "CPU per event vs pg_recvlogical",
                    o / r,
                    "x",
                    Better::Lower,
                );
            }
        }
        drop(client);
        pg::drop_database(&self.admin, "aep_bench_capture").await?;
        Ok(())
    }

    /// Environment for a child `run` against `pg`.
    fn child_env(
        &self,
        pg: &crate::config::PostgresConfig,
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
            ("LOG_LEVEL", "warn".to_string()),
        ]
    }

    /// Stage 4: the polling source (1 and 4 workers) and the bare claim query.
    async fn polling(&mut self) -> Result<()> {
        let n = self.history.len() as u64;
        let stage = "4 polling";
        let db = "aep_bench_polling";
        self.say("[4/9] polling: the bare claim query");
        let (pg, client) = pg::fresh_database(&self.admin, &self.config.postgres, db).await?;
        pg::copy(&client, &self.history).await?;
        let batch = self.config.pipeline.batch_size as i64;
        let claim = pg::bare_claim_rate(&client, batch, n).await?;
        self.results.push(
            "polling.claim.events_per_s",
            stage,
            &format!("bare claim + mark query, batch {batch}"),
            claim,
            "events/s",
            Better::Higher,
        );
        drop(client);
        for workers in [1usize, 4] {
            self.say(&format!(
                "[4/9] polling source, {workers} worker(s), no-op sink"
            ));
            let (pg, client) = pg::fresh_database(&self.admin, &self.config.postgres, db).await?;
            pg::copy(&client, &self.history).await?;
            drop(client);
            let started_ms = chrono::Utc::now().timestamp_millis();
            let child = Child::spawn(
                &self.dir,
                &format!("polling-{workers}"),
                &[
                    "run",
                    "--source",
                    "polling",
                    "--workers",
                    &workers.to_string(),
                    "--sink",
                    "discard",
                    "--until-caught-up",
                ],
                &self.child_env(&pg, "unused", "polling"),
            )?;
            let progress = self.progress_fn("polling", n);
            let report = child.wait_exit(Duration::from_secs(900), progress).await?;
            let rate = rate_since(&report, started_ms, n)?;
            self.results.push(
                &format!("polling.w{workers}.events_per_s"),
                stage,
                &format!("polling source, {workers} worker(s), no-op sink"),
                rate,
                "events/s",
                Better::Higher,
            );
            self.results.ratio(
                &format!("polling.w{workers}_vs_claim"),
                stage,
                &format!("{workers} worker(s) vs the bare claim query"),
                &format!("polling.w{workers}.events_per_s"),
                "polling.claim.events_per_s",
            );
        }
        let _ = pg;
        pg::drop_database(&self.admin, db).await?;
        Ok(())
    }

    async fn mongo(&self, database: &str) -> Result<MongoStore> {
        let store = MongoStore::connect(self.config.mongodb.uri.expose(), database)
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach MongoDB: {e}"))?;
        store
            .database()
            .drop()
            .await
            .context("cannot drop the bench database in MongoDB")?;
        Ok(store)
    }

    /// Stage 5: raw batched upserts of as many documents as there are events,
    /// shaped like a user read model, one `update` command per batch.
    async fn sink_limit(&mut self) -> Result<()> {
        let n = self.args.sink_events;
        let batch = self.config.pipeline.batch_size.max(1);
        self.say(&format!(
            "[5/9] sink limit: {n} raw upserts, {batch} per command"
        ));
        let store = self.mongo("aep_bench_sink").await?;
        let mut progress = self.progress_fn("raw upserts", n as u64);
        let started = Instant::now();
        let mut done = 0;
        for chunk in (0..n).collect::<Vec<_>>().chunks(batch) {
            let statements = chunk
                .iter()
                .map(|i| {
                    let id = uuid::Uuid::from_u128(*i as u128).to_string();
                    doc! {
                        "q": { "_id": &id },
                        "u": { "$set": {
                            "name": format!("Bench User {i}"),
                            "email": format!("user{i}@example.com"),
                            "activities": [],
                            "_seq": *i as i64,
                            "updated_at": "2026-11-25T12:00:00.000Z",
                        } },
                        "upsert": true,
                    }
                })
                .collect();
            let report = store
                .update("raw_upserts", statements, false)
                .await
                .map_err(|e| anyhow::anyhow!("raw upserts failed: {e}"))?;
            if let Some(err) = report.errors.first() {
                anyhow::bail!("raw upsert failed: {}", err.message);
            }
            done += chunk.len();
            progress(done as u64);
        }
        let rate = n as f64 / started.elapsed().as_secs_f64().max(1e-6);
        self.results.push(
            "sink.raw_upserts.docs_per_s",
            "5 sink limit",
            &format!("raw batched upserts ({batch} per command)"),
            rate,
            "docs/s",
            Better::Higher,
        );
        // The floor under any latency: one upsert of one document, round trip.
        let mut single = Vec::with_capacity(200);
        for i in 0..200u128 {
            let statement = doc! {
                "q": { "_id": uuid::Uuid::from_u128(i).to_string() },
                "u": { "$set": { "name": "Single Upsert", "_seq": i as i64 } },
                "upsert": true,
            };
            let started = Instant::now();
            store
                .update("raw_upserts", vec![statement], false)
                .await
                .map_err(|e| anyhow::anyhow!("single upsert failed: {e}"))?;
            single.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        single.sort_by(f64::total_cmp);
        let _ = store.database().drop().await;
        for (name, p) in [("p50", 0.5), ("p99", 0.99)] {
            if let Some(ms) = percentile(&single, p) {
                self.results.push(
                    &format!("sink.single_upsert.{name}_ms"),
                    "5 sink limit",
                    &format!("one-document upsert round trip, {name}"),
                    ms,
                    "ms",
                    Better::Lower,
                );
            }
        }
        Ok(())
    }

    /// A processor following a fresh outbox into a fresh read-model database:
    /// (child, postgres config, client of the outbox database).
    async fn follower(
        &self,
        name: &str,
        extra: &[&str],
    ) -> Result<(Child, crate::config::PostgresConfig, Client)> {
        let db = format!("aep_bench_{}", name.replace('-', "_"));
        let (pg, client) = pg::fresh_database(&self.admin, &self.config.postgres, &db).await?;
        self.mongo(&db).await?;
        let mut env = self.child_env(&pg, &db, "replication");
        env.push(("MONGODB_DB", db.clone()));
        let mut args = vec!["run"];
        args.extend_from_slice(extra);
        let child = Child::spawn(&self.dir, name, &args, &env)?;
        pg::wait_for_active_slot(&client, &db, Duration::from_secs(60))
            .await
            .map_err(|e| anyhow::anyhow!("{e}; see {}/{name}.log", self.dir.display()))?;
        Ok((child, pg, client))
    }

    /// Stage 5, like for like: the documents the projections wrote, upserted
    /// raw by `_id` into collections with the same indexes. Its rate in
    /// documents/s, divided by the documents written per event, is what the
    /// sink allows for these documents; the gap to end to end is what the
    /// projections' reads, fences and copies cost.
    async fn same_documents(&mut self, from: &str) -> Result<()> {
        let source = MongoStore::connect(self.config.mongodb.uri.expose(), from)
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach MongoDB: {e}"))?;
        let target = self.mongo("aep_bench_same").await?;
        target
            .ensure_indexes()
            .await
            .map_err(|e| anyhow::anyhow!("cannot create indexes: {e}"))?;
        let batch = self.config.pipeline.batch_size.max(1);
        let mut written = 0usize;
        let mut elapsed = 0.0;
        for collection in [crate::store::mongo::USERS, crate::store::mongo::ACTIVITIES] {
            let docs = source
                .find(collection, doc! {}, None)
                .await
                .map_err(|e| anyhow::anyhow!("cannot read {collection}: {e}"))?;
            self.say(&format!("  same documents: {} {collection}", docs.len()));
            for chunk in docs.chunks(batch) {
                let statements = chunk
                    .iter()
                    .map(|d| {
                        let mut fields = d.clone();
                        let id = fields.remove("_id").unwrap_or(mongodb::bson::Bson::Null);
                        doc! { "q": { "_id": id }, "u": { "$set": fields }, "upsert": true }
                    })
                    .collect();
                let started = Instant::now();
                let report = target
                    .update(collection, statements, false)
                    .await
                    .map_err(|e| anyhow::anyhow!("same-document upserts failed: {e}"))?;
                elapsed += started.elapsed().as_secs_f64();
                if let Some(err) = report.errors.first() {
                    anyhow::bail!("same-document upsert failed: {}", err.message);
                }
                written += chunk.len();
            }
        }
        let _ = target.database().drop().await;
        let _ = source.database().drop().await;
        if written > 0 {
            self.results.push(
                "sink.same_documents.docs_per_s",
                "5 sink limit",
                "the projections' documents upserted raw, same indexes",
                written as f64 / elapsed.max(1e-6),
                "docs/s",
                Better::Higher,
            );
        }
        Ok(())
    }

    /// Stage 6: outbox to read models with the real projections.
    async fn end_to_end(&mut self) -> Result<()> {
        let history = generate(
            self.args.seed,
            &HistoryOptions::realistic(self.args.sink_events),
        );
        let n = history.len() as u64;
        let stage = "6 end to end";
        self.say(&format!(
            "[6/9] end to end: {n} events into the read models"
        ));
        let (mut child, _pg, client) = self.follower("end-to-end", &[]).await?;
        pg::copy(&client, &history).await?;
        let committed_ms = chrono::Utc::now().timestamp_millis();
        let timeout = Duration::from_secs(120 + n / 50);
        let progress = self.progress_fn("end to end", n);
        child.wait_done(n, timeout, progress).await?;
        let report = child.stop().await?;
        pg::drop_database(&self.admin, "aep_bench_end_to_end").await?;
        let rate = rate_since(&report, committed_ms, n)?;
        self.same_documents("aep_bench_end_to_end").await?;
        self.series
            .push(("end to end".into(), throughput(&report, committed_ms, n)));
        let r = &mut self.results;
        r.push(
            "e2e.events_per_s",
            stage,
            "outbox to read models",
            rate,
            "events/s",
            Better::Higher,
        );
        let limit = [
            r.get("capture.peek.events_per_s"),
            r.get("capture.recvlogical.events_per_s"),
            r.get("sink.raw_upserts.docs_per_s"),
        ]
        .into_iter()
        .flatten()
        .fold(f64::INFINITY, f64::min);
        if limit.is_finite() {
            r.push(
                "e2e.limit",
                stage,
                "min(capture limits, sink limit)",
                limit,
                "events/s",
                Better::Neither,
            );
            r.ratio(
                "e2e.vs_limit",
                stage,
                "end to end vs the limit",
                "e2e.events_per_s",
                "e2e.limit",
            );
        }
        r.push(
            "e2e.round_trips_per_event",
            stage,
            "MongoDB round trips per event",
            report.round_trips as f64 / n as f64,
            "trips",
            Better::Lower,
        );
        r.push(
            "e2e.docs_per_event",
            stage,
            "documents written per event",
            report.documents_written as f64 / n as f64,
            "docs",
            Better::Lower,
        );
        if let (Some(same), Some(per_event)) = (
            r.get("sink.same_documents.docs_per_s"),
            r.get("e2e.docs_per_event"),
        ) {
            r.push(
                "e2e.same_documents_limit",
                stage,
                "sink limit for these documents (same docs/s / docs per event)",
                same / per_event,
                "events/s",
                Better::Neither,
            );
            r.ratio(
                "e2e.vs_same_documents",
                stage,
                "end to end vs the sink limit for these documents",
                "e2e.events_per_s",
                "e2e.same_documents_limit",
            );
        }
        r.push(
            "e2e.redelivered",
            stage,
            "events delivered twice (after a reconnect)",
            report.duplicates as f64,
            "",
            Better::Lower,
        );
        r.push(
            "e2e.batches",
            stage,
            "batches",
            report.batches as f64,
            "",
            Better::Neither,
        );
        r.push(
            "memory.e2e.peak_rss_mb",
            "8 memory",
            &format!("peak RSS, real sink, {n} events"),
            report.peak_rss_bytes as f64 / 1048576.0,
            "MB",
            Better::Lower,
        );
        Ok(())
    }

    /// Stage 7: commit-to-read-model latency at half the end-to-end rate.
    async fn latency(&mut self) -> Result<()> {
        let stage = "7 latency";
        let full = self.results.get("e2e.events_per_s").unwrap_or(1000.0);
        let rate = (full / 2.0).max(1.0);
        let seconds = self.args.latency_seconds.max(1);
        let count = ((rate * seconds as f64) as usize).max(1);
        self.say(&format!(
            "[7/9] latency: {rate:.0} events/s for {seconds} s ({count} events)"
        ));
        let history = generate(
            self.args.seed + 1,
            &HistoryOptions {
                poison_per_mille: 0,
                unknown_per_mille: 0,
                chaos_per_mille: 0,
                ..HistoryOptions::realistic(count)
            },
        );
        let (mut child, _pg, client) = self.follower("latency", &["--bench-latency"]).await?;
        let mut progress = self.progress_fn("offered load", count as u64);
        let started_ms = chrono::Utc::now().timestamp_millis();
        let offered =
            pg::paced_insert(&client, &history, rate, Duration::from_millis(10), |sent| {
                progress(sent as u64)
            })
            .await?;
        let progress = self.progress_fn("draining", count as u64);
        child
            .wait_done(count as u64, Duration::from_secs(600), progress)
            .await?;
        let report = child.stop().await?;
        pg::drop_database(&self.admin, "aep_bench_latency").await?;
        self.series.push((
            "latency run (50% load)".into(),
            throughput(&report, started_ms, count as u64),
        ));
        let mut latencies: Vec<f64> = report
            .latencies_us
            .iter()
            .map(|&us| us as f64 / 1000.0)
            .collect();
        latencies.sort_by(f64::total_cmp);
        let r = &mut self.results;
        r.push(
            "latency.offered_per_s",
            stage,
            "offered load",
            offered,
            "events/s",
            Better::Neither,
        );
        r.push(
            "latency.samples",
            stage,
            "events measured",
            latencies.len() as f64,
            "",
            Better::Neither,
        );
        for (name, p) in [("p50", 0.50), ("p95", 0.95), ("p99", 0.99), ("max", 1.0)] {
            if let Some(value) = percentile(&latencies, p) {
                r.push(
                    &format!("latency.{name}_ms"),
                    stage,
                    &format!("commit to read model, {name}"),
                    value,
                    "ms",
                    Better::Lower,
                );
            }
        }
        self.latencies_ms = latencies;
        Ok(())
    }

    /// Stage 8: peak RSS of `run` draining a large backlog, no-op sink.
    async fn memory(&mut self) -> Result<()> {
        let n = self.args.backlog;
        let db = "aep_bench_backlog";
        self.say(&format!(
            "[8/9] memory: a backlog of {n} events, no-op sink"
        ));
        let (pg, client) = pg::fresh_database(&self.admin, &self.config.postgres, db).await?;
        pg::create_slot(&client, "bench_backlog").await?;
        let chunk = 100_000usize;
        let mut loaded = 0usize;
        let mut progress = self.progress_fn("loading the backlog", n as u64);
        while loaded < n {
            let size = chunk.min(n - loaded);
            let events = generate(
                self.args.seed + 100 + loaded as u64,
                &HistoryOptions {
                    first_sequence: loaded as i64 + 1,
                    ..HistoryOptions::realistic(size)
                },
            );
            outbox_copy(&client, &events).await?;
            loaded += size;
            progress(loaded as u64);
        }
        drop(client);
        let started_ms = chrono::Utc::now().timestamp_millis();
        let child = Child::spawn(
            &self.dir,
            "memory-backlog",
            &["run", "--sink", "discard", "--until-caught-up"],
            &self.child_env(&pg, "bench_backlog", "replication"),
        )?;
        let progress = self.progress_fn("draining the backlog", n as u64);
        let report = child.wait_exit(Duration::from_secs(1800), progress).await?;
        let rate = rate_since(&report, started_ms, n as u64)?;
        let stage = "8 memory";
        self.results.push(
            "memory.backlog.peak_rss_mb",
            stage,
            &format!("peak RSS, no-op sink, {n}-event backlog"),
            report.peak_rss_bytes as f64 / 1048576.0,
            "MB",
            Better::Lower,
        );
        self.results.push(
            "memory.backlog.events_per_s",
            stage,
            "backlog drain rate, no-op sink",
            rate,
            "events/s",
            Better::Higher,
        );
        pg::drop_database(&self.admin, db).await?;
        Ok(())
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

    /// Targets of the issue, met or missed.
    fn judge(&mut self) {
        let r = &self.results;
        let mut targets = Vec::new();
        if let (Some(rate), Some(cpu)) = (
            r.get("capture.ours_vs_recvlogical"),
            r.get("capture.cpu_vs_recvlogical"),
        ) {
            targets.push((
                "capture >= 0.95x pg_recvlogical events/s, CPU/event <= its",
                format!("{rate:.2}x events/s, {cpu:.2}x CPU/event"),
                rate >= 0.95 && cpu <= 1.0,
            ));
        }
        if let Some(ratio) = r.get("e2e.vs_limit") {
            targets.push((
                "end to end >= 0.8x min(capture limit, sink limit)",
                format!("{ratio:.2}x"),
                ratio >= 0.8,
            ));
        }
        if let Some(p99) = r.get("latency.p99_ms") {
            targets.push((
                "p99 commit-to-read-model < 50 ms at 50% load",
                format!("{p99:.1} ms"),
                p99 < 50.0,
            ));
        }
        if let Some(rss) = r.get("memory.backlog.peak_rss_mb") {
            targets.push((
                "peak RSS < 150 MB draining the backlog",
                format!("{rss:.1} MB"),
                rss < 150.0,
            ));
        }
        for (goal, actual, met) in targets {
            self.results.target(goal, actual, met);
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

async fn outbox_copy(client: &Client, events: &[OutboxEvent]) -> Result<()> {
    crate::outbox::load::copy_events(client, events).await?;
    Ok(())
}

/// events / (time from `since_ms` to the child's last durable batch).
fn rate_since(report: &ProbeReport, since_ms: i64, events: u64) -> Result<f64> {
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
fn throughput(report: &ProbeReport, since_ms: i64, expected: u64) -> Vec<(f64, f64)> {
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
        let report = ProbeReport {
            started_unix_ms: 1_000,
            timeline: vec![
                (0.5, 0),
                (1.0, 0),
                (2.0, 100),
                (3.0, 300),
                (3.5, 350),
                (4.0, 400),
            ],
            ..ProbeReport::default()
        };
        // The data became visible 1 s after the process started.
        let points = throughput(&report, 2_000, 1_000);
        assert_eq!(points, vec![(1.0, 100.0), (2.0, 200.0), (3.0, 100.0)]);
        // Nothing after the last event.
        let points = throughput(&report, 2_000, 300);
        assert_eq!(points, vec![(1.0, 100.0), (2.0, 200.0)]);
    }

    #[test]
    fn a_rate_needs_every_event_done() {
        let report = ProbeReport {
            done: 10,
            last_done_unix_ms: Some(3_000),
            ..ProbeReport::default()
        };
        assert_eq!(rate_since(&report, 1_000, 10).expect("rate"), 5.0);
        assert!(rate_since(&report, 1_000, 11).is_err());
    }
}
