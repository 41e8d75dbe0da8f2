//! Helpers of the replication source tests: slots of their own, reading,
//! acknowledging and counting what a `ReplicationSource` delivers.

#![allow(dead_code)]

use super::TestDb;
use activity_event_processor::config::PostgresConfig;
use activity_event_processor::policy::{Classify, ErrorClass};
use activity_event_processor::source::replication::Lsn;
use activity_event_processor::source::replication::{
    ReplicationOptions, ReplicationSource, Resume, SlotOwner,
};
use activity_event_processor::source::{BatchOutcome, Source, SourceError};

type SourceBatch = activity_event_processor::source::SourceBatch<Lsn>;
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::RwLock;
use tokio::time::{timeout, Instant};
use tokio_postgres::Client;
use uuid::Uuid;

/// Shared by every test; the server-restart test takes it alone.
pub static SERVER: RwLock<()> = RwLock::const_new(());

/// The longest any single wait may take.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// A slot of this test's own, dropped at the end (after the source, before the
/// database: declare it after the database and before the source).
pub struct SlotGuard {
    pub name: String,
    pub db: PostgresConfig,
}

impl SlotGuard {
    pub fn new(db: &TestDb) -> SlotGuard {
        SlotGuard {
            name: format!("aep_test_{}", &Uuid::new_v4().simple().to_string()[..12]),
            db: db.config.clone(),
        }
    }

    pub fn options(&self) -> ReplicationOptions {
        ReplicationOptions {
            slot: self.name.clone(),
            publication: "aep_outbox".to_string(),
            sweep: false,
        }
    }

    /// The ownership of this slot, taken (waiting while another holds it).
    pub async fn owner(&self) -> SlotOwner {
        let owner = SlotOwner::new(&self.db, &self.name);
        let shutdown = tokio_util::sync::CancellationToken::new();
        let owned = timeout(PATIENCE, owner.acquire(&shutdown))
            .await
            .expect("the slot ownership is taken in time")
            .expect("take the slot ownership");
        assert!(owned);
        owner
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let (db, name) = (self.db.clone(), self.name.clone());
        super::clean_up(async move {
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
    }
}

/// Inserts `rows` outbox rows in one transaction; their event ids.
pub async fn insert(client: &Client, rows: i64) -> Vec<Uuid> {
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
pub async fn insert_singly(client: &Client, count: usize) -> Vec<Uuid> {
    let mut ids = Vec::with_capacity(count);
    for _ in 0..count {
        ids.extend(insert(client, 1).await);
    }
    ids
}

pub async fn all_ids(client: &Client) -> Vec<Uuid> {
    client
        .query("SELECT event_id FROM event_outbox", &[])
        .await
        .expect("read outbox")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

pub async fn confirmed_flush(client: &Client, slot: &str) -> u64 {
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
pub async fn start(db: &TestDb, slot: &SlotGuard, resume: Option<u64>) -> ReplicationSource {
    let deadline = Instant::now() + PATIENCE;
    let owner = slot.owner().await;
    loop {
        let started = timeout(
            PATIENCE,
            ReplicationSource::start(
                &db.config,
                slot.options(),
                owner.clone(),
                Resume::At(resume),
            ),
        )
        .await
        .expect("start returns in time");
        match started {
            Ok(source) => return source,
            Err(err) if err.class() == ErrorClass::Transient && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => panic!("start: {err}"),
        }
    }
}

pub async fn next(
    source: &mut ReplicationSource,
    max: usize,
) -> Result<Option<SourceBatch>, SourceError> {
    timeout(PATIENCE, source.next_batch(max, Duration::from_millis(100)))
        .await
        .expect("next_batch returns in time")
}

pub async fn ack(source: &mut ReplicationSource, token: &Lsn) {
    source
        .ack(*token, &BatchOutcome::default())
        .await
        .expect("ack");
}

pub fn lsn(token: &Lsn) -> u64 {
    token.0
}

/// Event id -> times delivered.
#[derive(Default)]
pub struct Seen {
    pub counts: HashMap<Uuid, u32>,
}

impl Seen {
    pub fn record(&mut self, batch: &SourceBatch) {
        assert!(
            batch.malformed.is_empty(),
            "malformed rows: {:?}",
            batch.malformed
        );
        for event in &batch.events {
            *self.counts.entry(event.event_id).or_default() += 1;
        }
    }

    pub fn has_all(&self, ids: &[Uuid]) -> bool {
        ids.iter().all(|id| self.counts.contains_key(id))
    }

    pub fn duplicates(&self) -> usize {
        self.counts.values().filter(|&&n| n > 1).count()
    }
}

#[derive(Clone, Copy, PartialEq)]
pub enum Ack {
    /// Acknowledge every batch as it comes.
    Each,
    /// Keep the batches, unacknowledged.
    Hold,
}

/// What [`read_until`] read.
#[derive(Default)]
pub struct Read {
    /// The last position acknowledged.
    pub acked: u64,
    /// Every batch's size and position.
    pub parts: Vec<(usize, u64)>,
    /// The batches held back ([`Ack::Hold`]).
    pub held: Vec<SourceBatch>,
}

/// Reads batches of at most `max` until every id in `ids` was seen.
pub async fn read_until(
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
pub async fn drain(source: &mut ReplicationSource, seen: &mut Seen, ids: &[Uuid]) -> u64 {
    read_until(source, seen, ids, 500, Ack::Each).await.acked
}

/// Reads the initial snapshot: `Lsn(0)` batches, then the one with the
/// consistent point.
pub async fn read_snapshot(
    source: &mut ReplicationSource,
    max: usize,
    mode: Ack,
) -> Vec<SourceBatch> {
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
pub async fn wait_caught_up(source: &mut ReplicationSource) -> u64 {
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
pub async fn wait_confirmed(source: &mut ReplicationSource, client: &Client, slot: &str, lsn: u64) {
    let deadline = Instant::now() + PATIENCE;
    while confirmed_flush(client, slot).await != lsn {
        assert!(Instant::now() < deadline, "the slot never reached {lsn:X}");
        source.idle().await.expect("idle feedback");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
