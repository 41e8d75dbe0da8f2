//! Step 1 of a batch: the documents it touches, from the document cache
//! ([`super::cache`]) where it holds them and from the server otherwise; and,
//! once the batch is durable, its documents back into the cache.

use super::state::{ActivityDoc, UserDoc};
use super::{corrupt, doc_id, ids, user_projection, BatchReport, Projector, Revised, Work};
use crate::decode::OutboxEvent;
use crate::route::{AggregateKind, DomainEvent, HandlerError, Routed};
use crate::store::mongo::{StoreError, ACTIVITIES, USERS};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::PoisonError;
use uuid::Uuid;

impl Projector {
    pub(super) async fn load(
        &self,
        events: &[OutboxEvent],
        routed: &[Result<Routed, HandlerError>],
        report: &mut BatchReport,
    ) -> Result<Work, StoreError> {
        let mut user_ids = BTreeSet::new();
        let mut activity_ids = BTreeSet::new();
        for (event, routed) in events.iter().zip(routed) {
            let Ok(Routed::Domain(domain)) = routed else {
                continue;
            };
            match domain.aggregate_kind() {
                AggregateKind::User => {
                    user_ids.insert(event.aggregate_id);
                }
                AggregateKind::Activity => {
                    activity_ids.insert(event.aggregate_id);
                }
            }
            match domain {
                DomainEvent::ActivityCreated { organizer_id, .. } => {
                    user_ids.insert(*organizer_id);
                }
                DomainEvent::ParticipantJoined { user_id, .. } => {
                    user_ids.insert(*user_id);
                }
                _ => {}
            }
        }
        let mut work = Work::default();
        let (cached_users, cached_activities) = self.recall(&user_ids, &activity_ids);
        let user_ids: BTreeSet<Uuid> = user_ids
            .into_iter()
            .filter(|id| !cached_users.contains_key(id))
            .collect();
        let activity_ids: BTreeSet<Uuid> = activity_ids
            .into_iter()
            .filter(|id| !cached_activities.contains_key(id))
            .collect();
        let user_docs = self
            .store
            .find_by_ids(USERS, ids(&user_ids), Some(user_projection()))
            .await?;
        let activity_docs = self
            .store
            .find_by_ids(ACTIVITIES, ids(&activity_ids), None)
            .await?;
        report.round_trips += self.store.find_in_round_trips(user_ids.len())
            + self.store.find_in_round_trips(activity_ids.len());
        for id in &user_ids {
            work.users.insert(*id, None);
        }
        for (id, user) in cached_users {
            work.take_user(id, user);
        }
        for (id, (activity, rev)) in cached_activities {
            work.activities.insert(id, Some(activity));
            work.loaded_activity_rev.insert(id, rev);
        }
        for doc in &user_docs {
            let id = doc_id(doc)?;
            let user = UserDoc::from_bson(doc).map_err(|e| corrupt(USERS, id, &e))?;
            work.take_user(id, user);
        }
        for id in &activity_ids {
            work.activities.insert(*id, None);
        }
        for doc in &activity_docs {
            let id = doc_id(doc)?;
            let activity = ActivityDoc::from_bson(doc).map_err(|e| corrupt(ACTIVITIES, id, &e))?;
            work.activities.insert(id, Some(activity));
            let rev = doc.get_str("_rev").ok().map(str::to_string);
            work.loaded_activity_rev.insert(id, rev);
        }
        work.loaded_user_seq = work
            .users
            .iter()
            .map(|(id, d)| (*id, d.as_ref().map(|d| d.seq)))
            .collect();
        work.loaded_activity_seq = work
            .activities
            .iter()
            .map(|(id, d)| (*id, d.as_ref().map(|d| d.seq)))
            .collect();
        Ok(work)
    }

    /// The cached documents of these ids.
    pub(super) fn recall(
        &self,
        users: &BTreeSet<Uuid>,
        activities: &BTreeSet<Uuid>,
    ) -> (BTreeMap<Uuid, UserDoc>, BTreeMap<Uuid, Revised>) {
        let Some(cache) = &self.cache else {
            return Default::default();
        };
        let mut cache = cache.lock().unwrap_or_else(PoisonError::into_inner);
        let users = users
            .iter()
            .filter_map(|id| Some((*id, cache.user(id)?)))
            .collect();
        let activities = activities
            .iter()
            .filter_map(|id| Some((*id, cache.activity(id)?)))
            .collect();
        (users, activities)
    }

    /// The batch is durable: its documents as they now stand go to the
    /// cache, except activities whose copies the refresh rewrote (`rewritten`).
    pub(super) fn remember(&self, work: &Work, rewritten: &BTreeSet<Uuid>) {
        let Some(cache) = &self.cache else {
            return;
        };
        let mut cache = cache.lock().unwrap_or_else(PoisonError::into_inner);
        // A document is cached as the server now holds it: written by this
        // batch, or unchanged since it was loaded (an event that changes
        // nothing can move the fence in memory without a write).
        let held = |changed: bool, loaded: Option<&Option<i64>>, seq: i64| {
            changed || loaded.copied().flatten() == Some(seq)
        };
        for (id, user) in &work.users {
            match user {
                Some(user)
                    if held(
                        work.changed_users.contains(id),
                        work.loaded_user_seq.get(id),
                        user.seq,
                    ) =>
                {
                    cache.put_user(*id, user.clone());
                }
                _ => cache.forget_user(id),
            }
        }
        for (id, activity) in &work.activities {
            match activity {
                Some(activity)
                    if !rewritten.contains(id)
                        && held(
                            work.changed_activities.contains(id),
                            work.loaded_activity_seq.get(id),
                            activity.seq,
                        ) =>
                {
                    let rev = match work.new_activity_rev.get(id) {
                        Some(rev) => Some(rev.clone()),
                        None => work.loaded_activity_rev.get(id).cloned().flatten(),
                    };
                    cache.put_activity(*id, activity.clone(), rev);
                }
                _ => cache.forget_activity(id),
            }
        }
        for id in rewritten {
            cache.forget_activity(id);
        }
    }
}
