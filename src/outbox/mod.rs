//! The write side's PostgreSQL outbox: connections, schema migrations, the seed
//! events and the `status` summary. Capture (reading the outbox as a stream)
//! lives in `source`.

pub mod load;
pub mod migrate;
pub mod prune;
pub mod seed;
pub mod status;

use crate::config::PostgresConfig;
use crate::policy::{Summarise, Summarised};
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
}
