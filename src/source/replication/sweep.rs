//! Nothing stuck: outbox rows the capture has passed without applying.
//!
//! The stream is the source of truth for what to apply, and the outbox status
//! is its witness: every row the pipeline applies or dead-letters is marked
//! before its batch is acknowledged. So a sweep
//! 1. reads the oldest `pending` rows (at most [`CANDIDATES`]),
//! 2. then writes a logical message into the WAL: its position (the
//!    watermark) is past the commit of every row the first read saw,
//! 3. and once the stream has delivered up to the watermark and every batch
//!    before it is acknowledged, reads those rows again: one still `pending`
//!    was committed before a position the capture has passed and is durable,
//!    and yet was never applied. It is re-read from the table and delivered
//!    again (the fenced projections make that safe), and reported.
//!
//! With `MARK_PROCESSED=false` the status says nothing and no sweep runs
//! (docs/design.md, "Nothing stuck").

use super::rows::{decode_row, EVENT_COLUMNS};
use super::setup::{query_error, wal_probe};
use crate::dead_letter::DeadLetter;
use crate::decode::OutboxEvent;
use crate::source::SourceError;
use std::time::{Duration, Instant};
use tokio_postgres::Client;
use uuid::Uuid;

/// The most rows one sweep looks at (the oldest by `sequence_id`).
const CANDIDATES: i64 = 10_000;

/// How often a sweep starts while the stream keeps up.
pub(super) const SWEEP_INTERVAL: Duration = Duration::from_secs(30);

/// A sweep in progress: the rows it watches and the position that proves
/// their commits were streamed.
pub(super) struct Sweep {
    pub candidates: Vec<Uuid>,
    pub watermark: u64,
}

/// What a finished sweep found, ready to be delivered again.
pub(super) struct Stuck {
    pub events: Vec<OutboxEvent>,
    pub malformed: Vec<DeadLetter>,
}

impl Stuck {
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.malformed.is_empty()
    }

    pub fn len(&self) -> usize {
        self.events.len() + self.malformed.len()
    }
}

/// When sweeps run and what they found.
#[derive(Default)]
pub(super) struct Sweeper {
    /// The sweep in progress, and whether it was asked for by `caught_up`.
    pub running: Option<(Sweep, bool)>,
    pub last_start: Option<Instant>,
    /// A sweep asked for by `caught_up` (so started once the stream had
    /// caught up) found nothing stuck.
    pub verified: bool,
    /// `caught_up` asks for a sweep.
    pub want_verify: bool,
    /// Rows found stuck so far (delivered again).
    pub found: u64,
    /// An ordinary connection for the sweep's reads (opened when needed).
    pub admin: Option<Client>,
}

impl Sweeper {
    pub fn due(&self) -> bool {
        self.running.is_none()
            && self
                .last_start
                .is_none_or(|t| t.elapsed() >= SWEEP_INTERVAL)
    }
}

/// Steps 1 and 2: the candidates, then the watermark.
pub(super) async fn start(client: &Client) -> Result<Sweep, SourceError> {
    let rows = client
        .query(
            "SELECT event_id FROM event_outbox WHERE status = 'pending' \
             ORDER BY sequence_id LIMIT $1",
            &[&CANDIDATES],
        )
        .await
        .map_err(|err| query_error("reading pending outbox rows", &err))?;
    let candidates = rows.iter().map(|row| row.get(0)).collect();
    let watermark = wal_probe(client).await?;
    Ok(Sweep {
        candidates,
        watermark,
    })
}

/// Step 3: the candidates still `pending`, read again in full.
pub(super) async fn finish(client: &Client, sweep: &Sweep) -> Result<Stuck, SourceError> {
    let mut stuck = Stuck {
        events: Vec::new(),
        malformed: Vec::new(),
    };
    if sweep.candidates.is_empty() {
        return Ok(stuck);
    }
    let sql = format!(
        "SELECT {} FROM event_outbox WHERE event_id = ANY($1) AND status = 'pending' \
         ORDER BY sequence_id",
        EVENT_COLUMNS
            .iter()
            .map(|c| format!("{c}::text"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    let rows = client
        .query(&sql, &[&sweep.candidates])
        .await
        .map_err(|err| query_error("reading stuck outbox rows", &err))?;
    for row in &rows {
        let mut columns = [("", None); EVENT_COLUMNS.len()];
        for (i, (slot, name)) in columns.iter_mut().zip(EVENT_COLUMNS).enumerate() {
            *slot = (name, row.get::<_, Option<&str>>(i));
        }
        match decode_row(&columns) {
            Ok(event) => stuck.events.push(event),
            Err(letter) => stuck.malformed.push(*letter),
        }
    }
    Ok(stuck)
}
