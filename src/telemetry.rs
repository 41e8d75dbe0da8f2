//! Logging (and, as the pipeline grows, metrics): set up once, in one place.

use crate::config::LogFormat;
use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

/// Installs the global `tracing` subscriber, writing to stderr so that stdout
/// stays for command output (`status --json`, `decode`).
pub fn init_logging(level: &str, format: LogFormat) {
    // PostgreSQL NOTICEs ("relation already exists, skipping") and the
    // replication crate's per-acknowledgement chatter are not news.
    let directives = format!("{level},tokio_postgres=warn,pg_walstream=warn");
    let filter = EnvFilter::try_new(&directives).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    // Already installed (tests call this more than once): keep the first.
    let _ = result;
}
