//! `show`: the read models as a person reads them.

use crate::store::mongo::{MongoStore, ACTIVITIES, DEAD_LETTERS, USERS};
use clap::Args;
use mongodb::bson::{doc, Bson, Document};
use std::fmt::Write as _;

#[derive(Args, Debug)]
pub struct ShowArgs {
    /// Most documents to print per collection.
    #[arg(long, default_value_t = 10)]
    pub limit: i64,
}

fn field(doc: &Document, key: &str) -> String {
    match doc.get(key) {
        None | Some(Bson::Null) => "-".into(),
        Some(Bson::String(s)) => s.clone(),
        Some(Bson::DateTime(t)) => t.try_to_rfc3339_string().unwrap_or_else(|_| t.to_string()),
        Some(other) => other.clone().into_relaxed_extjson().to_string(),
    }
}

/// A location's name when it has one, else the value as it is.
fn location(activity: &Document) -> String {
    match activity.get("location") {
        Some(Bson::Document(l)) if l.get_str("name").is_ok() => field(l, "name"),
        _ => field(activity, "location"),
    }
}

fn docs(value: Option<&Bson>) -> Vec<&Document> {
    match value {
        Some(Bson::Array(items)) => items.iter().filter_map(Bson::as_document).collect(),
        _ => Vec::new(),
    }
}

/// Renders users, activities and dead letters.
pub async fn render(
    store: &MongoStore,
    limit: i64,
) -> Result<String, crate::store::mongo::StoreError> {
    let mut out = String::new();
    let shown = |n: usize| {
        if n as i64 >= limit {
            format!(" (first {limit})")
        } else {
            String::new()
        }
    };
    let users = store.find_limited(USERS, limit).await?;
    let activities = store.find_limited(ACTIVITIES, limit).await?;
    let dead = store.find_limited(DEAD_LETTERS, limit).await?;
    let _ = writeln!(
        out,
        "users: {}{}",
        store.count(USERS).await?,
        shown(users.len())
    );
    for u in &users {
        let _ = writeln!(
            out,
            "  {} <{}>  [{}]",
            field(u, "display_name"),
            field(u, "email"),
            field(u, "_id")
        );
        let _ = writeln!(
            out,
            "    created {}, updated {}",
            field(u, "created_at"),
            field(u, "updated_at")
        );
        for a in docs(u.get("activities")) {
            let _ = writeln!(
                out,
                "    - {} of \"{}\" on {} ({})",
                field(a, "role"),
                field(a, "title"),
                field(a, "starts_at"),
                field(a, "status")
            );
        }
    }
    let _ = writeln!(
        out,
        "activities: {}{}",
        store.count(ACTIVITIES).await?,
        shown(activities.len())
    );
    for a in &activities {
        let organizer = a.get_document("organizer").ok();
        let _ = writeln!(out, "  \"{}\"  [{}]", field(a, "title"), field(a, "_id"));
        let _ = writeln!(
            out,
            "    {} on {} at {}",
            field(a, "status"),
            field(a, "starts_at"),
            location(a)
        );
        let _ = writeln!(
            out,
            "    organizer {}; {} of {} places taken",
            organizer.map_or("-".into(), |o| field(o, "display_name")),
            field(a, "participant_count"),
            field(a, "capacity")
        );
        for p in docs(a.get("participants")) {
            let _ = writeln!(
                out,
                "    - {} (joined {})",
                field(p, "display_name"),
                field(p, "joined_at")
            );
        }
    }
    let _ = writeln!(
        out,
        "dead letters: {}{}",
        store.count(DEAD_LETTERS).await?,
        shown(dead.len())
    );
    for d in &dead {
        let _ = writeln!(
            out,
            "  {} #{} {}: {}",
            field(d, "event_type"),
            field(d, "sequence_id"),
            field(d, "_id"),
            field(d, "error")
        );
    }
    Ok(out)
}

impl MongoStore {
    /// Up to `limit` documents of a collection, in `_id` order.
    pub async fn find_limited(
        &self,
        collection: &str,
        limit: i64,
    ) -> Result<Vec<Document>, crate::store::mongo::StoreError> {
        use futures::TryStreamExt;
        let cursor = self
            .database()
            .collection::<Document>(collection)
            .find(doc! {})
            .sort(doc! { "_id": 1 })
            .limit(limit)
            .await?;
        Ok(cursor.try_collect().await?)
    }
}
