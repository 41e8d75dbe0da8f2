//! Dead letters in `dead_letters`, keyed by event id (writing one again
//! updates it). A letter keeps the event (id, sequence id, aggregate, type,
//! payload), the error, the attempts and the first and last failure times.
//!
//! A payload too large to store whole (its text over [`FULL_PAYLOAD_MAX`], or
//! any letter the server refuses) is kept in a **bounded form**: instead of
//! `payload`, its first [`PREFIX_MAX`] bytes as text (`payload_prefix`), its
//! size in bytes (`payload_bytes`) and its SHA-256 (`payload_sha256`, hex). The
//! text is the payload itself when it is a string (the raw text of a record
//! that did not decode), else its compact JSON.

use super::{state, BatchReport, DeadLetter, Projector};
use crate::decode::{OutboxEvent, Payload};
use crate::store::codes::{shorten, write_error};
use crate::store::mongo::{StoreError, DEAD_LETTERS};
use chrono::Utc;
use mongodb::bson::{doc, Bson, Document};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::borrow::Cow;

/// Payload text beyond which a letter is written in the bounded form (well
/// under the 16 MiB document limit: BSON can be larger than the JSON text).
pub const FULL_PAYLOAD_MAX: usize = 8 * 1024 * 1024;

/// How much of the payload's text (and of a long error) the bounded form keeps.
pub const PREFIX_MAX: usize = 64 * 1024;

/// Longest event type or aggregate type the bounded form keeps.
const NAME_MAX: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    Full,
    Bounded,
}

/// The text a payload's size and hash are taken of: its compact JSON; a
/// string payload (the raw text of an undecodable row) is its own text, and
/// one too deep to parse is taken as delivered.
fn payload_text(payload: &Payload) -> Cow<'_, str> {
    match payload.value() {
        Some(Cow::Borrowed(Value::String(text))) => Cow::Borrowed(text),
        Some(Cow::Owned(Value::String(text))) => Cow::Owned(text),
        Some(value) => Cow::Owned(value.to_string()),
        None => payload.text(),
    }
}

fn natural_form(letter: &DeadLetter) -> Form {
    if payload_text(&letter.event.payload).len() > FULL_PAYLOAD_MAX {
        Form::Bounded
    } else {
        Form::Full
    }
}

/// The upsert statement of `letter` in `form`; each form removes the other's fields.
fn statement(letter: &DeadLetter, form: Form, now: &Bson) -> Document {
    let e = &letter.event;
    let mut set = doc! {
        "sequence_id": e.sequence_id.map_or(Bson::Null, Bson::Int64),
        "aggregate_id": e.aggregate_id.to_string(),
        "attempts": i64::from(letter.attempts),
        "last_failed_at": now.clone(),
    };
    let unset = match form {
        Form::Full => {
            set.insert("aggregate_type", &e.aggregate_type);
            set.insert("event_type", &e.event_type);
            set.insert("payload", state::json_to_bson(&e.payload.to_json()));
            set.insert("error", &letter.error);
            doc! { "payload_prefix": "", "payload_bytes": "", "payload_sha256": "" }
        }
        Form::Bounded => {
            let text = payload_text(&e.payload);
            set.insert("aggregate_type", shorten(&e.aggregate_type, NAME_MAX));
            set.insert("event_type", shorten(&e.event_type, NAME_MAX));
            set.insert("payload_prefix", prefix(&text, PREFIX_MAX));
            set.insert(
                "payload_bytes",
                i64::try_from(text.len()).unwrap_or(i64::MAX),
            );
            set.insert(
                "payload_sha256",
                format!("{:x}", Sha256::digest(text.as_bytes())),
            );
            set.insert("error", shorten(&letter.error, PREFIX_MAX));
            doc! { "payload": "" }
        }
    };
    doc! {
        "q": { "_id": e.event_id.to_string() },
        "u": { "$set": set, "$unset": unset, "$setOnInsert": { "first_failed_at": now.clone() } },
        "upsert": true,
    }
}

/// The first at most `max` bytes of `text`, cut at a character boundary.
fn prefix(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn now() -> Bson {
    Bson::DateTime(mongodb::bson::DateTime::from_millis(
        Utc::now().timestamp_millis(),
    ))
}

impl Projector {
    /// Records dead letters (idempotent: keyed by event id). A letter the
    /// server refuses is written alone again, in the bounded form; one it
    /// refuses even so stops the process (no event can be blamed for that).
    pub async fn write_dead_letters(
        &self,
        letters: &[DeadLetter],
        round_trips: &mut u32,
    ) -> Result<usize, StoreError> {
        if letters.is_empty() {
            return Ok(0);
        }
        let now = now();
        let statements = letters
            .iter()
            .map(|letter| statement(letter, natural_form(letter), &now))
            .collect();
        *round_trips += 1;
        let mut again = 0;
        let refused: Vec<(&DeadLetter, Form)> =
            match self.store.update(DEAD_LETTERS, statements, false).await {
                Ok(result) => {
                    again = usize::try_from(result.matched).unwrap_or(usize::MAX);
                    let mut refused = Vec::new();
                    for err in &result.errors {
                        match write_error(DEAD_LETTERS, err.code, &err.message) {
                            StoreError::Refused(_) => {
                                if let Some(letter) = letters.get(err.index) {
                                    refused.push((letter, Form::Bounded));
                                }
                            }
                            other => return Err(other),
                        }
                    }
                    refused
                }
                // Which letter is at fault is unknown: each is written alone.
                Err(StoreError::Refused(_)) if letters.len() > 1 => letters
                    .iter()
                    .map(|letter| (letter, natural_form(letter)))
                    .collect(),
                Err(StoreError::Refused(_)) => vec![(&letters[0], Form::Bounded)],
                Err(err) => return Err(err),
            };
        for (letter, form) in refused {
            again += self.write_alone(letter, form, &now, round_trips).await?;
        }
        Ok(again)
    }

    /// Counts the replayed events (already seen: fenced off), and reports
    /// again as dead letters those that were dead-lettered before: a crash
    /// may have come before their outbox rows were marked `failed`, and a
    /// later event of their batch then fences the redelivered copy off. Not
    /// with `dead_letter_races` off, where the source keeps its own record
    /// of deferred events (a provisional dead letter a retry may withdraw).
    pub(super) async fn recall_dead_letters(
        &self,
        replayed: &[&OutboxEvent],
        report: &mut BatchReport,
    ) -> Result<(), StoreError> {
        report.duplicates += replayed.len();
        if replayed.is_empty() || !self.dead_letter_races {
            return Ok(());
        }
        let ids = replayed.iter().map(|e| e.event_id.to_string()).collect();
        let found = self
            .store
            .find_by_ids(DEAD_LETTERS, ids, Some(doc! { "error": 1, "attempts": 1 }))
            .await?;
        report.round_trips += 1;
        for event in replayed {
            let id = event.event_id.to_string();
            let Some(letter) = found.iter().find(|d| d.get_str("_id") == Ok(id.as_str())) else {
                continue;
            };
            report.duplicates -= 1;
            report.letters_again += 1;
            report.dead_letters.push(DeadLetter {
                event: (*event).clone(),
                error: letter.get_str("error").unwrap_or_default().to_string(),
                attempts: letter
                    .get_i64("attempts")
                    .ok()
                    .and_then(|n| u32::try_from(n).ok())
                    .unwrap_or(1),
            });
        }
        Ok(())
    }

    /// Writes one letter in `form`, then (refused) in the bounded form; 1 if
    /// it was there already.
    async fn write_alone(
        &self,
        letter: &DeadLetter,
        form: Form,
        now: &Bson,
        round_trips: &mut u32,
    ) -> Result<usize, StoreError> {
        let mut form = form;
        let mut probed = false;
        loop {
            *round_trips += 1;
            let result = self
                .store
                .update(DEAD_LETTERS, vec![statement(letter, form, now)], false)
                .await;
            let refusal = match result {
                Ok(result) => match result.errors.first() {
                    None => return Ok(usize::from(result.matched > 0)),
                    Some(err) => write_error(DEAD_LETTERS, err.code, &err.message),
                },
                Err(err) => err,
            };
            match refusal {
                StoreError::Refused(_) if form == Form::Full => form = Form::Bounded,
                // Even the bounded form refused: if the server takes a write
                // of nothing there, the refusal did not last; try once more.
                StoreError::Refused(_) if !probed => {
                    probed = true;
                    self.store.probe_write(DEAD_LETTERS).await?;
                    *round_trips += 1;
                }
                StoreError::Refused(refusal) => {
                    return Err(StoreError::fatal(format!(
                        "cannot write the dead letter of event {}: {refusal}",
                        letter.event.event_id
                    )))
                }
                other => return Err(other),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::OutboxEvent;
    use serde_json::json;

    fn letter(payload: Value) -> DeadLetter {
        DeadLetter {
            event: OutboxEvent {
                event_id: uuid::Uuid::new_v4(),
                sequence_id: Some(3),
                aggregate_id: uuid::Uuid::new_v4(),
                aggregate_type: "User".into(),
                event_type: "UserCreated".into(),
                payload: payload.into(),
                created_at: None,
            },
            error: "refused".into(),
            attempts: 2,
        }
    }

    #[test]
    fn a_large_payload_is_kept_as_prefix_size_and_hash() {
        let big = letter(json!({ "bio": "é".repeat(FULL_PAYLOAD_MAX / 2 + 1) }));
        assert_eq!(natural_form(&big), Form::Bounded);
        let text = big.event.payload.to_string();
        let doc = statement(&big, Form::Bounded, &now());
        let set = doc
            .get_document("u")
            .and_then(|u| u.get_document("$set"))
            .expect("$set");
        assert!(!set.contains_key("payload"));
        let kept = set.get_str("payload_prefix").expect("prefix");
        assert!(text.starts_with(kept) && kept.len() > PREFIX_MAX - 2 && kept.len() <= PREFIX_MAX);
        assert_eq!(set.get_i64("payload_bytes"), Ok(text.len() as i64));
        let hash = format!("{:x}", Sha256::digest(text.as_bytes()));
        assert_eq!(set.get_str("payload_sha256"), Ok(hash.as_str()));
        assert_eq!(set.get_i64("attempts"), Ok(2));
    }

    #[test]
    fn a_small_payload_is_kept_whole_and_a_string_is_its_own_text() {
        let small = letter(json!({ "a": 1 }));
        assert_eq!(natural_form(&small), Form::Full);
        assert_eq!(payload_text(&json!("raw {").into()), "raw {");
        let doc = statement(&small, Form::Full, &now());
        let u = doc.get_document("u").expect("u");
        assert!(u
            .get_document("$set")
            .is_ok_and(|s| s.contains_key("payload")));
        assert!(u
            .get_document("$unset")
            .is_ok_and(|s| s.contains_key("payload_prefix")));
    }
}
