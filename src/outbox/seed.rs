//! The seed: four pending events that reference each other - a user is created
//! and renamed, organizes an activity and joins it. Ids, payloads and times are
//! those of the Debezium fixtures, so a relayed seed can be compared with them.

use super::OutboxError;
use serde_json::json;
use tokio_postgres::Client;
use uuid::{uuid, Uuid};

pub const USER_ID: Uuid = uuid!("7d3c9a52-1e4f-4b8a-9c61-2f5e8d7a4b10");
pub const ACTIVITY_ID: Uuid = uuid!("a1f2c3d4-5e6f-4a8b-9c0d-1e2f3a4b5c6d");

/// One seed row: event id, aggregate id, aggregate type, event type, payload, created_at.
pub struct SeedEvent {
    pub event_id: Uuid,
    pub aggregate_id: Uuid,
    pub aggregate_type: &'static str,
    pub event_type: &'static str,
    pub payload: serde_json::Value,
    pub created_at: &'static str,
}

pub fn events() -> Vec<SeedEvent> {
    vec![
        SeedEvent {
            event_id: uuid!("0192f4b7-1c3d-7e4f-9a50-3b6c7d8e9f10"),
            aggregate_id: USER_ID,
            aggregate_type: "User",
            event_type: "UserCreated",
            payload: json!({
                "userId": USER_ID, "email": "alice.martin@example.com",
                "displayName": "Alice Martin", "roles": ["member"], "locale": "en-GB",
                "timezone": "Europe/London", "registeredAt": "2026-09-15T09:41:07.497Z",
                "marketingOptIn": false
            }),
            created_at: "2026-09-15T09:41:07.509871Z",
        },
        SeedEvent {
            event_id: uuid!("0192f4ba-4e02-7a18-8c77-5d9e0f1a2b11"),
            aggregate_id: USER_ID,
            aggregate_type: "User",
            event_type: "UserUpdated",
            payload: json!({
                "userId": USER_ID, "version": 2, "displayName": "Alice M. Martin",
                "timezone": "Europe/Paris", "updatedAt": "2026-09-15T09:43:52.081Z",
                "previous": {"timezone": "Europe/London", "displayName": "Alice Martin"},
                "changedFields": ["displayName", "timezone"]
            }),
            created_at: "2026-09-15T09:43:52.086530Z",
        },
        SeedEvent {
            event_id: uuid!("0192f4ce-0b5a-7f63-9d21-7e3f4a5b6c12"),
            aggregate_id: ACTIVITY_ID,
            aggregate_type: "Activity",
            event_type: "ActivityCreated",
            payload: json!({
                "activityId": ACTIVITY_ID, "organizerId": USER_ID,
                "title": "Sunday Morning Trail Run", "category": "running",
                "location": {"lat": 51.4561, "lon": -0.2571, "name": "Richmond Park, Roehampton Gate"},
                "startsAt": "2026-09-20T07:30:00Z", "durationMinutes": 90, "maxParticipants": 12,
                "tags": ["outdoor", "trail", "beginner-friendly"], "visibility": "public"
            }),
            created_at: "2026-09-15T10:05:31.768204Z",
        },
        SeedEvent {
            event_id: uuid!("0192f4ce-0b5b-7204-a3e8-9f0a1b2c3d13"),
            aggregate_id: ACTIVITY_ID,
            aggregate_type: "Activity",
            event_type: "ParticipantJoined",
            payload: json!({
                "activityId": ACTIVITY_ID, "userId": USER_ID,
                "participantId": "e6a1d9c3-2b7f-4c58-a4e0-3d9b8f1c7a22",
                "role": "organizer", "joinedAt": "2026-09-15T10:05:31.770Z",
                "invitedBy": null, "waitlisted": false, "participantCount": 1
            }),
            created_at: "2026-09-15T10:05:31.768204Z",
        },
    ]
}

/// Inserts the seed events that are not there yet; returns how many it inserted.
pub async fn seed(client: &mut Client) -> Result<u64, OutboxError> {
    let tx = client
        .transaction()
        .await
        .map_err(|e| OutboxError::query("cannot start the seed transaction", e))?;
    let insert = tx
        .prepare(
            "INSERT INTO event_outbox
                 (event_id, aggregate_id, aggregate_type, event_type, payload, created_at)
             VALUES ($1, $2, $3, $4, $5, $6::text::timestamptz)
             ON CONFLICT (event_id) DO NOTHING",
        )
        .await
        .map_err(|e| {
            OutboxError::query("cannot prepare the seed insert (run `migrate` first?)", e)
        })?;
    let mut inserted = 0;
    for event in events() {
        inserted += tx
            .execute(
                &insert,
                &[
                    &event.event_id,
                    &event.aggregate_id,
                    &event.aggregate_type,
                    &event.event_type,
                    &event.payload,
                    &event.created_at,
                ],
            )
            .await
            .map_err(|e| OutboxError::query("cannot insert a seed event", e))?;
    }
    tx.commit()
        .await
        .map_err(|e| OutboxError::query("cannot commit the seed", e))?;
    Ok(inserted)
}
