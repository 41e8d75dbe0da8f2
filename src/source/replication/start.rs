//! Getting ready to stream: taking (or checking) the ownership, reading the
//! caller's position, and choosing between streaming from it, creating the
//! slot with its snapshot, and reading the outbox up to an existing slot's
//! position (the module documentation of the parent says why each is safe).

use super::setup;
use super::snapshot::Snapshot;
use super::wal::Wal;
use super::{lsn_text, Phase, ReplicationSource};
use crate::policy::RetryClass;
use crate::source::SourceError;
use tokio_postgres::Client;

impl ReplicationSource {
    pub(super) async fn connect(&mut self) -> Result<(), SourceError> {
        let admin = setup::connect(&self.pg).await?;
        self.connect_with(&admin).await
    }

    pub(super) async fn connect_with(&mut self, admin: &Client) -> Result<(), SourceError> {
        // Nothing below runs for a slot this process does not own.
        self.owner.ensure_held().await?;
        if let Some(load) = &self.load_position {
            self.move_to(load().await?);
        }
        let slot = self.options.slot.as_str();
        setup::preflight(admin).await?;
        setup::ensure_publication(admin, &self.options.publication).await?;
        let info = setup::slot_info(admin, slot, &self.pg.database).await?;
        self.in_txn = false;
        self.carry = None;
        let Some(info) = info else {
            if let Some(from) = self.resume {
                tracing::warn!(
                    slot,
                    position = %lsn_text(from),
                    "replication slot disappeared (dropped, or a failover to a server \
                     without it): creating it again and reading the whole outbox again \
                     (what was applied already is fenced)"
                );
            }
            return self.create_slot(admin).await;
        };
        if info.lost {
            return Err(SourceError::Fatal(setup::lost_slot_message(slot)));
        }
        if let Some(pid) = info.active_pid {
            return Err(SourceError::transient(
                RetryClass::Conflict,
                format!(
                    "replication slot `{slot}` is in use by server process {pid}: \
                     a connection the server has not yet noticed is gone, or a process \
                     that does not take the ownership lock"
                ),
            ));
        }
        let confirmed = info.confirmed_flush.unwrap_or(0);
        match self.resume {
            Some(from) if confirmed <= from => {
                let mut wal =
                    Wal::connect(&self.pg, slot, &self.options.publication, false).await?;
                wal.start(Some(from)).await?;
                self.last_commit = self.last_commit.max(from);
                self.phase = Phase::Streaming(wal);
                tracing::info!(slot, from = %lsn_text(from), "replication streaming");
                Ok(())
            }
            resume => {
                if let Some(from) = resume {
                    // Recreated by someone else since, or our position was
                    // restored from an older backup: streaming from ours
                    // could skip events, so read everything up to the slot's.
                    tracing::warn!(
                        slot,
                        resume = %lsn_text(from),
                        confirmed = %lsn_text(confirmed),
                        "the replication slot is ahead of the recorded position: \
                         reading the outbox again up to the slot's position"
                    );
                }
                self.snapshot_existing(confirmed).await
            }
        }
    }

    /// Moves the resume position forward to `position` (another owner's
    /// progress, read from where the caller keeps it).
    fn move_to(&mut self, position: Option<u64>) {
        let Some(position) = position else {
            return;
        };
        if self.resume.is_none_or(|r| r < position) {
            self.resume = Some(position);
            self.acked = self.acked.max(position);
            self.handed = self.handed.max(position);
            self.last_commit = self.last_commit.max(position);
        }
    }

    /// No slot: create it with an exported snapshot and read that snapshot.
    async fn create_slot(&mut self, admin: &Client) -> Result<(), SourceError> {
        let slot = self.options.slot.as_str();
        setup::check_slot_capacity(admin).await?;
        let mut wal = Wal::connect(&self.pg, slot, &self.options.publication, true).await?;
        tracing::info!(
            slot,
            "creating the replication slot (it waits for running transactions to end)"
        );
        // Still ours right before the slot and its snapshot are made.
        self.owner.ensure_held().await?;
        let snapshot_name = wal.create_slot().await?;
        // A new slot's position is its consistent point (read on another
        // connection: a command on the replication connection would end the
        // exported snapshot).
        let consistent_point = setup::slot_info(admin, slot, &self.pg.database)
            .await?
            .and_then(|info| info.confirmed_flush)
            .ok_or_else(|| SourceError::Transient(format!("replication slot `{slot}` vanished")))?;
        let snapshot = Snapshot::open(&self.pg, Some(&snapshot_name), consistent_point).await?;
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

    /// The slot exists and streaming from our position is not possible: read
    /// every row in a snapshot taken now, then stream from `confirmed`.
    async fn snapshot_existing(&mut self, confirmed: u64) -> Result<(), SourceError> {
        let slot = self.options.slot.as_str();
        let wal = Wal::connect(&self.pg, slot, &self.options.publication, false).await?;
        // After `confirmed` was read: every row committed before it is in here.
        let snapshot = Snapshot::open(&self.pg, None, confirmed).await?;
        tracing::info!(
            slot,
            position = %lsn_text(confirmed),
            "reading the outbox up to the replication slot's position"
        );
        self.resume = None;
        self.phase = Phase::Snapshot {
            wal,
            snapshot: Box::new(snapshot),
        };
        Ok(())
    }
}
