//! The console's Retry and Discard: what `dead-letters retry` and
//! `dead-letters discard` do (src/dead_letter/manage.rs), for one letter.

use crate::config::{PipelineConfig, PostgresConfig};
use crate::dead_letter::manage::{self, Outcome, Patience};
use crate::dead_letter::records::{self, Letter, Selection};
use crate::policy::describe;
use crate::store::mongo::MongoStore;
use serde::Serialize;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How long an action waits for MongoDB (and for the outbox's lock).
const WAIT: Duration = Duration::from_secs(10);

/// What became of the letter, as the page shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Done {
    pub id: String,
    /// `re-emitted`, `already re-emitted`, `discarded`, `refused` or `waiting`.
    pub outcome: &'static str,
    /// The re-emitted event's id.
    pub event_id: Option<String>,
    /// Why it was refused, or what waits.
    pub detail: Option<String>,
}

/// Why an action did nothing (or stopped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failed {
    NotFound(String),
    Unavailable(String),
    BadRequest(String),
}

/// What an action needs.
pub struct Actions<'a> {
    pub store: &'a MongoStore,
    pub postgres: &'a PostgresConfig,
    pub pipeline: &'a PipelineConfig,
}

impl Actions<'_> {
    pub async fn retry(&self, id: &str) -> Result<Done, Failed> {
        let letter = self.letter(id).await?;
        let mut pg = crate::outbox::connect(self.postgres).await.map_err(|e| {
            Failed::Unavailable(format!("the outbox is unreachable: {}", describe(&e)))
        })?;
        let mut done = None;
        manage::retry(
            &mut pg,
            self.store,
            &self.patience(),
            vec![letter],
            &mut |letter, outcome| done = Some(report(letter, outcome)),
        )
        .await
        .map_err(|e| Failed::Unavailable(describe(&e)))?;
        done.ok_or_else(|| Failed::NotFound(format!("dead letter {id} is gone")))
    }

    pub async fn discard(&self, id: &str, reason: &str) -> Result<Done, Failed> {
        let reason = reason.trim();
        if reason.is_empty() {
            return Err(Failed::BadRequest(
                "give a reason (it is kept with the letter)".into(),
            ));
        }
        let letter = self.letter(id).await?;
        let mut done = None;
        manage::discard(
            self.store,
            &self.patience(),
            vec![letter],
            reason,
            &mut |letter, outcome| done = Some(report(letter, outcome)),
        )
        .await
        .map_err(|e| Failed::Unavailable(describe(&e)))?;
        done.ok_or_else(|| Failed::NotFound(format!("dead letter {id} is gone")))
    }

    fn patience(&self) -> Patience {
        Patience::new(self.pipeline, CancellationToken::new(), WAIT)
    }

    async fn letter(&self, id: &str) -> Result<Letter, Failed> {
        let uuid: Uuid = id
            .parse()
            .map_err(|_| Failed::BadRequest(format!("`{id}` is not a dead letter id")))?;
        let selection = Selection {
            ids: vec![uuid],
            ..Selection::default()
        };
        let letters = tokio::time::timeout(WAIT, records::select(self.store, &selection))
            .await
            .map_err(|_| Failed::Unavailable(format!("MongoDB did not answer within {WAIT:?}")))?
            .map_err(|e| Failed::Unavailable(describe(&e)))?;
        letters
            .into_iter()
            .next()
            .ok_or_else(|| Failed::NotFound(format!("no dead letter {id}")))
    }
}

fn report(letter: &Letter, outcome: &Outcome) -> Done {
    let (outcome, event_id, detail) = match outcome {
        Outcome::ReEmitted { event_id, .. } => ("re-emitted", Some(event_id.to_string()), None),
        Outcome::AlreadyReEmitted { event_id, .. } => {
            ("already re-emitted", Some(event_id.to_string()), None)
        }
        Outcome::Discarded => ("discarded", None, None),
        Outcome::Refused(why) => ("refused", None, Some(why.clone())),
        Outcome::Waiting => (
            "waiting",
            None,
            Some("the kafka consumer still tries this event".to_string()),
        ),
    };
    Done {
        id: letter.id.clone(),
        outcome,
        event_id,
        detail,
    }
}
