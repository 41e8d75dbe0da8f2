//! The PostgreSQL side of `bench`: stage 1 (COPY), 2-3 (the capture limits
//! and our capture over one WAL range), 4 (polling) and 8 (the backlog).

use super::*;

impl Bench {
    /// Stage 1 alone (when capture is skipped): the COPY rate.
    pub(super) async fn load_only(&mut self) -> Result<()> {
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
    pub(super) async fn capture(&mut self) -> Result<()> {
        let n = self.history.len() as u64;
        let (pg, client) =
            pg::fresh_database(&self.admin, &self.config.postgres, "aep_bench_capture").await?;
        let slots = [
            "peek", "recv_1", "ours_1", "off_1", "recv_2", "ours_2", "off_2", "cg_recv", "cg_ours",
        ]
        .map(|s| format!("bench_{s}"));
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
        // range pays for reading it from disk. Ours runs with its metrics
        // served and recorded, then with METRICS_ADDR=off (nothing recorded).
        let mut recv = Vec::new();
        let mut ours = Vec::new();
        let mut bare = Vec::new();
        for round in 0..2 {
            self.say(&format!("[2/9] pg_recvlogical, round {}", round + 1));
            recv.push(pg::recvlogical(&pg, &slots[1 + 3 * round], &end, n, &[]).await?);
            self.say(&format!(
                "[3/9] our replication capture, round {}",
                round + 1
            ));
            ours.push(
                self.our_capture(&pg, &slots[2 + 3 * round], round, true)
                    .await?,
            );
            self.say(&format!(
                "[3/9] our replication capture, METRICS_ADDR=off, round {}",
                round + 1
            ));
            bare.push(
                self.our_capture(&pg, &slots[3 + 3 * round], round, false)
                    .await?,
            );
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
        let (bare_rate, bare_cpu) = best(&bare);
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
        self.results.push(
            "capture.no_metrics.events_per_s",
            stage,
            "the same with METRICS_ADDR=off (best of 2)",
            bare_rate,
            "events/s",
            Better::Higher,
        );
        self.results.push(
            "capture.no_metrics.cpu_us_per_event",
            stage,
            "our CPU per event with METRICS_ADDR=off",
            bare_cpu * 1e6 / n as f64,
            "µs",
            Better::Lower,
        );
        self.results.ratio(
            "capture.metrics_vs_none",
            stage,
            "events/s with metrics vs without",
            "capture.ours.events_per_s",
            "capture.no_metrics.events_per_s",
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
        self.instructions(&pg, &slots[7], &slots[8], &end).await?;
        drop(client);
        pg::drop_database(&self.admin, "aep_bench_capture").await?;
        Ok(())
    }

    /// `pg_recvlogical` and our capture once more over the same WAL range,
    /// each under callgrind: instructions per event, which the machine's load
    /// does not move (the CPU times above do).
    async fn instructions(
        &mut self,
        pg: &activity_event_processor::config::PostgresConfig,
        recv_slot: &str,
        our_slot: &str,
        end: &str,
    ) -> Result<()> {
        let Some(valgrind) = callgrind::valgrind() else {
            self.say(
                "  instructions per event: not counted, valgrind is not installed \
                 (scripts/setup.sh --bench installs it)",
            );
            return Ok(());
        };
        let n = self.history.len() as u64;
        let stage = "3 our capture";
        self.say("[3/9] instructions per event under callgrind: pg_recvlogical");
        let wrapper = callgrind::wrapper(&valgrind, &self.dir, "recvlogical");
        pg::recvlogical(pg, recv_slot, end, n, &wrapper).await?;
        let recv = callgrind::collected(&self.dir, "recvlogical")? as f64 / n as f64;
        self.say("[3/9] instructions per event under callgrind: our capture");
        let env = self.child_env(pg, our_slot, "replication");
        let wrapper = callgrind::wrapper(&valgrind, &self.dir, "capture");
        let child = Child::spawn_under(
            &self.dir,
            "capture-callgrind",
            &wrapper,
            &["run", "--sink", "discard", "--until-caught-up"],
            &env,
        )?;
        let progress = self.progress_fn("capture under callgrind", n);
        child.wait_exit(Duration::from_secs(3600), progress).await?;
        let ours = callgrind::collected(&self.dir, "capture")? as f64 / n as f64;
        self.results.push(
            "capture.recvlogical.instructions_per_event",
            "2 capture limits",
            "pg_recvlogical instructions per event (callgrind)",
            recv,
            "instr",
            Better::Lower,
        );
        self.results.push(
            "capture.ours.instructions_per_event",
            stage,
            "our instructions per event (callgrind)",
            ours,
            "instr",
            Better::Lower,
        );
        if recv > 0.0 {
            self.results.push(
                "capture.instructions_vs_recvlogical",
                stage,
                "instructions per event vs pg_recvlogical",
                ours / recv,
                "x",
                Better::Lower,
            );
        }
        Ok(())
    }

    /// One run of our replication capture over the loaded WAL range from
    /// `slot`, with the no-op sink: its events/s and CPU seconds.
    async fn our_capture(
        &mut self,
        pg: &activity_event_processor::config::PostgresConfig,
        slot: &str,
        round: usize,
        metrics: bool,
    ) -> Result<(f64, f64)> {
        let n = self.history.len() as u64;
        let mut env = self.child_env(pg, slot, "replication");
        let mut name = format!("capture-{}", round + 1);
        if !metrics {
            env.push(("METRICS_ADDR", "off".to_string()));
            name.push_str("-no-metrics");
        }
        let started_ms = chrono::Utc::now().timestamp_millis();
        let child = Child::spawn(
            &self.dir,
            &name,
            &["run", "--sink", "discard", "--until-caught-up"],
            &env,
        )?;
        let progress = self.progress_fn("capture", n);
        let report = child.wait_exit(Duration::from_secs(600), progress).await?;
        Ok((
            rate_since(&report, started_ms, n)?,
            report.cpu_user_s + report.cpu_system_s,
        ))
    }

    /// Stage 4: the polling source (1 and 4 workers) and the bare claim query.
    pub(super) async fn polling(&mut self) -> Result<()> {
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
            &format!("plain SKIP LOCKED claim + mark, batch {batch}"),
            claim,
            "events/s",
            Better::Higher,
        );
        drop(client);
        self.say("[4/9] polling: the processor's claim query, bare");
        let (_, client) = pg::fresh_database(&self.admin, &self.config.postgres, db).await?;
        pg::copy(&client, &self.history).await?;
        let ordered = pg::ordered_claim_rate(&client, batch, n).await?;
        self.results.push(
            "polling.ordered_claim.events_per_s",
            stage,
            &format!("claim with per-aggregate order + mark, batch {batch}"),
            ordered,
            "events/s",
            Better::Higher,
        );
        self.results.ratio(
            "polling.ordered_vs_plain",
            stage,
            "ordered claim vs the plain claim",
            "polling.ordered_claim.events_per_s",
            "polling.claim.events_per_s",
        );
        if let Some(ratio) = self.results.get("polling.ordered_vs_plain") {
            self.results.target(
                "polling claim with per-aggregate order >= 0.5x the plain claim",
                format!("{ratio:.2}x"),
                ratio >= 0.5,
            );
        }
        drop(client);
        for workers in [1usize, 2, 4] {
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
                &format!("{workers} worker(s) vs the plain claim"),
                &format!("polling.w{workers}.events_per_s"),
                "polling.claim.events_per_s",
            );
        }
        self.results.ratio(
            "polling.w2_vs_w1",
            stage,
            "2 workers vs 1 worker",
            "polling.w2.events_per_s",
            "polling.w1.events_per_s",
        );
        if let Some(ratio) = self.results.get("polling.w2_vs_w1") {
            self.results.target(
                "polling: 2 workers >= 1.3x one worker",
                format!("{ratio:.2}x"),
                ratio >= 1.3,
            );
        }
        let _ = pg;
        pg::drop_database(&self.admin, db).await?;
        Ok(())
    }

    /// Stage 8: peak RSS of `run` draining a large backlog, no-op sink.
    pub(super) async fn memory(&mut self) -> Result<()> {
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
            activity_event_processor::outbox::load::copy_events(&client, &events).await?;
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
}
