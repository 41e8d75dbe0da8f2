//! A whole pipeline under test: its own PostgreSQL database with the outbox,
//! its own MongoDB database, and the real binary run against both.

use super::mongo::TestMongo;
use super::TestDb;
use activity_event_processor::decode::{decode_text_row, OutboxEvent};
use activity_event_processor::outbox::load::copy_events;
use activity_event_processor::projection::fold::{ReadModels, ReferenceFold};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Stage {
    pub pg: TestDb,
    pub mongo: TestMongo,
    pub slot: String,
    /// The processes' log files (`log_path` and its siblings), removed with the stage.
    logs: tempfile::TempDir,
}

impl Stage {
    pub async fn new() -> Stage {
        Self::assemble(TestDb::migrated().await, TestMongo::create().await)
    }

    /// A stage on a private set of services (for tests that crash a server).
    pub async fn on(services: &super::services::OwnServices) -> Stage {
        let admin = super::postgres_config_at(
            &services.get("POSTGRES_HOST"),
            &services.get("POSTGRES_PORT"),
            "postgres",
        );
        let pg = TestDb::migrate(TestDb::create_on(admin).await).await;
        let mongo = TestMongo::create_at(&services.get("MONGODB_URI")).await;
        Self::assemble(pg, mongo)
    }

    /// A stage whose PostgreSQL is a private one (for tests that stop it)
    /// and whose MongoDB is the shared one.
    pub async fn on_postgres(services: &super::services::OwnServices) -> Stage {
        let admin = super::postgres_config_at(
            &services.get("POSTGRES_HOST"),
            &services.get("POSTGRES_PORT"),
            "postgres",
        );
        let pg = TestDb::migrate(TestDb::create_on(admin).await).await;
        Self::assemble(pg, TestMongo::create().await)
    }

    fn assemble(pg: TestDb, mongo: TestMongo) -> Stage {
        let slot = format!("aep_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let logs = tempfile::Builder::new()
            .prefix(&format!("{}-", mongo.name))
            .tempdir()
            .expect("a folder for the logs");
        Stage {
            pg,
            mongo,
            slot,
            logs,
        }
    }

    pub async fn load(&self, events: &[OutboxEvent]) {
        let client = self.pg.client().await;
        copy_events(&client, events).await.expect("copy events");
    }

    pub fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = self.pg.env();
        env.push(("MONGODB_URI", self.mongo.uri.clone()));
        env.push(("MONGODB_DB", self.mongo.name.clone()));
        env.push(("REPLICATION_SLOT", self.slot.clone()));
        env.push(("PUBLICATION", self.slot.clone()));
        env.push(("POLL_LEASE", "10s".into()));
        env.push(("BATCH_SIZE", "200".into()));
        env.push(("POLL_INTERVAL", "50ms".into()));
        env.push(("RETRY_BACKOFF_MAX", "1s".into()));
        env.push(("LOG_LEVEL", "warn".into()));
        env
    }

    /// [`Stage::env`] with the Kafka settings for `topic` (a fresh group)
    /// and the log at `info`.
    pub fn kafka_env(&self, topic: &str) -> Vec<(&'static str, String)> {
        let mut env = self.env();
        env.extend(super::kafka::kafka_env(
            topic,
            &super::kafka::fresh("group"),
        ));
        env.push(("LOG_LEVEL", "info".into()));
        env
    }

    /// The outbox as it now stands, every row whatever its status, in
    /// `sequence_id` order (what the reference fold takes).
    pub async fn outbox_events(&self) -> Vec<OutboxEvent> {
        let rows = self
            .pg
            .client()
            .await
            .query(
                "SELECT event_id::text, sequence_id::text, aggregate_id::text, aggregate_type,
                        event_type, payload::text, created_at::text
                 FROM event_outbox ORDER BY event_outbox.sequence_id",
                &[],
            )
            .await
            .expect("read the outbox");
        let names = activity_event_processor::source::replication::EVENT_COLUMNS;
        rows.iter()
            .map(|row| {
                let columns: Vec<(&str, Option<&str>)> = names
                    .iter()
                    .enumerate()
                    .map(|(i, name)| (*name, row.get::<_, Option<&str>>(i)))
                    .collect();
                decode_text_row(&columns).expect("an outbox row decodes")
            })
            .collect()
    }

    /// Runs `event-processor <args>` against this stage (with `extra`
    /// variables added) and waits for it.
    pub fn command(&self, args: &[&str], extra: &[(&'static str, String)]) -> std::process::Output {
        let mut env = self.env();
        env.extend(extra.iter().cloned());
        super::run_binary(args, &env)
    }

    /// `event-processor verify` finds the read models equal to the fold of
    /// the outbox (exit 0).
    pub fn assert_verified(&self) {
        let verified = self.command(&["verify"], &[]);
        assert_eq!(
            verified.status.code(),
            Some(0),
            "verify: {}",
            String::from_utf8_lossy(&verified.stdout)
        );
    }

    /// Starts `event-processor run <args>` in the background; its log goes to
    /// a file (a pipe nobody reads would fill up and stall it).
    pub fn spawn(&self, args: &[&str], extra: &[(&'static str, String)]) -> Child {
        let mut command = Command::new(binary());
        command.arg("run").args(args).env_clear();
        for key in ["PATH", "HOME"] {
            if let Ok(value) = std::env::var(key) {
                command.env(key, value);
            }
        }
        // Tests run in parallel: the metrics server takes a free port.
        command.env("METRICS_ADDR", "127.0.0.1:0");
        for (key, value) in self.env().into_iter().chain(extra.iter().cloned()) {
            command.env(key, value);
        }
        command
            .current_dir(std::env::temp_dir())
            .stdout(Stdio::null())
            .stderr(self.log_file())
            .spawn()
            .expect("spawn event-processor run")
    }

    pub fn log_path(&self) -> std::path::PathBuf {
        self.logs.path().join("run.log")
    }

    fn log_file(&self) -> Stdio {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        Stdio::from(file)
    }

    /// The last lines the processes of this stage logged.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// `run --until-caught-up <args>`, which must exit 0 within `limit`.
    pub fn run_until_caught_up(
        &self,
        args: &[&str],
        extra: &[(&'static str, String)],
        limit: Duration,
    ) {
        let mut all = vec!["--until-caught-up"];
        all.extend_from_slice(args);
        let child = self.spawn(&all, extra);
        let status = wait_with_timeout(child, limit, self);
        assert!(
            status.success(),
            "run {all:?} failed: {status}\n{}",
            self.log_tail()
        );
    }

    /// Waits until the read models equal the fold of `history` (or panics).
    pub async fn wait_converged(&self, history: &[OutboxEvent], limit: Duration) {
        let expected = ReferenceFold::of(history).read_models();
        let start = Instant::now();
        loop {
            if self.mongo.read_models().await == expected {
                return;
            }
            assert!(
                start.elapsed() < limit,
                "no convergence within {limit:?}\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The read models equal the fold, and every outbox row is finished:
    /// processed, or failed exactly when the fold dead-letters it.
    pub async fn assert_converged(&self, history: &[OutboxEvent], check_outbox: bool) {
        self.assert_read_models(&ReferenceFold::of(history).read_models(), check_outbox)
            .await;
    }

    /// As [`Stage::assert_converged`], against given read models.
    pub async fn assert_read_models(&self, expected: &ReadModels, check_outbox: bool) {
        let actual = self.mongo.read_models().await;
        assert_eq!(
            actual.dead_letters.len(),
            expected.dead_letters.len(),
            "dead letter count"
        );
        assert_eq!(actual.dead_letters, expected.dead_letters, "dead letters");
        assert_eq!(
            actual.activities.len(),
            expected.activities.len(),
            "activity count"
        );
        for (id, doc) in &expected.activities {
            assert_eq!(actual.activities.get(id), Some(doc), "activity {id}");
        }
        assert_eq!(actual.users.len(), expected.users.len(), "user count");
        for (id, doc) in &expected.users {
            assert_eq!(actual.users.get(id), Some(doc), "user {id}");
        }
        if check_outbox {
            let client = self.pg.client().await;
            let rows = client
                .query("SELECT event_id::text, status FROM event_outbox", &[])
                .await
                .expect("outbox");
            let mut failed = std::collections::BTreeSet::new();
            for row in &rows {
                let status: String = row.get(1);
                assert!(
                    status == "processed" || status == "failed",
                    "row {} is {status}",
                    row.get::<_, String>(0)
                );
                if status == "failed" {
                    failed.insert(row.get::<_, String>(0));
                }
            }
            assert_eq!(
                failed, expected.dead_letters,
                "failed rows are the dead letters"
            );
        }
    }
}

/// The binary under test: this build's, or `EVENT_PROCESSOR_BIN` (to run a
/// test against another build, e.g. an earlier commit's).
pub fn binary() -> String {
    std::env::var("EVENT_PROCESSOR_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_event-processor").to_string())
}

pub fn wait_with_timeout(
    mut child: Child,
    limit: Duration,
    stage: &Stage,
) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        match child.try_wait().expect("wait") {
            Some(status) => return status,
            None if start.elapsed() > limit => {
                kill_9(&mut child);
                panic!(
                    "event-processor did not finish within {limit:?}\n{}",
                    stage.log_tail()
                );
            }
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Waits for a child the test still owns.
pub fn wait_with_timeout_child(
    child: &mut Child,
    limit: Duration,
    stage: &Stage,
) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if start.elapsed() > limit {
            kill_9(child);
            panic!(
                "event-processor did not exit within {limit:?}\n{}",
                stage.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGKILL: no chance to finish anything.
pub fn kill_9(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}
