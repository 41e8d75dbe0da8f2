//! Where the relay reads the outbox: the replication source (its own slot) or
//! the polling source, and which events are initial-snapshot rows (`op=r`).
//!
//! The relay's position is its slot's `confirmed_flush_lsn`, which moves only
//! after the broker acknowledged the events before it. A slot alone cannot say
//! whether its initial snapshot was ever published (the slot exists from the
//! start of the snapshot), so the first snapshot is taken through a second
//! slot, `<slot>_init`; once every snapshot row is acknowledged, that slot is
//! copied to `<slot>` (`pg_copy_logical_replication_slot`, same position) and
//! dropped. `<slot>` therefore exists only after its snapshot is published:
//! at start, an existing `<slot>` is resumed from its position; otherwise the
//! snapshot is taken (again).
//!
//! One owner: the relay owns `<slot>` (a [`SlotOwner`] lock, taken before
//! anything here runs) for both slots, and drops or copies a slot only in the
//! session that holds that lock. A second relay on the same slot waits.

use crate::config::PostgresConfig;
use crate::outbox::{self, describe};
use crate::source::replication::{Lsn, ReplicationOptions, ReplicationSource, Resume, SlotOwner};
use crate::source::{BatchOutcome, Origin, SnapshotMark, Source, SourceBatch, SourceError};
use std::time::{Duration, Instant};
use tokio_postgres::types::PgLsn;
use tokio_postgres::Client;

enum Phase {
    /// Taking the initial snapshot through `<slot>_init`.
    Init(Box<ReplicationSource>),
    /// The snapshot is published up to `lsn`: `<slot>_init` becomes `<slot>`.
    Switching { lsn: u64 },
    /// Streaming from `<slot>`.
    Main(Box<ReplicationSource>),
}

/// The replication source, on the relay's own slot.
pub struct SlotCapture {
    pg: PostgresConfig,
    owner: SlotOwner,
    slot: String,
    init_slot: String,
    publication: String,
    phase: Phase,
    /// The next snapshot row is the first of the snapshot.
    first_row: bool,
    /// The batch whose acknowledgement completes the snapshot.
    last_snapshot_lsn: Option<u64>,
}

/// `confirmed_flush_lsn` and the active backend of a slot, if it exists.
async fn slot_state(
    client: &Client,
    slot: &str,
) -> Result<Option<(u64, Option<i32>)>, SourceError> {
    let row = client
        .query_opt(
            "SELECT confirmed_flush_lsn, active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| {
            SourceError::Transient(format!("cannot read replication slots: {}", describe(&e)))
        })?;
    Ok(row.map(|row| {
        let lsn: Option<PgLsn> = row.get(0);
        (lsn.map_or(0, u64::from), row.get(1))
    }))
}

async fn connect(pg: &PostgresConfig) -> Result<Client, SourceError> {
    outbox::connect(pg)
        .await
        .map_err(|e| SourceError::Transient(crate::policy::describe(&e)))
}

/// Drops a slot once no backend uses it (a closed stream's backend may take
/// a moment to go), in the session that owns the relay's slots.
async fn drop_slot(client: &Client, owner: &SlotOwner, slot: &str) -> Result<(), SourceError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match slot_state(client, slot).await? {
            None => return Ok(()),
            Some((_, Some(pid))) if Instant::now() < deadline => {
                tracing::debug!(slot, pid, "waiting for the slot's backend to go");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Some((_, Some(pid))) => {
                return Err(SourceError::Transient(format!(
                    "replication slot `{slot}` is still in use by server process {pid}"
                )))
            }
            Some((_, None)) => {
                return owner
                    .fenced(
                        &format!("cannot drop replication slot `{slot}`"),
                        "SELECT pg_drop_replication_slot($1)",
                        &[&slot],
                    )
                    .await;
            }
        }
    }
}

impl SlotCapture {
    /// Resumes `<slot>` if it exists, else starts the initial snapshot.
    /// `owner` must own `<slot>` already.
    pub async fn start(
        pg: &PostgresConfig,
        owner: SlotOwner,
        slot: &str,
        publication: &str,
    ) -> Result<SlotCapture, SourceError> {
        owner.ensure_held().await?;
        let mut capture = SlotCapture {
            pg: pg.clone(),
            owner,
            slot: slot.to_string(),
            init_slot: format!("{slot}_init"),
            publication: publication.to_string(),
            phase: Phase::Switching { lsn: 0 },
            first_row: true,
            last_snapshot_lsn: None,
        };
        let client = connect(pg).await?;
        match slot_state(&client, slot).await? {
            Some((lsn, _)) => {
                if slot_state(&client, &capture.init_slot).await?.is_some() {
                    drop_slot(&client, &capture.owner, &capture.init_slot).await?;
                }
                tracing::info!(slot, lsn = %PgLsn::from(lsn), "relay resuming from its slot");
                capture.phase = Phase::Main(capture.open(slot, Some(lsn)).await?);
            }
            None => {
                tracing::info!(slot = %capture.init_slot, "relay taking the initial snapshot");
                let init = capture.init_slot.clone();
                capture.phase = Phase::Init(capture.open(&init, None).await?);
            }
        }
        Ok(capture)
    }

    async fn open(
        &self,
        slot: &str,
        resume: Option<u64>,
    ) -> Result<Box<ReplicationSource>, SourceError> {
        ReplicationSource::start(
            &self.pg,
            ReplicationOptions {
                slot: slot.to_string(),
                publication: self.publication.clone(),
                sweep: false,
            },
            self.owner.clone(),
            Resume::At(resume),
        )
        .await
        .map(Box::new)
    }

    /// `<slot>_init` -> `<slot>`, then stream from it.
    async fn switch(&mut self, lsn: u64) -> Result<(), SourceError> {
        let client = connect(&self.pg).await?;
        if slot_state(&client, &self.slot).await?.is_none() {
            if slot_state(&client, &self.init_slot).await?.is_none() {
                tracing::warn!(slot = %self.init_slot, "the snapshot slot vanished before the relay could keep it: taking the snapshot again");
                let init = self.init_slot.clone();
                self.first_row = true;
                self.phase = Phase::Init(self.open(&init, None).await?);
                return Ok(());
            }
            drop_slot_backend_wait(&client, &self.init_slot).await?;
            self.owner
                .fenced(
                    &format!(
                        "cannot copy replication slot `{}` to `{}`",
                        self.init_slot, self.slot
                    ),
                    "SELECT pg_copy_logical_replication_slot($1, $2)",
                    &[&self.init_slot, &self.slot],
                )
                .await?;
        }
        drop_slot(&client, &self.owner, &self.init_slot).await?;
        let slot = self.slot.clone();
        let main = self.open(&slot, Some(lsn)).await?;
        tracing::info!(slot = %self.slot, lsn = %PgLsn::from(lsn), "initial snapshot relayed; streaming");
        self.phase = Phase::Main(main);
        Ok(())
    }
}

impl Source for SlotCapture {
    type Ack = Lsn;

    async fn next_batch(
        &mut self,
        max_events: usize,
        max_wait: Duration,
    ) -> Result<Option<SourceBatch<Lsn>>, SourceError> {
        if let Phase::Switching { lsn } = self.phase {
            self.switch(lsn).await?;
        }
        let snapshot = matches!(self.phase, Phase::Init(_));
        let source = match &mut self.phase {
            Phase::Init(source) | Phase::Main(source) => source,
            Phase::Switching { .. } => return Ok(None),
        };
        let Some(mut batch) = source.next_batch(max_events, max_wait).await? else {
            return Ok(None);
        };
        if !snapshot {
            return Ok(Some(batch));
        }
        // Snapshot batches carry position 0, except the last one.
        let last = batch.ack.0 > 0;
        let count = batch.events.len();
        batch.origins = (0..count)
            .map(|i| {
                let mark = if last && i + 1 == count {
                    SnapshotMark::Last
                } else if self.first_row && i == 0 {
                    SnapshotMark::First
                } else {
                    SnapshotMark::Middle
                };
                Origin::Snapshot(mark)
            })
            .collect();
        if count > 0 {
            self.first_row = false;
        }
        if last {
            self.last_snapshot_lsn = Some(batch.ack.0);
        }
        Ok(Some(batch))
    }

    async fn ack(&mut self, ack: Lsn, outcome: &BatchOutcome) -> Result<(), SourceError> {
        let completes = self.last_snapshot_lsn == Some(ack.0);
        match &mut self.phase {
            Phase::Init(source) | Phase::Main(source) => source.ack(ack, outcome).await?,
            Phase::Switching { .. } => {}
        }
        if completes && matches!(self.phase, Phase::Init(_)) {
            // Closes the stream on `<slot>_init`; the switch happens before
            // the next batch (and is repeated if it fails).
            self.phase = Phase::Switching { lsn: ack.0 };
            self.last_snapshot_lsn = None;
        }
        Ok(())
    }

    /// Not once the snapshot's last batch is out: its acknowledgement
    /// switches slots, and the rows after it come from `<slot>`.
    fn fetch_ahead(&self) -> bool {
        match &self.phase {
            Phase::Init(source) | Phase::Main(source) => {
                self.last_snapshot_lsn.is_none() && source.fetch_ahead()
            }
            Phase::Switching { .. } => false,
        }
    }

    async fn idle(&mut self) -> Result<(), SourceError> {
        match &mut self.phase {
            Phase::Init(source) | Phase::Main(source) => source.idle().await,
            Phase::Switching { .. } => Ok(()),
        }
    }

    async fn caught_up(&mut self) -> Result<bool, SourceError> {
        match &mut self.phase {
            Phase::Main(source) => source.caught_up().await,
            _ => Ok(false),
        }
    }
}

/// Waits until no backend holds `slot` (the init stream was just closed).
async fn drop_slot_backend_wait(client: &Client, slot: &str) -> Result<(), SourceError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match slot_state(client, slot).await? {
            None | Some((_, None)) => return Ok(()),
            Some((_, Some(_))) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Some((_, Some(pid))) => {
                return Err(SourceError::Transient(format!(
                    "replication slot `{slot}` is still in use by server process {pid}"
                )))
            }
        }
    }
}
