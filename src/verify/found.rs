//! The read models as MongoDB holds them, in the reference fold's form:
//! bookkeeping (`_`-prefixed) fields dropped, dates as RFC 3339 with
//! milliseconds, arrays of entries sorted by their key.

use crate::projection::fold::{sort_by_key, time_key};
use crate::store::mongo::{ACTIVITIES, USERS};
use mongodb::bson::{Bson, Document};
use serde_json::{Map, Value};

/// The key each collection's entry array is sorted by.
pub fn entries_of(collection: &str) -> Option<(&'static str, &'static str)> {
    match collection {
        USERS => Some(("activities", "activity_id")),
        ACTIVITIES => Some(("participants", "user_id")),
        _ => None,
    }
}

/// A stored document of `collection` in the fold's form.
pub fn comparable(collection: &str, doc: &Document) -> Value {
    let mut value = to_json(&Bson::Document(doc.clone()));
    if let Some((field, key)) = entries_of(collection) {
        if let Some(Value::Array(items)) = value.get_mut(field) {
            sort_by_key(items, key);
        }
    }
    value
}

/// A document's `_id` as text: a string as is, anything else as its
/// extended JSON (a document the processor did not write).
pub fn id_text(doc: &Document) -> String {
    match doc.get("_id") {
        Some(Bson::String(id)) => id.clone(),
        Some(other) => other.clone().into_relaxed_extjson().to_string(),
        None => "(no _id)".into(),
    }
}

fn to_json(value: &Bson) -> Value {
    match value {
        Bson::Document(doc) => {
            let mut map = Map::new();
            for (key, value) in doc {
                if key.starts_with('_') && key != "_id" {
                    continue;
                }
                map.insert(key.clone(), to_json(value));
            }
            Value::Object(map)
        }
        Bson::Array(items) => Value::Array(items.iter().map(to_json).collect()),
        Bson::DateTime(t) => match chrono::DateTime::from_timestamp_millis(t.timestamp_millis()) {
            Some(t) => Value::String(time_key(&t)),
            None => value.clone().into_relaxed_extjson(),
        },
        Bson::Int32(n) => Value::from(*n),
        Bson::Int64(n) => Value::from(*n),
        other => other.clone().into_relaxed_extjson(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::doc;

    #[test]
    fn bookkeeping_goes_dates_shorten_and_entries_sort() {
        let at = mongodb::bson::DateTime::from_millis(1_767_261_600_123);
        let stored = doc! {
            "_id": "a", "_seq": 7_i64, "capacity": 3_i32, "created_at": at,
            "participants": [{ "user_id": "z" }, { "user_id": "b" }],
            "organizer": { "user_id": "u", "_v": 1 },
        };
        let value = comparable(ACTIVITIES, &stored);
        assert_eq!(value.get("_seq"), None);
        assert_eq!(value["organizer"].get("_v"), None);
        assert_eq!(value["capacity"], 3);
        assert_eq!(value["created_at"], "2026-01-01T10:00:00.123Z");
        assert_eq!(value["participants"][0]["user_id"], "b");
        assert_eq!(id_text(&stored), "a");
        assert_eq!(id_text(&doc! { "_id": 5 }), "5");
    }
}
