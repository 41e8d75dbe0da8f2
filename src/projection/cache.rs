//! The documents of recent batches, kept across batches so that a batch does
//! not read again what an earlier one loaded or wrote (docs/design.md,
//! "The document cache").
//!
//! A cached document is only a guess: the write it leads to is still
//! conditioned on the `_seq` it holds (and, for an activity, on its `_rev`),
//! so a document another writer moved makes the write match nothing, and the
//! batch reloads from the server and redoes (the cache is cleared first).
//! Users are cached as their own fields; activities with their copies and
//! revision, and an activity whose copies the refresh rewrote is dropped;
//! and, for the copy refresh, users' activity entries with their revision
//! (`_erev`), whose writes are conditioned on it the same way.

use super::state::{ActivityDoc, UserDoc};
use mongodb::bson::Document;
use std::collections::{BTreeMap, HashMap, VecDeque};
use uuid::Uuid;

/// A user's `activities` entries, with their versions (`_av`) and revision
/// token (`_erev`), as the copy refresh last read or wrote them.
#[derive(Debug, Clone, Default)]
pub struct UserEntries {
    pub entries: Vec<Document>,
    pub versions: BTreeMap<String, i64>,
    pub rev: Option<String>,
}

/// A bounded map of documents, the oldest inserted leaving first.
#[derive(Debug, Default)]
pub struct DocCache {
    capacity: usize,
    users: HashMap<Uuid, UserDoc>,
    /// Activities with the revision token (`_rev`) they hold.
    activities: HashMap<Uuid, (ActivityDoc, Option<String>)>,
    /// Users' entries, for the copy refresh (kept apart from their own
    /// fields, which the batch's load reads).
    entries: HashMap<Uuid, UserEntries>,
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

    /// A user's entries, if held (not counted in `hits`/`misses`, which
    /// are the batch load's).
    pub fn entries(&self, id: &Uuid) -> Option<UserEntries> {
        self.entries.get(id).cloned()
    }

    /// A user's own fields, if held, without counting a hit or miss.
    pub fn peek_user(&self, id: &Uuid) -> Option<&UserDoc> {
        self.users.get(id)
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

    pub fn put_entries(&mut self, id: Uuid, entries: UserEntries) {
        if self.entries.insert(id, entries).is_none() {
            self.order.push_back(id);
        }
        self.bound();
    }

    pub fn forget_user(&mut self, id: &Uuid) {
        self.users.remove(id);
    }

    pub fn forget_entries(&mut self, id: &Uuid) {
        self.entries.remove(id);
    }

    pub fn forget_activity(&mut self, id: &Uuid) {
        self.activities.remove(id);
    }

    pub fn clear(&mut self) {
        self.users.clear();
        self.activities.clear();
        self.entries.clear();
        self.order.clear();
    }

    pub fn len(&self) -> usize {
        self.users.len() + self.activities.len() + self.entries.len()
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
            self.entries.remove(&id);
        }
        // Ids forgotten elsewhere leave stale entries in `order`.
        if self.order.len() > 2 * self.capacity.max(16) {
            let (users, activities, entries) = (&self.users, &self.activities, &self.entries);
            self.order.retain(|id| {
                users.contains_key(id) || activities.contains_key(id) || entries.contains_key(id)
            });
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
    fn entries_share_the_bound_and_leave_with_their_user() {
        let mut cache = DocCache::new(3);
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let held = |rev: &str| UserEntries {
            rev: Some(rev.to_string()),
            ..UserEntries::default()
        };
        cache.put_user(a, user(1));
        cache.put_entries(a, held("a1"));
        cache.put_entries(b, held("b1"));
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.entries(&a).and_then(|e| e.rev).as_deref(), Some("a1"));
        // A newer state replaces the old one in place.
        cache.put_entries(a, held("a2"));
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.entries(&a).and_then(|e| e.rev).as_deref(), Some("a2"));
        // Over the bound, the oldest id leaves with everything held for it.
        cache.put_user(Uuid::new_v4(), user(2));
        assert_eq!(cache.len(), 2);
        assert!(cache.peek_user(&a).is_none());
        assert!(cache.entries(&a).is_none());
        assert!(cache.entries(&b).is_some());
        cache.forget_entries(&b);
        cache.clear();
        assert!(cache.is_empty());
    }

    #[test]
    fn a_cache_of_size_zero_holds_nothing() {
        let mut cache = DocCache::new(0);
        cache.put_user(Uuid::new_v4(), user(1));
        assert!(cache.is_empty());
    }
}
