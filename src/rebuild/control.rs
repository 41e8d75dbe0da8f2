//! The rebuild's side of `processor_control`: one rebuild at a time (a
//! control document it owns and beats), its progress for anyone to read,
//! and the pause of the writers around the swap ([`super::gate`]).

use super::gate::{host, BEAT, CONTROL, INSTANCE_PREFIX, REBUILD_ID, REBUILD_SILENT};
use super::RebuildError;
use crate::store::mongo::{MongoStore, StoreError, DUPLICATE_KEY};
use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// A writer that has not beaten for this long is taken as stopped.
const WRITER_GONE: Duration = Duration::from_secs(10);

/// How long a rebuild watches another's beat before calling it stopped.
const WATCH: Duration = Duration::from_secs(3);

/// The states a rebuild's control document goes through.
pub const ACTIVE: [&str; 4] = ["building", "catching up", "pausing", "swapping"];

/// A rebuild that stopped without finishing (killed, or its machine lost).
#[derive(Debug, Clone)]
pub struct Stale {
    pub state: String,
    pub started_at: String,
}

/// This rebuild's ownership of the control document.
pub struct Control {
    store: MongoStore,
    /// This rebuild's id (the pause the writers answer).
    pub id: String,
    /// Another process took the control document over.
    lost: Arc<AtomicBool>,
    stop_beat: CancellationToken,
}

impl Control {
    /// Takes the control document: refused while another rebuild beats,
    /// taken over (and said so) from one that stopped.
    pub async fn claim(
        store: &MongoStore,
        dry_run: bool,
    ) -> Result<(Control, Option<Stale>), RebuildError> {
        let control = store.database().collection::<Document>(CONTROL);
        let id = uuid::Uuid::new_v4().to_string();
        let fresh = doc! {
            "_id": REBUILD_ID,
            "owner": &id,
            "pid": i64::from(std::process::id()),
            "host": host(),
            "state": "building",
            "dry_run": dry_run,
            "beat": 0_i64,
            "pause": Bson::Null,
            "phase": "starting",
            "done": 0_i64,
            "total": 0_i64,
            "started_at": mongodb::bson::DateTime::now(),
        };
        let current = control
            .find_one(doc! { "_id": REBUILD_ID })
            .await
            .map_err(StoreError::from)?;
        let stale = match current {
            None => match control.insert_one(fresh.clone()).await {
                Ok(_) => None,
                Err(err) if is_duplicate(&err) => {
                    return Err(RebuildError::Busy(
                        "another rebuild started at the same moment".into(),
                    ))
                }
                Err(err) => return Err(StoreError::from(err).into()),
            },
            Some(current) => {
                let state = current.get_str("state").unwrap_or("").to_string();
                let stale = if ACTIVE.contains(&state.as_str()) {
                    if still_beating(store, &current).await? {
                        return Err(RebuildError::Busy(describe_other(&current)));
                    }
                    Some(Stale {
                        state,
                        started_at: started_at(&current),
                    })
                } else {
                    None
                };
                // Conditioned on what was read: of two taking it over, one wins.
                let mut filter = doc! { "_id": REBUILD_ID };
                for key in ["owner", "beat"] {
                    filter.insert(key, current.get(key).cloned().unwrap_or(Bson::Null));
                }
                let replaced = control
                    .replace_one(filter, fresh.clone())
                    .await
                    .map_err(StoreError::from)?;
                if replaced.matched_count == 0 {
                    return Err(RebuildError::Busy(
                        "another rebuild took over at the same moment".into(),
                    ));
                }
                stale
            }
        };
        let lost = Arc::new(AtomicBool::new(false));
        let stop_beat = CancellationToken::new();
        tokio::spawn(beat(
            store.clone(),
            id.clone(),
            lost.clone(),
            stop_beat.clone(),
        ));
        Ok((
            Control {
                store: store.clone(),
                id,
                lost,
                stop_beat,
            },
            stale,
        ))
    }

    /// Sets fields of the control document (progress, state).
    pub async fn set(&self, fields: Document) -> Result<(), RebuildError> {
        let control = self.store.database().collection::<Document>(CONTROL);
        let updated = control
            .update_one(
                doc! { "_id": REBUILD_ID, "owner": &self.id },
                doc! { "$set": fields },
            )
            .await
            .map_err(StoreError::from)?;
        if updated.matched_count == 0 || self.lost.load(Ordering::SeqCst) {
            self.lost.store(true, Ordering::SeqCst);
            return Err(RebuildError::Lost);
        }
        Ok(())
    }

    /// Records the phase and how far it got.
    pub async fn progress(&self, phase: &str, done: u64, total: u64) -> Result<(), RebuildError> {
        self.set(doc! {
            "phase": phase,
            "done": i64::try_from(done).unwrap_or(i64::MAX),
            "total": i64::try_from(total).unwrap_or(i64::MAX),
        })
        .await
    }

    /// Asks every writer to pause, and waits until each one that beats has
    /// finished its batch in flight and answered. Returns the writers taken
    /// as stopped (silent for [`WRITER_GONE`]).
    pub async fn pause_writers(&self) -> Result<Vec<String>, RebuildError> {
        self.set(doc! { "state": "pausing", "pause": &self.id })
            .await?;
        let control = self.store.database().collection::<Document>(CONTROL);
        // Each writer's last beat and when this rebuild first saw it.
        let mut seen: BTreeMap<String, (Bson, Instant)> = BTreeMap::new();
        loop {
            let writers: Vec<Document> = control
                .find(doc! { "_id": { "$regex": format!("^{INSTANCE_PREFIX}") } })
                .await
                .map_err(StoreError::from)?
                .try_collect()
                .await
                .map_err(StoreError::from)?;
            let mut waiting = 0;
            let mut gone = Vec::new();
            for writer in &writers {
                let id = id_of(writer);
                if writer.get_str("paused_for") == Ok(self.id.as_str()) {
                    continue;
                }
                let beat = writer.get("beat").cloned().unwrap_or(Bson::Null);
                let entry = seen.entry(id).or_insert((beat.clone(), Instant::now()));
                if entry.0 != beat {
                    *entry = (beat, Instant::now());
                }
                if entry.1.elapsed() >= WRITER_GONE {
                    gone.push((id_of(writer), entry.0.clone(), describe_writer(writer)));
                } else {
                    waiting += 1;
                }
            }
            if waiting == 0 {
                // Forgotten, so that the next rebuild does not wait for them
                // again (a writer that was only slow registers anew).
                for (id, beat, _) in &gone {
                    let _ = control.delete_one(doc! { "_id": id, "beat": beat }).await;
                }
                return Ok(gone.into_iter().map(|(_, _, about)| about).collect());
            }
            tokio::time::sleep(BEAT / 2).await;
        }
    }

    /// Lets the writers go on.
    pub async fn resume_writers(&self, state: &str) -> Result<(), RebuildError> {
        self.set(doc! { "state": state, "pause": Bson::Null }).await
    }

    /// The rebuild is over (`state`: done, failed, interrupted, dry run):
    /// the pause is lifted and the beat stops.
    pub async fn finish(&self, state: &str, note: &str) {
        let fields = doc! {
            "state": state,
            "pause": Bson::Null,
            "note": note,
            "finished_at": mongodb::bson::DateTime::now(),
        };
        if let Err(err) = self.set(fields).await {
            tracing::warn!(error = %err, "cannot record the end of the rebuild");
        }
        self.stop_beat.cancel();
    }

    /// True while this rebuild still owns the control document.
    pub fn owned(&self) -> bool {
        !self.lost.load(Ordering::SeqCst)
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.stop_beat.cancel();
    }
}

/// Beats the control document until stopped; marks `lost` when another
/// process owns it.
async fn beat(store: MongoStore, id: String, lost: Arc<AtomicBool>, stop: CancellationToken) {
    let control = store.database().collection::<Document>(CONTROL);
    let mut count: i64 = 0;
    loop {
        tokio::select! {
            () = tokio::time::sleep(BEAT) => {}
            () = stop.cancelled() => return,
        }
        count += 1;
        let beat = control
            .update_one(
                doc! { "_id": REBUILD_ID, "owner": &id },
                doc! { "$set": { "beat": count, "beat_at": mongodb::bson::DateTime::now() } },
            )
            .await;
        match beat {
            Ok(result) if result.matched_count == 0 => {
                lost.store(true, Ordering::SeqCst);
                return;
            }
            Ok(_) => {}
            Err(err) => {
                tracing::debug!(error = %crate::store::codes::describe(&err), "rebuild beat failed")
            }
        }
    }
}

/// Whether the rebuild `current` describes still beats (watched for [`WATCH`]).
async fn still_beating(store: &MongoStore, current: &Document) -> Result<bool, RebuildError> {
    let control = store.database().collection::<Document>(CONTROL);
    let first = current.get("beat").cloned();
    let until = Instant::now() + WATCH.max(REBUILD_SILENT / 5);
    while Instant::now() < until {
        tokio::time::sleep(BEAT).await;
        let now = control
            .find_one(doc! { "_id": REBUILD_ID })
            .await
            .map_err(StoreError::from)?;
        let Some(now) = now else {
            return Ok(false);
        };
        if now.get("owner") != current.get("owner") || now.get("beat").cloned() != first {
            return Ok(true);
        }
    }
    Ok(false)
}

fn is_duplicate(err: &mongodb::error::Error) -> bool {
    matches!(
        err.kind.as_ref(),
        mongodb::error::ErrorKind::Write(mongodb::error::WriteFailure::WriteError(e)) if e.code == DUPLICATE_KEY
    )
}

fn started_at(control: &Document) -> String {
    control
        .get_datetime("started_at")
        .ok()
        .and_then(|t| t.try_to_rfc3339_string().ok())
        .unwrap_or_else(|| "an unknown time".into())
}

fn describe_other(control: &Document) -> String {
    format!(
        "another rebuild is running (pid {} on {}, started {}, {}); wait for it to finish or stop it",
        control.get_i64("pid").unwrap_or(0),
        control.get_str("host").unwrap_or("?"),
        started_at(control),
        control.get_str("state").unwrap_or("?"),
    )
}

fn id_of(writer: &Document) -> String {
    writer.get_str("_id").unwrap_or("").to_string()
}

fn describe_writer(writer: &Document) -> String {
    format!(
        "pid {} on {}",
        writer.get_i64("pid").unwrap_or(0),
        writer.get_str("host").unwrap_or("?")
    )
}
