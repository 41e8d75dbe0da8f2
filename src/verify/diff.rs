//! Field-by-field differences between an expected and a found document.
//! Objects are compared key by key; arrays of entries that carry a key
//! (`activity_id`, `user_id`) entry by entry; any other value as a whole.

use serde_json::Value;
use std::collections::BTreeMap;

/// One field that differs: its path (`organizer.display_name`,
/// `participants[user_id=...].joined_at`) and both values (`None`: absent).
#[derive(Debug, Clone, PartialEq)]
pub struct Difference {
    pub field: String,
    pub expected: Option<Value>,
    pub found: Option<Value>,
}

/// The keys entries of arrays are matched by.
const ENTRY_KEYS: [&str; 2] = ["activity_id", "user_id"];

/// Every difference between `expected` and `found`, in field order.
pub fn differences(expected: &Value, found: &Value) -> Vec<Difference> {
    let mut out = Vec::new();
    walk("", Some(expected), Some(found), &mut out);
    out
}

fn walk(path: &str, expected: Option<&Value>, found: Option<&Value>, out: &mut Vec<Difference>) {
    match (expected, found) {
        (Some(Value::Object(e)), Some(Value::Object(f))) => {
            let keys: std::collections::BTreeSet<&String> = e.keys().chain(f.keys()).collect();
            for key in keys {
                walk(&join(path, key), e.get(key), f.get(key), out);
            }
        }
        (Some(Value::Array(e)), Some(Value::Array(f))) if e != f => match entry_key(e, f) {
            Some(key) => {
                let (e, f) = (keyed(e, key), keyed(f, key));
                let ids: std::collections::BTreeSet<&String> = e.keys().chain(f.keys()).collect();
                for id in ids {
                    let path = format!("{path}[{key}={id}]");
                    walk(&path, e.get(id).copied(), f.get(id).copied(), out);
                }
            }
            None => out.push(difference(path, expected, found)),
        },
        (e, f) if e != f => out.push(difference(path, e, f)),
        _ => {}
    }
}

fn difference(path: &str, expected: Option<&Value>, found: Option<&Value>) -> Difference {
    Difference {
        field: path.to_string(),
        expected: expected.cloned(),
        found: found.cloned(),
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// The key every entry of both arrays has (as a string), if there is one
/// and no two entries of one array share a value of it.
fn entry_key(expected: &[Value], found: &[Value]) -> Option<&'static str> {
    ENTRY_KEYS.into_iter().find(|key| {
        [expected, found].iter().all(|items| {
            let ids: std::collections::BTreeSet<Option<&str>> = items
                .iter()
                .map(|item| item.get(*key).and_then(Value::as_str))
                .collect();
            ids.len() == items.len() && !ids.contains(&None)
        })
    })
}

fn keyed<'a>(items: &'a [Value], key: &str) -> BTreeMap<String, &'a Value> {
    items
        .iter()
        .filter_map(|item| Some((item.get(key)?.as_str()?.to_string(), item)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nested_fields_and_entries_are_named() {
        let expected = json!({"_id": "a", "title": "Run", "organizer": {"display_name": "A"},
            "participants": [{"user_id": "u", "joined_at": "t1"}, {"user_id": "v", "joined_at": "t"}]});
        let found = json!({"_id": "a", "title": "Walk", "organizer": {"display_name": "A"},
            "participants": [{"user_id": "u", "joined_at": "t2"}, {"user_id": "w", "joined_at": "t"}],
            "extra": 1});
        let fields: Vec<String> = differences(&expected, &found)
            .into_iter()
            .map(|d| d.field)
            .collect();
        assert_eq!(
            fields,
            [
                "extra",
                "participants[user_id=u].joined_at",
                "participants[user_id=v]",
                "participants[user_id=w]",
                "title"
            ]
        );
    }

    #[test]
    fn equal_documents_have_no_differences_and_plain_arrays_compare_whole() {
        let doc = json!({"tags": [1, 2], "location": null});
        assert!(differences(&doc, &doc).is_empty());
        let changed = json!({"tags": [2, 1], "location": null});
        let found = differences(&doc, &changed);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].field, "tags");
        assert_eq!(found[0].found, Some(json!([2, 1])));
    }
}
