//! PostgreSQL side of `bench`: fresh databases, slots, loading, the capture
//! limits (server-side decoding, `pg_recvlogical`), the bare claim query and
//! the paced inserter of the latency stage.

use activity_event_processor::config::PostgresConfig;
use activity_event_processor::decode::OutboxEvent;
use activity_event_processor::outbox::{self, migrate};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio_postgres::types::Json;
use tokio_postgres::Client;

pub const PUBLICATION: &str = "aep_bench_outbox";

/// `pg` with another database.
pub fn with_database(pg: &PostgresConfig, database: &str) -> PostgresConfig {
    let mut pg = pg.clone();
    pg.database = database.to_string();
    pg
}

/// Drops `database` (and the replication slots in it) if it exists.
pub async fn drop_database(admin: &Client, database: &str) -> Result<()> {
    admin
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
             WHERE database = $1 AND NOT active",
            &[&database],
        )
        .await
        .with_context(|| format!("cannot drop the replication slots of {database}"))?;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
        .await
        .with_context(|| format!("cannot drop database {database}"))?;
    Ok(())
}

/// A new, empty, migrated database with the benchmark's publication.
pub async fn fresh_database(
    admin: &Client,
    pg: &PostgresConfig,
    database: &str,
) -> Result<(PostgresConfig, Client)> {
    drop_database(admin, database).await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {database}"))
        .await
        .with_context(|| {
            format!("cannot create database {database} (bench needs the CREATEDB privilege)")
        })?;
    let pg = with_database(pg, database);
    let mut client = outbox::connect(&pg).await?;
    migrate::apply(&mut client, migrate::MIGRATIONS)
        .await
        .map_err(outbox::OutboxError::from)?;
    client
        .batch_execute(&format!(
            "CREATE PUBLICATION {PUBLICATION} FOR TABLE event_outbox WITH (publish = 'insert')"
        ))
        .await
        .context("cannot create the publication")?;
    Ok((pg, client))
}

/// Creates a pgoutput slot; returns its consistent point.
pub async fn create_slot(client: &Client, slot: &str) -> Result<()> {
    client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .with_context(|| format!("cannot create replication slot {slot}"))?;
    Ok(())
}

pub async fn current_lsn(client: &Client) -> Result<String> {
    let row = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?;
    Ok(row.get(0))
}

/// Loads `events` with binary COPY in chunks; returns rows/s.
pub async fn copy(client: &Client, events: &[OutboxEvent]) -> Result<f64> {
    let started = Instant::now();
    outbox::load::copy_events(client, events).await?;
    let rate = events.len() as f64 / started.elapsed().as_secs_f64().max(1e-6);
    // As autovacuum would soon: the claim queries are planned on statistics.
    client
        .batch_execute("ANALYZE event_outbox")
        .await
        .context("ANALYZE failed")?;
    Ok(rate)
}

/// PostgreSQL's own decoding of the slot's WAL, with no client: events/s.
pub async fn peek_rate(client: &Client, slot: &str, events: u64) -> Result<f64> {
    let started = Instant::now();
    let row = client
        .query_one(
            "SELECT count(*) FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL,
                 'proto_version', '1', 'publication_names', $2)",
            &[&slot, &PUBLICATION],
        )
        .await
        .context("pg_logical_slot_peek_binary_changes failed")?;
    let elapsed = started.elapsed().as_secs_f64();
    let messages: i64 = row.get(0);
    if (messages as u64) < events {
        bail!("the slot decoded {messages} messages for {events} events");
    }
    Ok(events as f64 / elapsed.max(1e-6))
}

/// Where PostgreSQL's client programs are.
pub fn pg_bindir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("PGBIN") {
        return Some(PathBuf::from(dir));
    }
    if let Ok(out) = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("pg_recvlogical").exists() {
            return Some(dir);
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("pg_recvlogical").exists())
        .collect();
    found.sort();
    found.pop()
}

/// `pg_recvlogical` draining the slot to /dev/null up to `end_lsn`:
/// (events/s, CPU seconds it used).
pub async fn recvlogical(
    pg: &PostgresConfig,
    slot: &str,
    end_lsn: &str,
    events: u64,
    wrapper: &[String],
) -> Result<(f64, f64)> {
    let bin = pg_bindir()
        .context("pg_recvlogical not found: set PGBIN to PostgreSQL's bin folder")?
        .join("pg_recvlogical");
    let cpu_before = super::child::children_cpu_seconds().unwrap_or(0.0);
    let started = Instant::now();
    let mut command = super::callgrind::command(wrapper, &bin);
    command
        .args(["-h", &pg.host, "-p", &pg.port.to_string(), "-U", &pg.user])
        .args(["-d", &pg.database, "--slot", slot, "--start", "--no-loop"])
        .args(["--endpos", end_lsn, "-f", "/dev/null"])
        .args(["-o", "proto_version=1", "-o"])
        .arg(format!("publication_names={PUBLICATION}"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    if !pg.password.expose().is_empty() {
        command.env("PGPASSWORD", pg.password.expose());
    }
    let output = command
        .output()
        .await
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let elapsed = started.elapsed().as_secs_f64();
    if !output.status.success() {
        bail!(
            "pg_recvlogical failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let cpu = super::child::children_cpu_seconds().unwrap_or(0.0) - cpu_before;
    Ok((events as f64 / elapsed.max(1e-6), cpu))
}

/// The claim query alone (no ordering guard, no lease): claim a batch with
/// `FOR UPDATE SKIP LOCKED`, mark it processed, until the outbox is empty.
pub async fn bare_claim_rate(client: &Client, batch: i64, events: u64) -> Result<f64> {
    let claim = client
        .prepare(
            "WITH c AS (
                 SELECT event_id FROM event_outbox WHERE status = 'pending'
                 ORDER BY sequence_id LIMIT $1 FOR UPDATE SKIP LOCKED)
             UPDATE event_outbox t SET status = 'processing', lock_id = 'bench'
             FROM c WHERE t.event_id = c.event_id
             RETURNING t.event_id::text, t.sequence_id::text, t.aggregate_id::text, t.aggregate_type,
                       t.event_type, t.payload::text, t.created_at::text",
        )
        .await?;
    claim_loop(client, &claim, &[&batch], events).await
}

/// The processor's own claim (per-aggregate order, leases, retry backoff),
/// run bare in the same loop as [`bare_claim_rate`]'s.
pub async fn ordered_claim_rate(client: &Client, batch: i64, events: u64) -> Result<f64> {
    use activity_event_processor::source::polling::CLAIM;
    let claim = client.prepare(CLAIM).await?;
    let now = chrono::Utc::now().timestamp_millis();
    let lock_id = format!("bench|{}", now + 3_600_000);
    claim_loop(client, &claim, &[&batch, &lock_id, &now], events).await
}

/// Claims with `claim` and marks each claim processed until nothing is left;
/// the rows per second.
async fn claim_loop(
    client: &Client,
    claim: &tokio_postgres::Statement,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    events: u64,
) -> Result<f64> {
    let mark = client
        .prepare(
            "UPDATE event_outbox SET status = 'processed', published_at = now(), lock_id = NULL
             WHERE event_id = ANY($1)",
        )
        .await?;
    let started = Instant::now();
    let mut done = 0u64;
    loop {
        let rows = client.query(claim, params).await?;
        if rows.is_empty() {
            break;
        }
        let ids: Vec<uuid::Uuid> = rows
            .iter()
            .filter_map(|r| uuid::Uuid::parse_str(r.get::<_, &str>(0)).ok())
            .collect();
        client.execute(&mark, &[&ids]).await?;
        done += ids.len() as u64;
    }
    if done < events {
        bail!("the claim loop saw {done} of {events} rows");
    }
    Ok(events as f64 / started.elapsed().as_secs_f64().max(1e-6))
}

/// Inserts `events` at `rate` per second, in small single-statement
/// transactions every `tick`, with `created_at = clock_timestamp()`.
/// Calls `progress(inserted)` now and then. Returns the rate achieved.
pub async fn paced_insert(
    client: &Client,
    events: &[OutboxEvent],
    rate: f64,
    tick: Duration,
    mut progress: impl FnMut(usize),
) -> Result<f64> {
    let insert = client
        .prepare(
            "INSERT INTO event_outbox
                 (event_id, sequence_id, aggregate_id, aggregate_type, event_type, payload, created_at)
             SELECT e, s, a, t, y, p, clock_timestamp()
             FROM unnest($1::uuid[], $2::int8[], $3::uuid[], $4::text[], $5::text[], $6::jsonb[])
                  AS u(e, s, a, t, y, p)",
        )
        .await?;
    let started = Instant::now();
    let mut sent = 0usize;
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while sent < events.len() {
        interval.tick().await;
        let due = ((started.elapsed().as_secs_f64() * rate) as usize).min(events.len());
        if due <= sent {
            continue;
        }
        let chunk = &events[sent..due];
        let ids: Vec<uuid::Uuid> = chunk.iter().map(|e| e.event_id).collect();
        let seqs: Vec<i64> = chunk.iter().map(|e| e.sequence_id.unwrap_or(0)).collect();
        let aggs: Vec<uuid::Uuid> = chunk.iter().map(|e| e.aggregate_id).collect();
        let types: Vec<&str> = chunk.iter().map(|e| e.aggregate_type.as_str()).collect();
        let names: Vec<&str> = chunk.iter().map(|e| e.event_type.as_str()).collect();
        let payloads: Vec<Json<&activity_event_processor::decode::Payload>> =
            chunk.iter().map(|e| Json(&e.payload)).collect();
        client
            .execute(&insert, &[&ids, &seqs, &aggs, &types, &names, &payloads])
            .await
            .context("paced insert failed")?;
        sent = due;
        progress(sent);
    }
    Ok(sent as f64 / started.elapsed().as_secs_f64().max(1e-6))
}

/// Waits until a slot of that name is active (its processor is streaming).
pub async fn wait_for_active_slot(client: &Client, slot: &str, timeout: Duration) -> Result<()> {
    let started = Instant::now();
    loop {
        let row = client
            .query_opt(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await?;
        if row.is_some_and(|r| r.get::<_, bool>(0)) {
            return Ok(());
        }
        if started.elapsed() > timeout {
            bail!("replication slot {slot} did not become active within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn server_version(client: &Client) -> String {
    match client.query_one("SHOW server_version", &[]).await {
        Ok(row) => row.get(0),
        Err(_) => "unknown".into(),
    }
}
