//! Logical replication capture: the outbox's inserts, decoded from `pgoutput`.
//!
//! One owner per slot: nothing below runs before this process owns the slot
//! ([`SlotOwner`]), and a lost ownership stops the capture until it is owned
//! again. Start-up, on the first call and after every transient error:
//! 1. check the server (`wal_level`), the outbox table, and create the
//!    publication of outbox inserts if it is missing;
//! 2. if the caller holds a position for this slot ([`Resume`], read again
//!    after every take-over) and the slot is not ahead of it, stream from that
//!    position: ours, not the slot's, because the slot's `confirmed_flush_lsn`
//!    can go backwards after a crash;
//! 3. if there is no slot, create it with an exported snapshot, read every
//!    existing row through that snapshot in `sequence_id` order, then stream
//!    from the slot's consistent point: no gap and no duplicate between the two;
//! 4. if the slot exists but we hold no position for it (or it is ahead of
//!    ours), read every row in a snapshot taken *after* reading the slot's
//!    position, then stream from that position: no gap (every row committed
//!    before the position is in the snapshot), and the rows in both are
//!    duplicates the fenced projections absorb. A slot is never dropped; one
//!    PostgreSQL has invalidated stops the process with what to do.
//!
//! Batches: a snapshot batch is acknowledged with `Lsn(0)` (nothing to move)
//! except the last, which carries the consistent point. A streamed batch
//! carries the end LSN of the last transaction that is complete in it; a
//! transaction larger than a batch is split, and its first parts carry the
//! previous commit's position, so memory never holds more than one batch.
//!
//! Each streamed event carries its transaction's commit time (pgoutput's
//! `Begin`) in [`SourceBatch::committed`]; snapshot and sweep rows carry none
//! (their `created_at` stands in).
//!
//! The slot's position moves only on [`Source::ack`], so it never passes what
//! the caller holds durably. When no outbox events come but the database
//! writes other WAL, an empty batch every [`POSITION_INTERVAL`] hands out the
//! stream's position, so that the slot does not hold that WAL forever; so
//! does the commit of a heartbeat ([`crate::observe::heartbeat`], the logical
//! messages `START_REPLICATION` asks for), at once: a heartbeat is no event,
//! its round trip is recorded, and an idle slot's lag falls back to about 0
//! at each one. While streaming, a sweep ([`sweep`]) looks for rows the
//! capture passed without applying them and delivers them again.

mod owner;
// Public, but hidden, for the fuzz targets under fuzz/.
#[doc(hidden)]
pub mod pgoutput;
mod rows;
mod setup;
mod snapshot;
mod start;
mod stream;
mod sweep;
mod wal;

pub use owner::SlotOwner;

use super::{BatchOutcome, Source, SourceBatch, SourceError};
use crate::config::{PostgresConfig, ReplicationConfig};
use crate::dead_letter::DeadLetter;
use crate::decode::OutboxEvent;
use crate::policy::{Classify, ErrorClass};
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use pgoutput::WalItem;
use rows::decode_row;
pub use rows::EVENT_COLUMNS;
use snapshot::Snapshot;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use wal::Wal;

/// How often, at most, an empty batch hands out the stream's position.
const POSITION_INTERVAL: Duration = Duration::from_secs(10);

/// The most room reserved for a batch up front (it grows past this if it must).
const BATCH_CAPACITY: usize = 4_096;

/// How much longer than `max_wait` a batch waits for the end of a transaction
/// it holds rows of.
const TRANSACTION_GRACE: Duration = Duration::from_secs(5);
/// Once a batch holds a committed transaction, it ends when the stream has
/// been quiet this long: a light load is applied at once, while a busy stream
/// still fills whole batches (its next message is always already there). A
/// batch read on during the last one's apply does not linger: it ends when
/// the sink is free, with what is waiting.
const LINGER: Duration = Duration::from_millis(2);

/// How long a graceful stop waits for the slot to show the final position.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Which slot and publication to use (both are created if missing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationOptions {
    pub slot: String,
    pub publication: String,
    /// Look for rows the capture passed without applying ([`sweep`]); only
    /// where the pipeline marks applied rows `processed`.
    pub sweep: bool,
}

impl From<&ReplicationConfig> for ReplicationOptions {
    fn from(config: &ReplicationConfig) -> Self {
        ReplicationOptions {
            slot: config.slot.clone(),
            publication: config.publication.clone(),
            sweep: false,
        }
    }
}

/// Reads the position the caller durably holds for the slot.
pub type LoadPosition =
    Arc<dyn Fn() -> BoxFuture<'static, Result<Option<u64>, SourceError>> + Send + Sync>;

/// Where streaming resumes.
#[derive(Clone)]
pub enum Resume {
    /// This position (`None`: none; a snapshot is taken).
    At(Option<u64>),
    /// The caller's durable position, read again on every (re)connect once
    /// the slot is owned: another owner may have moved it meanwhile.
    Load(LoadPosition),
}

impl std::fmt::Debug for Resume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Resume::At(position) => f.debug_tuple("At").field(position).finish(),
            Resume::Load(_) => f.write_str("Load"),
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
    owner: SlotOwner,
    load_position: Option<LoadPosition>,
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
    /// When the transaction being read committed (its `Begin` says).
    txn_committed: Option<DateTime<Utc>>,
    /// The transaction being read holds a heartbeat.
    txn_heartbeat: bool,
    /// A heartbeat's transaction was read to its commit since the last
    /// batch: the next idle moment hands out the position.
    heartbeat_due: bool,
    /// A row read after its batch was full: the first of the next batch.
    carry: Option<Box<WalItem>>,
    /// Every transaction committed before `start` ends at or before this.
    target: u64,
    /// When a batch was last handed out.
    last_handout: Instant,
    /// The last batch handed out was full: the stream has a backlog.
    busy: bool,
    /// The stuck-row sweep (boxed: the source is moved around).
    sweeper: Box<sweep::Sweeper>,
}

/// The slot's confirmed position, if the slot exists (for the discard sink,
/// which keeps no checkpoint of its own).
pub async fn slot_position(pg: &PostgresConfig, slot: &str) -> Result<Option<u64>, SourceError> {
    let admin = setup::connect(pg).await?;
    Ok(setup::slot_info(&admin, slot, &pg.database)
        .await?
        .and_then(|info| info.confirmed_flush))
}

impl ReplicationSource {
    /// Connects, creates what is missing, and gets ready to stream. `owner`
    /// must already own the slot ([`SlotOwner::acquire`]).
    ///
    /// `resume`: where the caller's durable position for this slot comes from
    /// (no position: it never finished a snapshot with it, and one is taken).
    pub async fn start(
        pg: &PostgresConfig,
        options: ReplicationOptions,
        owner: SlotOwner,
        resume: Resume,
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
        let (resume, load_position) = match resume {
            Resume::At(position) => (position, None),
            Resume::Load(load) => (None, Some(load)),
        };
        let position = resume.unwrap_or(0);
        let mut source = ReplicationSource {
            pg: pg.clone(),
            options,
            owner,
            load_position,
            phase: Phase::Down,
            resume,
            acked: position,
            handed: position,
            last_commit: position,
            in_txn: false,
            txn_committed: None,
            txn_heartbeat: false,
            heartbeat_due: false,
            carry: None,
            target: 0,
            last_handout: Instant::now(),
            busy: false,
            sweeper: Box::default(),
        };
        let admin = setup::connect(pg).await?;
        source.connect_with(&admin).await?;
        source.target = setup::wal_probe(&admin).await?;
        Ok(source)
    }

    /// Forgets the connection and the transaction it was in the middle of:
    /// the reconnect starts at a transaction boundary.
    fn disconnect(&mut self) {
        self.phase = Phase::Down;
        self.sweeper.admin = None;
        self.in_txn = false;
        self.txn_heartbeat = false;
        self.carry = None;
    }

    /// A batch; `committed`: each event's commit time, or empty.
    fn hand_out(
        &mut self,
        events: Vec<OutboxEvent>,
        malformed: Vec<DeadLetter>,
        committed: Vec<Option<DateTime<Utc>>>,
        lsn: u64,
    ) -> SourceBatch<Lsn> {
        self.handed = self.handed.max(lsn);
        self.last_handout = Instant::now();
        self.heartbeat_due = false;
        let mut batch = SourceBatch::new(events, malformed, Lsn(lsn));
        batch.committed = committed;
        batch
    }

    async fn snapshot_batch(
        &mut self,
        max_events: usize,
    ) -> Result<Option<SourceBatch<Lsn>>, SourceError> {
        let Phase::Snapshot { snapshot, .. } = &mut self.phase else {
            return Ok(None);
        };
        let chunk = snapshot.fetch(max_events).await?;
        if !chunk.last {
            return Ok(Some(self.hand_out(
                chunk.events,
                chunk.malformed,
                Vec::new(),
                0,
            )));
        }
        let Phase::Snapshot { mut wal, snapshot } = std::mem::replace(&mut self.phase, Phase::Down)
        else {
            return Ok(None);
        };
        let (consistent_point, rows) = (snapshot.consistent_point, snapshot.rows);
        snapshot.finish().await?;
        wal.start(Some(consistent_point)).await?;
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
            Vec::new(),
            consistent_point,
        )))
    }

    /// Everything the stream carries up to `position` has been delivered, and
    /// every batch handed out is acknowledged (so applied and marked).
    fn durable_through(&self, position: u64) -> bool {
        let Phase::Streaming(wal) = &self.phase else {
            return false;
        };
        self.acked >= position
            || (!self.in_txn
                && self.carry.is_none()
                && self.acked >= self.handed
                && wal.received() >= position)
    }

    /// Drives the stuck-row sweep ([`sweep`]): finishes the running one once
    /// the stream is past its watermark (a batch of the rows it found), or
    /// starts one when due. Runs between batches, on its own connection.
    async fn sweep_step(&mut self) -> Result<Option<SourceBatch<Lsn>>, SourceError> {
        if !self.options.sweep {
            return Ok(None);
        }
        let finishing = self
            .sweeper
            .running
            .as_ref()
            .is_some_and(|(sweep, _)| self.durable_through(sweep.watermark));
        let starting = self.sweeper.running.is_none()
            && (self.sweeper.want_verify || (self.sweeper.due() && !self.busy));
        if !finishing && !starting {
            return Ok(None);
        }
        let client = match self.sweeper.admin.take() {
            Some(client) if !client.is_closed() => client,
            _ => setup::connect_text(&self.pg).await?,
        };
        let result = if finishing {
            self.finish_sweep(&client).await
        } else {
            let sweep = sweep::start(&client).await;
            sweep.map(|sweep| {
                let verifies = std::mem::take(&mut self.sweeper.want_verify);
                self.sweeper.running = Some((sweep, verifies));
                self.sweeper.last_start = Some(Instant::now());
                None
            })
        };
        self.sweeper.admin = Some(client);
        result
    }

    async fn finish_sweep(
        &mut self,
        client: &Client,
    ) -> Result<Option<SourceBatch<Lsn>>, SourceError> {
        let Some((sweep, verifies)) = self.sweeper.running.take() else {
            return Ok(None);
        };
        let stuck = sweep::finish(client, &sweep).await?;
        if stuck.is_empty() {
            self.sweeper.verified |= verifies;
            return Ok(None);
        }
        self.sweeper.found += stuck.len() as u64;
        let first = stuck.events.first().and_then(|e| e.sequence_id);
        tracing::warn!(
            slot = %self.options.slot,
            rows = stuck.len(),
            first_sequence_id = ?first,
            found_so_far = self.sweeper.found,
            "outbox rows committed before a position the capture has passed were never applied: \
             delivering them again"
        );
        // Position 0: these rows move nothing; the stream's position is ahead.
        Ok(Some(self.hand_out(
            stuck.events,
            stuck.malformed,
            Vec::new(),
            0,
        )))
    }

    /// Rows the sweep found stuck (and delivered again) since the start.
    pub fn stuck_found(&self) -> u64 {
        self.sweeper.found
    }
}

/// A replication batch's acknowledgement: the end LSN of the last
/// transaction in the batch (0: a snapshot batch before the last, which
/// moves nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Lsn(pub u64);

impl ReplicationSource {
    /// A batch; with `applied`, read on while the sink applies the batch
    /// before ([`Source::next_batch_reading_on`]).
    async fn take(
        &mut self,
        max_events: usize,
        max_wait: Duration,
        applied: Option<&CancellationToken>,
    ) -> Result<Option<SourceBatch<Lsn>>, SourceError> {
        if !matches!(self.phase, Phase::Down) && !self.owner.is_alive().await {
            // The session holding the ownership ended: another process may
            // own the slot by now. Stop, and own it again before going on.
            self.disconnect();
            return Err(SourceError::transient(
                crate::policy::RetryClass::Connection,
                format!(
                    "lost the ownership of replication slot `{}` (its session ended)",
                    self.options.slot
                ),
            ));
        }
        if matches!(self.phase, Phase::Down) {
            self.connect().await?;
        }
        let max_events = max_events.max(1);
        let result = match self.phase {
            Phase::Down => Ok(None),
            Phase::Snapshot { .. } => self.snapshot_batch(max_events).await,
            Phase::Streaming(_) => match self.sweep_step().await {
                Ok(Some(batch)) => Ok(Some(batch)),
                Ok(None) => self.stream_batch(max_events, max_wait, applied).await,
                Err(err) => Err(err),
            },
        };
        if matches!(&result, Err(err) if err.class() == ErrorClass::Transient) {
            // Whatever was read of this batch comes again after the reconnect.
            self.disconnect();
        }
        result
    }
}

impl Source for ReplicationSource {
    async fn next_batch(
        &mut self,
        max_events: usize,
        max_wait: Duration,
    ) -> Result<Option<SourceBatch<Lsn>>, SourceError> {
        self.take(max_events, max_wait, None).await
    }

    async fn next_batch_reading_on(
        &mut self,
        max_events: usize,
        max_wait: Duration,
        applied: &CancellationToken,
    ) -> Result<Option<SourceBatch<Lsn>>, SourceError> {
        self.take(max_events, max_wait, Some(applied)).await
    }

    type Ack = Lsn;

    fn lsn_of(ack: &Lsn) -> Option<u64> {
        (ack.0 > 0).then_some(ack.0)
    }

    async fn ack(&mut self, ack: Lsn, _outcome: &BatchOutcome) -> Result<(), SourceError> {
        let Lsn(lsn) = ack;
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

    fn mid_transaction(&self) -> bool {
        matches!(self.phase, Phase::Streaming(_)) && (self.in_txn || self.carry.is_some())
    }

    /// Snapshot chunks and streamed batches carry rising positions, and an
    /// acknowledgement only moves the slot up to its own. The sweep reads
    /// the rows' status, which earlier batches must have set first: it
    /// finishes only once the acknowledged position covers its watermark
    /// (`durable_through`, which with a batch handed out and not yet
    /// acknowledged looks at the acknowledged position alone), and a batch
    /// is acknowledged only after its marks commit.
    fn fetch_ahead(&self) -> bool {
        true
    }

    /// The last status update is on its way when `ack` returns, but the
    /// walsender may read it after the process has gone: wait (briefly) until
    /// the slot shows it, so that a stop followed by a start re-delivers
    /// nothing already applied.
    async fn close(&mut self) {
        let Phase::Streaming(wal) = &mut self.phase else {
            return;
        };
        if self.acked == 0 {
            return;
        }
        if let Err(err) = wal.feedback().await {
            tracing::warn!(error = %crate::policy::describe(&err), "cannot send the final position to the slot");
            return;
        }
        let deadline = Instant::now() + CLOSE_WAIT;
        loop {
            match slot_position(&self.pg, &self.options.slot).await {
                Ok(Some(confirmed)) if confirmed >= self.acked => return,
                Ok(_) | Err(_) if Instant::now() >= deadline => {
                    tracing::warn!(
                        slot = %self.options.slot,
                        position = %lsn_text(self.acked),
                        "the slot did not show the final position before the stop; \
                         a restart may deliver the last events again (they are fenced)"
                    );
                    return;
                }
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// Every row committed before the start is delivered and acknowledged,
    /// and (where rows are marked) a sweep started since found none stuck.
    async fn caught_up(&mut self) -> Result<bool, SourceError> {
        if self.resume.is_none() || !self.durable_through(self.target) {
            return Ok(false);
        }
        if !self.options.sweep || self.sweeper.verified {
            return Ok(true);
        }
        self.sweeper.want_verify = true;
        Ok(false)
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
        assert!(size <= 384, "{size} bytes");
    }
}
