//! Checkpoint: the positions the pipeline acknowledges, kept where they are
//! durable exactly when the effects before them are.
//!
//! - [`MongoCheckpoint`]: the replication source's LSN, stored in the read-model
//!   database itself (collection `processor_checkpoints`), written after a
//!   batch's effects and read back at start-up to resume from our own durable
//!   position rather than the slot's (which can go backwards after a crash).
//!   A checkpoint never moves backwards: a save below the stored position
//!   is refused with [`CheckpointError::Backwards`].
//!
//! The outbox rows' own status (`processed` / `failed`) is set by the
//! runtime's outbox marker, for sources that do not claim rows themselves.

use crate::policy::{Classify, ErrorClass};
use crate::store::mongo::{MongoStore, StoreError, DUPLICATE_KEY};
use mongodb::bson::doc;

pub const CHECKPOINTS: &str = "processor_checkpoints";

/// Why a position was not saved.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint `{name}` holds {stored:X}; refusing to move it back to {refused:X}")]
    Backwards {
        name: String,
        stored: u64,
        refused: u64,
    },
    #[error("lsn {lsn} is out of range")]
    OutOfRange { lsn: u64 },
    #[error("cannot save checkpoint `{name}`: {message}")]
    Write { name: String, message: String },
    #[error("cannot reach the checkpoint")]
    Store(#[from] StoreError),
}

impl Classify for CheckpointError {
    fn class(&self) -> ErrorClass {
        match self {
            CheckpointError::Backwards { .. } => ErrorClass::Permanent,
            CheckpointError::OutOfRange { .. } | CheckpointError::Write { .. } => ErrorClass::Fatal,
            CheckpointError::Store(err) => err.class(),
        }
    }

    fn retry_class(&self) -> crate::policy::RetryClass {
        match self {
            CheckpointError::Store(err) => err.retry_class(),
            _ => crate::policy::RetryClass::Other,
        }
    }
}

/// A named position (e.g. one replication slot) in MongoDB.
#[derive(Clone, Debug)]
pub struct MongoCheckpoint {
    store: MongoStore,
    name: String,
}

impl MongoCheckpoint {
    pub fn new(store: MongoStore, name: impl Into<String>) -> MongoCheckpoint {
        MongoCheckpoint {
            store,
            name: name.into(),
        }
    }

    pub async fn load(&self) -> Result<Option<u64>, StoreError> {
        let docs = self
            .store
            .find(CHECKPOINTS, doc! { "_id": &self.name }, None)
            .await?;
        Ok(docs
            .first()
            .and_then(|d| d.get_i64("lsn").ok())
            .and_then(|lsn| u64::try_from(lsn).ok()))
    }

    /// Records `lsn`. A position below the stored one is refused
    /// ([`CheckpointError::Backwards`]), the stored one kept: the
    /// checkpoint never moves backwards.
    pub async fn save(&self, lsn: u64) -> Result<(), CheckpointError> {
        let value = i64::try_from(lsn).map_err(|_| CheckpointError::OutOfRange { lsn })?;
        let result = self
            .store
            .update(
                CHECKPOINTS,
                vec![doc! {
                    // Matches only at or below `lsn`; above it, the upsert
                    // collides with the stored document's `_id`.
                    "q": { "_id": &self.name, "lsn": { "$lte": value } },
                    "u": { "$set": { "lsn": value }, "$currentDate": { "updated_at": true } },
                    "upsert": true,
                }],
                true,
            )
            .await?;
        match result.errors.first() {
            Some(err) if err.code == DUPLICATE_KEY => {
                let stored = self.load().await?.unwrap_or_default();
                Err(CheckpointError::Backwards {
                    name: self.name.clone(),
                    stored,
                    refused: lsn,
                })
            }
            Some(err) => Err(CheckpointError::Write {
                name: self.name.clone(),
                message: err.message.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Forgets the position (the slot was recreated and its snapshot restarts).
    pub async fn clear(&self) -> Result<(), StoreError> {
        self.store
            .database()
            .collection::<mongodb::bson::Document>(CHECKPOINTS)
            .delete_one(doc! { "_id": &self.name })
            .await?;
        Ok(())
    }
}
