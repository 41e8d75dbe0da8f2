//! Step 3 of a batch: bring the denormalized copies up to date, after the
//! batch's own writes are durable.
//!
//! Read, compute, compare-and-set: it reads the documents holding copies (the
//! activities touched here or naming a user renamed here, except, in the
//! first round, those the batch has just written, which it holds; the users
//! those name), computes each document's copies in memory, and writes each changed
//! document once, conditioned on the revision it read. A document someone
//! else changed in between matches nothing, and the round is redone from fresh
//! reads. Every copy carries its source's version and only moves forward, and
//! every source write is followed by its own refresh, so whoever writes a
//! source after our read refreshes the copies itself.

use super::state::{bson_time, new_revision, read_i64, ActivityDoc, NameCopy};
use super::{corrupt, doc_id, BatchReport, Work};
use crate::store::codes;
use crate::store::mongo::{MongoStore, StoreError, ACTIVITIES, USERS};
use mongodb::bson::{doc, Bson, Document};
use std::collections::{BTreeMap, BTreeSet};
use uuid::Uuid;

/// Rounds before a refresh that keeps losing races gives up (the batch is
/// then retried as a whole, which is safe).
const MAX_ROUNDS: usize = 8;

/// An activity as the refresh reads it.
struct StoredActivity {
    doc: ActivityDoc,
    rev: Option<String>,
}

/// A user as the refresh reads it: its name, and its `activities` entries.
struct StoredUser {
    name: NameCopy,
    entries: Vec<Document>,
    versions: BTreeMap<String, i64>,
    rev: Option<String>,
}

/// Returns the activities whose copies it rewrote.
pub(super) async fn run(
    store: &MongoStore,
    work: &Work,
    report: &mut BatchReport,
) -> Result<BTreeSet<Uuid>, StoreError> {
    let mut rewritten = BTreeSet::new();
    for round_number in 0..MAX_ROUNDS {
        if round(store, work, report, &mut rewritten, round_number == 0).await? {
            return Ok(rewritten);
        }
        tracing::debug!("copy refresh lost a race; redoing it from fresh reads");
    }
    Err(StoreError::transient(
        crate::policy::RetryClass::Conflict,
        "copies keep changing under the refresh; will retry",
    ))
}

/// One read-compute-write round; `false` when a write lost a race.
async fn round(
    store: &MongoStore,
    work: &Work,
    report: &mut BatchReport,
    rewritten: &mut BTreeSet<Uuid>,
    first: bool,
) -> Result<bool, StoreError> {
    let started = std::time::Instant::now();
    // The first round takes the activities this batch has just written as
    // it wrote them, with the revision token it gave them, rather than
    // reading them back: a writer that moved one since makes its
    // compare-and-set below match nothing, and the next round reads afresh.
    let mut activities = BTreeMap::new();
    let mut unread = work.touched.clone();
    if first {
        for id in &work.changed_activities {
            if let (Some(Some(doc)), Some(rev)) =
                (work.activities.get(id), work.new_activity_rev.get(id))
            {
                let stored = StoredActivity {
                    doc: doc.clone(),
                    rev: Some(rev.clone()),
                };
                activities.insert(*id, stored);
                unread.remove(id);
            }
        }
    }
    let held = activities.len();
    activities.extend(read_activities(store, &unread, "_id", report).await?);
    for field in ["organizer.user_id", "participants.user_id"] {
        activities.extend(read_activities(store, &work.renamed, field, report).await?);
    }
    // The users whose entries this round may change, and so whose names it
    // reads after the batch's own writes: the members of an activity whose
    // summary moved (or that was replayed), the members it gained, those it
    // lost and the users created here. The names of other members need no
    // read: the own write was fenced on the activity's `_rev`, so it put back
    // no copy older than the one it loaded, and a rename after that load
    // refreshes our write itself (its refresh reads after its own write).
    let mut wanted: BTreeSet<Uuid> = work.created.clone();
    for (id, stored) in &activities {
        if !work.touched.contains(id) {
            continue;
        }
        let everyone = work.resummarize.contains(id);
        wanted.extend(
            stored
                .doc
                .members()
                .into_iter()
                .map(|(u, _)| u)
                .filter(|u| everyone || work.joined.contains(&(*id, *u))),
        );
    }
    wanted.extend(work.departed.iter().map(|(_, u)| *u));
    let read_activities_ms = started.elapsed().as_secs_f64() * 1e3;
    let mut users = read_users(store, &wanted, report).await?;
    let read = started.elapsed();

    let name_of = |user: &Uuid| -> Option<NameCopy> {
        if work.renamed.contains(user) {
            work.names.get(user).cloned()
        } else {
            users.get(user).map(|u| u.name.clone())
        }
    };
    let mut name_writes = Vec::new();
    for (id, stored) in &activities {
        let mut doc = stored.doc.clone();
        if refresh_names(&mut doc, &name_of) {
            name_writes.push(activity_write(id, &doc, stored.rev.as_deref()));
            rewritten.insert(*id);
        }
    }

    let mut changed_users = BTreeSet::new();
    for (id, stored) in &activities {
        let a = &stored.doc;
        let everyone = work.resummarize.contains(id);
        for (user, role) in a.members() {
            let wanted_here =
                work.touched.contains(id) && (everyone || work.joined.contains(&(*id, user)));
            let created_here = work.created.contains(&user);
            if !(wanted_here || created_here) {
                continue;
            }
            if let Some(view) = users.get_mut(&user) {
                if set_entry(view, id, a, Some(role)) {
                    changed_users.insert(user);
                }
            }
        }
        for (activity_id, user) in &work.departed {
            if activity_id == id && !a.members().iter().any(|(u, _)| u == user) {
                if let Some(view) = users.get_mut(user) {
                    if set_entry(view, id, a, None) {
                        changed_users.insert(*user);
                    }
                }
            }
        }
    }
    let entry_writes: Vec<Document> = changed_users
        .iter()
        .filter_map(|u| users.get(u).map(|view| user_write(u, view)))
        .collect();

    let (read_activities, read_users) = (activities.len() - held, users.len());
    let (name_count, entry_count) = (name_writes.len(), entry_writes.len());
    let computed = started.elapsed();
    let names_ok = write(store, ACTIVITIES, name_writes, report).await?;
    let wrote_names = started.elapsed();
    let entries_ok = write(store, USERS, entry_writes, report).await?;
    tracing::debug!(
        held_activities = held,
        read_activities,
        read_users,
        name_writes = name_count,
        entry_writes = entry_count,
        // Field values are computed only when the line is logged.
        own_rewrites = rewritten.intersection(&work.changed_activities).count()
            + changed_users.intersection(&work.changed_users).count(),
        read_activities_ms,
        read_ms = read.as_secs_f64() * 1e3,
        compute_ms = (computed - read).as_secs_f64() * 1e3,
        names_ms = (wrote_names - computed).as_secs_f64() * 1e3,
        entries_ms = (started.elapsed() - wrote_names).as_secs_f64() * 1e3,
        "copy refresh round"
    );
    Ok(names_ok && entries_ok)
}

/// Brings every name copy of `doc` forward to its source; `true` if any moved.
pub(super) fn refresh_names(
    doc: &mut ActivityDoc,
    name_of: &dyn Fn(&Uuid) -> Option<NameCopy>,
) -> bool {
    let mut changed = false;
    if let Some(copy) = name_of(&doc.organizer) {
        if copy.version > doc.organizer_name_version {
            doc.organizer_name = copy.name;
            doc.organizer_name_version = copy.version;
            changed = true;
        }
    }
    for p in &mut doc.participants {
        if let Some(copy) = name_of(&p.user_id) {
            if copy.version > p.name_version {
                p.display_name = copy.name;
                p.name_version = copy.version;
                changed = true;
            }
        }
    }
    changed
}

/// Sets (role `Some`) or removes (`None`) `activity`'s entry in a user's
/// `activities`, unless the user already holds a newer one; `true` if it changed.
fn set_entry(view: &mut StoredUser, id: &Uuid, activity: &ActivityDoc, role: Option<&str>) -> bool {
    let key = id.to_string();
    if view.versions.get(&key).is_some_and(|v| *v >= activity.seq) {
        return false;
    }
    view.versions.insert(key.clone(), activity.seq);
    let position = view
        .entries
        .iter()
        .position(|e| e.get_str("activity_id") == Ok(key.as_str()));
    match (role, position) {
        (Some(role), position) => {
            let (title, starts_at, status) = activity.summary();
            let entry = doc! {
                "activity_id": &key,
                "title": title,
                "starts_at": bson_time(&starts_at),
                "status": status,
                "role": role,
            };
            match position {
                Some(at) => view.entries[at] = entry,
                None => view.entries.push(entry),
            }
        }
        (None, Some(at)) => {
            view.entries.remove(at);
        }
        (None, None) => {}
    }
    true
}

/// Compare-and-set on a revision: the stored one, or "none yet".
fn revision_guard(id: String, field: &str, rev: Option<&str>) -> Document {
    let current = match rev {
        Some(rev) => Bson::String(rev.to_string()),
        None => Bson::Document(doc! { "$exists": false }),
    };
    doc! { "_id": id, field: current }
}

fn activity_write(id: &Uuid, doc: &ActivityDoc, rev: Option<&str>) -> Document {
    let versions: Document = doc
        .participants
        .iter()
        .map(|p| (p.user_id.to_string(), Bson::Int64(p.name_version)))
        .collect();
    let participants: Vec<Bson> = doc
        .participants
        .iter()
        .map(|p| {
            Bson::Document(doc! {
                "user_id": p.user_id.to_string(),
                "display_name": p.display_name.clone().map_or(Bson::Null, Bson::String),
                "joined_at": bson_time(&p.joined_at),
            })
        })
        .collect();
    doc! {
        "q": revision_guard(id.to_string(), "_rev", rev),
        "u": { "$set": {
            "participants": participants,
            "organizer.display_name": doc.organizer_name.clone().map_or(Bson::Null, Bson::String),
            "_uv": versions,
            "_ov": doc.organizer_name_version,
            "_rev": new_revision(),
        } },
    }
}

fn user_write(id: &Uuid, view: &StoredUser) -> Document {
    let versions: Document = view
        .versions
        .iter()
        .map(|(k, v)| (k.clone(), Bson::Int64(*v)))
        .collect();
    doc! {
        "q": revision_guard(id.to_string(), "_erev", view.rev.as_deref()),
        "u": { "$set": {
            "activities": view.entries.iter().cloned().map(Bson::Document).collect::<Vec<_>>(),
            "_av": versions,
            "_erev": new_revision(),
        } },
    }
}

/// Activities whose `field` is one of `ids` (an indexed `$in`; no `$or`, which
/// some servers answer with a collection scan).
async fn read_activities(
    store: &MongoStore,
    ids: &BTreeSet<Uuid>,
    field: &str,
    report: &mut BatchReport,
) -> Result<BTreeMap<Uuid, StoredActivity>, StoreError> {
    let mut found = BTreeMap::new();
    if ids.is_empty() {
        return Ok(found);
    }
    let list: Vec<String> = ids.iter().map(Uuid::to_string).collect();
    report.round_trips += store.find_in_round_trips(list.len());
    let docs = store.find_in(ACTIVITIES, field, list, None).await?;
    for doc in &docs {
        let id = doc_id(doc)?;
        let activity = ActivityDoc::from_bson(doc).map_err(|e| corrupt(ACTIVITIES, id, &e))?;
        found.insert(
            id,
            StoredActivity {
                doc: activity,
                rev: doc.get_str("_rev").ok().map(str::to_string),
            },
        );
    }
    Ok(found)
}

async fn read_users(
    store: &MongoStore,
    users: &BTreeSet<Uuid>,
    report: &mut BatchReport,
) -> Result<BTreeMap<Uuid, StoredUser>, StoreError> {
    let mut found = BTreeMap::new();
    if users.is_empty() {
        return Ok(found);
    }
    let docs = store
        .find_by_ids(
            USERS,
            users.iter().map(Uuid::to_string).collect(),
            Some(doc! { "display_name": 1, "_seq": 1, "_av": 1, "_erev": 1, "activities": 1 }),
        )
        .await?;
    report.round_trips += store.find_in_round_trips(users.len());
    for doc in docs {
        let id = doc_id(&doc)?;
        let version = read_i64(&doc, "_seq").map_err(|e| corrupt(USERS, id, &e))?;
        let versions = doc
            .get_document("_av")
            .map(|av| {
                av.iter()
                    .filter_map(|(k, v)| match v {
                        Bson::Int64(n) => Some((k.clone(), *n)),
                        Bson::Int32(n) => Some((k.clone(), i64::from(*n))),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let entries = match doc.get("activities") {
            Some(Bson::Array(items)) => items
                .iter()
                .filter_map(|e| e.as_document().cloned())
                .collect(),
            _ => Vec::new(),
        };
        found.insert(
            id,
            StoredUser {
                name: NameCopy {
                    name: doc.get_str("display_name").ok().map(str::to_string),
                    version,
                },
                entries,
                versions,
                rev: doc.get_str("_erev").ok().map(str::to_string),
            },
        );
    }
    Ok(found)
}

/// Writes compare-and-set statements; `false` if any matched nothing.
async fn write(
    store: &MongoStore,
    collection: &str,
    statements: Vec<Document>,
    report: &mut BatchReport,
) -> Result<bool, StoreError> {
    if statements.is_empty() {
        return Ok(true);
    }
    let expected = statements.len() as u64;
    let result = store.update(collection, statements, false).await?;
    report.round_trips += 1;
    report.documents_written += result.modified;
    if let Some(err) = result.errors.first() {
        return Err(codes::write_error(collection, err.code, &err.message));
    }
    Ok(result.matched >= expected)
}
