//! `--sink discard`: applies nothing. Every event counts as applied and each
//! batch is acknowledged at once, so that a source can be measured alone.
//! No checkpoint is kept: replication resumes from the slot's own position.

use super::{Sink, SinkReport};
use crate::source::SourceBatch;
use std::convert::Infallible;

/// The sink that writes nothing.
#[derive(Debug, Clone, Default)]
pub struct DiscardSink;

impl Sink for DiscardSink {
    type Error = Infallible;

    async fn apply<A: Sync>(&mut self, batch: &SourceBatch<A>) -> Result<SinkReport, Infallible> {
        Ok(SinkReport {
            applied: batch.events.len(),
            dead_letters: batch.malformed.clone(),
            ..SinkReport::default()
        })
    }
}
