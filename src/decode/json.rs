//! Borrowed, typed views of JSON members, read in one pass without building a
//! `serde_json::Value` for the whole message.
//!
//! Each member remembers whether it was absent, null or of which JSON type, so the
//! decoders can say exactly what is wrong ("field `sequence_id` has the wrong type:
//! expected integer, got string") instead of passing on serde's wording.

use super::error::{excerpt, DecodeError};
use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;
use uuid::Uuid;

/// A member whose value is a scalar; objects and arrays are skipped and only noted.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) enum Scalar<'a> {
    #[default]
    Absent,
    Null,
    Bool(bool),
    Int(i64),
    /// An integer above `i64::MAX`.
    BigInt(u64),
    Float(f64),
    Str(Cow<'a, str>),
    Object,
    Array,
}

impl<'a> Scalar<'a> {
    /// The JSON type, for error messages.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Self::Absent => "nothing",
            Self::Null => "null",
            Self::Bool(_) => "boolean",
            Self::Int(_) | Self::BigInt(_) | Self::Float(_) => "number",
            Self::Str(_) => "string",
            Self::Object => "object",
            Self::Array => "array",
        }
    }

    pub(crate) fn is_absent(&self) -> bool {
        matches!(self, Self::Absent)
    }

    pub(crate) fn as_str(&self) -> Option<&str> {
        match self {
            Self::Str(s) => Some(s),
            _ => None,
        }
    }

    /// A string that must be there and not null.
    pub(crate) fn required_str(&self, field: &'static str) -> Result<&str, DecodeError> {
        match self {
            Self::Str(s) => Ok(s),
            Self::Absent => Err(DecodeError::MissingField(field)),
            Self::Null => Err(DecodeError::NullField(field)),
            other => Err(DecodeError::WrongType {
                field,
                expected: "string",
                got: other.kind(),
            }),
        }
    }

    /// A uuid string that must be there.
    pub(crate) fn required_uuid(&self, field: &'static str) -> Result<Uuid, DecodeError> {
        let text = self.required_str(field)?;
        parse_uuid(text).ok_or_else(|| DecodeError::InvalidValue {
            field,
            expected: "uuid",
            value: excerpt(text),
        })
    }

    /// An integer that may be absent or null.
    pub(crate) fn optional_i64(&self, field: &'static str) -> Result<Option<i64>, DecodeError> {
        match self {
            Self::Absent | Self::Null => Ok(None),
            Self::Int(n) => Ok(Some(*n)),
            Self::BigInt(n) => Err(DecodeError::InvalidValue {
                field,
                expected: "64-bit signed integer",
                value: n.to_string(),
            }),
            other => Err(DecodeError::WrongType {
                field,
                expected: "integer",
                got: other.kind(),
            }),
        }
    }
}

/// Parses a uuid in any of its text forms; `None` if it is not one.
pub(crate) fn parse_uuid(text: &str) -> Option<Uuid> {
    Uuid::try_parse(text.trim()).ok()
}

impl<'de: 'a, 'a> Deserialize<'de> for Scalar<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ScalarVisitor(PhantomData))
    }
}

struct ScalarVisitor<'a>(PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for ScalarVisitor<'a> {
    type Value = Scalar<'a>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any json value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Scalar::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Scalar::Int(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(i64::try_from(v).map_or(Scalar::BigInt(v), Scalar::Int))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Scalar::Float(v))
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Borrowed(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Owned(v)))
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Null)
    }

    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        Scalar::deserialize(d)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Scalar::Object)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Scalar::Array)
    }
}

/// A member read only for whether it is there (`null` included); its value is
/// skipped by serde_json's fast path without being parsed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Seen(bool);

impl Seen {
    pub(crate) fn is_absent(self) -> bool {
        !self.0
    }
}

impl<'de> Deserialize<'de> for Seen {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        IgnoredAny::deserialize(deserializer).map(|_| Seen(true))
    }
}

/// A member that should be an object of type `T`.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) enum Member<T> {
    #[default]
    Absent,
    Null,
    Present(T),
    /// Not an object; the JSON type it was instead.
    Mistyped(&'static str),
}

impl<T> Member<T> {
    pub(crate) fn is_absent(&self) -> bool {
        matches!(self, Self::Absent)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Member<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(MemberVisitor(PhantomData))
    }
}

struct MemberVisitor<T>(PhantomData<T>);

impl<'de, T: Deserialize<'de>> Visitor<'de> for MemberVisitor<T> {
    type Value = Member<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a json object or null")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        T::deserialize(MapAccessDeserializer::new(map)).map(Member::Present)
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Member::Null)
    }

    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(Member::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        Member::deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Member::Mistyped("array"))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Member::Mistyped("boolean"))
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Member::Mistyped("number"))
    }

    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Member::Mistyped("number"))
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Member::Mistyped("number"))
    }

    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Member::Mistyped("string"))
    }
}

/// The `payload` column: jsonb text (Debezium's `io.debezium.data.Json`), or JSON
/// that some converter already parsed.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) enum Payload<'a> {
    #[default]
    Absent,
    Null,
    Text(Cow<'a, str>),
    Json(serde_json::Value),
}

/// Debezium's default `unavailable.value.placeholder`.
pub(crate) const UNAVAILABLE_PLACEHOLDER: &str = "__debezium_unavailable_value";

impl Payload<'_> {
    /// The event payload as JSON: text is parsed, the placeholder for an unchanged
    /// TOASTed value is refused.
    pub(crate) fn into_json(self) -> Result<super::Payload, DecodeError> {
        match self {
            Self::Absent => Err(DecodeError::MissingField("payload")),
            Self::Null => Err(DecodeError::NullField("payload")),
            Self::Text(text) => parse_payload_text(&text),
            Self::Json(value) => Ok(value.into()),
        }
    }
}

/// Checks jsonb text and keeps it as the event payload (parsed when a handler
/// reads it; see [`super::Payload`]).
pub(crate) fn parse_payload_text(text: &str) -> Result<super::Payload, DecodeError> {
    if text == UNAVAILABLE_PLACEHOLDER {
        return Err(DecodeError::UnavailablePayload);
    }
    super::Payload::from_text(text).map_err(|cause| DecodeError::InvalidJson {
        what: "payload",
        cause,
    })
}

impl<'de: 'a, 'a> Deserialize<'de> for Payload<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(PayloadVisitor(PhantomData))
    }
}

struct PayloadVisitor<'a>(PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for PayloadVisitor<'a> {
    type Value = Payload<'a>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("json text or a json value")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Payload::Text(Cow::Borrowed(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Payload::Text(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Payload::Text(Cow::Owned(v)))
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Payload::Null)
    }

    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(Payload::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        Payload::deserialize(d)
    }

    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Payload::Json(v.into()))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Payload::Json(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Payload::Json(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Payload::Json(v.into()))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        serde_json::Value::deserialize(MapAccessDeserializer::new(map)).map(Payload::Json)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        serde_json::Value::deserialize(SeqAccessDeserializer::new(seq)).map(Payload::Json)
    }
}

/// Reads `bytes` as UTF-8 JSON into `T`, naming `what` in the error.
pub(crate) fn from_bytes<'a, T: Deserialize<'a>>(
    bytes: &'a [u8],
    what: &'static str,
) -> Result<T, DecodeError> {
    let text = std::str::from_utf8(bytes).map_err(|cause| DecodeError::NotUtf8 {
        what: what.to_string(),
        cause,
    })?;
    serde_json::from_str(text).map_err(|cause| json_error(what, cause))
}

/// Sorts a serde_json error into "not json" and "json of the wrong structure".
pub(crate) fn json_error(what: &'static str, cause: serde_json::Error) -> DecodeError {
    if cause.is_data() {
        DecodeError::Malformed { what, cause }
    } else {
        DecodeError::InvalidJson { what, cause }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct Probe<'a> {
        #[serde(borrow)]
        a: Scalar<'a>,
        #[serde(borrow)]
        p: Payload<'a>,
        m: Member<Inner>,
    }

    #[derive(Deserialize, Debug, PartialEq)]
    struct Inner {
        x: i64,
    }

    fn probe(text: &str) -> Probe<'_> {
        match serde_json::from_str(text) {
            Ok(p) => p,
            Err(err) => panic!("{text}: {err}"),
        }
    }

    #[test]
    fn scalars_remember_their_type() {
        assert_eq!(probe("{}").a, Scalar::Absent);
        assert_eq!(probe(r#"{"a":null}"#).a, Scalar::Null);
        assert_eq!(probe(r#"{"a":-3}"#).a, Scalar::Int(-3));
        assert_eq!(
            probe(r#"{"a":18446744073709551615}"#).a,
            Scalar::BigInt(u64::MAX)
        );
        assert_eq!(probe(r#"{"a":1.5}"#).a, Scalar::Float(1.5));
        assert_eq!(probe(r#"{"a":{"b":[1,{}]}}"#).a, Scalar::Object);
        assert_eq!(probe(r#"{"a":[[],{"b":1}]}"#).a, Scalar::Array);
        assert!(matches!(
            probe(r#"{"a":"c"}"#).a,
            Scalar::Str(Cow::Borrowed("c"))
        ));
        assert_eq!(probe(r#"{"a":"\u0063"}"#).a.as_str(), Some("c"));
    }

    #[test]
    fn members_distinguish_absent_null_and_mistyped() {
        assert_eq!(probe("{}").m, Member::Absent);
        assert_eq!(probe(r#"{"m":null}"#).m, Member::Null);
        assert_eq!(probe(r#"{"m":{"x":1}}"#).m, Member::Present(Inner { x: 1 }));
        assert_eq!(probe(r#"{"m":"x"}"#).m, Member::Mistyped("string"));
        assert_eq!(probe(r#"{"m":[1,2]}"#).m, Member::Mistyped("array"));
    }

    #[test]
    fn payloads_are_text_or_parsed_json() {
        let text = probe(r#"{"p":"{\"k\": 1}"}"#).p.into_json();
        assert_eq!(text.ok(), Some(serde_json::json!({"k": 1}).into()));
        let object = probe(r#"{"p":{"k":[1,2]}}"#).p.into_json();
        assert_eq!(object.ok(), Some(serde_json::json!({"k": [1, 2]}).into()));
        let placeholder = probe(r#"{"p":"__debezium_unavailable_value"}"#)
            .p
            .into_json();
        assert!(matches!(placeholder, Err(DecodeError::UnavailablePayload)));
        let broken = probe(r#"{"p":"{\"k\": "}"#).p.into_json();
        let message = broken.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            message.starts_with("payload is not valid json: "),
            "{message}"
        );
        assert!(matches!(
            probe(r#"{"p":null}"#).p.into_json(),
            Err(DecodeError::NullField("payload"))
        ));
    }

    #[test]
    fn conversions_name_the_field() {
        let err = Scalar::Str("104".into()).optional_i64("sequence_id");
        assert_eq!(
            err.err().map(|e| e.to_string()).as_deref(),
            Some("field `sequence_id` has the wrong type: expected integer, got string")
        );
        let err = Scalar::Str("nope".into()).required_uuid("event_id");
        assert_eq!(
            err.err().map(|e| e.to_string()).as_deref(),
            Some("field `event_id` is not a valid uuid: `nope`")
        );
        assert!(matches!(
            Scalar::Absent.required_str("event_type"),
            Err(DecodeError::MissingField("event_type"))
        ));
    }

    #[test]
    fn invalid_utf8_is_reported_as_such() {
        let err = from_bytes::<Scalar>(b"\"\xff\"", "value");
        let message = err.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.starts_with("value is not valid utf-8"), "{message}");
    }
}
