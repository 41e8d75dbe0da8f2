//! Shared test fixtures: real services started by `scripts/services.sh`.
//!
//! Every test gets its own database, created here and dropped afterwards. A
//! missing service fails the test loudly with the command that starts it.

#![allow(dead_code)]

use activity_event_processor::config::{PostgresConfig, Secret};
use std::time::Duration;
use tokio_postgres::{Client, NoTls};

pub const START_SERVICES: &str = "eval \"$(scripts/services.sh up)\"";

fn required_env(key: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| {
        panic!(
            "{key} is not set: this test needs the real services. Start them with\n    {START_SERVICES}\n\
             (or run the whole suite with scripts/test.sh)"
        )
    })
}

/// The cluster the services script started, as a config for database `database`.
pub fn postgres_config(database: &str) -> PostgresConfig {
    postgres_config_at(
        &required_env("POSTGRES_HOST"),
        &required_env("POSTGRES_PORT"),
        database,
    )
}

pub fn postgres_config_at(host: &str, port: &str, database: &str) -> PostgresConfig {
    PostgresConfig {
        host: host.to_string(),
        port: port.parse().expect("POSTGRES_PORT is a number"),
        database: database.to_string(),
        user: std::env::var("POSTGRES_USER").unwrap_or_else(|_| "postgres".into()),
        password: Secret::new(std::env::var("POSTGRES_PASSWORD").unwrap_or_default()),
        connect_timeout: Duration::from_secs(10),
    }
}

pub async fn connect(config: &PostgresConfig) -> Client {
    let (client, connection) = config
        .to_client_config()
        .connect(NoTls)
        .await
        .unwrap_or_else(|err| {
            panic!(
                "cannot connect to PostgreSQL at {}: {err}\nstart the services with\n    {START_SERVICES}",
                config.display_target()
            )
        });
    tokio::spawn(connection);
    client
}

/// A fresh database of its own, dropped when the value is dropped.
pub struct TestDb {
    pub config: PostgresConfig,
    admin: PostgresConfig,
}

impl TestDb {
    pub async fn create() -> TestDb {
        Self::create_on(postgres_config("postgres")).await
    }

    /// A fresh database on the cluster `admin` points at.
    pub async fn create_on(admin: PostgresConfig) -> TestDb {
        let name = format!(
            "aep_test_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        connect(&admin)
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        let mut config = admin.clone();
        config.database = name;
        TestDb { config, admin }
    }

    pub async fn client(&self) -> Client {
        connect(&self.config).await
    }

    /// A fresh database with the migrations applied.
    pub async fn migrated() -> TestDb {
        Self::migrate(TestDb::create().await).await
    }

    pub async fn migrate(db: TestDb) -> TestDb {
        let mut client = db.client().await;
        activity_event_processor::outbox::migrate::apply(
            &mut client,
            activity_event_processor::outbox::migrate::MIGRATIONS,
        )
        .await
        .expect("migrations apply");
        db
    }

    /// The variables that point the binary at this database.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("POSTGRES_HOST", self.config.host.clone()),
            ("POSTGRES_PORT", self.config.port.to_string()),
            ("POSTGRES_DB", self.config.database.clone()),
            ("POSTGRES_USER", self.config.user.clone()),
            (
                "POSTGRES_PASSWORD",
                self.config.password.expose().to_string(),
            ),
        ]
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin = self.admin.clone();
        let name = self.config.database.clone();
        clean_up(async move {
            if let Ok((client, connection)) = admin.to_client_config().connect(NoTls).await {
                tokio::spawn(connection);
                // A database with a logical slot cannot be dropped; the slots
                // would also keep WAL forever.
                let _ = client
                    .execute(
                        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
                         WHERE database = $1 AND NOT active",
                        &[&name],
                    )
                    .await;
                let _ = client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await;
            }
        });
    }
}

/// Runs `cleanup` to its end from a `Drop`, which runs inside the test's
/// runtime: on a thread with a runtime of its own, waited for. On a
/// multi-thread runtime the wait must not hold this worker's other tasks
/// (`block_in_place`): the cleanup may wait on the server, and the server
/// on one of them (`DROP DATABASE` waits until every backend has taken its
/// barrier, and a backend inside a `COPY FROM STDIN` takes it only when its
/// client, perhaps a concurrent test's task, sends more).
pub fn clean_up(cleanup: impl std::future::Future<Output = ()> + Send + 'static) {
    let wait = move || {
        std::thread::spawn(move || {
            if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                runtime.block_on(cleanup);
            }
        })
        .join()
    };
    let _ = match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(wait)
        }
        _ => wait(),
    };
}

/// Runs the built binary with `env` added to a clean environment.
pub fn run_binary(args: &[&str], env: &[(&str, String)]) -> std::process::Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_event-processor"));
    command.args(args).env_clear();
    for key in ["PATH", "HOME"] {
        if let Ok(value) = std::env::var(key) {
            command.env(key, value);
        }
    }
    // Tests run in parallel: the metrics server takes a free port (`env` may say otherwise).
    command.env("METRICS_ADDR", "127.0.0.1:0");
    for (key, value) in env {
        command.env(key, value);
    }
    // No `.env` of the developer's may leak in.
    command.current_dir(std::env::temp_dir());
    command.output().expect("run event-processor")
}

pub mod console;
pub mod crash;
pub mod faults;
pub mod kafka;
pub mod letters;
pub mod mongo;
pub mod observe;
pub mod pipeline;
pub mod proxy;
pub mod replication;
pub mod services;
pub mod webdriver;
