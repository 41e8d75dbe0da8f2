//! Parsing: the variables (and flag values) read into a [`Config`], every
//! problem collected before any is reported.

use super::keys::{default_of, misspelt, Flag};
use super::{
    kafka, redact, Config, ConfigError, EnvMap, LogFormat, MongoConfig, PipelineConfig,
    PollingConfig, PostgresConfig, Problem, ReplicationConfig, Secret, SourceKind,
};
use std::collections::BTreeMap;
use std::time::Duration;

/// Reads keys from a map, collecting problems instead of stopping at the first.
pub(super) struct Reader<'a> {
    env: &'a EnvMap,
    /// The flag each key was given by, when a flag gave it.
    flags: BTreeMap<&'static str, &'static str>,
    problems: Vec<Problem>,
}

impl<'a> Reader<'a> {
    pub(super) fn raw(&self, key: &str) -> String {
        self.env
            .get(key)
            .cloned()
            .unwrap_or_else(|| default_of(key).to_string())
    }

    /// A problem with `key`, named as the user gave it: by its flag when a
    /// flag set it, else by the key.
    pub(super) fn problem(&mut self, key: &str, message: impl Into<String>) {
        let name = match self.flags.get(key) {
            Some(long) => format!("--{long}"),
            None => key.to_string(),
        };
        self.problems.push(Problem {
            key: name,
            message: message.into(),
        });
    }

    pub(super) fn string(&mut self, key: &str) -> String {
        self.raw(key).trim().to_string()
    }

    pub(super) fn non_empty(&mut self, key: &str) -> String {
        let value = self.string(key);
        if value.is_empty() {
            self.problem(key, "must not be empty");
        }
        value
    }

    pub(super) fn port(&mut self, key: &str) -> u16 {
        let raw = self.string(key);
        match raw.parse::<u16>() {
            Ok(port) if port > 0 => port,
            _ => {
                self.problem(key, format!("`{raw}` is not a port number (1-65535)"));
                0
            }
        }
    }

    pub(super) fn positive(&mut self, key: &str) -> u64 {
        let raw = self.string(key);
        match raw.parse::<u64>() {
            Ok(n) if n > 0 => n,
            _ => {
                self.problem(key, format!("`{raw}` is not a positive whole number"));
                1
            }
        }
    }

    /// A whole number, 0 included.
    pub(super) fn whole(&mut self, key: &str) -> u64 {
        let raw = self.string(key);
        raw.parse::<u64>().unwrap_or_else(|_| {
            self.problem(key, format!("`{raw}` is not a whole number"));
            0
        })
    }

    pub(super) fn boolean(&mut self, key: &str) -> bool {
        let raw = self.string(key);
        match raw.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => true,
            "false" | "0" | "no" | "off" => false,
            _ => {
                self.problem(key, format!("`{raw}` is not true or false"));
                false
            }
        }
    }

    pub(super) fn identifier(&mut self, key: &str) -> String {
        let value = self.string(key);
        let valid = !value.is_empty()
            && value.len() <= 63
            && value
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            self.problem(
                key,
                format!("`{value}` must be 1-63 characters of a-z, 0-9 and _"),
            );
        }
        value
    }

    pub(super) fn duration(&mut self, key: &str) -> Duration {
        let raw = self.string(key);
        match parse_duration(&raw) {
            Some(duration) => duration,
            None => {
                self.problem(
                    key,
                    format!("`{raw}` is not a duration (use e.g. 250ms, 10s, 5m)"),
                );
                Duration::ZERO
            }
        }
    }

    /// A duration, or `off` (also `0`): `None`.
    pub(super) fn duration_or_off(&mut self, key: &str) -> Option<Duration> {
        let raw = self.string(key);
        if raw.eq_ignore_ascii_case("off") {
            return None;
        }
        match parse_duration(&raw) {
            Some(duration) if duration.is_zero() => None,
            Some(duration) => Some(duration),
            None => {
                self.problem(
                    key,
                    format!("`{raw}` is not a duration (use e.g. 1s, 10s, 1m) or off"),
                );
                None
            }
        }
    }
}

/// Parses `250ms`, `10s`, `5m`, `1h`; a bare number means seconds.
pub fn parse_duration(raw: &str) -> Option<Duration> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (digits, unit) = raw.split_at(split);
    let amount: u64 = digits.parse().ok()?;
    let millis = match unit.trim() {
        "ms" => amount,
        "" | "s" => amount.checked_mul(1_000)?,
        "m" => amount.checked_mul(60_000)?,
        "h" => amount.checked_mul(3_600_000)?,
        _ => return None,
    };
    Some(Duration::from_millis(millis))
}

impl Config {
    /// Builds and validates the configuration from a map of variables.
    pub fn from_env(env: &EnvMap) -> Result<Config, ConfigError> {
        Config::load(env, &[])
    }

    /// Builds and validates the configuration from a map of variables and
    /// the values of flags, which win; a problem with a value a flag gave
    /// names the flag (`--workers`), one the environment gave names its key.
    pub fn load(env: &EnvMap, flags: &[(Flag, String)]) -> Result<Config, ConfigError> {
        let mut merged = env.clone();
        let mut given_by = BTreeMap::new();
        for (flag, value) in flags {
            merged.insert(flag.key.to_string(), value.clone());
            given_by.insert(flag.key, flag.long);
        }
        let mut r = Reader {
            env: &merged,
            flags: given_by,
            problems: Vec::new(),
        };
        for key in env.keys() {
            if let Some(known) = misspelt(key) {
                r.problem(key, format!("unknown key; did you mean {known}?"));
            }
        }
        let postgres = PostgresConfig {
            host: r.non_empty("POSTGRES_HOST"),
            port: r.port("POSTGRES_PORT"),
            database: r.non_empty("POSTGRES_DB"),
            user: r.non_empty("POSTGRES_USER"),
            password: Secret::new(r.raw("POSTGRES_PASSWORD")),
            connect_timeout: r.duration("POSTGRES_CONNECT_TIMEOUT"),
        };
        let mongo_uri = r.non_empty("MONGODB_URI");
        if let Some(problem) = redact::uri_problem(&mongo_uri) {
            r.problem("MONGODB_URI", problem);
        }
        let mongodb = MongoConfig {
            uri: Secret::new(mongo_uri),
            database: r.non_empty("MONGODB_DB"),
            read_chunk: usize::try_from(r.positive("MONGODB_READ_CHUNK")).unwrap_or(usize::MAX),
        };
        let source_raw = r.string("SOURCE");
        let source = SourceKind::parse(&source_raw).unwrap_or_else(|| {
            r.problem(
                "SOURCE",
                format!("`{source_raw}` is not one of: replication, polling, kafka"),
            );
            SourceKind::Replication
        });
        let replication = ReplicationConfig {
            slot: r.identifier("REPLICATION_SLOT"),
            publication: r.identifier("PUBLICATION"),
        };
        let polling = PollingConfig {
            workers: r.positive("POLL_WORKERS") as usize,
            lease: r.duration("POLL_LEASE"),
            interval: r.duration("POLL_INTERVAL"),
        };
        let pipeline = PipelineConfig {
            batch_size: r.positive("BATCH_SIZE") as usize,
            batch_wait: r.duration("BATCH_WAIT"),
            document_cache: usize::try_from(r.whole("DOCUMENT_CACHE")).unwrap_or(usize::MAX),
            max_retries: r.positive("MAX_RETRIES").min(u64::from(u32::MAX)) as u32,
            backoff_initial: r.duration("RETRY_BACKOFF_INITIAL"),
            backoff_max: r.duration("RETRY_BACKOFF_MAX"),
            mark_processed: r.boolean("MARK_PROCESSED"),
            shutdown_timeout: r.duration("SHUTDOWN_TIMEOUT"),
        };
        let kafka = kafka::kafka_config(&mut r, &replication.slot);
        let metrics_addr = match crate::observe::parse_metrics_addr(&r.raw("METRICS_ADDR")) {
            Ok(addr) => addr,
            Err(problem) => {
                // Named once, by the problem's key.
                let problem = problem.trim_start_matches("METRICS_ADDR ").to_string();
                r.problem("METRICS_ADDR", problem);
                None
            }
        };
        let console_token = Some(r.raw("CONSOLE_TOKEN"))
            .map(|token| token.trim().to_string())
            .filter(|token| !token.is_empty())
            .map(Secret::new);
        let heartbeat_interval = r.duration_or_off("HEARTBEAT_INTERVAL");
        let log_level = r.non_empty("LOG_LEVEL");
        if let Some(problem) = log_filter_problem(&log_level) {
            r.problem("LOG_LEVEL", problem);
        }
        let log_format = match r.string("LOG_FORMAT").to_ascii_lowercase().as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                r.problem("LOG_FORMAT", format!("`{other}` is not one of: text, json"));
                LogFormat::Text
            }
        };
        if postgres.connect_timeout.is_zero() && r.problems.is_empty() {
            r.problem("POSTGRES_CONNECT_TIMEOUT", "must be greater than zero");
        }
        if r.problems.is_empty() {
            Ok(Config {
                postgres,
                mongodb,
                source,
                replication,
                polling,
                pipeline,
                kafka,
                metrics_addr,
                console_token,
                heartbeat_interval,
                log_level,
                log_format,
            })
        } else {
            Err(ConfigError::Invalid(r.problems))
        }
    }
}

/// Why a `LOG_LEVEL` value is not a filter, if it is not: a level
/// (`error`, `warn`, `info`, `debug`, `trace`, `off`) or a directive list
/// (`info,activity_event_processor=debug`). A bare word that is not a level
/// would parse as a target's name and silence every other log line.
fn log_filter_problem(value: &str) -> Option<String> {
    const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];
    let hint = "give error, warn, info, debug, trace or off, or a directive list such as info,activity_event_processor=debug";
    if value.is_empty() {
        return None; // said already: must not be empty
    }
    let bare_word = !value.contains(['=', ',', '[', ':']);
    if bare_word && !LEVELS.contains(&value.to_ascii_lowercase().as_str()) {
        return Some(format!("`{value}` is not a log level: {hint}"));
    }
    match tracing_subscriber::EnvFilter::try_new(value) {
        Ok(_) => None,
        Err(err) => Some(format!("`{value}` is not a log filter ({err}): {hint}")),
    }
}
