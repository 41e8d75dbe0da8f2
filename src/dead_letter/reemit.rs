//! Re-emission: a dead letter's event written again at the end of the
//! outbox, as a new row (a new `event_id`, the same aggregate, type and
//! payload), so that it takes effect through the normal pipeline as if it
//! had just happened. Re-applying the old event in place cannot work: its
//! aggregate's fence has usually moved past it.
//!
//! - The payload is copied from the letter's own outbox row when it is
//!   still there (exact, as the write side committed it), else taken from
//!   the letter (a letter kept in the bounded form, or a record that did
//!   not decode, cannot be re-emitted).
//! - The new `event_id` is derived from the letter's id ([`new_event_id`]),
//!   so a rerun, or a second `retry` at the same time, finds the row the
//!   first one inserted (`ON CONFLICT DO NOTHING`): a letter is never
//!   re-emitted twice.
//! - The letters of one aggregate are inserted in their original order in
//!   one transaction holding nothing else, which first takes the outbox's
//!   `SHARE ROW EXCLUSIVE` lock: it waits for the write transactions in
//!   flight and holds off new ones until it commits, so the new rows'
//!   `sequence_id`s follow every committed row and commit in sequence order
//!   (the order the capture and the fences rely on, docs/design.md section 5).
//!   It waits for the lock [`LOCK_TRY`] at a time, so that the write side
//!   never queues long behind it.

use super::records::Letter;
use crate::outbox::OutboxError;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use tokio_postgres::types::Json;
use tokio_postgres::Client;
use uuid::Uuid;

/// Longest event or aggregate type the outbox takes (`VARCHAR(100)`).
const TYPE_MAX: usize = 100;

/// The `event_id` a letter's event is re-emitted with: a version 8 UUID of
/// the SHA-256 of the letter's id (RFC 9562's name-based form), the same
/// for every run.
pub fn new_event_id(letter_id: &str) -> Uuid {
    let mut hash = Sha256::new();
    hash.update(b"activity-event-processor/dead-letter-retry/");
    hash.update(letter_id.as_bytes());
    let digest = hash.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// Where the re-emitted row's content comes from.
#[derive(Debug, Clone, PartialEq)]
enum Origin {
    /// The letter's own outbox row, by its `event_id`.
    Row(Uuid),
    /// The letter's fields.
    Letter {
        aggregate_type: String,
        aggregate_id: Uuid,
        event_type: String,
        payload: Value,
    },
}

/// One letter ready to be re-emitted.
#[derive(Debug, Clone)]
pub struct Planned {
    pub letter: Letter,
    pub new_event_id: Uuid,
    origin: Origin,
}

/// The planned letters of one aggregate, in their original order.
#[derive(Debug, Clone)]
pub struct Group {
    pub aggregate: (String, String),
    pub items: Vec<Planned>,
}

/// A letter's event in the outbox after [`insert_group`].
#[derive(Debug, Clone, PartialEq)]
pub struct Emitted {
    pub event_id: Uuid,
    pub sequence_id: Option<i64>,
    /// Inserted now (else it was there already: an earlier run's).
    pub fresh: bool,
}

/// The letters' groups, and the letters that cannot be re-emitted, each
/// with why.
pub async fn plan(
    client: &Client,
    letters: Vec<Letter>,
) -> Result<(Vec<Group>, Vec<(Letter, String)>), OutboxError> {
    let rows = original_rows(client, &letters).await?;
    let mut groups: BTreeMap<(String, String), Vec<(i64, Planned)>> = BTreeMap::new();
    let mut refused = Vec::new();
    for letter in letters {
        let from_row = Uuid::parse_str(&letter.id)
            .ok()
            .and_then(|id| rows.get(&id).map(|row| (id, row)));
        let (key, order, origin) = match from_row {
            Some((id, (aggregate_type, aggregate_id, seq))) => (
                (aggregate_type.clone(), aggregate_id.to_string()),
                *seq,
                Origin::Row(id),
            ),
            None => match from_letter(&letter) {
                Ok(origin) => (
                    (letter.aggregate_type.clone(), letter.aggregate_id.clone()),
                    letter.sequence_id.unwrap_or(i64::MAX),
                    origin,
                ),
                Err(why) => {
                    refused.push((letter, why));
                    continue;
                }
            },
        };
        let new_event_id = new_event_id(&letter.id);
        groups.entry(key).or_default().push((
            order,
            Planned {
                letter,
                new_event_id,
                origin,
            },
        ));
    }
    let groups = groups
        .into_iter()
        .map(|(aggregate, mut items)| {
            items.sort_by(|a, b| (a.0, &a.1.letter.id).cmp(&(b.0, &b.1.letter.id)));
            Group {
                aggregate,
                items: items.into_iter().map(|(_, planned)| planned).collect(),
            }
        })
        .collect();
    Ok((groups, refused))
}

/// The outbox rows of the letters still there: aggregate type and id, and
/// `sequence_id`, by `event_id`.
async fn original_rows(
    client: &Client,
    letters: &[Letter],
) -> Result<HashMap<Uuid, (String, Uuid, i64)>, OutboxError> {
    let ids: Vec<Uuid> = letters
        .iter()
        .filter_map(|l| Uuid::parse_str(&l.id).ok())
        .collect();
    let rows = client
        .query(
            "SELECT event_id, aggregate_type, aggregate_id, sequence_id FROM event_outbox \
             WHERE event_id = ANY($1)",
            &[&ids],
        )
        .await
        .map_err(|e| OutboxError::query("cannot read the dead letters' outbox rows", e))?;
    Ok(rows
        .iter()
        .map(|row| (row.get(0), (row.get(1), row.get(2), row.get(3))))
        .collect())
}

/// The letter's own fields as the new row, when they make a whole event.
fn from_letter(letter: &Letter) -> Result<Origin, String> {
    let Some(payload) = &letter.payload else {
        return Err(
            "its payload was too large to keep whole and its outbox row is gone: \
             re-insert the event by hand, or discard it"
                .into(),
        );
    };
    if raw_record(payload) || letter.aggregate_type.is_empty() || letter.event_type.is_empty() {
        return Err(
            "it is a record that did not decode, not an event: fix it at its source, or discard it"
                .into(),
        );
    }
    let aggregate_id = Uuid::parse_str(&letter.aggregate_id)
        .ok()
        .filter(|id| !id.is_nil())
        .ok_or("it names no aggregate (no valid aggregate_id): discard it")?;
    if letter.aggregate_type.len() > TYPE_MAX || letter.event_type.len() > TYPE_MAX {
        return Err(format!(
            "its event or aggregate type is longer than the outbox takes ({TYPE_MAX}): discard it"
        ));
    }
    Ok(Origin::Letter {
        aggregate_type: letter.aggregate_type.clone(),
        aggregate_id,
        event_type: letter.event_type.clone(),
        payload: payload.clone(),
    })
}

/// The dead letter of a Kafka record that did not decode keeps the record
/// itself as its payload (`source::kafka::record`): not an event's payload.
fn raw_record(payload: &Value) -> bool {
    payload.get("source").and_then(Value::as_str) == Some("kafka")
        && payload.get("topic").is_some()
        && payload.get("offset").is_some()
}

/// Longest one try waits for the outbox's lock. Short, because the write
/// side's new transactions queue behind a waiting lock request: a long
/// write transaction in flight makes the re-emission try again later
/// rather than hold the write side up.
pub const LOCK_TRY: Duration = Duration::from_millis(500);

/// Why a re-emission failed: the outbox stayed locked, or PostgreSQL failed.
#[derive(Debug, thiserror::Error)]
pub enum ReemitError {
    #[error(
        "the outbox stayed locked by other transactions for {0:?} (--wait): \
         nothing of this aggregate was re-emitted; run the command again"
    )]
    Locked(Duration),
    #[error(transparent)]
    Outbox(#[from] OutboxError),
}

/// Inserts the group's rows in one transaction (see the module doc); each
/// letter's row, inserted now or found from an earlier run. `Locked` when
/// the outbox's lock was not had within `lock_wait` (nothing done).
pub async fn insert_group(
    client: &mut Client,
    group: &Group,
    lock_wait: Duration,
) -> Result<Vec<Emitted>, ReemitError> {
    let failed = |context| move |e| OutboxError::query(context, e);
    let locked = |e: tokio_postgres::Error| {
        if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) {
            ReemitError::Locked(lock_wait)
        } else {
            OutboxError::query("cannot lock the outbox to re-emit events", e).into()
        }
    };
    let tx = client
        .transaction()
        .await
        .map_err(failed("cannot begin a transaction"))?;
    let millis = lock_wait.as_millis().max(1);
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = '{millis}ms'; \
         LOCK TABLE event_outbox IN SHARE ROW EXCLUSIVE MODE"
    ))
    .await
    .map_err(locked)?;
    let mut emitted = Vec::with_capacity(group.items.len());
    for item in &group.items {
        emitted.push(insert_one(&tx, item).await?);
    }
    tx.commit()
        .await
        .map_err(failed("cannot commit the re-emitted events"))?;
    Ok(emitted)
}

async fn insert_one(
    tx: &tokio_postgres::Transaction<'_>,
    item: &Planned,
) -> Result<Emitted, OutboxError> {
    let id = item.new_event_id;
    let inserted = match &item.origin {
        Origin::Row(original) => tx
            .query_opt(
                "INSERT INTO event_outbox (event_id, aggregate_id, aggregate_type, event_type, payload) \
                 SELECT $1, aggregate_id, aggregate_type, event_type, payload \
                 FROM event_outbox WHERE event_id = $2 \
                 ON CONFLICT (event_id) DO NOTHING RETURNING sequence_id",
                &[&id, original],
            )
            .await,
        Origin::Letter {
            aggregate_type,
            aggregate_id,
            event_type,
            payload,
        } => tx
            .query_opt(
                "INSERT INTO event_outbox (event_id, aggregate_id, aggregate_type, event_type, payload) \
                 VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (event_id) DO NOTHING RETURNING sequence_id",
                &[&id, aggregate_id, aggregate_type, event_type, &Json(payload)],
            )
            .await,
    }
    .map_err(|e| OutboxError::query("cannot insert a re-emitted event", e))?;
    if let Some(row) = inserted {
        return Ok(Emitted {
            event_id: id,
            sequence_id: Some(row.get(0)),
            fresh: true,
        });
    }
    let existing = tx
        .query_opt(
            "SELECT sequence_id FROM event_outbox WHERE event_id = $1",
            &[&id],
        )
        .await
        .map_err(|e| OutboxError::query("cannot read a re-emitted event", e))?;
    Ok(Emitted {
        event_id: id,
        sequence_id: existing.map(|row| row.get(0)),
        fresh: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::doc;

    fn letter(document: mongodb::bson::Document) -> Letter {
        Letter::from_document(document)
    }

    #[test]
    fn the_new_id_is_the_same_for_every_run_and_differs_per_letter() {
        let a = new_event_id("0192f4b7-1c3d-7e4f-9a50-3b6c7d8e9f10");
        assert_eq!(a, new_event_id("0192f4b7-1c3d-7e4f-9a50-3b6c7d8e9f10"));
        assert_ne!(a, new_event_id("0192f4b7-1c3d-7e4f-9a50-3b6c7d8e9f11"));
        assert_eq!(a.get_version_num(), 8);
    }

    #[test]
    fn a_letter_without_its_row_is_re_emitted_only_when_it_is_a_whole_event() {
        let aggregate = Uuid::new_v4().to_string();
        let whole = letter(doc! {
            "_id": "x", "aggregate_type": "User", "aggregate_id": &aggregate,
            "event_type": "UserUpdated", "payload": { "displayName": "A" },
        });
        assert!(matches!(from_letter(&whole), Ok(Origin::Letter { .. })));
        let bounded = letter(doc! {
            "_id": "x", "aggregate_type": "User", "aggregate_id": &aggregate,
            "event_type": "UserUpdated", "payload_prefix": "{",
        });
        assert!(from_letter(&bounded).is_err_and(|why| why.contains("too large")));
        let raw = letter(doc! {
            "_id": "x", "aggregate_type": "", "aggregate_id": Uuid::nil().to_string(),
            "event_type": "", "payload": { "source": "kafka", "topic": "t", "offset": 3 },
        });
        assert!(from_letter(&raw).is_err_and(|why| why.contains("did not decode")));
        let nil = letter(doc! {
            "_id": "x", "aggregate_type": "User", "aggregate_id": Uuid::nil().to_string(),
            "event_type": "UserUpdated", "payload": {},
        });
        assert!(from_letter(&nil).is_err_and(|why| why.contains("no aggregate")));
    }
}
