//! A MongoDB database of its own per test, on the server the services script
//! started, and the read models read back in the reference fold's form.

use activity_event_processor::projection::fold::{sort_by_key, time_key, ReadModels};
use activity_event_processor::store::mongo::{MongoStore, ACTIVITIES, DEAD_LETTERS, USERS};
use mongodb::bson::{doc, Bson, Document};
use serde_json::{Map, Value};

pub fn mongodb_uri() -> String {
    std::env::var("MONGODB_URI").unwrap_or_else(|_| {
        panic!(
            "MONGODB_URI is not set: this test needs the real MongoDB-wire server. Start it with\n    {}",
            super::START_SERVICES
        )
    })
}

pub struct TestMongo {
    pub store: MongoStore,
    pub name: String,
    pub uri: String,
}

impl TestMongo {
    pub async fn create() -> TestMongo {
        Self::create_at(&mongodb_uri()).await
    }

    pub async fn create_at(uri: &str) -> TestMongo {
        let name = format!(
            "aep_test_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let store = MongoStore::connect(uri, &name).await.unwrap_or_else(|err| {
            panic!(
                "cannot reach MongoDB at MONGODB_URI: {err}\nstart it with\n    {}",
                super::START_SERVICES
            )
        });
        store.ensure_indexes().await.expect("indexes");
        TestMongo {
            store,
            name,
            uri: uri.to_string(),
        }
    }

    pub async fn drop(self) {
        let _ = self.store.database().drop().await;
    }

    pub async fn read_models(&self) -> ReadModels {
        read_models(&self.store).await
    }
}

/// The read models as stored, bookkeeping (`_`-prefixed) fields removed, dates as
/// RFC 3339 with milliseconds, arrays sorted: comparable with the fold.
pub async fn read_models(store: &MongoStore) -> ReadModels {
    let mut models = ReadModels::default();
    for doc in store.find(USERS, doc! {}, None).await.expect("users") {
        let mut value = to_json(&doc);
        if let Some(Value::Array(items)) = value.get_mut("activities") {
            sort_by_key(items, "activity_id");
        }
        models.users.insert(id_of(&value), value);
    }
    for doc in store
        .find(ACTIVITIES, doc! {}, None)
        .await
        .expect("activities")
    {
        let mut value = to_json(&doc);
        if let Some(Value::Array(items)) = value.get_mut("participants") {
            sort_by_key(items, "user_id");
        }
        models.activities.insert(id_of(&value), value);
    }
    for doc in store
        .find(DEAD_LETTERS, doc! {}, None)
        .await
        .expect("dead letters")
    {
        models.dead_letters.insert(id_of(&to_json(&doc)));
    }
    models
}

fn id_of(value: &Value) -> String {
    value["_id"].as_str().expect("string _id").to_string()
}

fn to_json(doc: &Document) -> Value {
    bson_to_json(&Bson::Document(doc.clone()))
}

fn bson_to_json(value: &Bson) -> Value {
    match value {
        Bson::Document(doc) => {
            let mut map = Map::new();
            for (key, value) in doc {
                if key.starts_with('_') && key != "_id" {
                    continue;
                }
                map.insert(key.clone(), bson_to_json(value));
            }
            Value::Object(map)
        }
        Bson::Array(items) => Value::Array(items.iter().map(bson_to_json).collect()),
        Bson::DateTime(t) => {
            let t = chrono::DateTime::from_timestamp_millis(t.timestamp_millis()).expect("date");
            Value::String(time_key(&t))
        }
        Bson::Int32(n) => Value::from(*n),
        Bson::Int64(n) => Value::from(*n),
        other => other.clone().into_relaxed_extjson(),
    }
}

/// Arms the server's test-only `failCommand` failpoint: the next `times`
/// (`None`: every) `commands` of clients whose handshake names `app_name` fail
/// with `code`. The failpoint is server-wide and one at a time: tests that arm
/// it hold [`FAILPOINT`].
pub async fn fail_command(
    store: &MongoStore,
    app_name: &str,
    commands: &[&str],
    code: i32,
    times: Option<i32>,
) {
    let mode = match times {
        Some(n) => Bson::Document(doc! { "times": n }),
        None => Bson::String("alwaysOn".into()),
    };
    store
        .client()
        .database("admin")
        .run_command(doc! {
            "configureFailPoint": "failCommand",
            "mode": mode,
            "data": { "failCommands": commands, "errorCode": code, "appName": app_name },
        })
        .await
        .expect("configureFailPoint (services.sh starts the server with test commands)");
}

pub async fn fail_command_off(store: &MongoStore) {
    store
        .client()
        .database("admin")
        .run_command(doc! { "configureFailPoint": "failCommand", "mode": "off" })
        .await
        .expect("configureFailPoint off");
}

/// Held by a test while it has the `failCommand` failpoint armed.
pub static FAILPOINT: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
