//! Logical replication capture: the outbox's inserts, decoded from `pgoutput`.
//!
//! Start-up, on the first call and after every transient error:
//! 1. check the server (`wal_level`), the outbox table, and create the
//!    publication of outbox inserts if it is missing;
//! 2. if the caller holds a position for this slot (`resume`) and the slot is
//!    usable, stream from that position: ours, not the slot's, because the
//!    slot's `confirmed_flush_lsn` can go backwards after a crash;
//! 3. otherwise (no slot, no position, a lost slot, or a slot ahead of our
//!    position) drop the slot, create it again with an exported snapshot, read
//!    every existing row through that snapshot in `sequence_id` order, then
//!    stream from the slot's consistent point: no gap and no duplicate between
//!    the two.
//!
//! Batches: a snapshot batch is acknowledged with `Lsn(0)` (nothing to move)
//! except the last, which carries the consistent point. A streamed batch
//! carries the end LSN of the last transaction that is complete in it; a
//! transaction larger than a batch is split, and its first parts carry the
//! previous commit's position, so memory never holds more than one batch.
//!
//! The slot's position moves only on [`Source::ack`], so it never passes what
//! the caller holds durably. When no outbox events come but the database
//! writes other WAL, an empty batch every [`POSITION_INTERVAL`] hands out the
//! stream's position, so that the slot does not hold that WAL forever.

// Public, but hidden, for the fuzz targets under fuzz/.
#[doc(hidden)]
pub mod pgoutput;
mod setup;
mod snapshot;
mod wal;

use super::{AckToken, BatchOutcome, Source, SourceBatch, SourceError};
use crate::config::{PostgresConfig, ReplicationConfig};
use crate::decode::{decode_text_row, DecodeError, OutboxEvent};
use crate::projection::DeadLetter;
use pgoutput::WalItem;
use snapshot::Snapshot;
use std::time::{Duration, Instant};
use tokio_postgres::Client;
use uuid::Uuid;
use wal::Wal;

/// The outbox columns an event is made of (the others are never read).
const EVENT_COLUMNS: [&str; 7] = [
    "event_id",
    "sequence_id",
    "aggregate_id",
    "aggregate_type",
    "event_type",
    "payload",
    "created_at",
];

/// How often, at most, an empty batch hands out the stream's position.
const POSITION_INTERVAL: Duration = Duration::from_secs(10);

/// The most room reserved for a batch up front (it grows past this if it must).
const BATCH_CAPACITY: usize = 4_096;

/// How much longer than `max_wait` a batch waits for the end of a transaction
/// it holds rows of.
const TRANSACTION_GRACE: Duration = Duration::from_secs(5);
/// Once a batch holds a committed transaction, it ends when the stream has
/// been quiet this long: a light load is applied at once, while a busy stream
/// still fills whole batches (its next message is always already there).
const LINGER: Duration = Duration::from_millis(2);

/// Which slot and publication to use (both are created if missing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationOptions {
    pub slot: String,
    pub publication: String,
}

impl From<&ReplicationConfig> for ReplicationOptions {
    fn from(config: &ReplicationConfig) -> Self {
        ReplicationOptions {
            slot: config.slot.clone(),
            publication: config.publication.clone(),
        }
    }
}

enum Phase {
    /// Not connected; the next call connects.
    Down,
    /// Reading the initial snapshot while the replication connection waits.
    Snapshot {
        wal: Wal,
        snapshot: Box<Snapshot>,
    },
    Streaming(Wal),
}

/// Captures the outbox's inserts through a logical replication slot.
pub struct ReplicationSource {
    pg: PostgresConfig,
    options: ReplicationOptions,
    phase: Phase,
    /// Where a reconnect streams from: the last acknowledged position, or the
    /// one given to `start`. `None` until a snapshot has been acknowledged
    /// complete: a reconnect then takes the snapshot again.
    resume: Option<u64>,
    /// The highest acknowledged position.
    acked: u64,
    /// The highest position handed out in a batch.
    handed: u64,
    /// The end of the last complete transaction read.
    last_commit: u64,
    /// A transaction's `Begin` was read and its `Commit` not yet.
    in_txn: bool,
    /// A row read after its batch was full: the first of the next batch.
    carry: Option<Box<WalItem>>,
    /// Every transaction committed before `start` ends at or before this.
    target: u64,
    /// When a batch was last handed out.
    last_handout: Instant,
}

/// The slot's confirmed position, if the slot exists (for the no-op sink of
/// `bench`, which keeps no checkpoint of its own).
pub async fn slot_position(pg: &PostgresConfig, slot: &str) -> Result<Option<u64>, SourceError> {
    let admin = setup::connect(pg).await?;
    Ok(setup::slot_info(&admin, slot, &pg.database)
        .await?
        .and_then(|info| info.confirmed_flush))
}

impl ReplicationSource {
    /// Connects, creates what is missing, and gets ready to stream.
    ///
    /// `resume` is the last position the caller holds durably for this slot
    /// (`None`: it never finished a snapshot with it, and one is taken).
    pub async fn start(
        pg: &PostgresConfig,
        options: ReplicationOptions,
        resume: Option<u64>,
    ) -> Result<ReplicationSource, SourceError> {
        for (key, name) in [
            ("slot", &options.slot),
            ("publication", &options.publication),
        ] {
            if !is_identifier(name) {
                return Err(SourceError::Fatal(format!(
                    "replication {key} name `{name}` must be 1-63 characters of a-z, 0-9 and _"
                )));
            }
        }
        let position = resume.unwrap_or(0);
        let mut source = ReplicationSource {
            pg: pg.clone(),
            options,
            phase: Phase::Down,
            resume,
            acked: position,
            handed: position,
            last_commit: position,
            in_txn: false,
            carry: None,
            target: 0,
            last_handout: Instant::now(),
        };
        let admin = setup::connect(pg).await?;
        source.connect_with(&admin).await?;
        source.target = setup::wal_probe(&admin).await?;
        Ok(source)
    }

    async fn connect(&mut self) -> Result<(), SourceError> {
        let admin = setup::connect(&self.pg).await?;
        self.connect_with(&admin).await
    }

    async fn connect_with(&mut self, admin: &Client) -> Result<(), SourceError> {
        let slot = self.options.slot.as_str();
        setup::preflight(admin).await?;
        setup::ensure_publication(admin, &self.options.publication).await?;
        let info = setup::slot_info(admin, slot, &self.pg.database).await?;
        let resume = match (&info, self.resume) {
            (Some(info), Some(_)) if info.lost => {
                tracing::warn!(
                    slot,
                    "the replication slot was invalidated (its WAL was removed): \
                     taking a new snapshot"
                );
                None
            }
            (Some(info), Some(resume)) if info.confirmed_flush.is_some_and(|c| c > resume) => {
                // The slot is newer than our position (recreated since, or our
                // position was restored from an older backup): streaming from
                // it could skip events.
                tracing::warn!(
                    slot,
                    resume = %lsn_text(resume),
                    confirmed = %lsn_text(info.confirmed_flush.unwrap_or(0)),
                    "the replication slot is ahead of the recorded position: taking a new snapshot"
                );
                None
            }
            (Some(_), resume) => resume,
            (None, _) => None,
        };
        self.in_txn = false;
        self.carry = None;
        if let Some(from) = resume {
            let mut wal = Wal::connect(&self.pg, slot, &self.options.publication, false).await?;
            wal.start(Some(from)).await?;
            self.last_commit = self.last_commit.max(from);
            self.phase = Phase::Streaming(wal);
            tracing::info!(slot, from = %lsn_text(from), "replication streaming");
            return Ok(());
        }
        if let Some(info) = info {
            if let Some(pid) = info.active_pid {
                return Err(SourceError::Transient(format!(
                    "replication slot `{slot}` is in use by server process {pid}: \
                     another processor, or a connection of ours the server has not noticed is gone"
                )));
            }
            setup::drop_slot(admin, slot).await?;
            tracing::info!(slot, "dropped the replication slot to take a new snapshot");
        }
        setup::check_slot_capacity(admin).await?;
        let mut wal = Wal::connect(&self.pg, slot, &self.options.publication, true).await?;
        tracing::info!(
            slot,
            "creating the replication slot (it waits for running transactions to end)"
        );
        let snapshot_name = wal.create_slot().await?;
        // A new slot's position is its consistent point (read on another
        // connection: a command on the replication connection would end the
        // exported snapshot).
        let consistent_point = setup::slot_info(admin, slot, &self.pg.database)
            .await?
            .and_then(|info| info.confirmed_flush)
            .ok_or_else(|| SourceError::Transient(format!("replication slot `{slot}` vanished")))?;
        let snapshot = Snapshot::open(&self.pg, &snapshot_name, consistent_point).await?;
        tracing::info!(
            slot,
            consistent_point = %lsn_text(consistent_point),
            "replication slot created; reading the initial snapshot"
        );
        self.resume = None;
        self.phase = Phase::Snapshot {
            wal,
            snapshot: Box::new(snapshot),
        };
        Ok(())
    }

    /// Forgets the connection and the transaction it was in the middle of:
    /// the reconnect starts at a transaction boundary.
    fn disconnect(&mut self) {
        self.phase = Phase::Down;
        self.in_txn = false;
        self.carry = None;
    }

    fn hand_out(
        &mut self,
        events: Vec<OutboxEvent>,
        malformed: Vec<DeadLetter>,
        lsn: u64,
    ) -> SourceBatch {
        self.handed = self.handed.max(lsn);
        self.last_handout = Instant::now();
        SourceBatch {
            events,
            malformed,
            ack: AckToken::Lsn(lsn),
        }
    }

    async fn snapshot_batch(
        &mut self,
        max_events: usize,
    ) -> Result<Option<SourceBatch>, SourceError> {
        let Phase::Snapshot { snapshot, .. } = &mut self.phase else {
            return Ok(None);
        };
        let chunk = snapshot.fetch(max_events).await?;
        if !chunk.last {
            return Ok(Some(self.hand_out(chunk.events, chunk.malformed, 0)));
        }
        let Phase::Snapshot { mut wal, snapshot } = std::mem::replace(&mut self.phase, Phase::Down)
        else {
            return Ok(None);
        };
        let (consistent_point, rows) = (snapshot.consistent_point, snapshot.rows);
        snapshot.finish().await?;
        // From the slot's own position: the consistent point.
        wal.start(None).await?;
        self.phase = Phase::Streaming(wal);
        self.last_commit = consistent_point;
        tracing::info!(
            slot = %self.options.slot,
            rows,
            "initial snapshot read; replication streaming"
        );
        Ok(Some(self.hand_out(
            chunk.events,
            chunk.malformed,
            consistent_point,
        )))
    }

    async fn stream_batch(
        &mut self,
        max_events: usize,
        max_wait: Duration,
    ) -> Result<Option<SourceBatch>, SourceError> {
        let Phase::Streaming(wal) = &mut self.phase else {
            return Ok(None);
        };
        // A backlog keeps us from ever being idle: tell the server we are
        // alive between batches too.
        wal.keep_alive().await?;
        let deadline = tokio::time::Instant::now() + max_wait;
        let sleep = tokio::time::sleep_until(deadline);
        tokio::pin!(sleep);
        // Inside a transaction its end is on its way (pgoutput sends a
        // transaction once it has committed): wait for it a little longer, so
        // that batches end at commits.
        let grace = tokio::time::sleep_until(deadline + TRANSACTION_GRACE);
        tokio::pin!(grace);
        let linger = tokio::time::sleep_until(deadline);
        tokio::pin!(linger);
        let mut events = Vec::with_capacity(max_events.min(BATCH_CAPACITY));
        let mut malformed = Vec::new();
        loop {
            let full = events.len() + malformed.len() >= max_events;
            if full && !self.in_txn {
                break;
            }
            let item = match self.carry.take() {
                Some(item) => *item,
                None => {
                    let item = if self.in_txn {
                        wal.next(grace.as_mut()).await?
                    } else if events.is_empty() && malformed.is_empty() {
                        wal.next(sleep.as_mut()).await?
                    } else {
                        let quiet = (tokio::time::Instant::now() + LINGER).min(deadline);
                        linger.as_mut().reset(quiet);
                        wal.next(linger.as_mut()).await?
                    };
                    match item {
                        Some(item) => item,
                        None => break,
                    }
                }
            };
            match item {
                // A transaction larger than a batch: this row opens the next one.
                WalItem::Insert(row) if full => {
                    self.carry = Some(Box::new(WalItem::Insert(row)));
                    break;
                }
                WalItem::Begin => self.in_txn = true,
                WalItem::Insert(Ok(event)) => events.push(event),
                WalItem::Insert(Err(letter)) => malformed.push(*letter),
                WalItem::Commit { end_lsn } => {
                    self.in_txn = false;
                    self.last_commit = self.last_commit.max(end_lsn);
                    // A stream that is never idle still ends the batch on time.
                    if tokio::time::Instant::now() >= deadline {
                        break;
                    }
                }
                WalItem::Other => {}
            }
        }
        if events.is_empty() && malformed.is_empty() {
            return Ok(self.position_batch());
        }
        // Events after the last commit belong to a transaction that is not
        // complete yet: they go out, but the position stays at that commit.
        let lsn = self.last_commit;
        Ok(Some(self.hand_out(events, malformed, lsn)))
    }

    /// An empty batch with the stream's position, when it moved on without
    /// outbox events (other tables' WAL, keepalives) and a while has passed.
    fn position_batch(&mut self) -> Option<SourceBatch> {
        let Phase::Streaming(wal) = &self.phase else {
            return None;
        };
        if self.in_txn || self.last_handout.elapsed() < POSITION_INTERVAL {
            return None;
        }
        // Outside a transaction, what was received is all delivered: the
        // last message was a commit or a keepalive (the walsender's sent position).
        let position = wal.received().max(self.last_commit);
        if position <= self.handed {
            return None;
        }
        Some(self.hand_out(Vec::new(), Vec::new(), position))
    }
}

impl Source for ReplicationSource {
    async fn next_batch(
        &mut self,
        max_events: usize,
        max_wait: Duration,
    ) -> Result<Option<SourceBatch>, SourceError> {
        if matches!(self.phase, Phase::Down) {
            self.connect().await?;
        }
        let max_events = max_events.max(1);
        let result = match self.phase {
            Phase::Down => Ok(None),
            Phase::Snapshot { .. } => self.snapshot_batch(max_events).await,
            Phase::Streaming(_) => self.stream_batch(max_events, max_wait).await,
        };
        if matches!(&result, Err(err) if err.is_transient()) {
            // Whatever was read of this batch comes again after the reconnect.
            self.disconnect();
        }
        result
    }

    async fn ack(&mut self, token: AckToken, _outcome: &BatchOutcome) -> Result<(), SourceError> {
        let AckToken::Lsn(lsn) = token else {
            return Err(SourceError::Fatal(
                "the replication source was handed a polling acknowledgement".to_string(),
            ));
        };
        if lsn == 0 || lsn <= self.acked {
            return Ok(());
        }
        self.acked = lsn;
        self.resume = Some(lsn);
        if let Phase::Streaming(wal) = &mut self.phase {
            if let Err(err) = wal.confirm(lsn).await {
                self.disconnect();
                return Err(err);
            }
        }
        Ok(())
    }

    async fn idle(&mut self) -> Result<(), SourceError> {
        if let Phase::Streaming(wal) = &mut self.phase {
            if let Err(err) = wal.feedback().await {
                self.disconnect();
                return Err(err);
            }
        }
        Ok(())
    }

    async fn caught_up(&mut self) -> Result<bool, SourceError> {
        let Phase::Streaming(wal) = &self.phase else {
            return Ok(false);
        };
        Ok(self.resume.is_some()
            && !self.in_txn
            && self.carry.is_none()
            && self.acked >= self.handed
            && wal.received() >= self.target)
    }
}

/// A row of the outbox in text form, or the dead letter of one that does not
/// decode (with whatever could be recovered, and the raw payload as a string).
fn decode_row(columns: &[(&str, Option<&str>)]) -> Result<OutboxEvent, Box<DeadLetter>> {
    decode_text_row(columns).map_err(|err| Box::new(malformed_row(columns, &err)))
}

fn malformed_row(columns: &[(&str, Option<&str>)], err: &DecodeError) -> DeadLetter {
    let column = |wanted: &str| {
        columns
            .iter()
            .find(|(name, _)| *name == wanted)
            .and_then(|(_, value)| *value)
    };
    let uuid = |wanted: &str| {
        column(wanted)
            .and_then(|text| Uuid::parse_str(text.trim()).ok())
            .unwrap_or_else(Uuid::nil)
    };
    DeadLetter {
        event: OutboxEvent {
            event_id: uuid("event_id"),
            sequence_id: column("sequence_id").and_then(|text| text.trim().parse().ok()),
            aggregate_id: uuid("aggregate_id"),
            aggregate_type: column("aggregate_type").unwrap_or_default().to_string(),
            event_type: column("event_type").unwrap_or_default().to_string(),
            payload: serde_json::Value::String(column("payload").unwrap_or_default().to_string()),
            created_at: None,
        },
        error: err.to_string(),
        attempts: 1,
    }
}

fn is_identifier(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// `16/B374D848`, as PostgreSQL writes an LSN.
fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row<'a>(payload: &'a str, created_at: &'a str) -> Vec<(&'a str, Option<&'a str>)> {
        vec![
            ("event_id", Some("0192f4b7-1c3d-7e4f-9a50-3b6c7d8e9f10")),
            ("sequence_id", Some("7")),
            ("aggregate_id", Some("7d3c9a52-1e4f-4b8a-9c61-2f5e8d7a4b10")),
            ("aggregate_type", Some("User")),
            ("event_type", Some("UserCreated")),
            ("payload", Some(payload)),
            ("status", Some("pending")),
            ("created_at", Some(created_at)),
        ]
    }

    #[test]
    fn a_good_row_is_an_event() {
        let event = decode_row(&row(r#"{"email": "a@b"}"#, "2026-01-02 03:04:05.123456+00"));
        assert!(
            matches!(
                event,
                Ok(OutboxEvent {
                    sequence_id: Some(7),
                    ..
                })
            ),
            "{event:?}"
        );
    }

    #[test]
    fn a_bad_row_is_a_dead_letter_with_what_could_be_recovered() {
        let Err(letter) = decode_row(&row("{not json", "2026-01-02 03:04:05+00")) else {
            panic!("expected a dead letter");
        };
        assert_eq!(
            letter.event.event_id.to_string(),
            "0192f4b7-1c3d-7e4f-9a50-3b6c7d8e9f10"
        );
        assert_eq!(letter.event.sequence_id, Some(7));
        assert_eq!(letter.event.event_type, "UserCreated");
        assert_eq!(letter.event.payload, serde_json::json!("{not json"));
        assert!(
            letter.error.starts_with("payload is not valid json"),
            "{}",
            letter.error
        );
        assert_eq!(letter.attempts, 1);

        let mut columns = row("{}", "2026-01-02 03:04:05+00");
        columns[0].1 = Some("nope");
        let Err(letter) = decode_row(&columns) else {
            panic!("expected a dead letter");
        };
        assert!(letter.event.event_id.is_nil());
    }

    #[test]
    fn names_and_positions() {
        assert!(is_identifier("activity_event_processor"));
        assert!(!is_identifier("Slot"));
        assert!(!is_identifier(""));
        assert!(!is_identifier(&"a".repeat(64)));
        assert_eq!(lsn_text(0x16_B374_D848), "16/B374D848");
        assert_eq!(lsn_text(0), "0/0");
    }

    #[test]
    fn the_source_can_move_between_threads_and_is_small() {
        fn send<T: Send>() {}
        send::<ReplicationSource>();
        let size = std::mem::size_of::<ReplicationSource>();
        assert!(size <= 336, "{size} bytes");
    }
}
