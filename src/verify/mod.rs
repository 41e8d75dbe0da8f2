//! `verify`: the read models held against the outbox they come from.
//!
//! The whole outbox (every row, whatever its status) is folded in memory
//! with the reference fold ([`crate::projection::fold`], docs/design.md
//! section 4), read through a cursor so that memory grows with the
//! aggregates and never with the events; then every stored document is
//! compared, field by field, with the one the fold defines. Dead letters
//! are compared by presence: every event the fold dead-letters has a letter
//! (in `dead_letters`, or retried or discarded in `dead_letters_audit`),
//! and every letter in `dead_letters` is an event the fold dead-letters.
//! An event MongoDB refused to store (a document over 16 MB, a date it
//! rejects) is dead-lettered by the processor where the fold would apply
//! it: the fold takes such events, known by their letters' errors, as
//! dead-lettered too.

pub mod compare;
pub mod diff;
pub mod found;
pub mod outbox;

use crate::outbox::OutboxError;
use crate::store::mongo::{MongoStore, StoreError};
use serde_json::Value;
use std::fmt;
use tokio_postgres::Client;
use uuid::Uuid;

/// Which documents are compared.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scope {
    All,
    /// One aggregate's document, the documents that copy it (a user's
    /// activities, an activity's members) and its dead letters.
    Aggregate(Uuid),
}

impl Scope {
    fn holds(&self, aggregate: &Uuid) -> bool {
        match self {
            Scope::All => true,
            Scope::Aggregate(id) => id == aggregate,
        }
    }
}

/// One difference between the read models and the fold.
#[derive(Debug, Clone, PartialEq)]
pub struct Mismatch {
    pub collection: String,
    pub id: String,
    pub kind: MismatchKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum MismatchKind {
    /// The fold defines the document; MongoDB does not hold it.
    Missing,
    /// MongoDB holds a document the fold does not define.
    Extra,
    /// A field differs (`None`: absent on that side).
    Field {
        field: String,
        expected: Option<Value>,
        found: Option<Value>,
    },
}

impl Mismatch {
    fn missing(collection: &str, id: &str) -> Mismatch {
        Self::new(collection, id, MismatchKind::Missing)
    }

    fn extra(collection: &str, id: &str) -> Mismatch {
        Self::new(collection, id, MismatchKind::Extra)
    }

    fn field(collection: &str, id: &str, d: diff::Difference) -> Mismatch {
        let kind = MismatchKind::Field {
            field: d.field,
            expected: d.expected,
            found: d.found,
        };
        Self::new(collection, id, kind)
    }

    fn new(collection: &str, id: &str, kind: MismatchKind) -> Mismatch {
        Mismatch {
            collection: collection.to_string(),
            id: id.to_string(),
            kind,
        }
    }
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let value = |v: &Option<Value>| v.as_ref().map_or("absent".into(), Value::to_string);
        let (collection, id) = (&self.collection, &self.id);
        match &self.kind {
            MismatchKind::Missing => write!(
                f,
                "{collection} {id}: missing document (the outbox defines it, MongoDB lacks it)"
            ),
            MismatchKind::Extra => write!(
                f,
                "{collection} {id}: extra document (MongoDB holds it, the outbox defines no such document)"
            ),
            MismatchKind::Field {
                field,
                expected,
                found,
            } => write!(
                f,
                "{collection} {id} {field}: expected {}, found {}",
                value(expected),
                value(found)
            ),
        }
    }
}

/// What a verification saw.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Summary {
    pub rows: u64,
    pub malformed: u64,
    pub unfinished: u64,
    pub documents: u64,
    /// With `--aggregate`: the outbox rows of that aggregate.
    pub aggregate_rows: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error("cannot read the read models")]
    Store(#[source] StoreError),
}

/// How a verification reports as it goes.
pub enum Progress {
    /// Outbox rows folded so far.
    Folded(u64),
    /// Documents compared so far.
    Compared(u64),
}

/// Folds the outbox, then compares the read models with it; each mismatch
/// goes to `mismatch` as it is found.
pub async fn verify(
    client: &Client,
    store: &MongoStore,
    scope: Scope,
    progress: &mut dyn FnMut(Progress),
    mismatch: &mut dyn FnMut(Mismatch),
) -> Result<Summary, VerifyError> {
    let aggregate = match scope {
        Scope::All => None,
        Scope::Aggregate(id) => Some(id),
    };
    let refused = compare::refused(store).await.map_err(VerifyError::Store)?;
    let folded = outbox::fold(client, aggregate, refused, &mut |rows| {
        progress(Progress::Folded(rows))
    })
    .await?;
    let mut listener = compare::Listener {
        mismatch,
        compared: &mut |n| progress(Progress::Compared(n)),
        documents: 0,
    };
    compare::all(store, &folded.fold, scope, &mut listener)
        .await
        .map_err(VerifyError::Store)?;
    Ok(Summary {
        rows: folded.rows,
        malformed: folded.malformed,
        unfinished: folded.unfinished,
        documents: listener.documents,
        aggregate_rows: folded.aggregate.map(|(_, rows)| rows),
    })
}
