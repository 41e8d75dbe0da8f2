//! Project: the activity read models in MongoDB `activity_read`, with
//! exactly-once effects under at-least-once delivery.
//!
//! A batch is applied in three steps:
//! 1. **load** the documents of every aggregate the batch touches (one `find`
//!    per collection) and fold the batch's events into them in memory, each
//!    aggregate fenced by `_seq`: an event at or below the fence already took
//!    effect and changes nothing;
//! 2. **write** each changed document once, conditioned on the fence it was
//!    loaded with (`_seq`, and an activity's `_rev`, which a copy refresh
//!    moves too): a concurrent writer makes the batch reload and redo;
//! 3. **refresh** the denormalized copies (user names inside activities, the
//!    activity entries inside users). Copies carry the version of their
//!    source and only move forward; the refresh reads its sources *after*
//!    step 2 is durable, so a concurrent writer elsewhere either sees our
//!    write or is seen by our read. Redelivered events repeat the refresh, so a
//!    crash between steps is repaired by the replay.
//!
//! A write the server refuses because of what it holds (a document over 16 MB,
//! a date it does not take) makes the batch split down to the events
//! responsible, which are dead-lettered while the rest applies ([`isolate`]).
//!
//! A batch is durable when [`Projector::apply`] returns `Ok`: only then may the
//! caller acknowledge its position.

pub mod cache;
pub mod fold;
mod isolate;
mod letters;
mod load;
mod refresh;
pub mod state;
mod write;

use crate::dead_letter::DeadLetter;
use crate::decode::OutboxEvent;
use crate::route::{route, AggregateKind, DomainEvent, HandlerError, Routed};
use crate::stages::{Stage, StageTimes};
use crate::store::codes;
use crate::store::mongo::{MongoStore, Refusal, StoreError};
use cache::DocCache;
use isolate::Attempted;
use mongodb::bson::{doc, Document};
use state::{ActivityDoc, Effect, NameCopy, Names, UserDoc};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;
use uuid::Uuid;

/// What one batch did.
#[derive(Debug, Default, Clone)]
pub struct BatchReport {
    pub applied: usize,
    pub duplicates: usize,
    pub unmatched: usize,
    pub dead_letters: Vec<DeadLetter>,
    /// Of `dead_letters`, those already written before (a re-delivered event
    /// that fails again): counted apart, not as new dead letters.
    pub letters_again: usize,
    /// Events that failed in a way an ordering race could explain (their
    /// aggregate is not created yet); with `dead_letter_races` off they are
    /// returned here untouched, for the caller to retry.
    pub deferred: Vec<(OutboxEvent, HandlerError)>,
    pub round_trips: u32,
    pub documents_written: u64,
    /// Where the batch's time went (load, fold, dead letters, write, refresh).
    pub stages: StageTimes,
}

/// An activity with the revision token (`_rev`) it holds.
type Revised = (ActivityDoc, Option<String>);

/// How many times a batch reloads after losing a race with another writer.
const MAX_CONFLICT_RETRIES: u32 = 8;

#[derive(Clone, Debug)]
pub struct Projector {
    store: MongoStore,
    /// Dead-letter "aggregate not created" failures at once (true), or hand
    /// them back for a later retry (false).
    pub dead_letter_races: bool,
    /// Documents kept across batches ([`cache`]), shared by the clones.
    cache: Option<Arc<Mutex<DocCache>>>,
    /// Batches that lost a race with another writer and were redone.
    conflicts: Arc<std::sync::atomic::AtomicU64>,
}

enum Attempt {
    Done(BatchReport),
    Conflict,
    /// The server refused a write; `settled` is what the attempt decided for good.
    Refused {
        refusal: Refusal,
        settled: BatchReport,
    },
}

/// The batch in memory: the documents and what happened to them.
#[derive(Default)]
struct Work {
    users: BTreeMap<Uuid, Option<UserDoc>>,
    loaded_user_seq: BTreeMap<Uuid, Option<i64>>,
    activities: BTreeMap<Uuid, Option<ActivityDoc>>,
    loaded_activity_seq: BTreeMap<Uuid, Option<i64>>,
    /// The revision token (`_rev`) of each activity as loaded, and the new
    /// one of each activity this batch writes.
    loaded_activity_rev: BTreeMap<Uuid, Option<String>>,
    new_activity_rev: BTreeMap<Uuid, String>,
    names: Names,
    changed_users: BTreeSet<Uuid>,
    changed_activities: BTreeSet<Uuid>,
    /// Users whose copies must be refreshed, and those just created.
    renamed: BTreeSet<Uuid>,
    created: BTreeSet<Uuid>,
    /// Activities whose members' entries must all be refreshed.
    resummarize: BTreeSet<Uuid>,
    /// (activity, user) entries to add or update, and to remove.
    joined: BTreeSet<(Uuid, Uuid)>,
    departed: BTreeSet<(Uuid, Uuid)>,
    /// Activities this batch touched at all (written or replayed).
    touched: BTreeSet<Uuid>,
}

impl Projector {
    pub fn new(store: MongoStore) -> Projector {
        Projector {
            store,
            dead_letter_races: true,
            cache: None,
            conflicts: Arc::default(),
        }
    }

    /// Keeps up to `capacity` documents across batches (0: none); clones
    /// share them.
    pub fn cached(mut self, capacity: usize) -> Projector {
        self.cache = (capacity > 0).then(|| Arc::new(Mutex::new(DocCache::new(capacity))));
        self
    }

    /// Forgets every cached document (the collections were swapped, or a
    /// batch went wrong).
    pub fn clear_cache(&self) {
        if let Some(cache) = &self.cache {
            cache.lock().unwrap_or_else(PoisonError::into_inner).clear();
        }
    }

    /// Batches that lost a race with another writer and were redone (one
    /// writer alone never does: a document it cached is what it wrote).
    pub fn conflicts(&self) -> u64 {
        self.conflicts.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Documents cached, lookups answered from the cache, lookups not.
    pub fn cache_stats(&self) -> Option<(usize, u64, u64)> {
        let cache = self.cache.as_ref()?;
        let cache = cache.lock().unwrap_or_else(PoisonError::into_inner);
        Some((cache.len(), cache.hits, cache.misses))
    }

    pub fn store(&self) -> &MongoStore {
        &self.store
    }

    /// Applies a batch. `Ok` means every effect (and dead letter) is durable;
    /// `Err` is a store failure (sorted by [`crate::policy::Classify`]) after which
    /// the whole batch may simply be applied again. Events whose writes the
    /// server refuses are isolated and dead-lettered (see [`isolate`]).
    pub async fn apply(&self, events: &[OutboxEvent]) -> Result<BatchReport, StoreError> {
        match self.apply_whole(events).await? {
            Attempted::Done(report) => Ok(report),
            Attempted::Refused { refusal, settled } => {
                tracing::warn!(events = events.len(), error = %refusal, "the server refused a batch; isolating the events responsible");
                let mut report = settled;
                report.absorb(isolate::isolate(self, events).await?);
                Ok(report)
            }
        }
    }

    /// Applies a batch as one, reloading after a lost race.
    async fn apply_whole(&self, events: &[OutboxEvent]) -> Result<Attempted, StoreError> {
        for _ in 0..MAX_CONFLICT_RETRIES {
            match self.try_apply(events).await? {
                Attempt::Done(report) => return Ok(Attempted::Done(report)),
                Attempt::Refused { refusal, settled } => {
                    return Ok(Attempted::Refused { refusal, settled })
                }
                Attempt::Conflict => {
                    self.conflicts
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::debug!("batch lost a race with another writer; reloading");
                }
            }
        }
        Err(StoreError::transient(
            crate::policy::RetryClass::Conflict,
            "another writer keeps changing the same documents; will retry",
        ))
    }

    /// One attempt; the cache keeps its documents only when it is done.
    async fn try_apply(&self, events: &[OutboxEvent]) -> Result<Attempt, StoreError> {
        let attempt = self.try_apply_once(events).await;
        if !matches!(attempt, Ok(Attempt::Done(_))) {
            self.clear_cache();
        }
        attempt
    }

    async fn try_apply_once(&self, events: &[OutboxEvent]) -> Result<Attempt, StoreError> {
        let mut report = BatchReport::default();
        let started = Instant::now();
        let routed: Vec<Result<Routed, HandlerError>> = events.iter().map(route).collect();
        let mut work = self.load(events, &routed, &mut report).await?;
        let started = report.stages.lap(Stage::Load, started);
        let mut replayed = Vec::new();

        for (event, routed) in events.iter().zip(routed) {
            match routed {
                Ok(Routed::Unmatched) => report.unmatched += 1,
                Err(err) => self.reject(&mut report, event, err),
                Ok(Routed::Domain(domain)) => match work.apply(event, domain) {
                    Ok(true) => report.applied += 1,
                    Ok(false) => replayed.push(event),
                    Err(err) => self.reject(&mut report, event, err),
                },
            }
        }

        work.dead_letter_overtaken(&mut report);
        work.bring_names_forward();
        work.new_activity_rev = work
            .changed_activities
            .iter()
            .map(|id| (*id, state::new_revision()))
            .collect();
        let started = report.stages.lap(Stage::Fold, started);
        // Dead letters before the own writes: a later event of the batch may
        // move a dead-lettered event's fence past it, and its redelivered
        // copy is then fenced off as already seen, never dead-lettered again.
        report.letters_again += self
            .write_dead_letters(&report.dead_letters, &mut report.round_trips)
            .await?;
        let started = report.stages.lap(Stage::DeadLetters, started);
        let mut written = BTreeSet::new();
        match self.write_own(&work, &mut report, &mut written).await {
            Ok(true) => {}
            Ok(false) => return Ok(Attempt::Conflict),
            // The batch's dead letters are durable already.
            Err(StoreError::Refused(refusal)) => {
                let settled = isolate::settled(&report, Some(&written));
                return Ok(Attempt::Refused { refusal, settled });
            }
            Err(err) => return Err(err),
        }
        crate::failpoint::crash_point(crate::failpoint::PROJECTION_AFTER_OWN_WRITES);
        let started = report.stages.lap(Stage::Write, started);
        match refresh::run(&self.store, &work, &mut report).await {
            Ok(rewritten) => self.remember(&work, &rewritten),
            // Every own write and dead letter is durable: all of it is settled.
            Err(StoreError::Refused(refusal)) => {
                return Ok(Attempt::Refused {
                    refusal,
                    settled: isolate::settled(&report, None),
                })
            }
            Err(err) => return Err(err),
        }
        let started = report.stages.lap(Stage::Refresh, started);
        self.recall_dead_letters(&replayed, &mut report).await?;
        report.stages.lap(Stage::DeadLetters, started);
        Ok(Attempt::Done(report))
    }

    fn reject(&self, report: &mut BatchReport, event: &OutboxEvent, err: HandlerError) {
        if err.may_be_race() && !self.dead_letter_races {
            report.deferred.push((event.clone(), err));
        } else {
            report.dead_letters.push(DeadLetter {
                event: event.clone(),
                error: err.to_string(),
                attempts: 1,
            });
        }
    }
}

impl Work {
    /// A user as loaded (from the server or the cache), with its name copy.
    fn take_user(&mut self, id: Uuid, user: UserDoc) {
        self.names.insert(
            id,
            NameCopy {
                name: Some(user.display_name.clone()),
                version: user.seq,
            },
        );
        self.users.insert(id, Some(user));
    }

    /// Deferred events whose own aggregate a later event of this batch moved
    /// past them can never take effect in order: they are dead letters now,
    /// durable before that later event's write. (Deferred, a crash after the
    /// batch's writes would lose them: the source records a deferral only
    /// with the acknowledgement, and the redelivered copy is fenced off.)
    fn dead_letter_overtaken(&self, report: &mut BatchReport) {
        for (event, err) in std::mem::take(&mut report.deferred) {
            match (event.sequence_id, self.fence(event.aggregate_id)) {
                (Some(seq), Some(fence)) if fence > seq => report.dead_letters.push(DeadLetter {
                    error: format!(
                        "{err}; a later event of {} {} (sequence_id {fence}) took effect in \
                         the same batch, so this one can never apply in order",
                        event.aggregate_type, event.aggregate_id
                    ),
                    attempts: 1,
                    event,
                }),
                _ => report.deferred.push((event, err)),
            }
        }
    }

    /// The `_seq` of an aggregate as this batch leaves it, if it exists.
    fn fence(&self, id: Uuid) -> Option<i64> {
        match self.users.get(&id) {
            Some(user) => user.as_ref().map(|u| u.seq),
            None => self
                .activities
                .get(&id)
                .and_then(|activity| activity.as_ref().map(|a| a.seq)),
        }
    }

    /// Brings the name copies of every activity the batch writes forward to
    /// the latest version this batch knows (loaded, or set by its own user
    /// events), so that the write carries them and the refresh after it has
    /// nothing left to do for them unless another writer moved a name since.
    fn bring_names_forward(&mut self) {
        let names = &self.names;
        let name_of = |user: &Uuid| names.get(user).cloned();
        for id in &self.changed_activities {
            if let Some(Some(activity)) = self.activities.get_mut(id) {
                refresh::refresh_names(activity, &name_of);
            }
        }
    }

    /// Folds one routed event into the documents; `Ok(false)` for an event
    /// that already took effect.
    fn apply(&mut self, event: &OutboxEvent, domain: DomainEvent) -> Result<bool, HandlerError> {
        let seq = event.sequence_id.ok_or(HandlerError::NoSequence)?;
        let id = event.aggregate_id;
        match domain.aggregate_kind() {
            AggregateKind::User => {
                let doc = self.users.entry(id).or_insert(None);
                if doc.as_ref().is_some_and(|d| d.seq >= seq) {
                    // Replayed: redo its refresh, in case a crash cut it short.
                    if matches!(domain, DomainEvent::UserCreated { .. }) {
                        self.created.insert(id);
                    }
                    self.renamed.insert(id);
                    return Ok(false);
                }
                let effect =
                    state::apply_user(doc, id, &event.event_type, seq, event.created_at, domain)?;
                if let Some(user) = doc {
                    self.names.insert(
                        id,
                        NameCopy {
                            name: Some(user.display_name.clone()),
                            version: user.seq,
                        },
                    );
                }
                self.changed_users.insert(id);
                if effect.name_changed {
                    self.renamed.insert(id);
                }
                if effect.user_created {
                    self.created.insert(id);
                }
                Ok(true)
            }
            AggregateKind::Activity => {
                let doc = self.activities.entry(id).or_insert(None);
                self.touched.insert(id);
                if doc.as_ref().is_some_and(|d| d.seq >= seq) {
                    self.resummarize.insert(id);
                    if let DomainEvent::ParticipantLeft { user_id } = domain {
                        self.departed.insert((id, user_id));
                    }
                    return Ok(false);
                }
                let before = doc.as_ref().map(ActivityDoc::summary);
                let unchanged = doc.clone();
                let names = &self.names;
                let name_of = |user: Uuid| names.get(&user).cloned().unwrap_or_default();
                let Effect { joined, left, .. } = state::apply_activity(
                    doc,
                    id,
                    &event.event_type,
                    seq,
                    event.created_at,
                    domain,
                    &name_of,
                )?;
                if before != doc.as_ref().map(ActivityDoc::summary) {
                    self.resummarize.insert(id);
                }
                if let Some(user) = joined {
                    self.joined.insert((id, user));
                    self.departed.remove(&(id, user));
                }
                if let Some(user) = left {
                    self.departed.insert((id, user));
                    self.joined.remove(&(id, user));
                }
                // An event that changed nothing but the fence (a join of a
                // member, a leave of a non-member) needs no write: replayed
                // on the same state it changes nothing again.
                let moved = match (&unchanged, doc.as_ref()) {
                    (Some(old), Some(new)) => {
                        *old != ActivityDoc {
                            seq: old.seq,
                            ..new.clone()
                        }
                    }
                    _ => true,
                };
                if moved {
                    self.changed_activities.insert(id);
                }
                Ok(true)
            }
        }
    }
}

fn user_projection() -> Document {
    doc! { "email": 1, "display_name": 1, "created_at": 1, "updated_at": 1, "_seq": 1 }
}

fn ids(set: &BTreeSet<Uuid>) -> Vec<String> {
    set.iter().map(Uuid::to_string).collect()
}

fn doc_id(doc: &Document) -> Result<Uuid, StoreError> {
    doc.get_str("_id")
        .ok()
        .and_then(|s| Uuid::parse_str(s).ok())
        .ok_or_else(|| {
            StoreError::fatal(format!(
                "read model document with a non-uuid _id ({}): {FOREIGN}",
                codes::shorten(&format!("{:?}", doc.get("_id")), 80)
            ))
        })
}

/// What to do about a read-model document this processor did not write.
const FOREIGN: &str = "it was not written by this processor; remove it, \
                       or point MONGODB_DB at the processor's own database";

fn corrupt(collection: &str, id: Uuid, reason: &str) -> StoreError {
    StoreError::fatal(format!(
        "read model {collection}/{id} is not in the expected shape ({}): {FOREIGN}",
        codes::shorten(reason, 80)
    ))
}

impl isolate::Sink for Projector {
    async fn attempt(&self, events: &[OutboxEvent]) -> Result<Attempted, StoreError> {
        self.apply_whole(events).await
    }

    async fn probe(&self, collection: &str) -> Result<(), StoreError> {
        self.store.probe_write(collection).await
    }

    async fn dead_letter(&self, letter: &DeadLetter) -> Result<u32, StoreError> {
        let mut round_trips = 0;
        self.write_dead_letters(std::slice::from_ref(letter), &mut round_trips)
            .await?;
        Ok(round_trips)
    }
}
