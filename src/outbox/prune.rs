//! Retention: `prune` deletes `processed` outbox rows older than a given
//! age, in bounded batches (each its own short transaction, so neither the
//! write side nor the capture waits long). Unfinished rows (`pending`,
//! `processing`, `retry`) and dead-lettered ones (`failed`) are never
//! touched: the capture, the polling claims and the stuck-row sweep only
//! ever look at unfinished rows, and the dead letters' rows are what
//! `dead-letters retry` re-emits from.
//!
//! The replication capture publishes inserts only, and ignores the
//! `DELETE`s in the WAL even where a publication also publishes them; a
//! Debezium stream's deletes (`op: d`) are skipped likewise.

use super::OutboxError;
use chrono::{DateTime, Utc};
use std::time::Duration;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

/// Rows deleted per statement unless told otherwise.
pub const BATCH: i64 = 5_000;

/// What a prune did.
#[derive(Debug, Clone, PartialEq)]
pub struct Pruned {
    /// Rows were deleted if `created_at` was before this.
    pub cutoff: DateTime<Utc>,
    pub deleted: u64,
    pub batches: u64,
    /// Stopped by an interrupt before the end.
    pub interrupted: bool,
}

/// The database's own `now()` less `age` (the rows' times are the
/// database's).
pub async fn cutoff(client: &Client, age: Duration) -> Result<DateTime<Utc>, OutboxError> {
    let millis = i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
    let row = client
        .query_one(
            "SELECT now() - $1::bigint * interval '1 millisecond'",
            &[&millis],
        )
        .await
        .map_err(|e| OutboxError::query("cannot read the database's clock", e))?;
    Ok(row.get(0))
}

/// Deletes the `processed` rows created before `cutoff`, `batch` at a
/// time, until none is left or `stop` is cancelled; `progress` hears the
/// running total after each batch.
pub async fn prune(
    client: &Client,
    cutoff: DateTime<Utc>,
    batch: i64,
    stop: &CancellationToken,
    progress: &mut dyn FnMut(u64),
) -> Result<Pruned, OutboxError> {
    let statement = client
        .prepare(
            "DELETE FROM event_outbox WHERE event_id IN (
                 SELECT event_id FROM event_outbox
                 WHERE status = 'processed' AND created_at < $1
                 LIMIT $2 FOR UPDATE SKIP LOCKED)
             AND status = 'processed'",
        )
        .await
        .map_err(|e| OutboxError::query("cannot prepare the prune", e))?;
    let mut pruned = Pruned {
        cutoff,
        deleted: 0,
        batches: 0,
        interrupted: false,
    };
    loop {
        if stop.is_cancelled() {
            pruned.interrupted = true;
            return Ok(pruned);
        }
        let deleted = client
            .execute(&statement, &[&cutoff, &batch.max(1)])
            .await
            .map_err(|e| OutboxError::query("cannot delete processed outbox rows", e))?;
        if deleted == 0 {
            return Ok(pruned);
        }
        pruned.deleted += deleted;
        pruned.batches += 1;
        progress(pruned.deleted);
    }
}

/// Rows left unfinished (`pending`, `processing`, `retry`) and dead-lettered
/// (`failed`), which a prune keeps whatever their age.
pub async fn kept(client: &Client) -> Result<(i64, i64), OutboxError> {
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE status IN ('pending', 'processing', 'retry')),
                    count(*) FILTER (WHERE status = 'failed')
             FROM event_outbox",
            &[],
        )
        .await
        .map_err(|e| OutboxError::query("cannot count the outbox rows", e))?;
    Ok((row.get(0), row.get(1)))
}
