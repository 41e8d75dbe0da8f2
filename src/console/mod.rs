//! The live console: one page at `/` of the metrics server (`METRICS_ADDR`)
//! and the JSON it polls, `GET /api/console` ([`snapshot`]), with Retry and
//! Discard for the latest dead letters (README, "Console").
//!
//! - [`history`]: the last 15 minutes of the registry, for rates and
//!   latency percentiles;
//! - [`snapshot`]: the JSON's shape;
//! - [`access`]: loopback, `CONSOLE_TOKEN`, and the cross-site guard;
//! - [`actions`]: Retry and Discard.
//!
//! What MongoDB holds (the latest dead letters, the rebuild's progress) is
//! read by a task of the console's own, every [`LOOK`], with a timeout: a
//! MongoDB that does not answer leaves the last view in place (said in the
//! JSON), and the page keeps refreshing.

pub mod access;
pub mod actions;
pub mod history;
pub mod snapshot;

use crate::config::{PipelineConfig, PostgresConfig, Secret};
use crate::observe::{Health, Metrics};
use crate::rebuild::control::ACTIVE;
use crate::rebuild::gate::{CONTROL, REBUILD_ID};
use crate::store::mongo::{MongoStore, DEAD_LETTERS};
use access::{Access, Denied};
use actions::{Actions, Failed};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::TryStreamExt;
use history::{History, Reading};
use mongodb::bson::{doc, Document};
use snapshot::{DeadLetters, LagKind, LetterRow, Parts, Rebuild, Snapshot};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// How often MongoDB is looked at (and the longest a look may take).
pub const LOOK: Duration = Duration::from_secs(2);

/// Dead letters the page lists.
pub const LATEST: i64 = 20;

/// The page, its style and script inline (no other asset, nothing fetched
/// from elsewhere).
const PAGE: &str = include_str!("page.html");

/// What the console of one process is about.
pub struct Settings {
    /// `run` or `relay`.
    pub process: &'static str,
    /// `replication`, `polling` or `kafka`.
    pub source: &'static str,
    pub lag: LagKind,
    /// The read models' MongoDB (`None`: the relay, which has no dead letters).
    pub mongodb: Option<(Secret, String)>,
    pub postgres: PostgresConfig,
    pub pipeline: PipelineConfig,
    pub access: Access,
}

/// The console's state, shared by its routes and its task.
pub struct Console {
    settings: Settings,
    metrics: &'static Metrics,
    health: Health,
    history: Mutex<History>,
    view: Mutex<View>,
    store: tokio::sync::Mutex<Option<MongoStore>>,
    /// Look at MongoDB now (after a change).
    look_now: Notify,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("process", &self.settings.process)
            .finish_non_exhaustive()
    }
}

/// The last look at MongoDB.
#[derive(Debug, Default)]
struct View {
    letters: Vec<LetterRow>,
    rebuild: Option<Rebuild>,
    error: Option<String>,
}

impl Console {
    pub fn new(settings: Settings, metrics: &'static Metrics, health: Health) -> Arc<Console> {
        if matches!(settings.access, Access::Refused) {
            tracing::warn!(
                "the console is not served: METRICS_ADDR is not a loopback address and \
                 CONSOLE_TOKEN is not set (/metrics, /healthz and /readyz are)"
            );
        }
        let mut history = History::default();
        history.push(Reading::take(metrics));
        Arc::new(Console {
            settings,
            metrics,
            health,
            history: Mutex::new(history),
            view: Mutex::default(),
            store: tokio::sync::Mutex::new(None),
            look_now: Notify::new(),
        })
    }

    /// Keeps the history and the view of MongoDB until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        // The first reading was taken by `new`: the next one an interval later.
        let first = tokio::time::Instant::now() + history::INTERVAL;
        let mut sample = tokio::time::interval_at(first, history::INTERVAL);
        sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut look = tokio::time::interval(LOOK);
        look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                // Shutdown first: nothing here needs finishing.
                _ = stop.cancelled() => return,
                _ = sample.tick() => lock(&self.history).push(Reading::take(self.metrics)),
                _ = look.tick() => self.look().await,
                _ = self.look_now.notified() => self.look().await,
            }
        }
    }

    /// Reads the latest dead letters and the rebuild's progress.
    async fn look(&self) {
        let Some((uri, database)) = &self.settings.mongodb else {
            return;
        };
        let looked = tokio::time::timeout(LOOK, async {
            let mut store = self.store.lock().await;
            if store.is_none() {
                *store =
                    Some(MongoStore::connect_within(uri.expose(), database, Some(LOOK)).await?);
            }
            let Some(store) = store.as_ref() else {
                return Err(crate::store::mongo::StoreError::fatal("no client"));
            };
            read_view(store).await
        })
        .await;
        let mut view = lock(&self.view);
        match looked {
            Ok(Ok((letters, rebuild))) => {
                *view = View {
                    letters,
                    rebuild,
                    error: None,
                }
            }
            Ok(Err(err)) => view.error = Some(crate::policy::describe(&err)),
            Err(_) => {
                view.error = Some(format!(
                    "MongoDB did not answer within {} s; the list may be out of date",
                    LOOK.as_secs()
                ))
            }
        }
    }

    /// What `GET /api/console` answers.
    pub fn snapshot(&self) -> Snapshot {
        let now = Reading::take(self.metrics);
        let history = lock(&self.history);
        let view = lock(&self.view);
        let available = self.settings.mongodb.is_some();
        snapshot::build(Parts {
            process: self.settings.process,
            source: self.settings.source,
            lag: self.settings.lag,
            readiness: self.health.readiness(),
            history: &history,
            now,
            dead_letters: DeadLetters {
                available,
                error: view.error.clone().filter(|_| available),
                latest: view.letters.clone(),
            },
            rebuild: view.rebuild.clone(),
        })
    }

    async fn act(&self, id: &str, reason: Option<&str>) -> Result<actions::Done, Failed> {
        if self.settings.mongodb.is_none() {
            return Err(Failed::NotFound(format!(
                "{} keeps no dead letters",
                self.settings.process
            )));
        }
        let Some(store) = self.store.lock().await.clone() else {
            return Err(Failed::Unavailable("MongoDB has not answered yet".into()));
        };
        let postgres = self.settings.postgres.clone();
        let pipeline = self.settings.pipeline.clone();
        let (id, reason) = (id.to_string(), reason.map(str::to_string));
        // The commands' steps report through a callback that is not `Send`:
        // they run on a blocking thread of their own, driven by this runtime.
        let runtime = tokio::runtime::Handle::current();
        let done = tokio::task::spawn_blocking(move || {
            runtime.block_on(async {
                let actions = Actions {
                    store: &store,
                    postgres: &postgres,
                    pipeline: &pipeline,
                };
                match reason {
                    None => actions.retry(&id).await,
                    Some(reason) => actions.discard(&id, &reason).await,
                }
            })
        })
        .await
        .unwrap_or_else(|err| Err(Failed::Unavailable(format!("the action failed: {err}"))));
        self.look_now.notify_one();
        done
    }
}

async fn read_view(
    store: &MongoStore,
) -> Result<(Vec<LetterRow>, Option<Rebuild>), crate::store::mongo::StoreError> {
    let documents: Vec<Document> = store
        .database()
        .collection::<Document>(DEAD_LETTERS)
        .find(doc! {})
        .sort(doc! { "last_failed_at": -1, "_id": 1 })
        .limit(LATEST)
        .await?
        .try_collect()
        .await?;
    let letters = documents
        .into_iter()
        .map(crate::dead_letter::records::Letter::from_document)
        .map(|letter| LetterRow::from(&letter))
        .collect();
    let control = store
        .database()
        .collection::<Document>(CONTROL)
        .find_one(doc! { "_id": REBUILD_ID })
        .await?;
    let number = |doc: &Document, key: &str| match doc.get(key) {
        Some(mongodb::bson::Bson::Int64(n)) => u64::try_from(*n).unwrap_or(0),
        Some(mongodb::bson::Bson::Int32(n)) => u64::try_from(*n).unwrap_or(0),
        _ => 0,
    };
    let rebuild = control
        .filter(|doc| ACTIVE.contains(&doc.get_str("state").unwrap_or_default()))
        .map(|doc| Rebuild {
            state: doc.get_str("state").unwrap_or_default().to_string(),
            phase: doc.get_str("phase").unwrap_or_default().to_string(),
            done: number(&doc, "done"),
            total: number(&doc, "total"),
        });
    Ok((letters, rebuild))
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // What a panic left behind is still a usable view.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The console's routes, to merge into the metrics server's.
pub fn routes(console: Arc<Console>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/api/console", get(api))
        .route("/api/dead-letters/{id}/retry", post(retry))
        .route("/api/dead-letters/{id}/discard", post(discard))
        .with_state(console)
}

type Shared = State<Arc<Console>>;

fn denied(denied: Denied, html: bool) -> Response {
    let (status, text) = match denied {
        Denied::NotServed => (
            StatusCode::FORBIDDEN,
            "The console is not served: METRICS_ADDR is not a loopback address and \
             CONSOLE_TOKEN is not set. Set CONSOLE_TOKEN to serve it (README, \"Console\")."
                .to_string(),
        ),
        Denied::Unauthorized => (
            StatusCode::UNAUTHORIZED,
            "The console needs CONSOLE_TOKEN: open /?token=TOKEN once (a cookie keeps it), \
             or send Authorization: Bearer TOKEN."
                .to_string(),
        ),
        Denied::Forbidden(why) => (StatusCode::FORBIDDEN, format!("Refused: {why}.")),
    };
    if html {
        let body = format!(
            "<!doctype html><meta charset=utf-8><title>event-processor console</title>\
             <p>{text}</p>"
        );
        (status, Html(body)).into_response()
    } else {
        (status, Json(serde_json::json!({ "error": text }))).into_response()
    }
}

async fn page(State(console): Shared, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    if let Some(cookie) = console.settings.access.token_cookie(uri.query()) {
        return (
            StatusCode::SEE_OTHER,
            [(header::SET_COOKIE, cookie), (header::LOCATION, "/".into())],
        )
            .into_response();
    }
    if let Err(why) = console.settings.access.check(&method, &headers) {
        return denied(why, true);
    }
    (
        [
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 connect-src 'self'; img-src data:; frame-ancestors 'none'",
            ),
        ],
        Html(PAGE),
    )
        .into_response()
}

async fn api(State(console): Shared, method: Method, headers: HeaderMap) -> Response {
    if let Err(why) = console.settings.access.check(&method, &headers) {
        return denied(why, false);
    }
    (
        [(header::CACHE_CONTROL, "no-store")],
        Json(console.snapshot()),
    )
        .into_response()
}

async fn retry(
    State(console): Shared,
    method: Method,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(why) = console.settings.access.check(&method, &headers) {
        return denied(why, false);
    }
    answer(console.act(&id, None).await)
}

/// The body of a discard.
#[derive(Debug, serde::Deserialize)]
struct Reason {
    reason: String,
}

async fn discard(
    State(console): Shared,
    method: Method,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    if let Err(why) = console.settings.access.check(&method, &headers) {
        return denied(why, false);
    }
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let reason = match serde_json::from_slice::<Reason>(&body) {
        Ok(body) if json => body.reason,
        _ => {
            return answer(Err(Failed::BadRequest(
                "send {\"reason\": \"...\"} as application/json".into(),
            )))
        }
    };
    answer(console.act(&id, Some(&reason)).await)
}

fn answer(done: Result<actions::Done, Failed>) -> Response {
    match done {
        Ok(done) => Json(done).into_response(),
        Err(failed) => {
            let (status, text) = match failed {
                Failed::NotFound(text) => (StatusCode::NOT_FOUND, text),
                Failed::Unavailable(text) => (StatusCode::SERVICE_UNAVAILABLE, text),
                Failed::BadRequest(text) => (StatusCode::BAD_REQUEST, text),
            };
            (status, Json(serde_json::json!({ "error": text }))).into_response()
        }
    }
}
