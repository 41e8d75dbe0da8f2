//! The reference fold: docs/design.md section 4 in plain Rust, no MongoDB.
//!
//! It keeps only the normalized facts (users, activities, memberships), applies
//! each distinct event once in `sequence_id` order, and derives the read models
//! from the final facts. It is deliberately written apart from the MongoDB
//! projection (sharing only payload parsing) so that tests can hold the one
//! against the other.

use crate::decode::OutboxEvent;
use crate::route::{route, DomainEvent, Routed};
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use uuid::Uuid;

#[derive(Debug, Clone)]
struct User {
    email: String,
    display_name: String,
    created_at: Option<DateTime<Utc>>,
    updated_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone)]
struct Activity {
    title: String,
    location: Value,
    starts_at: DateTime<Utc>,
    capacity: i64,
    cancelled: bool,
    organizer: Uuid,
    /// Members in join order: user, joined_at.
    participants: Vec<(Uuid, DateTime<Utc>)>,
    created_at: Option<DateTime<Utc>>,
    updated_at: Option<DateTime<Utc>>,
}

impl Activity {
    fn status(&self) -> &'static str {
        if self.cancelled {
            "cancelled"
        } else if self.participants.len() as i64 >= self.capacity {
            "full"
        } else {
            "open"
        }
    }
}

/// The expected state of the read models after a set of outbox events.
#[derive(Debug, Default, Clone)]
pub struct ReferenceFold {
    users: BTreeMap<Uuid, User>,
    activities: BTreeMap<Uuid, Activity>,
    /// Dead-lettered events: event id, aggregate id.
    dead_letters: BTreeMap<Uuid, Uuid>,
}

/// The read models in a comparable form: documents by `_id`, bookkeeping
/// fields dropped, arrays sorted, times as RFC 3339 with milliseconds.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ReadModels {
    pub users: BTreeMap<String, Value>,
    pub activities: BTreeMap<String, Value>,
    pub dead_letters: BTreeSet<String>,
}

/// The one time format of comparisons (MongoDB dates keep milliseconds).
pub fn time_key(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn opt_time(t: &Option<DateTime<Utc>>) -> Value {
    t.as_ref()
        .map_or(Value::Null, |t| Value::String(time_key(t)))
}

impl ReferenceFold {
    /// Folds a history: duplicates (same event id) count once, order is
    /// `sequence_id` whatever order the slice has.
    pub fn of(events: &[OutboxEvent]) -> ReferenceFold {
        let mut seen = BTreeSet::new();
        let mut ordered: Vec<&OutboxEvent> =
            events.iter().filter(|e| seen.insert(e.event_id)).collect();
        ordered.sort_by_key(|e| e.sequence_id);
        let mut fold = ReferenceFold::default();
        for event in ordered {
            fold.apply(event);
        }
        fold
    }

    /// Applies one event; a permanent error dead-letters it with no effect.
    pub fn apply(&mut self, event: &OutboxEvent) {
        let ok = match route(event) {
            Ok(Routed::Unmatched) => true,
            Ok(Routed::Domain(domain)) => self.apply_domain(event, domain),
            Err(_) => false,
        };
        if !ok {
            self.dead_letters.insert(event.event_id, event.aggregate_id);
        }
    }

    fn apply_domain(&mut self, event: &OutboxEvent, domain: DomainEvent) -> bool {
        let id = event.aggregate_id;
        let at = event.created_at;
        match domain {
            DomainEvent::UserCreated {
                email,
                display_name,
            } => {
                let user = self.users.entry(id).or_insert_with(|| User {
                    email: String::new(),
                    display_name: String::new(),
                    created_at: at,
                    updated_at: at,
                });
                user.email = email;
                user.display_name = display_name;
                user.updated_at = at;
            }
            DomainEvent::UserUpdated {
                email,
                display_name,
            } => {
                let Some(user) = self.users.get_mut(&id) else {
                    return false;
                };
                if let Some(email) = email {
                    user.email = email;
                }
                if let Some(name) = display_name {
                    user.display_name = name;
                }
                user.updated_at = at;
            }
            DomainEvent::ActivityCreated {
                organizer_id,
                title,
                starts_at,
                capacity,
                location,
            } => {
                if self.activities.contains_key(&id) {
                    return false;
                }
                self.activities.insert(
                    id,
                    Activity {
                        title,
                        location,
                        starts_at,
                        capacity,
                        cancelled: false,
                        organizer: organizer_id,
                        participants: Vec::new(),
                        created_at: at,
                        updated_at: at,
                    },
                );
            }
            DomainEvent::ActivityUpdated {
                title,
                starts_at,
                capacity,
                location,
            } => {
                let Some(activity) = self.activities.get_mut(&id) else {
                    return false;
                };
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
                let Some(activity) = self.activities.get_mut(&id) else {
                    return false;
                };
                activity.cancelled = true;
                activity.updated_at = at;
            }
            DomainEvent::ParticipantJoined { user_id, joined_at } => {
                let Some(activity) = self.activities.get_mut(&id) else {
                    return false;
                };
                if !activity.participants.iter().any(|(u, _)| *u == user_id) {
                    activity.participants.push((user_id, joined_at));
                    activity.updated_at = at;
                }
            }
            DomainEvent::ParticipantLeft { user_id } => {
                let Some(activity) = self.activities.get_mut(&id) else {
                    return false;
                };
                let before = activity.participants.len();
                activity.participants.retain(|(u, _)| *u != user_id);
                if activity.participants.len() != before {
                    activity.updated_at = at;
                }
            }
        }
        true
    }

    fn display_name(&self, user: &Uuid) -> Value {
        self.users
            .get(user)
            .map_or(Value::Null, |u| Value::String(u.display_name.clone()))
    }

    /// Records an event the processor dead-letters without routing it (an
    /// outbox row that does not decode).
    pub fn dead_letter(&mut self, event_id: Uuid, aggregate_id: Uuid) {
        self.dead_letters.insert(event_id, aggregate_id);
    }

    /// The dead-lettered events: event id and aggregate id.
    pub fn dead_letters(&self) -> &BTreeMap<Uuid, Uuid> {
        &self.dead_letters
    }

    /// The ids of the user and activity documents the facts define.
    pub fn user_ids(&self) -> impl Iterator<Item = &Uuid> {
        self.users.keys()
    }

    pub fn activity_ids(&self) -> impl Iterator<Item = &Uuid> {
        self.activities.keys()
    }

    /// The organizer and the participants of an activity (none if it does
    /// not exist).
    pub fn members(&self, activity: &Uuid) -> Vec<Uuid> {
        self.activities.get(activity).map_or_else(Vec::new, |a| {
            std::iter::once(a.organizer)
                .chain(a.participants.iter().map(|(u, _)| *u))
                .collect()
        })
    }

    /// Every user's activities and role in each (`organizer` wins): built
    /// once, so that deriving every user document stays linear.
    pub fn memberships(&self) -> Memberships {
        let mut roles: BTreeMap<Uuid, BTreeMap<Uuid, &'static str>> = BTreeMap::new();
        for (activity_id, a) in &self.activities {
            for (user, _) in &a.participants {
                roles
                    .entry(*user)
                    .or_default()
                    .insert(*activity_id, "participant");
            }
            roles
                .entry(a.organizer)
                .or_default()
                .insert(*activity_id, "organizer");
        }
        Memberships(roles)
    }

    /// The activity document these facts define, if the activity exists.
    pub fn activity_doc(&self, id: &Uuid) -> Option<Value> {
        let a = self.activities.get(id)?;
        let mut participants: Vec<Value> = a
            .participants
            .iter()
            .map(|(u, joined_at)| {
                json!({
                    "user_id": u.to_string(),
                    "display_name": self.display_name(u),
                    "joined_at": time_key(joined_at),
                })
            })
            .collect();
        sort_by_key(&mut participants, "user_id");
        Some(json!({
            "_id": id.to_string(),
            "title": a.title,
            "location": a.location,
            "starts_at": time_key(&a.starts_at),
            "capacity": a.capacity,
            "status": a.status(),
            "organizer": {
                "user_id": a.organizer.to_string(),
                "display_name": self.display_name(&a.organizer),
            },
            "participants": participants,
            "participant_count": a.participants.len(),
            "created_at": opt_time(&a.created_at),
            "updated_at": opt_time(&a.updated_at),
        }))
    }

    /// The user document these facts define, if the user exists.
    pub fn user_doc(&self, id: &Uuid, memberships: &Memberships) -> Option<Value> {
        let u = self.users.get(id)?;
        let entries: Vec<Value> = memberships
            .of(id)
            .filter_map(|(activity_id, role)| {
                let a = self.activities.get(activity_id)?;
                Some(json!({
                    "activity_id": activity_id.to_string(),
                    "title": a.title,
                    "starts_at": time_key(&a.starts_at),
                    "status": a.status(),
                    "role": role,
                }))
            })
            .collect();
        Some(json!({
            "_id": id.to_string(),
            "email": u.email,
            "display_name": u.display_name,
            "created_at": opt_time(&u.created_at),
            "updated_at": opt_time(&u.updated_at),
            "activities": entries,
        }))
    }

    /// The read models these facts define.
    pub fn read_models(&self) -> ReadModels {
        let memberships = self.memberships();
        ReadModels {
            dead_letters: self.dead_letters.keys().map(Uuid::to_string).collect(),
            users: self
                .users
                .keys()
                .filter_map(|id| Some((id.to_string(), self.user_doc(id, &memberships)?)))
                .collect(),
            activities: self
                .activities
                .keys()
                .filter_map(|id| Some((id.to_string(), self.activity_doc(id)?)))
                .collect(),
        }
    }
}

/// Each user's activities with the user's role, by activity id.
#[derive(Debug, Default)]
pub struct Memberships(BTreeMap<Uuid, BTreeMap<Uuid, &'static str>>);

impl Memberships {
    /// The activities of `user` in id order, with the role in each.
    pub fn of(&self, user: &Uuid) -> impl Iterator<Item = (&Uuid, &'static str)> {
        self.0
            .get(user)
            .into_iter()
            .flat_map(|roles| roles.iter().map(|(id, role)| (id, *role)))
    }
}

/// Sorts an array of objects by one string field (arrays compare as sets).
pub fn sort_by_key(values: &mut [Value], key: &str) {
    values.sort_by(|a, b| {
        a.get(key)
            .and_then(Value::as_str)
            .cmp(&b.get(key).and_then(Value::as_str))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: i64, aggregate: Uuid, kind: &str, event_type: &str, payload: Value) -> OutboxEvent {
        OutboxEvent {
            event_id: Uuid::new_v4(),
            sequence_id: Some(seq),
            aggregate_id: aggregate,
            aggregate_type: kind.into(),
            event_type: event_type.into(),
            payload: payload.into(),
            created_at: DateTime::from_timestamp(1_700_000_000 + seq, 0),
        }
    }

    #[test]
    fn rename_reaches_every_copy_and_status_follows_capacity() {
        let (u, v, a) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let t = "2026-01-01T10:00:00Z";
        let events = vec![
            ev(
                1,
                a,
                "Activity",
                "ActivityCreated",
                json!({"organizerId": u, "title": "Run", "startsAt": t, "maxParticipants": 1}),
            ),
            ev(
                2,
                a,
                "Activity",
                "ParticipantJoined",
                json!({"userId": v, "joinedAt": t}),
            ),
            ev(
                3,
                u,
                "User",
                "UserCreated",
                json!({"email": "u@x", "displayName": "U"}),
            ),
            ev(
                4,
                v,
                "User",
                "UserCreated",
                json!({"email": "v@x", "displayName": "V"}),
            ),
            ev(5, v, "User", "UserUpdated", json!({"displayName": "V2"})),
            ev(
                6,
                a,
                "Activity",
                "ParticipantJoined",
                json!({"userId": v, "joinedAt": t}),
            ),
            ev(
                7,
                Uuid::new_v4(),
                "User",
                "UserUpdated",
                json!({"email": "ghost"}),
            ),
        ];
        let models = ReferenceFold::of(&events).read_models();
        let activity = &models.activities[&a.to_string()];
        assert_eq!(activity["status"], "full");
        assert_eq!(activity["participant_count"], 1);
        assert_eq!(activity["organizer"]["display_name"], "U");
        assert_eq!(activity["participants"][0]["display_name"], "V2");
        // The second join changed nothing: updated_at is the first join's.
        assert_eq!(activity["updated_at"], opt_time(&events[1].created_at));
        let roles: Vec<&Value> = [u, v]
            .iter()
            .map(|id| &models.users[&id.to_string()]["activities"][0]["role"])
            .collect();
        assert_eq!(roles, [&json!("organizer"), &json!("participant")]);
        assert_eq!(models.dead_letters.len(), 1);
    }

    #[test]
    fn duplicates_and_order_of_the_slice_do_not_matter() {
        let u = Uuid::new_v4();
        let created = ev(
            1,
            u,
            "User",
            "UserCreated",
            json!({"email": "a", "displayName": "A"}),
        );
        let renamed = ev(2, u, "User", "UserUpdated", json!({"displayName": "B"}));
        let once = ReferenceFold::of(&[created.clone(), renamed.clone()]).read_models();
        let shuffled =
            ReferenceFold::of(&[renamed.clone(), created.clone(), renamed]).read_models();
        assert_eq!(once, shuffled);
        assert_eq!(once.users[&u.to_string()]["display_name"], "B");
    }

    #[test]
    fn leave_keeps_the_organizer_entry_and_cancel_shows_everywhere() {
        let (u, a) = (Uuid::new_v4(), Uuid::new_v4());
        let t = "2026-01-01T10:00:00Z";
        let events = vec![
            ev(
                1,
                u,
                "User",
                "UserCreated",
                json!({"email": "u", "displayName": "U"}),
            ),
            ev(
                2,
                a,
                "Activity",
                "ActivityCreated",
                json!({"organizerId": u, "title": "Run", "startsAt": t, "maxParticipants": 5}),
            ),
            ev(
                3,
                a,
                "Activity",
                "ParticipantJoined",
                json!({"userId": u, "joinedAt": t}),
            ),
            ev(4, a, "Activity", "ParticipantLeft", json!({"userId": u})),
            ev(5, a, "Activity", "ActivityCancelled", json!({})),
        ];
        let models = ReferenceFold::of(&events).read_models();
        let entry = &models.users[&u.to_string()]["activities"][0];
        assert_eq!(entry["role"], "organizer");
        assert_eq!(entry["status"], "cancelled");
        assert_eq!(models.activities[&a.to_string()]["participant_count"], 0);
    }
}
