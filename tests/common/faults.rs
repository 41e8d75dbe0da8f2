//! Shared by the network-fault tests: processes with logs of their own, a
//! writer that loads a history slowly, the fault schedule played on a proxy,
//! and a watch on who owns a slot and who streams it, sampled from
//! PostgreSQL.

#![allow(dead_code)]

use super::kafka::{self, Proc};
use super::pipeline::Stage;
use super::proxy::{Mode, Proxy};
use activity_event_processor::config::PostgresConfig;
use activity_event_processor::decode::OutboxEvent;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// `event-processor run <args>` with the stage's environment and `extra`,
/// logging at info level to a file of its own.
pub fn spawn_run(
    stage: &Stage,
    args: &[&str],
    extra: &[(&'static str, String)],
    log: &Path,
) -> Proc {
    let mut all = vec!["run"];
    all.extend_from_slice(args);
    let mut env = stage.env();
    env.push(("LOG_LEVEL", "info".into()));
    env.extend(extra.iter().cloned());
    kafka::spawn(&all, &env, log)
}

/// A log file of this stage's own, named `<stage>.<name>.log`.
pub fn log_path(stage: &Stage, name: &str) -> PathBuf {
    stage.log_path().with_extension(format!("{name}.log"))
}

/// Loads `history` in chunks of `chunk` rows every `pause`, as a write side does.
pub async fn write_slowly(stage: &Stage, history: &[OutboxEvent], chunk: usize, pause: Duration) {
    for part in history.chunks(chunk) {
        stage.load(part).await;
        tokio::time::sleep(pause).await;
    }
}

/// `write_slowly` for a database that restarts meanwhile: a chunk whose
/// write fails is written again, all but the rows that did commit. Its
/// connections are named `aep-test-writer`.
pub async fn write_through_restarts(
    stage: &Stage,
    history: &[OutboxEvent],
    chunk: usize,
    pause: Duration,
) {
    use activity_event_processor::outbox::{self, load::copy_events};
    for part in history.chunks(chunk) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(client) = outbox::connect(&stage.pg.config).await {
                // Told apart from the processor's connections (a test may
                // terminate those).
                let _ = client
                    .batch_execute("SET application_name = 'aep-test-writer'")
                    .await;
                let ids: Vec<uuid::Uuid> = part.iter().map(|e| e.event_id).collect();
                let written = client
                    .query(
                        "SELECT event_id FROM event_outbox WHERE event_id = ANY($1)",
                        &[&ids],
                    )
                    .await;
                if let Ok(rows) = written {
                    let done: std::collections::HashSet<uuid::Uuid> =
                        rows.iter().map(|r| r.get(0)).collect();
                    let missing: Vec<OutboxEvent> = part
                        .iter()
                        .filter(|e| !done.contains(&e.event_id))
                        .cloned()
                        .collect();
                    if missing.is_empty() || copy_events(&client, &missing).await.is_ok() {
                        break;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "cannot write to PostgreSQL for 60 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(pause).await;
    }
}

/// Plays the fault schedule of the capture tests on `proxy`: 50 ms of
/// latency for 3 s, two resets 2 s apart, a 5 s blackhole, then pass.
pub async fn play_faults(proxy: &Proxy, what: &str) {
    let start = Instant::now();
    let step = |mode: Mode| {
        eprintln!("{what}: {mode:?} at {:?}", start.elapsed());
        proxy.set(mode);
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    step(Mode::Latency(Duration::from_millis(50)));
    tokio::time::sleep(Duration::from_secs(3)).await;
    step(Mode::Pass);
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        step(Mode::Reset);
        tokio::time::sleep(Duration::from_millis(300)).await;
        step(Mode::Pass);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    step(Mode::Blackhole);
    tokio::time::sleep(Duration::from_secs(5)).await;
    step(Mode::Pass);
}

/// Rows of the outbox in each status.
pub async fn statuses(stage: &Stage) -> Vec<(String, i64)> {
    stage
        .pg
        .client()
        .await
        .query(
            "SELECT status, count(*) FROM event_outbox GROUP BY status ORDER BY status",
            &[],
        )
        .await
        .expect("statuses")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// Waits until every outbox row is `processed` or `failed`.
pub async fn wait_finished(stage: &Stage, limit: Duration, log: &Path) {
    let start = Instant::now();
    loop {
        let now = statuses(stage).await;
        if now
            .iter()
            .all(|(status, _)| status == "processed" || status == "failed")
        {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "rows still unfinished after {limit:?}: {now:?}\n{}",
            kafka::tail(log)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until `log` has a line containing `text` (after `skip` lines).
pub async fn wait_for_line(log: &Path, text: &str, skip: usize, limit: Duration) -> String {
    let start = Instant::now();
    loop {
        let all = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = all.lines().skip(skip).find(|l| l.contains(text)) {
            return line.to_string();
        }
        assert!(
            start.elapsed() < limit,
            "no `{text}` in the log within {limit:?}\n{}",
            kafka::tail(log)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Lines in `log` now (to look only at what comes after).
pub fn line_count(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .count()
}

/// The lines of `log` after the first `skip` that contain `text`.
pub fn lines_with(log: &Path, text: &str, skip: usize) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .skip(skip)
        .filter(|l| l.contains(text))
        .map(str::to_string)
        .collect()
}

/// When a log line was written (its leading RFC 3339 time stamp).
pub fn logged_at(line: &str) -> chrono::DateTime<chrono::Utc> {
    line.split_whitespace()
        .next()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&chrono::Utc))
        .unwrap_or_else(|| panic!("no time stamp in `{line}`"))
}

/// One look at a slot: which process holds its ownership lock and which
/// streams it (`None`: nobody; `"?"`: a connection of nobody we know).
#[derive(Debug, Clone)]
pub struct Sample {
    pub at: Instant,
    pub holder: Option<String>,
    pub streamer: Option<String>,
}

/// Samples who owns and who streams a slot every 100 ms. Each process is
/// told apart by the client ports of its connections: those of a process
/// connected through a proxy are that proxy's upstream ports; `direct` names
/// the one process (if any) that connects without a proxy.
pub struct OwnershipWatch {
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl OwnershipWatch {
    pub fn start(
        pg: PostgresConfig,
        slot: &str,
        proxies: Vec<(&'static str, Arc<Proxy>)>,
        direct: Option<&'static str>,
    ) -> OwnershipWatch {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let task = tokio::spawn(watch(
            pg,
            slot.to_string(),
            proxies,
            direct,
            samples.clone(),
            stop.clone(),
        ));
        OwnershipWatch {
            samples,
            stop,
            task,
        }
    }

    pub fn samples(&self) -> Vec<Sample> {
        self.samples.lock().expect("samples").clone()
    }

    /// The first sample at or after `from` for which `test` holds.
    pub async fn wait_for(
        &self,
        what: &str,
        from: Instant,
        limit: Duration,
        test: impl Fn(&Sample) -> bool,
    ) -> Sample {
        loop {
            if let Some(found) = self.samples().into_iter().find(|s| s.at >= from && test(s)) {
                return found;
            }
            assert!(
                from.elapsed() < limit,
                "never within {limit:?}: {what}; last samples: {:?}",
                self.samples().iter().rev().take(5).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn stop(self) -> Vec<Sample> {
        self.stop.cancel();
        let _ = self.task.await;
        let samples = self.samples.lock().expect("samples").clone();
        samples
    }
}

async fn watch(
    pg: PostgresConfig,
    slot: String,
    proxies: Vec<(&'static str, Arc<Proxy>)>,
    direct: Option<&'static str>,
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: CancellationToken,
) {
    let mut client = None;
    while !stop.is_cancelled() {
        if client.is_none() {
            // PostgreSQL may be restarting: try again on the next round.
            if let Ok((c, connection)) = pg.to_client_config().connect(tokio_postgres::NoTls).await
            {
                tokio::spawn(connection);
                client = Some(c);
            }
        }
        if let Some(c) = &client {
            let row = c
                .query_one(
                    "SELECT \
                       (SELECT a.client_port FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                        WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
                          AND l.classid = hashtext('activity-event-processor:slot')::oid \
                          AND l.objid = hashtext($1)::oid LIMIT 1), \
                       (SELECT a.client_port FROM pg_replication_slots s \
                        JOIN pg_stat_activity a ON a.pid = s.active_pid WHERE s.slot_name = $1)",
                    &[&slot],
                )
                .await;
            match row {
                Ok(row) => {
                    let name = |port: Option<i32>| {
                        let port = u16::try_from(port?).ok()?;
                        let known = proxies
                            .iter()
                            .find(|(_, proxy)| proxy.upstream_ports().contains(&port))
                            .map(|(name, _)| name.to_string());
                        Some(known.or(direct.map(str::to_string)).unwrap_or("?".into()))
                    };
                    let sample = Sample {
                        at: Instant::now(),
                        holder: name(row.get(0)),
                        streamer: name(row.get(1)),
                    };
                    samples.lock().expect("samples").push(sample);
                }
                Err(_) => client = None,
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// The longest stretch of samples in which some process streamed the slot
/// while another process (or nobody) held its ownership lock.
pub fn longest_unowned_streaming(samples: &[Sample]) -> Duration {
    let mut longest = Duration::ZERO;
    let mut since: Option<Instant> = None;
    for sample in samples {
        let unowned = sample.streamer.is_some() && sample.streamer != sample.holder;
        match (unowned, since) {
            (true, None) => since = Some(sample.at),
            (true, Some(start)) => longest = longest.max(sample.at - start),
            (false, _) => since = None,
        }
    }
    longest
}

/// Every process seen streaming the slot in `samples`.
pub fn streamers(samples: &[Sample]) -> std::collections::BTreeSet<String> {
    samples.iter().filter_map(|s| s.streamer.clone()).collect()
}

/// Waits until the read models equal the fold of `history`, failing at once
/// if `process` exits meanwhile.
pub async fn wait_converged_alive(
    stage: &Stage,
    history: &[OutboxEvent],
    process: &mut Proc,
    log: &Path,
    limit: Duration,
) {
    let expected =
        activity_event_processor::projection::fold::ReferenceFold::of(history).read_models();
    let start = Instant::now();
    loop {
        if stage.mongo.read_models().await == expected {
            return;
        }
        if let Some(status) = process.0.try_wait().expect("wait") {
            panic!("the process exited ({status})\n{}", kafka::tail(log));
        }
        assert!(
            start.elapsed() < limit,
            "no convergence within {limit:?}\n{}",
            kafka::tail(log)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// SIGTERM, and the process must exit 0 within 30 s.
pub fn stop_gracefully(process: &mut Proc, log: &Path) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &process.0.id().to_string()])
        .status();
    let start = Instant::now();
    loop {
        if let Some(status) = process.0.try_wait().expect("wait") {
            assert_eq!(
                status.code(),
                Some(0),
                "graceful exit\n{}",
                kafka::tail(log)
            );
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no exit within 30 s of SIGTERM\n{}",
            kafka::tail(log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The slot's confirmed position, if the slot exists yet.
pub async fn confirmed_flush(stage: &Stage, slot: &str) -> Option<u64> {
    let row = stage
        .pg
        .client()
        .await
        .query_opt(
            "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("slot query")?;
    row.get::<_, Option<tokio_postgres::types::PgLsn>>(0)
        .map(u64::from)
}

/// The position MongoDB durably holds for `slot` (the processor's checkpoint).
pub async fn mongo_checkpoint(stage: &Stage, slot: &str) -> Option<u64> {
    let docs = stage
        .mongo
        .store
        .find(
            "processor_checkpoints",
            mongodb::bson::doc! { "_id": slot },
            None,
        )
        .await
        .expect("checkpoint");
    docs.first()
        .and_then(|d| d.get_i64("lsn").ok())
        .map(|l| l as u64)
}
