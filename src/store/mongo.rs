//! The MongoDB side: the `activity_read` database and batched write commands
//! with per-statement results (its errors are sorted in [`super::error`]).
//!
//! Writes go through `run_command({update|insert: ..., ordered})` so that one
//! round trip carries a whole batch on every MongoDB 6/7/8 (no `bulkWrite`,
//! which needs 8), and each statement's error is read by its numeric code.

use super::codes::{self, RETRYABLE_CODES};
pub use super::codes::{DriverError, Refusal};
use super::error::write_failure;
pub use super::error::StoreError;
use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use mongodb::options::ClientOptions;
use mongodb::{Client, Database, IndexModel};

pub const USERS: &str = "users";
pub const ACTIVITIES: &str = "activities";
pub const DEAD_LETTERS: &str = "dead_letters";

/// How often the driver checks the servers, unless the URI says otherwise.
const HEARTBEAT: std::time::Duration = std::time::Duration::from_millis(500);

/// Values per `$in` of a chunked read unless configured otherwise
/// (`MONGODB_READ_CHUNK`; see [`MongoStore::find_in`]).
pub const IN_CHUNK: usize = 64;

/// Most statements per write command.
pub const WRITE_CHUNK: usize = 1000;

/// Duplicate key: on a fenced upsert, "someone already holds a newer state".
pub const DUPLICATE_KEY: i32 = 11000;

/// One statement's failure inside a batched write command.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteError {
    pub index: usize,
    pub code: i32,
    pub message: String,
}

/// What a batched write command did.
#[derive(Debug, Default, Clone)]
pub struct WriteReport {
    pub matched: u64,
    pub modified: u64,
    pub upserted: u64,
    pub errors: Vec<WriteError>,
}

/// Hides the credentials of a connection string (`user:pass@` -> `***@`).
pub use crate::config::redact_uri;

/// What a rebuild's shadow collections are called: the live name and this.
pub const SHADOW_SUFFIX: &str = "__rebuild";

/// The collections a rebuild builds anew and swaps in.
pub const REBUILT: [&str; 2] = [USERS, ACTIVITIES];

/// The read-model database.
#[derive(Clone, Debug)]
pub struct MongoStore {
    client: Client,
    db: Database,
    write_concern: Document,
    /// Values per `$in` of [`MongoStore::find_in`].
    read_chunk: usize,
    /// Reads and writes go to the rebuild's shadow collections (the read
    /// models and their dead letters) instead of the live ones.
    shadow: bool,
}

impl MongoStore {
    /// Connects (lazily, as the driver does) and checks the server answers.
    pub async fn connect(uri: &str, database: &str) -> Result<MongoStore, StoreError> {
        Self::connect_within(uri, database, None).await
    }

    /// As [`MongoStore::connect`], giving up on finding a server after `wait`
    /// (for commands that report rather than wait, like `status`).
    pub async fn connect_within(
        uri: &str,
        database: &str,
        wait: Option<std::time::Duration>,
    ) -> Result<MongoStore, StoreError> {
        let mut options = ClientOptions::parse(uri).await.map_err(|err| {
            let secrets = crate::config::uri_secrets(uri);
            let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
            StoreError::fatal(format!(
                "invalid MONGODB_URI {}: {}",
                redact_uri(uri),
                crate::config::scrub(&err.kind.to_string(), &secrets)
            ))
        })?;
        // An `appName` in the URI wins (it names the process in the server's
        // logs and lets a failpoint single it out).
        options
            .app_name
            .get_or_insert_with(|| "activity-event-processor".into());
        // After a "not primary" or "shutting down" error the driver forgets
        // the server and finds it again at its next heartbeat: 10 s by
        // default, so each such fault would cost 10 s. A `heartbeatFrequencyMS`
        // in the URI wins.
        options.heartbeat_freq.get_or_insert(HEARTBEAT);
        if wait.is_some() {
            options.server_selection_timeout = wait;
        }
        let client = Client::with_options(options)?;
        let store = MongoStore {
            db: client.database(database),
            client,
            write_concern: doc! { "w": "majority" },
            read_chunk: IN_CHUNK,
            shadow: false,
        };
        store.ping().await?;
        Ok(store)
    }

    /// The same store, reading `chunk` ids per `$in` (at least one).
    pub fn with_read_chunk(self, chunk: usize) -> MongoStore {
        MongoStore {
            read_chunk: chunk.max(1),
            ..self
        }
    }

    pub fn database(&self) -> &Database {
        &self.db
    }

    /// The same database, with the read models (and the dead letters their
    /// projection writes) in the rebuild's shadow collections.
    pub fn shadow(&self) -> MongoStore {
        MongoStore {
            shadow: true,
            ..self.clone()
        }
    }

    /// The collection `name` stands for in this store (its shadow's name in
    /// a [`MongoStore::shadow`] store).
    pub fn name(&self, name: &str) -> String {
        if self.shadow && (REBUILT.contains(&name) || name == DEAD_LETTERS) {
            format!("{name}{SHADOW_SUFFIX}")
        } else {
            name.to_string()
        }
    }

    /// The collection `name` stands for ([`MongoStore::name`]).
    pub fn collection(&self, name: &str) -> mongodb::Collection<Document> {
        self.db.collection::<Document>(&self.name(name))
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        self.db.run_command(doc! { "ping": 1 }).await?;
        Ok(())
    }

    /// The indexes the projections filter on, array fields included.
    pub async fn ensure_indexes(&self) -> Result<(), StoreError> {
        let activities = self.collection(ACTIVITIES);
        for keys in [
            doc! { "participants.user_id": 1 },
            doc! { "organizer.user_id": 1 },
        ] {
            activities
                .create_index(IndexModel::builder().keys(keys).build())
                .await?;
        }
        // Users are only ever updated by `_id`: an index on their
        // `activities` array would cost every write and serve no query.
        Ok(())
    }

    /// Runs `update` statements (`{q, u, upsert?, multi?, arrayFilters?}`) in
    /// one command per chunk; statement errors come back by index, the
    /// command's own failure as `Err`.
    pub async fn update(
        &self,
        collection: &str,
        statements: Vec<Document>,
        ordered: bool,
    ) -> Result<WriteReport, StoreError> {
        self.write("update", "updates", collection, statements, ordered)
            .await
    }

    async fn write(
        &self,
        command: &str,
        list: &str,
        collection: &str,
        statements: Vec<Document>,
        ordered: bool,
    ) -> Result<WriteReport, StoreError> {
        let mut report = WriteReport::default();
        let mut offset = 0;
        let mut rest = statements;
        while !rest.is_empty() {
            let tail = rest.split_off(rest.len().min(WRITE_CHUNK));
            let chunk = std::mem::replace(&mut rest, tail);
            let len = chunk.len();
            let reply = self
                .db
                .run_command(doc! {
                    command: self.name(collection),
                    list: chunk,
                    "ordered": ordered,
                    "writeConcern": self.write_concern.clone(),
                })
                .await
                .map_err(|e| write_failure(collection, e))?;
            read_reply(&reply, offset, &mut report)?;
            offset += len;
        }
        Ok(report)
    }

    /// Whether the server takes a write to `collection` at all: an update that
    /// matches nothing (`$in` of nothing) and so changes nothing, sent as
    /// every write is (same command, same write concern).
    pub async fn probe_write(&self, collection: &str) -> Result<(), StoreError> {
        let probe = doc! {
            "q": { "_id": { "$in": [] } },
            "u": { "$setOnInsert": { "_probe": true } },
        };
        let result = self.update(collection, vec![probe], false).await?;
        match result.errors.first() {
            Some(err) => Err(codes::write_error(collection, err.code, &err.message)),
            None => Ok(()),
        }
    }

    /// Documents of `collection` whose `_id` is one of `ids`.
    pub async fn find_by_ids(
        &self,
        collection: &str,
        ids: Vec<String>,
        projection: Option<Document>,
    ) -> Result<Vec<Document>, StoreError> {
        self.find_in(collection, "_id", ids, projection).await
    }

    /// Documents of `collection` whose `field` (an indexed one) is one of
    /// `values`, read with one `$in` per `MONGODB_READ_CHUNK` values.
    ///
    /// Chunked because a server may find the candidates through the index
    /// but then test each one against the whole `$in` list (SecantusDB
    /// does): one list of n values over n documents costs n² comparisons,
    /// where chunks of k cost n·k. MongoDB itself seeks each value in the
    /// index, so there larger chunks only save round trips. A document
    /// matching values of two chunks (an array field) comes back once.
    pub async fn find_in(
        &self,
        collection: &str,
        field: &str,
        values: Vec<String>,
        projection: Option<Document>,
    ) -> Result<Vec<Document>, StoreError> {
        let mut found = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for chunk in values.chunks(self.read_chunk) {
            let docs = self
                .find(
                    collection,
                    doc! { field: { "$in": chunk } },
                    projection.clone(),
                )
                .await?;
            for doc in docs {
                let fresh = match doc.get("_id") {
                    Some(Bson::String(id)) => seen.insert(id.clone()),
                    _ => true,
                };
                if fresh {
                    found.push(doc);
                }
            }
        }
        Ok(found)
    }

    /// How many round trips [`MongoStore::find_in`] takes for `values` values.
    pub fn find_in_round_trips(&self, values: usize) -> u32 {
        u32::try_from(values.div_ceil(self.read_chunk)).unwrap_or(u32::MAX)
    }

    pub async fn find(
        &self,
        collection: &str,
        filter: Document,
        projection: Option<Document>,
    ) -> Result<Vec<Document>, StoreError> {
        let handle = self.collection(collection);
        let mut find = handle.find(filter);
        if let Some(projection) = projection {
            find = find.projection(projection);
        }
        let cursor = find.await?;
        Ok(cursor.try_collect().await?)
    }

    /// The highest integer value of `field` in `collection`.
    pub async fn max_field(
        &self,
        collection: &str,
        field: &str,
    ) -> Result<Option<i64>, StoreError> {
        let handle = self.collection(collection);
        let mut cursor = handle
            .find(doc! { field: { "$exists": true } })
            .sort(doc! { field: -1 })
            .limit(1)
            .projection(doc! { field: 1 })
            .await?;
        let Some(top) = cursor.try_next().await? else {
            return Ok(None);
        };
        Ok(match top.get(field) {
            Some(Bson::Int64(n)) => Some(*n),
            Some(Bson::Int32(n)) => Some(i64::from(*n)),
            _ => None,
        })
    }

    /// Deletes the documents of `collection` whose `_id` is one of `ids`.
    pub async fn delete_ids(&self, collection: &str, ids: Vec<String>) -> Result<(), StoreError> {
        self.collection(collection)
            .delete_many(doc! { "_id": { "$in": ids } })
            .await?;
        Ok(())
    }

    pub async fn count(&self, collection: &str) -> Result<u64, StoreError> {
        Ok(self.collection(collection).count_documents(doc! {}).await?)
    }
}

fn read_reply(reply: &Document, offset: usize, report: &mut WriteReport) -> Result<(), StoreError> {
    let number = |key: &str| -> u64 {
        match reply.get(key) {
            Some(Bson::Int32(n)) => u64::try_from(*n).unwrap_or(0),
            Some(Bson::Int64(n)) => u64::try_from(*n).unwrap_or(0),
            Some(Bson::Double(n)) => *n as u64,
            _ => 0,
        }
    };
    let upserted = match reply.get("upserted") {
        Some(Bson::Array(items)) => items.len() as u64,
        _ => 0,
    };
    report.upserted += upserted;
    report.matched += number("n").saturating_sub(upserted);
    report.modified += number("nModified");
    if let Some(Bson::Document(wce)) = reply.get("writeConcernError") {
        let code = wce.get_i32("code").unwrap_or(0);
        let message = codes::shorten(wce.get_str("errmsg").unwrap_or("write concern error"), 160);
        return Err(if RETRYABLE_CODES.contains(&code) || code == 64 {
            StoreError::transient(
                codes::retry_class(code),
                format!("write concern not satisfied ({code}): {message}"),
            )
        } else {
            StoreError::fatal(format!("write concern error ({code}): {message}"))
        });
    }
    if let Some(Bson::Array(errors)) = reply.get("writeErrors") {
        for error in errors {
            let Bson::Document(error) = error else {
                continue;
            };
            let index = match error.get("index") {
                Some(Bson::Int32(i)) => usize::try_from(*i).unwrap_or(0),
                Some(Bson::Int64(i)) => usize::try_from(*i).unwrap_or(0),
                _ => 0,
            };
            let code = match error.get("code") {
                Some(Bson::Int32(c)) => *c,
                Some(Bson::Int64(c)) => i32::try_from(*c).unwrap_or(-1),
                _ => -1,
            };
            let message = error.get_str("errmsg").unwrap_or("").to_string();
            if RETRYABLE_CODES.contains(&code) {
                return Err(StoreError::transient(
                    codes::retry_class(code),
                    format!("write failed ({code}): {message}"),
                ));
            }
            report.errors.push(WriteError {
                index: offset + index,
                code,
                message,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Classify, ErrorClass};

    #[test]
    fn a_driver_error_is_the_source_and_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused here");
        let err = StoreError::from(mongodb::error::Error::from(io));
        assert_eq!(
            crate::policy::Classify::class(&err),
            crate::policy::ErrorClass::Transient
        );
        let source = std::error::Error::source(&err).expect("the driver's error");
        assert!(source.to_string().contains("refused here"), "{source}");
        assert_eq!(err.to_string(), "mongodb unavailable");
        assert_eq!(
            crate::telemetry::Chain(&err).to_string(),
            format!("mongodb unavailable: {source}")
        );
        let fatal = StoreError::fatal("write concern error (100): no");
        assert_eq!(fatal.to_string(), "mongodb: write concern error (100): no");
        assert!(std::error::Error::source(&fatal).is_none());
    }

    #[test]
    fn credentials_are_redacted() {
        assert_eq!(
            redact_uri("mongodb://app:s3cret@db1:27017,db2/?replicaSet=rs"),
            "mongodb://***@db1:27017,db2/?replicaSet=rs"
        );
        assert_eq!(
            redact_uri("mongodb://127.0.0.1:27017/?retryWrites=false"),
            "mongodb://127.0.0.1:27017/?retryWrites=false"
        );
        assert_eq!(redact_uri("not a uri"), "not a uri");
    }

    #[test]
    fn write_errors_are_read_by_index_and_code() {
        let reply = doc! {
            "n": 3, "nModified": 1,
            "upserted": [ { "index": 0, "_id": "a" } ],
            "writeErrors": [ { "index": 2, "code": 11000, "errmsg": "E11000 duplicate key" } ],
            "ok": 1.0,
        };
        let mut report = WriteReport::default();
        read_reply(&reply, 10, &mut report).expect("not transient");
        assert_eq!(report.upserted, 1);
        assert_eq!(report.matched, 2);
        assert_eq!(
            report.errors,
            vec![WriteError {
                index: 12,
                code: DUPLICATE_KEY,
                message: "E11000 duplicate key".into()
            }]
        );
        let not_primary = doc! { "n": 0, "writeErrors": [ { "index": 0, "code": 10107, "errmsg": "not primary" } ] };
        let err = read_reply(&not_primary, 0, &mut WriteReport::default()).expect_err("transient");
        assert_eq!(err.class(), ErrorClass::Transient);
    }
}
