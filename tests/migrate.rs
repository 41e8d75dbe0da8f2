//! `migrate`, `seed`, `status` and configuration errors, through the library and
//! the real binary, against a real PostgreSQL.

mod common;

use activity_event_processor::outbox::migrate::{self, MigrateError, Migration, MIGRATIONS};
use common::{run_binary, TestDb};

#[tokio::test]
async fn migrate_twice_applies_once() {
    let db = TestDb::create().await;
    let mut client = db.client().await;
    let first = migrate::apply(&mut client, MIGRATIONS)
        .await
        .expect("first");
    assert_eq!(first.applied, vec![1, 2]);
    let second = migrate::apply(&mut client, MIGRATIONS)
        .await
        .expect("second");
    assert!(second.applied.is_empty());
    assert_eq!(second.already, vec![1, 2]);
    let rows = client
        .query_one("SELECT count(*) FROM event_processor_migrations", &[])
        .await
        .expect("history");
    assert_eq!(rows.get::<_, i64>(0), MIGRATIONS.len() as i64);
}

#[tokio::test]
async fn concurrent_migrate_runs_take_turns() {
    let db = TestDb::create().await;
    let mut handles = Vec::new();
    for _ in 0..4 {
        let config = db.config.clone();
        handles.push(tokio::spawn(async move {
            let mut client = common::connect(&config).await;
            migrate::apply(&mut client, MIGRATIONS).await
        }));
    }
    let mut applied_total = 0;
    for handle in handles {
        let report = handle.await.expect("task").expect("migrate");
        applied_total += report.applied.len();
    }
    assert_eq!(
        applied_total,
        MIGRATIONS.len(),
        "each migration applied exactly once"
    );
}

#[tokio::test]
async fn edited_migration_is_refused() {
    let db = TestDb::migrated().await;
    let mut client = db.client().await;
    let mut edited: Vec<Migration> = MIGRATIONS.to_vec();
    edited[0].sql = "CREATE TABLE event_outbox (x int);";
    let err = migrate::apply(&mut client, &edited)
        .await
        .expect_err("checksum guard");
    assert!(
        matches!(err, MigrateError::ChecksumMismatch { version: 1, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("was edited"), "{err}");
    // The lock was released: the real list still applies cleanly.
    migrate::apply(&mut client, MIGRATIONS)
        .await
        .expect("unlocked");
}

#[tokio::test]
async fn unknown_applied_migration_is_refused() {
    let db = TestDb::migrated().await;
    let mut client = db.client().await;
    let err = migrate::apply(&mut client, &MIGRATIONS[..0])
        .await
        .expect_err("database is newer than the binary");
    assert!(
        matches!(err, MigrateError::UnknownApplied { version: 1, .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn failed_migration_leaves_nothing_behind() {
    let db = TestDb::create().await;
    let mut client = db.client().await;
    let broken = [Migration {
        version: 1,
        name: "broken",
        sql: "CREATE TABLE half_done (x int); SELECT no_such_function();",
    }];
    let err = migrate::apply(&mut client, &broken)
        .await
        .expect_err("fails");
    assert!(
        err.to_string().contains("migration 1 (broken) failed"),
        "{err}"
    );
    // The server's error is the cause, not repeated in the message.
    let cause = std::error::Error::source(&err).expect("the server's error");
    assert!(cause.to_string().contains("no_such_function"), "{cause}");
    assert!(!err.to_string().contains("no_such_function"), "{err}");
    let row = client
        .query_one("SELECT to_regclass('half_done') IS NULL", &[])
        .await
        .expect("query");
    assert!(
        row.get::<_, bool>(0),
        "the failed migration was rolled back"
    );
}

#[tokio::test]
async fn binary_migrates_seeds_and_reports_status() {
    let db = TestDb::create().await;
    let env = db.env();
    for expected in ["2 applied", "0 applied"] {
        let out = run_binary(&["migrate"], &env);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{out:?}");
        assert!(stdout.contains(expected), "{stdout}");
    }
    for _ in 0..2 {
        let out = run_binary(&["seed"], &env);
        assert!(out.status.success(), "{out:?}");
    }
    let out = run_binary(&["status", "--json"], &env);
    assert!(out.status.success(), "{out:?}");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(status["counts"]["pending"], 4);
    assert_eq!(status["total"], 4);
    assert_eq!(status["wal_level"], "logical");
    assert!(status["oldest_pending_age_seconds"].as_f64().expect("age") > 0.0);
    let out = run_binary(&["status"], &env);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("pending"), "{text}");
    assert!(text.contains("highest sequence_id: 4"), "{text}");
}

#[test]
fn unreachable_postgres_is_one_line_without_the_password() {
    let out = run_binary(
        &["status"],
        &[
            ("POSTGRES_HOST", "127.0.0.1".into()),
            ("POSTGRES_PORT", "1".into()),
            ("POSTGRES_PASSWORD", "s3cret-pw".into()),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot connect to PostgreSQL at 127.0.0.1:1/activity"),
        "{stderr}"
    );
    assert!(!stderr.contains("s3cret-pw"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

#[test]
fn broken_env_file_lists_every_problem_and_exits_2() {
    let dir = tempfile::tempdir().expect("temp folder");
    let path = dir.path().join("broken.env");
    std::fs::write(
        &path,
        "POSTGRES_PORT=not-a-port\nPOSTGRES_HOST=\nLOG_FORMAT=yaml\nPOSTGRES_PASWORD=x\n",
    )
    .expect("write");
    let path_arg = path.display().to_string();
    let out = run_binary(&["--env-file", &path_arg, "status"], &[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let problems: Vec<&str> = stderr.lines().skip(1).map(str::trim).collect();
    assert_eq!(
        problems,
        [
            "POSTGRES_PASWORD: unknown key; did you mean POSTGRES_PASSWORD?",
            "POSTGRES_HOST: must not be empty",
            "POSTGRES_PORT: `not-a-port` is not a port number (1-65535)",
            "LOG_FORMAT: `yaml` is not one of: text, json",
        ],
        "{stderr}"
    );
}

#[test]
fn flags_override_the_environment() {
    let out = run_binary(
        &["--postgres-port", "nope", "status"],
        &[("POSTGRES_PORT", "5432".into())],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`nope`"));
}

#[test]
fn a_bad_value_is_named_by_the_flag_or_the_key_that_gave_it() {
    let out = run_binary(&["run", "--workers", "0"], &[("POLL_WORKERS", "2".into())]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim_end(),
        "invalid configuration: --workers: `0` is not a positive whole number"
    );
    let out = run_binary(&["run"], &[("POLL_WORKERS", "0".into())]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim_end(),
        "invalid configuration: POLL_WORKERS: `0` is not a positive whole number"
    );
    let out = run_binary(
        &["relay", "--topic", "bad topic", "--batch-size", "0"],
        &[("RELAY_FORMAT", "xml".into())],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let problems: Vec<&str> = stderr.lines().skip(1).map(str::trim).collect();
    assert_eq!(
        problems,
        [
            "--batch-size: `0` is not a positive whole number",
            "--topic: `bad topic` is not a Kafka topic name (1-249 characters of a-z, A-Z, 0-9, '.', '_', '-')",
            "RELAY_FORMAT: `xml` is not one of: cdc, outbox",
        ],
        "{stderr}"
    );
}

#[test]
fn a_malformed_mongodb_uri_is_a_configuration_error_before_any_connection() {
    for (uri, shown) in [
        (
            "[bad",
            "`[bad` must start with mongodb:// or mongodb+srv://",
        ),
        (
            "mongodb://app:s3cret-pw@[bad",
            "`mongodb://***@[bad` is not a valid connection string",
        ),
    ] {
        // PostgreSQL unreachable: a connection attempt would end with 1.
        let out = run_binary(
            &["run", "--source", "polling"],
            &[
                ("MONGODB_URI", uri.into()),
                ("POSTGRES_HOST", "127.0.0.1".into()),
                ("POSTGRES_PORT", "1".into()),
            ],
        );
        assert_eq!(out.status.code(), Some(2), "{uri}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with(&format!("invalid configuration: MONGODB_URI: {shown}")),
            "{stderr}"
        );
        assert!(!stderr.contains("s3cret-pw"), "{stderr}");
    }
}

#[test]
fn the_metrics_address_is_checked_before_anything_runs() {
    let out = run_binary(&["run"], &[("METRICS_ADDR", "9464".into())]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .starts_with("invalid configuration: METRICS_ADDR: \"9464\" is not an address"),
        "{out:?}"
    );
    // A port already taken: exit 2 as well, naming the address, before any
    // database is touched (none is reachable here).
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let addr = taken.local_addr().expect("its address").to_string();
    for command in ["run", "relay"] {
        let out = run_binary(
            &[command],
            &[
                ("METRICS_ADDR", addr.clone()),
                ("POSTGRES_PORT", "1".into()),
            ],
        );
        assert_eq!(out.status.code(), Some(2), "{command}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("cannot serve /metrics on METRICS_ADDR {addr}")),
            "{command}: {stderr}"
        );
    }
}
