//! The seed system's PostgreSQL integration tests, ported by name, against a
//! real PostgreSQL with the outbox migrated (and seeded where they read data).

mod common;

use activity_event_processor::outbox::seed;
use common::TestDb;

async fn seeded() -> (TestDb, tokio_postgres::Client) {
    let db = TestDb::migrated().await;
    let mut client = db.client().await;
    seed::seed(&mut client).await.expect("seed");
    (db, client)
}

mod test_postgresql_connection {
    use super::*;

    #[tokio::test]
    async fn test_connection_successful() {
        let db = TestDb::create().await;
        let client = db.client().await;
        let row = client.query_one("SELECT 1 + 1", &[]).await.expect("query");
        assert_eq!(row.get::<_, i32>(0), 2);
    }

    #[tokio::test]
    async fn test_database_exists() {
        let db = TestDb::create().await;
        let client = db.client().await;
        for name in ["activity", db.config.database.as_str()] {
            let found = client
                .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
                .await
                .expect("query");
            assert!(found.is_some(), "database {name} is missing");
        }
    }

    #[tokio::test]
    async fn test_event_outbox_table_exists() {
        let db = TestDb::migrated().await;
        let client = db.client().await;
        let row = client
            .query_one(
                "SELECT count(*) FROM information_schema.tables
                 WHERE table_schema = 'public' AND table_name = 'event_outbox'",
                &[],
            )
            .await
            .expect("query");
        assert_eq!(row.get::<_, i64>(0), 1);
    }
}

mod test_event_outbox_table {
    use super::*;

    #[tokio::test]
    async fn test_table_columns() {
        let db = TestDb::migrated().await;
        let client = db.client().await;
        let rows = client
            .query(
                "SELECT column_name, data_type, character_maximum_length, is_nullable,
                        coalesce(column_default, '')
                 FROM information_schema.columns
                 WHERE table_schema = 'public' AND table_name = 'event_outbox'
                 ORDER BY ordinal_position",
                &[],
            )
            .await
            .expect("query");
        let actual: Vec<(String, String, Option<i32>, String, String)> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
            .collect();
        let tz = "timestamp with time zone";
        let expected: Vec<(&str, &str, Option<i32>, &str, &str)> = vec![
            ("event_id", "uuid", None, "NO", ""),
            (
                "sequence_id",
                "bigint",
                None,
                "NO",
                "nextval('event_outbox_sequence_id_seq'::regclass)",
            ),
            ("aggregate_id", "uuid", None, "NO", ""),
            ("aggregate_type", "character varying", Some(100), "NO", ""),
            ("event_type", "character varying", Some(100), "NO", ""),
            ("payload", "jsonb", None, "NO", ""),
            (
                "status",
                "character varying",
                Some(20),
                "NO",
                "'pending'::character varying",
            ),
            ("retry_count", "integer", None, "NO", "0"),
            ("last_error", "text", None, "YES", ""),
            ("lock_id", "character varying", Some(100), "YES", ""),
            ("created_at", tz, None, "NO", "now()"),
            ("published_at", tz, None, "YES", ""),
        ];
        let actual: Vec<(&str, &str, Option<i32>, &str, &str)> = actual
            .iter()
            .map(|(a, b, c, d, e)| (a.as_str(), b.as_str(), *c, d.as_str(), e.as_str()))
            .collect();
        assert_eq!(actual, expected);

        let uncommented = client
            .query(
                "SELECT a.attname FROM pg_attribute a
                 WHERE a.attrelid = 'event_outbox'::regclass AND a.attnum > 0 AND NOT a.attisdropped
                   AND col_description(a.attrelid, a.attnum) IS NULL",
                &[],
            )
            .await
            .expect("query");
        let names: Vec<String> = uncommented.iter().map(|r| r.get(0)).collect();
        assert!(names.is_empty(), "columns without a COMMENT: {names:?}");
        let table_comment = client
            .query_one(
                "SELECT obj_description('event_outbox'::regclass, 'pg_class')",
                &[],
            )
            .await
            .expect("query");
        assert!(table_comment.get::<_, Option<String>>(0).is_some());
    }

    #[tokio::test]
    async fn test_table_indexes() {
        let db = TestDb::migrated().await;
        let client = db.client().await;
        let rows = client
            .query(
                "SELECT indexname, indexdef FROM pg_indexes
                 WHERE schemaname = 'public' AND tablename = 'event_outbox'",
                &[],
            )
            .await
            .expect("query");
        let indexes: std::collections::BTreeMap<String, String> =
            rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let expected = [
            ("event_outbox_pkey", "UNIQUE INDEX", "(event_id)"),
            ("idx_event_outbox_status", "INDEX", "(status)"),
            ("idx_event_outbox_created_at", "INDEX", "(created_at)"),
            (
                "idx_event_outbox_aggregate",
                "INDEX",
                "(aggregate_type, aggregate_id)",
            ),
            ("idx_event_outbox_event_type", "INDEX", "(event_type)"),
            ("idx_event_outbox_sequence", "INDEX", "(sequence_id)"),
        ];
        for (name, kind, columns) in expected {
            let def = indexes
                .get(name)
                .unwrap_or_else(|| panic!("index {name} is missing; have {indexes:?}"));
            assert!(def.contains(&format!("CREATE {kind} {name} ON")), "{def}");
            assert!(def.ends_with(&format!("USING btree {columns}")), "{def}");
        }
        let constraint = client
            .query_one(
                "SELECT pg_get_constraintdef(oid) FROM pg_constraint
                 WHERE conrelid = 'event_outbox'::regclass AND conname = 'status_check'",
                &[],
            )
            .await
            .expect("status_check exists");
        let def: String = constraint.get(0);
        for status in ["pending", "processing", "processed", "failed", "retry"] {
            assert!(def.contains(&format!("'{status}'")), "{def}");
        }
    }

    #[tokio::test]
    async fn test_read_test_data() {
        let (_db, client) = seeded().await;
        let rows = client
            .query(
                "SELECT event_id, event_type, status, payload FROM event_outbox ORDER BY sequence_id",
                &[],
            )
            .await
            .expect("query");
        let types: Vec<String> = rows.iter().map(|r| r.get(1)).collect();
        assert_eq!(
            types,
            [
                "UserCreated",
                "UserUpdated",
                "ActivityCreated",
                "ParticipantJoined"
            ]
        );
        for row in &rows {
            assert_eq!(row.get::<_, String>(2), "pending");
            assert!(row.get::<_, serde_json::Value>(3).is_object());
        }
        let ids: Vec<uuid::Uuid> = rows.iter().map(|r| r.get(0)).collect();
        let expected: Vec<uuid::Uuid> = seed::events().iter().map(|e| e.event_id).collect();
        assert_eq!(ids, expected);
    }

    #[tokio::test]
    async fn test_read_user_events() {
        let (_db, client) = seeded().await;
        let rows = client
            .query(
                "SELECT aggregate_id, event_type, payload FROM event_outbox
                 WHERE aggregate_type = 'User' ORDER BY sequence_id",
                &[],
            )
            .await
            .expect("query");
        assert_eq!(rows.len(), 2);
        for row in &rows {
            assert_eq!(row.get::<_, uuid::Uuid>(0), seed::USER_ID);
        }
        assert_eq!(rows[0].get::<_, String>(1), "UserCreated");
        assert_eq!(rows[1].get::<_, String>(1), "UserUpdated");
        let created: serde_json::Value = rows[0].get(2);
        assert_eq!(created["email"], "alice.martin@example.com");
        assert_eq!(created["displayName"], "Alice Martin");
        let updated: serde_json::Value = rows[1].get(2);
        assert_eq!(updated["displayName"], "Alice M. Martin");
    }

    #[tokio::test]
    async fn test_read_activity_events() {
        let (_db, client) = seeded().await;
        let rows = client
            .query(
                "SELECT aggregate_id, event_type, payload FROM event_outbox
                 WHERE aggregate_type = 'Activity' ORDER BY sequence_id",
                &[],
            )
            .await
            .expect("query");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].get::<_, String>(1), "ActivityCreated");
        assert_eq!(rows[1].get::<_, String>(1), "ParticipantJoined");
        for row in &rows {
            assert_eq!(row.get::<_, uuid::Uuid>(0), seed::ACTIVITY_ID);
        }
        let created: serde_json::Value = rows[0].get(2);
        let joined: serde_json::Value = rows[1].get(2);
        // The seed's events reference each other: the organizer is the user, who joins.
        assert_eq!(created["organizerId"], seed::USER_ID.to_string());
        assert_eq!(joined["userId"], seed::USER_ID.to_string());
        assert_eq!(created["maxParticipants"], 12);
    }
}

mod test_event_insertion {
    use super::*;

    #[tokio::test]
    async fn test_insert_new_event() {
        let db = TestDb::migrated().await;
        let client = db.client().await;
        let event_id = uuid::Uuid::new_v4();
        let aggregate_id = uuid::Uuid::new_v4();
        let payload = serde_json::json!({"email": "bob@example.com", "displayName": "Bob"});
        client
            .execute(
                "INSERT INTO event_outbox (event_id, aggregate_id, aggregate_type, event_type, payload)
                 VALUES ($1, $2, 'User', 'UserCreated', $3)",
                &[&event_id, &aggregate_id, &payload],
            )
            .await
            .expect("insert");
        let row = client
            .query_one(
                "SELECT aggregate_id, payload, status, retry_count, last_error, lock_id,
                        created_at > now() - interval '1 minute', published_at IS NULL
                 FROM event_outbox WHERE event_id = $1",
                &[&event_id],
            )
            .await
            .expect("read back");
        assert_eq!(row.get::<_, uuid::Uuid>(0), aggregate_id);
        assert_eq!(row.get::<_, serde_json::Value>(1), payload);
        assert_eq!(row.get::<_, String>(2), "pending");
        assert_eq!(row.get::<_, i32>(3), 0);
        assert_eq!(row.get::<_, Option<String>>(4), None);
        assert_eq!(row.get::<_, Option<String>>(5), None);
        assert!(row.get::<_, bool>(6), "created_at defaults to now()");
        assert!(row.get::<_, bool>(7));
        let duplicate = client
            .execute(
                "INSERT INTO event_outbox (event_id, aggregate_id, aggregate_type, event_type, payload)
                 VALUES ($1, $2, 'User', 'UserCreated', $3)",
                &[&event_id, &aggregate_id, &payload],
            )
            .await
            .expect_err("event_id is the primary key");
        assert_eq!(
            duplicate.code(),
            Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
        );
    }

    #[tokio::test]
    async fn test_sequence_id_auto_increments() {
        let db = TestDb::migrated().await;
        let client = db.client().await;
        let mut sequence_ids = Vec::new();
        for _ in 0..3 {
            let row = client
                .query_one(
                    "INSERT INTO event_outbox (event_id, aggregate_id, aggregate_type, event_type, payload)
                     VALUES (gen_random_uuid(), gen_random_uuid(), 'User', 'UserCreated', '{}')
                     RETURNING sequence_id",
                    &[],
                )
                .await
                .expect("insert");
            sequence_ids.push(row.get::<_, i64>(0));
        }
        assert!(
            sequence_ids.windows(2).all(|w| w[1] == w[0] + 1),
            "{sequence_ids:?}"
        );
    }
}

mod test_status_constraint {
    use super::*;

    async fn insert_with_status(
        client: &tokio_postgres::Client,
        status: &str,
    ) -> Result<u64, tokio_postgres::Error> {
        client
            .execute(
                "INSERT INTO event_outbox (event_id, aggregate_id, aggregate_type, event_type, payload, status)
                 VALUES (gen_random_uuid(), gen_random_uuid(), 'User', 'UserCreated', '{}', $1)",
                &[&status],
            )
            .await
    }

    #[tokio::test]
    async fn test_valid_status_values() {
        let db = TestDb::migrated().await;
        let client = db.client().await;
        for status in ["pending", "processing", "processed", "failed", "retry"] {
            assert_eq!(insert_with_status(&client, status).await.expect(status), 1);
        }
        let row = client
            .query_one("SELECT count(DISTINCT status) FROM event_outbox", &[])
            .await
            .expect("count");
        assert_eq!(row.get::<_, i64>(0), 5);
    }

    #[tokio::test]
    async fn test_invalid_status_rejected() {
        let db = TestDb::migrated().await;
        let client = db.client().await;
        for status in ["done", "PENDING", ""] {
            let err = insert_with_status(&client, status)
                .await
                .expect_err("CHECK constraint rejects it");
            assert_eq!(
                err.code(),
                Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION)
            );
            let db_error = err.as_db_error().expect("a server error");
            assert_eq!(db_error.constraint(), Some("status_check"));
        }
    }
}
