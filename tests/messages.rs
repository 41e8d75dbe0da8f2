//! What the binary says about the mistakes a user makes: one line on stderr
//! saying what is wrong and what to do, naming the setting as the user gave
//! it (a flag or a key), the exit status (2 for configuration, 1 at run
//! time), and never a secret. Against the real services (README
//! "Troubleshooting" lists the same cases).

mod common;

use common::mongo::mongodb_uri;
use common::TestDb;
use std::path::Path;
use std::process::{Command, Output};

const PG_SECRET: &str = "pg-secret-5093";
const MONGO_SECRET: &str = "mongo-secret-7716";

fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// The binary, in an empty folder (no `./.env`), pointed at `db` with a
/// password it must never print, with `vars` on top.
fn run(db: &TestDb, args: &[&str], vars: &[(&str, String)]) -> Output {
    let folder = tempfile::tempdir().expect("temp folder");
    let mut command = Command::new(env!("CARGO_BIN_EXE_event-processor"));
    command
        .args(args)
        .current_dir(folder.path())
        .env("POSTGRES_HOST", &db.config.host)
        .env("POSTGRES_PORT", db.config.port.to_string())
        .env("POSTGRES_DB", &db.config.database)
        .env("POSTGRES_USER", &db.config.user)
        .env("POSTGRES_PASSWORD", PG_SECRET)
        .env("MONGODB_URI", mongodb_uri())
        .env("METRICS_ADDR", "off")
        .env_remove("LOG_LEVEL")
        .env_remove("LOG_FORMAT");
    for (key, value) in vars {
        command.env(key, value);
    }
    command.output().expect("run event-processor")
}

/// Checks the exit status and that stderr's only line (log lines aside) is
/// `line`, and that no secret shows anywhere.
fn says(output: &Output, code: i32, line: &str) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let context = format!("--- stdout\n{stdout}\n--- stderr\n{stderr}");
    assert_eq!(output.status.code(), Some(code), "{context}");
    let said: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.contains(" INFO ") && !l.contains(" WARN ") && !l.contains(" DEBUG "))
        .collect();
    assert_eq!(said, [line], "{context}");
    for secret in [PG_SECRET, MONGO_SECRET] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "a secret shows: {context}"
        );
    }
}

/// `MONGODB_URI` with a user and `MONGO_SECRET` as password.
fn with_credentials(uri: &str) -> String {
    let rest = uri
        .strip_prefix("mongodb://")
        .expect("MONGODB_URI starts with mongodb://");
    format!("mongodb://reader:{MONGO_SECRET}@{rest}")
}

#[tokio::test]
async fn postgres_mistakes_say_which_setting_to_check() {
    let db = TestDb::migrated().await;
    let port = closed_port();
    says(
        &run(&db, &["status"], &[("POSTGRES_PORT", port.to_string())]),
        1,
        &format!(
            "error: cannot connect to PostgreSQL at 127.0.0.1:{port}/{}: error connecting to server: \
             Connection refused (os error 111); check POSTGRES_HOST (--postgres-host) and \
             POSTGRES_PORT (--postgres-port), and that PostgreSQL is running there",
            db.config.database
        ),
    );
    let flag = port.to_string();
    says(
        &run(&db, &["--postgres-port", &flag, "status"], &[]),
        1,
        &format!(
            "error: cannot connect to PostgreSQL at 127.0.0.1:{port}/{}: error connecting to server: \
             Connection refused (os error 111); check POSTGRES_HOST (--postgres-host) and \
             --postgres-port, and that PostgreSQL is running there",
            db.config.database
        ),
    );
    says(
        &run(&db, &["seed"], &[("POSTGRES_USER", "nobody_here".into())]),
        1,
        &format!(
            "error: cannot connect to PostgreSQL at {}:{}/{}: role \"nobody_here\" does not exist; \
             check POSTGRES_USER (--postgres-user) and POSTGRES_PASSWORD",
            db.config.host, db.config.port, db.config.database
        ),
    );
    says(
        &run(&db, &["migrate", "--postgres-db", "no_such_db_3318"], &[]),
        1,
        &format!(
            "error: cannot connect to PostgreSQL at {}:{}/no_such_db_3318: database \
             \"no_such_db_3318\" does not exist; check --postgres-db, or create that database",
            db.config.host, db.config.port
        ),
    );
    says(
        &run(&db, &["--postgres-port", "0", "status"], &[]),
        2,
        "invalid configuration: --postgres-port: `0` is not a port number (1-65535)",
    );
}

#[tokio::test]
async fn mongodb_mistakes_are_one_short_line_without_the_password() {
    let db = TestDb::migrated().await;
    let uri = with_credentials(&mongodb_uri());
    let shown = uri.replace(&format!("reader:{MONGO_SECRET}"), "***");
    let out = run(&db, &["show"], &[("MONGODB_URI", uri.clone())]);
    says(
        &out,
        1,
        &format!(
            "error: cannot reach MongoDB at {shown}: mongodb: authentication failed: SCRAM failure: \
             authentication failed; check the user name and password in MONGODB_URI (and its authSource)"
        ),
    );
    let line = String::from_utf8_lossy(&out.stderr);
    assert!(!line.contains("labels"), "no driver dump: {line}");

    // The driver's own account is there at LOG_LEVEL=debug, still without the password.
    let out = run(
        &db,
        &["show"],
        &[("MONGODB_URI", uri), ("LOG_LEVEL", "debug".into())],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("DEBUG failed causes=") && stderr.contains("AuthenticationFailed"),
        "{stderr}"
    );
    assert!(!stderr.contains(MONGO_SECRET), "{stderr}");

    says(
        &run(&db, &["show"], &[("MONGODB_URI", "[bad".into())]),
        2,
        "invalid configuration: MONGODB_URI: `[bad` must start with mongodb:// or mongodb+srv://",
    );
    says(
        &run(
            &db,
            &["run", "--until-caught-up"],
            &[("MONGODB_URI", format!("mongodb://u:{MONGO_SECRET}@[bad/"))],
        ),
        2,
        "invalid configuration: MONGODB_URI: `mongodb://***@[bad/` is not a valid connection string: \
         invalid server address [bad: missing closing ']' in IP literal hostname",
    );
}

#[tokio::test]
async fn a_setting_is_named_as_the_user_typed_it() {
    let db = TestDb::migrated().await;
    says(
        &run(&db, &["run", "--workers", "0"], &[]),
        2,
        "invalid configuration: --workers: `0` is not a positive whole number",
    );
    says(
        &run(&db, &["run"], &[("POLL_WORKERS", "0".into())]),
        2,
        "invalid configuration: POLL_WORKERS: `0` is not a positive whole number",
    );
    says(
        &run(&db, &["status"], &[("LOG_LEVEL", "loud".into())]),
        2,
        "invalid configuration: LOG_LEVEL: `loud` is not a log level: give error, warn, info, debug, \
         trace or off, or a directive list such as info,activity_event_processor=debug",
    );
    says(
        &run(&db, &["--log-level", "loud", "status"], &[]),
        2,
        "invalid configuration: --log-level: `loud` is not a log level: give error, warn, info, debug, \
         trace or off, or a directive list such as info,activity_event_processor=debug",
    );
    let missing = Path::new("/nonexistent/processor.env");
    says(
        &run(
            &db,
            &["--env-file", &missing.to_string_lossy(), "status"],
            &[],
        ),
        2,
        "invalid configuration: cannot read env file /nonexistent/processor.env: \
         No such file or directory (os error 2); give --env-file a readable file",
    );
}

#[tokio::test]
async fn a_database_without_the_schema_says_to_migrate() {
    let db = TestDb::create().await;
    let out = run(
        &db,
        &["run", "--source", "polling", "--until-caught-up"],
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("error: "), "{stderr}");
    assert!(
        last.ends_with("run `event-processor migrate` first"),
        "{stderr}"
    );
    assert!(!stderr.contains(PG_SECRET), "{stderr}");
    for command in [&["prune", "--older-than", "1d"][..], &["seed"]] {
        let out = run(&db, command, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert_eq!(stderr.matches("migrate").count(), 1, "said once: {stderr}");
    }
}

#[tokio::test]
async fn an_id_that_is_not_one_says_where_ids_come_from() {
    let db = TestDb::migrated().await;
    for (args, line) in [
        (
            &["dead-letters", "show", "nope"][..],
            "error: invalid value 'nope' for '<ID>': `nope` is not a dead letter id: give an id from \
             the first column of `event-processor dead-letters list` (a UUID)",
        ),
        (
            &["dead-letters", "retry", "12"],
            "error: invalid value '12' for '[IDS]...': `12` is not a dead letter id: give an id from \
             the first column of `event-processor dead-letters list` (a UUID)",
        ),
        (
            &["verify", "--aggregate", "alice"],
            "error: invalid value 'alice' for '--aggregate <ID>': `alice` is not an aggregate id: give \
             a user's or an activity's id (a UUID, as `event-processor show` prints them)",
        ),
    ] {
        let out = run(&db, args, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().next(), Some(line), "{args:?}: {stderr}");
    }
}
