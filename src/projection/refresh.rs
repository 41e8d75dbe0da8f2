//! Step 3 of a batch: bring the denormalized copies up to date, after the
//! batch's own writes are durable.
//!
//! It first reads what it needs (the activities naming users renamed or
//! created here; the users named by activities touched here), then writes
//! only the copies that are behind. Every statement is still guarded by the
//! version of its source, so it is idempotent, never moves a copy backwards,
//! and loses nothing to a concurrent writer: whoever writes a source after our
//! read refreshes the copies itself, after its own write.

use super::state::{bson_time, read_i64, ActivityDoc, NameCopy};
use super::{doc_id, BatchReport, Work};
use crate::store::mongo::{MongoStore, StoreError, ACTIVITIES, USERS};
use mongodb::bson::{doc, Bson, Document};
use std::collections::{BTreeMap, BTreeSet};
use uuid::Uuid;

/// What the refresh needs to know of a user.
struct UserView {
    name: NameCopy,
    /// Version of each activity entry the user holds (`_av`), and which
    /// entries are present.
    entry_versions: BTreeMap<String, i64>,
    entries: BTreeSet<String>,
}

pub(super) async fn run(
    store: &MongoStore,
    work: &Work,
    report: &mut BatchReport,
) -> Result<(), StoreError> {
    // Activities naming users renamed or created here (after our writes).
    let naming = activities_naming(store, &work.renamed, report).await?;
    // Users named by the activities touched here, plus the created and departed.
    let mut wanted: BTreeSet<Uuid> = work.created.clone();
    for id in &work.touched {
        if let Some(Some(activity)) = work.activities.get(id) {
            wanted.extend(activity.members().into_iter().map(|(u, _)| u));
        }
    }
    wanted.extend(work.departed.iter().map(|(_, u)| *u));
    let users = read_users(store, &wanted, report).await?;

    let mut names = Vec::new();
    for (activity_id, activity) in &naming {
        for user in &work.renamed {
            if let Some(copy) = work.names.get(user) {
                names.extend(name_fixes(activity_id, activity, user, copy));
            }
        }
    }
    for id in &work.touched {
        let Some(Some(activity)) = work.activities.get(id) else {
            continue;
        };
        for (user, _) in activity.members() {
            if work.renamed.contains(&user) {
                continue;
            }
            let current = users.get(&user).map(|u| u.name.clone()).unwrap_or_default();
            names.extend(name_fixes(id, activity, &user, &current));
        }
    }
    write(store, ACTIVITIES, names, report).await?;

    let mut entries = Vec::new();
    for id in &work.touched {
        let Some(Some(activity)) = work.activities.get(id) else {
            continue;
        };
        let everyone = work.resummarize.contains(id);
        for (user, role) in activity.members() {
            if everyone || work.joined.contains(&(*id, user)) {
                entries.extend(entry_upsert(id, activity, &user, role, users.get(&user)));
            }
        }
    }
    for (activity_id, user) in &work.departed {
        let Some(Some(activity)) = work.activities.get(activity_id) else {
            continue;
        };
        if !activity.members().iter().any(|(u, _)| u == user) {
            entries.extend(entry_removal(
                activity_id,
                activity.seq,
                user,
                users.get(user),
            ));
        }
    }
    for (id, activity) in &naming {
        for (user, role) in activity.members() {
            if work.created.contains(&user) {
                entries.extend(entry_upsert(id, activity, &user, role, users.get(&user)));
            }
        }
    }
    write(store, USERS, entries, report).await
}

/// The activities that name any of `users`, as stored now. Two indexed finds
/// rather than one `$or`, which some servers answer with a collection scan.
async fn activities_naming(
    store: &MongoStore,
    users: &BTreeSet<Uuid>,
    report: &mut BatchReport,
) -> Result<BTreeMap<Uuid, ActivityDoc>, StoreError> {
    let mut found = BTreeMap::new();
    if users.is_empty() {
        return Ok(found);
    }
    let ids: Vec<String> = users.iter().map(Uuid::to_string).collect();
    for field in ["organizer.user_id", "participants.user_id"] {
        let docs = store
            .find(ACTIVITIES, doc! { field: { "$in": ids.clone() } }, None)
            .await?;
        report.round_trips += 1;
        for doc in &docs {
            let id = doc_id(doc)?;
            let activity =
                ActivityDoc::from_bson(doc).map_err(|e| super::corrupt(ACTIVITIES, id, &e))?;
            found.insert(id, activity);
        }
    }
    Ok(found)
}

async fn read_users(
    store: &MongoStore,
    users: &BTreeSet<Uuid>,
    report: &mut BatchReport,
) -> Result<BTreeMap<Uuid, UserView>, StoreError> {
    let mut views = BTreeMap::new();
    if users.is_empty() {
        return Ok(views);
    }
    let docs = store
        .find_by_ids(
            USERS,
            users.iter().map(Uuid::to_string).collect(),
            Some(doc! { "display_name": 1, "_seq": 1, "_av": 1, "activities.activity_id": 1 }),
        )
        .await?;
    report.round_trips += 1;
    for doc in docs {
        let id = doc_id(&doc)?;
        let version = read_i64(&doc, "_seq").map_err(|e| super::corrupt(USERS, id, &e))?;
        let entry_versions = doc
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
                .filter_map(|e| {
                    e.as_document()?
                        .get_str("activity_id")
                        .ok()
                        .map(str::to_string)
                })
                .collect(),
            _ => BTreeSet::new(),
        };
        views.insert(
            id,
            UserView {
                name: NameCopy {
                    name: doc.get_str("display_name").ok().map(str::to_string),
                    version,
                },
                entry_versions,
                entries,
            },
        );
    }
    Ok(views)
}

/// "Older than `version`, or never copied": the guard of every copy. (`$not`
/// rather than an `$or` with `$exists`, which some servers answer with a
/// collection scan even beside an `_id`.)
fn older(field: String, version: i64) -> Document {
    doc! { field: { "$not": { "$gte": version } } }
}

fn name_bson(copy: &NameCopy) -> Bson {
    copy.name.clone().map_or(Bson::Null, Bson::String)
}

/// Statements bringing `activity`'s copies of `user`'s name to `copy`, for
/// the copies that are behind it.
fn name_fixes(id: &Uuid, activity: &ActivityDoc, user: &Uuid, copy: &NameCopy) -> Vec<Document> {
    let u = user.to_string();
    let mut statements = Vec::new();
    let participant = activity.participants.iter().find(|p| p.user_id == *user);
    if participant.is_some_and(|p| p.name_version < copy.version) {
        let mut q = older(format!("_uv.{u}"), copy.version);
        q.insert("_id", id.to_string());
        q.insert("participants.user_id", &u);
        statements.push(doc! {
            "q": q,
            "u": { "$set": { "participants.$[p].display_name": name_bson(copy), format!("_uv.{u}"): copy.version } },
            "arrayFilters": [ { "p.user_id": &u } ],
        });
    }
    if activity.organizer == *user && activity.organizer_name_version < copy.version {
        let mut q = older("_ov".into(), copy.version);
        q.insert("_id", id.to_string());
        q.insert("organizer.user_id", &u);
        statements.push(doc! {
            "q": q,
            "u": { "$set": { "organizer.display_name": name_bson(copy), "_ov": copy.version } },
        });
    }
    statements
}

/// Whether `user` (as read) holds an entry of `activity` older than `version`.
fn behind(user: Option<&UserView>, activity: &str, version: i64) -> bool {
    user.is_some_and(|u| u.entry_versions.get(activity).is_none_or(|v| *v < version))
}

/// An activity's entry in a member's `activities`, when the member exists and
/// its entry is behind: updated in place when present, appended when not.
/// Both statements go out (exactly one can match), so a concurrent change of
/// presence cannot make the refresh miss.
fn entry_upsert(
    id: &Uuid,
    activity: &ActivityDoc,
    user: &Uuid,
    role: &str,
    view: Option<&UserView>,
) -> Vec<Document> {
    let a = id.to_string();
    if !behind(view, &a, activity.seq) {
        return Vec::new();
    }
    let version_field = format!("_av.{a}");
    let (title, starts_at, status) = activity.summary();
    let entry = doc! {
        "activity_id": &a,
        "title": title,
        "starts_at": bson_time(&starts_at),
        "status": status,
        "role": role,
    };
    let mut present = older(version_field.clone(), activity.seq);
    present.insert("_id", user.to_string());
    present.insert("activities.activity_id", &a);
    let mut absent = older(version_field.clone(), activity.seq);
    absent.insert("_id", user.to_string());
    absent.insert("activities.activity_id", doc! { "$ne": &a });
    let in_place = doc! {
        "q": present,
        "u": { "$set": { "activities.$[e]": entry.clone(), &version_field: activity.seq } },
        "arrayFilters": [ { "e.activity_id": &a } ],
    };
    let append = doc! {
        "q": absent,
        "u": { "$push": { "activities": entry }, "$set": { &version_field: activity.seq } },
    };
    // The likely one first (ordered: false, so the other still runs).
    if view.is_some_and(|v| v.entries.contains(&a)) {
        vec![in_place, append]
    } else {
        vec![append, in_place]
    }
}

fn entry_removal(
    id: &Uuid,
    version: i64,
    user: &Uuid,
    view: Option<&UserView>,
) -> Option<Document> {
    let a = id.to_string();
    if !behind(view, &a, version) {
        return None;
    }
    let version_field = format!("_av.{a}");
    let mut filter = older(version_field.clone(), version);
    filter.insert("_id", user.to_string());
    Some(doc! {
        "q": filter,
        "u": { "$pull": { "activities": { "activity_id": &a } }, "$set": { &version_field: version } },
    })
}

async fn write(
    store: &MongoStore,
    collection: &str,
    statements: Vec<Document>,
    report: &mut BatchReport,
) -> Result<(), StoreError> {
    if statements.is_empty() {
        return Ok(());
    }
    let result = store.update(collection, statements, false).await?;
    report.round_trips += 1;
    report.documents_written += result.modified;
    match result.errors.first() {
        Some(err) => Err(StoreError::Permanent(format!(
            "refreshing copies in {collection}: {} (code {})",
            err.message, err.code
        ))),
        None => Ok(()),
    }
}
