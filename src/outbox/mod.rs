//! The write side's PostgreSQL outbox: connections, schema migrations, the seed
//! events and the `status` summary. Capture (reading the outbox as a stream)
//! lives in `source`.

pub mod load;
pub mod migrate;
pub mod prune;
pub mod seed;
pub mod status;

use crate::config::PostgresConfig;
use crate::policy::{RetryClass, Summarise, Summarised};
use tokio_postgres::{Client, NoTls};

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("cannot connect to PostgreSQL at {target}")]
    Connect {
        target: String,
        #[source]
        source: PgError,
    },
    #[error("{context}")]
    Query {
        context: &'static str,
        #[source]
        source: PgError,
    },
    #[error(transparent)]
    Migrate(#[from] migrate::MigrateError),
}

impl OutboxError {
    pub(crate) fn query(context: &'static str, source: tokio_postgres::Error) -> Self {
        OutboxError::Query {
            context,
            source: Summarised(source),
        }
    }
}

/// The PostgreSQL driver's error, shown as [`describe`] gives it: one line,
/// the server's own message when there is one (the driver's `Display`
/// repeats its cause and a server error's DETAIL takes a line of its own).
pub type PgError = Summarised<tokio_postgres::Error>;

impl Summarise for tokio_postgres::Error {
    fn summary(&self) -> String {
        describe(self)
    }
}

/// The most useful one-line account of a PostgreSQL error: the server's own
/// message when there is one, else the chain of causes.
pub fn describe(err: &tokio_postgres::Error) -> String {
    if let Some(db) = err.as_db_error() {
        return match db.detail() {
            Some(detail) => format!("{} ({detail})", db.message()),
            None => db.message().to_string(),
        };
    }
    crate::policy::describe(err)
}

/// Opens one connection and drives it on the runtime.
pub async fn connect(config: &PostgresConfig) -> Result<Client, OutboxError> {
    let (client, connection) = config
        .to_client_config()
        .connect(NoTls)
        .await
        .map_err(|err| OutboxError::Connect {
            target: config.display_target(),
            source: Summarised(err),
        })?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(error = %describe(&err), "postgres connection closed");
        }
    });
    Ok(client)
}

impl crate::policy::Classify for tokio_postgres::Error {
    fn class(&self) -> crate::policy::ErrorClass {
        use tokio_postgres::error::SqlState;
        match self.code() {
            None => crate::policy::ErrorClass::Transient,
            Some(code)
                if code == &SqlState::ADMIN_SHUTDOWN
                    || code == &SqlState::CRASH_SHUTDOWN
                    || code == &SqlState::CANNOT_CONNECT_NOW
                    || code == &SqlState::T_R_SERIALIZATION_FAILURE
                    || code == &SqlState::T_R_DEADLOCK_DETECTED
                    || code == &SqlState::TOO_MANY_CONNECTIONS =>
            {
                crate::policy::ErrorClass::Transient
            }
            Some(_) => crate::policy::ErrorClass::Fatal,
        }
    }

    /// The server's SQLSTATE ([`sqlstate_retry_class`]); without one, a
    /// closed connection or an I/O error is `connection` (`timeout` when
    /// it timed out).
    fn retry_class(&self) -> RetryClass {
        if let Some(code) = self.code() {
            return sqlstate_retry_class(code.code());
        }
        if self.is_closed() {
            return RetryClass::Connection;
        }
        RetryClass::of_io_cause(self).unwrap_or(RetryClass::Other)
    }
}

/// What kind of outage a PostgreSQL SQLSTATE is: class 08 (connection
/// exception) `connection`; 57P01-57P03 (terminated by an administrator,
/// crash, shutting down or starting up) and class 53 (too many connections,
/// out of resources) `unavailable`; 57014 (statement cancelled or timed
/// out), 25P03 and 57P05 (idle timeouts) `timeout`; 40001, 40P01
/// (serialization failure, deadlock), 55P03 (lock not available) and 55006
/// (object in use, e.g. a slot another walsender holds) `conflict`.
pub fn sqlstate_retry_class(code: &str) -> RetryClass {
    match code {
        "57P01" | "57P02" | "57P03" => RetryClass::Unavailable,
        "57014" | "25P03" | "57P05" => RetryClass::Timeout,
        "40001" | "40P01" | "55P03" | "55006" => RetryClass::Conflict,
        _ if code.starts_with("08") => RetryClass::Connection,
        _ if code.starts_with("53") => RetryClass::Unavailable,
        _ => RetryClass::Other,
    }
}

impl OutboxError {
    /// What kind of outage it is, when retried (see [`sqlstate_retry_class`]).
    pub fn retry_class(&self) -> RetryClass {
        use crate::policy::Classify;
        match self {
            OutboxError::Connect { source, .. } | OutboxError::Query { source, .. } => {
                source.get().retry_class()
            }
            OutboxError::Migrate(_) => RetryClass::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Classify;

    #[test]
    fn sqlstates_are_sorted_into_retry_classes() {
        for (code, class) in [
            ("08006", RetryClass::Connection),
            ("08001", RetryClass::Connection),
            ("57P01", RetryClass::Unavailable),
            ("57P03", RetryClass::Unavailable),
            ("53300", RetryClass::Unavailable),
            ("57014", RetryClass::Timeout),
            ("40001", RetryClass::Conflict),
            ("40P01", RetryClass::Conflict),
            ("55006", RetryClass::Conflict),
            ("23505", RetryClass::Other),
        ] {
            assert_eq!(sqlstate_retry_class(code), class, "{code}");
        }
    }

    /// Real driver errors: a refused connection, a name that does not
    /// resolve.
    #[tokio::test]
    async fn driver_errors_are_sorted_into_retry_classes() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        let port = listener.local_addr().expect("its address").port();
        drop(listener);
        let config = |host: &str, port: u16| {
            let mut config = tokio_postgres::Config::new();
            config
                .host(host)
                .port(port)
                .user("nobody")
                .connect_timeout(std::time::Duration::from_millis(300));
            config
        };
        let refused = config("127.0.0.1", port)
            .connect(NoTls)
            .await
            .map(|_| ())
            .expect_err("nothing listens there");
        assert_eq!(refused.retry_class(), RetryClass::Connection, "{refused:?}");
        let unresolved = config("no-such-host.invalid", 5432)
            .connect(NoTls)
            .await
            .map(|_| ())
            .expect_err("no such name");
        assert_eq!(
            unresolved.retry_class(),
            RetryClass::Connection,
            "{unresolved:?}"
        );
    }
}
