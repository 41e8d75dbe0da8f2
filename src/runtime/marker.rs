//! Outbox marking: the rows of a batch whose effects are durable become
//! `processed` (or `failed`, for its dead letters), for sources that do not
//! claim rows themselves (replication, with `MARK_PROCESSED`).
//!
//! A row can reach us before its commit is visible: the walsender sends a
//! transaction once its commit record is flushed, and the committing session
//! makes it visible a moment later (or, with a synchronous standby, only once
//! the standby confirms). An `UPDATE` then does not see the row and changes
//! nothing. Each statement therefore also returns the ids it could not see;
//! those are tried again for up to [`SETTLE`] within the batch (before its
//! acknowledgement) and after that before every later batch, until they are
//! visible or [`GIVE_UP`] has passed (docs/design.md, section 9).

use crate::config::PostgresConfig;
use crate::dead_letter::DeadLetter;
use crate::decode::OutboxEvent;
use crate::outbox::{self, OutboxError};
use crate::policy::{Classify, ErrorClass};
use crate::source::{batch_id, BatchId, BatchOutcome};
use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use uuid::Uuid;

/// How long a batch waits for its rows to become visible before it is
/// acknowledged with some of them still to mark.
const SETTLE: Duration = Duration::from_secs(1);
/// How long a marking begun beside a write may wait for it: a longer write
/// (MongoDB away, say) ends the transaction, and the rows are marked the
/// plain way once the write is durable.
const OPEN_LIMIT: Duration = Duration::from_secs(10);
/// How long rows that are still not visible are kept to mark.
const GIVE_UP: Duration = Duration::from_secs(600);

/// Why rows could not be marked.
#[derive(Debug, thiserror::Error)]
pub enum MarkError {
    /// PostgreSQL is unreachable: transient.
    #[error("cannot connect to mark outbox rows")]
    Connect(#[source] OutboxError),
    /// The statement failed; its class decides.
    #[error("cannot mark outbox rows{}", sqlstate(.0))]
    Statement(#[source] tokio_postgres::Error),
}

fn sqlstate(err: &tokio_postgres::Error) -> String {
    match err.code() {
        Some(code) => format!(" (SQLSTATE {})", code.code()),
        None => String::new(),
    }
}

impl Classify for MarkError {
    fn class(&self) -> ErrorClass {
        match self {
            MarkError::Connect(_) => ErrorClass::Transient,
            MarkError::Statement(err) => err.class(),
        }
    }

    fn retry_class(&self) -> crate::policy::RetryClass {
        match self {
            MarkError::Connect(err) => err.retry_class(),
            MarkError::Statement(err) => err.retry_class(),
        }
    }
}

impl MarkError {
    /// What an operator does about it, when it stops the process.
    pub fn advice(&self) -> &'static str {
        match self {
            MarkError::Statement(err)
                if err.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) =>
            {
                "give the processor's role UPDATE on event_outbox, or set MARK_PROCESSED=false"
            }
            _ => "fix the database error and start again, or set MARK_PROCESSED=false",
        }
    }
}

/// Marks outbox rows after their effects are durable.
pub struct OutboxMarker {
    pg: PostgresConfig,
    client: Option<Client>,
    /// Rows the marking statements could not see yet.
    late: Marks,
    /// When the oldest of `late` was first tried.
    late_since: Option<Instant>,
    /// Batches' `processed` updates begun before their effects are durable,
    /// oldest first (at most two: the batch being written and, where the
    /// sink writes ahead, the next).
    open: VecDeque<Opening>,
    /// Updates told to commit ([`OutboxMarker::commit`]) and not finished
    /// yet, oldest first.
    committing: VecDeque<Opening>,
    /// Connections free for the next [`OutboxMarker::begin`].
    spare: Vec<Client>,
}

/// A batch's `processed` update, running on a connection of its own until
/// it is told to commit (with the batch's dead letters, set `failed` in the
/// same transaction) or to roll back (the sender dropped).
struct Opening {
    batch: BatchId,
    commit: Option<oneshot::Sender<Vec<DeadLetter>>>,
    task: JoinHandle<Option<Ended>>,
}

/// How a begun update ended: its connection, the ids the update could not
/// see, and the commit's outcome (`None`: rolled back), with the dead
/// letters it could not see.
struct Ended {
    client: Client,
    unseen: Vec<Uuid>,
    committed: Option<Result<Marks, tokio_postgres::Error>>,
}

/// What a set of rows becomes.
#[derive(Default)]
struct Marks {
    applied: Vec<Uuid>,
    dead: Vec<DeadLetter>,
}

impl Marks {
    fn is_empty(&self) -> bool {
        self.applied.is_empty() && self.dead.is_empty()
    }

    fn len(&self) -> usize {
        self.applied.len() + self.dead.len()
    }
}

impl OutboxMarker {
    pub fn new(pg: PostgresConfig) -> OutboxMarker {
        OutboxMarker {
            pg,
            client: None,
            late: Marks::default(),
            late_since: None,
            open: VecDeque::new(),
            committing: VecDeque::new(),
            spare: Vec::new(),
        }
    }

    /// Applied events become `processed`, dead-lettered ones `failed`; rows
    /// not yet visible are waited for briefly, then kept for later calls.
    pub async fn mark(
        &mut self,
        events: &[OutboxEvent],
        outcome: &BatchOutcome,
    ) -> Result<(), MarkError> {
        let marks = Marks {
            applied: applied(events.iter().map(|e| e.event_id), &outcome.dead_letters),
            dead: outcome.dead_letters.clone(),
        };
        self.mark_late().await?;
        let left = self.statements(&marks).await?;
        self.settle(left).await
    }

    /// Marks `marks`, waiting up to [`SETTLE`] for rows not visible yet and
    /// keeping what is still invisible after that.
    async fn settle(&mut self, mut marks: Marks) -> Result<(), MarkError> {
        let deadline = Instant::now() + SETTLE;
        let mut pause = Duration::from_millis(2);
        while !marks.is_empty() {
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
            marks = self.statements(&marks).await?;
        }
        self.keep_late(marks);
        Ok(())
    }

    /// Starts marking a batch while it is being written: its rows become
    /// `processed` in a transaction that [`OutboxMarker::finish`] commits
    /// once the batch's effects are durable (and [`OutboxMarker::abort`]
    /// rolls back otherwise), so that the update's work overlaps the write
    /// and "processed" still means durable. On any error nothing is open and
    /// `finish` marks the plain way.
    ///
    /// The update runs in a task of its own, on a connection of its own, so
    /// it also overlaps whatever the caller does next; a batch already
    /// begun is not begun again.
    pub async fn begin(&mut self, events: &[OutboxEvent]) {
        let batch = batch_id(events);
        if events.is_empty() || self.open.iter().any(|open| open.batch == batch) {
            return;
        }
        let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
        let client = std::iter::from_fn(|| self.spare.pop())
            .chain(self.client.take())
            .find(|client| !client.is_closed());
        let pg = self.pg.clone();
        let (commit, told) = oneshot::channel::<Vec<DeadLetter>>();
        let task = tokio::spawn(async move {
            let client = match client {
                Some(client) => client,
                None => match outbox::connect(&pg).await {
                    Ok(client) => client,
                    Err(err) => {
                        tracing::debug!(error = %crate::policy::describe(&err), "cannot start marking early");
                        return None;
                    }
                },
            };
            let begun = async {
                // A process stopped mid-write (frozen, say) must not hold
                // these rows' locks for long: whoever takes over marks them too.
                client
                    .batch_execute(&format!(
                        "BEGIN; SET LOCAL idle_in_transaction_session_timeout = '{}s'",
                        OPEN_LIMIT.as_secs()
                    ))
                    .await?;
                client.query(MARK_PROCESSED, &[&ids]).await
            };
            let unseen = match begun.await {
                Ok(rows) => rows.iter().map(|row| row.get(0)).collect(),
                Err(err) => {
                    // The connection is dropped with whatever it had begun.
                    tracing::debug!(error = %crate::outbox::describe(&err), "cannot start marking early");
                    return None;
                }
            };
            let Ok(dead) = told.await else {
                // Not to be committed: undone, and the connection kept.
                client.batch_execute("ROLLBACK").await.ok()?;
                return Some(Ended {
                    client,
                    unseen,
                    committed: None,
                });
            };
            let dead = Marks {
                applied: Vec::new(),
                dead,
            };
            let committed = async {
                let left = mark_outbox(&client, &dead).await?;
                client.batch_execute("COMMIT").await?;
                Ok(left)
            };
            let committed = Some(committed.await);
            Some(Ended {
                client,
                unseen,
                committed,
            })
        });
        self.open.push_back(Opening {
            batch,
            commit: Some(commit),
            task,
        });
    }

    /// Keeps a connection for the next statements or the next update.
    fn give_back(&mut self, client: Client) {
        if self.client.is_none() {
            self.client = Some(client);
        } else if self.spare.len() < 3 {
            self.spare.push(client);
        }
    }

    /// Tells the update begun for this batch to commit, now that the batch's
    /// effects are durable, with its dead letters set `failed` in the same
    /// transaction; it commits while the caller goes on, and
    /// [`OutboxMarker::finish`] waits for it. Updates begun for batches
    /// before this one are stale (those batches are never finished): they
    /// are dropped, and with their connections their transactions.
    pub fn commit(&mut self, events: &[OutboxEvent], outcome: &BatchOutcome) {
        let Some(mut open) = take(&mut self.open, batch_id(events)) else {
            return;
        };
        if let Some(commit) = open.commit.take() {
            // A task that ended already is found out by `finish`.
            let _ = commit.send(outcome.dead_letters.clone());
        }
        self.committing.push_back(open);
    }

    /// Finishes a batch's marking: waits for what [`OutboxMarker::commit`]
    /// (called here if it was not) committed, or marks the plain way when
    /// nothing was begun or the commit failed. Rows the update could not see
    /// are waited for briefly, then kept for later calls.
    pub async fn finish(
        &mut self,
        events: &[OutboxEvent],
        outcome: &BatchOutcome,
    ) -> Result<(), MarkError> {
        self.commit(events, outcome);
        // Committed or not, the batches before this one come again.
        let ended = match take(&mut self.committing, batch_id(events)) {
            Some(committing) => committing.task.await.ok().flatten(),
            None => None,
        };
        let Some(Ended {
            client,
            unseen,
            committed: Some(committed),
        }) = ended
        else {
            return self.mark(events, outcome).await;
        };
        match committed {
            Ok(mut left) => {
                self.give_back(client);
                left.applied = applied(unseen.into_iter(), &outcome.dead_letters);
                self.mark_late().await?;
                self.settle(left).await
            }
            Err(err) => {
                // Committed or not, the plain statements below are idempotent.
                tracing::debug!(error = %crate::outbox::describe(&err), "marking in the open transaction failed; marking again");
                drop(client);
                self.mark(events, outcome).await
            }
        }
    }

    /// Rolls back what [`OutboxMarker::begin`] opened and was not told to
    /// commit (the batch was not written, and nothing after it is).
    pub async fn abort(&mut self) {
        while let Some(mut open) = self.open.pop_front() {
            drop(open.commit.take());
            if let Ok(Some(ended)) = open.task.await {
                self.give_back(ended.client);
            }
        }
    }

    /// Rows kept from earlier batches are still to mark.
    pub fn has_late(&self) -> bool {
        !self.late.is_empty()
    }

    /// Tries the rows kept from earlier batches once more (they stay kept
    /// when the statement fails).
    pub async fn mark_late(&mut self) -> Result<(), MarkError> {
        if self.late.is_empty() {
            return Ok(());
        }
        let marks = std::mem::take(&mut self.late);
        match self.statements(&marks).await {
            Ok(left) => {
                self.keep_late(left);
                Ok(())
            }
            Err(err) => {
                self.late = marks;
                Err(err)
            }
        }
    }

    fn keep_late(&mut self, marks: Marks) {
        if marks.is_empty() {
            self.late_since = None;
            self.late = marks;
            return;
        }
        let since = *self.late_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= GIVE_UP {
            tracing::warn!(
                rows = marks.len(),
                first = ?marks.applied.first().or(marks.dead.first().map(|d| &d.event.event_id)),
                "outbox rows applied 10 minutes ago are still not visible to this session \
                 (pruned since, or their commit still waits for a synchronous standby): \
                 their status is left as it is"
            );
            self.late_since = None;
            return;
        }
        tracing::debug!(
            rows = marks.len(),
            "outbox rows not visible yet: marking them later"
        );
        self.late = marks;
    }

    /// Runs the marking statements; returns the rows they could not see.
    async fn statements(&mut self, marks: &Marks) -> Result<Marks, MarkError> {
        let client = match self.client.take() {
            Some(client) if !client.is_closed() => client,
            _ => outbox::connect(&self.pg)
                .await
                .map_err(MarkError::Connect)?,
        };
        let left = mark_outbox(&client, marks)
            .await
            .map_err(MarkError::Statement)?;
        self.client = Some(client);
        Ok(left)
    }
}

/// The update begun for `batch`, taken out of `queue`. Those before it are
/// stale (their batches are never finished): they are dropped, and with
/// their connections their transactions.
fn take(queue: &mut VecDeque<Opening>, batch: BatchId) -> Option<Opening> {
    let at = queue.iter().position(|open| open.batch == batch)?;
    for stale in queue.drain(..at) {
        stale.task.abort();
    }
    queue.pop_front()
}

/// Of `ids`, those not dead-lettered.
fn applied(ids: impl Iterator<Item = Uuid>, dead: &[DeadLetter]) -> Vec<Uuid> {
    let dead: BTreeSet<Uuid> = dead.iter().map(|d| d.event.event_id).collect();
    ids.filter(|id| !dead.contains(id)).collect()
}

/// Sets the rows `$1` `processed` (unless finished already) and returns,
/// from the same snapshot, the ids it could not see.
const MARK_PROCESSED: &str = "WITH marked AS (
         UPDATE event_outbox
         SET status = 'processed', published_at = coalesce(published_at, now()), lock_id = NULL
         WHERE event_id = ANY($1) AND status NOT IN ('processed', 'failed')
         RETURNING 1)
     SELECT w.id FROM unnest($1::uuid[]) AS w(id)
     WHERE NOT EXISTS (SELECT 1 FROM event_outbox o WHERE o.event_id = w.id)";

/// Sets applied rows `processed` and dead-lettered rows `failed` (with their
/// error and attempts; rows already `failed` stay so). Returns the rows the
/// statements could not see, in one snapshot with the update.
async fn mark_outbox(client: &Client, marks: &Marks) -> Result<Marks, tokio_postgres::Error> {
    let mut left = Marks::default();
    if !marks.applied.is_empty() {
        let rows = client.query(MARK_PROCESSED, &[&marks.applied]).await?;
        left.applied = rows.iter().map(|row| row.get(0)).collect();
    }
    if !marks.dead.is_empty() {
        let ids: Vec<Uuid> = marks.dead.iter().map(|d| d.event.event_id).collect();
        let errors: Vec<String> = marks.dead.iter().map(|d| d.error.clone()).collect();
        let attempts: Vec<i32> = marks
            .dead
            .iter()
            .map(|d| i32::try_from(d.attempts).unwrap_or(i32::MAX))
            .collect();
        let rows = client
            .query(
                "WITH marked AS (
                     UPDATE event_outbox AS t
                     SET status = 'failed', retry_count = greatest(t.retry_count, f.attempts),
                         last_error = f.error, lock_id = NULL
                     FROM unnest($1::uuid[], $2::text[], $3::int[]) AS f(event_id, error, attempts)
                     WHERE t.event_id = f.event_id AND t.status <> 'failed'
                     RETURNING 1)
                 SELECT w.id FROM unnest($1::uuid[]) AS w(id)
                 WHERE NOT EXISTS (SELECT 1 FROM event_outbox o WHERE o.event_id = w.id)",
                &[&ids, &errors, &attempts],
            )
            .await?;
        let unseen: BTreeSet<Uuid> = rows.iter().map(|row| row.get(0)).collect();
        left.dead = marks
            .dead
            .iter()
            .filter(|d| unseen.contains(&d.event.event_id))
            .cloned()
            .collect();
    }
    Ok(left)
}
