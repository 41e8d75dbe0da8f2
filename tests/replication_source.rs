//! The logical replication source against the real PostgreSQL that
//! `scripts/services.sh` starts (wal_level=logical): snapshot and stream with
//! no gap and no duplicate, late commits, resume, the slot never ahead of our
//! acknowledgements, a crash of the server, `caught_up`.
//!
//! Each test has its own database and its own slot (slots are cluster-wide),
//! dropped at the end. The crash test restarts the server, so it takes
//! [`SERVER`] exclusively and every other test holds it shared.

mod common;

use activity_event_processor::source::replication::{ReplicationOptions, ReplicationSource};
use activity_event_processor::source::{AckToken, BatchOutcome, Source, SourceBatch, SourceError};
use common::TestDb;
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::RwLock;
use tokio::time::{timeout, Instant};
use tokio_postgres::Client;
use uuid::Uuid;

/// Shared by every test; the server-restart test takes it alone.
static SERVER: RwLock<()> = RwLock::const_new(());

/// The longest any single wait may take.
const PATIENCE: Duration = Duration::from_secs(60);

/// A slot of this test's own, dropped at the end (after the source, before the
/// database: declare it after the database and before the source).
struct SlotGuard {
    name: String,
    db: activity_event_processor::config::PostgresConfig,
}

impl SlotGuard {
    fn new(db: &TestDb) -> SlotGuard {
        SlotGuard {
            name: format!("aep_test_{}", &Uuid::new_v4().simple().to_string()[..12]),
            db: db.config.clone(),
        }
    }

    fn options(&self) -> ReplicationOptions {
        ReplicationOptions {
            slot: self.name.clone(),
            publication: "aep_outbox".to_string(),
        }
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let (db, name) = (self.db.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                // The walsender of a dropped source may take a moment to exit.
                let deadline = Instant::now() + Duration::from_secs(20);
                while Instant::now() < deadline {
                    if let Ok((client, connection)) =
                        db.to_client_config().connect(tokio_postgres::NoTls).await
                    {
                        tokio::spawn(connection);
                        let dropped = client
                            .query(
                                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                                 WHERE slot_name = $1",
                                &[&name],
                            )
                            .await;
                        if dropped.is_ok() {
                            return;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                eprintln!("could not drop replication slot {name}");
            });
        })
        .join();
    }
}

/// Inserts `rows` outbox rows in one transaction; their event ids.
async fn insert(client: &Client, rows: i64) -> Vec<Uuid> {
    client
        .query(
            "INSERT INTO event_outbox (event_id, aggregate_id, aggregate_type, event_type, payload) \
             SELECT gen_random_uuid(), gen_random_uuid(), 'User', 'UserCreated', \
                    jsonb_build_object('email', 'u' || i || '@example.com', 'displayName', 'U ' || i) \
             FROM generate_series(1::bigint, $1::bigint) AS i RETURNING event_id",
            &[&rows],
        )
        .await
        .expect("insert outbox rows")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// `count` rows, each in a transaction of its own.
async fn insert_singly(client: &Client, count: usize) -> Vec<Uuid> {
    let mut ids = Vec::with_capacity(count);
    for _ in 0..count {
        ids.extend(insert(client, 1).await);
    }
    ids
}

async fn all_ids(client: &Client) -> Vec<Uuid> {
    client
        .query("SELECT event_id FROM event_outbox", &[])
        .await
        .expect("read outbox")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

async fn confirmed_flush(client: &Client, slot: &str) -> u64 {
    let row = client
        .query_one(
            "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("read the slot");
    let lsn: Option<tokio_postgres::types::PgLsn> = row.get(0);
    lsn.map(u64::from).unwrap_or(0)
}

/// Starts the source, retrying transient errors (as the caller's backoff
/// would: a dropped source's walsender may hold the slot for a moment).
async fn start(db: &TestDb, slot: &SlotGuard, resume: Option<u64>) -> ReplicationSource {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let started = timeout(
            PATIENCE,
            ReplicationSource::start(&db.config, slot.options(), resume),
        )
        .await
        .expect("start returns in time");
        match started {
            Ok(source) => return source,
            Err(err) if err.is_transient() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => panic!("start: {err}"),
        }
    }
}

async fn next(
    source: &mut ReplicationSource,
    max: usize,
) -> Result<Option<SourceBatch>, SourceError> {
    timeout(PATIENCE, source.next_batch(max, Duration::from_millis(100)))
        .await
        .expect("next_batch returns in time")
}

async fn ack(source: &mut ReplicationSource, token: &AckToken) {
    source
        .ack(token.clone(), &BatchOutcome::default())
        .await
        .expect("ack");
}

fn lsn(token: &AckToken) -> u64 {
    match token {
        AckToken::Lsn(lsn) => *lsn,
        other => panic!("a replication batch carries an LSN, not {other:?}"),
    }
}

/// Event id -> times delivered.
#[derive(Default)]
struct Seen {
    counts: HashMap<Uuid, u32>,
}

impl Seen {
    fn record(&mut self, batch: &SourceBatch) {
        assert!(
            batch.malformed.is_empty(),
            "malformed rows: {:?}",
            batch.malformed
        );
        for event in &batch.events {
            *self.counts.entry(event.event_id).or_default() += 1;
        }
    }

    fn has_all(&self, ids: &[Uuid]) -> bool {
        ids.iter().all(|id| self.counts.contains_key(id))
    }

    fn duplicates(&self) -> usize {
        self.counts.values().filter(|&&n| n > 1).count()
    }
}

/// Reads (and acknowledges) batches until every id in `ids` was seen; the
/// last position acknowledged.
async fn drain(source: &mut ReplicationSource, seen: &mut Seen, ids: &[Uuid]) -> u64 {
    let deadline = Instant::now() + PATIENCE;
    let mut acked = 0;
    while !seen.has_all(ids) {
        assert!(
            Instant::now() < deadline,
            "only {} of {} rows arrived",
            ids.iter().filter(|id| seen.counts.contains_key(id)).count(),
            ids.len()
        );
        if let Some(batch) = next(source, 500).await.expect("next batch") {
            seen.record(&batch);
            ack(source, &batch.ack).await;
            acked = acked.max(lsn(&batch.ack));
        }
    }
    acked
}

#[tokio::test]
async fn snapshot_then_stream_under_a_concurrent_writer_delivers_every_row_once() {
    let _shared = SERVER.read().await;
    let db = TestDb::migrated().await;
    let slot = SlotGuard::new(&db);
    let writer_client = db.client().await;
    insert(&writer_client, 2_500).await;

    // A writer that keeps committing while the slot is created and the
    // snapshot is read.
    let writer = tokio::spawn(async move {
        for i in 0..60 {
            insert(&writer_client, 1 + i % 40).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        writer_client
    });
    let mut source = start(&db, &slot, None).await;
    let mut seen = Seen::default();
    let mut snapshot_tokens = Vec::new();
    // The snapshot: `Lsn(0)` until its last batch, which carries the
    // consistent point.
    loop {
        let batch = next(&mut source, 1_000)
            .await
            .expect("snapshot batch")
            .expect("a snapshot batch");
        seen.record(&batch);
        snapshot_tokens.push(lsn(&batch.ack));
        ack(&mut source, &batch.ack).await;
        if lsn(&batch.ack) != 0 {
            break;
        }
    }
    let from_snapshot = seen.counts.len();
    assert!(snapshot_tokens.len() >= 3, "{snapshot_tokens:?}");
    assert!(snapshot_tokens[..snapshot_tokens.len() - 1]
        .iter()
        .all(|&t| t == 0));
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
        "rows delivered that are not in the outbox"
    );
    assert_eq!(
        seen.duplicates(),
        0,
        "no restart happened: every row exactly once"
    );
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
    let first = next(&mut source, 100)
        .await
        .expect("snapshot")
        .expect("a batch");
    assert!(first.events.is_empty());
    assert_ne!(lsn(&first.ack), 0);
    ack(&mut source, &first.ack).await;

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

    let sequence = |id: Uuid| {
        let client = &others;
        async move {
            let row = client
                .query_one(
                    "SELECT sequence_id FROM event_outbox WHERE event_id = $1",
                    &[&id],
                )
                .await
                .expect("sequence");
            row.get::<_, i64>(0)
        }
    };
    assert!(sequence(late_id[0]).await < sequence(early_ids[0]).await);
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

    // One row per transaction, so every batch ends at a commit.
    let streamed = insert_singly(&client, 120).await;
    let mut acked_ids = Vec::new();
    let mut unacked_ids = Vec::new();
    let mut acked = 0;
    let deadline = Instant::now() + PATIENCE;
    while acked_ids.len() + unacked_ids.len() < streamed.len() {
        assert!(
            Instant::now() < deadline,
            "the streamed rows did not arrive"
        );
        let Some(batch) = next(&mut source, 7).await.expect("next") else {
            continue;
        };
        let ids = batch.events.iter().map(|e| e.event_id);
        if acked_ids.len() < 60 {
            acked_ids.extend(ids);
            acked = lsn(&batch.ack);
            ack(&mut source, &batch.ack).await;
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
    // before the slot was made again): streaming could skip rows, so the slot
    // is made again and every row comes from a new snapshot.
    let all = all_ids(&client).await;
    let mut source = start(&db, &slot, Some(1)).await;
    let mut fresh = Seen::default();
    drain(&mut source, &mut fresh, &all).await;
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
    let mut parts = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    while !seen.has_all(&big) {
        assert!(
            Instant::now() < deadline,
            "the big transaction did not arrive"
        );
        if let Some(batch) = next(&mut source, 1_000).await.expect("next") {
            seen.record(&batch);
            parts.push((batch.events.len(), lsn(&batch.ack)));
            ack(&mut source, &batch.ack).await;
        }
    }
    assert_eq!(seen.duplicates(), 0);
    assert_eq!(parts.len(), 3, "{parts:?}");
    assert_eq!(
        parts.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        [1_000, 1_000, 500]
    );
    assert_eq!(parts[0].1, previous, "{parts:?}");
    assert_eq!(parts[1].1, previous, "{parts:?}");
    assert!(parts[2].1 > previous, "{parts:?}");
}

#[tokio::test]
async fn other_tables_wal_moves_the_slot_while_no_outbox_events_come() {
    let _shared = SERVER.read().await;
    let db = TestDb::migrated().await;
    let slot = SlotGuard::new(&db);
    let client = db.client().await;
    let mut source = start(&db, &slot, None).await;
    let first = next(&mut source, 100)
        .await
        .expect("snapshot")
        .expect("a batch");
    ack(&mut source, &first.ack).await;
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
    assert!(position > lsn(&first.ack));
    let deadline = Instant::now() + PATIENCE;
    while confirmed_flush(&client, &slot.name).await != position {
        assert!(Instant::now() < deadline, "the slot never followed");
        source.idle().await.expect("idle");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_slot_never_confirms_past_what_was_acknowledged() {
    let _shared = SERVER.read().await;
    let db = TestDb::migrated().await;
    let slot = SlotGuard::new(&db);
    let client = db.client().await;
    let mut source = start(&db, &slot, None).await;
    let first = next(&mut source, 100)
        .await
        .expect("snapshot")
        .expect("a batch");
    ack(&mut source, &first.ack).await;
    let mut acked = lsn(&first.ack);

    let ids = insert_singly(&client, 40).await;
    let mut pending: Vec<SourceBatch> = Vec::new();
    let mut seen = Seen::default();
    let deadline = Instant::now() + PATIENCE;
    while !seen.has_all(&ids) {
        assert!(Instant::now() < deadline, "rows did not arrive");
        if let Some(batch) = next(&mut source, 5).await.expect("next") {
            seen.record(&batch);
            pending.push(batch);
        }
        source.idle().await.expect("idle feedback");
        let confirmed = confirmed_flush(&client, &slot.name).await;
        assert!(
            confirmed <= acked,
            "slot confirmed {confirmed:X} > acknowledged {acked:X}"
        );
    }
    for batch in pending {
        ack(&mut source, &batch.ack).await;
        acked = lsn(&batch.ack);
        source.idle().await.expect("idle feedback");
        let confirmed = confirmed_flush(&client, &slot.name).await;
        assert!(
            confirmed <= acked,
            "slot confirmed {confirmed:X} > acknowledged {acked:X}"
        );
    }
    // And it does follow: the server releases what we hold durably.
    let deadline = Instant::now() + PATIENCE;
    while confirmed_flush(&client, &slot.name).await != acked {
        assert!(
            Instant::now() < deadline,
            "the slot never reached the acknowledged position"
        );
        source.idle().await.expect("idle feedback");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
    let mut snapshot = Vec::new();
    loop {
        let batch = next(&mut source, 10)
            .await
            .expect("snapshot")
            .expect("a batch");
        let last = lsn(&batch.ack) != 0;
        snapshot.push(batch);
        if last {
            break;
        }
    }
    let mut seen = Seen::default();
    let count = snapshot.len();
    let mut resume = 0;
    for (i, batch) in snapshot.iter().enumerate() {
        assert!(
            !source.caught_up().await.expect("caught_up"),
            "snapshot batch {i} not acknowledged"
        );
        seen.record(batch);
        ack(&mut source, &batch.ack).await;
        resume = lsn(&batch.ack);
    }
    assert_eq!(seen.counts.len(), 30);
    assert!(count >= 3);
    resume = resume.max(wait_caught_up(&mut source).await);
    drop(source);

    // Resumed: committed before start means streamed, not snapshotted.
    let streamed = insert_singly(&client, 12).await;
    let mut source = start(&db, &slot, Some(resume)).await;
    let mut held = Vec::new();
    let mut seen = Seen::default();
    let deadline = Instant::now() + PATIENCE;
    while !seen.has_all(&streamed) {
        assert!(Instant::now() < deadline, "rows did not arrive");
        if let Some(batch) = next(&mut source, 4).await.expect("next") {
            seen.record(&batch);
            held.push(batch);
        }
        assert!(
            !source.caught_up().await.expect("caught_up"),
            "delivered but not acknowledged"
        );
    }
    let last = held.len() - 1;
    for (i, batch) in held.iter().enumerate() {
        ack(&mut source, &batch.ack).await;
        if i < last {
            assert!(
                !source.caught_up().await.expect("caught_up"),
                "batch {i} of {last}"
            );
        }
    }
    wait_caught_up(&mut source).await;
}

/// Polls (reading keepalives in between) until `caught_up`; the last
/// position acknowledged meanwhile.
async fn wait_caught_up(source: &mut ReplicationSource) -> u64 {
    let deadline = Instant::now() + PATIENCE;
    let mut acked = 0;
    while !source.caught_up().await.expect("caught_up") {
        assert!(Instant::now() < deadline, "never caught up");
        if let Some(batch) = next(source, 100).await.expect("next") {
            assert!(
                batch.events.is_empty(),
                "nothing more was written: {:?}",
                batch.events
            );
            ack(source, &batch.ack).await;
            acked = lsn(&batch.ack);
        }
        source.idle().await.expect("idle");
    }
    acked
}

#[tokio::test]
async fn a_database_without_the_outbox_is_a_fatal_error_that_says_what_to_do() {
    let _shared = SERVER.read().await;
    let db = TestDb::create().await;
    let slot = SlotGuard::new(&db);
    let err = match timeout(
        PATIENCE,
        ReplicationSource::start(&db.config, slot.options(), None),
    )
    .await
    .expect("start returns in time")
    {
        Ok(_) => panic!("started without an outbox"),
        Err(err) => err,
    };
    assert!(!err.is_transient(), "{err}");
    assert!(
        err.to_string()
            .contains("run `event-processor migrate` first"),
        "{err}"
    );
}

/// `scripts/services.sh pg-restart immediate`: a crash of the server.
async fn crash_and_restart_postgres() {
    let script = std::env::var("SERVICES_SCRIPT")
        .unwrap_or_else(|_| format!("{}/scripts/services.sh", env!("CARGO_MANIFEST_DIR")));
    let output = timeout(
        Duration::from_secs(120),
        tokio::process::Command::new("bash")
            .arg(&script)
            .args(["pg-restart", "immediate"])
            .output(),
    )
    .await
    .expect("restart in time")
    .expect("run the services script");
    assert!(
        output.status.success(),
        "pg-restart failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn a_server_crash_is_survived_without_loss() {
    let _exclusive = SERVER.write().await;
    let db = TestDb::migrated().await;
    let slot = SlotGuard::new(&db);
    let client = db.client().await;
    let before = insert(&client, 300).await;
    let mut source = start(&db, &slot, None).await;
    let mut seen = Seen::default();
    drain(&mut source, &mut seen, &before).await;
    let mut streamed = insert_singly(&client, 100).await;
    // Read and acknowledge some of them, then crash the server.
    let mut read = 0;
    while read < 40 {
        if let Some(batch) = next(&mut source, 10).await.expect("next") {
            read += batch.events.len();
            seen.record(&batch);
            ack(&mut source, &batch.ack).await;
        }
    }
    crash_and_restart_postgres().await;
    let client = db.client().await;
    streamed.extend(insert_singly(&client, 50).await);

    let mut transient = 0;
    let deadline = Instant::now() + PATIENCE;
    while !seen.has_all(&streamed) {
        assert!(Instant::now() < deadline, "rows lost after the crash");
        match next(&mut source, 50).await {
            Ok(Some(batch)) => {
                seen.record(&batch);
                ack(&mut source, &batch.ack).await;
            }
            Ok(None) => {}
            Err(err) => {
                assert!(err.is_transient(), "a crash is transient: {err}");
                transient += 1;
                // The pipeline's backoff, in small.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    assert!(transient > 0, "the crash went unnoticed");
    eprintln!(
        "after the crash: {transient} transient errors, {} rows delivered twice",
        seen.duplicates()
    );
    assert!(seen.has_all(&before));
    drop(source);
}
