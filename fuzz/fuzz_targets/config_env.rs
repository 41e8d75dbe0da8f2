//! The configuration: a `.env` file read by `env_map`, and variables given as they
//! are to `Config::from_env`.
//!
//! Input: the text of a `.env` file, then optionally a NUL byte and the shape of
//! the secrets: a selector byte (bit 0 `POSTGRES_PASSWORD`, bit 1 `MONGODB_URI`,
//! bits 2-4 `KAFKA_CONFIG`, `KAFKA_CONSUMER_CONFIG`, `KAFKA_PRODUCER_CONFIG`) and
//! `*`-separated text around a distinctive secret value, which the target plants
//! in the selected keys (in the URI, as the password; in a property list, as the
//! value of `sasl.password`).
//!
//! Properties: no panic; an accepted configuration is well formed; and where the
//! secret is only in secret positions (the password, the URI's credentials, the
//! values of the librdkafka property lists), no error message and no `Debug` of
//! the configuration shows it. The first run is over the `.env` file (secret lines
//! appended to it), the second over the file's lines split at `=` as they are.

#![no_main]

use activity_event_processor::config::{env_map, is_topic_name, Config, EnvMap};
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

/// The secret: must never be printed.
const MARK: &str = "s3cr3tZq7Mark";

const SECRET_KEYS: [&str; 5] = [
    "POSTGRES_PASSWORD",
    "MONGODB_URI",
    "KAFKA_CONFIG",
    "KAFKA_CONSUMER_CONFIG",
    "KAFKA_PRODUCER_CONFIG",
];

fuzz_target!(|data: &[u8]| {
    if contains(data, MARK.as_bytes()) {
        return;
    }
    let (env_text, shape) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let secrets = secrets(shape);
    env_file(env_text, &secrets);
    env_values(env_text, &secrets);
});

/// The keys and values holding the secret.
fn secrets(shape: &[u8]) -> Vec<(&'static str, String)> {
    let Some((&selector, rest)) = shape.split_first() else {
        return Vec::new();
    };
    let rest = String::from_utf8_lossy(rest);
    let parts: Vec<&str> = rest.split('*').collect();
    let part = |i: usize| parts.get(i).copied().unwrap_or("");
    // The URI's password: nothing that ends the credentials of a URI.
    let password_part = |i: usize| -> String {
        part(i)
            .chars()
            .filter(|c| !matches!(c, '/' | '?' | '#' | '@') && !c.is_whitespace())
            .collect()
    };
    let scheme: String = part(2)
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '.' | '-'))
        .collect();
    let mut secrets = Vec::new();
    for (bit, key) in SECRET_KEYS.iter().enumerate() {
        if selector & (1 << bit) == 0 {
            continue;
        }
        let value = match *key {
            "POSTGRES_PASSWORD" => format!("{}{MARK}{}", part(0), part(1)),
            // Without a scheme (a slip), the credentials are still credentials.
            "MONGODB_URI" => format!(
                "{scheme}{}user:{}{MARK}{}@{}",
                if scheme.is_empty() { "" } else { "://" },
                password_part(3),
                password_part(4),
                part(5)
            ),
            // librdkafka properties: the secret is a value (`Debug` shows the names).
            _ => format!(
                "{},sasl.password={MARK}{}",
                part(4 + bit),
                part(7 + bit).replace(',', "")
            ),
        };
        secrets.push((*key, value));
    }
    secrets
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Whether every occurrence of the secret in `env` is in a secret position.
fn secret_only_where_secret(env: &EnvMap) -> bool {
    env.iter().all(|(key, value)| {
        if !key.contains(MARK) && !value.contains(MARK) {
            return true;
        }
        if key.contains(MARK) {
            return false;
        }
        match key.as_str() {
            "POSTGRES_PASSWORD" => true,
            "MONGODB_URI" => in_credentials(value),
            key if SECRET_KEYS.contains(&key) => in_property_values(value),
            _ => false,
        }
    })
}

/// Whether every occurrence of the secret in `uri` lies between `scheme://` (or
/// the start, without a scheme) and the `@` that ends the credentials.
fn in_credentials(uri: &str) -> bool {
    let start = uri.find("://").map_or(0, |at| at + 3);
    let authority_end = uri[start..].find('/').map_or(uri.len(), |at| start + at);
    let Some(end) = uri[start..authority_end].rfind('@').map(|at| start + at) else {
        return false;
    };
    uri.match_indices(MARK)
        .all(|(at, _)| at >= start && at + MARK.len() <= end)
}

/// Whether the secret is only in the values of a `key=value,key=value` list.
fn in_property_values(list: &str) -> bool {
    list.split(',').all(|item| match item.split_once('=') {
        Some((name, _)) => !name.contains(MARK),
        None => !item.contains(MARK),
    })
}

/// The `.env` file: `env_map` reads it (the process environment holds none of our
/// keys), then `Config::from_env` takes the map.
fn env_file(env_text: &[u8], secrets: &[(&str, String)]) {
    let mut file = env_text.to_vec();
    for (key, value) in secrets {
        file.extend(format!("\n{key}={value}").as_bytes());
    }
    let path = scratch_file();
    std::fs::write(path, &file).expect("write the scratch .env file");
    match env_map(Some(path)) {
        Ok(env) => {
            let guarded = secret_only_where_secret(&env);
            check_config(&env, guarded);
        }
        Err(err) => {
            // Without a newline in the secrets' text, the secret is on the appended
            // lines only, each of them a secret key's; the file before them must be
            // well formed, or the secret could be inside one of its values.
            let one_line_each = secrets.iter().all(|(_, v)| !v.contains(['\n', '\r']));
            let before_is_fine = dotenvy::from_read_iter(env_text).all(|item| item.is_ok());
            if one_line_each && before_is_fine {
                let message = err.to_string();
                assert!(
                    !message.contains(MARK),
                    "reading the .env file printed a secret: {message}"
                );
            }
        }
    }
}

/// The file's lines as variables, split at the first `=` with nothing trimmed,
/// the secrets set last.
fn env_values(env_text: &[u8], secrets: &[(&str, String)]) {
    let text = String::from_utf8_lossy(env_text);
    let mut env = EnvMap::new();
    for line in text.lines() {
        let (key, value) = line.split_once('=').unwrap_or((line, ""));
        env.insert(key.to_string(), value.to_string());
    }
    for (key, value) in secrets {
        env.insert(key.to_string(), value.clone());
    }
    let guarded = secret_only_where_secret(&env);
    check_config(&env, guarded);
}

fn check_config(env: &EnvMap, guarded: bool) {
    match Config::from_env(env) {
        Ok(config) => {
            well_formed(&config);
            if guarded {
                let debug = format!("{config:?}");
                assert!(
                    !debug.contains(MARK),
                    "Debug of the config shows a secret: {debug}"
                );
                let target = config.postgres.display_target();
                assert!(
                    !target.contains(MARK),
                    "display_target shows a secret: {target}"
                );
            }
        }
        Err(err) => {
            let message = err.to_string();
            assert!(!message.trim().is_empty(), "an error without a message");
            if guarded {
                assert!(
                    !message.contains(MARK),
                    "a configuration error printed a secret: {message}"
                );
            }
        }
    }
}

fn well_formed(config: &Config) {
    let identifier = |s: &str, max: usize| {
        !s.is_empty()
            && s.len() <= max
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    };
    let pg = &config.postgres;
    assert!(!pg.host.is_empty() && !pg.database.is_empty() && !pg.user.is_empty());
    assert_ne!(pg.port, 0);
    assert!(!pg.connect_timeout.is_zero());
    let uri = config.mongodb.uri.expose();
    assert!(uri.starts_with("mongodb://") || uri.starts_with("mongodb+srv://"));
    assert!(!config.mongodb.database.is_empty());
    assert!(identifier(&config.replication.slot, 63));
    assert!(identifier(&config.replication.publication, 63));
    assert!(config.polling.workers > 0);
    assert!(config.pipeline.batch_size > 0);
    assert!(config.pipeline.max_retries > 0);
    assert!(!config.log_level.is_empty());
    let kafka = &config.kafka;
    assert!(!kafka.brokers.is_empty());
    for broker in kafka.brokers.split(',').map(str::trim) {
        let (host, port) = broker.rsplit_once(':').expect("a broker is host:port");
        assert!(!host.is_empty());
        assert!(port.parse::<u16>().is_ok_and(|p| p > 0));
    }
    assert!(!kafka.topics.is_empty());
    assert!(kafka.topics.iter().all(|t| is_topic_name(t)));
    assert!(!kafka.group_id.is_empty());
    assert!(!kafka.session_timeout.is_zero() && !kafka.timeout.is_zero());
    assert!(identifier(&kafka.relay.slot, 58));
    for properties in [
        &kafka.client_config,
        &kafka.consumer_config,
        &kafka.producer_config,
    ] {
        assert!(properties.0.iter().all(|(name, _)| !name.is_empty()));
    }
}

/// This process's scratch `.env` file; the first call also removes our keys
/// from the process environment, which `env_map` would read over the file.
fn scratch_file() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        for (key, _) in std::env::vars() {
            if [
                "POSTGRES_",
                "MONGODB_",
                "KAFKA_",
                "POLL_",
                "REPLICATION_",
                "BATCH_",
                "RETRY_",
                "RELAY_",
            ]
            .iter()
            .any(|p| key.starts_with(p))
                || [
                    "SOURCE",
                    "PUBLICATION",
                    "MAX_RETRIES",
                    "MARK_PROCESSED",
                    "SHUTDOWN_TIMEOUT",
                    "LOG_LEVEL",
                    "LOG_FORMAT",
                ]
                .contains(&key.as_str())
            {
                std::env::remove_var(key);
            }
        }
        std::env::temp_dir().join(format!("aep-fuzz-config-{}.env", std::process::id()))
    })
}
