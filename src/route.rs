//! Route: the handler registry. Each known event type maps to the parser of its
//! payload (docs/design.md section 3), giving a typed [`DomainEvent`]; an unknown type
//! takes the explicit, counted [`Routed::Unmatched`] path and has no effect.

use crate::decode::OutboxEvent;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::sync::Mutex;
use uuid::Uuid;

/// The aggregate a domain event belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AggregateKind {
    User,
    Activity,
}

impl AggregateKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AggregateKind::User => "User",
            AggregateKind::Activity => "Activity",
        }
    }
}

/// A field of an update event: absent (unchanged) or a new value.
pub type Change<T> = Option<T>;

/// The seven events of the contract, payloads parsed and checked.
#[derive(Debug, Clone, PartialEq)]
pub enum DomainEvent {
    UserCreated {
        email: String,
        display_name: String,
    },
    UserUpdated {
        email: Change<String>,
        display_name: Change<String>,
    },
    ActivityCreated {
        organizer_id: Uuid,
        title: String,
        starts_at: DateTime<Utc>,
        capacity: i64,
        location: Value,
    },
    ActivityUpdated {
        title: Change<String>,
        starts_at: Change<DateTime<Utc>>,
        capacity: Change<i64>,
        location: Change<Value>,
    },
    ActivityCancelled,
    ParticipantJoined {
        user_id: Uuid,
        joined_at: DateTime<Utc>,
    },
    ParticipantLeft {
        user_id: Uuid,
    },
}

impl DomainEvent {
    pub fn aggregate_kind(&self) -> AggregateKind {
        match self {
            DomainEvent::UserCreated { .. } | DomainEvent::UserUpdated { .. } => {
                AggregateKind::User
            }
            _ => AggregateKind::Activity,
        }
    }
}

/// A handler rule violation: permanent for that event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    #[error("payload is not a JSON object")]
    NotAnObject,
    #[error("payload nests a field a handler reads too deep to parse")]
    TooDeep,
    #[error("payload misses required field `{0}`")]
    Missing(&'static str),
    #[error("payload field `{field}` has the wrong type: expected {expected}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
    },
    #[error("payload of {0} must carry at least one of its fields")]
    NothingToUpdate(&'static str),
    #[error("{event_type} belongs to aggregate type {expected}, but the event says `{actual}`")]
    WrongAggregate {
        event_type: String,
        expected: &'static str,
        actual: String,
    },
    #[error("{event_type} for {kind} {id}, which was never created")]
    UnknownAggregate {
        event_type: String,
        kind: &'static str,
        id: Uuid,
    },
    #[error("{event_type} for {id}, which already exists")]
    AlreadyExists { event_type: String, id: Uuid },
    #[error("event has no sequence_id, which orders an aggregate's events; with the Outbox Event Router add `table.fields.additional.placement=sequence_id:header:sequenceId`")]
    NoSequence,
}

impl HandlerError {
    /// Whether the failure may be an ordering race that resolves itself (the
    /// aggregate's creation may still arrive), so retrying is worth it.
    pub fn may_be_race(&self) -> bool {
        matches!(self, HandlerError::UnknownAggregate { .. })
    }
}

/// What routing made of one event.
#[derive(Debug, Clone, PartialEq)]
pub enum Routed {
    Domain(DomainEvent),
    /// An event type with no handler: counted and skipped, no effect.
    Unmatched,
}

/// The registry: event type -> payload parser.
pub fn route(event: &OutboxEvent) -> Result<Routed, HandlerError> {
    let Some(parse) = handler_for(&event.event_type) else {
        unmatched_seen(&event.event_type);
        return Ok(Routed::Unmatched);
    };
    let value = event.payload.value().ok_or(HandlerError::TooDeep)?;
    let object = value.as_object().ok_or(HandlerError::NotAnObject)?;
    let domain = parse(object)?;
    let expected = domain.aggregate_kind().as_str();
    if event.aggregate_type != expected {
        return Err(HandlerError::WrongAggregate {
            event_type: event.event_type.clone(),
            expected,
            actual: event.aggregate_type.clone(),
        });
    }
    if event.sequence_id.is_none() {
        return Err(HandlerError::NoSequence);
    }
    Ok(Routed::Domain(domain))
}

type Parser = fn(&Map<String, Value>) -> Result<DomainEvent, HandlerError>;

/// The seven handlers, by event type.
pub const HANDLERS: &[(&str, Parser)] = &[
    ("UserCreated", parse_user_created),
    ("UserUpdated", parse_user_updated),
    ("ActivityCreated", parse_activity_created),
    ("ActivityUpdated", parse_activity_updated),
    ("ActivityCancelled", parse_activity_cancelled),
    ("ParticipantJoined", parse_participant_joined),
    ("ParticipantLeft", parse_participant_left),
];

fn handler_for(event_type: &str) -> Option<Parser> {
    HANDLERS
        .iter()
        .find(|(name, _)| *name == event_type)
        .map(|(_, parse)| *parse)
}

static UNMATCHED: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());

/// Counts an unknown event type; logs the first sighting of each type. The map
/// is bounded in practice by the event types the write side has.
fn unmatched_seen(event_type: &str) {
    let Ok(mut counts) = UNMATCHED.lock() else {
        return;
    };
    let count = counts.entry(event_type.to_string()).or_insert(0);
    *count += 1;
    if *count == 1 {
        tracing::warn!(
            event_type,
            "unknown event type: counted and skipped (no handler)"
        );
    }
}

/// Unknown event types seen by this process, with their counts.
pub fn unmatched_counts() -> BTreeMap<String, u64> {
    UNMATCHED.lock().map(|m| m.clone()).unwrap_or_default()
}

fn string(
    payload: &Map<String, Value>,
    field: &'static str,
) -> Result<Option<String>, HandlerError> {
    match payload.get(field) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(HandlerError::WrongType {
            field,
            expected: "a string",
        }),
    }
}

fn uuid(payload: &Map<String, Value>, field: &'static str) -> Result<Option<Uuid>, HandlerError> {
    let wrong = HandlerError::WrongType {
        field,
        expected: "a uuid string",
    };
    match payload.get(field) {
        None => Ok(None),
        Some(Value::String(s)) => Uuid::parse_str(s).map(Some).map_err(|_| wrong),
        Some(_) => Err(wrong),
    }
}

fn time(
    payload: &Map<String, Value>,
    field: &'static str,
) -> Result<Option<DateTime<Utc>>, HandlerError> {
    let wrong = HandlerError::WrongType {
        field,
        expected: "an RFC 3339 time string",
    };
    match payload.get(field) {
        None => Ok(None),
        Some(Value::String(s)) => DateTime::parse_from_rfc3339(s)
            .map(|t| Some(t.with_timezone(&Utc)))
            .map_err(|_| wrong),
        Some(_) => Err(wrong),
    }
}

fn capacity(payload: &Map<String, Value>) -> Result<Option<i64>, HandlerError> {
    const FIELD: &str = "maxParticipants";
    match payload.get(FIELD) {
        None => Ok(None),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(c) if c >= 1 => Ok(Some(c)),
            _ => Err(HandlerError::WrongType {
                field: FIELD,
                expected: "an integer >= 1",
            }),
        },
        Some(_) => Err(HandlerError::WrongType {
            field: FIELD,
            expected: "an integer >= 1",
        }),
    }
}

fn location(payload: &Map<String, Value>) -> Result<Option<Value>, HandlerError> {
    match payload.get("location") {
        None => Ok(None),
        Some(v @ (Value::String(_) | Value::Object(_) | Value::Null)) => Ok(Some(v.clone())),
        Some(_) => Err(HandlerError::WrongType {
            field: "location",
            expected: "a string, an object or null",
        }),
    }
}

fn required<T>(value: Option<T>, field: &'static str) -> Result<T, HandlerError> {
    value.ok_or(HandlerError::Missing(field))
}

fn parse_user_created(p: &Map<String, Value>) -> Result<DomainEvent, HandlerError> {
    Ok(DomainEvent::UserCreated {
        email: required(string(p, "email")?, "email")?,
        display_name: required(string(p, "displayName")?, "displayName")?,
    })
}

fn parse_user_updated(p: &Map<String, Value>) -> Result<DomainEvent, HandlerError> {
    let email = string(p, "email")?;
    let display_name = string(p, "displayName")?;
    if email.is_none() && display_name.is_none() {
        return Err(HandlerError::NothingToUpdate("UserUpdated"));
    }
    Ok(DomainEvent::UserUpdated {
        email,
        display_name,
    })
}

fn parse_activity_created(p: &Map<String, Value>) -> Result<DomainEvent, HandlerError> {
    Ok(DomainEvent::ActivityCreated {
        organizer_id: required(uuid(p, "organizerId")?, "organizerId")?,
        title: required(string(p, "title")?, "title")?,
        starts_at: required(time(p, "startsAt")?, "startsAt")?,
        capacity: required(capacity(p)?, "maxParticipants")?,
        location: location(p)?.unwrap_or(Value::Null),
    })
}

fn parse_activity_updated(p: &Map<String, Value>) -> Result<DomainEvent, HandlerError> {
    let title = string(p, "title")?;
    let starts_at = time(p, "startsAt")?;
    let capacity = capacity(p)?;
    let location = location(p)?;
    if title.is_none() && starts_at.is_none() && capacity.is_none() && location.is_none() {
        return Err(HandlerError::NothingToUpdate("ActivityUpdated"));
    }
    Ok(DomainEvent::ActivityUpdated {
        title,
        starts_at,
        capacity,
        location,
    })
}

fn parse_activity_cancelled(_p: &Map<String, Value>) -> Result<DomainEvent, HandlerError> {
    Ok(DomainEvent::ActivityCancelled)
}

fn parse_participant_joined(p: &Map<String, Value>) -> Result<DomainEvent, HandlerError> {
    Ok(DomainEvent::ParticipantJoined {
        user_id: required(uuid(p, "userId")?, "userId")?,
        joined_at: required(time(p, "joinedAt")?, "joinedAt")?,
    })
}

fn parse_participant_left(p: &Map<String, Value>) -> Result<DomainEvent, HandlerError> {
    Ok(DomainEvent::ParticipantLeft {
        user_id: required(uuid(p, "userId")?, "userId")?,
    })
}

impl crate::policy::Classify for crate::route::HandlerError {
    fn class(&self) -> crate::policy::ErrorClass {
        crate::policy::ErrorClass::Permanent
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(event_type: &str, aggregate_type: &str, payload: Value) -> OutboxEvent {
        OutboxEvent {
            event_id: Uuid::new_v4(),
            sequence_id: Some(1),
            aggregate_id: Uuid::new_v4(),
            aggregate_type: aggregate_type.into(),
            event_type: event_type.into(),
            payload: payload.into(),
            created_at: None,
        }
    }

    #[test]
    fn every_contract_event_has_a_handler() {
        let names: Vec<&str> = HANDLERS.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                "UserCreated",
                "UserUpdated",
                "ActivityCreated",
                "ActivityUpdated",
                "ActivityCancelled",
                "ParticipantJoined",
                "ParticipantLeft"
            ]
        );
    }

    #[test]
    fn user_created_parses_and_ignores_unknown_fields() {
        let routed = route(&event(
            "UserCreated",
            "User",
            json!({"email": "a@x", "displayName": "A", "userId": "ignored", "extra": 1}),
        ));
        assert_eq!(
            routed,
            Ok(Routed::Domain(DomainEvent::UserCreated {
                email: "a@x".into(),
                display_name: "A".into()
            }))
        );
    }

    #[test]
    fn rule_violations_are_named() {
        let cases = [
            (
                "UserCreated",
                "User",
                json!({"email": "a"}),
                "payload misses required field `displayName`",
            ),
            (
                "UserCreated",
                "User",
                json!([1]),
                "payload is not a JSON object",
            ),
            (
                "UserUpdated",
                "User",
                json!({"roles": []}),
                "payload of UserUpdated must carry at least one of its fields",
            ),
            (
                "ActivityCreated",
                "Activity",
                json!({"organizerId": "x", "title": "t", "startsAt": "2026-01-01T00:00:00Z", "maxParticipants": 2}),
                "payload field `organizerId` has the wrong type: expected a uuid string",
            ),
            (
                "ActivityUpdated",
                "Activity",
                json!({"maxParticipants": 0}),
                "payload field `maxParticipants` has the wrong type: expected an integer >= 1",
            ),
            (
                "ActivityUpdated",
                "Activity",
                json!({"location": 5}),
                "payload field `location` has the wrong type: expected a string, an object or null",
            ),
            (
                "ParticipantJoined",
                "Activity",
                json!({"userId": Uuid::nil(), "joinedAt": "yesterday"}),
                "payload field `joinedAt` has the wrong type: expected an RFC 3339 time string",
            ),
            (
                "ParticipantLeft",
                "User",
                json!({"userId": Uuid::nil()}),
                "ParticipantLeft belongs to aggregate type Activity, but the event says `User`",
            ),
        ];
        for (event_type, aggregate_type, payload, message) in cases {
            let err = route(&event(event_type, aggregate_type, payload)).expect_err(message);
            assert_eq!(err.to_string(), message);
        }
    }

    #[test]
    fn location_is_copied_as_is_and_optional() {
        let base = json!({"organizerId": Uuid::nil(), "title": "t", "startsAt": "2026-01-01T10:00:00+02:00", "maxParticipants": 3});
        let Ok(Routed::Domain(DomainEvent::ActivityCreated {
            location,
            starts_at,
            ..
        })) = route(&event("ActivityCreated", "Activity", base))
        else {
            panic!("parses");
        };
        assert_eq!(location, Value::Null);
        assert_eq!(starts_at.to_rfc3339(), "2026-01-01T08:00:00+00:00");
        let updated = route(&event(
            "ActivityUpdated",
            "Activity",
            json!({"location": {"name": "park"}}),
        ));
        assert_eq!(
            updated,
            Ok(Routed::Domain(DomainEvent::ActivityUpdated {
                title: None,
                starts_at: None,
                capacity: None,
                location: Some(json!({"name": "park"}))
            }))
        );
    }

    #[test]
    fn unknown_types_are_unmatched_and_counted() {
        let before = unmatched_counts().get("SomethingNew").copied().unwrap_or(0);
        let routed = route(&event("SomethingNew", "User", json!("not even an object")));
        assert_eq!(routed, Ok(Routed::Unmatched));
        assert_eq!(
            unmatched_counts().get("SomethingNew").copied(),
            Some(before + 1)
        );
    }

    #[test]
    fn a_payload_read_from_text_routes_like_its_value_and_a_too_deep_field_is_refused() {
        let text = r#"{"email": "a@example.com", "displayName": "A"}"#;
        let mut from_text = event("UserCreated", "User", json!({}));
        from_text.payload = crate::decode::Payload::from_text(text).expect("json");
        let from_value = event(
            "UserCreated",
            "User",
            serde_json::from_str(text).expect("json"),
        );
        assert!(route(&from_text).is_ok());
        assert_eq!(route(&from_text), route(&from_value));
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        let mut too_deep = event("UserCreated", "User", json!({}));
        too_deep.payload = crate::decode::Payload::from_text(&format!(
            r#"{{"email": "a@b", "displayName": {deep}}}"#
        ))
        .expect("well-formed");
        assert_eq!(route(&too_deep), Err(HandlerError::TooDeep));
        let mut not_object = event("UserCreated", "User", json!({}));
        not_object.payload = crate::decode::Payload::from_text("[1, 2]").expect("json");
        assert_eq!(route(&not_object), Err(HandlerError::NotAnObject));
    }

    #[test]
    fn events_without_sequence_are_rejected() {
        let mut e = event("ActivityCancelled", "Activity", json!({}));
        e.sequence_id = None;
        assert_eq!(route(&e), Err(HandlerError::NoSequence));
    }
}
