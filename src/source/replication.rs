//! Logical replication capture (being written: this interim stub only fixes the API).

use super::{AckToken, BatchOutcome, Source, SourceBatch, SourceError};
use crate::config::PostgresConfig;

#[derive(Debug, Clone)]
pub struct ReplicationOptions {
    pub slot: String,
    pub publication: String,
}

pub struct ReplicationSource;

impl ReplicationSource {
    pub async fn start(
        _pg: &PostgresConfig,
        _options: ReplicationOptions,
        _resume: Option<u64>,
    ) -> Result<ReplicationSource, SourceError> {
        Err(SourceError::Fatal(
            "replication capture is not built yet".into(),
        ))
    }
}

impl Source for ReplicationSource {
    async fn next_batch(
        &mut self,
        _max_events: usize,
        _max_wait: std::time::Duration,
    ) -> Result<Option<SourceBatch>, SourceError> {
        Ok(None)
    }
    async fn ack(&mut self, _token: AckToken, _outcome: &BatchOutcome) -> Result<(), SourceError> {
        Ok(())
    }
    async fn caught_up(&mut self) -> Result<bool, SourceError> {
        Ok(false)
    }
}
