//! Generated outbox histories: the seven event types with realistic camelCase
//! payloads, a little poison and some unknown event types. Deterministic for a
//! seed, so a failing test or a benchmark run can be repeated exactly.
//!
//! Used by the product's tests (against the reference fold) and benches, by
//! the benchmark (`event-processor-bench`), and by anyone who wants a
//! realistic outbox to play with.

use activity_event_processor::decode::OutboxEvent;
use chrono::{DateTime, Duration, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use uuid::Uuid;

/// Shape of a history.
#[derive(Debug, Clone)]
pub struct HistoryOptions {
    pub events: usize,
    /// How many distinct users and activities events pick from: small pools
    /// give many events per aggregate (order-sensitive histories).
    pub users: usize,
    pub activities: usize,
    /// Share of events with a broken payload (permanent errors), per mille.
    pub poison_per_mille: u32,
    /// Share of events of a type no handler knows, per mille.
    pub unknown_per_mille: u32,
    /// First `sequence_id`.
    pub first_sequence: i64,
    /// Share of events, per mille, that may name an aggregate that was never
    /// created (the rest follow the write side's rules: update what exists).
    pub chaos_per_mille: u32,
}

impl HistoryOptions {
    /// Pools scaled to the number of events: every creation finds an aggregate
    /// not created yet, and aggregates get several events each.
    pub fn realistic(events: usize) -> HistoryOptions {
        HistoryOptions {
            events,
            users: (events / 8).max(3),
            activities: (events / 8).max(2),
            poison_per_mille: 10,
            unknown_per_mille: 10,
            first_sequence: 1,
            chaos_per_mille: 10,
        }
    }
}

const FIRST: &[&str] = &[
    "Alice", "Bob", "Chen", "Dana", "Emeka", "Fatima", "Goran", "Hana",
];
const LAST: &[&str] = &[
    "Martin", "Okafor", "Kowalski", "Silva", "Tanaka", "Novak", "Haddad",
];
const TITLES: &[&str] = &[
    "Sunday Morning Trail Run",
    "Evening Climbing Session",
    "Beginner Yoga in the Park",
    "5-a-side Football",
    "Riverside Cycling Loop",
    "Chess by the Lake",
];

/// A deterministic history for `seed`.
pub fn generate(seed: u64, options: &HistoryOptions) -> Vec<OutboxEvent> {
    let mut rng = StdRng::seed_from_u64(seed);
    let users: Vec<Uuid> = (0..options.users.max(1)).map(|_| uuid(&mut rng)).collect();
    let activities: Vec<Uuid> = (0..options.activities.max(1))
        .map(|_| uuid(&mut rng))
        .collect();
    let start = DateTime::from_timestamp(1_790_000_000, 0).unwrap_or_default();
    let mut created_users: Vec<Uuid> = Vec::new();
    let mut created_activities: Vec<Uuid> = Vec::new();
    let mut events = Vec::with_capacity(options.events);
    for i in 0..options.events {
        let seq = options.first_sequence + i as i64;
        let created_at = start + Duration::milliseconds(i as i64 * 7 + rng.gen_range(0..5));
        let chaos = rng.gen_range(0..1000u32) < options.chaos_per_mille;
        let user = choose(&mut rng, &users, &created_users, chaos);
        let activity = choose(&mut rng, &activities, &created_activities, chaos);
        let roll = rng.gen_range(0..1000u32);
        let (aggregate_id, aggregate_type, event_type, mut payload) =
            if roll < options.unknown_per_mille {
                (
                    user,
                    "User",
                    "UserAvatarChanged",
                    json!({"avatarUrl": "https://img.example.com/a.png"}),
                )
            } else {
                // Creations take the next aggregate never created (the pools
                // are random already), a re-creation once none is left.
                let fresh = (
                    users
                        .get(created_users.len())
                        .copied()
                        .unwrap_or_else(|| users[rng.gen_range(0..users.len())]),
                    activities
                        .get(created_activities.len())
                        .copied()
                        .unwrap_or_else(|| activities[rng.gen_range(0..activities.len())]),
                );
                pick(&mut rng, (user, activity), fresh, &users, created_at)
            };
        match event_type {
            "UserCreated" if !created_users.contains(&aggregate_id) => {
                created_users.push(aggregate_id)
            }
            "ActivityCreated" if !created_activities.contains(&aggregate_id) => {
                created_activities.push(aggregate_id)
            }
            _ => {}
        }
        if rng.gen_range(0..1000u32) < options.poison_per_mille {
            payload = poison(&mut rng, payload);
        }
        events.push(OutboxEvent {
            event_id: uuid(&mut rng),
            sequence_id: Some(seq),
            aggregate_id,
            aggregate_type: aggregate_type.to_string(),
            event_type: event_type.to_string(),
            payload: payload.into(),
            created_at: Some(created_at),
        });
    }
    events
}

/// An aggregate for the next event: one that exists, or any of the pool when
/// `chaos` or when none exists yet.
fn choose(rng: &mut StdRng, pool: &[Uuid], created: &[Uuid], chaos: bool) -> Uuid {
    if chaos || created.is_empty() {
        pool[rng.gen_range(0..pool.len())]
    } else {
        created[rng.gen_range(0..created.len())]
    }
}

fn uuid(rng: &mut StdRng) -> Uuid {
    uuid::Builder::from_random_bytes(rng.gen()).into_uuid()
}

fn name(rng: &mut StdRng) -> String {
    format!(
        "{} {}",
        FIRST[rng.gen_range(0..FIRST.len())],
        LAST[rng.gen_range(0..LAST.len())]
    )
}

fn time_in_days(rng: &mut StdRng, base: DateTime<Utc>) -> String {
    (base + Duration::minutes(rng.gen_range(60..60 * 24 * 30)))
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// One event: creations take `fresh` aggregates from the whole pool, the
/// other events the `existing` ones.
fn pick(
    rng: &mut StdRng,
    (user, activity): (Uuid, Uuid),
    (fresh_user, fresh_activity): (Uuid, Uuid),
    users: &[Uuid],
    at: DateTime<Utc>,
) -> (Uuid, &'static str, &'static str, Value) {
    let member = users[rng.gen_range(0..users.len())];
    match rng.gen_range(0..100) {
        0..=11 => {
            let display_name = name(rng);
            (
                fresh_user,
                "User",
                "UserCreated",
                json!({
                    "userId": fresh_user,
                    "email": format!("{}@example.com", display_name.to_lowercase().replace(' ', ".")),
                    "displayName": display_name,
                    "roles": ["member"], "locale": "en-GB", "timezone": "Europe/London",
                    "registeredAt": at.to_rfc3339(), "marketingOptIn": rng.gen_bool(0.3),
                }),
            )
        }
        12..=29 => {
            let mut payload = json!({"userId": user, "updatedAt": at.to_rfc3339(), "version": rng.gen_range(2..50)});
            match rng.gen_range(0..3) {
                0 => payload["displayName"] = json!(name(rng)),
                1 => {
                    payload["email"] =
                        json!(format!("user{}@example.org", rng.gen_range(0..10_000)))
                }
                _ => {
                    payload["displayName"] = json!(name(rng));
                    payload["email"] =
                        json!(format!("user{}@example.net", rng.gen_range(0..10_000)));
                }
            }
            (user, "User", "UserUpdated", payload)
        }
        30..=41 => (
            fresh_activity,
            "Activity",
            "ActivityCreated",
            json!({
                "activityId": fresh_activity,
                "organizerId": member,
                "title": TITLES[rng.gen_range(0..TITLES.len())],
                "category": "outdoor",
                "location": if rng.gen_bool(0.8) {
                    json!({"name": "Richmond Park, Roehampton Gate", "lat": 51.4561, "lon": -0.2571})
                } else if rng.gen_bool(0.5) { json!("Online") } else { Value::Null },
                "startsAt": time_in_days(rng, at),
                "durationMinutes": 90,
                "maxParticipants": rng.gen_range(1..6),
                "tags": ["outdoor", "beginner-friendly"],
                "visibility": "public",
            }),
        ),
        42..=53 => {
            let mut payload = json!({"activityId": activity});
            match rng.gen_range(0..4) {
                0 => {
                    payload["title"] = json!(format!(
                        "{} (moved)",
                        TITLES[rng.gen_range(0..TITLES.len())]
                    ))
                }
                1 => payload["startsAt"] = json!(time_in_days(rng, at)),
                2 => payload["maxParticipants"] = json!(rng.gen_range(1..6)),
                _ => {
                    payload["location"] =
                        json!({"name": "Hyde Park", "lat": 51.5073, "lon": -0.1657})
                }
            }
            (activity, "Activity", "ActivityUpdated", payload)
        }
        54..=58 => (
            activity,
            "Activity",
            "ActivityCancelled",
            json!({"activityId": activity, "reason": "weather"}),
        ),
        59..=84 => (
            activity,
            "Activity",
            "ParticipantJoined",
            json!({
                "activityId": activity, "userId": member, "joinedAt": at.to_rfc3339(),
                "role": "participant", "waitlisted": false,
            }),
        ),
        _ => (
            activity,
            "Activity",
            "ParticipantLeft",
            json!({"activityId": activity, "userId": member}),
        ),
    }
}

/// Breaks a payload the way real poison looks: wrong types, missing fields,
/// not an object at all.
fn poison(rng: &mut StdRng, payload: Value) -> Value {
    match rng.gen_range(0..4) {
        0 => json!(["not", "an", "object"]),
        1 => json!("just a string"),
        2 => {
            let mut p = payload;
            for field in [
                "displayName",
                "email",
                "title",
                "startsAt",
                "maxParticipants",
                "userId",
                "joinedAt",
                "organizerId",
            ] {
                if let Some(v) = p.get_mut(field) {
                    *v = json!(12345.5);
                }
            }
            p
        }
        _ => json!({"unexpected": true}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_history() {
        let options = HistoryOptions::realistic(200);
        assert_eq!(generate(7, &options), generate(7, &options));
        assert_ne!(generate(7, &options), generate(8, &options));
    }

    #[test]
    fn sequences_are_consecutive_and_times_increase() {
        let events = generate(1, &HistoryOptions::realistic(500));
        for pair in events.windows(2) {
            assert_eq!(pair[1].sequence_id, pair[0].sequence_id.map(|s| s + 1));
            assert!(pair[1].created_at > pair[0].created_at);
        }
        let types: std::collections::BTreeSet<&str> =
            events.iter().map(|e| e.event_type.as_str()).collect();
        assert_eq!(
            types.len(),
            8,
            "all seven types and an unknown one: {types:?}"
        );
    }
}
