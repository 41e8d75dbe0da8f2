//! Step 2 of a batch: each changed document written once, conditioned on
//! the fence it was loaded with.

use super::{BatchReport, Projector, Work};
use crate::store::codes;
use crate::store::mongo::{StoreError, ACTIVITIES, DUPLICATE_KEY, USERS, WRITE_CHUNK};
use mongodb::bson::{doc, Bson, Document};
use std::collections::BTreeSet;
use uuid::Uuid;

impl Projector {
    /// One conditional write per changed document; `false` on a lost race.
    /// Users go first and a failed write stops it, so that an activity never
    /// holds a name copy its user's own document does not. `written` gets the
    /// documents written, also when a write fails part-way.
    pub(super) async fn write_own(
        &self,
        work: &Work,
        report: &mut BatchReport,
        written: &mut BTreeSet<Uuid>,
    ) -> Result<bool, StoreError> {
        let mut users = Vec::new();
        for id in &work.changed_users {
            let Some(Some(user)) = work.users.get(id) else {
                continue;
            };
            let loaded = work.loaded_user_seq.get(id).copied().flatten();
            let on_insert = doc! { "activities": [] };
            let fence = Fence::seq(loaded);
            users.push((*id, fenced_set(id, fence, user.own_fields(), on_insert)));
        }
        let mut activities = Vec::new();
        for id in &work.changed_activities {
            let Some(Some(activity)) = work.activities.get(id) else {
                continue;
            };
            let loaded = work.loaded_activity_seq.get(id).copied().flatten();
            let fence = Fence {
                seq: loaded,
                rev: work.loaded_activity_rev.get(id).cloned().flatten(),
                has_rev: true,
            };
            let Some(rev) = work.new_activity_rev.get(id) else {
                continue;
            };
            activities.push((*id, fenced_set(id, fence, activity.fields(rev), doc! {})));
        }
        for (collection, statements) in [(USERS, users), (ACTIVITIES, activities)] {
            let mut rest = statements.into_iter().peekable();
            while rest.peek().is_some() {
                let chunk = rest.by_ref().take(WRITE_CHUNK).collect();
                if !self.write_chunk(collection, chunk, report, written).await? {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// One write command of [`Projector::write_own`]; `false` on a lost race.
    async fn write_chunk(
        &self,
        collection: &str,
        chunk: Vec<(Uuid, Document)>,
        report: &mut BatchReport,
        written: &mut BTreeSet<Uuid>,
    ) -> Result<bool, StoreError> {
        let expected = chunk.len() as u64;
        let (ids, statements): (Vec<Uuid>, Vec<Document>) = chunk.into_iter().unzip();
        let result = self.store.update(collection, statements, false).await?;
        report.round_trips += 1;
        report.documents_written += result.modified + result.upserted;
        let failed: BTreeSet<usize> = result.errors.iter().map(|e| e.index).collect();
        written.extend(
            ids.iter()
                .enumerate()
                .filter(|(i, _)| !failed.contains(i))
                .map(|(_, id)| *id),
        );
        if let Some(err) = result.errors.iter().find(|e| e.code != DUPLICATE_KEY) {
            return Err(codes::write_error(collection, err.code, &err.message));
        }
        Ok(result.errors.is_empty() && result.matched + result.upserted >= expected)
    }
}

/// What a document must still hold for a write based on what was loaded.
struct Fence {
    /// `_seq` as loaded (`None`: the document must not exist yet).
    seq: Option<i64>,
    /// `_rev` as loaded, checked when `has_rev` (activities): copies that
    /// another writer's refresh moved without moving `_seq` make the write
    /// match nothing too, so it never puts an older copy back.
    rev: Option<String>,
    has_rev: bool,
}

impl Fence {
    fn seq(seq: Option<i64>) -> Fence {
        Fence {
            seq,
            rev: None,
            has_rev: false,
        }
    }
}

/// `$set` on a document whose fence must still be what it was when loaded
/// (or which must not exist yet): a concurrent writer makes it match nothing
/// or fail with a duplicate key.
fn fenced_set(id: &Uuid, fence: Fence, fields: Document, on_insert: Document) -> Document {
    let absent = || Bson::Document(doc! { "$exists": false });
    let mut filter = doc! { "_id": id.to_string() };
    match fence.seq {
        Some(seq) => {
            filter.insert("_seq", Bson::Int64(seq));
            if fence.has_rev {
                filter.insert("_rev", fence.rev.map_or_else(absent, Bson::String));
            }
        }
        None => {
            filter.insert("_seq", absent());
        }
    }
    let mut update = doc! { "$set": fields };
    if !on_insert.is_empty() {
        update.insert("$setOnInsert", on_insert);
    }
    doc! {
        "q": filter,
        "u": update,
        "upsert": fence.seq.is_none(),
    }
}
