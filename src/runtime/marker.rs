//! Outbox marking: the rows of a batch whose effects are durable become
//! `processed` (or `failed`, for its dead letters), for sources that do not
//! claim rows themselves (replication, with `MARK_PROCESSED`).

use crate::checkpoint::mark_outbox;
use crate::config::PostgresConfig;
use crate::decode::OutboxEvent;
use crate::outbox::{self, OutboxError};
use crate::policy::{Classify, ErrorClass};
use crate::source::BatchOutcome;
use std::collections::BTreeSet;
use tokio_postgres::Client;
use uuid::Uuid;

/// Why rows could not be marked.
#[derive(Debug, thiserror::Error)]
pub enum MarkError {
    /// PostgreSQL is unreachable: transient.
    #[error("cannot connect to mark outbox rows")]
    Connect(#[source] OutboxError),
    /// The statement failed; its class decides.
    #[error("cannot mark outbox rows{}", sqlstate(.0))]
    Statement(#[source] tokio_postgres::Error),
}

fn sqlstate(err: &tokio_postgres::Error) -> String {
    match err.code() {
        Some(code) => format!(" (SQLSTATE {})", code.code()),
        None => String::new(),
    }
}

impl Classify for MarkError {
    fn class(&self) -> ErrorClass {
        match self {
            MarkError::Connect(_) => ErrorClass::Transient,
            MarkError::Statement(err) => err.class(),
        }
    }

    fn retry_class(&self) -> crate::policy::RetryClass {
        match self {
            MarkError::Connect(err) => err.retry_class(),
            MarkError::Statement(err) => err.retry_class(),
        }
    }
}

impl MarkError {
    /// What an operator does about it, when it stops the process.
    pub fn advice(&self) -> &'static str {
        match self {
            MarkError::Statement(err)
                if err.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) =>
            {
                "give the processor's role UPDATE on event_outbox, or set MARK_PROCESSED=false"
            }
            _ => "fix the database error and start again, or set MARK_PROCESSED=false",
        }
    }
}

/// Marks outbox rows after their effects are durable.
pub struct OutboxMarker {
    pg: PostgresConfig,
    client: Option<Client>,
}

impl OutboxMarker {
    pub fn new(pg: PostgresConfig) -> OutboxMarker {
        OutboxMarker { pg, client: None }
    }

    /// Applied events become `processed`, dead-lettered ones `failed`.
    pub async fn mark(
        &mut self,
        events: &[OutboxEvent],
        outcome: &BatchOutcome,
    ) -> Result<(), MarkError> {
        let client = match self.client.take() {
            Some(client) if !client.is_closed() => client,
            _ => outbox::connect(&self.pg)
                .await
                .map_err(MarkError::Connect)?,
        };
        let dead: BTreeSet<Uuid> = outcome
            .dead_letters
            .iter()
            .map(|d| d.event.event_id)
            .collect();
        let applied: Vec<Uuid> = events
            .iter()
            .map(|e| e.event_id)
            .filter(|id| !dead.contains(id))
            .collect();
        let marked = mark_outbox(&client, &applied, &outcome.dead_letters).await;
        if marked.is_ok() {
            self.client = Some(client);
        }
        marked.map_err(MarkError::Statement)
    }
}
