//! An event's payload: the JSON text its carrier delivered, checked when the
//! event is decoded and parsed only when something reads its members (a
//! handler, a dead letter's document). Capture and the relay never build the
//! parsed tree: the relay publishes the jsonb text as PostgreSQL wrote it
//! (docs/design.md section 7).

use super::deep;
use serde::{Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::Value;
use std::borrow::Cow;
use std::fmt;

/// One event's payload, as text or as a value.
#[derive(Clone)]
pub struct Payload(Repr);

#[derive(Clone)]
enum Repr {
    /// JSON text checked to be one well-formed value, not parsed yet.
    Text(Box<RawValue>),
    /// A value built or parsed elsewhere (events made in code, decoders that
    /// received parsed JSON, dead letters read back).
    Value(Value),
}

impl Payload {
    /// `text` checked to be exactly one JSON value (surrounding whitespace
    /// allowed) and kept as it is.
    pub fn from_text(text: &str) -> Result<Payload, serde_json::Error> {
        let raw: Box<RawValue> = serde_json::from_str(text)?;
        Ok(Payload(Repr::Text(raw)))
    }

    /// The JSON text: as delivered, or rendered from the value.
    pub fn text(&self) -> Cow<'_, str> {
        match &self.0 {
            Repr::Text(raw) => Cow::Borrowed(raw.get()),
            Repr::Value(value) => Cow::Owned(value.to_string()),
        }
    }

    /// The text as delivered, when the payload came as text.
    pub fn delivered_text(&self) -> Option<&str> {
        match &self.0 {
            Repr::Text(raw) => Some(raw.get()),
            Repr::Value(_) => None,
        }
    }

    /// The payload parsed. Members nested deeper than the parser goes are left
    /// out when no handler reads them; `None` when one does (the text was
    /// checked when decoded, so depth is the only way parsing can fail).
    pub fn value(&self) -> Option<Cow<'_, Value>> {
        match &self.0 {
            Repr::Value(value) => Some(Cow::Borrowed(value)),
            Repr::Text(raw) => serde_json::from_str(raw.get())
                .ok()
                .or_else(|| deep::shallow_payload(raw.get()))
                .map(Cow::Owned),
        }
    }

    /// The payload as a value, or its text as a JSON string when it cannot be
    /// parsed (kept whole, for a dead letter).
    pub fn to_json(&self) -> Value {
        match self.value() {
            Some(value) => value.into_owned(),
            None => Value::String(self.text().into_owned()),
        }
    }
}

impl From<Value> for Payload {
    fn from(value: Value) -> Payload {
        Payload(Repr::Value(value))
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Payload) -> bool {
        if let (Some(a), Some(b)) = (self.delivered_text(), other.delivered_text()) {
            if a == b {
                return true;
            }
        }
        match (self.value(), other.value()) {
            (Some(a), Some(b)) => a == b,
            _ => self.text() == other.text(),
        }
    }
}

impl PartialEq<Value> for Payload {
    fn eq(&self, other: &Value) -> bool {
        self.value().is_some_and(|value| *value == *other)
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

impl fmt::Display for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

/// Serialised as the parsed value, so that any format (not only JSON) gets
/// the members; a payload too deep to parse goes as its text.
impl Serialize for Payload {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(serializer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn text_is_checked_and_kept_as_delivered() {
        let text = r#"{"price": 1.50, "name": "Zoë", "tags": []}"#;
        let payload = Payload::from_text(text).expect("well-formed");
        assert_eq!(payload.delivered_text(), Some(text));
        assert_eq!(payload.text(), text);
        assert_eq!(payload.to_string(), text);
        assert_eq!(payload, json!({"price": 1.5, "name": "Zoë", "tags": []}));
        // Surrounding whitespace is not part of the value.
        let padded = Payload::from_text(" {\"a\": 1}\n").expect("well-formed");
        assert_eq!(padded.delivered_text(), Some("{\"a\": 1}"));
        for broken in ["", "{", r#"{"a": }"#, "{} {}", "nul", r#"{"a": 1,}"#] {
            assert!(Payload::from_text(broken).is_err(), "{broken:?} passed");
        }
    }

    #[test]
    fn a_value_has_no_delivered_text_and_equals_the_same_text() {
        let value = Payload::from(json!({"b": [1, 2], "a": null}));
        assert_eq!(value.delivered_text(), None);
        assert_eq!(value.text(), r#"{"b":[1,2],"a":null}"#);
        let text = Payload::from_text(r#"{"a": null, "b": [1, 2]}"#).expect("well-formed");
        assert_eq!(value, text);
        assert_eq!(text, value);
        assert_ne!(text, Payload::from(json!({"a": null, "b": [2, 1]})));
    }

    #[test]
    fn a_payload_too_deep_to_parse_keeps_its_text() {
        let deep = format!("{}1{}", "[".repeat(300), "]".repeat(300));
        let handled = format!(r#"{{"location": {deep}}}"#);
        let payload = Payload::from_text(&handled).expect("well-formed");
        assert!(payload.value().is_none());
        assert_eq!(payload.to_json(), Value::String(handled.clone()));
        assert_eq!(
            serde_json::to_string(&payload).ok(),
            serde_json::to_string(&handled).ok()
        );
        // Too deep where no handler reads: the shallow members are the value.
        let unknown = format!(r#"{{"email": "a@b", "x": {deep}}}"#);
        let payload = Payload::from_text(&unknown).expect("well-formed");
        assert_eq!(payload, json!({"email": "a@b"}));
    }

    #[test]
    fn serialised_as_the_value() {
        let payload = Payload::from_text(r#"{"a": 1.50}"#).expect("well-formed");
        assert_eq!(serde_json::to_value(&payload).ok(), Some(json!({"a": 1.5})));
        let doc = mongodb::bson::to_document(&payload).expect("a document");
        assert_eq!(doc.get_f64("a").ok(), Some(1.5));
    }
}
