//! Dead letters as stored in `dead_letters` (see `projection::letters` for
//! how they are written), read back for a person or a tool: the selection
//! of `list`, `retry`, `discard` and `export`, and their JSON form.

use crate::store::mongo::{MongoStore, StoreError, DEAD_LETTERS};
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use serde_json::{Map, Value};
use std::time::Duration;
use uuid::Uuid;

/// One stored dead letter.
#[derive(Debug, Clone, PartialEq)]
pub struct Letter {
    /// The event id of the dead-lettered event (the document's `_id`).
    pub id: String,
    pub sequence_id: Option<i64>,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    /// The payload when it was kept whole (not in the bounded form).
    pub payload: Option<Value>,
    pub error: String,
    pub attempts: i64,
    pub first_failed_at: Option<DateTime<Utc>>,
    pub last_failed_at: Option<DateTime<Utc>>,
    /// The document as stored, for `show` and `export`.
    pub document: Document,
}

/// Which letters a command is about: given ids, or every letter that
/// passes the filters.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Empty: every letter (that passes the filters).
    pub ids: Vec<Uuid>,
    /// Exactly this event type.
    pub event_type: Option<String>,
    /// The error contains this text (case-insensitive).
    pub error: Option<String>,
    /// Failed last within this long before now.
    pub since: Option<Duration>,
}

impl Selection {
    /// Whether `letter` passes the filters (the ids are matched by the query).
    pub fn admits(&self, letter: &Letter, now: DateTime<Utc>) -> bool {
        if let Some(event_type) = &self.event_type {
            if &letter.event_type != event_type {
                return false;
            }
        }
        if let Some(needle) = &self.error {
            if !letter.error.to_lowercase().contains(&needle.to_lowercase()) {
                return false;
            }
        }
        if let Some(since) = self.since {
            let Ok(since) = chrono::Duration::from_std(since) else {
                return true;
            };
            let cutoff = now.checked_sub_signed(since);
            return match (letter.last_failed_at, cutoff) {
                (Some(failed), Some(cutoff)) => failed >= cutoff,
                (None, _) => false,
                (Some(_), None) => true,
            };
        }
        true
    }

    fn filter(&self) -> Document {
        if self.ids.is_empty() {
            doc! {}
        } else {
            let ids: Vec<String> = self.ids.iter().map(Uuid::to_string).collect();
            doc! { "_id": { "$in": ids } }
        }
    }
}

/// The letters `selection` picks, in the order they failed (by
/// `sequence_id`, then id).
pub async fn select(store: &MongoStore, selection: &Selection) -> Result<Vec<Letter>, StoreError> {
    let mut letters = Vec::new();
    let collected = each(store, selection, &mut |letter| {
        letters.push(letter);
        Ok(())
    })
    .await;
    match collected {
        Ok(_) => {}
        Err(EachError::Store(err)) => return Err(err),
        // Collecting into memory writes nothing.
        Err(EachError::Write(_)) => {}
    }
    letters.sort_by(|a, b| {
        (a.sequence_id.unwrap_or(i64::MAX), &a.id).cmp(&(b.sequence_id.unwrap_or(i64::MAX), &b.id))
    });
    Ok(letters)
}

/// Why [`each`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum EachError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot write the dead letters")]
    Write(#[source] std::io::Error),
}

/// Hands each letter `selection` picks to `each`, one at a time in `_id`
/// order (memory does not grow with the collection: `export`); the count.
pub async fn each(
    store: &MongoStore,
    selection: &Selection,
    each: &mut dyn FnMut(Letter) -> std::io::Result<()>,
) -> Result<u64, EachError> {
    let now = Utc::now();
    let mut cursor = store
        .database()
        .collection::<Document>(DEAD_LETTERS)
        .find(selection.filter())
        .sort(doc! { "_id": 1 })
        .await
        .map_err(StoreError::from)?;
    let mut count = 0;
    while let Some(document) = cursor.try_next().await.map_err(StoreError::from)? {
        let letter = Letter::from_document(document);
        if selection.admits(&letter, now) {
            each(letter).map_err(EachError::Write)?;
            count += 1;
        }
    }
    Ok(count)
}

impl Letter {
    /// A stored document, whatever it holds (missing fields read as empty).
    pub fn from_document(document: Document) -> Letter {
        let text = |key: &str| document.get_str(key).unwrap_or_default().to_string();
        let id = match document.get("_id") {
            Some(Bson::String(id)) => id.clone(),
            Some(other) => other.to_string(),
            None => String::new(),
        };
        Letter {
            id,
            sequence_id: integer(document.get("sequence_id")),
            aggregate_type: text("aggregate_type"),
            aggregate_id: text("aggregate_id"),
            event_type: text("event_type"),
            payload: document.get("payload").map(bson_to_json),
            error: text("error"),
            attempts: integer(document.get("attempts")).unwrap_or(0),
            first_failed_at: time(document.get("first_failed_at")),
            last_failed_at: time(document.get("last_failed_at")),
            document,
        }
    }

    /// The whole letter as JSON (dates as RFC 3339), for `show --json` and `export`.
    pub fn to_json(&self) -> Value {
        let mut out = Map::new();
        out.insert("id".into(), Value::String(self.id.clone()));
        for (key, value) in &self.document {
            if key != "_id" {
                out.insert(key.clone(), bson_to_json(value));
            }
        }
        Value::Object(out)
    }

    /// The summary `list --json` prints (no payload).
    pub fn summary_json(&self) -> Value {
        serde_json::json!({
            "id": self.id,
            "sequence_id": self.sequence_id,
            "event_type": self.event_type,
            "aggregate_type": self.aggregate_type,
            "aggregate_id": self.aggregate_id,
            "error": self.error,
            "attempts": self.attempts,
            "first_failed_at": self.first_failed_at.map(|t| rfc3339(&t)),
            "last_failed_at": self.last_failed_at.map(|t| rfc3339(&t)),
        })
    }
}

fn integer(value: Option<&Bson>) -> Option<i64> {
    match value {
        Some(Bson::Int64(n)) => Some(*n),
        Some(Bson::Int32(n)) => Some(i64::from(*n)),
        _ => None,
    }
}

fn time(value: Option<&Bson>) -> Option<DateTime<Utc>> {
    match value {
        Some(Bson::DateTime(t)) => DateTime::from_timestamp_millis(t.timestamp_millis()),
        Some(Bson::String(s)) => DateTime::parse_from_rfc3339(s)
            .ok()
            .map(|t| t.with_timezone(&Utc)),
        _ => None,
    }
}

/// `2026-12-06T15:04:05.123Z`.
pub fn rfc3339(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A stored value as JSON: dates as RFC 3339 strings, numbers as numbers,
/// anything else as relaxed extended JSON.
pub fn bson_to_json(value: &Bson) -> Value {
    match value {
        Bson::Document(doc) => Value::Object(
            doc.iter()
                .map(|(k, v)| (k.clone(), bson_to_json(v)))
                .collect(),
        ),
        Bson::Array(items) => Value::Array(items.iter().map(bson_to_json).collect()),
        Bson::DateTime(_) => time(Some(value)).map_or(Value::Null, |t| Value::String(rfc3339(&t))),
        other => other.clone().into_relaxed_extjson(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(event_type: &str, error: &str, failed: Option<DateTime<Utc>>) -> Letter {
        let mut document = doc! {
            "_id": Uuid::new_v4().to_string(),
            "sequence_id": 7_i64,
            "aggregate_type": "User",
            "aggregate_id": Uuid::new_v4().to_string(),
            "event_type": event_type,
            "payload": { "displayName": "x", "n": 3_i64 },
            "error": error,
            "attempts": 2_i64,
        };
        if let Some(t) = failed {
            document.insert(
                "last_failed_at",
                mongodb::bson::DateTime::from_millis(t.timestamp_millis()),
            );
        }
        Letter::from_document(document)
    }

    #[test]
    fn a_document_reads_back_with_its_payload_and_times() {
        let now = Utc::now();
        let l = letter("UserUpdated", "user not found", Some(now));
        assert_eq!(l.sequence_id, Some(7));
        assert_eq!(l.attempts, 2);
        assert_eq!(
            l.payload,
            Some(serde_json::json!({"displayName": "x", "n": 3}))
        );
        assert_eq!(
            l.last_failed_at.map(|t| t.timestamp_millis()),
            Some(now.timestamp_millis())
        );
        assert_eq!(l.to_json()["last_failed_at"], Value::String(rfc3339(&now)));
        assert!(l.summary_json().get("payload").is_none());
    }

    #[test]
    fn filters_match_type_error_text_and_age() {
        let now = Utc::now();
        let old = now - chrono::Duration::hours(3);
        let l = letter("UserUpdated", "User NOT found", Some(old));
        let by = |selection: Selection| selection.admits(&l, now);
        assert!(by(Selection::default()));
        assert!(by(Selection {
            event_type: Some("UserUpdated".into()),
            error: Some("not found".into()),
            ..Selection::default()
        }));
        assert!(!by(Selection {
            event_type: Some("UserCreated".into()),
            ..Selection::default()
        }));
        assert!(!by(Selection {
            error: Some("payload".into()),
            ..Selection::default()
        }));
        assert!(by(Selection {
            since: Some(Duration::from_secs(4 * 3600)),
            ..Selection::default()
        }));
        assert!(!by(Selection {
            since: Some(Duration::from_secs(3600)),
            ..Selection::default()
        }));
    }
}
