//! Step 3 of a batch: bring the denormalized copies up to date, after the
//! batch's own writes are durable. Every statement is guarded by the version
//! of its source, so it is idempotent and never moves a copy backwards.

use super::state::{bson_time, ActivityDoc, NameCopy};
use super::{BatchReport, Work};
use crate::store::mongo::{MongoStore, StoreError, ACTIVITIES, USERS};
use mongodb::bson::{doc, Bson, Document};
use std::collections::{BTreeMap, BTreeSet};
use uuid::Uuid;

pub(super) async fn run(
    store: &MongoStore,
    work: &Work,
    report: &mut BatchReport,
) -> Result<(), StoreError> {
    let mut name_statements = Vec::new();
    // (a) users renamed or created here: their name into every activity naming them.
    for user in &work.renamed {
        if let Some(copy) = work.names.get(user) {
            name_statements.extend(name_copies(user, copy, None));
        }
    }
    // (b) activities written here: re-read their members' names now that our
    // write is durable, and fix any copy that a concurrent rename outran.
    let mut members: BTreeMap<Uuid, Vec<Uuid>> = BTreeMap::new();
    for id in &work.touched {
        if let Some(Some(activity)) = work.activities.get(id) {
            members.insert(
                *id,
                activity.members().into_iter().map(|(u, _)| u).collect(),
            );
        }
    }
    let member_ids: BTreeSet<Uuid> = members
        .values()
        .flatten()
        .filter(|u| !work.renamed.contains(u))
        .copied()
        .collect();
    if !member_ids.is_empty() {
        let current = current_names(store, &member_ids).await?;
        report.round_trips += 1;
        for (activity_id, users) in &members {
            let Some(Some(activity)) = work.activities.get(activity_id) else {
                continue;
            };
            for user in users {
                let Some(now) = current.get(user) else {
                    continue;
                };
                if copied_version(activity, user) < now.version {
                    name_statements.extend(name_copies(user, now, Some(activity_id)));
                }
            }
        }
    }
    write(store, ACTIVITIES, name_statements, report).await?;

    // (c) activity entries inside users.
    let mut entry_statements = Vec::new();
    for id in &work.touched {
        let Some(Some(activity)) = work.activities.get(id) else {
            continue;
        };
        let everyone = work.resummarize.contains(id);
        for (user, role) in activity.members() {
            if everyone || work.joined.contains(&(*id, user)) {
                entry_statements.extend(entry_upsert(id, activity, &user, role));
            }
        }
    }
    for (activity_id, user) in &work.departed {
        let Some(Some(activity)) = work.activities.get(activity_id) else {
            continue;
        };
        if !activity.members().iter().any(|(u, _)| u == user) {
            entry_statements.push(entry_removal(activity_id, activity.seq, user));
        }
    }
    // (d) users created here: entries for the activities that already name them.
    if !work.created.is_empty() {
        let created: Vec<String> = work.created.iter().map(Uuid::to_string).collect();
        let naming = store
            .find(
                ACTIVITIES,
                doc! { "$or": [
                    { "organizer.user_id": { "$in": created.clone() } },
                    { "participants.user_id": { "$in": created } },
                ] },
                None,
            )
            .await?;
        report.round_trips += 1;
        for doc in &naming {
            let (Ok(id), Ok(activity)) = (super::doc_id(doc), ActivityDoc::from_bson(doc)) else {
                continue;
            };
            for (user, role) in activity.members() {
                if work.created.contains(&user) {
                    entry_statements.extend(entry_upsert(&id, &activity, &user, role));
                }
            }
        }
    }
    write(store, USERS, entry_statements, report).await
}

fn copied_version(activity: &ActivityDoc, user: &Uuid) -> i64 {
    if activity.organizer == *user {
        let participant = activity
            .participants
            .iter()
            .find(|p| p.user_id == *user)
            .map_or(i64::MAX, |p| p.name_version);
        activity.organizer_name_version.min(participant)
    } else {
        activity
            .participants
            .iter()
            .find(|p| p.user_id == *user)
            .map_or(i64::MAX, |p| p.name_version)
    }
}

async fn current_names(
    store: &MongoStore,
    users: &BTreeSet<Uuid>,
) -> Result<BTreeMap<Uuid, NameCopy>, StoreError> {
    let docs = store
        .find_by_ids(
            USERS,
            users.iter().map(Uuid::to_string).collect(),
            Some(doc! { "display_name": 1, "_seq": 1 }),
        )
        .await?;
    let mut names = BTreeMap::new();
    for doc in docs {
        let Ok(id) = super::doc_id(&doc) else {
            continue;
        };
        let Ok(version) = super::state::read_i64(&doc, "_seq") else {
            continue;
        };
        names.insert(
            id,
            NameCopy {
                name: doc.get_str("display_name").ok().map(str::to_string),
                version,
            },
        );
    }
    Ok(names)
}

/// "Older than `version`, or never copied": the guard of every copy.
fn older(field: String, version: i64) -> Document {
    doc! { "$or": [ { &field: { "$lt": version } }, { &field: { "$exists": false } } ] }
}

fn name_bson(copy: &NameCopy) -> Bson {
    copy.name.clone().map_or(Bson::Null, Bson::String)
}

/// A user's name into the participant and organizer copies (of one activity,
/// or of all that name the user).
fn name_copies(user: &Uuid, copy: &NameCopy, only: Option<&Uuid>) -> [Document; 2] {
    let u = user.to_string();
    let scope = |mut filter: Document| {
        if let Some(activity) = only {
            filter.insert("_id", activity.to_string());
        }
        filter
    };
    let mut participants = older(format!("_uv.{u}"), copy.version);
    participants.insert("participants.user_id", &u);
    let mut organizer = older("_ov".into(), copy.version);
    organizer.insert("organizer.user_id", &u);
    [
        doc! {
            "q": scope(participants),
            "u": { "$set": { "participants.$[p].display_name": name_bson(copy), format!("_uv.{u}"): copy.version } },
            "arrayFilters": [ { "p.user_id": &u } ],
            "multi": true,
        },
        doc! {
            "q": scope(organizer),
            "u": { "$set": { "organizer.display_name": name_bson(copy), "_ov": copy.version } },
            "multi": true,
        },
    ]
}

/// An activity's entry in a member's `activities`: updated in place when
/// present, appended when not (exactly one of the two matches).
fn entry_upsert(id: &Uuid, activity: &ActivityDoc, user: &Uuid, role: &str) -> [Document; 2] {
    let a = id.to_string();
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
    [
        doc! {
            "q": present,
            "u": { "$set": { "activities.$[e]": entry.clone(), &version_field: activity.seq } },
            "arrayFilters": [ { "e.activity_id": &a } ],
        },
        doc! {
            "q": absent,
            "u": { "$push": { "activities": entry }, "$set": { &version_field: activity.seq } },
        },
    ]
}

fn entry_removal(id: &Uuid, version: i64, user: &Uuid) -> Document {
    let a = id.to_string();
    let version_field = format!("_av.{a}");
    let mut filter = older(version_field.clone(), version);
    filter.insert("_id", user.to_string());
    doc! {
        "q": filter,
        "u": { "$pull": { "activities": { "activity_id": &a } }, "$set": { &version_field: version } },
    }
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
