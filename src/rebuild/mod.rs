//! `rebuild`: the read models built anew from the outbox into shadow
//! collections while the live ones keep serving and the live processor
//! keeps applying, then swapped in (docs/design.md, "Rebuild"):
//!
//! 1. **build**: every outbox row, in `sequence_id` order from one snapshot,
//!    through the same [`Projector`] the processor uses, into
//!    `users__rebuild` and `activities__rebuild` (their dead letters go to
//!    `dead_letters__rebuild`, dropped at the end: the live letters stay);
//! 2. **catch up**: an aggregate whose live document holds a later `_seq`
//!    than its shadow has events the snapshot did not see; its rows after
//!    the shadow's `_seq` are applied to the shadow, until a pass finds
//!    little left;
//! 3. **swap**: the writers pause at a batch boundary ([`gate`]), a last
//!    catch-up pass runs against the now still live models, each shadow is
//!    renamed over its live collection (`renameCollection` with
//!    `dropTarget`: a reader sees the old collection or the new one, never
//!    none), and the writers resume on the new collections. Events they
//!    have not applied yet come after every `_seq` the shadow holds (per
//!    aggregate, commit order is sequence order), so they apply on top.
//!
//! An interrupted or killed rebuild leaves the live collections as they
//! were (before the swap) and its shadow behind: the next rebuild discards
//! it and starts over.

pub mod control;
pub mod gate;

use crate::decode::{decode_text_row, OutboxEvent};
use crate::outbox::OutboxError;
use crate::projection::Projector;
use crate::source::replication::EVENT_COLUMNS;
use crate::store::mongo::{MongoStore, StoreError, DEAD_LETTERS, REBUILT};
use crate::verify::diff::{differences, Difference};
use crate::verify::found::{comparable, id_text};
use crate::verify::outbox as cursor;
use control::{Control, Stale};
use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use std::time::{Duration, Instant};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The cursor the build reads the outbox with.
const CURSOR: &str = "aep_rebuild";

/// A catch-up pass that applied at most this many events (or no fewer than
/// the pass before) is the last one before the swap.
const SMALL_PASS: u64 = 500;

/// Most catch-up passes before the swap (the pause's pass takes the rest).
const MAX_PASSES: u32 = 10;

/// Aggregates per catch-up query.
const CATCH_UP_CHUNK: usize = 1_000;

/// How often the control document hears the progress.
const RECORD_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("{0}")]
    Busy(String),
    #[error("another rebuild took the control document over; this one stopped")]
    Lost,
    #[error("interrupted")]
    Interrupted,
    #[error("cannot use the read models")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Outbox(#[from] OutboxError),
}

/// How to rebuild.
#[derive(Debug, Clone)]
pub struct Options {
    /// Build and compare with the live models, swap nothing.
    pub dry_run: bool,
    /// Events per projected batch.
    pub batch_size: usize,
    /// Differences of a dry run kept for printing.
    pub show: usize,
}

/// What is happening, for the command line to show.
#[derive(Debug)]
pub enum Step<'a> {
    /// A previous rebuild stopped without finishing; its shadow is discarded.
    TookOver(&'a Stale),
    /// Outbox rows built into the shadow so far, of about `total`.
    Building { done: u64, total: u64 },
    /// A catch-up pass applied `events` events (`pass` `None`: the last one,
    /// with the writers paused).
    CaughtUp { pass: Option<u32>, events: u64 },
    /// The writers are paused (`gone`: those taken as stopped).
    Paused { gone: &'a [String] },
    /// A shadow collection replaced its live one.
    Swapped { collection: &'a str },
}

/// What a rebuild did.
#[derive(Debug, Default)]
pub struct Outcome {
    pub rows: u64,
    pub malformed: u64,
    pub applied: u64,
    /// Events applied by the catch-up passes (the pause's included).
    pub caught_up: u64,
    /// How long the writers were paused.
    pub paused: Duration,
    /// Documents in the rebuilt collections.
    pub users: u64,
    pub activities: u64,
    /// With `--dry-run`: the shadow against the live models.
    pub comparison: Option<Comparison>,
}

/// The shadow held against the live models (`--dry-run`).
#[derive(Debug, Default)]
pub struct Comparison {
    /// Documents on both sides, and those that differ at the same `_seq`.
    pub compared: u64,
    pub differing: u64,
    /// Documents only the live models hold, only the shadow holds, and
    /// those that differ at different positions (the live processor is
    /// behind or ahead).
    pub only_live: u64,
    pub only_shadow: u64,
    pub elsewhere: u64,
    /// The first differences: collection, id, field.
    pub shown: Vec<(String, String, Difference)>,
    /// The first documents found on one side only: collection, id, "live"/"shadow".
    pub alone: Vec<(String, String, &'static str)>,
}

/// Rebuilds the read models of `live` from the outbox (`client`); `stop`
/// interrupts it before the swap.
pub async fn rebuild(
    client: &Client,
    live: &MongoStore,
    options: &Options,
    stop: &CancellationToken,
    step: &mut dyn FnMut(Step),
) -> Result<Outcome, RebuildError> {
    let (control, stale) = Control::claim(live, options.dry_run).await?;
    if let Some(stale) = &stale {
        step(Step::TookOver(stale));
    }
    let shadow = live.shadow();
    let result = run(client, live, &shadow, &control, options, stop, step).await;
    match &result {
        Ok(outcome) => {
            let state = if options.dry_run { "dry run" } else { "done" };
            control.finish(state, &summary(outcome)).await;
        }
        Err(RebuildError::Lost) => {}
        Err(err) => {
            let state = match err {
                RebuildError::Interrupted => "interrupted",
                _ => "failed",
            };
            control.finish(state, &crate::policy::describe(err)).await;
        }
    }
    if options.dry_run || matches!(&result, Err(RebuildError::Interrupted)) {
        if let Err(err) = drop_shadow(&shadow).await {
            tracing::warn!(error = %crate::policy::describe(&err), "cannot drop the shadow collections");
        }
    }
    result
}

async fn run(
    client: &Client,
    live: &MongoStore,
    shadow: &MongoStore,
    control: &Control,
    options: &Options,
    stop: &CancellationToken,
    step: &mut dyn FnMut(Step),
) -> Result<Outcome, RebuildError> {
    drop_shadow(shadow).await?;
    for name in REBUILT {
        shadow
            .database()
            .create_collection(shadow.name(name))
            .await
            .map_err(StoreError::from)?;
    }
    shadow.ensure_indexes().await?;
    let projector = Projector::new(shadow.clone());
    let mut outcome = build(client, &projector, control, options, stop, step).await?;
    control.set(doc! { "state": "catching up" }).await?;
    let mut previous = u64::MAX;
    for pass in 1..=MAX_PASSES {
        if stop.is_cancelled() {
            return Err(RebuildError::Interrupted);
        }
        let events = catch_up(client, live, &projector, options.batch_size).await?;
        outcome.caught_up += events;
        step(Step::CaughtUp {
            pass: Some(pass),
            events,
        });
        control.progress("catching up", u64::from(pass), 0).await?;
        // Small enough, or no longer shrinking (writes arrive as fast as a
        // pass takes them): the paused pass takes the rest.
        if events <= SMALL_PASS || events >= previous {
            break;
        }
        previous = events;
    }
    if stop.is_cancelled() {
        return Err(RebuildError::Interrupted);
    }
    if options.dry_run {
        outcome.comparison = Some(compare(live, shadow, options.show).await?);
    } else {
        swap(
            client,
            live,
            &projector,
            control,
            options,
            &mut outcome,
            step,
        )
        .await?;
    }
    outcome.users = live_or_shadow(live, shadow, options.dry_run, REBUILT[0]).await?;
    outcome.activities = live_or_shadow(live, shadow, options.dry_run, REBUILT[1]).await?;
    Ok(outcome)
}

async fn live_or_shadow(
    live: &MongoStore,
    shadow: &MongoStore,
    dry_run: bool,
    name: &str,
) -> Result<u64, StoreError> {
    if dry_run {
        shadow.count(name).await
    } else {
        live.count(name).await
    }
}

/// Step 1: every outbox row into the shadow.
async fn build(
    client: &Client,
    projector: &Projector,
    control: &Control,
    options: &Options,
    stop: &CancellationToken,
    step: &mut dyn FnMut(Step),
) -> Result<Outcome, RebuildError> {
    let total: i64 = client
        .query_one("SELECT count(*) FROM event_outbox", &[])
        .await
        .map_err(|e| OutboxError::query("cannot count the outbox", e))?
        .get(0);
    let total = u64::try_from(total).unwrap_or(0);
    let mut outcome = Outcome::default();
    control.progress("building", 0, total).await?;
    step(Step::Building { done: 0, total });
    cursor::open_cursor(client, CURSOR).await?;
    let mut recorded = Instant::now();
    let built = async {
        loop {
            let mut events = Vec::new();
            let rows = cursor::fetch(client, CURSOR, &mut |columns| {
                match decode_text_row(columns) {
                    Ok(event) => events.push(event),
                    // The processor dead-letters it as it is: no effect.
                    Err(_) => outcome.malformed += 1,
                }
            })
            .await?;
            // Progress per batch: the malformed rows of the chunk first.
            outcome.rows += (rows - events.len()) as u64;
            for batch in events.chunks(options.batch_size.max(1)) {
                outcome.applied += apply(projector, batch, options.batch_size).await?;
                outcome.rows += batch.len() as u64;
                let total = total.max(outcome.rows);
                step(Step::Building {
                    done: outcome.rows,
                    total,
                });
                if recorded.elapsed() >= RECORD_EVERY {
                    recorded = Instant::now();
                    control.progress("building", outcome.rows, total).await?;
                }
                if stop.is_cancelled() {
                    return Err(RebuildError::Interrupted);
                }
            }
            if rows < cursor::CHUNK {
                return Ok(());
            }
        }
    };
    let built: Result<(), RebuildError> = built.await;
    cursor::close(client).await;
    built?;
    control
        .progress("building", outcome.rows, total.max(outcome.rows))
        .await?;
    Ok(outcome)
}

/// Projects `events` in batches; how many took effect.
async fn apply(
    projector: &Projector,
    events: &[OutboxEvent],
    batch_size: usize,
) -> Result<u64, StoreError> {
    let mut applied = 0;
    for batch in events.chunks(batch_size.max(1)) {
        let report = projector.apply(batch).await?;
        applied += report.applied as u64;
    }
    Ok(applied)
}

/// Step 2: the events of every aggregate whose live document is ahead of
/// its shadow (or has none), applied to the shadow; how many there were.
async fn catch_up(
    client: &Client,
    live: &MongoStore,
    projector: &Projector,
    batch_size: usize,
) -> Result<u64, RebuildError> {
    let shadow = projector.store();
    let mut behind = Vec::new();
    for name in REBUILT {
        behind.extend(behind_live(live, shadow, name).await?);
    }
    let select = format!(
        "SELECT {} FROM event_outbox o \
         JOIN unnest($1::uuid[], $2::bigint[]) AS b(id, seq) \
           ON o.aggregate_id = b.id AND o.sequence_id > b.seq \
         ORDER BY o.sequence_id",
        EVENT_COLUMNS
            .iter()
            .map(|c| format!("o.{c}::text"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut caught = 0;
    for chunk in behind.chunks(CATCH_UP_CHUNK) {
        let ids: Vec<Uuid> = chunk.iter().map(|(id, _)| *id).collect();
        let seqs: Vec<i64> = chunk.iter().map(|(_, seq)| *seq).collect();
        let rows = client
            .query(&select, &[&ids, &seqs])
            .await
            .map_err(|e| OutboxError::query("cannot read the outbox", e))?;
        let events: Vec<OutboxEvent> = rows
            .iter()
            .filter_map(|row| {
                let values: Vec<Option<String>> = (0..EVENT_COLUMNS.len())
                    .map(|i| row.try_get(i).ok().flatten())
                    .collect();
                let columns: Vec<(&str, Option<&str>)> = EVENT_COLUMNS
                    .iter()
                    .zip(&values)
                    .map(|(name, value)| (*name, value.as_deref()))
                    .collect();
                decode_text_row(&columns).ok()
            })
            .collect();
        caught += events.len() as u64;
        apply(projector, &events, batch_size).await?;
    }
    Ok(caught)
}

/// The aggregates of collection `name` whose live document holds a later
/// `_seq` than the shadow's (or the shadow has none), with the shadow's
/// `_seq` (0: none). Both sides are read in `_id` order and merged.
async fn behind_live(
    live: &MongoStore,
    shadow: &MongoStore,
    name: &str,
) -> Result<Vec<(Uuid, i64)>, StoreError> {
    let (live_collection, shadow_collection) = (live.collection(name), shadow.collection(name));
    let mut live_docs = live_collection
        .find(doc! {})
        .projection(doc! { "_seq": 1 })
        .sort(doc! { "_id": 1 })
        .await?;
    let mut shadow_docs = shadow_collection
        .find(doc! {})
        .projection(doc! { "_seq": 1 })
        .sort(doc! { "_id": 1 })
        .await?;
    let mut behind = Vec::new();
    let mut shadow_next = shadow_docs.try_next().await?;
    while let Some(doc) = live_docs.try_next().await? {
        let id = id_text(&doc);
        while shadow_next.as_ref().is_some_and(|s| id_text(s) < id) {
            shadow_next = shadow_docs.try_next().await?;
        }
        let shadow_seq = match &shadow_next {
            Some(s) if id_text(s) == id => seq_of(s),
            _ => Some(0),
        };
        let (Ok(uuid), Some(live_seq), Some(shadow_seq)) =
            (Uuid::parse_str(&id), seq_of(&doc), shadow_seq)
        else {
            continue;
        };
        if live_seq > shadow_seq {
            behind.push((uuid, shadow_seq));
        }
    }
    Ok(behind)
}

fn seq_of(doc: &Document) -> Option<i64> {
    match doc.get("_seq") {
        Some(Bson::Int64(n)) => Some(*n),
        Some(Bson::Int32(n)) => Some(i64::from(*n)),
        _ => None,
    }
}

/// Step 3: the writers paused, the last events applied, the collections
/// swapped, the writers resumed.
async fn swap(
    client: &Client,
    live: &MongoStore,
    projector: &Projector,
    control: &Control,
    options: &Options,
    outcome: &mut Outcome,
    step: &mut dyn FnMut(Step),
) -> Result<(), RebuildError> {
    let gone = control.pause_writers().await?;
    let paused = Instant::now();
    step(Step::Paused { gone: &gone });
    let swapped = async {
        let events = catch_up(client, live, projector, options.batch_size).await?;
        outcome.caught_up += events;
        step(Step::CaughtUp { pass: None, events });
        if !control.owned() {
            return Err(RebuildError::Lost);
        }
        control.set(doc! { "state": "swapping" }).await?;
        let shadow = projector.store();
        let database = live.database().name().to_string();
        let admin = live.client().database("admin");
        for name in REBUILT {
            admin
                .run_command(doc! {
                    "renameCollection": format!("{database}.{}", shadow.name(name)),
                    "to": format!("{database}.{name}"),
                    "dropTarget": true,
                })
                .await
                .map_err(StoreError::from)?;
            step(Step::Swapped { collection: name });
        }
        Ok(())
    };
    let swapped: Result<(), RebuildError> = swapped.await;
    outcome.paused = paused.elapsed();
    if !matches!(swapped, Err(RebuildError::Lost)) {
        let state = if swapped.is_ok() { "swapped" } else { "failed" };
        control.resume_writers(state).await?;
    }
    swapped?;
    // The shadow's own dead letters: the live ones stand.
    projector
        .store()
        .collection(DEAD_LETTERS)
        .drop()
        .await
        .map_err(StoreError::from)?;
    Ok(())
}

/// Drops the shadow collections (a previous rebuild's included).
async fn drop_shadow(shadow: &MongoStore) -> Result<(), StoreError> {
    for name in REBUILT.into_iter().chain([DEAD_LETTERS]) {
        shadow.collection(name).drop().await?;
    }
    Ok(())
}

/// `--dry-run`: every shadow document against its live one.
async fn compare(
    live: &MongoStore,
    shadow: &MongoStore,
    show: usize,
) -> Result<Comparison, StoreError> {
    let mut comparison = Comparison::default();
    for name in REBUILT {
        let (live_collection, shadow_collection) = (live.collection(name), shadow.collection(name));
        let mut live_docs = live_collection
            .find(doc! {})
            .sort(doc! { "_id": 1 })
            .await?;
        let mut shadow_docs = shadow_collection
            .find(doc! {})
            .sort(doc! { "_id": 1 })
            .await?;
        let mut l = live_docs.try_next().await?;
        let mut s = shadow_docs.try_next().await?;
        loop {
            let order = match (&l, &s) {
                (None, None) => break,
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some(a), Some(b)) => id_text(a).cmp(&id_text(b)),
            };
            match order {
                std::cmp::Ordering::Less => {
                    if let Some(doc) = l.take() {
                        comparison.only_live += 1;
                        alone(&mut comparison, show, name, &doc, "live");
                    }
                    l = live_docs.try_next().await?;
                }
                std::cmp::Ordering::Greater => {
                    if let Some(doc) = s.take() {
                        comparison.only_shadow += 1;
                        alone(&mut comparison, show, name, &doc, "rebuild");
                    }
                    s = shadow_docs.try_next().await?;
                }
                std::cmp::Ordering::Equal => {
                    if let (Some(a), Some(b)) = (l.take(), s.take()) {
                        held_against(&mut comparison, show, name, &a, &b);
                    }
                    l = live_docs.try_next().await?;
                    s = shadow_docs.try_next().await?;
                }
            }
        }
    }
    Ok(comparison)
}

fn alone(comparison: &mut Comparison, show: usize, name: &str, doc: &Document, side: &'static str) {
    if comparison.alone.len() < show {
        comparison
            .alone
            .push((name.to_string(), id_text(doc), side));
    }
}

/// One document on both sides. A difference between documents at different
/// `_seq` may be the live processor being behind or ahead: counted apart.
fn held_against(
    comparison: &mut Comparison,
    show: usize,
    name: &str,
    live: &Document,
    shadow: &Document,
) {
    comparison.compared += 1;
    // The rebuild's document is what the outbox defines: it is "expected".
    let found = differences(&comparable(name, shadow), &comparable(name, live));
    if found.is_empty() {
        return;
    }
    if seq_of(live) != seq_of(shadow) {
        comparison.elsewhere += 1;
        return;
    }
    comparison.differing += 1;
    let id = id_text(live);
    for difference in found {
        if comparison.shown.len() < show {
            comparison
                .shown
                .push((name.to_string(), id.clone(), difference));
        }
    }
}

/// One line for the control document.
fn summary(outcome: &Outcome) -> String {
    format!(
        "{} rows, {} applied, {} caught up, {} users, {} activities, writers paused {} ms",
        outcome.rows,
        outcome.applied,
        outcome.caught_up,
        outcome.users,
        outcome.activities,
        outcome.paused.as_millis()
    )
}
