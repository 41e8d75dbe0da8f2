//! The crash matrix: every named crash point (`activity_event_processor::failpoint`)
//! under every workload that passes through it. Each scenario loads a
//! generated history, starts the processes with one crash point armed
//! (`FAILPOINTS=<name>=2*off->return`: it passes twice and aborts the process
//! at the third pass, after some progress; the Kafka commit points at the
//! second), checks that the process died by that abort, restarts it without
//! crash points, and compares the read models with the reference fold.
//!
//! Workloads: replication (`run`), polling with two workers (`run --source
//! polling --workers 2`), and Kafka (`relay` and two `run --source kafka` in
//! one consumer group; the crash point is armed in the relay or in one
//! consumer). The three run side by side, the scenarios of one workload one
//! after the other; a table of every scenario is printed at the end. A crash
//! point that no workload reaches fails the test.
//!
//! Needs the `failpoints` feature (`cargo test --features failpoints --test
//! fault_matrix`, as scripts/test.sh runs it); without it the test fails.

#[cfg(not(feature = "failpoints"))]
#[test]
fn the_crash_matrix_needs_the_failpoints_feature() {
    panic!(
        "tests/fault_matrix.rs needs the crash points, which only a build with the `failpoints` \
         feature has: run it with\n    cargo test --features failpoints --test fault_matrix\n\
         (scripts/test.sh runs every test with --features failpoints)"
    );
}

#[cfg(feature = "failpoints")]
mod common;

#[cfg(feature = "failpoints")]
mod matrix {
    use super::common::crash::{self, spawn};
    use super::common::kafka::{self, Proc, Slots};
    use super::common::pipeline::Stage;
    use activity_event_history::{generate, HistoryOptions};
    use activity_event_processor::checkpoint::CHECKPOINTS;
    use activity_event_processor::decode::OutboxEvent;
    use activity_event_processor::failpoint::{self as fp, ALL};
    use mongodb::bson::doc;
    use std::io::Write;
    use std::path::{Path, PathBuf};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    /// Events per scenario, and per batch.
    const EVENTS: usize = 300;
    const BATCH_SIZE: &str = "20";
    /// Passes of an armed crash point before it aborts the process: two
    /// (a batch or two is done first), but one for the Kafka source's commit:
    /// a deferred event holds its partition's commit back while it waits, so
    /// a consumer may commit only twice in a scenario.
    fn passes(point: &str) -> u32 {
        if point.starts_with("kafka.") {
            1
        } else {
            2
        }
    }
    /// The longest wait for the armed crash point to abort the process.
    const CRASH_LIMIT: Duration = Duration::from_secs(90);
    /// The longest wait for convergence after the restart.
    const CONVERGE_LIMIT: Duration = Duration::from_secs(180);

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Workload {
        Replication,
        Polling,
        Kafka,
    }

    impl Workload {
        fn name(self) -> &'static str {
            match self {
                Workload::Replication => "replication",
                Workload::Polling => "polling x2",
                Workload::Kafka => "kafka x2",
            }
        }

        /// The crash points a batch of this workload passes.
        fn crash_points(self) -> &'static [&'static str] {
            const COMMON: [&str; 6] = [
                fp::PIPELINE_AFTER_DECODE,
                fp::PIPELINE_BEFORE_SINK_WRITE,
                fp::PROJECTION_AFTER_OWN_WRITES,
                fp::PIPELINE_AFTER_SINK_WRITE,
                fp::PIPELINE_BEFORE_SOURCE_ACK,
                fp::PIPELINE_AFTER_SOURCE_ACK,
            ];
            match self {
                Workload::Replication => &[
                    fp::PIPELINE_AFTER_DECODE,
                    fp::PIPELINE_BEFORE_SINK_WRITE,
                    fp::PROJECTION_AFTER_OWN_WRITES,
                    fp::PIPELINE_AFTER_SINK_WRITE,
                    fp::PIPELINE_AFTER_CHECKPOINT,
                    fp::PIPELINE_BEFORE_MARK_OUTBOX,
                    fp::PIPELINE_AFTER_MARK_OUTBOX,
                    fp::PIPELINE_BEFORE_SOURCE_ACK,
                    fp::PIPELINE_AFTER_SOURCE_ACK,
                ],
                Workload::Polling => &COMMON,
                Workload::Kafka => &[
                    fp::RELAY_BEFORE_DELIVERY,
                    fp::RELAY_AFTER_DELIVERY,
                    fp::RELAY_BEFORE_CAPTURE_ACK,
                    fp::RELAY_AFTER_CAPTURE_ACK,
                    fp::PIPELINE_AFTER_DECODE,
                    fp::PIPELINE_BEFORE_SINK_WRITE,
                    fp::PROJECTION_AFTER_OWN_WRITES,
                    fp::PIPELINE_AFTER_SINK_WRITE,
                    fp::PIPELINE_BEFORE_SOURCE_ACK,
                    fp::PIPELINE_AFTER_SOURCE_ACK,
                    fp::KAFKA_BEFORE_COMMIT,
                    fp::KAFKA_AFTER_COMMIT,
                ],
            }
        }
    }

    const WORKLOADS: [Workload; 3] = [Workload::Replication, Workload::Polling, Workload::Kafka];

    /// One line of the table.
    #[derive(Clone, Debug)]
    struct Row {
        point: &'static str,
        workload: Workload,
        crashed: bool,
        converged: bool,
        seconds: f64,
        /// What went wrong, if anything.
        problem: String,
    }

    type Shared = Arc<Mutex<Row>>;

    fn update(row: &Shared, change: impl FnOnce(&mut Row)) {
        let mut guard = row.lock().unwrap_or_else(|e| e.into_inner());
        change(&mut guard);
    }

    /// Waits for the armed process to abort at `point`; records the outcome.
    async fn expect_crash(child: &mut Proc, point: &str, log: &Path, row: &Shared) {
        let result = crash::aborted_at(child, point, log, CRASH_LIMIT).await;
        let problem = match &result {
            Ok(()) => String::new(),
            Err(err) => format!("{err} (armed to abort at pass {})", passes(point) + 1),
        };
        update(row, |r| {
            r.crashed = result.is_ok();
            r.problem = problem.clone();
        });
        assert!(result.is_ok(), "{problem}\n{}", kafka::tail(log));
    }

    fn armed(env: &[(&'static str, String)], point: &str) -> Vec<(&'static str, String)> {
        crash::armed(env, point, passes(point))
    }

    /// Loads `history` in chunks, a pause between them, as a write side does.
    async fn write_in_chunks(stage: &Stage, history: &[OutboxEvent], chunk: usize) {
        for part in history.chunks(chunk) {
            stage.load(part).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// `run --until-caught-up <args>` without crash points, which must exit 0.
    async fn run_until_caught_up(stage: &Stage, args: &[&str], env: &[(&'static str, String)]) {
        crash::run_until_caught_up(args, env, &stage.log_path(), CONVERGE_LIMIT).await;
    }

    fn base_env(stage: &Stage) -> Vec<(&'static str, String)> {
        let mut env = stage.env();
        env.push(("BATCH_SIZE", BATCH_SIZE.into()));
        env
    }

    /// `run` (replication): the crash comes while rows stream in; the
    /// restart runs until caught up (the stuck-row sweep included), and every
    /// outbox row must be finished.
    async fn replication(point: &'static str, seed: u64, row: Shared) {
        let stage = Stage::new().await;
        let _slots = Slots(stage.pg.config.clone());
        let history = generate(seed, &HistoryOptions::realistic(EVENTS));
        let env = base_env(&stage);
        let crash_log = stage.log_path().with_extension("crash.log");
        let with_point = armed(&env, point);
        let mut child = spawn(&["run"], &with_point, &crash_log);
        // The empty snapshot is the first pass; the rows come while it streams.
        wait_checkpoint(&stage, &crash_log).await;
        write_in_chunks(&stage, &history, 50).await;
        expect_crash(&mut child, point, &crash_log, &row).await;
        run_until_caught_up(&stage, &[], &env).await;
        stage.assert_converged(&history, true).await;
        cleanup(&stage, &[crash_log]);
    }

    /// Waits until the replication checkpoint exists: the slot's (empty)
    /// snapshot is applied and the process streams.
    async fn wait_checkpoint(stage: &Stage, log: &Path) {
        let start = Instant::now();
        loop {
            let found = stage
                .mongo
                .store
                .find(CHECKPOINTS, doc! { "_id": &stage.slot }, None)
                .await
                .expect("read the checkpoint");
            if !found.is_empty() {
                return;
            }
            assert!(
                start.elapsed() < CRASH_LIMIT,
                "no checkpoint within {CRASH_LIMIT:?}\n{}",
                kafka::tail(log)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `run --source polling --workers 2`, the history there from the start;
    /// short leases, so that the dead process's claims are taken over soon.
    async fn polling(point: &'static str, seed: u64, row: Shared) {
        let stage = Stage::new().await;
        let history = generate(seed, &HistoryOptions::realistic(EVENTS));
        stage.load(&history).await;
        let mut env = base_env(&stage);
        env.push(("POLL_LEASE", "3s".into()));
        let crash_log = stage.log_path().with_extension("crash.log");
        let with_point = armed(&env, point);
        let args = ["run", "--source", "polling", "--workers", "2"];
        let mut child = spawn(&args, &with_point, &crash_log);
        expect_crash(&mut child, point, &crash_log, &row).await;
        run_until_caught_up(&stage, &args[1..], &env).await;
        stage.assert_converged(&history, true).await;
        cleanup(&stage, &[crash_log]);
    }

    /// `relay` and two `run --source kafka` in one group on a 2-partition
    /// topic; half the history is there before the relay starts (its initial
    /// snapshot), half comes while it streams. The crash point is armed in the
    /// relay (`relay.*`) or in the first consumer; the crashed process is
    /// started again, and the read models must converge with every row
    /// published.
    async fn kafka_group(point: &'static str, seed: u64, row: Shared) {
        let stage = Stage::new().await;
        let _slots = Slots(stage.pg.config.clone());
        let topic = kafka::fresh("matrix");
        kafka::create_topic(&topic, 2).await;
        let mut env = base_env(&stage);
        env.extend(kafka::kafka_env(&topic, &kafka::fresh("group")));
        let history = generate(seed, &HistoryOptions::realistic(EVENTS));
        let (before, after) = history.split_at(EVENTS / 2);
        stage.load(before).await;
        let log = stage.log_path();
        let crash_log = log.with_extension("crash.log");
        let with_point = armed(&env, point);
        let in_relay = point.starts_with("relay.");
        let consume = ["run", "--source", "kafka"];
        let (relay_env, a_env) = if in_relay {
            (&with_point, &env)
        } else {
            (&env, &with_point)
        };
        let relay_log = if in_relay { &crash_log } else { &log };
        let a_log = if in_relay { &log } else { &crash_log };
        let mut relay = spawn(&["relay"], relay_env, relay_log);
        let mut a = spawn(&consume, a_env, a_log);
        let b = spawn(&consume, &env, &log);
        write_in_chunks(&stage, after, 50).await;
        let crashed = if in_relay { &mut relay } else { &mut a };
        expect_crash(crashed, point, &crash_log, &row).await;
        *crashed = if in_relay {
            spawn(&["relay"], &env, &log)
        } else {
            spawn(&consume, &env, &log)
        };
        stage.wait_converged(&history, CONVERGE_LIMIT).await;
        wait_published(&stage, history.len()).await;
        stage.assert_converged(&history, false).await;
        drop((relay, a, b));
        cleanup(&stage, &[crash_log]);
    }

    /// Every outbox row is `processed`: the relay published the whole outbox.
    async fn wait_published(stage: &Stage, rows: usize) {
        let start = Instant::now();
        let client = stage.pg.client().await;
        loop {
            let done: i64 = client
                .query_one(
                    "SELECT count(*) FROM event_outbox WHERE status = 'processed'",
                    &[],
                )
                .await
                .expect("count processed")
                .get(0);
            if done == rows as i64 {
                return;
            }
            assert!(
                start.elapsed() < CONVERGE_LIMIT,
                "the relay published {done} of {rows} rows\n{}",
                stage.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn cleanup(stage: &Stage, extra: &[PathBuf]) {
        let _ = std::fs::remove_file(stage.log_path());
        for path in extra {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Runs one scenario; a panic in it becomes the row's problem.
    async fn scenario(workload: Workload, point: &'static str, seed: u64) -> Row {
        let row = Arc::new(Mutex::new(Row {
            point,
            workload,
            crashed: false,
            converged: false,
            seconds: 0.0,
            problem: String::new(),
        }));
        let start = Instant::now();
        let shared = row.clone();
        let result = tokio::spawn(async move {
            match workload {
                Workload::Replication => replication(point, seed, shared).await,
                Workload::Polling => polling(point, seed, shared).await,
                Workload::Kafka => kafka_group(point, seed, shared).await,
            }
        })
        .await;
        let mut row = row.lock().unwrap_or_else(|e| e.into_inner()).clone();
        row.seconds = start.elapsed().as_secs_f64();
        match result {
            Ok(()) => row.converged = true,
            Err(err) if row.problem.is_empty() => {
                row.problem = match err.try_into_panic() {
                    Ok(panic) => panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "panicked".into()),
                    Err(err) => err.to_string(),
                };
            }
            Err(_) => {}
        }
        row
    }

    fn yes(flag: bool) -> &'static str {
        if flag {
            "yes"
        } else {
            "NO"
        }
    }

    fn table(rows: &[Row], total: Duration) -> String {
        let mut out = format!(
            "\ncrash matrix: each point armed with `<point>=<N-1>*off->return` (abort at pass N), \
             restarted without, compared with the reference fold\n\
             {:<28} {:<12} {:>4} {:<8} {:<10} {:>7}\n",
            "crash point", "workload", "pass", "crashed", "converged", "seconds"
        );
        for row in rows {
            out.push_str(&format!(
                "{:<28} {:<12} {:>4} {:<8} {:<10} {:>7.1}\n",
                row.point,
                row.workload.name(),
                passes(row.point) + 1,
                yes(row.crashed),
                yes(row.converged),
                row.seconds
            ));
        }
        out.push_str(&format!(
            "{} scenarios in {:.0} s\n",
            rows.len(),
            total.as_secs_f64()
        ));
        for row in rows.iter().filter(|r| !r.problem.is_empty()) {
            out.push_str(&format!(
                "\n{} under {}: {}\n",
                row.point,
                row.workload.name(),
                row.problem
            ));
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn every_crash_point_under_every_workload_converges_after_a_restart() {
        for (point, _) in ALL {
            assert!(
                WORKLOADS.iter().any(|w| w.crash_points().contains(&point)),
                "crash point {point} is in no workload of the matrix"
            );
        }
        // FAULT_MATRIX=<text>: only the scenarios whose crash point or
        // workload contains it (to run one by hand).
        let only = std::env::var("FAULT_MATRIX").unwrap_or_default();
        let chosen = |workload: Workload, point: &str| {
            only.is_empty() || point.contains(&only) || workload.name().contains(&only)
        };
        let start = Instant::now();
        let mut tasks = Vec::new();
        for (index, workload) in WORKLOADS.into_iter().enumerate() {
            let points: Vec<(usize, &'static str)> = (workload.crash_points().iter().copied())
                .enumerate()
                .filter(|(_, point)| chosen(workload, point))
                .collect();
            tasks.push(tokio::spawn(async move {
                let mut rows = Vec::new();
                for (n, point) in points {
                    let seed = 1_000 * index as u64 + n as u64;
                    rows.push(scenario(workload, point, seed).await);
                }
                rows
            }));
        }
        let mut rows = Vec::new();
        for task in tasks {
            rows.extend(task.await.expect("workload task"));
        }
        // Not through the test harness's capture: the table is the report.
        let report = table(&rows, start.elapsed());
        let _ = std::io::stderr().lock().write_all(report.as_bytes());
        let unreached: Vec<&str> = ALL
            .iter()
            .map(|(point, _)| *point)
            .filter(|point| WORKLOADS.iter().any(|w| chosen(*w, point)))
            .filter(|point| !rows.iter().any(|r| r.point == *point && r.crashed))
            .collect();
        assert!(
            unreached.is_empty(),
            "crash points no workload reached: {unreached:?}"
        );
        let failed: Vec<String> = rows
            .iter()
            .filter(|r| !(r.crashed && r.converged))
            .map(|r| format!("{} under {}", r.point, r.workload.name()))
            .collect();
        assert!(failed.is_empty(), "scenarios that failed: {failed:?}");
    }
}
