//! Stage 5, for one history: the sink's limit for it, the reference fold's
//! writes upserted raw batch by batch (see [`Bench::fold_writes`]).

use super::*;
use activity_event_processor::store::mongo::{ACTIVITIES, USERS};
use mongodb::bson::{Bson, Document};

impl Bench {
    /// Stage 5, for this history: the fold's writes upserted raw. Per batch
    /// of `batch` events, the documents (users, then activities) whose
    /// content the batch changes by the reference fold, as the batch leaves
    /// them, upserted by `_id` in one command per collection into fresh
    /// collections with the same indexes. These are the fewest documents a
    /// processor must write for the history, each as often as it must
    /// write it (most of them updates, which cost the server more than a
    /// first insert), with no reads, fences or bookkeeping fields. Returns
    /// the documents and the seconds their writes took.
    pub(super) async fn fold_writes(
        &mut self,
        history: &[OutboxEvent],
        batch: usize,
    ) -> Result<(u64, f64)> {
        use activity_event_processor::projection::fold::{ReadModels, ReferenceFold};
        let target = self.mongo("aep_bench_fold").await?;
        target
            .ensure_indexes()
            .await
            .map_err(|e| anyhow::anyhow!("cannot create indexes: {e}"))?;
        let mut fold = ReferenceFold::default();
        let mut before = ReadModels::default();
        let (mut written, mut elapsed) = (0u64, 0.0);
        for chunk in history.chunks(batch.max(1)) {
            for event in chunk {
                fold.apply(event);
            }
            let after = fold.read_models();
            for (collection, was, now) in [
                (USERS, &before.users, &after.users),
                (ACTIVITIES, &before.activities, &after.activities),
            ] {
                let mut statements = Vec::new();
                for (id, doc) in now.iter().filter(|(id, doc)| was.get(*id) != Some(*doc)) {
                    let mut fields = stored_form(doc)?;
                    fields.remove("_id");
                    statements
                        .push(doc! { "q": { "_id": id }, "u": { "$set": fields }, "upsert": true });
                }
                if statements.is_empty() {
                    continue;
                }
                written += statements.len() as u64;
                let started = Instant::now();
                let report = target
                    .update(collection, statements, false)
                    .await
                    .map_err(|e| anyhow::anyhow!("the fold's upserts failed: {e}"))?;
                elapsed += started.elapsed().as_secs_f64();
                if let Some(err) = report.errors.first() {
                    anyhow::bail!("a fold upsert failed: {}", err.message);
                }
            }
            before = after;
        }
        let _ = target.database().drop().await;
        Ok((written, elapsed))
    }
}

/// Fields of the read models that hold times (BSON dates in MongoDB; RFC
/// 3339 text in the reference fold's comparable form).
const TIME_FIELDS: [&str; 4] = ["starts_at", "joined_at", "created_at", "updated_at"];

/// A reference-fold document as the read models store it: times as dates.
fn stored_form(doc: &serde_json::Value) -> Result<Document> {
    fn dates(value: Bson) -> Bson {
        match value {
            Bson::Document(doc) => Bson::Document(
                doc.into_iter()
                    .map(|(key, value)| {
                        let value = match value {
                            Bson::String(text) if TIME_FIELDS.contains(&key.as_str()) => {
                                mongodb::bson::DateTime::parse_rfc3339_str(&text)
                                    .map_or(Bson::String(text), Bson::DateTime)
                            }
                            other => dates(other),
                        };
                        (key, value)
                    })
                    .collect(),
            ),
            Bson::Array(items) => Bson::Array(items.into_iter().map(dates).collect()),
            other => other,
        }
    }
    match dates(mongodb::bson::to_bson(doc)?) {
        Bson::Document(doc) => Ok(doc),
        other => anyhow::bail!("a fold document is not a document: {other}"),
    }
}
