//! `status`: the outbox at a glance, the read models, and the readiness
//! checks of the configured source, looked at once by this command (the
//! checks a running `run` serves on `/readyz`, docs/operating.md); and, when
//! a process serves `/readyz` on `METRICS_ADDR`, that process's own view.

use crate::config::{Config, SourceKind};
use crate::observe::samplers::{
    BacklogSampler, KafkaSampler, MongoSampler, Sampling, SlotLagSampler, CHECK_PROGRESS,
};
use crate::observe::{self, Health};
use crate::outbox::{self, status::OutboxStatus};
use crate::telemetry::Chain;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long one look at a dependency may take.
const PATIENCE: Duration = Duration::from_secs(3);

/// What `status` prints: the outbox, and the checks.
#[derive(Debug, Serialize)]
pub struct Status {
    #[serde(flatten)]
    pub outbox: OutboxStatus,
    /// The readiness checks of the configured source, as this command saw
    /// them (`progress` is left out: one look cannot tell a stall).
    pub checks: Vec<Check>,
    /// The `/readyz` of a process serving on `METRICS_ADDR`, if asked.
    pub running: Option<Running>,
}

/// One readiness check, as `/readyz` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    /// `ok` or `failing`.
    pub state: String,
    pub reason: Option<String>,
    /// When it entered its state (RFC 3339).
    pub since: String,
}

/// A `/readyz` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Readiness {
    pub ready: bool,
    pub checks: Vec<Check>,
}

/// What a running process's `/readyz` said, or why it could not be read.
#[derive(Debug, Serialize)]
pub struct Running {
    pub address: String,
    pub readiness: Option<Readiness>,
    pub error: Option<String>,
}

/// Reads everything `status` shows. Fails only when PostgreSQL cannot be
/// read (the outbox is what `status` is about).
pub async fn read(config: &Config) -> anyhow::Result<Status> {
    let client = outbox::connect(&config.postgres).await?;
    let mut outbox = outbox::status::read(
        &client,
        &config.postgres.display_target(),
        &config.replication.slot,
    )
    .await?;
    let (models, checks, running) = tokio::join!(
        super::read_model_status(config),
        checks(config),
        running(config.metrics_addr),
    );
    match models {
        Ok(models) => outbox.read_models = Some(models),
        Err(err) => outbox.read_models_error = Some(config.scrub(&Chain(&err).to_string())),
    }
    let checks = checks
        .into_iter()
        .map(|check| Check {
            reason: check.reason.map(|reason| config.scrub(&reason)),
            name: check.name,
            state: check.state.to_string(),
            since: check.since,
        })
        .collect();
    Ok(Status {
        outbox,
        checks,
        running,
    })
}

/// One look at each dependency of the configured source: PostgreSQL and the
/// slot (replication) or the backlog (polling), MongoDB, and Kafka for the
/// kafka source.
async fn checks(config: &Config) -> Vec<observe::health::CheckReport> {
    let health = Health::unlogged();
    let sampling = Sampling {
        timeout: PATIENCE,
        ..Sampling::default()
    };
    let metrics = observe::install();
    let mongodb = MongoSampler {
        uri: config.mongodb.uri.expose().to_string(),
        database: config.mongodb.database.clone(),
        sampling,
        health: health.clone(),
        metrics,
    };
    let capture = async {
        match config.source {
            SourceKind::Replication => {
                SlotLagSampler {
                    pg: config.postgres.clone(),
                    slot: config.replication.slot.clone(),
                    durable_lsn: Arc::default(),
                    acknowledged: Arc::default(),
                    sampling,
                    health: health.clone(),
                    metrics,
                }
                .check_once()
                .await
            }
            SourceKind::Polling => {
                BacklogSampler {
                    pg: config.postgres.clone(),
                    acknowledged: Arc::default(),
                    sampling,
                    health: health.clone(),
                    metrics,
                }
                .check_once()
                .await
            }
            SourceKind::Kafka => {
                let mut client = crate::source::kafka::base_config(&config.kafka);
                client.set("allow.auto.create.topics", "false");
                KafkaSampler {
                    client,
                    topic: config.kafka.topics.first().cloned(),
                    sampling,
                    health: health.clone(),
                }
                .check_once()
                .await
            }
        }
    };
    tokio::join!(capture, mongodb.check_once());
    health
        .readiness()
        .checks
        .into_iter()
        .filter(|check| check.name != CHECK_PROGRESS)
        .collect()
}

/// The `/readyz` of a process serving on `addr` (an unspecified address is
/// asked on loopback; port 0 names no process).
async fn running(addr: Option<SocketAddr>) -> Option<Running> {
    let mut addr = addr.filter(|addr| addr.port() != 0)?;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let read = tokio::time::timeout(PATIENCE, readyz(addr)).await;
    let (readiness, error) = match read {
        Ok(Ok(readiness)) => (Some(readiness), None),
        Ok(Err(err)) => (None, Some(err)),
        Err(_) => (None, Some(format!("no answer within {PATIENCE:?}"))),
    };
    Some(Running {
        address: addr.to_string(),
        readiness,
        error,
    })
}

/// `GET /readyz`, read whole (the server sends whole bodies).
async fn readyz(addr: SocketAddr) -> Result<Readiness, String> {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|err| format!("nothing answers there: {err}"))?;
    let request = format!("GET /readyz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|err| format!("cannot ask it: {err}"))?;
    let mut response = Vec::new();
    stream
        .take(1 << 20)
        .read_to_end(&mut response)
        .await
        .map_err(|err| format!("cannot read its answer: {err}"))?;
    let response = String::from_utf8_lossy(&response);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body)
        .ok_or("its answer is not HTTP")?;
    serde_json::from_str(body).map_err(|_| "its answer is not a /readyz body".to_string())
}

impl Status {
    /// The human-readable form: the outbox's, then the checks.
    pub fn render(&self) -> String {
        let mut out = self.outbox.render();
        let _ = writeln!(out, "checks (looked at once by this command):");
        render_checks(&mut out, &self.checks);
        let _ = writeln!(
            out,
            "  {:<21} not judged by one look (a stall shows over time: see a running \
             process's /readyz)",
            "progress"
        );
        match &self.running {
            None => {}
            Some(Running {
                address,
                readiness: Some(readiness),
                ..
            }) => {
                let _ = writeln!(
                    out,
                    "running process on {address} (its /readyz): {}",
                    if readiness.ready {
                        "ready"
                    } else {
                        "NOT ready"
                    }
                );
                render_checks(&mut out, &readiness.checks);
            }
            Some(Running { address, error, .. }) => {
                let why = error.as_deref().unwrap_or("no answer");
                let _ = writeln!(out, "no running process seen on {address} ({why})");
            }
        }
        out
    }
}

fn render_checks(out: &mut String, checks: &[Check]) {
    for check in checks {
        let _ = match &check.reason {
            Some(reason) if check.state != "ok" => {
                writeln!(out, "  {:<21} {}: {reason}", check.name, check.state)
            }
            _ => writeln!(out, "  {:<21} {}", check.name, check.state),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::status::STATUSES;

    #[test]
    fn checks_and_the_running_process_are_said_plainly() {
        let check = |name: &str, reason: Option<&str>| Check {
            name: name.into(),
            state: if reason.is_some() { "failing" } else { "ok" }.into(),
            reason: reason.map(str::to_string),
            since: "2026-12-06T12:00:00.000Z".into(),
        };
        let status = Status {
            outbox: OutboxStatus {
                database: "db:5432/activity".into(),
                server_version: "15".into(),
                wal_level: "logical".into(),
                counts: STATUSES.iter().map(|s| (s.to_string(), 0)).collect(),
                total: 0,
                oldest_pending_age_seconds: None,
                oldest_pending_created_at: None,
                max_sequence_id: None,
                slot: None,
                read_models: None,
                read_models_error: None,
            },
            checks: vec![
                check("mongodb", Some("cannot reach MongoDB")),
                check("postgres", None),
            ],
            running: Some(Running {
                address: "127.0.0.1:9464".into(),
                readiness: Some(Readiness {
                    ready: false,
                    checks: vec![check("runtime_mongodb", Some("writing a batch failed"))],
                }),
                error: None,
            }),
        };
        let text = status.render();
        assert!(
            text.contains("  mongodb               failing: cannot reach MongoDB\n"),
            "{text}"
        );
        assert!(text.contains("  postgres              ok\n"), "{text}");
        assert!(
            text.contains("running process on 127.0.0.1:9464 (its /readyz): NOT ready\n"),
            "{text}"
        );
        assert!(
            text.contains("  runtime_mongodb       failing: writing a batch failed\n"),
            "{text}"
        );
        let json: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&status).expect("JSON")).expect("parse");
        assert_eq!(json["checks"][0]["name"], "mongodb");
        assert_eq!(json["running"]["readiness"]["ready"], false);
        assert_eq!(
            json["database"], "db:5432/activity",
            "the outbox's fields stay"
        );
    }
}
