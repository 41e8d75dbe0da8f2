//! The logical replication source against the real PostgreSQL that
//! `scripts/services.sh` starts (wal_level=logical): snapshot and stream with
//! no gap and no duplicate, late commits, resume, the slot never ahead of our
//! acknowledgements, a crash of the server, `caught_up`.
//!
//! Each test has its own database and its own slot (slots are cluster-wide),
//! dropped at the end. The crash test restarts the server, so it takes
//! [`SERVER`] exclusively and every other test holds it shared.

mod common;

use activity_event_processor::config::PostgresConfig;
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
    db: PostgresConfig,
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

#[derive(Clone, Copy, PartialEq)]
enum Ack {
    /// Acknowledge every batch as it comes.
    Each,
    /// Keep the batches, unacknowledged.
    Hold,
}

/// What [`read_until`] read.
#[derive(Default)]
struct Read {
    /// The last position acknowledged.
    acked: u64,
    /// Every batch's size and position.
    parts: Vec<(usize, u64)>,
    /// The batches held back ([`Ack::Hold`]).
    held: Vec<SourceBatch>,
}

/// Reads batches of at most `max` until every id in `ids` was seen.
async fn read_until(
    source: &mut ReplicationSource,
    seen: &mut Seen,
    ids: &[Uuid],
    max: usize,
    mode: Ack,
) -> Read {
    let deadline = Instant::now() + PATIENCE;
    let mut read = Read::default();
    while !seen.has_all(ids) {
        let arrived = ids.iter().filter(|id| seen.counts.contains_key(id)).count();
        assert!(
            Instant::now() < deadline,
            "only {arrived} of {} rows arrived",
            ids.len()
        );
        let Some(batch) = next(source, max).await.expect("next batch") else {
            continue;
        };
        seen.record(&batch);
        read.parts.push((batch.events.len(), lsn(&batch.ack)));
        match mode {
            Ack::Each => {
                ack(source, &batch.ack).await;
                read.acked = read.acked.max(lsn(&batch.ack));
            }
            Ack::Hold => read.held.push(batch),
        }
    }
    read
}

/// Reads (and acknowledges) until every id in `ids` was seen.
async fn drain(source: &mut ReplicationSource, seen: &mut Seen, ids: &[Uuid]) -> u64 {
    read_until(source, seen, ids, 500, Ack::Each).await.acked
}

/// Reads the initial snapshot: `Lsn(0)` batches, then the one with the
/// consistent point.
async fn read_snapshot(source: &mut ReplicationSource, max: usize, mode: Ack) -> Vec<SourceBatch> {
    let mut batches = Vec::new();
    loop {
        let batch = next(source, max)
            .await
            .expect("snapshot")
            .expect("a snapshot batch");
        let last = lsn(&batch.ack) != 0;
        if mode == Ack::Each {
            ack(source, &batch.ack).await;
        }
        batches.push(batch);
        if last {
            return batches;
        }
    }
}

/// Polls (reading keepalives in between) until `caught_up`; the last position
/// acknowledged meanwhile.
async fn wait_caught_up(source: &mut ReplicationSource) -> u64 {
    let deadline = Instant::now() + PATIENCE;
    let mut acked = 0;
    while !source.caught_up().await.expect("caught_up") {
        assert!(Instant::now() < deadline, "never caught up");
        if let Some(batch) = next(source, 100).await.expect("next") {
            assert!(batch.events.is_empty(), "nothing more was written");
            ack(source, &batch.ack).await;
            acked = lsn(&batch.ack);
        }
        source.idle().await.expect("idle");
    }
    acked
}

/// Calls `idle` until the slot's confirmed position is `lsn`.
async fn wait_confirmed(source: &mut ReplicationSource, client: &Client, slot: &str, lsn: u64) {
    let deadline = Instant::now() + PATIENCE;
    while confirmed_flush(client, slot).await != lsn {
        assert!(Instant::now() < deadline, "the slot never reached {lsn:X}");
        source.idle().await.expect("idle feedback");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

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
    // before the slot was made again): streaming could skip rows, so the slot
    // is made again and every row comes from a new snapshot.
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

/// `start` fails with a fatal error (no retry can fix it); its message.
async fn start_fails(config: &PostgresConfig, slot: &SlotGuard) -> String {
    let started = ReplicationSource::start(config, slot.options(), None);
    match timeout(PATIENCE, started)
        .await
        .expect("start returns in time")
    {
        Ok(_) => panic!("started, but should not have"),
        Err(err) => {
            assert!(!err.is_transient(), "{err}");
            err.to_string()
        }
    }
}

#[tokio::test]
async fn a_database_without_the_outbox_is_a_fatal_error_that_says_what_to_do() {
    let _shared = SERVER.read().await;
    let db = TestDb::create().await;
    let slot = SlotGuard::new(&db);
    let err = start_fails(&db.config, &slot).await;
    assert!(err.contains("run `event-processor migrate` first"), "{err}");
}

#[tokio::test]
async fn a_user_without_the_replication_attribute_gets_a_fatal_error_that_says_what_to_do() {
    let _shared = SERVER.read().await;
    let db = TestDb::migrated().await;
    let slot = SlotGuard::new(&db);
    let role = format!("aep_norepl_{}", &Uuid::new_v4().simple().to_string()[..8]);
    let owner = db.client().await;
    // The publication exists (an administrator made it); the role may read the outbox.
    owner
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN NOREPLICATION; GRANT SELECT ON event_outbox TO {role}; \
             CREATE PUBLICATION aep_outbox FOR TABLE event_outbox WITH (publish = 'insert')"
        ))
        .await
        .expect("create the role");
    let mut config = db.config.clone();
    config.user = role.clone();
    let err = start_fails(&config, &slot).await;
    owner
        .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
        .await
        .expect("drop the role");
    let wanted = format!("ALTER ROLE {role} WITH REPLICATION");
    assert!(err.contains(&wanted), "{err}");
}

#[tokio::test]
async fn no_free_replication_slot_is_a_fatal_error_that_says_what_to_do() {
    // Fills every slot of the cluster: no other test may run meanwhile.
    let _exclusive = SERVER.write().await;
    let db = TestDb::migrated().await;
    let slot = SlotGuard::new(&db);
    let client = db.client().await;
    let free: i64 = client
        .query_one(
            "SELECT current_setting('max_replication_slots')::bigint - count(*) FROM pg_replication_slots",
            &[],
        )
        .await
        .expect("count slots")
        .get(0);
    let fillers: Vec<String> = (0..free)
        .map(|i| format!("{}_fill_{i}", slot.name))
        .collect();
    for name in &fillers {
        client
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[name],
            )
            .await
            .expect("fill a slot");
    }
    let err = start_fails(&db.config, &slot).await;
    for name in &fillers {
        client
            .execute("SELECT pg_drop_replication_slot($1)", &[name])
            .await
            .expect("drop a filler slot");
    }
    assert!(err.contains("max_replication_slots"), "{err}");
}

/// This process's resident memory, in kB.
fn rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse().ok())
        .expect("VmRSS in /proc/self/status")
}

#[tokio::test]
async fn a_large_backlog_drains_in_memory_that_does_not_grow_with_it() {
    // Alone, so that other tests' memory does not blur the measure.
    let _exclusive = SERVER.write().await;
    let db = TestDb::migrated().await;
    let slot = SlotGuard::new(&db);
    let client = db.client().await;
    const SNAPSHOT: i64 = 300_000;
    const STREAMED: i64 = 100_000;
    client
        .execute(
            "INSERT INTO event_outbox (event_id, aggregate_id, aggregate_type, event_type, payload) \
             SELECT gen_random_uuid(), gen_random_uuid(), 'User', 'UserCreated', \
                    jsonb_build_object('email', 'u' || i || '@example.com', 'displayName', repeat('x', 200)) \
             FROM generate_series(1, $1::bigint) AS i",
            &[&SNAPSHOT],
        )
        .await
        .expect("fill the outbox");
    let baseline = rss_kb();
    let mut peak = baseline;
    let mut source = start(&db, &slot, None).await;
    let mut events = 0;
    let deadline = Instant::now() + Duration::from_secs(240);
    // The snapshot, then one transaction larger than many batches.
    let mut wrote_streamed = false;
    while events < SNAPSHOT + STREAMED {
        assert!(Instant::now() < deadline, "{events} events after 240 s");
        let Some(batch) = next(&mut source, 1_000).await.expect("next") else {
            continue;
        };
        events += batch.events.len() as i64;
        ack(&mut source, &batch.ack).await;
        drop(batch);
        peak = peak.max(rss_kb());
        if events >= SNAPSHOT && !wrote_streamed {
            insert(&client, STREAMED).await;
            wrote_streamed = true;
        }
    }
    assert_eq!(events, SNAPSHOT + STREAMED);
    let growth_mb = (peak - baseline) / 1024;
    eprintln!("{events} events: resident memory grew by {growth_mb} MB");
    // The backlog is ~150 MB as events: holding it would show.
    assert!(growth_mb < 48, "resident memory grew by {growth_mb} MB");
}

/// `scripts/services.sh pg-restart immediate`: a crash of the server.
async fn crash_and_restart_postgres() {
    let script = std::env::var("SERVICES_SCRIPT")
        .unwrap_or_else(|_| format!("{}/scripts/services.sh", env!("CARGO_MANIFEST_DIR")));
    let restart = tokio::process::Command::new("bash")
        .arg(&script)
        .args(["pg-restart", "immediate"])
        .output();
    let output = timeout(Duration::from_secs(120), restart)
        .await
        .expect("restart in time")
        .expect("run the services script");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "pg-restart failed: {stderr}");
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
    read_until(&mut source, &mut seen, &streamed[..40], 10, Ack::Each).await;
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
}
