//! The heartbeat: every `HEARTBEAT_INTERVAL` a transactional logical message
//! goes into the WAL, so the replication stream carries something even on an
//! idle outbox. The slot moves past it, and its round trip (sent here,
//! received by the replication source) measures latency when no event flows.
//!
//! The source sees it only when `START_REPLICATION` asks pgoutput for
//! messages (`"messages" 'true'`); [`parse_logical_message`] reads the
//! pgoutput `M` message and [`heartbeat_sent_at`] the time in it.

use super::metrics::Metrics;
use crate::config::PostgresConfig;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

/// The prefix of heartbeat messages (other logical messages of this
/// processor, the sweep's watermark and the caught-up probe, use
/// `activity-event-processor`).
pub const HEARTBEAT_PREFIX: &str = "activity-event-processor.heartbeat";

/// Every so often unless `HEARTBEAT_INTERVAL` says otherwise.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);

/// The content of a heartbeat sent at `sent`: `sent_at_us=<microseconds
/// since the Unix epoch>`.
pub fn heartbeat_payload(sent: SystemTime) -> String {
    let micros = sent
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_micros());
    format!("sent_at_us={micros}")
}

/// When the heartbeat with this prefix and content was sent; `None` for
/// any other logical message.
pub fn heartbeat_sent_at(prefix: &str, content: &[u8]) -> Option<SystemTime> {
    if prefix != HEARTBEAT_PREFIX {
        return None;
    }
    let micros: u64 = std::str::from_utf8(content)
        .ok()?
        .strip_prefix("sent_at_us=")?
        .parse()
        .ok()?;
    UNIX_EPOCH.checked_add(Duration::from_micros(micros))
}

/// A pgoutput logical decoding message (`M`), as protocol version 1 sends it
/// outside a streamed transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalMessage<'a> {
    pub transactional: bool,
    pub lsn: u64,
    pub prefix: &'a str,
    pub content: &'a [u8],
}

/// Reads a pgoutput `M` message: `Byte1('M') Int8 flags Int64 lsn String
/// prefix Int32 length Byte[length] content`. `None` for any other message
/// or a malformed one.
/// (<https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html>)
pub fn parse_logical_message(message: &[u8]) -> Option<LogicalMessage<'_>> {
    let rest = message.strip_prefix(b"M")?;
    let (&flags, rest) = rest.split_first()?;
    let (lsn, rest) = rest.split_first_chunk::<8>()?;
    let nul = rest.iter().position(|&b| b == 0)?;
    let prefix = std::str::from_utf8(&rest[..nul]).ok()?;
    let rest = &rest[nul + 1..];
    let (length, rest) = rest.split_first_chunk::<4>()?;
    let length = usize::try_from(u32::from_be_bytes(*length)).ok()?;
    let content = rest.get(..length)?;
    Some(LogicalMessage {
        transactional: flags & 1 == 1,
        lsn: u64::from_be_bytes(*lsn),
        prefix,
        content,
    })
}

/// Writes one heartbeat; returns the LSN of the message.
pub async fn emit(
    client: &tokio_postgres::Client,
    sent: SystemTime,
) -> Result<u64, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT pg_logical_emit_message(true, $1, $2)",
            &[&HEARTBEAT_PREFIX, &heartbeat_payload(sent)],
        )
        .await?;
    let lsn: tokio_postgres::types::PgLsn = row.try_get(0)?;
    Ok(u64::from(lsn))
}

/// Writes a heartbeat every `interval` on a connection of its own until
/// `shutdown`, reconnecting when PostgreSQL goes away: a failure never stops
/// it (nor the process). A failure is logged when it starts and when it
/// ends (readiness is the samplers' to report).
pub async fn run_emitter(
    pg: PostgresConfig,
    interval: Duration,
    metrics: &'static Metrics,
    shutdown: CancellationToken,
) {
    // How long one attempt (connecting, writing) may take.
    let patience = interval.clamp(Duration::from_secs(1), Duration::from_secs(10));
    let mut client: Option<tokio_postgres::Client> = None;
    let mut failing_since: Option<std::time::Instant> = None;
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            // Shutdown first: a heartbeat is never worth delaying it.
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let attempt = async {
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                client = Some(super::samplers::connect(&pg, patience).await?);
            }
            let Some(c) = client.as_ref() else {
                return Err("no connection".to_string());
            };
            tokio::time::timeout(patience, emit(c, SystemTime::now()))
                .await
                .map_err(|_| format!("no answer within {} s", patience.as_secs_f64()))?
                .map_err(|err| crate::outbox::describe(&err))
        };
        let result = tokio::select! {
            biased;
            // A shutdown does not wait for a connection attempt or a write
            // to a server that does not answer.
            _ = shutdown.cancelled() => return,
            result = attempt => result,
        };
        match result {
            Ok(_) => {
                metrics.heartbeat_emitted();
                if let Some(since) = failing_since.take() {
                    tracing::info!(
                        after_seconds = since.elapsed().as_secs(),
                        "heartbeats are written again"
                    );
                }
            }
            Err(reason) => {
                client = None;
                if failing_since.is_none() {
                    failing_since = Some(std::time::Instant::now());
                    tracing::warn!(
                        %reason,
                        interval_seconds = interval.as_secs_f64(),
                        "cannot write the heartbeat; retrying every interval \
                         (HEARTBEAT_INTERVAL=off stops the heartbeat)"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_gives_back_its_time() {
        let sent = UNIX_EPOCH + Duration::from_micros(1_764_000_000_123_456);
        let payload = heartbeat_payload(sent);
        assert_eq!(
            heartbeat_sent_at(HEARTBEAT_PREFIX, payload.as_bytes()),
            Some(sent)
        );
        assert_eq!(
            heartbeat_sent_at("activity-event-processor", payload.as_bytes()),
            None
        );
        assert_eq!(heartbeat_sent_at(HEARTBEAT_PREFIX, b"sent_at_us=x"), None);
        assert_eq!(
            heartbeat_sent_at(HEARTBEAT_PREFIX, b"caught-up-probe"),
            None
        );
    }

    #[test]
    fn pgoutput_messages_are_read() {
        let mut bytes = vec![b'M', 1];
        bytes.extend_from_slice(&0x0000_0001_0000_0028u64.to_be_bytes());
        bytes.extend_from_slice(b"p\0");
        bytes.extend_from_slice(&3u32.to_be_bytes());
        bytes.extend_from_slice(b"abc");
        assert_eq!(
            parse_logical_message(&bytes),
            Some(LogicalMessage {
                transactional: true,
                lsn: 0x0000_0001_0000_0028,
                prefix: "p",
                content: b"abc",
            })
        );
        assert_eq!(parse_logical_message(&bytes[..bytes.len() - 1]), None);
        assert_eq!(parse_logical_message(b"B"), None);
        assert_eq!(parse_logical_message(b""), None);
    }
}
