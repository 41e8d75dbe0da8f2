//! Polling capture, for databases where logical replication is not allowed.
//!
//! Workers claim unfinished rows with `FOR UPDATE SKIP LOCKED`, mark them
//! `processing` with a lease, and finish them (`processed` / `failed`) after
//! MongoDB holds their effects. Without a column of its own, the lease rides in
//! `lock_id` as `<worker>|<lease expiry, unix ms>`; a `retry` row may carry
//! `retry|<not before, unix ms>` there for its backoff.
//!
//! Order: a row is claimable only when no earlier row of its aggregate is
//! unfinished (pending, processing or retry). An earlier row that another
//! worker holds, or that is still pending, therefore holds back the later
//! ones; a row that commits late (a lower `sequence_id` committed after higher
//! ones) is still found, since claims look at status, not at a cursor.

use super::{Backlog, BatchOutcome, Source, SourceBatch, SourceError};
use crate::config::{PollingConfig, PostgresConfig};
use crate::dead_letter::DeadLetter;
use crate::decode::{decode_text_row, OutboxEvent};
use crate::outbox::{self, describe};
use crate::policy::{Classify, RetryClass};
use crate::telemetry::Chain;
use std::time::Duration;
use tokio_postgres::Client;
use uuid::Uuid;

/// The claim: up to `$1` claimable rows in `sequence_id` order, marked
/// `processing` with lock id `$2`; `$3` is now (unix ms), for leases and
/// retry backoffs. Public for the benchmark, which runs it bare.
pub const CLAIM: &str = "
WITH candidates AS (
    SELECT o.event_id
    FROM event_outbox o
    WHERE o.status IN ('pending', 'processing', 'retry')
      AND (o.status = 'pending'
           OR (o.status = 'retry' AND (o.lock_id IS NULL OR o.lock_id NOT LIKE 'retry|%'
                                       OR split_part(o.lock_id, '|', 2)::bigint <= $3))
           OR (o.status = 'processing' AND (o.lock_id IS NULL OR o.lock_id NOT LIKE '%|%'
                                            OR split_part(o.lock_id, '|', 2)::bigint <= $3)))
      AND NOT EXISTS (
          SELECT 1 FROM event_outbox e
          WHERE e.aggregate_id = o.aggregate_id
            AND e.aggregate_type = o.aggregate_type
            AND e.sequence_id < o.sequence_id
            AND e.status IN ('pending', 'processing', 'retry'))
    ORDER BY o.sequence_id
    LIMIT $1
    FOR UPDATE OF o SKIP LOCKED
)
UPDATE event_outbox AS t
SET status = 'processing', lock_id = $2
FROM candidates c
WHERE t.event_id = c.event_id
RETURNING t.event_id::text, t.sequence_id::text, t.aggregate_id::text, t.aggregate_type,
          t.event_type, t.payload::text, t.created_at::text";

/// The columns `CLAIM` returns, in its order.
const COLUMNS: [&str; 7] = super::replication::EVENT_COLUMNS;

/// Gives the claims of the workers named `<prefix>...` back (`pending`), for a
/// process stopping without finishing its batches: their rows are claimable
/// at once instead of after the lease. Safe: an effect of those batches that
/// still reaches MongoDB is fenced like any re-delivery.
pub async fn release_claims(pg: &PostgresConfig, prefix: &str) -> Result<u64, SourceError> {
    let client = outbox::connect(pg)
        .await
        .map_err(|e| SourceError::transient(e.retry_class(), Chain(&e).to_string()))?;
    client
        .execute(
            "UPDATE event_outbox SET status = 'pending', lock_id = NULL
             WHERE status = 'processing' AND left(lock_id, length($1)) = $1",
            &[&prefix],
        )
        .await
        .map_err(|e| transient("cannot release the claims", &e))
}

/// One polling worker.
pub struct PollingSource {
    pg: PostgresConfig,
    client: Option<Client>,
    worker: String,
    options: PollingConfig,
    /// Highest sequence_id committed when the worker started (`--until-caught-up`).
    start_max: Option<i64>,
}

fn transient(context: &str, err: &tokio_postgres::Error) -> SourceError {
    SourceError::transient(err.retry_class(), format!("{context}: {}", describe(err)))
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl PollingSource {
    /// `worker` names this worker in `lock_id` (host, process and index).
    pub async fn start(
        pg: &PostgresConfig,
        options: PollingConfig,
        worker: String,
    ) -> Result<PollingSource, SourceError> {
        let mut source = PollingSource {
            pg: pg.clone(),
            client: None,
            worker,
            options,
            start_max: None,
        };
        let client = source.client().await?;
        let row = client
            .query_one("SELECT max(sequence_id) FROM event_outbox", &[])
            .await
            .map_err(|e| match e.code() {
                Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => SourceError::Fatal(
                    "table event_outbox does not exist: run `event-processor migrate` first".into(),
                ),
                _ => transient("cannot read the outbox", &e),
            })?;
        source.start_max = row.get(0);
        Ok(source)
    }

    async fn client(&mut self) -> Result<&Client, SourceError> {
        if self.client.as_ref().is_some_and(Client::is_closed) {
            self.client = None;
        }
        if self.client.is_none() {
            let client = outbox::connect(&self.pg)
                .await
                .map_err(|e| SourceError::transient(e.retry_class(), Chain(&e).to_string()))?;
            self.client = Some(client);
        }
        self.client
            .as_ref()
            .ok_or_else(|| SourceError::transient(RetryClass::Connection, "no connection"))
    }

    fn lock_id(&self) -> String {
        let expiry = now_ms() + self.options.lease.as_millis() as i64;
        format!("{}|{expiry}", self.worker)
    }

    async fn claim(&mut self, max: usize) -> Result<Option<SourceBatch<Claim>>, SourceError> {
        let lock_id = self.lock_id();
        let limit = max as i64;
        let now = now_ms();
        let client = self.client().await?;
        let rows = match client.query(CLAIM, &[&limit, &lock_id, &now]).await {
            Ok(rows) => rows,
            Err(err) => {
                self.client = None;
                // Sorted by its code, like the acknowledgement's marks.
                return Err(SourceError::failed("cannot claim outbox rows", err));
            }
        };
        if rows.is_empty() {
            return Ok(None);
        }
        let mut events: Vec<OutboxEvent> = Vec::with_capacity(rows.len());
        let mut malformed = Vec::new();
        let mut event_ids = Vec::with_capacity(rows.len());
        for row in &rows {
            let values: Vec<Option<&str>> = (0..COLUMNS.len()).map(|i| row.get(i)).collect();
            let columns: Vec<(&str, Option<&str>)> = COLUMNS
                .iter()
                .copied()
                .zip(values.iter().copied())
                .collect();
            let event_id = values[0]
                .and_then(|v| Uuid::parse_str(v).ok())
                .unwrap_or_default();
            event_ids.push(event_id);
            match decode_text_row(&columns) {
                Ok(event) => events.push(event),
                Err(err) => malformed.push(DeadLetter {
                    event: OutboxEvent {
                        event_id,
                        sequence_id: values[1].and_then(|v| v.parse().ok()),
                        aggregate_id: values[2]
                            .and_then(|v| Uuid::parse_str(v).ok())
                            .unwrap_or_default(),
                        aggregate_type: values[3].unwrap_or_default().to_string(),
                        event_type: values[4].unwrap_or_default().to_string(),
                        payload: serde_json::Value::String(
                            values[5].unwrap_or_default().to_string(),
                        )
                        .into(),
                        created_at: None,
                    },
                    error: err.to_string(),
                    attempts: 1,
                }),
            }
        }
        // Claims come in sequence order already; keep it for the projection.
        events.sort_by_key(|e| e.sequence_id);
        Ok(Some(SourceBatch::new(
            events,
            malformed,
            Claim { lock_id, event_ids },
        )))
    }
}

/// A polling batch's acknowledgement: the claimed rows, by event id, with
/// the claim's lock id.
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    pub lock_id: String,
    pub event_ids: Vec<Uuid>,
}

impl Source for PollingSource {
    async fn next_batch(
        &mut self,
        max_events: usize,
        max_wait: Duration,
    ) -> Result<Option<SourceBatch<Claim>>, SourceError> {
        let deadline = tokio::time::Instant::now() + max_wait.max(self.options.interval);
        loop {
            if let Some(batch) = self.claim(max_events).await? {
                return Ok(Some(batch));
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(
                self.options
                    .interval
                    .min(max_wait.max(Duration::from_millis(10))),
            )
            .await;
        }
    }

    type Ack = Claim;

    async fn ack(&mut self, ack: Claim, outcome: &BatchOutcome) -> Result<(), SourceError> {
        let Claim { lock_id, event_ids } = ack;
        let failed: Vec<Uuid> = outcome
            .dead_letters
            .iter()
            .map(|d| d.event.event_id)
            .collect();
        let errors: Vec<String> = outcome
            .dead_letters
            .iter()
            .map(|d| d.error.clone())
            .collect();
        let processed: Vec<Uuid> = event_ids
            .into_iter()
            .filter(|id| !failed.contains(id))
            .collect();
        let client = self.client().await?;
        // Only rows we still hold: a claim taken over after our lease expired
        // belongs to its new worker (who re-applies it, harmlessly).
        let result = client
            .execute(
                "UPDATE event_outbox SET status = 'processed', published_at = now(), lock_id = NULL
                 WHERE event_id = ANY($1) AND status = 'processing' AND lock_id = $2",
                &[&processed, &lock_id],
            )
            .await;
        let result = match result {
            Ok(_) => client
                .execute(
                    "UPDATE event_outbox AS t
                     SET status = 'failed', retry_count = t.retry_count + 1, last_error = f.error, lock_id = NULL
                     FROM unnest($1::uuid[], $2::text[]) AS f(event_id, error)
                     WHERE t.event_id = f.event_id AND t.status = 'processing' AND t.lock_id = $3",
                    &[&failed, &errors, &lock_id],
                )
                .await,
            Err(err) => Err(err),
        };
        if let Err(err) = result {
            self.client = None;
            // Sorted by its code: a refusal (the role lost UPDATE on the
            // outbox) stops the process instead of repeating forever.
            return Err(SourceError::failed("cannot mark outbox rows", err));
        }
        Ok(())
    }

    async fn caught_up(&mut self) -> Result<bool, SourceError> {
        let Some(max) = self.start_max else {
            return Ok(true);
        };
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT count(*) FROM event_outbox
                 WHERE status IN ('pending', 'processing', 'retry') AND sequence_id <= $1",
                &[&max],
            )
            .await
            .map_err(|e| transient("cannot check progress", &e))?;
        Ok(row.get::<_, i64>(0) == 0)
    }

    async fn backlog(&mut self) -> Result<Backlog, SourceError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT count(*) FROM event_outbox WHERE status IN ('pending', 'processing', 'retry')",
                &[],
            )
            .await
            .map_err(|e| transient("cannot count the backlog", &e))?;
        Ok(Backlog {
            remaining: Some(row.get::<_, i64>(0).max(0) as u64),
        })
    }
}
