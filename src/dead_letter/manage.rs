//! `retry` and `discard`, step by step, so that a stop at any point (a
//! crash, Ctrl-C, MongoDB gone) leaves nothing a rerun cannot finish:
//!
//! - retry, per aggregate: insert the new outbox rows (one transaction,
//!   [`reemit`]), then write the audit records and remove the letters
//!   ([`audit::move_letters`]). A rerun finds the rows by their derived ids
//!   and only finishes the move; a letter whose audit record says
//!   "retried" is never re-emitted again.
//!   A provisional letter of the kafka source (the consumer still tries its
//!   event, `sink::deferral`) is left alone.
//! - discard: write the audit records, then remove the letters.
//!
//! MongoDB down is transient: every MongoDB step waits for it (with the
//! runtime's backoff, up to `wait`, or until interrupted) and says so.
//! PostgreSQL failing stops the command where it is (what was done is
//! printed).

use super::audit::{self, Action};
use super::records::Letter;
use super::reemit::{self, Group, ReemitError};
use crate::config::PipelineConfig;
use crate::observe::Component;
use crate::policy::{describe, Classify, ErrorClass};
use crate::runtime::Retry;
use crate::store::mongo::{MongoStore, StoreError};
use std::collections::HashMap;
use std::time::Duration;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Letters moved per MongoDB round trip by `discard`.
const MOVE_CHUNK: usize = 500;

/// What became of one letter.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Re-emitted now as a new outbox row.
    ReEmitted {
        event_id: Uuid,
        sequence_id: Option<i64>,
    },
    /// Re-emitted by an earlier (or a concurrent) run: not again.
    AlreadyReEmitted {
        event_id: Uuid,
        sequence_id: Option<i64>,
    },
    Discarded,
    /// Cannot be re-emitted (why); left where it is.
    Refused(String),
    /// A provisional letter: the kafka consumer still tries the event.
    Waiting,
}

/// Why a command stopped before the end.
#[derive(Debug, thiserror::Error)]
pub enum Stopped {
    #[error("MongoDB did not answer within {0:?} (--wait)")]
    GaveUp(Duration),
    #[error("interrupted")]
    Interrupted,
    #[error(transparent)]
    Store(StoreError),
    #[error(transparent)]
    Reemit(#[from] ReemitError),
}

/// How the commands wait for MongoDB.
pub struct Patience {
    pub retry: Retry,
    pub wait: Duration,
}

impl Patience {
    pub fn new(pipeline: &PipelineConfig, interrupt: CancellationToken, wait: Duration) -> Self {
        Patience {
            retry: Retry::new(pipeline, interrupt),
            wait,
        }
    }

    /// Runs `op` until it succeeds, retrying transient failures for up to
    /// `wait`; the first one is said on stderr (whatever the log level).
    pub async fn mongo<T>(
        &self,
        mut op: impl AsyncFnMut() -> Result<T, StoreError>,
    ) -> Result<T, Stopped> {
        let mut said = false;
        let wait = self.wait;
        let tried = tokio::time::timeout(
            wait,
            self.retry
                .run(Component::Mongodb, "mongodb unreachable", async || {
                    let tried = op().await;
                    if let Err(err) = &tried {
                        if !said && err.class() == ErrorClass::Transient {
                            said = true;
                            eprintln!(
                                "MongoDB unreachable, waiting for it (up to {wait:?}, --wait; \
                                 Ctrl-C stops): {}",
                                describe(err)
                            );
                        }
                    }
                    tried
                }),
        )
        .await;
        match tried {
            Err(_) => Err(Stopped::GaveUp(self.wait)),
            Ok(Ok(Some(value))) => Ok(value),
            Ok(Ok(None)) => Err(Stopped::Interrupted),
            Ok(Err(err)) => Err(Stopped::Store(err)),
        }
    }

    fn interrupted(&self) -> bool {
        self.retry.shutdown().is_cancelled()
    }
}

/// Re-emits `letters` (see the module doc), calling `done` for each letter
/// as its outcome is final.
pub async fn retry(
    pg: &mut Client,
    store: &MongoStore,
    patience: &Patience,
    letters: Vec<Letter>,
    done: &mut dyn FnMut(&Letter, &Outcome),
) -> Result<(), Stopped> {
    let ids: Vec<String> = letters.iter().map(|l| l.id.clone()).collect();
    let audited = patience
        .mongo(async || audit::find(store, &ids).await)
        .await?;
    let earlier: HashMap<String, (Uuid, Option<i64>)> = audited
        .into_iter()
        .filter_map(|r| match r.action {
            Action::Retried {
                event_id,
                sequence_id,
            } => Some((r.letter.id, (event_id, sequence_id))),
            Action::Discarded { .. } => None,
        })
        .collect();
    let (waiting, letters): (Vec<Letter>, Vec<Letter>) = letters
        .into_iter()
        .partition(|l| l.error.contains(crate::sink::deferral::WAITING));
    for letter in &waiting {
        done(letter, &Outcome::Waiting);
    }
    let (again, fresh): (Vec<Letter>, Vec<Letter>) = letters
        .into_iter()
        .partition(|l| earlier.contains_key(&l.id));
    if !again.is_empty() {
        let gone: Vec<String> = again.iter().map(|l| l.id.clone()).collect();
        patience
            .mongo(async || audit::move_letters(store, Vec::new(), &gone).await)
            .await?;
        for letter in &again {
            let (event_id, sequence_id) = earlier[&letter.id];
            done(
                letter,
                &Outcome::AlreadyReEmitted {
                    event_id,
                    sequence_id,
                },
            );
        }
    }
    let (groups, refused) = reemit::plan(pg, fresh)
        .await
        .map_err(|e| Stopped::Reemit(e.into()))?;
    for (letter, why) in refused {
        done(&letter, &Outcome::Refused(why));
    }
    for group in groups {
        if patience.interrupted() {
            return Err(Stopped::Interrupted);
        }
        retry_group(pg, store, patience, &group, done).await?;
    }
    Ok(())
}

/// One aggregate's letters: the rows, then the move.
async fn retry_group(
    pg: &mut Client,
    store: &MongoStore,
    patience: &Patience,
    group: &Group,
    done: &mut dyn FnMut(&Letter, &Outcome),
) -> Result<(), Stopped> {
    let emitted = lock_and_insert(pg, patience, group).await?;
    let records: Vec<_> = group
        .items
        .iter()
        .zip(&emitted)
        .map(|(item, e)| audit::retried(&item.letter, e.event_id, e.sequence_id))
        .collect();
    let ids: Vec<String> = group.items.iter().map(|i| i.letter.id.clone()).collect();
    patience
        .mongo(async || audit::move_letters(store, records.clone(), &ids).await)
        .await?;
    for (item, e) in group.items.iter().zip(emitted) {
        let outcome = if e.fresh {
            Outcome::ReEmitted {
                event_id: e.event_id,
                sequence_id: e.sequence_id,
            }
        } else {
            Outcome::AlreadyReEmitted {
                event_id: e.event_id,
                sequence_id: e.sequence_id,
            }
        };
        done(&item.letter, &outcome);
    }
    Ok(())
}

/// [`reemit::insert_group`], trying for the outbox's lock again (after a
/// pause) until `wait` is over or the command is interrupted.
async fn lock_and_insert(
    pg: &mut Client,
    patience: &Patience,
    group: &Group,
) -> Result<Vec<reemit::Emitted>, Stopped> {
    let started = std::time::Instant::now();
    let mut backoff = patience.retry.backoff();
    loop {
        match reemit::insert_group(pg, group, reemit::LOCK_TRY).await {
            Err(ReemitError::Locked(_)) if started.elapsed() < patience.wait => {
                if !patience.retry.pause(backoff.next_delay()).await {
                    return Err(Stopped::Interrupted);
                }
            }
            Err(ReemitError::Locked(_)) => {
                return Err(Stopped::Reemit(ReemitError::Locked(patience.wait)))
            }
            other => return Ok(other?),
        }
    }
}

/// Moves `letters` to the audit collection as discarded for `reason`; a
/// letter already retried keeps that record (and leaves `dead_letters`).
pub async fn discard(
    store: &MongoStore,
    patience: &Patience,
    letters: Vec<Letter>,
    reason: &str,
    done: &mut dyn FnMut(&Letter, &Outcome),
) -> Result<(), Stopped> {
    for chunk in letters.chunks(MOVE_CHUNK) {
        if patience.interrupted() {
            return Err(Stopped::Interrupted);
        }
        let ids: Vec<String> = chunk.iter().map(|l| l.id.clone()).collect();
        let audited = patience
            .mongo(async || audit::find(store, &ids).await)
            .await?;
        let retried: HashMap<String, Action> = audited
            .into_iter()
            .filter(|r| matches!(r.action, Action::Retried { .. }))
            .map(|r| (r.letter.id, r.action))
            .collect();
        let records: Vec<_> = chunk
            .iter()
            .filter(|l| !retried.contains_key(&l.id))
            .map(|l| audit::discarded(l, reason))
            .collect();
        patience
            .mongo(async || audit::move_letters(store, records.clone(), &ids).await)
            .await?;
        for letter in chunk {
            let outcome = match retried.get(&letter.id) {
                Some(Action::Retried {
                    event_id,
                    sequence_id,
                }) => Outcome::AlreadyReEmitted {
                    event_id: *event_id,
                    sequence_id: *sequence_id,
                },
                _ => Outcome::Discarded,
            };
            done(letter, &outcome);
        }
    }
    Ok(())
}
