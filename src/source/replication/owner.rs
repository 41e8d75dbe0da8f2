//! One owner per slot: a PostgreSQL session-level advisory lock, held on a
//! connection of its own for as long as the capture runs.
//!
//! Why it is safe (docs/design.md, "One owner per slot"):
//! - the lock lives and dies with its session: a `kill -9`, a crash or a
//!   PostgreSQL restart ends the session and frees the lock, and nothing else
//!   does. A waiting instance polls for it and takes over;
//! - the session is never silent: a heartbeat runs on it every second, and
//!   the server is asked to end it after 10 s without a statement
//!   (`idle_session_timeout`). An owner cut off by a partition, frozen, or
//!   behind a proxy that keeps the server's side of the connection open
//!   therefore frees the lock within about 10 s; the server also probes the
//!   client's socket (`tcp_keepalives_*`), which only helps when nothing
//!   between them answers for the client. The owner gives the session up
//!   itself when a heartbeat is not answered within 5 s, before the server
//!   can hand the lock to another process, stops capturing and waits to own
//!   the slot again;
//! - ownership alone never lets two instances stream: PostgreSQL itself lets
//!   one walsender use a slot at a time, and an owner that lost its session
//!   but still streams can only acknowledge what it made durable. What the
//!   lock adds is that the destructive steps (creating a slot with its
//!   snapshot, dropping the relay's snapshot slot) run only in the holder's
//!   own session ([`SlotOwner::fenced`]): a lost session cannot run them.

use super::setup::{connect, query_error};
use crate::config::PostgresConfig;
use crate::policy::RetryClass;
use crate::source::SourceError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::Mutex;
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

/// The first half of every lock key: "this is a slot of ours".
const NAMESPACE: &str = "activity-event-processor:slot";

/// How often a waiting instance asks for the lock.
const POLL: Duration = Duration::from_millis(500);

/// How often the lock's session shows the server it is alive.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// A heartbeat unanswered this long: the session is given up. Well below
/// [`SILENCE`], so an owner cut off stops before the server frees its lock.
const ANSWER: Duration = Duration::from_secs(5);

/// The server ends a session that sent no statement for this long
/// (`idle_session_timeout`), which frees the lock of an owner that went silent.
const SILENCE: &str = "10s";

/// The shared handle to the ownership of one slot (clones share it).
#[derive(Clone)]
pub struct SlotOwner {
    inner: Arc<Inner>,
}

struct Inner {
    pg: PostgresConfig,
    /// The slot (or relay slot) name the lock stands for.
    name: String,
    /// The lock's session (kept while standing by, so polling reuses it).
    session: Mutex<Option<Session>>,
    /// The heartbeat task runs (it is started with the first session).
    beating: AtomicBool,
}

struct Session {
    client: Client,
    /// This session holds the lock.
    held: bool,
}

impl std::fmt::Debug for SlotOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotOwner")
            .field("name", &self.inner.name)
            .finish_non_exhaustive()
    }
}

impl SlotOwner {
    /// A handle that holds nothing yet.
    pub fn new(pg: &PostgresConfig, name: &str) -> SlotOwner {
        SlotOwner {
            inner: Arc::new(Inner {
                pg: pg.clone(),
                name: name.to_string(),
                session: Mutex::new(None),
                beating: AtomicBool::new(false),
            }),
        }
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Waits until this process owns the slot. `Ok(false)`: shutdown came first.
    /// While another process owns it, says so once and polls.
    pub async fn acquire(&self, shutdown: &CancellationToken) -> Result<bool, SourceError> {
        let mut told = false;
        loop {
            match self.try_acquire().await? {
                None => {
                    if told {
                        tracing::info!(slot = self.name(), "took over the replication slot");
                    }
                    return Ok(true);
                }
                Some(holder) if !told => {
                    tracing::info!(
                        slot = self.name(),
                        owner = %holder,
                        "another process owns the replication slot: standing by to take over"
                    );
                    told = true;
                }
                Some(_) => {}
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(false),
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }

    /// Takes the lock if it is free: `None` when this process holds it now,
    /// else who holds it (for the logs).
    async fn try_acquire(&self) -> Result<Option<String>, SourceError> {
        let mut guard = self.inner.session.lock().await;
        if guard.as_ref().is_some_and(|s| s.client.is_closed()) {
            *guard = None;
        }
        let session = match guard.take() {
            Some(session) => session,
            None => {
                let client = open_session(&self.inner.pg).await?;
                self.start_heartbeat();
                Session {
                    client,
                    held: false,
                }
            }
        };
        let session = guard.insert(session);
        // A failed query leaves no session behind: the next call opens one.
        let result = lock(&session.client, self.name()).await;
        match result {
            Ok(true) => {
                session.held = true;
                Ok(None)
            }
            Ok(false) => {
                session.held = false;
                Ok(Some(holder(&session.client, self.name()).await))
            }
            Err(err) => {
                *guard = None;
                Err(err)
            }
        }
    }

    /// Starts the heartbeat of this owner's sessions, once.
    fn start_heartbeat(&self) {
        if !self.inner.beating.swap(true, Ordering::SeqCst) {
            tokio::spawn(heartbeat(Arc::downgrade(&self.inner)));
        }
    }

    /// Fails unless this process still owns the slot (its session is alive
    /// and holds the lock); retaking a free lock counts as owning it.
    pub async fn ensure_held(&self) -> Result<(), SourceError> {
        match self.try_acquire().await? {
            None => Ok(()),
            Some(holder) => Err(SourceError::transient(
                RetryClass::Conflict,
                format!(
                    "replication slot `{}` is owned by another process ({holder}): waiting",
                    self.name()
                ),
            )),
        }
    }

    /// True while the session that holds the lock is connected (no round trip).
    pub async fn is_alive(&self) -> bool {
        self.inner
            .session
            .lock()
            .await
            .as_ref()
            .is_some_and(|s| s.held && !s.client.is_closed())
    }

    /// Runs `sql` in the session that holds the lock, after checking it still
    /// does: a process that lost the ownership cannot run it.
    pub async fn fenced(
        &self,
        what: &str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<(), SourceError> {
        let session = self.inner.session.lock().await;
        let Some(client) = session
            .as_ref()
            .filter(|s| s.held && !s.client.is_closed())
            .map(|s| &s.client)
        else {
            return Err(self.lost());
        };
        if !holds(client, self.name()).await? {
            return Err(self.lost());
        }
        client
            .execute(sql, params)
            .await
            .map(|_| ())
            .map_err(|err| query_error(what, &err))
    }

    fn lost(&self) -> SourceError {
        SourceError::transient(
            RetryClass::Connection,
            format!(
                "lost the ownership of replication slot `{}` (its session ended): \
                 stopping capture until it is owned again",
                self.name()
            ),
        )
    }

    /// Lets the lock go (on a clean stop; a crash lets it go by itself).
    pub async fn release(&self) {
        if let Some(Session { client, held: true }) = self.inner.session.lock().await.take() {
            let _ = client
                .query_one(
                    "SELECT pg_advisory_unlock(hashtext($1), hashtext($2))",
                    &[&NAMESPACE, &self.name()],
                )
                .await;
        }
    }
}

/// A connection for the lock: the server ends it once it has been silent for
/// [`SILENCE`] (the heartbeat keeps it from ever being silent that long) and
/// probes the client's socket; no other timeout applies.
async fn open_session(pg: &PostgresConfig) -> Result<Client, SourceError> {
    let client = connect(pg).await?;
    client
        .batch_execute(&format!(
            "SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2; \
             SET tcp_keepalives_count = 3; SET idle_session_timeout = '{SILENCE}'; \
             SET idle_in_transaction_session_timeout = 0; SET statement_timeout = 0"
        ))
        .await
        .map_err(|err| query_error("preparing the slot ownership session", &err))?;
    Ok(client)
}

/// Every [`HEARTBEAT`], a statement on the owner's session (holding the lock
/// or waiting for it); one that fails or is not answered within [`ANSWER`]
/// ends the session here, so that the process stops acting as the owner.
/// Ends with the last handle to the owner.
async fn heartbeat(inner: Weak<Inner>) {
    loop {
        tokio::time::sleep(HEARTBEAT).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let mut guard = inner.session.lock().await;
        let Some(session) = guard.as_ref() else {
            continue;
        };
        let answer = tokio::time::timeout(ANSWER, session.client.simple_query("SELECT 1")).await;
        let failure = match answer {
            Ok(Ok(_)) => continue,
            Ok(Err(err)) => err.to_string(),
            Err(_) => format!("no answer within {ANSWER:?}"),
        };
        if session.held {
            tracing::warn!(
                slot = %inner.name,
                error = %failure,
                "the slot ownership session is lost: stopping capture until the slot \
                 is owned again"
            );
        }
        // Dropping the client closes the connection (as far as it reaches).
        *guard = None;
    }
}

/// Takes the lock of `name` on `client`'s session unless that session holds
/// it already (the lock counts: taking it twice would need two unlocks).
async fn lock(client: &Client, name: &str) -> Result<bool, SourceError> {
    if holds(client, name).await? {
        return Ok(true);
    }
    let row = client
        .query_one(
            "SELECT pg_try_advisory_lock(hashtext($1), hashtext($2))",
            &[&NAMESPACE, &name],
        )
        .await
        .map_err(|err| query_error("taking the slot ownership lock", &err))?;
    Ok(row.get(0))
}

/// Whether `client`'s session holds the lock of `name`.
async fn holds(client: &Client, name: &str) -> Result<bool, SourceError> {
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' \
               AND pid = pg_backend_pid() AND granted \
               AND classid = hashtext($1)::oid AND objid = hashtext($2)::oid AND objsubid = 2)",
            &[&NAMESPACE, &name],
        )
        .await
        .map_err(|err| query_error("checking the slot ownership lock", &err))?;
    Ok(row.get(0))
}

/// Who holds the lock of `name`, as far as the server says.
async fn holder(client: &Client, name: &str) -> String {
    let row = client
        .query_opt(
            "SELECT l.pid, coalesce(a.client_addr::text, 'local'), coalesce(a.application_name, '') \
             FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.granted \
               AND l.classid = hashtext($1)::oid AND l.objid = hashtext($2)::oid \
               AND l.objsubid = 2",
            &[&NAMESPACE, &name],
        )
        .await;
    match row {
        Ok(Some(row)) => {
            let (pid, addr, app): (i32, String, String) = (row.get(0), row.get(1), row.get(2));
            format!("server process {pid}, client {addr}, {app}")
        }
        _ => "unknown holder".to_string(),
    }
}
