//! Versioned schema migrations, embedded in the binary.
//!
//! Each migration runs in its own transaction and is recorded with the SHA-256
//! of its text in `event_processor_migrations`. A session-level advisory lock
//! makes concurrent `migrate` runs take turns, so running it twice, or from two
//! processes at once, is safe. An applied migration whose text changed is
//! refused: released migrations are never edited.

use super::PgError;
use sha2::{Digest, Sha256};
use tokio_postgres::Client;

/// One migration: its version, a short name and its SQL.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

impl Migration {
    pub fn checksum(&self) -> String {
        let digest = Sha256::digest(self.sql.as_bytes());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The migrations this binary knows, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "create_event_outbox",
        sql: include_str!("../../migrations/0001_create_event_outbox.sql"),
    },
    Migration {
        version: 2,
        name: "polling_claim_indexes",
        sql: include_str!("../../migrations/0002_polling_claim_indexes.sql"),
    },
];

/// The table recording what was applied.
pub const HISTORY_TABLE: &str = "event_processor_migrations";

/// Key of the advisory lock taken while migrating (arbitrary, fixed).
const LOCK_KEY: i64 = 0x000A_571B_17E5_0001;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(
        "migration {version} ({name}) was applied with checksum {applied} but this binary has \
         {expected}: a released migration was edited; restore the original file and add a new migration instead"
    )]
    ChecksumMismatch {
        version: i32,
        name: String,
        applied: String,
        expected: String,
    },
    #[error(
        "the database has migration {version} ({name}) which this binary does not know: \
         it was migrated by a newer version; use that version"
    )]
    UnknownApplied { version: i32, name: String },
    #[error("migration {version} ({name}) failed")]
    Failed {
        version: i32,
        name: &'static str,
        #[source]
        source: PgError,
    },
    #[error("{context}")]
    Database {
        context: &'static str,
        #[source]
        source: PgError,
    },
}

fn db(context: &'static str) -> impl Fn(tokio_postgres::Error) -> MigrateError {
    move |err| MigrateError::Database {
        context,
        source: crate::policy::Summarised(err),
    }
}

/// What a run did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MigrateReport {
    pub applied: Vec<i32>,
    pub already: Vec<i32>,
}

/// Applies the missing ones of `migrations` in order.
pub async fn apply(
    client: &mut Client,
    migrations: &[Migration],
) -> Result<MigrateReport, MigrateError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY])
        .await
        .map_err(db("cannot take the migration lock"))?;
    let result = apply_locked(client, migrations).await;
    // Released on every path; a dropped connection releases it too.
    let unlock = client
        .execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY])
        .await
        .map_err(db("cannot release the migration lock"));
    let report = result?;
    unlock?;
    Ok(report)
}

async fn apply_locked(
    client: &mut Client,
    migrations: &[Migration],
) -> Result<MigrateReport, MigrateError> {
    client
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {HISTORY_TABLE} (
                version INTEGER PRIMARY KEY,
                name TEXT NOT NULL,
                checksum TEXT NOT NULL,
                applied_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW()
            )"
        ))
        .await
        .map_err(db("cannot create the migration history table"))?;
    let rows = client
        .query(
            &format!("SELECT version, name, checksum FROM {HISTORY_TABLE} ORDER BY version"),
            &[],
        )
        .await
        .map_err(db("cannot read the migration history"))?;

    let mut report = MigrateReport::default();
    for row in &rows {
        let version: i32 = row.get(0);
        let name: String = row.get(1);
        let checksum: String = row.get(2);
        match migrations.iter().find(|m| m.version == version) {
            None => return Err(MigrateError::UnknownApplied { version, name }),
            Some(known) if known.checksum() != checksum => {
                return Err(MigrateError::ChecksumMismatch {
                    version,
                    name,
                    applied: checksum,
                    expected: known.checksum(),
                })
            }
            Some(_) => report.already.push(version),
        }
    }

    for migration in migrations {
        if report.already.contains(&migration.version) {
            continue;
        }
        let failed = |err: tokio_postgres::Error| MigrateError::Failed {
            version: migration.version,
            name: migration.name,
            source: crate::policy::Summarised(err),
        };
        let tx = client.transaction().await.map_err(failed)?;
        tx.batch_execute(migration.sql).await.map_err(failed)?;
        tx.execute(
            &format!("INSERT INTO {HISTORY_TABLE} (version, name, checksum) VALUES ($1, $2, $3)"),
            &[&migration.version, &migration.name, &migration.checksum()],
        )
        .await
        .map_err(failed)?;
        tx.commit().await.map_err(failed)?;
        tracing::info!(
            version = migration.version,
            name = migration.name,
            "migration applied"
        );
        report.applied.push(migration.version);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_strictly_increasing_from_one() {
        for (index, migration) in MIGRATIONS.iter().enumerate() {
            assert_eq!(migration.version, index as i32 + 1, "{}", migration.name);
        }
    }

    #[test]
    fn checksum_is_stable_sha256() {
        let m = Migration {
            version: 1,
            name: "x",
            sql: "",
        };
        assert_eq!(
            m.checksum(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
