//! The MongoDB side of `bench`: stage 5 (the sink limits), 6 (end to end)
//! and 7 (latency), each a processor following a fresh outbox into a fresh
//! read-model database.

use super::*;
use crate::scrape::Histogram;

impl Bench {
    pub(super) async fn mongo(&self, database: &str) -> Result<MongoStore> {
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
    pub(super) async fn sink_limit(&mut self) -> Result<()> {
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
    pub(super) async fn follower(
        &self,
        name: &str,
        extra: &[&str],
    ) -> Result<(
        Child,
        activity_event_processor::config::PostgresConfig,
        Client,
    )> {
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
    pub(super) async fn same_documents(&mut self, from: &str) -> Result<()> {
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
        for collection in [
            activity_event_processor::store::mongo::USERS,
            activity_event_processor::store::mongo::ACTIVITIES,
        ] {
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
    pub(super) async fn end_to_end(&mut self) -> Result<()> {
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
        self.stage_breakdown("e2e", stage, &report, &[]);
        pg::drop_database(&self.admin, "aep_bench_end_to_end").await?;
        let rate = rate_since(&report, committed_ms, n)?;
        self.same_documents("aep_bench_end_to_end").await?;
        let batch = (n as usize).div_ceil(report.batches.max(1) as usize);
        self.say(&format!(
            "  the fold's writes, batches of {batch}, upserted raw"
        ));
        let (minimum, fold_seconds) = self.fold_writes(&history, batch).await?;
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
        r.push(
            "e2e.fold_docs_per_event",
            stage,
            &format!("documents the fold changes per event (batches of {batch})"),
            minimum as f64 / n as f64,
            "docs",
            Better::Neither,
        );
        if minimum > 0 {
            let ratio = report.documents_written as f64 / minimum as f64;
            r.push(
                "e2e.docs_vs_fold",
                stage,
                "documents written vs the fold's minimum",
                ratio,
                "x",
                Better::Lower,
            );
            r.target(
                "documents written <= 1.1x the fold's minimum",
                format!("{ratio:.2}x"),
                ratio <= 1.1,
            );
        }
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
        if fold_seconds > 0.0 {
            r.push(
                "sink.fold_writes.docs_per_s",
                "5 sink limit",
                &format!("the fold's writes upserted raw, batches of {batch}, same indexes"),
                minimum as f64 / fold_seconds,
                "docs/s",
                Better::Higher,
            );
            r.push(
                "e2e.fold_writes_limit",
                stage,
                "sink limit for this history (the fold's writes upserted raw)",
                n as f64 / fold_seconds,
                "events/s",
                Better::Neither,
            );
            r.ratio(
                "e2e.vs_fold_writes",
                stage,
                "end to end vs the sink limit for this history",
                "e2e.events_per_s",
                "e2e.fold_writes_limit",
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
    pub(super) async fn latency(&mut self) -> Result<()> {
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
        let (mut child, _pg, client) = self.follower("latency", &[]).await?;
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
        let metrics = child.metrics().await?;
        let report = child.stop().await?;
        pg::drop_database(&self.admin, "aep_bench_latency").await?;
        self.series.push((
            "latency run (50% load)".into(),
            throughput(&report, started_ms, count as u64),
        ));
        let latencies = latencies_ms(&report.latency);
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
        self.stage_breakdown("latency", stage, &report, &[]);
        self.against_metrics(&metrics);
        self.latencies_ms = latencies;
        Ok(())
    }

    /// Where the run's batches spent their time, stage by stage (the stats
    /// file's `stages`): per batch, and as a share of the batches' time;
    /// `only`, when not empty, names the stages to report.
    pub(crate) fn stage_breakdown(
        &mut self,
        prefix: &str,
        stage: &str,
        report: &StatsReport,
        only: &[activity_event_processor::stages::Stage],
    ) {
        let batches = report.batches.max(1) as f64;
        let total: u64 = report.stages.values().sum();
        for name in activity_event_processor::stages::Stage::ALL
            .into_iter()
            .filter(|s| only.is_empty() || only.contains(s))
            .map(|s| s.as_str())
        {
            let micros = report.stages.get(name).copied().unwrap_or(0);
            let share = if total > 0 {
                micros as f64 * 100.0 / total as f64
            } else {
                0.0
            };
            self.results.push(
                &format!("{prefix}.stage.{name}_ms_per_batch"),
                stage,
                &format!("stage {name}: ms per batch ({share:.0}% of the time)"),
                micros as f64 / 1e3 / batches,
                "ms",
                Better::Lower,
            );
        }
    }

    /// The processor's own commit-to-durable histogram on the same run: its
    /// count, and how many of its buckets lie between the bucket holding
    /// its p50 (p99) and the bucket the benchmark's p50 (p99) falls in.
    fn against_metrics(&mut self, metrics: &str) {
        let stage = "7 latency";
        let name = "event_processor_commit_to_durable_seconds";
        let Some(histogram) = Histogram::parse(metrics, name) else {
            self.say(&format!("  /metrics has no {name}"));
            return;
        };
        let r = &mut self.results;
        r.push(
            "latency.metrics_samples",
            stage,
            "events in /metrics' histogram",
            histogram.count() as f64,
            "",
            Better::Neither,
        );
        let mut distance = 0usize;
        for (label, p) in [("p50", 0.50), ("p99", 0.99)] {
            let (Some(ours), Some(theirs)) = (
                r.get(&format!("latency.{label}_ms")),
                histogram.quantile_bucket(p),
            ) else {
                continue;
            };
            let (low, high) = histogram.bounds(theirs);
            r.push(
                &format!("latency.metrics_{label}_bucket_ms"),
                stage,
                &format!(
                    "/metrics' {label} bucket, upper bound (above {:.0} ms)",
                    low * 1e3
                ),
                high * 1e3,
                "ms",
                Better::Lower,
            );
            distance = distance.max(histogram.bucket_of(ours / 1e3).abs_diff(theirs));
        }
        r.push(
            "latency.metrics_bucket_distance",
            stage,
            "buckets between the bench's p50/p99 and /metrics'",
            distance as f64,
            "",
            Better::Lower,
        );
    }
}
