//! The documents of recent batches, kept across batches so that a batch does
//! not read again what an earlier one loaded or wrote (docs/design.md,
//! "The document cache").
//!
//! A cached document is only a guess: the write it leads to is still
//! conditioned on the `_seq` it holds (and, for an activity, on its `_rev`),
//! so a document another writer moved makes the write match nothing, and the
//! batch reloads from the server and redoes (the cache is cleared first).
//! Users are cached as their own fields; activities with their copies and
//! revision, and an activity whose copies the refresh rewrote is dropped.

use super::state::{ActivityDoc, UserDoc};
use std::collections::{HashMap, VecDeque};
use uuid::Uuid;

/// A bounded map of documents, the oldest inserted leaving first.
#[derive(Debug, Default)]
pub struct DocCache {
    capacity: usize,
    users: HashMap<Uuid, UserDoc>,
    /// Activities with the revision token (`_rev`) they hold.
    activities: HashMap<Uuid, (ActivityDoc, Option<String>)>,
    /// Insertion order (an id may appear more than once).
    order: VecDeque<Uuid>,
    pub hits: u64,
    pub misses: u64,
}

impl DocCache {
    pub fn new(capacity: usize) -> DocCache {
        DocCache {
            capacity,
            ..DocCache::default()
        }
    }

    pub fn user(&mut self, id: &Uuid) -> Option<UserDoc> {
        let found = self.users.get(id).cloned();
        self.count(found.is_some());
        found
    }

    pub fn activity(&mut self, id: &Uuid) -> Option<(ActivityDoc, Option<String>)> {
        let found = self.activities.get(id).cloned();
        self.count(found.is_some());
        found
    }

    fn count(&mut self, hit: bool) {
        if hit {
            self.hits += 1;
        } else {
            self.misses += 1;
        }
    }

    pub fn put_user(&mut self, id: Uuid, doc: UserDoc) {
        if self.users.insert(id, doc).is_none() {
            self.order.push_back(id);
        }
        self.bound();
    }

    pub fn put_activity(&mut self, id: Uuid, doc: ActivityDoc, rev: Option<String>) {
        if self.activities.insert(id, (doc, rev)).is_none() {
            self.order.push_back(id);
        }
        self.bound();
    }

    pub fn forget_user(&mut self, id: &Uuid) {
        self.users.remove(id);
    }

    pub fn forget_activity(&mut self, id: &Uuid) {
        self.activities.remove(id);
    }

    pub fn clear(&mut self) {
        self.users.clear();
        self.activities.clear();
        self.order.clear();
    }

    pub fn len(&self) -> usize {
        self.users.len() + self.activities.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops the oldest documents beyond the capacity.
    fn bound(&mut self) {
        while self.len() > self.capacity {
            let Some(id) = self.order.pop_front() else {
                break;
            };
            self.users.remove(&id);
            self.activities.remove(&id);
        }
        // Ids forgotten elsewhere leave stale entries in `order`.
        if self.order.len() > 2 * self.capacity.max(16) {
            let (users, activities) = (&self.users, &self.activities);
            self.order
                .retain(|id| users.contains_key(id) || activities.contains_key(id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(seq: i64) -> UserDoc {
        UserDoc {
            seq,
            email: format!("u{seq}@example.com"),
            display_name: format!("U {seq}"),
            created_at: None,
            updated_at: None,
        }
    }

    #[test]
    fn the_oldest_documents_leave_first_and_the_size_stays_bounded() {
        let mut cache = DocCache::new(3);
        let ids: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
        for (n, id) in ids.iter().enumerate() {
            cache.put_user(*id, user(n as i64));
        }
        assert_eq!(cache.len(), 3);
        assert!(cache.user(&ids[0]).is_none());
        assert!(cache.user(&ids[1]).is_none());
        assert_eq!(cache.user(&ids[4]).map(|u| u.seq), Some(4));
        // Replacing a document keeps one entry, with the new state.
        cache.put_user(ids[4], user(40));
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.user(&ids[4]).map(|u| u.seq), Some(40));
        assert_eq!((cache.hits, cache.misses), (2, 2));
    }

    #[test]
    fn a_cache_of_size_zero_holds_nothing() {
        let mut cache = DocCache::new(0);
        cache.put_user(Uuid::new_v4(), user(1));
        assert!(cache.is_empty());
    }
}
