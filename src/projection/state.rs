//! The documents of one batch, in memory: loaded from MongoDB, changed by the
//! batch's events in order, written back once each (successive changes to a
//! document coalesce into one write).
//!
//! Bookkeeping fields (docs/design.md section 4 allows them when they start with `_`):
//! - `_seq`: the highest `sequence_id` applied to the aggregate: the fence that
//!   makes duplicates and replays change nothing;
//! - `_ov`, `_uv.<user>`: in an activity, the `_seq` of the user whose
//!   display name the organizer / participant copy shows;
//! - `_av.<activity>`: in a user, the `_seq` of the activity that user's
//!   `activities` entry was copied from;
//! - `_rev` (activities) and `_erev` (users' `activities`): revision tokens,
//!   new on every write, that make a refresh a compare-and-set.
//!
//! Copies only move forward in version, so a late or repeated refresh can never
//! put an older value back.

use crate::route::{DomainEvent, HandlerError};
use chrono::{DateTime, Utc};
use mongodb::bson::{doc, Bson, Document};
use serde_json::Value;
use std::collections::BTreeMap;
use uuid::Uuid;

/// A user's own fields.
#[derive(Debug, Clone, PartialEq)]
pub struct UserDoc {
    pub seq: i64,
    pub email: String,
    pub display_name: String,
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Participant {
    pub user_id: Uuid,
    pub display_name: Option<String>,
    pub joined_at: DateTime<Utc>,
    /// `_seq` of the user when `display_name` was copied (0: no such user yet).
    pub name_version: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ActivityDoc {
    pub seq: i64,
    pub title: String,
    pub location: Value,
    pub starts_at: DateTime<Utc>,
    pub capacity: i64,
    pub cancelled: bool,
    pub organizer: Uuid,
    pub organizer_name: Option<String>,
    pub organizer_name_version: i64,
    pub participants: Vec<Participant>,
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
}

/// A user's display name as copies show it, with its version.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NameCopy {
    pub name: Option<String>,
    pub version: i64,
}

impl ActivityDoc {
    pub fn status(&self) -> &'static str {
        if self.cancelled {
            "cancelled"
        } else if self.participants.len() as i64 >= self.capacity {
            "full"
        } else {
            "open"
        }
    }

    /// Every user the activity names, with the role their entry shows.
    pub fn members(&self) -> Vec<(Uuid, &'static str)> {
        let mut members = vec![(self.organizer, "organizer")];
        for p in &self.participants {
            if p.user_id != self.organizer {
                members.push((p.user_id, "participant"));
            }
        }
        members
    }

    /// What a member's `activities` entry shows of this activity.
    pub fn summary(&self) -> (String, DateTime<Utc>, &'static str) {
        (self.title.clone(), self.starts_at, self.status())
    }
}

/// What an applied event means beyond its own document.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Effect {
    /// The user's display name (or existence) changed: refresh its copies.
    pub name_changed: bool,
    /// The user was created: give it entries for the activities naming it.
    pub user_created: bool,
    /// Users who joined (need an entry) or left (lose theirs).
    pub joined: Option<Uuid>,
    pub left: Option<Uuid>,
}

fn unknown(event_type: &str, kind: &'static str, id: Uuid) -> HandlerError {
    HandlerError::UnknownAggregate {
        event_type: event_type.to_string(),
        kind,
        id,
    }
}

/// Applies a User event to the user's document (None: not created yet).
pub fn apply_user(
    doc: &mut Option<UserDoc>,
    id: Uuid,
    event_type: &str,
    seq: i64,
    at: Option<DateTime<Utc>>,
    event: DomainEvent,
) -> Result<Effect, HandlerError> {
    match event {
        DomainEvent::UserCreated {
            email,
            display_name,
        } => {
            let created_at = doc.as_ref().map_or(at, |d| d.created_at);
            *doc = Some(UserDoc {
                seq,
                email,
                display_name,
                created_at,
                updated_at: at,
            });
            Ok(Effect {
                name_changed: true,
                user_created: true,
                ..Effect::default()
            })
        }
        DomainEvent::UserUpdated {
            email,
            display_name,
        } => {
            let user = doc
                .as_mut()
                .ok_or_else(|| unknown(event_type, "user", id))?;
            user.seq = seq;
            user.updated_at = at;
            if let Some(email) = email {
                user.email = email;
            }
            let name_changed = display_name.is_some();
            if let Some(name) = display_name {
                user.display_name = name;
            }
            Ok(Effect {
                name_changed,
                ..Effect::default()
            })
        }
        _ => Err(HandlerError::WrongAggregate {
            event_type: event_type.to_string(),
            expected: "Activity",
            actual: "User".into(),
        }),
    }
}

/// Applies an Activity event; `name_of` gives the current copy of a user's name.
#[allow(clippy::too_many_arguments)]
pub fn apply_activity(
    doc: &mut Option<ActivityDoc>,
    id: Uuid,
    event_type: &str,
    seq: i64,
    at: Option<DateTime<Utc>>,
    event: DomainEvent,
    name_of: &dyn Fn(Uuid) -> NameCopy,
) -> Result<Effect, HandlerError> {
    if let DomainEvent::ActivityCreated {
        organizer_id,
        title,
        starts_at,
        capacity,
        location,
    } = event
    {
        if doc.is_some() {
            return Err(HandlerError::AlreadyExists {
                event_type: event_type.to_string(),
                id,
            });
        }
        let organizer = name_of(organizer_id);
        *doc = Some(ActivityDoc {
            seq,
            title,
            location,
            starts_at,
            capacity,
            cancelled: false,
            organizer: organizer_id,
            organizer_name: organizer.name,
            organizer_name_version: organizer.version,
            participants: Vec::new(),
            created_at: at,
            updated_at: at,
        });
        return Ok(Effect {
            joined: Some(organizer_id),
            ..Effect::default()
        });
    }
    let activity = doc
        .as_mut()
        .ok_or_else(|| unknown(event_type, "activity", id))?;
    activity.seq = seq;
    let mut effect = Effect::default();
    match event {
        DomainEvent::ActivityUpdated {
            title,
            starts_at,
            capacity,
            location,
        } => {
            if let Some(title) = title {
                activity.title = title;
            }
            if let Some(starts_at) = starts_at {
                activity.starts_at = starts_at;
            }
            if let Some(capacity) = capacity {
                activity.capacity = capacity;
            }
            if let Some(location) = location {
                activity.location = location;
            }
            activity.updated_at = at;
        }
        DomainEvent::ActivityCancelled => {
            activity.cancelled = true;
            activity.updated_at = at;
        }
        DomainEvent::ParticipantJoined { user_id, joined_at } => {
            if !activity.participants.iter().any(|p| p.user_id == user_id) {
                let copy = name_of(user_id);
                activity.participants.push(Participant {
                    user_id,
                    display_name: copy.name,
                    joined_at,
                    name_version: copy.version,
                });
                activity.updated_at = at;
                effect.joined = Some(user_id);
            }
        }
        DomainEvent::ParticipantLeft { user_id } => {
            let before = activity.participants.len();
            activity.participants.retain(|p| p.user_id != user_id);
            if activity.participants.len() != before {
                activity.updated_at = at;
                effect.left = Some(user_id);
            }
        }
        DomainEvent::ActivityCreated { .. }
        | DomainEvent::UserCreated { .. }
        | DomainEvent::UserUpdated { .. } => {
            return Err(HandlerError::WrongAggregate {
                event_type: event_type.to_string(),
                expected: "User",
                actual: "Activity".into(),
            })
        }
    }
    Ok(effect)
}

/// A fresh revision token: every write of an activity's participants (own
/// write or name refresh) sets a new one, so a refresh based on an older read
/// matches nothing and is redone.
pub fn new_revision() -> String {
    Uuid::new_v4().simple().to_string()
}

pub fn bson_time(t: &DateTime<Utc>) -> Bson {
    Bson::DateTime(mongodb::bson::DateTime::from_millis(t.timestamp_millis()))
}

fn opt_time(t: &Option<DateTime<Utc>>) -> Bson {
    t.as_ref().map_or(Bson::Null, bson_time)
}

fn opt_string(s: &Option<String>) -> Bson {
    s.as_ref().map_or(Bson::Null, |s| Bson::String(s.clone()))
}

/// JSON (a payload's `location`) as BSON, numbers kept as integers where they are.
pub fn json_to_bson(value: &Value) -> Bson {
    Bson::try_from(value.clone()).unwrap_or(Bson::Null)
}

impl UserDoc {
    /// The own fields, for `$set`.
    pub fn own_fields(&self) -> Document {
        doc! {
            "email": &self.email,
            "display_name": &self.display_name,
            "created_at": opt_time(&self.created_at),
            "updated_at": opt_time(&self.updated_at),
            "_seq": self.seq,
        }
    }

    pub fn from_bson(doc: &Document) -> Result<UserDoc, String> {
        Ok(UserDoc {
            seq: read_i64(doc, "_seq")?,
            email: doc.get_str("email").map_err(|e| e.to_string())?.to_string(),
            display_name: doc
                .get_str("display_name")
                .map_err(|e| e.to_string())?
                .to_string(),
            created_at: read_time(doc, "created_at")?,
            updated_at: read_time(doc, "updated_at")?,
        })
    }
}

impl ActivityDoc {
    /// Every field but `_id`, for `$set` (copies' versions included), with
    /// `rev` as the new revision token.
    pub fn fields(&self, rev: &str) -> Document {
        let participants: Vec<Bson> = self
            .participants
            .iter()
            .map(|p| {
                Bson::Document(doc! {
                    "user_id": p.user_id.to_string(),
                    "display_name": opt_string(&p.display_name),
                    "joined_at": bson_time(&p.joined_at),
                })
            })
            .collect();
        let versions: Document = self
            .participants
            .iter()
            .map(|p| (p.user_id.to_string(), Bson::Int64(p.name_version)))
            .collect();
        doc! {
            "title": &self.title,
            "location": json_to_bson(&self.location),
            "starts_at": bson_time(&self.starts_at),
            "capacity": self.capacity,
            "status": self.status(),
            "organizer": {
                "user_id": self.organizer.to_string(),
                "display_name": opt_string(&self.organizer_name),
            },
            "participants": participants,
            "participant_count": self.participants.len() as i64,
            "created_at": opt_time(&self.created_at),
            "updated_at": opt_time(&self.updated_at),
            "_seq": self.seq,
            "_ov": self.organizer_name_version,
            "_uv": versions,
            "_rev": rev,
        }
    }

    pub fn from_bson(doc: &Document) -> Result<ActivityDoc, String> {
        let versions = doc.get_document("_uv").ok();
        let organizer = doc.get_document("organizer").map_err(|e| e.to_string())?;
        let mut participants = Vec::new();
        for item in doc.get_array("participants").map_err(|e| e.to_string())? {
            let Bson::Document(p) = item else {
                return Err("participants holds a non-document".into());
            };
            let user_id = read_uuid(p, "user_id")?;
            participants.push(Participant {
                user_id,
                display_name: p.get_str("display_name").ok().map(str::to_string),
                joined_at: read_time(p, "joined_at")?.ok_or("participant without joined_at")?,
                name_version: versions
                    .and_then(|v| read_i64(v, &user_id.to_string()).ok())
                    .unwrap_or(0),
            });
        }
        let location = doc
            .get("location")
            .cloned()
            .map_or(Value::Null, Bson::into_relaxed_extjson);
        Ok(ActivityDoc {
            seq: read_i64(doc, "_seq")?,
            title: doc.get_str("title").map_err(|e| e.to_string())?.to_string(),
            location,
            starts_at: read_time(doc, "starts_at")?.ok_or("activity without starts_at")?,
            capacity: read_i64(doc, "capacity")?,
            cancelled: doc.get_str("status") == Ok("cancelled"),
            organizer: read_uuid(organizer, "user_id")?,
            organizer_name: organizer.get_str("display_name").ok().map(str::to_string),
            organizer_name_version: read_i64(doc, "_ov").unwrap_or(0),
            participants,
            created_at: read_time(doc, "created_at")?,
            updated_at: read_time(doc, "updated_at")?,
        })
    }
}

pub fn read_i64(doc: &Document, key: &str) -> Result<i64, String> {
    match doc.get(key) {
        Some(Bson::Int64(n)) => Ok(*n),
        Some(Bson::Int32(n)) => Ok(i64::from(*n)),
        Some(Bson::Double(n)) if n.fract() == 0.0 => Ok(*n as i64),
        other => Err(format!("field `{key}` is not an integer: {other:?}")),
    }
}

fn read_uuid(doc: &Document, key: &str) -> Result<Uuid, String> {
    let text = doc.get_str(key).map_err(|e| e.to_string())?;
    Uuid::parse_str(text).map_err(|e| format!("field `{key}`: {e}"))
}

fn read_time(doc: &Document, key: &str) -> Result<Option<DateTime<Utc>>, String> {
    match doc.get(key) {
        None | Some(Bson::Null) => Ok(None),
        Some(Bson::DateTime(t)) => Ok(DateTime::from_timestamp_millis(t.timestamp_millis())),
        other => Err(format!("field `{key}` is not a date: {other:?}")),
    }
}

/// Names of users as copies should show them, by user id.
pub type Names = BTreeMap<Uuid, NameCopy>;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&Utc))
            .expect("time")
    }

    #[test]
    fn activity_round_trips_through_bson() {
        let activity = ActivityDoc {
            seq: 7,
            title: "Run".into(),
            location: json!({"name": "park", "lat": 51.5, "n": 3}),
            starts_at: t("2026-01-01T10:00:00.123Z"),
            capacity: 2,
            cancelled: false,
            organizer: Uuid::new_v4(),
            organizer_name: None,
            organizer_name_version: 0,
            participants: vec![Participant {
                user_id: Uuid::new_v4(),
                display_name: Some("A".into()),
                joined_at: t("2026-01-01T09:00:00Z"),
                name_version: 4,
            }],
            created_at: Some(t("2025-12-01T00:00:00Z")),
            updated_at: None,
        };
        let back = ActivityDoc::from_bson(&activity.fields("r")).expect("parses");
        assert_eq!(back, activity);
    }

    #[test]
    fn joins_are_set_like_and_status_follows_count() {
        let mut doc = None;
        let a = Uuid::new_v4();
        let u = Uuid::new_v4();
        let names = |_: Uuid| NameCopy::default();
        let created = DomainEvent::ActivityCreated {
            organizer_id: u,
            title: "x".into(),
            starts_at: t("2026-01-01T10:00:00Z"),
            capacity: 1,
            location: Value::Null,
        };
        apply_activity(&mut doc, a, "ActivityCreated", 1, None, created, &names).expect("create");
        let join = DomainEvent::ParticipantJoined {
            user_id: u,
            joined_at: t("2026-01-01T10:00:00Z"),
        };
        let first = apply_activity(
            &mut doc,
            a,
            "ParticipantJoined",
            2,
            None,
            join.clone(),
            &names,
        )
        .expect("join");
        assert_eq!(first.joined, Some(u));
        let again =
            apply_activity(&mut doc, a, "ParticipantJoined", 3, None, join, &names).expect("join");
        assert_eq!(again, Effect::default());
        let activity = doc.expect("exists");
        assert_eq!(activity.participants.len(), 1);
        assert_eq!(activity.status(), "full");
        assert_eq!(activity.members(), vec![(u, "organizer")]);
    }
}
