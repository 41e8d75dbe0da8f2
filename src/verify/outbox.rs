//! The outbox folded with the reference fold: every row, whatever its
//! status, in `sequence_id` order, read through a server-side cursor in one
//! read-only snapshot (memory holds one chunk of rows, never the table).

use crate::decode::decode_text_row;
use crate::outbox::{describe, OutboxError};
use crate::projection::fold::ReferenceFold;
use crate::source::replication::EVENT_COLUMNS;
use std::collections::BTreeSet;
use tokio_postgres::{Client, SimpleQueryMessage};
use uuid::Uuid;

/// Rows fetched from the cursor at a time.
pub const CHUNK: usize = 5_000;

/// One row: (column, value as text).
pub type Columns<'a> = [(&'a str, Option<&'a str>)];

/// The cursor verify reads the outbox with.
const CURSOR: &str = "aep_verify";

/// The columns read: an event's, and the row's status.
fn columns() -> impl Iterator<Item = &'static str> {
    EVENT_COLUMNS.into_iter().chain(["status"])
}

/// The fold of the outbox and what was seen on the way.
#[derive(Debug, Default)]
pub struct Folded {
    pub fold: ReferenceFold,
    pub rows: u64,
    /// Rows that do not decode (the processor dead-letters them as they are).
    pub malformed: u64,
    /// Rows still `pending`, `processing` or `retry`: events whose effects
    /// the read models may not show yet.
    pub unfinished: u64,
    /// The aggregate asked about, and how many rows are its own.
    pub aggregate: Option<(Uuid, u64)>,
    /// Events MongoDB refused to store (their letters say so): the
    /// processor dead-lettered them, which the fold cannot foresee.
    pub refused: BTreeSet<Uuid>,
}

/// Folds the whole outbox, counting the rows of `aggregate` and
/// dead-lettering the `refused` events; `progress` hears the rows folded so
/// far after each chunk.
pub async fn fold(
    client: &Client,
    aggregate: Option<Uuid>,
    refused: BTreeSet<Uuid>,
    progress: &mut dyn FnMut(u64),
) -> Result<Folded, OutboxError> {
    open_cursor(client, CURSOR).await?;
    let mut folded = Folded {
        aggregate: aggregate.map(|id| (id, 0)),
        refused,
        ..Folded::default()
    };
    while folded.fetch(client).await? == CHUNK {
        progress(folded.rows);
    }
    progress(folded.rows);
    close(client).await;
    Ok(folded)
}

/// One read-only snapshot, and the cursor `name` over every row (the event's
/// columns and its status, as text) in `sequence_id` order.
pub async fn open_cursor(client: &Client, name: &str) -> Result<(), OutboxError> {
    // `ORDER BY` names the table's column: the bare name would be the
    // output column, its text.
    let select = format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; \
         DECLARE {name} NO SCROLL CURSOR FOR \
         SELECT {} FROM event_outbox ORDER BY event_outbox.sequence_id",
        columns()
            .map(|c| format!("{c}::text"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    client
        .batch_execute(&select)
        .await
        .map_err(|e| OutboxError::query("cannot read the outbox", e))
}

/// The next [`CHUNK`] rows of the cursor `name`, each to `take` as
/// (column, value) pairs; how many there were.
pub async fn fetch(
    client: &Client,
    name: &str,
    take: &mut dyn FnMut(&Columns),
) -> Result<usize, OutboxError> {
    let messages = client
        .simple_query(&format!("FETCH FORWARD {CHUNK} FROM {name}"))
        .await
        .map_err(|e| OutboxError::query("reading the outbox failed", e))?;
    let mut rows = 0;
    for message in &messages {
        if let SimpleQueryMessage::Row(row) = message {
            let columns: Vec<(&str, Option<&str>)> = columns()
                .enumerate()
                .map(|(i, name)| (name, row.try_get(i).ok().flatten()))
                .collect();
            take(&columns);
            rows += 1;
        }
    }
    Ok(rows)
}

/// Ends the snapshot the cursor was read in.
pub async fn close(client: &Client) {
    if let Err(err) = client.batch_execute("COMMIT").await {
        tracing::debug!(error = %describe(&err), "closing the outbox snapshot");
    }
}

impl Folded {
    /// Folds the next chunk of the cursor; the rows it held.
    async fn fetch(&mut self, client: &Client) -> Result<usize, OutboxError> {
        fetch(client, CURSOR, &mut |columns| self.take(columns)).await
    }

    /// Folds one row, as the processor would apply it.
    fn take(&mut self, columns: &[(&str, Option<&str>)]) {
        self.rows += 1;
        let status = columns.iter().find(|(name, _)| *name == "status");
        if let Some((_, Some("pending" | "processing" | "retry"))) = status {
            self.unfinished += 1;
        }
        match decode_text_row(columns) {
            Ok(event) => {
                if let Some((id, rows)) = &mut self.aggregate {
                    *rows += u64::from(event.aggregate_id == *id);
                }
                if self.refused.contains(&event.event_id) {
                    self.fold.dead_letter(event.event_id, event.aggregate_id);
                } else {
                    self.fold.apply(&event);
                }
            }
            Err(_) => {
                self.malformed += 1;
                let uuid = |wanted: &str| {
                    columns
                        .iter()
                        .find(|(name, _)| *name == wanted)
                        .and_then(|(_, value)| Uuid::parse_str((*value)?).ok())
                        .unwrap_or_else(Uuid::nil)
                };
                self.fold
                    .dead_letter(uuid("event_id"), uuid("aggregate_id"));
            }
        }
    }
}
