//! The initial snapshot: every row of the outbox as of the slot's consistent
//! point, read through the snapshot the slot exported, in `sequence_id` order,
//! one chunk at a time from a server-side cursor (memory does not grow with the
//! table). While a chunk is being applied, the next one is already fetched.

use super::setup::{connect_text, query_error};
use super::{decode_row, EVENT_COLUMNS as COLUMNS};
use crate::config::PostgresConfig;
use crate::dead_letter::DeadLetter;
use crate::decode::OutboxEvent;
use crate::source::SourceError;
use std::sync::Arc;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, SimpleQueryMessage};

/// The most rows one chunk holds, whatever batch size is asked for.
const MAX_FETCH: usize = 50_000;

pub(super) struct Snapshot {
    client: Arc<Client>,
    /// The next chunk, being fetched.
    ahead: Option<JoinHandle<Result<Chunk, SourceError>>>,
    /// The slot's consistent point: the snapshot holds every transaction
    /// committed before it, the stream every one committed after.
    pub consistent_point: u64,
    pub rows: u64,
}

/// One chunk of the snapshot.
pub(super) struct Chunk {
    pub events: Vec<OutboxEvent>,
    pub malformed: Vec<DeadLetter>,
    /// The cursor is exhausted: this was the last chunk.
    pub last: bool,
}

impl Snapshot {
    /// Imports the exported snapshot (or, with `None`, takes one now) on a
    /// connection of its own and opens the cursor. Once imported, the snapshot
    /// no longer depends on the replication connection.
    pub(super) async fn open(
        pg: &PostgresConfig,
        snapshot_name: Option<&str>,
        consistent_point: u64,
    ) -> Result<Snapshot, SourceError> {
        let client = connect_text(pg).await?;
        let import = snapshot_name
            .map(|name| format!("SET TRANSACTION SNAPSHOT '{}'; ", name.replace('\'', "''")))
            .unwrap_or_default();
        let sql = format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; {import}\
             DECLARE aep_outbox_snapshot NO SCROLL CURSOR FOR \
             SELECT {} FROM event_outbox ORDER BY sequence_id",
            COLUMNS.join(", "),
        );
        client
            .batch_execute(&sql)
            .await
            .map_err(|err| query_error("cannot open the initial snapshot", &err))?;
        Ok(Snapshot {
            client: Arc::new(client),
            ahead: None,
            consistent_point,
            rows: 0,
        })
    }

    /// The next at most `max` rows (at most [`MAX_FETCH`]); unless they
    /// are the last, the chunk after them is fetched meanwhile. (A chunk
    /// fetched ahead holds as many rows as the call before asked for: the
    /// runtime always asks for its batch size.)
    pub(super) async fn fetch(&mut self, max: usize) -> Result<Chunk, SourceError> {
        let max = max.clamp(1, MAX_FETCH);
        let chunk = match &mut self.ahead {
            // Awaited in place: a caller that gives up midway finds it again.
            Some(task) => {
                let fetched = task.await;
                self.ahead = None;
                fetched.map_err(|err| {
                    SourceError::Transient(format!("reading the initial snapshot: {err}"))
                })??
            }
            None => fetch(self.client.clone(), max).await?,
        };
        if !chunk.last {
            self.ahead = Some(tokio::spawn(fetch(self.client.clone(), max)));
        }
        self.rows += (chunk.events.len() + chunk.malformed.len()) as u64;
        Ok(chunk)
    }

    /// Ends the snapshot's transaction.
    pub(super) async fn finish(mut self) -> Result<(), SourceError> {
        if let Some(task) = self.ahead.take() {
            // Its rows are not wanted; the statement must end before COMMIT.
            let _ = task.await;
        }
        self.client
            .batch_execute("COMMIT")
            .await
            .map_err(|err| query_error("closing the initial snapshot", &err))
    }
}

/// One chunk of at most `max` rows from the snapshot's cursor.
async fn fetch(client: Arc<Client>, max: usize) -> Result<Chunk, SourceError> {
    let messages = client
        .simple_query(&format!("FETCH FORWARD {max} FROM aep_outbox_snapshot"))
        .await
        .map_err(|err| query_error("reading the initial snapshot", &err))?;
    let mut events = Vec::with_capacity(messages.len());
    let mut malformed = Vec::new();
    let mut fetched = 0usize;
    for message in &messages {
        let SimpleQueryMessage::Row(row) = message else {
            continue;
        };
        fetched += 1;
        let mut columns = [("", None); COLUMNS.len()];
        for (i, (slot, name)) in columns.iter_mut().zip(COLUMNS).enumerate() {
            *slot = (name, row.try_get(i).ok().flatten());
        }
        match decode_row(&columns) {
            Ok(event) => events.push(event),
            Err(letter) => malformed.push(*letter),
        }
    }
    Ok(Chunk {
        events,
        malformed,
        last: fetched < max,
    })
}
