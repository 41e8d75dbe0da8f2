//! The logical replication source against the real PostgreSQL that
//! `scripts/services.sh` starts (wal_level=logical): snapshot and stream with
//! no gap and no duplicate, late commits, resume, the slot never ahead of our
//! acknowledgements, a crash of the server, `caught_up`.
//!
//! Each test has its own database and its own slot (slots are cluster-wide),
//! dropped at the end. The crash test restarts the server, so it takes
//! [`SERVER`] exclusively and every other test holds it shared.

mod common;

use activity_event_processor::source::Source;
use common::replication::*;
use common::TestDb;
use std::time::Duration;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[tokio::test]
async fn snapshot_then_stream_under_a_concurrent_writer_delivers_every_row_once() {
    let _shared = SERVER.read().await;
    let db = TestDb::migrated().await;
    let slot = SlotGuard::new(&db);
    let writer_client = db.client().await;
    insert(&writer_client, 2_500).await;
    // A writer that keeps committing while the slot is made and the snapshot read.
    let writer = tokio::spawn(async move {
        for i in 0..60 {
            insert(&writer_client, 1 + i % 40).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        writer_client
    });
    let mut source = start(&db, &slot, None).await;
    let mut seen = Seen::default();
    let snapshot = read_snapshot(&mut source, 1_000, Ack::Each).await;
    snapshot.iter().for_each(|batch| seen.record(batch));
    let from_snapshot = seen.counts.len();
    assert!(snapshot.len() >= 3);
    assert!(snapshot[..snapshot.len() - 1]
        .iter()
        .all(|b| lsn(&b.ack) == 0));

    let writer_client = writer.await.expect("writer");
    let expected = all_ids(&writer_client).await;
    drain(&mut source, &mut seen, &expected).await;
    // A little longer: nothing more may come.
    for _ in 0..5 {
        if let Some(batch) = next(&mut source, 1_000).await.expect("next") {
            seen.record(&batch);
            ack(&mut source, &batch.ack).await;
        }
    }
    assert_eq!(
        seen.counts.len(),
        expected.len(),
        "rows that are not in the outbox"
    );
    assert_eq!(seen.duplicates(), 0, "no restart: every row exactly once");
    eprintln!(
        "{} rows: {from_snapshot} from the snapshot, {} streamed",
        expected.len(),
        expected.len() - from_snapshot
    );
    assert!(from_snapshot >= 2_500 && from_snapshot < expected.len());
}

#[tokio::test]
async fn a_row_that_commits_late_still_arrives() {
    let _shared = SERVER.read().await;
    let db = TestDb::migrated().await;
    let slot = SlotGuard::new(&db);
    let mut source = start(&db, &slot, None).await;
    // An empty outbox: one empty batch with the consistent point.
    let snapshot = read_snapshot(&mut source, 100, Ack::Each).await;
    assert_eq!(snapshot.len(), 1);
    assert!(snapshot[0].events.is_empty());

    let late = db.client().await;
    late.batch_execute("BEGIN").await.expect("begin");
    let late_id = insert(&late, 1).await;
    let others = db.client().await;
    let early_ids = insert_singly(&others, 3).await;
    let mut seen = Seen::default();
    drain(&mut source, &mut seen, &early_ids).await;
    assert!(!seen.has_all(&late_id), "an uncommitted row cannot arrive");
    late.batch_execute("COMMIT").await.expect("commit");
    drain(&mut source, &mut seen, &late_id).await;

    let sequences = others
        .query(
            "SELECT event_id, sequence_id FROM event_outbox ORDER BY sequence_id",
            &[],
        )
        .await
        .expect("sequences");
    let first: Uuid = sequences[0].get(0);
    assert_eq!(first, late_id[0], "the late row has the lowest sequence_id");
}

/// A batch read on while the sink applies the one before holds every row
/// that commits until the sink is free, though the pauses between them are
/// far longer than the quiet that ends a batch otherwise; once the sink is
/// free, it ends with what is there.
#[tokio::test]
async fn a_batch_read_on_holds_what_commits_until_the_sink_is_free() {
    let _shared = SERVER.read().await;
    let db = TestDb::migrated().await;
    let slot = SlotGuard::new(&db);
    let mut source = start(&db, &slot, None).await;
    let snapshot = read_snapshot(&mut source, 100, Ack::Each).await;
    assert!(snapshot.iter().all(|batch| batch.events.is_empty()));

    let client = db.client().await;
    let applied = CancellationToken::new();
    let writer = async {
        let mut ids = Vec::new();
        for _ in 0..3 {
            ids.extend(insert(&client, 1).await);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Time for the last commit to reach the stream, then the sink is free.
        tokio::time::sleep(Duration::from_millis(500)).await;
        applied.cancel();
        ids
    };
    let reading = source.next_batch_reading_on(1_000, Duration::from_secs(10), &applied);
    let (batch, ids) = tokio::join!(timeout(PATIENCE, reading), writer);
    let batch = batch
        .expect("the batch ends once the sink is free")
        .expect("read")
        .expect("a batch");
    let read: Vec<Uuid> = batch.events.iter().map(|event| event.event_id).collect();
    assert_eq!(read, ids, "the three commits, in one batch");
    ack(&mut source, &batch.ack).await;
}

#[tokio::test]
async fn resume_redelivers_nothing_acknowledged_and_loses_nothing_unacknowledged() {
    let _shared = SERVER.read().await;
    let db = TestDb::migrated().await;
    let slot = SlotGuard::new(&db);
    let client = db.client().await;
    let before = insert(&client, 50).await;
    let mut source = start(&db, &slot, None).await;
    let mut seen = Seen::default();
    drain(&mut source, &mut seen, &before).await;

    // One row per transaction, so that every batch ends at a commit.
    let streamed = insert_singly(&client, 120).await;
    let held = read_until(&mut source, &mut seen, &streamed, 7, Ack::Hold)
        .await
        .held;
    let mut acked = 0;
    let mut acked_ids = Vec::new();
    let mut unacked_ids = Vec::new();
    for batch in &held {
        let ids = batch.events.iter().map(|e| e.event_id);
        if acked_ids.len() < 60 {
            acked_ids.extend(ids);
            ack(&mut source, &batch.ack).await;
            acked = lsn(&batch.ack);
        } else {
            unacked_ids.extend(ids);
        }
    }
    drop(source);
    let after = insert_singly(&client, 10).await;

    let mut source = start(&db, &slot, Some(acked)).await;
    let mut again = Seen::default();
    let wanted: Vec<Uuid> = unacked_ids.iter().chain(&after).copied().collect();
    drain(&mut source, &mut again, &wanted).await;
    let redelivered = acked_ids
        .iter()
        .filter(|id| again.counts.contains_key(id))
        .count();
    assert_eq!(redelivered, 0, "acknowledged rows came again");
    assert!(!again.counts.keys().any(|id| before.contains(id)));
    drop(source);

    // A position older than the slot's (say, a checkpoint restored from
    // before the slot was made again): streaming could skip rows, so every
    // row comes again from a snapshot taken at the slot's position.
    let all = all_ids(&client).await;
    let mut source = start(&db, &slot, Some(1)).await;
    drain(&mut source, &mut Seen::default(), &all).await;
    drop(source);
    // No position at all: the same.
    let mut source = start(&db, &slot, None).await;
    let mut fresh = Seen::default();
    drain(&mut source, &mut fresh, &all).await;
    assert_eq!(fresh.duplicates(), 0);
}

#[tokio::test]
async fn a_transaction_larger_than_a_batch_is_split_and_only_its_end_carries_its_commit() {
    let _shared = SERVER.read().await;
    let db = TestDb::migrated().await;
    let slot = SlotGuard::new(&db);
    let client = db.client().await;
    let mut source = start(&db, &slot, None).await;
    let mut seen = Seen::default();
    let first = insert(&client, 1).await;
    let previous = drain(&mut source, &mut seen, &first).await;

    let big = insert(&client, 2_500).await;
    let parts = read_until(&mut source, &mut seen, &big, 1_000, Ack::Each)
        .await
        .parts;
    assert_eq!(seen.duplicates(), 0);
    assert_eq!(
        parts,
        [(1_000, previous), (1_000, previous), (500, parts[2].1)],
        "only the last part carries the big transaction's commit"
    );
    assert!(parts[2].1 > previous);
}

#[tokio::test]
async fn the_slot_never_confirms_past_what_was_acknowledged() {
    let _shared = SERVER.read().await;
    let db = TestDb::migrated().await;
    let slot = SlotGuard::new(&db);
    let client = db.client().await;
    let mut source = start(&db, &slot, None).await;
    let snapshot = read_snapshot(&mut source, 100, Ack::Each).await;
    let mut acked = lsn(&snapshot[0].ack);
    wait_confirmed(&mut source, &client, &slot.name, acked).await;

    let ids = insert_singly(&client, 40).await;
    let held = read_until(&mut source, &mut Seen::default(), &ids, 5, Ack::Hold)
        .await
        .held;
    for batch in std::iter::once(None).chain(held.iter().map(Some)) {
        if let Some(batch) = batch {
            ack(&mut source, &batch.ack).await;
            acked = lsn(&batch.ack);
        }
        for _ in 0..3 {
            source.idle().await.expect("idle feedback");
            let confirmed = confirmed_flush(&client, &slot.name).await;
            assert!(
                confirmed <= acked,
                "slot confirmed {confirmed:X} > acknowledged {acked:X}"
            );
        }
    }
    // And it does follow: the server may release what we hold durably.
    wait_confirmed(&mut source, &client, &slot.name, acked).await;
}

#[tokio::test]
async fn caught_up_only_once_everything_before_start_is_acknowledged() {
    let _shared = SERVER.read().await;
    let db = TestDb::migrated().await;
    let slot = SlotGuard::new(&db);
    let client = db.client().await;
    insert(&client, 30).await;
    let mut source = start(&db, &slot, None).await;
    assert!(
        !source.caught_up().await.expect("caught_up"),
        "before the snapshot"
    );
    let snapshot = read_snapshot(&mut source, 10, Ack::Hold).await;
    assert!(snapshot.len() >= 3);
    for (i, batch) in snapshot.iter().enumerate() {
        assert!(
            !source.caught_up().await.expect("caught_up"),
            "snapshot batch {i} unacknowledged"
        );
        ack(&mut source, &batch.ack).await;
    }
    let resume = lsn(&snapshot[snapshot.len() - 1].ack);
    let resume = resume.max(wait_caught_up(&mut source).await);
    drop(source);

    // Resumed: rows committed before start are streamed, not snapshotted.
    let streamed = insert_singly(&client, 12).await;
    let mut source = start(&db, &slot, Some(resume)).await;
    let held = read_until(&mut source, &mut Seen::default(), &streamed, 4, Ack::Hold)
        .await
        .held;
    assert!(held.iter().all(|b| lsn(&b.ack) > resume), "streamed");
    assert!(
        !source.caught_up().await.expect("caught_up"),
        "delivered but not acknowledged"
    );
    for (i, batch) in held.iter().enumerate() {
        assert!(
            !source.caught_up().await.expect("caught_up"),
            "batch {i} unacknowledged"
        );
        ack(&mut source, &batch.ack).await;
    }
    wait_caught_up(&mut source).await;
}

#[tokio::test]
async fn other_tables_wal_moves_the_slot_while_no_outbox_events_come() {
    let _shared = SERVER.read().await;
    let db = TestDb::migrated().await;
    let slot = SlotGuard::new(&db);
    let client = db.client().await;
    let mut source = start(&db, &slot, None).await;
    let snapshot = read_snapshot(&mut source, 100, Ack::Each).await;
    client
        .batch_execute(
            "CREATE TABLE noise (x int); INSERT INTO noise SELECT generate_series(1, 10000)",
        )
        .await
        .expect("write other WAL");
    // An empty batch hands out the position (at most every 10 s).
    let deadline = Instant::now() + PATIENCE;
    let position = loop {
        assert!(Instant::now() < deadline, "the position never moved");
        if let Some(batch) = next(&mut source, 100).await.expect("next") {
            assert!(batch.events.is_empty(), "{:?}", batch.events);
            ack(&mut source, &batch.ack).await;
            break lsn(&batch.ack);
        }
        source.idle().await.expect("idle");
    };
    assert!(position > lsn(&snapshot[0].ack));
    wait_confirmed(&mut source, &client, &slot.name, position).await;
}
