//! The decoder never panics: arbitrary bytes, and the fixture messages mutated
//! byte by byte or member by member, decoded every way.

use activity_event_processor::decode::{decode_message, DecodeOptions, MessageFormat, RawMessage};
use proptest::prelude::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const VARIANTS: [&str; 2] = ["schemas-enabled", "schemas-disabled"];

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/debezium")
}

fn read(relative: &str) -> Vec<u8> {
    let path = fixture_dir().join(relative);
    std::fs::read(&path).unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()))
}

fn manifest() -> Vec<Value> {
    let manifest: Value = serde_json::from_slice(&read("manifest.json")).expect("manifest is json");
    match manifest["messages"].as_array() {
        Some(messages) => messages.clone(),
        None => panic!("manifest.json has no `messages` array"),
    }
}
// ---------------------------------------------------------------------------
// Never a panic

/// Every fixture file's bytes, for mutation.
fn corpus() -> &'static [Vec<u8>] {
    static CORPUS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    CORPUS.get_or_init(|| {
        let mut files = Vec::new();
        for entry in manifest() {
            for variant in VARIANTS {
                for part in ["key", "value"] {
                    if let Some(path) = entry["files"][variant][part].as_str() {
                        files.push(read(path));
                    }
                }
            }
        }
        files
    })
}

fn decode_every_way(
    topic: Option<&str>,
    key: Option<&[u8]>,
    value: &[u8],
    headers: &[(String, Option<Vec<u8>>)],
) {
    for format in [
        MessageFormat::Auto,
        MessageFormat::Cdc,
        MessageFormat::EventRouter,
    ] {
        let options = DecodeOptions {
            format,
            ..DecodeOptions::default()
        };
        let msg = RawMessage {
            topic,
            key,
            value: Some(value),
            headers,
        };
        let _ = decode_message(&msg, &options);
    }
}

/// One edit of a byte string: at `at` (modulo its length + 1), remove `remove` bytes
/// (`usize::MAX` truncates) and insert `insert`.
type Edit = (usize, usize, Vec<u8>);

fn apply(bytes: &mut Vec<u8>, (at, remove, insert): &Edit) {
    let start = at % (bytes.len() + 1);
    let end = start.saturating_add(*remove).min(bytes.len());
    bytes.splice(start..end, insert.iter().copied());
}

fn edit() -> impl Strategy<Value = Edit> {
    let byte = prop_oneof![
        any::<u8>(),
        prop::sample::select(b"{}[]\":,0-.e\\nu ".to_vec())
    ];
    (
        any::<usize>(),
        prop_oneof![0usize..4, Just(usize::MAX)],
        prop::collection::vec(byte, 0..4),
    )
}

/// Strings that mean something to the decoder, `|`-separated.
const INTERESTING: &str =
    "c|r|u|d|t|m|x|BEGIN|END|__debezium_unavailable_value|{\"a\": |infinity|104";

/// A JSON value to plant somewhere in a fixture.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
        prop::sample::select(INTERESTING.split('|').collect::<Vec<_>>()).prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,10}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Replaces the member at a pseudo-random path (chosen by `choices`) with `new`.
fn plant(value: &mut Value, choices: &[usize], new: Value) {
    let Some((choice, rest)) = choices.split_first() else {
        *value = new;
        return;
    };
    let child = match value {
        Value::Object(map) if !map.is_empty() => {
            let len = map.len();
            map.values_mut().nth(choice % len)
        }
        Value::Array(items) if !items.is_empty() => {
            let len = items.len();
            items.get_mut(choice % len)
        }
        _ => None,
    };
    match child {
        Some(child) => plant(child, rest, new),
        None => *value = new,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(
        value in prop::collection::vec(any::<u8>(), 0..512),
        key in prop::option::of(prop::collection::vec(any::<u8>(), 0..64)),
        topic in prop::option::of(prop::sample::select(vec![
            "outbox.event.User", "outbox.event.", "postgres.activity.event_outbox",
            "__debezium-heartbeat.postgres", "postgres.transaction",
        ])),
        header_values in prop::collection::vec(
            prop::option::of(prop::collection::vec(any::<u8>(), 0..40)), 0..5),
    ) {
        let names = ["id", "eventType", "sequenceId", "aggregateType", "createdAt"];
        let headers: Vec<(String, Option<Vec<u8>>)> = names
            .iter()
            .zip(header_values)
            .map(|(name, value)| (name.to_string(), value))
            .collect();
        decode_every_way(topic, key.as_deref(), &value, &headers);
    }

    #[test]
    fn mutated_fixture_bytes_never_panic(
        index in any::<prop::sample::Index>(),
        edits in prop::collection::vec(edit(), 1..4),
    ) {
        let corpus = corpus();
        let original: &Vec<u8> = index.get(corpus);
        let mut mutated = original.clone();
        for edit in &edits {
            apply(&mut mutated, edit);
        }
        let headers = vec![
            ("id".to_string(), Some(b"0192f4b7-1c3d-7e4f-9a50-3b6c7d8e9f10".to_vec())),
            ("eventType".to_string(), Some(b"UserCreated".to_vec())),
        ];
        for topic in ["postgres.activity.event_outbox", "outbox.event.User"] {
            decode_every_way(Some(topic), Some(&mutated), &mutated, &headers);
        }
    }

    #[test]
    fn fixtures_with_a_member_replaced_never_panic(
        index in any::<prop::sample::Index>(),
        path in prop::collection::vec(any::<usize>(), 1..5),
        new in json_value(),
    ) {
        let corpus = corpus();
        let bytes: &Vec<u8> = index.get(corpus);
        let Ok(mut value) = serde_json::from_slice::<Value>(bytes) else {
            return Ok(());
        };
        plant(&mut value, &path, new);
        let bytes = value.to_string().into_bytes();
        decode_every_way(Some("postgres.activity.event_outbox"), None, &bytes, &[]);
        decode_every_way(Some("outbox.event.User"), Some(b"x"), &bytes, &[]);
    }
}

// ---------------------------------------------------------------------------
// The binary
