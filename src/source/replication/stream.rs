//! Reading the stream into batches: transactions whole where they fit,
//! each event with its transaction's commit time (pgoutput's `Begin`),
//! heartbeats recorded and never handed out as events, and the stream's
//! position handed out in an empty batch when no event moves it (other WAL,
//! a heartbeat's commit).

use super::pgoutput::WalItem;
use super::{
    Lsn, Phase, ReplicationSource, BATCH_CAPACITY, LINGER, POSITION_INTERVAL, TRANSACTION_GRACE,
};
use crate::source::{SourceBatch, SourceError};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

impl ReplicationSource {
    pub(super) async fn stream_batch(
        &mut self,
        max_events: usize,
        max_wait: Duration,
        applied: Option<&CancellationToken>,
    ) -> Result<Option<SourceBatch<Lsn>>, SourceError> {
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
        // Per event, its transaction's commit time.
        let mut committed = Vec::with_capacity(events.capacity());
        let mut malformed = Vec::new();
        // Read on while the sink applies the batch before: nothing is gained
        // by ending this one before the sink is free to take it (the wait is
        // for the next message or for the sink, whichever comes first).
        let applying = || applied.is_some_and(|applied| !applied.is_cancelled());
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
                    } else if let Some(applied) = applied.filter(|_| applying()) {
                        wal.next(std::pin::pin!(applied.cancelled())).await?
                    } else {
                        // Read on, the sink is free now and whatever comes
                        // later is read on during this batch's apply: only
                        // what is already waiting joins it.
                        let quiet_for = if applied.is_some() {
                            Duration::ZERO
                        } else {
                            LINGER
                        };
                        let quiet = (tokio::time::Instant::now() + quiet_for).min(deadline);
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
                WalItem::Begin { committed: at } => {
                    self.in_txn = true;
                    self.txn_committed = at;
                    self.txn_heartbeat = false;
                }
                WalItem::Insert(Ok(event)) => {
                    events.push(event);
                    committed.push(self.txn_committed);
                }
                WalItem::Insert(Err(letter)) => malformed.push(*letter),
                WalItem::Heartbeat { sent_at } => {
                    let round_trip = crate::observe::heartbeat_received(sent_at);
                    tracing::trace!(round_trip_ms = round_trip.as_millis(), "heartbeat");
                    if self.in_txn {
                        self.txn_heartbeat = true;
                    } else {
                        // A non-transactional message: no commit to wait for.
                        self.heartbeat_due = true;
                    }
                }
                WalItem::Commit { end_lsn } => {
                    self.in_txn = false;
                    self.heartbeat_due |= std::mem::take(&mut self.txn_heartbeat);
                    self.last_commit = self.last_commit.max(end_lsn);
                    // A stream that is never idle still ends the batch on
                    // time (once the sink can take it).
                    if tokio::time::Instant::now() >= deadline && !applying() {
                        break;
                    }
                }
                WalItem::Other => {}
            }
        }
        if events.is_empty() && malformed.is_empty() {
            self.busy = false;
            return Ok(self.position_batch());
        }
        self.busy = events.len() + malformed.len() >= max_events;
        // Events after the last commit belong to a transaction that is not
        // complete yet: they go out, but the position stays at that commit.
        let lsn = self.last_commit;
        Ok(Some(self.hand_out(events, malformed, committed, lsn)))
    }

    /// An empty batch with the stream's position, when it moved on without
    /// outbox events (other tables' WAL, keepalives, heartbeats) and a while
    /// has passed, or a heartbeat's transaction was read to its commit.
    fn position_batch(&mut self) -> Option<SourceBatch<Lsn>> {
        let Phase::Streaming(wal) = &self.phase else {
            return None;
        };
        let due = self.heartbeat_due || self.last_handout.elapsed() >= POSITION_INTERVAL;
        if self.in_txn || !due {
            return None;
        }
        // Outside a transaction, what was received is all delivered: the
        // last message was a commit or a keepalive (the walsender's sent position).
        let position = wal.received().max(self.last_commit);
        if position <= self.handed {
            return None;
        }
        Some(self.hand_out(Vec::new(), Vec::new(), Vec::new(), position))
    }
}
