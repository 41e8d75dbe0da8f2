//! The processor's side of a rebuild's swap: every process that writes the
//! read models registers in `processor_control` and beats there, and applies
//! a batch only through its [`Gate`]. A rebuild pauses the writers by
//! setting `pause` on its control document; each writer closes its gate,
//! lets the batch in flight finish, and answers `paused_for` with the
//! rebuild's id. The rebuild swaps the collections only once every writer
//! that beats has answered (docs/design.md, "Rebuild").
//!
//! The gate costs the batch nothing: the control document is read by a task
//! of its own, twice a second. A batch starts only when that read is fresh
//! ([`LEASE`]), so a process that lost MongoDB cannot start writing on an
//! old answer; and a pause whose rebuild stopped beating ([`REBUILD_SILENT`])
//! is void, so a rebuild killed mid-swap does not stop the processors for
//! long.

use crate::policy::RetryClass;
use crate::store::mongo::{MongoStore, StoreError};
use mongodb::bson::{doc, Bson, Document};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The collection of the rebuild's control document and the writers' beats.
pub const CONTROL: &str = "processor_control";

/// The rebuild's control document's `_id`.
pub const REBUILD_ID: &str = "rebuild";

/// What a writer's beat document's `_id` starts with.
pub const INSTANCE_PREFIX: &str = "instance:";

/// How often a writer beats and reads the control document.
pub const BEAT: Duration = Duration::from_millis(500);

/// A batch starts only if the control document was read this recently.
const LEASE: Duration = Duration::from_secs(3);

/// How long a batch waits for a fresh read before it fails (transiently,
/// like any MongoDB outage).
const LEASE_WAIT: Duration = Duration::from_secs(10);

/// A pause whose rebuild's beat has not moved for this long is void.
pub const REBUILD_SILENT: Duration = Duration::from_secs(15);

/// What the gate last read.
#[derive(Debug, Clone, Default)]
struct Reading {
    /// The rebuild asking writers to pause, by its id.
    pause: Option<String>,
    /// When the control document was last read.
    read_at: Option<Instant>,
}

/// A process's gate to the read models (clones share it; the registration
/// ends with the last one, see [`Gate::close`]).
pub struct Gate {
    inner: Arc<Inner>,
}

struct Inner {
    reading: watch::Receiver<Reading>,
    /// Batches between [`Gate::enter`] and the drop of their [`Pass`].
    in_flight: AtomicUsize,
    shutdown: CancellationToken,
    /// Gates not yet closed or dropped; at 0 the beat stops.
    open: AtomicUsize,
    store: MongoStore,
    /// This writer's registration's `_id`, and the host it runs on.
    id: String,
    host: String,
    /// Pauses seen: documents read before one may come from collections
    /// since swapped away.
    pauses: std::sync::atomic::AtomicU64,
    /// Why the last beat failed (none since it last succeeded): a batch that
    /// gives up waiting for a reading fails with it, as its own write would.
    failure: std::sync::Mutex<Option<StoreError>>,
}

impl Clone for Gate {
    fn clone(&self) -> Gate {
        self.inner.open.fetch_add(1, Ordering::SeqCst);
        Gate {
            inner: self.inner.clone(),
        }
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.inner.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Held while a batch writes the read models.
pub struct Pass {
    inner: Arc<Inner>,
}

impl Drop for Pass {
    fn drop(&mut self) {
        self.inner.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Gate {
    /// Registers this process as a writer of `store`'s read models and starts
    /// beating; the beat stops (and the registration is removed) at `shutdown`.
    pub fn start(store: MongoStore, shutdown: CancellationToken) -> Gate {
        let (tx, rx) = watch::channel(Reading::default());
        let inner = Arc::new(Inner {
            reading: rx,
            in_flight: AtomicUsize::new(0),
            shutdown,
            open: AtomicUsize::new(1),
            store,
            id: format!("{INSTANCE_PREFIX}{}", uuid::Uuid::new_v4()),
            host: host(),
            pauses: std::sync::atomic::AtomicU64::new(0),
            failure: std::sync::Mutex::new(None),
        });
        let beat = Beat {
            tx,
            inner: Arc::downgrade(&inner),
            rebuild_beat: None,
            voided: None,
            count: 0,
        };
        tokio::spawn(beat.run());
        Gate { inner }
    }

    /// How many rebuild pauses this process has seen: when it changes,
    /// whatever was read of the read models before may be from collections
    /// swapped away since.
    pub fn pauses(&self) -> u64 {
        self.inner.pauses.load(Ordering::SeqCst)
    }

    /// This handle is done; the last one open removes the registration
    /// (a rebuild then has no writer of this process to wait for).
    pub async fn close(&self) {
        if self.inner.open.load(Ordering::SeqCst) > 1 {
            return;
        }
        self.inner.open.store(0, Ordering::SeqCst);
        let control = self.inner.store.database().collection::<Document>(CONTROL);
        if let Err(err) = control.delete_one(doc! { "_id": &self.inner.id }).await {
            tracing::debug!(error = %crate::store::codes::describe(&err), "rebuild gate: cannot remove the registration");
        }
    }

    /// Waits until the read models may be written (no rebuild pausing the
    /// writers, a fresh reading); the pass is held while the batch writes.
    pub async fn enter(&self) -> Result<Pass, StoreError> {
        // Counted first, checked after: a pause read after this check sees
        // the batch in flight (docs/design.md, "Rebuild").
        self.inner.in_flight.fetch_add(1, Ordering::SeqCst);
        let pass = Pass {
            inner: self.inner.clone(),
        };
        let mut reading = self.inner.reading.clone();
        let started = Instant::now();
        let mut said = false;
        loop {
            let (pause, fresh) = {
                let now = reading.borrow_and_update();
                let fresh = now.read_at.is_some_and(|at| at.elapsed() < LEASE);
                (now.pause.clone(), fresh)
            };
            match (pause, fresh) {
                (None, true) => {
                    if said {
                        tracing::info!("resumed after the rebuild's swap");
                    }
                    return Ok(pass);
                }
                (Some(rebuild), _) => {
                    // Not in flight while paused: the writer can answer.
                    self.inner.in_flight.fetch_sub(1, Ordering::SeqCst);
                    if !said {
                        said = true;
                        tracing::info!(rebuild = %rebuild, "paused while a rebuild swaps the read models");
                    }
                    let changed = tokio::select! {
                        changed = reading.changed() => changed.is_ok(),
                        () = self.inner.shutdown.cancelled() => false,
                    };
                    self.inner.in_flight.fetch_add(1, Ordering::SeqCst);
                    if !changed {
                        return Err(paused_at_stop());
                    }
                }
                (None, false) => {
                    if started.elapsed() >= LEASE_WAIT {
                        // The beat's own failure, classified as any write's
                        // (a refusal or a missing privilege stops the process).
                        let failure = self
                            .inner
                            .failure
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .take();
                        return Err(failure.unwrap_or_else(|| {
                            StoreError::transient(
                                RetryClass::Unavailable,
                                format!("cannot read `{CONTROL}` (the rebuild's control document)"),
                            )
                        }));
                    }
                    let wait = tokio::time::sleep(BEAT / 5);
                    tokio::select! {
                        _ = reading.changed() => {}
                        () = wait => {}
                    }
                }
            }
        }
    }
}

fn paused_at_stop() -> StoreError {
    StoreError::transient(
        RetryClass::Unavailable,
        "stopping while a rebuild holds the read models",
    )
}

/// The beating task.
struct Beat {
    tx: watch::Sender<Reading>,
    inner: std::sync::Weak<Inner>,
    /// The rebuild's last beat and when it was first seen.
    rebuild_beat: Option<(Bson, Instant)>,
    /// The pause found void (its rebuild went silent), by the rebuild's id.
    voided: Option<String>,
    count: i64,
}

impl Beat {
    /// Beats until every gate is closed or dropped (not at the shutdown
    /// signal: a graceful stop may still finish a transaction's batches).
    async fn run(mut self) {
        let mut tick = tokio::time::interval(BEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match self.inner.upgrade() {
                Some(inner) if inner.open.load(Ordering::SeqCst) > 0 => {}
                _ => break,
            }
            let beat = self.once().await;
            if let Err(err) = &beat {
                tracing::debug!(error = %crate::policy::describe(err), "rebuild gate: beat failed");
            }
            if let Some(inner) = self.inner.upgrade() {
                *inner
                    .failure
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = beat.err();
            }
        }
    }

    /// Beats (saying whether this writer is paused), then reads the control
    /// document. In that order: a rebuild that lists the writers after
    /// setting its pause either sees this beat or is seen by the read.
    async fn once(&mut self) -> Result<(), StoreError> {
        let Some(inner) = self.inner.upgrade() else {
            return Ok(());
        };
        let control = inner.store.database().collection::<Document>(CONTROL);
        self.count += 1;
        let paused_for = match &self.tx.borrow().pause {
            Some(rebuild) if inner.in_flight.load(Ordering::SeqCst) == 0 => {
                Bson::String(rebuild.clone())
            }
            _ => Bson::Null,
        };
        control
            .update_one(
                doc! { "_id": &inner.id },
                doc! { "$set": {
                    "beat": self.count,
                    "pid": i64::from(std::process::id()),
                    "host": &inner.host,
                    "paused_for": paused_for,
                    "seen_at": mongodb::bson::DateTime::now(),
                } },
            )
            .upsert(true)
            .await?;
        let found = control.find_one(doc! { "_id": REBUILD_ID }).await?;
        let pause = self.pause_of(found.as_ref());
        let before = self.tx.borrow().pause.clone();
        if pause.is_some() && pause != before {
            inner.pauses.fetch_add(1, Ordering::SeqCst);
        }
        self.tx.send_replace(Reading {
            pause,
            read_at: Some(Instant::now()),
        });
        Ok(())
    }

    /// The pause the control document asks for, unless its rebuild has gone
    /// silent.
    fn pause_of(&mut self, control: Option<&Document>) -> Option<String> {
        let control = control?;
        let pause = match control.get("pause") {
            Some(Bson::String(id)) => id.clone(),
            _ => {
                self.rebuild_beat = None;
                return None;
            }
        };
        let beat = control.get("beat").cloned().unwrap_or(Bson::Null);
        match &self.rebuild_beat {
            Some((seen, _)) if *seen == beat => {}
            _ => self.rebuild_beat = Some((beat, Instant::now())),
        }
        let silent = self
            .rebuild_beat
            .as_ref()
            .is_some_and(|(_, since)| since.elapsed() >= REBUILD_SILENT);
        if silent {
            if self.voided.as_deref() != Some(pause.as_str()) {
                tracing::warn!(rebuild = %pause, "the rebuild that paused the writers stopped beating; resuming");
                self.voided = Some(pause);
            }
            return None;
        }
        Some(pause)
    }
}

/// This machine's name, for the registration.
pub fn host() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into())
}
