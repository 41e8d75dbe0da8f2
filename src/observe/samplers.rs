//! Samplers: tokio tasks that look at PostgreSQL and MongoDB every few
//! seconds, each on a connection of its own, and turn what they see into
//! metrics and health checks. A database that goes away makes a check fail;
//! the sampler reconnects at its next sample and never stops before
//! shutdown.

use super::health::{Health, StallWatch};
use super::metrics::Metrics;
use crate::config::PostgresConfig;
use crate::store::codes::describe;
use rdkafka::producer::Producer;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::types::PgLsn;
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;

/// Health check names.
pub const CHECK_POSTGRES: &str = "postgres";
pub const CHECK_SLOT: &str = "slot";
pub const CHECK_PROGRESS: &str = "progress";
pub const CHECK_MONGODB: &str = "mongodb";
pub const CHECK_KAFKA: &str = "kafka";

/// How often and how patiently the samplers look.
#[derive(Debug, Clone, Copy)]
pub struct Sampling {
    pub interval: Duration,
    /// A query or ping that takes longer fails the check.
    pub timeout: Duration,
    /// Work waiting while the position stands still this long is a stall.
    pub stall_after: Duration,
}

impl Default for Sampling {
    /// Every 5 s, 10 s patience, stalled after 30 s: a cause shows on
    /// `/readyz` well within a minute, and a 10 s heartbeat moves the
    /// position of an idle slot twice before a stall is called.
    fn default() -> Self {
        Sampling {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(10),
            stall_after: Duration::from_secs(30),
        }
    }
}

/// A plain connection, given up after `timeout`.
pub(super) async fn connect(pg: &PostgresConfig, timeout: Duration) -> Result<Client, String> {
    let mut config = pg.to_client_config();
    config
        .connect_timeout(timeout.min(pg.connect_timeout))
        .application_name("activity-event-processor-sampler");
    let (client, connection) = tokio::time::timeout(timeout, config.connect(NoTls))
        .await
        .map_err(|_| format!("cannot connect to {}: timed out", pg.display_target()))?
        .map_err(|err| {
            format!(
                "cannot connect to {}: {}",
                pg.display_target(),
                crate::outbox::describe(&err)
            )
        })?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Ticks every `interval` until `shutdown`; a sample in progress at
/// shutdown is dropped.
pub(super) struct Ticker {
    ticks: tokio::time::Interval,
}

impl Ticker {
    pub(super) fn new(interval: Duration) -> Ticker {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ticker { ticks }
    }

    /// Waits for the next tick; `false` once shut down.
    pub(super) async fn next(&mut self, shutdown: &CancellationToken) -> bool {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => false,
            _ = self.ticks.tick() => true,
        }
    }
}

/// Runs `work` unless `shutdown` comes first.
pub(super) async fn unless_shutdown<F: Future>(
    shutdown: &CancellationToken,
    work: F,
) -> Option<F::Output> {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => None,
        output = work => Some(output),
    }
}

/// One connection that is made again after any failure.
struct Connection {
    pg: PostgresConfig,
    timeout: Duration,
    client: Option<Client>,
}

impl Connection {
    fn new(pg: &PostgresConfig, sampling: &Sampling) -> Connection {
        Connection {
            pg: pg.clone(),
            timeout: sampling.timeout,
            client: None,
        }
    }

    /// The row of `sql`, read by `read`; the `postgres` check in `health`
    /// says how it went (`None`: it failed).
    async fn read<T>(
        &mut self,
        health: &Health,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        read: impl FnOnce(&tokio_postgres::Row) -> Result<T, tokio_postgres::Error>,
    ) -> Option<T> {
        let read = match self.query(sql, params).await {
            Ok(row) => read(&row).map_err(|err| crate::outbox::describe(&err)),
            Err(reason) => Err(reason),
        };
        match read {
            Ok(value) => {
                health.set_ok(CHECK_POSTGRES);
                Some(value)
            }
            Err(reason) => {
                health.set_failing(CHECK_POSTGRES, reason);
                None
            }
        }
    }

    /// Runs `query` on the connection (made first if needed), within the
    /// timeout; on any failure the connection is dropped.
    async fn query(
        &mut self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<tokio_postgres::Row, String> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.client = Some(connect(&self.pg, self.timeout).await?);
        }
        let Some(client) = self.client.as_ref() else {
            return Err("no connection".into());
        };
        let result = match tokio::time::timeout(self.timeout, client.query_one(sql, params)).await {
            Ok(Ok(row)) => Ok(row),
            Ok(Err(err)) => Err(crate::outbox::describe(&err)),
            Err(_) => Err(format!(
                "no answer from {} within {} s",
                self.pg.display_target(),
                self.timeout.as_secs_f64()
            )),
        };
        if result.is_err() {
            self.client = None;
        }
        result
    }
}

/// The replication slot's lag, existence and progress. The runtime gives the
/// durable checkpoint through `durable_lsn` (0 until it knows one: the
/// slot's `confirmed_flush_lsn` stands in).
pub struct SlotLagSampler {
    pub pg: PostgresConfig,
    pub slot: String,
    pub durable_lsn: Arc<AtomicU64>,
    /// Events acknowledged so far: an initial snapshot's batches move it
    /// while the durable position stays at the slot's start.
    pub acknowledged: Arc<AtomicU64>,
    pub sampling: Sampling,
    pub health: Health,
    pub metrics: &'static Metrics,
}

impl SlotLagSampler {
    /// One sample into `health`, for a person's `status` (a stall shows
    /// only over time: one look finds `progress` ok).
    pub async fn check_once(&self) {
        let mut connection = Connection::new(&self.pg, &self.sampling);
        let mut stall = StallWatch::new(self.sampling.stall_after);
        self.sample(&mut connection, &mut stall).await;
    }

    pub async fn run(self, shutdown: CancellationToken) {
        for check in [CHECK_POSTGRES, CHECK_SLOT, CHECK_PROGRESS] {
            self.health.expect(check);
        }
        let mut connection = Connection::new(&self.pg, &self.sampling);
        let mut stall = StallWatch::new(self.sampling.stall_after);
        let mut ticker = Ticker::new(self.sampling.interval);
        while ticker.next(&shutdown).await {
            unless_shutdown(&shutdown, self.sample(&mut connection, &mut stall)).await;
        }
    }

    async fn sample(&self, connection: &mut Connection, stall: &mut StallWatch<(u64, u64)>) {
        let read = connection
            .read(
                &self.health,
                "SELECT pg_current_wal_lsn(), \
                        (SELECT row_to_json(s)::text FROM pg_replication_slots s WHERE slot_name = $1)",
                &[&self.slot],
                |row| {
                    let current = u64::from(row.try_get::<_, PgLsn>(0)?);
                    Ok((current, row.try_get::<_, Option<String>>(1)?))
                },
            )
            .await;
        let Some((current, slot)) = read else {
            return;
        };
        let slot: Option<serde_json::Value> =
            slot.and_then(|text| serde_json::from_str(&text).ok());
        let Some(slot) = slot else {
            self.health.set_failing(
                CHECK_SLOT,
                format!("replication slot {} does not exist", self.slot),
            );
            return;
        };
        match slot_invalidation(&slot) {
            Some(why) => self.health.set_failing(
                CHECK_SLOT,
                format!("replication slot {} is invalidated ({why})", self.slot),
            ),
            None => self.health.set_ok(CHECK_SLOT),
        }
        // What the slot confirmed is durable too (the source confirms only
        // durable positions, and moves an idle slot past WAL of no interest).
        let confirmed = slot
            .get("confirmed_flush_lsn")
            .and_then(serde_json::Value::as_str)
            .and_then(|lsn| lsn.parse::<PgLsn>().ok())
            .map_or(0, u64::from);
        let durable = self.durable_lsn.load(Ordering::Acquire).max(confirmed);
        let lag = current.saturating_sub(durable);
        self.metrics.slot_lag(lag);
        self.metrics.checkpoint_lsn(durable);
        let acknowledged = self.acknowledged.load(Ordering::Acquire);
        match stall.observe(lag, (durable, acknowledged), Instant::now()) {
            Some(reason) => self.health.set_failing(
                CHECK_PROGRESS,
                format!(
                    "{reason}: the checkpoint stays at {:X}/{:X}, {lag} bytes of WAL behind",
                    durable >> 32,
                    durable & 0xFFFF_FFFF
                ),
            ),
            None => self.health.set_ok(CHECK_PROGRESS),
        }
    }
}

/// Why PostgreSQL will not decode from this slot any more, read from its
/// `pg_replication_slots` row (`wal_status` lost; `conflicting` or
/// `invalidation_reason` on newer servers); `None` while it is usable.
pub fn slot_invalidation(slot: &serde_json::Value) -> Option<String> {
    if let Some(reason) = slot
        .get("invalidation_reason")
        .and_then(serde_json::Value::as_str)
    {
        return Some(reason.to_string());
    }
    if slot.get("wal_status").and_then(serde_json::Value::as_str) == Some("lost") {
        return Some("its WAL was removed: wal_status lost".to_string());
    }
    if slot.get("conflicting").and_then(serde_json::Value::as_bool) == Some(true) {
        return Some("conflict with recovery".to_string());
    }
    None
}

/// The polling backlog: unfinished rows and the age of the oldest. The
/// runtime gives its progress through `acknowledged` (any number that grows
/// when rows are acknowledged, e.g. a count of them).
pub struct BacklogSampler {
    pub pg: PostgresConfig,
    pub acknowledged: Arc<AtomicU64>,
    pub sampling: Sampling,
    pub health: Health,
    pub metrics: &'static Metrics,
}

impl BacklogSampler {
    /// One sample into `health`, for a person's `status` (a stall shows
    /// only over time: one look finds `progress` ok).
    pub async fn check_once(&self) {
        let mut connection = Connection::new(&self.pg, &self.sampling);
        let mut stall = StallWatch::new(self.sampling.stall_after);
        self.sample(&mut connection, &mut stall).await;
    }

    pub async fn run(self, shutdown: CancellationToken) {
        for check in [CHECK_POSTGRES, CHECK_PROGRESS] {
            self.health.expect(check);
        }
        let mut connection = Connection::new(&self.pg, &self.sampling);
        let mut stall = StallWatch::new(self.sampling.stall_after);
        let mut ticker = Ticker::new(self.sampling.interval);
        while ticker.next(&shutdown).await {
            unless_shutdown(&shutdown, self.sample(&mut connection, &mut stall)).await;
        }
    }

    async fn sample(&self, connection: &mut Connection, stall: &mut StallWatch) {
        let read = connection
            .read(
                &self.health,
                "SELECT count(*), EXTRACT(EPOCH FROM now() - min(created_at))::float8 \
                 FROM event_outbox WHERE status IN ('pending', 'processing', 'retry')",
                &[],
                |row| Ok((row.try_get::<_, i64>(0)?, row.try_get::<_, Option<f64>>(1)?)),
            )
            .await;
        let Some((rows, oldest)) = read else {
            return;
        };
        let rows = u64::try_from(rows).unwrap_or(0);
        let oldest =
            oldest.map(|age| Duration::try_from_secs_f64(age.max(0.0)).unwrap_or_default());
        self.metrics.polling_backlog(rows, oldest);
        let position = self.acknowledged.load(Ordering::Acquire);
        match stall.observe(rows, position, Instant::now()) {
            Some(reason) => self.health.set_failing(
                CHECK_PROGRESS,
                format!("{reason}: no outbox row acknowledged, {rows} unfinished"),
            ),
            None => self.health.set_ok(CHECK_PROGRESS),
        }
    }
}

/// MongoDB answers a `ping` within the timeout (a frozen server does not
/// answer at all, so the timeout is what notices it); while it does, the
/// dead letters are counted.
pub struct MongoSampler {
    pub uri: String,
    pub database: String,
    pub sampling: Sampling,
    pub health: Health,
    pub metrics: &'static Metrics,
}

impl MongoSampler {
    /// One ping into `health`.
    pub async fn check_once(&self) {
        match self.sample(&mut None).await {
            Ok(()) => self.health.set_ok(CHECK_MONGODB),
            Err(reason) => self.health.set_failing(CHECK_MONGODB, reason),
        }
    }

    pub async fn run(self, shutdown: CancellationToken) {
        self.health.expect(CHECK_MONGODB);
        let mut client: Option<mongodb::Client> = None;
        let mut ticker = Ticker::new(self.sampling.interval);
        while ticker.next(&shutdown).await {
            match unless_shutdown(&shutdown, self.sample(&mut client)).await {
                Some(Ok(())) => self.health.set_ok(CHECK_MONGODB),
                Some(Err(reason)) => self.health.set_failing(CHECK_MONGODB, reason),
                None => return,
            }
        }
    }

    async fn sample(&self, client: &mut Option<mongodb::Client>) -> Result<(), String> {
        use mongodb::bson::doc;
        if client.is_none() {
            let mut options = mongodb::options::ClientOptions::parse(&self.uri)
                .await
                .map_err(|err| self.scrub(&format!("invalid MONGODB_URI: {}", describe(&err))))?;
            options.app_name = Some("activity-event-processor-sampler".into());
            options.server_selection_timeout = Some(self.sampling.timeout);
            options.connect_timeout = Some(self.sampling.timeout);
            // A frozen server holds a connection open: a connection that
            // is not answered within the timeout is given up.
            *client = Some(
                mongodb::Client::with_options(options)
                    .map_err(|err| self.scrub(&describe(&err)))?,
            );
        }
        let Some(db) = client.as_ref().map(|c| c.database(&self.database)) else {
            return Err("no client".into());
        };
        let timeout = self.sampling.timeout;
        let pinged = tokio::time::timeout(timeout, db.run_command(doc! { "ping": 1 })).await;
        match pinged {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => return Err(self.scrub(&format!("ping failed: {}", describe(&err)))),
            Err(_) => {
                // The driver's pool may hold the connection to a frozen
                // server: start over with a fresh client next time.
                *client = None;
                return Err(format!(
                    "MongoDB did not answer a ping within {} s",
                    timeout.as_secs_f64()
                ));
            }
        }
        let letters = db.collection::<mongodb::bson::Document>("dead_letters");
        let counted = tokio::time::timeout(timeout, async {
            let count = letters.count_documents(doc! {}).await?;
            let oldest = letters
                .find_one(doc! {})
                .sort(doc! { "first_failed_at": 1 })
                .projection(doc! { "first_failed_at": 1 })
                .await?;
            Ok::<_, mongodb::error::Error>((count, oldest))
        })
        .await;
        // Counting is a metric, not a health matter: a failure leaves the
        // last values in place.
        if let Ok(Ok((count, oldest))) = counted {
            let age = oldest
                .and_then(|doc| doc.get_datetime("first_failed_at").ok().copied())
                .map(|at| {
                    let at = std::time::SystemTime::from(at);
                    at.elapsed().unwrap_or_default()
                });
            self.metrics.dead_letters(count, age);
        }
        Ok(())
    }

    fn scrub(&self, text: &str) -> String {
        let secrets = crate::config::uri_secrets(&self.uri);
        let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
        crate::config::scrub(text, &secrets)
    }
}

/// The Kafka brokers answer a metadata request within the timeout (kafka
/// source and relay). `client` is the configuration of the process's own
/// clients (brokers, security settings); `topic` narrows the request to one
/// topic, `None` asks for every topic.
pub struct KafkaSampler {
    pub client: rdkafka::ClientConfig,
    pub topic: Option<String>,
    pub sampling: Sampling,
    pub health: Health,
}

impl KafkaSampler {
    pub async fn run(self, shutdown: CancellationToken) {
        self.health.expect(CHECK_KAFKA);
        let Some(producer) = self.client() else {
            return;
        };
        let mut ticker = Ticker::new(self.sampling.interval);
        while ticker.next(&shutdown).await {
            unless_shutdown(&shutdown, self.sample(producer.clone())).await;
        }
    }

    /// One metadata request into `health`.
    pub async fn check_once(&self) {
        if let Some(producer) = self.client() {
            self.sample(producer).await;
        }
    }

    fn client(&self) -> Option<Arc<rdkafka::producer::BaseProducer>> {
        match self.client.create() {
            Ok(producer) => Some(Arc::new(producer)),
            Err(err) => {
                self.health
                    .set_failing(CHECK_KAFKA, format!("cannot create a Kafka client: {err}"));
                None
            }
        }
    }

    async fn sample(&self, producer: Arc<rdkafka::producer::BaseProducer>) {
        let (topic, timeout) = (self.topic.clone(), self.sampling.timeout);
        // librdkafka blocks: off the async workers.
        let answered = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(topic.as_deref(), timeout)
                .map(|metadata| metadata.brokers().len())
        })
        .await;
        match answered {
            Ok(Ok(brokers)) if brokers > 0 => self.health.set_ok(CHECK_KAFKA),
            Ok(Ok(_)) => self
                .health
                .set_failing(CHECK_KAFKA, "Kafka knows no broker"),
            Ok(Err(err)) => self.health.set_failing(
                CHECK_KAFKA,
                format!(
                    "the Kafka brokers did not answer a metadata request within {} s: {err}",
                    timeout.as_secs_f64()
                ),
            ),
            Err(err) => self
                .health
                .set_failing(CHECK_KAFKA, format!("the metadata request failed: {err}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalidated_slots_are_seen() {
        let usable = serde_json::json!({"wal_status": "reserved", "conflicting": false});
        assert_eq!(slot_invalidation(&usable), None);
        let lost = serde_json::json!({"wal_status": "lost"});
        assert!(slot_invalidation(&lost).is_some_and(|why| why.contains("lost")));
        let pg17 = serde_json::json!({"wal_status": "lost", "invalidation_reason": "wal_removed"});
        assert_eq!(slot_invalidation(&pg17).as_deref(), Some("wal_removed"));
        let conflict = serde_json::json!({"wal_status": "reserved", "conflicting": true});
        assert!(slot_invalidation(&conflict).is_some());
    }
}
