//! A MongoDB database of its own per test, on the server the services script
//! started, and the read models read back in the reference fold's form.

use activity_event_processor::projection::fold::ReadModels;
use activity_event_processor::store::mongo::{MongoStore, ACTIVITIES, DEAD_LETTERS, USERS};
use activity_event_processor::verify::found::{comparable, id_text};
use mongodb::bson::{doc, Bson};

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

/// The read models as stored, in the reference fold's form (the library's
/// `verify::found`): comparable with the fold.
pub async fn read_models(store: &MongoStore) -> ReadModels {
    let mut models = ReadModels::default();
    for (collection, into) in [
        (USERS, &mut models.users),
        (ACTIVITIES, &mut models.activities),
    ] {
        for doc in store
            .find(collection, doc! {}, None)
            .await
            .expect("read models")
        {
            into.insert(id_text(&doc), comparable(collection, &doc));
        }
    }
    for doc in store
        .find(DEAD_LETTERS, doc! {}, None)
        .await
        .expect("dead letters")
    {
        models.dead_letters.insert(id_text(&doc));
    }
    models
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
