//! Secrets are never printed: the real binary, fed distinctive secrets through
//! every configuration input (environment, `./.env`, `--env-file`,
//! `KAFKA_*CONFIG` properties) and driven through every failure the command
//! line can hit and through every command's success, with what it prints on
//! stdout and stderr (debug logs, text and JSON) searched for them. Each run
//! must also end as expected (2 for configuration, 1 for run-time failures)
//! and name what is wrong.

#[path = "../common/mod.rs"]
mod common;
mod fake_pg;
mod harness;

use common::mongo::{mongodb_uri, TestMongo};
use common::TestDb;
use harness::{Case, End, CONSOLE_SECRET, KAFKA_SECRET, MONGO_SECRET, PG_SECRET};
use mongodb::bson::doc;
use std::time::Duration;

/// Variables: key, value.
type Vars = Vec<(String, String)>;

/// Every command that loads the configuration, each capture method of `run`.
const COMMANDS: &[&[&str]] = &[
    &["migrate"],
    &["seed"],
    &["status"],
    &["run", "--source", "replication", "--until-caught-up"],
    &["run", "--source", "polling", "--until-caught-up"],
    &["run", "--source", "kafka", "--until-caught-up"],
    &["relay", "--until-caught-up"],
    &["kafka", "topics", "create"],
    &["show"],
];

/// Retrying commands get this long before SIGTERM.
const RETRYING: Duration = Duration::from_secs(3);

fn the_env_file() -> String {
    format!(
        "# the processor's settings\n\
         POSTGRES_HOST=127.0.0.1\n\
         POSTGRES_PASSWORD=it's-{PG_SECRET}\n\
         MONGODB_URI=mongodb://app:{MONGO_SECRET}@127.0.0.1:27017/\n\
         KAFKA_CONFIG=sasl.username=app,sasl.password={KAFKA_SECRET}\n"
    )
}

#[test]
fn env_file_errors_name_file_line_and_key_never_a_value() {
    for command in COMMANDS {
        let name = format!("unbalanced quote in ./.env, {}", command.join(" "));
        Case::new(&name, command)
            .env(&[("LOG_LEVEL", "debug")])
            .dotenv(&the_env_file())
            .ends(End::Exit(2))
            .says("invalid configuration: env file .env, line 3, key POSTGRES_PASSWORD: unterminated quote")
            .stderr_lines(1)
            .check();
    }
    Case::new("unbalanced quote in --env-file, json logs", &["status"])
        .env(&[("LOG_FORMAT", "json")])
        .env_file(&the_env_file())
        .ends(End::Exit(2))
        .says("secrets.env, line 3, key POSTGRES_PASSWORD: unterminated quote")
        .stderr_lines(1)
        .check();
    Case::new(
        "a secret on a line of its own",
        &["run", "--source", "polling"],
    )
    .env_file(&format!(
        "POSTGRES_USER=app\n{PG_SECRET}\nMONGODB_URI=mongodb://app:{MONGO_SECRET}@h/\n"
    ))
    .ends(End::Exit(2))
    .says("secrets.env, line 2: not of the form KEY=VALUE")
    .stderr_lines(1)
    .check();
    Case::new("an unquoted space in a value", &["migrate"])
        .dotenv(&format!(
            "MONGODB_URI=mongodb://app:{MONGO_SECRET} {MONGO_SECRET}@h/\nPOSTGRES_PASSWORD={PG_SECRET}\n"
        ))
        .ends(End::Exit(2))
        .says("env file .env, line 1, key MONGODB_URI: the value cannot be parsed")
        .stderr_lines(1)
        .check();
    Case::new("an unknown escape in a value", &["relay"])
        .env_file(&format!(
            "KAFKA_PRODUCER_CONFIG=\"sasl.password={KAFKA_SECRET}\\q\"\n"
        ))
        .ends(End::Exit(2))
        .says("line 1, key KAFKA_PRODUCER_CONFIG: the value cannot be parsed")
        .check();
    Case::new("a misspelt key in --env-file", &["seed"])
        .env_file(&format!("POSTGRES_PASWORD={PG_SECRET}\n"))
        .ends(End::Exit(2))
        .says("POSTGRES_PASWORD: unknown key; did you mean POSTGRES_PASSWORD?")
        .check();
    // `decode` reads no configuration: a broken `.env` does not concern it.
    Case::new("decode beside a broken .env", &["decode"])
        .env(&[("KAFKA_CONFIG", format!("sasl.password={KAFKA_SECRET}"))])
        .dotenv(&the_env_file())
        .ends(End::Exit(0))
        .says("tombstone")
        .check();
}

#[test]
fn configuration_errors_name_the_key_never_the_value() {
    let kafka_cases = [
        (
            "KAFKA_CONFIG",
            format!("security.protocol=plaintext,sasl.pasword={KAFKA_SECRET}"),
            "KAFKA_CONFIG: `sasl.pasword` is not a librdkafka property; did you mean `sasl.password`?",
        ),
        (
            "KAFKA_CONSUMER_CONFIG",
            format!("ssl.key.password={KAFKA_SECRET}"),
            // This build of librdkafka has no OpenSSL: the property is refused.
            "KAFKA_CONSUMER_CONFIG: `ssl.key.password` has an invalid value",
        ),
        (
            "KAFKA_PRODUCER_CONFIG",
            format!("compression.type={KAFKA_SECRET}"),
            "KAFKA_PRODUCER_CONFIG: `compression.type` has an invalid value",
        ),
        (
            "KAFKA_CONFIG",
            format!("sasl.username=app,{KAFKA_SECRET}"),
            "KAFKA_CONFIG: item 2 is not of the form key=value",
        ),
    ];
    for (key, value, message) in &kafka_cases {
        for command in COMMANDS {
            let name = format!("{key} in the environment, {}", command.join(" "));
            Case::new(&name, command)
                .env(&[(*key, value.as_str()), ("LOG_LEVEL", "debug")])
                .ends(End::Exit(2))
                .says(message)
                .check();
        }
    }
    let uri_cases = [
        (
            format!("mongodb://app:{MONGO_SECRET}@[bad"),
            "MONGODB_URI: `mongodb://***@[bad` is not a valid connection string",
        ),
        (
            format!("mongodb://app:{MONGO_SECRET}?x@127.0.0.1/"),
            "MONGODB_URI: `mongodb://***@127.0.0.1/` is not a valid connection string",
        ),
        (
            format!("app:{MONGO_SECRET}@127.0.0.1"),
            "MONGODB_URI: `***@127.0.0.1` must start with mongodb://",
        ),
        (
            format!("mongodb://127.0.0.1/?tlsCertificateKeyFilePassword={MONGO_SECRET}&w=bogus"),
            "MONGODB_URI: `mongodb://127.0.0.1/?tlsCertificateKeyFilePassword=***&w=bogus`",
        ),
    ];
    for (uri, message) in &uri_cases {
        Case::new("an invalid MONGODB_URI in ./.env", &["show"])
            .dotenv(&format!("MONGODB_URI={uri}\n"))
            .ends(End::Exit(2))
            .says(message)
            .check();
    }
    Case::new("misspelt secret keys", &["run", "--source", "kafka"])
        .env(&[
            ("MONGODB_URL", format!("mongodb://app:{MONGO_SECRET}@h/")),
            ("KAFKA_CONFIGS", format!("sasl.password={KAFKA_SECRET}")),
        ])
        .env_file(&format!("POSTGRES_PASWORD={PG_SECRET}\n"))
        .ends(End::Exit(2))
        .says("MONGODB_URL: unknown key; did you mean MONGODB_URI?")
        .says("KAFKA_CONFIGS: unknown key; did you mean KAFKA_CONFIG?")
        .says("POSTGRES_PASWORD: unknown key; did you mean POSTGRES_PASSWORD?")
        .check();
    Case::new("every input at once, json logs", &["relay"])
        .env(&[
            ("LOG_FORMAT", "json".to_string()),
            ("KAFKA_CONFIG", format!("sasl.pasword={KAFKA_SECRET}")),
            ("POSTGRES_PASSWORD", PG_SECRET.to_string()),
        ])
        .dotenv(&format!("MONGODB_URI=mongodb://app:{MONGO_SECRET}@[bad\n"))
        .ends(End::Exit(2))
        .says("invalid configuration (2 problems):")
        .check();
}

/// The environment of a working setup on the test services, with secrets in it.
fn services_env(db: &TestDb, mongo_uri: &str, mongo_db: &str, slot: &str) -> Vars {
    let mut env: Vec<(String, String)> = db
        .env()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    env.retain(|(k, _)| k != "POSTGRES_PASSWORD");
    for (key, value) in [
        ("POSTGRES_PASSWORD", PG_SECRET.to_string()),
        ("POSTGRES_CONNECT_TIMEOUT", "3s".to_string()),
        ("MONGODB_URI", mongo_uri.to_string()),
        ("MONGODB_DB", mongo_db.to_string()),
        ("REPLICATION_SLOT", slot.to_string()),
        ("PUBLICATION", slot.to_string()),
        ("KAFKA_BROKERS", common::kafka::brokers()),
        ("KAFKA_TIMEOUT", "3s".to_string()),
        (
            "KAFKA_CONFIG",
            format!("sasl.username=app,sasl.password={KAFKA_SECRET}"),
        ),
        (
            "KAFKA_CONSUMER_CONFIG",
            format!("sasl.password={KAFKA_SECRET}"),
        ),
        (
            "KAFKA_PRODUCER_CONFIG",
            format!("batch.num.messages=1,sasl.password={KAFKA_SECRET}"),
        ),
        ("CONSOLE_TOKEN", CONSOLE_SECRET.to_string()),
        ("RETRY_BACKOFF_MAX", "500ms".to_string()),
        ("SHUTDOWN_TIMEOUT", "5s".to_string()),
        ("LOG_LEVEL", "debug".to_string()),
    ] {
        env.push((key.to_string(), value));
    }
    env
}

fn fresh_slot() -> String {
    format!(
        "aep_secret_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

/// The URI of the test MongoDB server (no database path) with
/// `user:password@` in it, authenticating against `auth_db`.
fn with_credentials(uri: &str, user: &str, password: &str, auth_db: &str) -> String {
    let uri = uri.replacen("mongodb://", &format!("mongodb://{user}:{password}@"), 1);
    let options = format!("authSource={auth_db}&serverSelectionTimeoutMS=2000");
    if uri.contains('?') {
        format!("{uri}&{options}")
    } else {
        format!("{}/?{options}", uri.trim_end_matches('/'))
    }
}

mod runtime;
