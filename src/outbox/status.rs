//! `status`: what the outbox holds and whether the database suits capture.

use super::OutboxError;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use tokio_postgres::Client;

/// The outbox at a glance.
#[derive(Debug, Serialize, PartialEq)]
pub struct OutboxStatus {
    pub database: String,
    pub server_version: String,
    pub wal_level: String,
    /// Row count per status; every status of the CHECK constraint is present.
    pub counts: BTreeMap<String, i64>,
    pub total: i64,
    pub oldest_pending_age_seconds: Option<f64>,
    /// `created_at` of the oldest pending (or retry) row.
    pub oldest_pending_created_at: Option<chrono::DateTime<chrono::Utc>>,
    pub max_sequence_id: Option<i64>,
    /// The replication slot, when it exists.
    pub slot: Option<SlotStatus>,
    /// The read models, when MongoDB answered.
    pub read_models: Option<ReadModelStatus>,
    /// Why the read models are missing, when MongoDB did not answer.
    pub read_models_error: Option<String>,
}

/// The capture slot's position against the database's.
#[derive(Debug, Serialize, PartialEq)]
pub struct SlotStatus {
    pub name: String,
    pub active: bool,
    /// WAL the slot still retains past its confirmed position, in bytes.
    pub lag_bytes: Option<i64>,
    /// Outbox rows not yet applied (pending or retry): the lag in events
    /// (meaningful with MARK_PROCESSED on).
    pub lag_events: i64,
}

/// What the read models hold.
#[derive(Debug, Serialize, PartialEq)]
pub struct ReadModelStatus {
    pub users: u64,
    pub activities: u64,
    pub dead_letters: u64,
    /// Highest `sequence_id` applied to any aggregate.
    pub last_applied_sequence_id: Option<i64>,
}

pub const STATUSES: [&str; 5] = ["pending", "processing", "processed", "retry", "failed"];

pub async fn read(
    client: &Client,
    database: &str,
    slot_name: &str,
) -> Result<OutboxStatus, OutboxError> {
    let settings = client
        .query_one(
            "SELECT current_setting('server_version'), current_setting('wal_level')",
            &[],
        )
        .await
        .map_err(|e| OutboxError::query("cannot read server settings", e))?;
    let mut counts: BTreeMap<String, i64> = STATUSES.iter().map(|s| (s.to_string(), 0)).collect();
    let rows = client
        .query(
            "SELECT status, count(*) FROM event_outbox GROUP BY status",
            &[],
        )
        .await
        .map_err(|e| {
            OutboxError::query(
                "cannot read event_outbox (run `event-processor migrate` first?)",
                e,
            )
        })?;
    for row in rows {
        counts.insert(row.get(0), row.get(1));
    }
    let summary = client
        .query_one(
            "SELECT
                 EXTRACT(EPOCH FROM (now() - min(created_at) FILTER (WHERE status IN ('pending', 'retry'))))::float8,
                 max(sequence_id),
                 min(created_at) FILTER (WHERE status IN ('pending', 'retry'))
             FROM event_outbox",
            &[],
        )
        .await
        .map_err(|e| OutboxError::query("cannot summarize event_outbox", e))?;
    let slot = client
        .query_opt(
            "SELECT active, pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot_name],
        )
        .await
        .map_err(|e| OutboxError::query("cannot read the replication slot", e))?
        .map(|row| SlotStatus {
            name: slot_name.to_string(),
            active: row.get(0),
            lag_bytes: row.get(1),
            lag_events: counts.get("pending").copied().unwrap_or(0)
                + counts.get("retry").copied().unwrap_or(0),
        });
    Ok(OutboxStatus {
        slot,
        read_models: None,
        read_models_error: None,
        database: database.to_string(),
        server_version: settings.get(0),
        wal_level: settings.get(1),
        total: counts.values().sum(),
        counts,
        oldest_pending_age_seconds: summary.get(0),
        max_sequence_id: summary.get(1),
        oldest_pending_created_at: summary.get(2),
    })
}

impl OutboxStatus {
    /// The human-readable form.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "outbox {} (PostgreSQL {})",
            self.database, self.server_version
        );
        for status in STATUSES {
            let count = self.counts.get(status).copied().unwrap_or(0);
            let _ = writeln!(out, "  {status:<11} {count:>10}");
        }
        let _ = writeln!(out, "  {:<11} {:>10}", "total", self.total);
        let _ = writeln!(
            out,
            "oldest pending: {}",
            match (
                self.oldest_pending_age_seconds,
                self.oldest_pending_created_at
            ) {
                (Some(age), Some(created)) => format!(
                    "{} ago (created_at {})",
                    format_age(age),
                    created.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                ),
                (Some(age), None) => format!("{} ago", format_age(age)),
                (None, _) => "none".to_string(),
            }
        );
        let _ = writeln!(
            out,
            "highest sequence_id: {}",
            self.max_sequence_id
                .map_or("none".to_string(), |s| s.to_string())
        );
        match &self.slot {
            Some(slot) => {
                let _ = writeln!(
                    out,
                    "slot {}: {}, lag {} bytes, {} not yet applied",
                    slot.name,
                    if slot.active { "active" } else { "inactive" },
                    slot.lag_bytes.map_or("?".into(), |b| b.to_string()),
                    counted(slot.lag_events, "event", "events")
                );
            }
            None => {
                let _ = writeln!(out, "slot: none yet (created by the first `run`)");
            }
        }
        match (&self.read_models, &self.read_models_error) {
            (Some(m), _) => {
                let _ = writeln!(
                    out,
                    "read models: {}, {}, {}; last applied sequence_id {}",
                    counted(m.users, "user", "users"),
                    counted(m.activities, "activity", "activities"),
                    counted(m.dead_letters, "dead letter", "dead letters"),
                    m.last_applied_sequence_id
                        .map_or("none".to_string(), |s| s.to_string())
                );
            }
            (None, Some(err)) => {
                let _ = writeln!(out, "read models: unavailable ({err})");
            }
            (None, None) => {}
        }
        if self.wal_level == "logical" {
            let _ = writeln!(out, "wal_level: logical (replication capture available)");
        } else {
            let _ = writeln!(
                out,
                "wal_level: {} - logical replication capture (the default source) needs \
                 wal_level=logical: set it in postgresql.conf and restart PostgreSQL, \
                 or run with --source polling",
                self.wal_level
            );
        }
        out
    }
}

/// `1 user`, `2 users`, `0 users`.
fn counted<N: Into<i128>>(count: N, one: &str, many: &str) -> String {
    let count = count.into();
    format!("{count} {}", if count == 1 { one } else { many })
}

/// `3s`, `4m 10s`, `2h 5m`, `3d 4h`.
pub fn format_age(seconds: f64) -> String {
    let total = seconds.max(0.0).round() as u64;
    let (d, h, m, s) = (
        total / 86_400,
        total / 3600 % 24,
        total / 60 % 60,
        total % 60,
    );
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wal_level_below_logical_is_said_plainly() {
        let status = OutboxStatus {
            database: "db:5432/activity".into(),
            server_version: "15".into(),
            wal_level: "replica".into(),
            counts: STATUSES.iter().map(|s| (s.to_string(), 0)).collect(),
            total: 0,
            oldest_pending_age_seconds: None,
            oldest_pending_created_at: None,
            max_sequence_id: None,
            slot: None,
            read_models: None,
            read_models_error: Some("mongodb unavailable".into()),
        };
        let text = status.render();
        assert!(
            text.contains("wal_level: replica - logical replication capture (the default source) needs wal_level=logical"),
            "{text}"
        );
        assert!(text.contains("or run with --source polling"), "{text}");
        assert!(
            text.contains("read models: unavailable (mongodb unavailable)"),
            "{text}"
        );
    }

    #[test]
    fn counts_of_one_are_singular_and_the_oldest_pending_row_is_dated() {
        let created = chrono::DateTime::parse_from_rfc3339("2026-09-15T09:41:07.5Z")
            .map(|t| t.with_timezone(&chrono::Utc))
            .ok();
        let status = OutboxStatus {
            database: "db:5432/activity".into(),
            server_version: "15".into(),
            wal_level: "logical".into(),
            counts: STATUSES.iter().map(|s| (s.to_string(), 0)).collect(),
            total: 0,
            oldest_pending_age_seconds: Some(7_077_600.0),
            oldest_pending_created_at: created,
            max_sequence_id: Some(4),
            slot: Some(SlotStatus {
                name: "s".into(),
                active: false,
                lag_bytes: Some(10),
                lag_events: 1,
            }),
            read_models: Some(ReadModelStatus {
                users: 1,
                activities: 1,
                dead_letters: 1,
                last_applied_sequence_id: Some(4),
            }),
            read_models_error: None,
        };
        let text = status.render();
        assert!(
            text.contains(
                "\nread models: 1 user, 1 activity, 1 dead letter; last applied sequence_id 4\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("\nslot s: inactive, lag 10 bytes, 1 event not yet applied\n"),
            "{text}"
        );
        assert!(
            text.contains("\noldest pending: 81d 22h ago (created_at 2026-09-15T09:41:07Z)\n"),
            "{text}"
        );
        let status = OutboxStatus {
            read_models: Some(ReadModelStatus {
                users: 0,
                activities: 2,
                dead_letters: 0,
                last_applied_sequence_id: None,
            }),
            ..status
        };
        assert!(
            status
                .render()
                .contains("\nread models: 0 users, 2 activities, 0 dead letters; last applied sequence_id none\n"),
            "{}",
            status.render()
        );
    }

    #[test]
    fn ages_read_naturally() {
        assert_eq!(format_age(0.4), "0s");
        assert_eq!(format_age(59.0), "59s");
        assert_eq!(format_age(250.0), "4m 10s");
        assert_eq!(format_age(7500.0), "2h 5m");
        assert_eq!(format_age(273_600.0), "3d 4h");
        assert_eq!(format_age(-5.0), "0s");
    }
}
