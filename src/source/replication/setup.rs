//! What must hold before streaming: the server settings, the outbox table, the
//! publication, and the state of the slot. Everything here runs on ordinary SQL
//! connections; problems that retrying cannot fix become [`SourceError::Fatal`]
//! with a message that tells the operator what to do.

use crate::config::PostgresConfig;
use crate::outbox::describe;
use crate::policy::Classify;
use crate::source::SourceError;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::PgLsn;
use tokio_postgres::{Client, NoTls};

/// `wal_level` is not `logical`: replication cannot work until an operator
/// changes the server's configuration.
pub(crate) fn wal_level_message(actual: &str) -> String {
    format!(
        "logical replication needs wal_level=logical, but the server has wal_level={actual}: \
         set wal_level=logical in postgresql.conf and restart PostgreSQL, \
         or run with --source polling"
    )
}

pub(super) fn no_replication_privilege_message(user: &str, detail: &str) -> String {
    format!(
        "user `{user}` may not use logical replication ({detail}): \
         run `ALTER ROLE {user} WITH REPLICATION` as a superuser, or run with --source polling"
    )
}

pub(super) fn slots_exhausted_message(max: &str) -> String {
    format!(
        "cannot create the replication slot: \
         all {max} replication slots (max_replication_slots) are in use: \
         drop unused slots \
         (SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE NOT active) \
         or raise max_replication_slots in postgresql.conf and restart PostgreSQL"
    )
}

const OUTBOX_MISSING: &str =
    "table event_outbox does not exist in this database: run `event-processor migrate` first";

/// Opens an ordinary connection, sorting a failure into transient (the server
/// is unreachable or starting) and fatal (credentials, missing database).
pub(super) async fn connect(pg: &PostgresConfig) -> Result<Client, SourceError> {
    let (client, connection) = pg.to_client_config().connect(NoTls).await.map_err(|err| {
        let text = format!(
            "cannot connect to PostgreSQL at {}: {}",
            pg.display_target(),
            describe(&err)
        );
        if is_fatal(&err) {
            SourceError::Fatal(text)
        } else {
            SourceError::transient(err.retry_class(), text)
        }
    })?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(error = %describe(&err), "postgres connection closed");
        }
    });
    Ok(client)
}

/// A connection whose text output is what the row decoder reads: timestamps
/// in ISO form and UTC, whatever the server's defaults.
pub(super) async fn connect_text(pg: &PostgresConfig) -> Result<Client, SourceError> {
    let client = connect(pg).await?;
    client
        .batch_execute("SET DateStyle = ISO; SET TimeZone = 'UTC'")
        .await
        .map_err(|err| query_error("setting the session's date style", &err))?;
    Ok(client)
}

/// Server errors that a retry cannot cure: syntax, privileges, undefined objects
/// (class 42), credentials (28), a missing database (3D).
fn is_fatal(err: &tokio_postgres::Error) -> bool {
    err.as_db_error().is_some_and(|db| {
        let code = db.code().code();
        code.starts_with("42") || code.starts_with("28") || code.starts_with("3D")
    })
}

/// A query error, sorted like a connection error.
pub(super) fn query_error(context: &str, err: &tokio_postgres::Error) -> SourceError {
    let text = format!("{context}: {}", describe(err));
    if is_fatal(err) {
        SourceError::Fatal(text)
    } else {
        SourceError::transient(err.retry_class(), text)
    }
}

/// `wal_level`, and the outbox table.
pub(super) async fn preflight(client: &Client) -> Result<(), SourceError> {
    let row = client
        .query_one(
            "SELECT current_setting('wal_level'), to_regclass('event_outbox') IS NOT NULL",
            &[],
        )
        .await
        .map_err(|err| query_error("checking the server settings", &err))?;
    let wal_level: String = row.get(0);
    if wal_level != "logical" {
        return Err(SourceError::Fatal(wal_level_message(&wal_level)));
    }
    let outbox_exists: bool = row.get(1);
    if !outbox_exists {
        return Err(SourceError::Fatal(OUTBOX_MISSING.to_string()));
    }
    Ok(())
}

/// `"name"`, for SQL.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Creates the publication of outbox inserts if it is missing; an existing one
/// must publish inserts of `event_outbox`.
pub(super) async fn ensure_publication(client: &Client, name: &str) -> Result<(), SourceError> {
    let existing = client
        .query_opt(
            "SELECT p.pubinsert, EXISTS (SELECT 1 FROM pg_publication_tables t \
                 WHERE t.pubname = p.pubname AND t.tablename = 'event_outbox') \
             FROM pg_publication p WHERE p.pubname = $1",
            &[&name],
        )
        .await
        .map_err(|err| query_error("looking up the publication", &err))?;
    match existing {
        Some(row) => {
            let (inserts, outbox): (bool, bool) = (row.get(0), row.get(1));
            if !inserts || !outbox {
                return Err(SourceError::Fatal(format!(
                    "publication `{name}` exists but does not publish inserts of event_outbox: \
                     run `ALTER PUBLICATION {name} ADD TABLE event_outbox` and \
                     `ALTER PUBLICATION {name} SET (publish = 'insert')`, \
                     or set PUBLICATION to another name"
                )));
            }
            Ok(())
        }
        None => {
            let sql = format!(
                "CREATE PUBLICATION {} FOR TABLE event_outbox WITH (publish = 'insert')",
                quote_ident(name)
            );
            match client.batch_execute(&sql).await {
                Ok(()) => {
                    tracing::info!(
                        publication = name,
                        "created the publication of outbox inserts"
                    );
                    Ok(())
                }
                // Another processor created it at the same moment.
                Err(err) if err.code() == Some(&SqlState::DUPLICATE_OBJECT) => Ok(()),
                Err(err) if err.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {
                    Err(SourceError::Fatal(format!(
                        "cannot create publication `{name}`: {}: \
                         ask the table owner to run `{sql}`",
                        describe(&err)
                    )))
                }
                Err(err) => Err(query_error("creating the publication", &err)),
            }
        }
    }
}

/// What the server says about our slot.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct SlotInfo {
    /// The walsender using it, if any.
    pub active_pid: Option<i32>,
    pub confirmed_flush: Option<u64>,
    /// Invalidated (its WAL was removed): it can never stream again.
    pub lost: bool,
}

/// Our slot, if it exists. A slot of that name that is not a pgoutput slot of
/// this database is an operator's mistake, never ours to drop.
pub(super) async fn slot_info(
    client: &Client,
    slot: &str,
    database: &str,
) -> Result<Option<SlotInfo>, SourceError> {
    let row = client
        .query_opt(
            "SELECT slot_type, plugin, database, active_pid, confirmed_flush_lsn, \
                    coalesce(wal_status, '') = 'lost' \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|err| query_error("looking up the replication slot", &err))?;
    let Some(row) = row else {
        return Ok(None);
    };
    let slot_type: String = row.get(0);
    let plugin: Option<String> = row.get(1);
    let slot_database: Option<String> = row.get(2);
    if slot_type != "logical"
        || plugin.as_deref() != Some("pgoutput")
        || slot_database.as_deref() != Some(database)
    {
        return Err(SourceError::Fatal(format!(
            "replication slot `{slot}` already exists as a {slot_type} slot \
             with plugin {} in database {}: \
             it is not ours; set REPLICATION_SLOT to another name",
            plugin.as_deref().unwrap_or("none"),
            slot_database.as_deref().unwrap_or("none"),
        )));
    }
    let confirmed: Option<PgLsn> = row.get(4);
    Ok(Some(SlotInfo {
        active_pid: row.get(3),
        confirmed_flush: confirmed.map(u64::from),
        lost: row.get(5),
    }))
}

/// PostgreSQL invalidated the slot (its WAL was removed, e.g. past
/// `max_slot_wal_keep_size`): it can never stream again, and only an operator
/// may drop it.
pub(super) fn lost_slot_message(slot: &str) -> String {
    format!(
        "replication slot `{slot}` was invalidated by PostgreSQL (the WAL it needed was removed, \
         see max_slot_wal_keep_size): events committed since its last position may be missing \
         from the stream; drop it (SELECT pg_drop_replication_slot('{slot}')) and start again: \
         the processor creates a new slot and reads the whole outbox, which the read models \
         absorb without double-applying anything"
    )
}

/// A new slot needs a free one of `max_replication_slots`.
pub(super) async fn check_slot_capacity(client: &Client) -> Result<(), SourceError> {
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM pg_replication_slots), \
                    current_setting('max_replication_slots')",
            &[],
        )
        .await
        .map_err(|err| query_error("counting replication slots", &err))?;
    let used: i64 = row.get(0);
    let max: String = row.get(1);
    match max.parse::<i64>() {
        Ok(max) if used >= max => Err(SourceError::Fatal(slots_exhausted_message(
            &max.to_string(),
        ))),
        _ => Ok(()),
    }
}

/// A position at or past the commit of every transaction committed so far: a
/// logical message is written (and flushed, being transactional), so the
/// walsender also has something to decode past it and reports a position
/// beyond it even when the outbox is idle.
pub(super) async fn wal_probe(client: &Client) -> Result<u64, SourceError> {
    let emitted = client
        .query_one(
            "SELECT pg_logical_emit_message(true, 'activity-event-processor', 'caught-up-probe')",
            &[],
        )
        .await;
    let row = match emitted {
        Ok(row) => row,
        Err(err) => {
            tracing::debug!(
                error = %describe(&err),
                "cannot emit the caught-up probe; using pg_current_wal_lsn()"
            );
            client
                .query_one("SELECT pg_current_wal_lsn()", &[])
                .await
                .map_err(|err| query_error("reading the current WAL position", &err))?
        }
    };
    let lsn: PgLsn = row.get(0);
    Ok(u64::from(lsn))
}

/// The libpq connection string of the replication connection. Timestamps come
/// out in ISO form and UTC, as the text decoder expects.
pub(super) fn conninfo(pg: &PostgresConfig) -> String {
    fn push(out: &mut String, key: &str, value: &str) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(key);
        out.push_str("='");
        for c in value.chars() {
            if c == '\'' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('\'');
    }
    let mut out = String::new();
    push(&mut out, "host", &pg.host);
    push(&mut out, "port", &pg.port.to_string());
    push(&mut out, "dbname", &pg.database);
    push(&mut out, "user", &pg.user);
    if !pg.password.expose().is_empty() {
        push(&mut out, "password", pg.password.expose());
    }
    push(&mut out, "application_name", "activity-event-processor");
    push(&mut out, "replication", "database");
    push(&mut out, "options", "-c datestyle=ISO -c timezone=UTC");
    let timeout = pg.connect_timeout.as_secs().max(1);
    push(&mut out, "connect_timeout", &timeout.to_string());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use std::time::Duration;

    #[test]
    fn the_wal_level_message_tells_what_to_do() {
        let text = wal_level_message("replica");
        assert!(text.contains("wal_level=replica"), "{text}");
        assert!(
            text.contains(
                "set wal_level=logical in postgresql.conf and restart PostgreSQL, or run with --source polling"
            ),
            "{text}"
        );
    }

    #[test]
    fn other_fatal_messages_name_the_fix() {
        assert!(no_replication_privilege_message("app", "denied")
            .contains("ALTER ROLE app WITH REPLICATION"));
        assert!(slots_exhausted_message("10").contains("max_replication_slots"));
        assert!(OUTBOX_MISSING.contains("run `event-processor migrate` first"));
    }

    #[test]
    fn conninfo_quotes_every_value() {
        let pg = PostgresConfig {
            host: "db.example".into(),
            port: 5433,
            database: "activity".into(),
            user: "o'brien".into(),
            password: Secret::new("p\\w d".to_string()),
            connect_timeout: Duration::from_millis(500),
        };
        assert_eq!(
            conninfo(&pg),
            "host='db.example' port='5433' dbname='activity' user='o\\'brien' password='p\\\\w d' \
             application_name='activity-event-processor' replication='database' \
             options='-c datestyle=ISO -c timezone=UTC' connect_timeout='1'"
        );
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("outbox"), "\"outbox\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
