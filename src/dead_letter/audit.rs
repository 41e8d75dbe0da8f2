//! The audit collection (`dead_letters_audit`): where a dead letter goes
//! once it is retried or discarded, keyed by the letter's id, with the
//! action, its time, the reason (discard) or the re-emitted event (retry),
//! and the letter itself. Nothing leaves `dead_letters` without a record
//! here first.

use super::records::{Letter, Selection};
use crate::store::mongo::{MongoStore, StoreError, DEAD_LETTERS};
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use uuid::Uuid;

pub const AUDIT: &str = "dead_letters_audit";

/// What was done with a letter.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Re-emitted into the outbox as the event `event_id`.
    Retried {
        event_id: Uuid,
        sequence_id: Option<i64>,
    },
    Discarded {
        reason: String,
    },
}

/// One audit record.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub letter: Letter,
    pub action: Action,
    pub at: Option<DateTime<Utc>>,
}

fn now() -> Bson {
    Bson::DateTime(mongodb::bson::DateTime::from_millis(
        Utc::now().timestamp_millis(),
    ))
}

/// The letter as kept in its audit record: the stored document without `_id`.
fn kept(letter: &Letter) -> Document {
    let mut document = letter.document.clone();
    document.remove("_id");
    document
}

/// Records that `letter` was re-emitted as `event_id` (a retry always
/// wins: the event is in the outbox, whatever was recorded before).
pub fn retried(letter: &Letter, event_id: Uuid, sequence_id: Option<i64>) -> Document {
    doc! {
        "q": { "_id": &letter.id },
        "u": {
            "$set": {
                "action": "retried",
                "new_event_id": event_id.to_string(),
                "new_sequence_id": sequence_id.map_or(Bson::Null, Bson::Int64),
                "at": now(),
            },
            "$unset": { "reason": "" },
            "$setOnInsert": { "letter": kept(letter) },
        },
        "upsert": true,
    }
}

/// Records that `letter` was discarded for `reason`.
pub fn discarded(letter: &Letter, reason: &str) -> Document {
    doc! {
        "q": { "_id": &letter.id },
        "u": {
            "$set": { "action": "discarded", "reason": reason, "at": now() },
            "$setOnInsert": { "letter": kept(letter) },
        },
        "upsert": true,
    }
}

/// Writes audit records (statements of [`retried`] / [`discarded`]), then
/// removes their letters from `dead_letters`. Idempotent: run again after
/// a failure between the two, it finishes the move.
pub async fn move_letters(
    store: &MongoStore,
    records: Vec<Document>,
    ids: &[String],
) -> Result<(), StoreError> {
    if ids.is_empty() {
        return Ok(());
    }
    let report = store.update(AUDIT, records, false).await?;
    if let Some(err) = report.errors.first() {
        return Err(crate::store::codes::write_error(
            AUDIT,
            err.code,
            &err.message,
        ));
    }
    store.delete_ids(DEAD_LETTERS, ids.to_vec()).await
}

/// The audit records of `ids`.
pub async fn find(store: &MongoStore, ids: &[String]) -> Result<Vec<Record>, StoreError> {
    let found = store.find_by_ids(AUDIT, ids.to_vec(), None).await?;
    Ok(found
        .into_iter()
        .filter_map(Record::from_document)
        .collect())
}

/// Every audit record of `action` (`retried` or `discarded`) that passes
/// the filters of `selection`, oldest action first.
pub async fn list(
    store: &MongoStore,
    action: &str,
    selection: &Selection,
) -> Result<Vec<Record>, StoreError> {
    let mut cursor = store
        .database()
        .collection::<Document>(AUDIT)
        .find(doc! { "action": action })
        .sort(doc! { "at": 1, "_id": 1 })
        .await?;
    let now = Utc::now();
    let mut records = Vec::new();
    while let Some(document) = cursor.try_next().await? {
        if let Some(record) = Record::from_document(document) {
            let wanted = selection.ids.is_empty()
                || selection
                    .ids
                    .iter()
                    .any(|id| id.to_string() == record.letter.id);
            if wanted && selection.admits(&record.letter, now) {
                records.push(record);
            }
        }
    }
    Ok(records)
}

impl Record {
    fn from_document(document: Document) -> Option<Record> {
        let id = document.get_str("_id").ok()?.to_string();
        let mut letter = document.get_document("letter").cloned().unwrap_or_default();
        letter.insert("_id", id);
        let action = match document.get_str("action").ok()? {
            "retried" => Action::Retried {
                event_id: Uuid::parse_str(document.get_str("new_event_id").ok()?).ok()?,
                sequence_id: document.get_i64("new_sequence_id").ok(),
            },
            "discarded" => Action::Discarded {
                reason: document.get_str("reason").unwrap_or_default().to_string(),
            },
            _ => return None,
        };
        let at = match document.get("at") {
            Some(Bson::DateTime(t)) => DateTime::from_timestamp_millis(t.timestamp_millis()),
            _ => None,
        };
        Some(Record {
            letter: Letter::from_document(letter),
            action,
            at,
        })
    }

    /// The record as JSON: the letter's summary with the action.
    pub fn to_json(&self) -> serde_json::Value {
        let mut value = self.letter.summary_json();
        let action = match &self.action {
            Action::Retried {
                event_id,
                sequence_id,
            } => serde_json::json!({
                "action": "retried",
                "new_event_id": event_id.to_string(),
                "new_sequence_id": sequence_id,
            }),
            Action::Discarded { reason } => {
                serde_json::json!({ "action": "discarded", "reason": reason })
            }
        };
        if let (Some(out), serde_json::Value::Object(more)) = (value.as_object_mut(), action) {
            out.extend(more);
            out.insert(
                "at".into(),
                self.at
                    .map(|t| super::records::rfc3339(&t))
                    .map_or(serde_json::Value::Null, serde_json::Value::String),
            );
        }
        value
    }
}
