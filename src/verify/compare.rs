//! The fold held against MongoDB, one stored document at a time (read
//! through a cursor), then the documents the fold defines that were not
//! found.

use super::diff::differences;
use super::found::{comparable, id_text};
use super::{Mismatch, Scope};
use crate::dead_letter::audit::AUDIT;
use crate::projection::fold::{Memberships, ReferenceFold};
use crate::store::codes::REFUSED;
use crate::store::mongo::{MongoStore, StoreError, ACTIVITIES, DEAD_LETTERS, USERS};
use futures::TryStreamExt;
use mongodb::bson::{doc, Document};
use serde_json::Value;
use std::collections::BTreeSet;
use uuid::Uuid;

/// What the comparison hands each mismatch and each document compared to.
pub struct Listener<'a> {
    pub mismatch: &'a mut dyn FnMut(Mismatch),
    pub compared: &'a mut dyn FnMut(u64),
    pub documents: u64,
}

impl Listener<'_> {
    fn compared_one(&mut self) {
        self.documents += 1;
        (self.compared)(self.documents);
    }
}

/// Compares users and activities, then the dead letters.
pub async fn all(
    store: &MongoStore,
    fold: &ReferenceFold,
    scope: Scope,
    listener: &mut Listener<'_>,
) -> Result<(), StoreError> {
    let memberships = fold.memberships();
    let expected = |collection: &str, id: &Uuid| match collection {
        USERS => fold.user_doc(id, &memberships),
        _ => fold.activity_doc(id),
    };
    for collection in [USERS, ACTIVITIES] {
        let wanted = expected_ids(fold, &memberships, collection, scope);
        let filter = stored_filter(collection, scope);
        documents(store, collection, filter, &wanted, &expected, listener).await?;
    }
    dead_letters(store, fold, scope, listener).await
}

/// The ids of the documents of `collection` the fold defines, in scope.
fn expected_ids(
    fold: &ReferenceFold,
    memberships: &Memberships,
    collection: &str,
    scope: Scope,
) -> BTreeSet<Uuid> {
    let (users, activities) = (fold.user_ids(), fold.activity_ids());
    match (scope, collection) {
        (Scope::All, USERS) => users.copied().collect(),
        (Scope::All, _) => activities.copied().collect(),
        // A user's document and those of the members of an activity, whose
        // entries copy it.
        (Scope::Aggregate(id), USERS) => {
            let mut ids: BTreeSet<Uuid> = fold.members(&id).into_iter().collect();
            ids.insert(id);
            ids.retain(|user| fold.user_doc(user, memberships).is_some());
            ids
        }
        // An activity's document and those of a user's activities, which
        // copy the user's name.
        (Scope::Aggregate(id), _) => {
            let mut ids: BTreeSet<Uuid> = memberships.of(&id).map(|(a, _)| *a).collect();
            ids.insert(id);
            ids.retain(|activity| fold.activity_doc(activity).is_some());
            ids
        }
    }
}

/// The stored documents in scope: with an aggregate, its own and every one
/// holding a copy of it.
fn stored_filter(collection: &str, scope: Scope) -> Document {
    let Scope::Aggregate(id) = scope else {
        return doc! {};
    };
    let id = id.to_string();
    match collection {
        USERS => doc! { "$or": [{ "_id": &id }, { "activities.activity_id": &id }] },
        _ => doc! { "$or": [
            { "_id": &id }, { "organizer.user_id": &id }, { "participants.user_id": &id },
        ] },
    }
}

async fn documents(
    store: &MongoStore,
    collection: &str,
    filter: Document,
    wanted: &BTreeSet<Uuid>,
    expected: &dyn Fn(&str, &Uuid) -> Option<Value>,
    listener: &mut Listener<'_>,
) -> Result<(), StoreError> {
    let mut cursor = store.collection(collection).find(filter).await?;
    let mut seen = BTreeSet::new();
    while let Some(doc) = cursor.try_next().await? {
        let id = id_text(&doc);
        let want = Uuid::parse_str(&id)
            .ok()
            .and_then(|uuid| Some((uuid, expected(collection, &uuid)?)));
        match want {
            Some((uuid, want)) => {
                seen.insert(uuid);
                let found = comparable(collection, &doc);
                for d in differences(&want, &found) {
                    (listener.mismatch)(Mismatch::field(collection, &id, d));
                }
            }
            None => (listener.mismatch)(Mismatch::extra(collection, &id)),
        }
        listener.compared_one();
    }
    for id in wanted.difference(&seen) {
        (listener.mismatch)(Mismatch::missing(collection, &id.to_string()));
    }
    Ok(())
}

/// Every event the fold dead-letters has a letter, in `dead_letters` or
/// (retried or discarded) in the audit; every letter in `dead_letters` is
/// one the fold dead-letters. Only presence is compared.
async fn dead_letters(
    store: &MongoStore,
    fold: &ReferenceFold,
    scope: Scope,
    listener: &mut Listener<'_>,
) -> Result<(), StoreError> {
    let (letters, audited) = match scope {
        Scope::All => (doc! {}, doc! {}),
        Scope::Aggregate(id) => (
            doc! { "aggregate_id": id.to_string() },
            doc! { "letter.aggregate_id": id.to_string() },
        ),
    };
    let expected: BTreeSet<String> = fold
        .dead_letters()
        .iter()
        .filter(|(_, aggregate)| scope.holds(aggregate))
        .map(|(event, _)| event.to_string())
        .collect();
    let mut found = BTreeSet::new();
    for id in ids(store, DEAD_LETTERS, letters).await? {
        if !expected.contains(&id) {
            (listener.mismatch)(Mismatch::extra(DEAD_LETTERS, &id));
        }
        found.insert(id);
        listener.compared_one();
    }
    found.extend(ids(store, AUDIT, audited).await?);
    for id in expected.difference(&found) {
        (listener.mismatch)(Mismatch::missing(DEAD_LETTERS, id));
    }
    Ok(())
}

/// The events whose letters (in `dead_letters` or the audit) say MongoDB
/// refused to store them.
pub async fn refused(store: &MongoStore) -> Result<BTreeSet<Uuid>, StoreError> {
    let mut found = BTreeSet::new();
    for (collection, field) in [(DEAD_LETTERS, "error"), (AUDIT, "letter.error")] {
        let mut cursor = store
            .database()
            .collection::<Document>(collection)
            .find(doc! {})
            .projection(doc! { "_id": 1, field: 1 })
            .await?;
        while let Some(doc) = cursor.try_next().await? {
            let error = match field {
                "error" => doc.get_str("error").ok(),
                _ => doc
                    .get_document("letter")
                    .and_then(|l| l.get_str("error"))
                    .ok(),
            };
            if error.is_some_and(|e| e.starts_with(REFUSED)) {
                found.extend(Uuid::parse_str(&id_text(&doc)).ok());
            }
        }
    }
    Ok(found)
}

async fn ids(
    store: &MongoStore,
    collection: &str,
    filter: Document,
) -> Result<Vec<String>, StoreError> {
    let mut cursor = store
        .collection(collection)
        .find(filter)
        .projection(doc! { "_id": 1 })
        .await?;
    let mut ids = Vec::new();
    while let Some(doc) = cursor.try_next().await? {
        ids.push(id_text(&doc));
    }
    Ok(ids)
}
