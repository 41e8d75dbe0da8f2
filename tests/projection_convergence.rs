//! The guarantee the product is sold on: whatever the batching, duplicates,
//! redelivery, replays or interleaving across aggregates, the read models in a
//! real MongoDB-wire server equal the reference fold of docs/design.md section 4.

mod common;

use activity_event_history::{generate, HistoryOptions};
use activity_event_processor::decode::OutboxEvent;
use activity_event_processor::projection::fold::ReferenceFold;
use activity_event_processor::projection::Projector;
use common::mongo::TestMongo;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::collections::BTreeMap;
use uuid::Uuid;

/// A delivery order a real source may produce: aggregates interleaved
/// differently from `sequence_id` (late commits), each aggregate in order.
fn interleave(events: &[OutboxEvent], rng: &mut StdRng) -> Vec<OutboxEvent> {
    let mut keyed: Vec<(i64, &OutboxEvent)> = events
        .iter()
        .map(|e| (e.sequence_id.unwrap_or(0) + rng.gen_range(0..12), e))
        .collect();
    keyed.sort_by_key(|(k, _)| *k);
    // Each aggregate's slots, refilled with its events in sequence order.
    let mut per_aggregate: BTreeMap<Uuid, Vec<&OutboxEvent>> = BTreeMap::new();
    for e in events {
        per_aggregate.entry(e.aggregate_id).or_default().push(e);
    }
    let mut cursors: BTreeMap<Uuid, usize> = BTreeMap::new();
    keyed
        .iter()
        .map(|(_, e)| {
            let cursor = cursors.entry(e.aggregate_id).or_insert(0);
            let next = per_aggregate[&e.aggregate_id][*cursor];
            *cursor += 1;
            next.clone()
        })
        .collect()
}

/// Cuts a delivery into batches, with duplicates inside batches and replays of
/// earlier stretches (as after a crash before the acknowledgement).
fn batches(delivery: &[OutboxEvent], rng: &mut StdRng, max_batch: usize) -> Vec<Vec<OutboxEvent>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < delivery.len() {
        let size = rng.gen_range(1..=max_batch).min(delivery.len() - at);
        let mut batch: Vec<OutboxEvent> = delivery[at..at + size].to_vec();
        if rng.gen_bool(0.3) {
            let dup = batch[rng.gen_range(0..batch.len())].clone();
            let pos = rng.gen_range(0..=batch.len());
            // A duplicate goes after its original, never before it.
            let original = batch
                .iter()
                .position(|e| e.event_id == dup.event_id)
                .unwrap_or(0);
            batch.insert(pos.max(original + 1), dup);
        }
        out.push(batch);
        if rng.gen_bool(0.25) && at > 0 {
            let from = rng.gen_range(0..at);
            out.push(delivery[from..at + size].to_vec());
        }
        at += size;
    }
    out
}

/// A history over a few aggregates, with poison, unknown types and chaos.
fn small_history(seed: u64, events: usize) -> Vec<OutboxEvent> {
    let mut options = HistoryOptions::realistic(events);
    options.users = 2 + (seed % 4) as usize;
    options.activities = 1 + (seed % 3) as usize;
    options.poison_per_mille = 40;
    options.unknown_per_mille = 30;
    options.chaos_per_mille = 300;
    generate(seed, &options)
}

async fn project_and_compare(seed: u64, events: usize, max_batch: usize) {
    let history = small_history(seed, events);
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let delivery = interleave(&history, &mut rng);
    let mongo = TestMongo::create().await;
    // Half the cases with a document cache, of any size down to one.
    let capacity = if seed.is_multiple_of(2) {
        0
    } else {
        1 + (seed / 2 % 50) as usize
    };
    // Reads cut into chunks of a few ids in three cases of four, so that a
    // document matching ids of two chunks (an array field) is met.
    let chunk = [1, 2, 3, 64][(seed >> 8) as usize % 4];
    let store = mongo.store.clone().with_read_chunk(chunk);
    let projector = Projector::new(store).cached(capacity);
    for batch in batches(&delivery, &mut rng, max_batch) {
        projector.apply(&batch).await.expect("batch applies");
    }
    // Alone, a writer never races: what it cached is what the server holds.
    assert_eq!(
        projector.conflicts(),
        0,
        "conflicts (seed {seed}, cache {capacity}, read chunk {chunk})"
    );
    let expected = ReferenceFold::of(&history).read_models();
    let actual = mongo.read_models().await;
    mongo.drop().await;
    assert_eq!(
        actual.dead_letters, expected.dead_letters,
        "dead letters (seed {seed})"
    );
    assert_eq!(
        actual.activities, expected.activities,
        "activities (seed {seed})"
    );
    assert_eq!(actual.users, expected.users, "users (seed {seed})");
}

/// Applies `batches` in order, each until it is durable: a batch that keeps
/// losing races to the other writer fails transiently and is applied again,
/// as the runtime does.
async fn apply_all(projector: &Projector, batches: &[Vec<OutboxEvent>]) {
    for batch in batches {
        let mut tries = 0;
        while let Err(err) = projector.apply(batch).await {
            tries += 1;
            assert!(tries < 50, "a batch never applied: {err}");
        }
    }
}

/// Two cached writers apply the same delivery, cut into batches their own
/// way, at the same time on the same documents (two instances, or a replay
/// racing the live stream): their caches go stale under each other, and the
/// fenced writes must still make the read models the fold.
async fn two_cached_writers_race(seed: u64, events: usize, max_batch: usize, capacity: usize) {
    let history = small_history(seed, events);
    let mut rng = StdRng::seed_from_u64(seed ^ 0xcac4e);
    let delivery = interleave(&history, &mut rng);
    let first = batches(&delivery, &mut rng, max_batch);
    let second = batches(&delivery, &mut rng, max_batch);
    let mongo = TestMongo::create().await;
    let a = Projector::new(mongo.store.clone()).cached(capacity);
    let b = Projector::new(mongo.store.clone()).cached(capacity.max(2) / 2);
    tokio::join!(apply_all(&a, &first), apply_all(&b, &second));
    // Both still hold documents: a last stretch through each cache.
    let tail = delivery[delivery.len().saturating_sub(5)..].to_vec();
    apply_all(&a, std::slice::from_ref(&tail)).await;
    apply_all(&b, std::slice::from_ref(&tail)).await;
    let expected = ReferenceFold::of(&history).read_models();
    let actual = mongo.read_models().await;
    mongo.drop().await;
    assert_eq!(
        actual.activities, expected.activities,
        "activities (seed {seed})"
    );
    assert_eq!(actual.users, expected.users, "users (seed {seed})");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn generated_histories_converge_to_the_fold(seed in any::<u64>(), events in 1usize..60, max_batch in 1usize..25) {
        runtime().block_on(project_and_compare(seed, events, max_batch));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn two_cached_writers_racing_converge_to_the_fold(
        seed in any::<u64>(),
        events in 1usize..60,
        max_batch in 1usize..25,
        capacity in 1usize..40,
    ) {
        runtime().block_on(two_cached_writers_race(seed, events, max_batch, capacity));
    }
}

#[tokio::test]
async fn a_long_history_in_large_batches_converges() {
    project_and_compare(42, 2_000, 500).await;
}

fn event(
    seq: i64,
    aggregate: Uuid,
    kind: &str,
    event_type: &str,
    payload: serde_json::Value,
) -> OutboxEvent {
    OutboxEvent {
        event_id: Uuid::new_v4(),
        sequence_id: Some(seq),
        aggregate_id: aggregate,
        aggregate_type: kind.into(),
        event_type: event_type.into(),
        payload: payload.into(),
        created_at: chrono::DateTime::from_timestamp(1_790_000_000 + seq, 0),
    }
}

#[tokio::test]
async fn poison_is_dead_lettered_and_the_events_after_it_apply() {
    let mongo = TestMongo::create().await;
    let projector = Projector::new(mongo.store.clone());
    let user = Uuid::new_v4();
    let events = vec![
        event(
            1,
            user,
            "User",
            "UserCreated",
            json!({"email": "a@x", "displayName": "A"}),
        ),
        event(2, user, "User", "UserUpdated", json!({"displayName": 42})),
        event(3, user, "User", "UserUpdated", json!({"displayName": "B"})),
    ];
    let report = projector.apply(&events).await.expect("applies");
    assert_eq!(report.applied, 2);
    assert_eq!(report.dead_letters.len(), 1);
    let models = mongo.read_models().await;
    assert_eq!(models.users[&user.to_string()]["display_name"], "B");
    let letters = mongo
        .store
        .find("dead_letters", mongodb::bson::doc! {}, None)
        .await
        .expect("read");
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(
        letter.get_str("_id").ok(),
        Some(events[1].event_id.to_string().as_str())
    );
    assert_eq!(letter.get_i64("sequence_id").ok(), Some(2));
    assert_eq!(letter.get_str("event_type").ok(), Some("UserUpdated"));
    assert_eq!(
        letter.get_str("error").ok(),
        Some("payload field `displayName` has the wrong type: expected a string")
    );
    assert!(letter.get_datetime("first_failed_at").is_ok());
    assert!(letter.get_datetime("last_failed_at").is_ok());
    assert_eq!(
        letter
            .get_document("payload")
            .ok()
            .and_then(|p| p.get_i32("displayName").ok()),
        Some(42)
    );
    // Applying the same batch again changes nothing and writes nothing new.
    let again = projector.apply(&events).await.expect("applies");
    assert_eq!(again.applied, 0);
    assert_eq!(again.duplicates, 2);
    assert_eq!(mongo.read_models().await, models);
    mongo.drop().await;
}

#[tokio::test]
async fn rename_reaches_every_activity_and_entry() {
    let mongo = TestMongo::create().await;
    let projector = Projector::new(mongo.store.clone());
    let (u, a, b) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let t = "2026-10-01T18:00:00Z";
    let history = vec![
        event(
            1,
            a,
            "Activity",
            "ActivityCreated",
            json!({"organizerId": u, "title": "A", "startsAt": t, "maxParticipants": 2}),
        ),
        event(
            2,
            b,
            "Activity",
            "ActivityCreated",
            json!({"organizerId": Uuid::new_v4(), "title": "B", "startsAt": t, "maxParticipants": 1}),
        ),
        event(
            3,
            b,
            "Activity",
            "ParticipantJoined",
            json!({"userId": u, "joinedAt": t}),
        ),
        event(
            4,
            u,
            "User",
            "UserCreated",
            json!({"email": "u@x", "displayName": "Old"}),
        ),
    ];
    projector.apply(&history[..3]).await.expect("first");
    projector.apply(&history[3..]).await.expect("second");
    let rename = event(5, u, "User", "UserUpdated", json!({"displayName": "New"}));
    projector
        .apply(std::slice::from_ref(&rename))
        .await
        .expect("rename");
    let models = mongo.read_models().await;
    assert_eq!(
        models.activities[&a.to_string()]["organizer"]["display_name"],
        "New"
    );
    assert_eq!(
        models.activities[&b.to_string()]["participants"][0]["display_name"],
        "New"
    );
    assert_eq!(models.activities[&b.to_string()]["status"], "full");
    let entries = models.users[&u.to_string()]["activities"]
        .as_array()
        .expect("array")
        .clone();
    assert_eq!(entries.len(), 2, "{entries:?}");
    let mut all = history.clone();
    all.push(rename);
    assert_eq!(models, ReferenceFold::of(&all).read_models());
    mongo.drop().await;
}

/// Writer B holds activity X (member U's name copy "Old") in its cache;
/// writer A renames U and its refresh moves X's copy to "New" without moving
/// X's `_seq`; then B applies a join of another user to X from its cached
/// copy. B's write is fenced on X's `_rev` as well as its `_seq`, so it must
/// lose the race and redo from a fresh read instead of putting "Old" back
/// (B's refresh reads only the joining user, not U).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_activity_never_puts_back_a_copy_another_writer_refreshed() {
    let mongo = TestMongo::create().await;
    let a = Projector::new(mongo.store.clone());
    let b = Projector::new(mongo.store.clone()).cached(100);
    let (u, w, x) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let t = "2026-10-01T18:00:00Z";
    let created = |seq, id, name: &str| {
        event(
            seq,
            id,
            "User",
            "UserCreated",
            json!({"email": format!("{name}@x"), "displayName": name}),
        )
    };
    let history = vec![
        created(1, u, "Old"),
        created(2, w, "W"),
        event(
            3,
            x,
            "Activity",
            "ActivityCreated",
            json!({"organizerId": Uuid::new_v4(), "title": "X", "startsAt": t, "maxParticipants": 5}),
        ),
        event(
            4,
            x,
            "Activity",
            "ParticipantJoined",
            json!({"userId": u, "joinedAt": t}),
        ),
        event(5, u, "User", "UserUpdated", json!({"displayName": "New"})),
        event(
            6,
            x,
            "Activity",
            "ParticipantJoined",
            json!({"userId": w, "joinedAt": t}),
        ),
    ];
    b.apply(&history[..4])
        .await
        .expect("B: the users, X and U's join");
    a.apply(&history[4..5]).await.expect("A: U's rename");
    b.apply(&history[5..])
        .await
        .expect("B: W's join, from its cache");
    let models = mongo.read_models().await;
    let participants = &models.activities[&x.to_string()]["participants"];
    let of_u = participants
        .as_array()
        .and_then(|all| all.iter().find(|p| p["user_id"] == u.to_string()))
        .unwrap_or_else(|| panic!("U is not a participant: {participants}"));
    assert_eq!(of_u["display_name"], "New", "{participants}");
    assert_eq!(models, ReferenceFold::of(&history).read_models());
    assert_eq!(b.conflicts(), 1, "B's cached write must have lost the race");
    mongo.drop().await;
}
