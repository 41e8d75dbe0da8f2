//! Logging (and, as the pipeline grows, metrics): set up once, in one place.

use crate::config::LogFormat;
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// Installs the global `tracing` subscriber, writing to stderr so that stdout
/// stays for command output (`status --json`, `decode`). Every line is cleared
/// of `secrets` on its way out, whatever library put them into it.
pub fn init_logging(level: &str, format: LogFormat, secrets: Vec<String>) {
    // PostgreSQL NOTICEs ("relation already exists, skipping") and the
    // replication crate's per-acknowledgement chatter are not news.
    let directives = format!("{level},tokio_postgres=warn,pg_walstream=warn");
    let filter = EnvFilter::try_new(&directives).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Redacting {
            secrets: Arc::new(secrets),
        })
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    // Already installed (tests call this more than once): keep the first.
    let _ = result;
}

/// Stderr, with secrets replaced by `***`. The formatter writes each event
/// with one call, so a secret is never split between two writes.
#[derive(Clone)]
struct Redacting {
    secrets: Arc<Vec<String>>,
}

impl<'a> MakeWriter<'a> for Redacting {
    type Writer = Redacting;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Write for Redacting {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut stderr = std::io::stderr().lock();
        if self.secrets.is_empty() {
            return stderr.write(buf);
        }
        let secrets: Vec<&str> = self.secrets.iter().map(String::as_str).collect();
        let text = crate::config::scrub(&String::from_utf8_lossy(buf), &secrets);
        stderr.write_all(text.as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// An error and its causes on one line, `outer: cause: cause`, as the command
/// line prints them: for log fields and for messages built from an error
/// whose `Display` leaves its cause to its `source`.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::policy::describe(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::Chain;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn a_chain_is_one_line_of_every_cause() {
        let err = Outer(std::io::Error::other("inner"));
        assert_eq!(Chain(&err).to_string(), "outer: inner");
    }
}
