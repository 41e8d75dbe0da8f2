//! Bulk loading of events into the outbox with binary `COPY` (the fastest way
//! in), for loading many generated events at once. The write side itself
//! inserts row by row.

use super::OutboxError;
use crate::decode::OutboxEvent;
use futures::pin_mut;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{Json, Type};
use tokio_postgres::Client;

/// Inserts `events` as pending rows, keeping their `sequence_id` (or letting
/// the sequence assign one when it is `None`), then moves the sequence past
/// the highest id so later inserts do not collide. Returns the rows written.
pub async fn copy_events(client: &Client, events: &[OutboxEvent]) -> Result<u64, OutboxError> {
    let (with_seq, without): (Vec<&OutboxEvent>, Vec<&OutboxEvent>) =
        events.iter().partition(|e| e.sequence_id.is_some());
    let mut written = 0;
    if !with_seq.is_empty() {
        let sink = client
            .copy_in(
                "COPY event_outbox (event_id, sequence_id, aggregate_id, aggregate_type, event_type, payload, created_at) FROM STDIN BINARY",
            )
            .await
            .map_err(|e| OutboxError::query("cannot start COPY into event_outbox", e))?;
        let writer = BinaryCopyInWriter::new(
            sink,
            &[
                Type::UUID,
                Type::INT8,
                Type::UUID,
                Type::VARCHAR,
                Type::VARCHAR,
                Type::JSONB,
                Type::TIMESTAMPTZ,
            ],
        );
        pin_mut!(writer);
        for e in &with_seq {
            let created_at = e.created_at.unwrap_or_else(chrono::Utc::now);
            writer
                .as_mut()
                .write(&[
                    &e.event_id,
                    &e.sequence_id,
                    &e.aggregate_id,
                    &e.aggregate_type,
                    &e.event_type,
                    &Json(&e.payload),
                    &created_at,
                ])
                .await
                .map_err(|err| OutboxError::query("COPY into event_outbox failed", err))?;
        }
        written += writer
            .finish()
            .await
            .map_err(|e| OutboxError::query("COPY into event_outbox failed", e))?;
        client
            .execute(
                "SELECT setval(pg_get_serial_sequence('event_outbox', 'sequence_id'),
                               greatest((SELECT max(sequence_id) FROM event_outbox), 1))",
                &[],
            )
            .await
            .map_err(|e| OutboxError::query("cannot move the sequence", e))?;
    }
    for e in without {
        written += client
            .execute(
                "INSERT INTO event_outbox (event_id, aggregate_id, aggregate_type, event_type, payload, created_at)
                 VALUES ($1, $2, $3, $4, $5, coalesce($6, now()))",
                &[&e.event_id, &e.aggregate_id, &e.aggregate_type, &e.event_type, &Json(&e.payload), &e.created_at],
            )
            .await
            .map_err(|err| OutboxError::query("cannot insert an event", err))?;
    }
    Ok(written)
}
