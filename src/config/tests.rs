//! Unit tests of configuration loading and validation.
use super::keys::edit_distance;
use super::*;

pub(crate) fn env(pairs: &[(&str, &str)]) -> EnvMap {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn defaults_apply_when_nothing_is_set() {
    let config = Config::from_env(&EnvMap::new()).expect("defaults are valid");
    assert_eq!(config.postgres.host, "localhost");
    assert_eq!(config.postgres.port, 5432);
    assert_eq!(config.postgres.database, "activity");
    assert_eq!(config.postgres.password.expose(), "");
    assert_eq!(config.log_format, LogFormat::Text);
}

#[test]
fn every_problem_is_reported_at_once() {
    let err = Config::from_env(&env(&[
        ("POSTGRES_PORT", "eighty"),
        ("POSTGRES_HOST", ""),
        ("LOG_FORMAT", "xml"),
        ("POSTGRES_CONNECT_TIMEOUT", "soon"),
    ]))
    .expect_err("invalid");
    let ConfigError::Invalid(problems) = err else {
        panic!("expected Invalid, got {err:?}");
    };
    let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "POSTGRES_HOST",
            "POSTGRES_PORT",
            "POSTGRES_CONNECT_TIMEOUT",
            "LOG_FORMAT"
        ]
    );
    let text = ConfigError::Invalid(problems).to_string();
    assert_eq!(text.lines().count(), 4);
    assert!(text.contains("POSTGRES_PORT: `eighty` is not a port number"));
}

#[test]
fn port_zero_and_out_of_range_are_rejected() {
    for bad in ["0", "70000", "-1"] {
        let err = Config::from_env(&env(&[("POSTGRES_PORT", bad)])).expect_err(bad);
        assert!(err.to_string().starts_with("POSTGRES_PORT:"), "{err}");
    }
}

#[test]
fn password_never_shows_in_debug() {
    let config = Config::from_env(&env(&[("POSTGRES_PASSWORD", "hunter2-secret")])).expect("valid");
    let debug = format!("{config:?}");
    assert!(!debug.contains("hunter2"), "{debug}");
    assert!(debug.contains("***"));
    assert_eq!(config.postgres.password.expose(), "hunter2-secret");
}

#[test]
fn misspelt_keys_are_named() {
    let err = Config::from_env(&env(&[("POSTGRES_HOTS", "db")])).expect_err("typo");
    assert_eq!(
        err.to_string(),
        "POSTGRES_HOTS: unknown key; did you mean POSTGRES_HOST?"
    );
}

#[test]
fn edit_distance_counts_edits() {
    assert_eq!(edit_distance("kitten", "sitting"), 3);
    assert_eq!(edit_distance("POSTGRES_PASSWORD", "POSTGRES_PASWORD"), 1);
    assert_eq!(edit_distance("", "abc"), 3);
    assert_eq!(edit_distance("same", "same"), 0);
}

#[test]
fn durations_parse_with_units() {
    assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
    assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
    assert_eq!(parse_duration("10"), Some(Duration::from_secs(10)));
    assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
    assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
    assert_eq!(parse_duration("fast"), None);
    assert_eq!(parse_duration("5 parsecs"), None);
    assert_eq!(parse_duration(""), None);
}

#[test]
fn env_file_values_load_and_process_env_wins() {
    let dir = tempfile::tempdir().expect("temp folder");
    let path = dir.path().join("test.env");
    std::fs::write(&path, "POSTGRES_CONNECT_TIMEOUT=7s\nUNRELATED=1\n").expect("write");
    let map = env_map(Some(&path)).expect("loads");
    assert_eq!(
        map.get("POSTGRES_CONNECT_TIMEOUT").map(String::as_str),
        Some("7s")
    );
    assert!(!map.contains_key("UNRELATED"));
    let missing = env_map(Some(&dir.path().join("missing.env"))).expect_err("missing file");
    assert!(missing.to_string().contains("missing.env"), "{missing}");
}

#[test]
fn readme_documents_every_key() {
    let readme = include_str!("../../README.md");
    for (key, _, _) in KEYS {
        assert!(
            readme.contains(&format!("| `{key}` |")),
            "README lacks {key}"
        );
    }
}

#[test]
fn kafka_defaults_and_lists() {
    let config = Config::from_env(&EnvMap::new()).expect("defaults are valid");
    assert_eq!(config.kafka.brokers, "localhost:9092");
    assert_eq!(config.kafka.topics, ["postgres.activity.event_outbox"]);
    assert_eq!(config.kafka.group_id, "activity-event-processor");
    assert_eq!(config.kafka.session_timeout, Duration::from_secs(6));
    assert_eq!(config.kafka.relay.slot, "activity_event_processor_relay");
    assert_eq!(config.kafka.relay.format, RelayFormat::Cdc);
    assert!(config.kafka.relay.schemas);
    let config = Config::from_env(&env(&[
        ("KAFKA_TOPIC", "a, outbox.event.User ,"),
        ("KAFKA_PRODUCER_CONFIG", "batch.num.messages=1, linger.ms=0"),
        ("KAFKA_CONFIG", "sasl.password=hunter2"),
        ("RELAY_SCHEMAS", "off"),
    ]))
    .expect("valid");
    assert_eq!(config.kafka.topics, ["a", "outbox.event.User"]);
    assert_eq!(
        config.kafka.producer_config.0,
        [
            ("batch.num.messages".to_string(), "1".to_string()),
            ("linger.ms".to_string(), "0".to_string())
        ]
    );
    assert!(!config.kafka.relay.schemas);
    let debug = format!("{config:?}");
    assert!(!debug.contains("hunter2"), "{debug}");
}

#[test]
fn kafka_problems_are_named() {
    let err = Config::from_env(&env(&[
        ("KAFKA_BROKERS", "localhost"),
        ("KAFKA_TOPIC", "bad topic"),
        ("KAFKA_FORMAT", "avro"),
        ("KAFKA_CONSUMER_CONFIG", "enable.auto.commit=true"),
        ("KAFKA_PRODUCER_CONFIG", "oops"),
        ("RELAY_FORMAT", "xml"),
        ("RELAY_SLOT", "Bad-Slot"),
    ]))
    .expect_err("invalid");
    let text = err.to_string();
    for expected in [
        "KAFKA_BROKERS: `localhost` is not host:port",
        "KAFKA_TOPIC: `bad topic` is not a Kafka topic name",
        "KAFKA_FORMAT: `avro` is not one of",
        "KAFKA_CONSUMER_CONFIG: `enable.auto.commit` is set by the processor",
        "KAFKA_PRODUCER_CONFIG: item 1 is not of the form key=value",
        "RELAY_FORMAT: `xml` is not one of: cdc, outbox",
        "RELAY_SLOT: `Bad-Slot` must be",
    ] {
        assert!(text.contains(expected), "{expected:?} not in:\n{text}");
    }
    let long = "s".repeat(60);
    let err = Config::from_env(&env(&[("REPLICATION_SLOT", long.as_str())]))
        .expect_err("relay slot too long");
    assert!(err.to_string().starts_with("RELAY_SLOT:"), "{err}");
}

#[test]
fn env_example_documents_every_key() {
    let example = include_str!("../../.env.example");
    for (key, default, _) in KEYS {
        let line = format!("{key}={default}");
        assert!(
            example.lines().any(|l| l.trim_start_matches("# ") == line),
            ".env.example lacks `{line}`"
        );
    }
}

#[test]
fn an_unreadable_mongodb_uri_is_named_without_its_password() {
    for uri in [
        "mongodb://user:hunter2-secret@[bad",
        "mongodb://user:hunter2?secret@host",
        "user:hunter2-secret@host",
    ] {
        let err = Config::from_env(&env(&[("MONGODB_URI", uri)])).expect_err(uri);
        let text = err.to_string();
        assert!(text.starts_with("MONGODB_URI: `"), "{text}");
        assert!(text.contains("***@"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(!text.contains("secret"), "{text}");
    }
}

#[test]
fn kafka_properties_are_checked_one_by_one_and_never_echoed() {
    let err = Config::from_env(&env(&[
        (
            "KAFKA_CONFIG",
            "sasl.username=app, sasl.pasword=hunter2-secret",
        ),
        ("KAFKA_CONSUMER_CONFIG", "fetch.wait.max.ms=hunter2-secret"),
        ("KAFKA_PRODUCER_CONFIG", "compression.type=hunter2-secret"),
    ]))
    .expect_err("invalid");
    let text = err.to_string();
    assert!(!text.contains("hunter2"), "{text}");
    for expected in [
        "KAFKA_CONFIG: `sasl.pasword` is not a librdkafka property; did you mean `sasl.password`?",
        "KAFKA_CONSUMER_CONFIG: `fetch.wait.max.ms` has an invalid value",
        "KAFKA_PRODUCER_CONFIG: `compression.type` has an invalid value",
    ] {
        assert!(text.contains(expected), "{expected:?} not in:\n{text}");
    }
    assert_eq!(text.lines().count(), 3, "{text}");
}

#[test]
fn secrets_cover_password_uri_and_secret_properties() {
    let config = Config::from_env(&env(&[
        ("POSTGRES_PASSWORD", "pg-\"quoted\"-pw"),
        ("MONGODB_URI", "mongodb://app:m0ng0%40pw@db/?authSource=x"),
        ("KAFKA_CONFIG", "sasl.password=k4fka-pw,linger.ms=5"),
    ]))
    .expect("valid");
    let secrets = config.secrets();
    for expected in [
        "pg-\"quoted\"-pw",
        "pg-\\\"quoted\\\"-pw",
        "m0ng0%40pw",
        "m0ng0@pw",
        "k4fka-pw",
    ] {
        assert!(
            secrets.iter().any(|s| s == expected),
            "{expected} not in {secrets:?}"
        );
    }
    assert!(!secrets.iter().any(|s| s == "5"), "{secrets:?}");
    assert_eq!(
        config.scrub("auth failed for app:m0ng0@pw (k4fka-pw, linger 5)"),
        "auth failed for *** (***, linger 5)"
    );
}

#[test]
fn flags_win_and_their_problems_name_the_flag() {
    let workers = RUN_FLAGS
        .iter()
        .find(|f| f.long == "workers")
        .copied()
        .expect("--workers");
    let config =
        Config::load(&env(&[("POLL_WORKERS", "2")]), &[(workers, "3".into())]).expect("valid");
    assert_eq!(config.polling.workers, 3);
    let err = Config::load(
        &env(&[("POLL_WORKERS", "2"), ("BATCH_SIZE", "none")]),
        &[(workers, "0".into())],
    )
    .expect_err("invalid");
    assert_eq!(
        err.to_string(),
        "--workers: `0` is not a positive whole number\nBATCH_SIZE: `none` is not a positive whole number"
    );
}

#[test]
fn the_metrics_server_listens_on_loopback_unless_told() {
    let config = Config::from_env(&EnvMap::new()).expect("defaults are valid");
    assert_eq!(
        config.metrics_addr,
        Some(crate::observe::DEFAULT_METRICS_ADDR)
    );
    assert!(config
        .metrics_addr
        .is_some_and(|addr| addr.ip().is_loopback()));
    let off = Config::from_env(&env(&[("METRICS_ADDR", "off")])).expect("off is valid");
    assert_eq!(off.metrics_addr, None);
    let err = Config::from_env(&env(&[("METRICS_ADDR", "everywhere")])).expect_err("invalid");
    let text = err.to_string();
    assert!(
        text.starts_with("METRICS_ADDR: \"everywhere\" is not an address"),
        "{text}"
    );
    let typo = Config::from_env(&env(&[("METRICS_ADR", "off")])).expect_err("a typo");
    assert!(
        typo.to_string().contains("did you mean METRICS_ADDR?"),
        "{typo}"
    );
}

#[test]
fn the_heartbeat_interval_is_a_duration_or_off() {
    let config = Config::from_env(&EnvMap::new()).expect("defaults are valid");
    assert_eq!(
        config.heartbeat_interval,
        Some(crate::observe::heartbeat::DEFAULT_HEARTBEAT_INTERVAL)
    );
    for (raw, expected) in [
        ("1s", Some(Duration::from_secs(1))),
        ("250ms", Some(Duration::from_millis(250))),
        ("2m", Some(Duration::from_secs(120))),
        ("off", None),
        ("OFF", None),
        ("0", None),
        ("0s", None),
    ] {
        let config =
            Config::from_env(&env(&[("HEARTBEAT_INTERVAL", raw)])).expect("a valid interval");
        assert_eq!(config.heartbeat_interval, expected, "{raw}");
    }
    for raw in ["soon", "-1s", "10 parsecs", ""] {
        let err = Config::from_env(&env(&[("HEARTBEAT_INTERVAL", raw)])).expect_err(raw);
        let text = err.to_string();
        assert!(
            text.starts_with(&format!("HEARTBEAT_INTERVAL: `{raw}` is not a duration")),
            "{text}"
        );
        assert!(text.contains("or off"), "{text}");
    }
    let typo = Config::from_env(&env(&[("HEARTBEAT_INTERVALL", "1s")])).expect_err("a typo");
    assert!(
        typo.to_string()
            .contains("did you mean HEARTBEAT_INTERVAL?"),
        "{typo}"
    );
}

#[test]
fn the_read_chunk_is_a_positive_count() {
    let config = Config::from_env(&EnvMap::new()).expect("defaults are valid");
    assert_eq!(config.mongodb.read_chunk, 64);
    let config = Config::load(&env(&[("MONGODB_READ_CHUNK", "1000")]), &[]).expect("valid");
    assert_eq!(config.mongodb.read_chunk, 1000);
    let err = Config::load(&env(&[("MONGODB_READ_CHUNK", "0")]), &[]).expect_err("invalid");
    assert_eq!(
        err.to_string(),
        "MONGODB_READ_CHUNK: `0` is not a positive whole number"
    );
}
