//! The replication connection: the one place that knows `pg_walstream`.
//!
//! It creates the slot (with an exported snapshot when asked), starts
//! streaming from the position we give it (with pgoutput's logical messages,
//! for the heartbeat), hands the raw pgoutput messages to
//! our [`Decoder`], and reports our acknowledged position back to the server.
//! Its own reconnect and retry machinery and its typed decoder are not used:
//! the source decides where to resume, the pipeline owns the backoff, and an
//! insert is decoded without building the crate's row maps.

use super::pgoutput::{Decoder, WalItem};
use super::setup::{
    conninfo, no_replication_privilege_message, slots_exhausted_message, wal_level_message,
};
use crate::config::PostgresConfig;
use crate::policy::RetryClass;
use crate::source::SourceError;
use pg_walstream::{
    CancellationToken, LogicalReplicationStream, ReplicationError, ReplicationSlotOptions,
    ReplicationStreamConfig, RetryConfig, StreamingMode,
};
use std::future::Future;
use std::pin::Pin;

pub(super) struct Wal {
    /// Boxed: it is large (over a kilobyte), and the source is moved around.
    stream: Box<LogicalReplicationStream>,
    /// Never cancelled: reads end by their deadline instead (the read is
    /// cancel-safe: unread frames stay queued in the connection).
    never: CancellationToken,
    decoder: Decoder,
    user: String,
    /// When we last told the server our position.
    last_feedback: std::time::Instant,
}

/// Longest time without a status update to the server while streaming (as
/// `pg_recvlogical --status-interval`): the walsender drops a client that
/// stays silent for `wal_sender_timeout` (60 s by default), and while a large
/// backlog is worked off its keep-alive requests sit behind megabytes of
/// unread data in the socket.
const STATUS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

impl Wal {
    /// Opens the replication connection (it does not create or start anything).
    pub(super) async fn connect(
        pg: &PostgresConfig,
        slot: &str,
        publication: &str,
        export_snapshot: bool,
    ) -> Result<Wal, SourceError> {
        let snapshot = if export_snapshot { "export" } else { "nothing" };
        let config = ReplicationStreamConfig::builder(slot, publication)
            .with_protocol_version(1)
            .with_streaming_mode(StreamingMode::Off)
            // Logical messages too (`"messages" 'on'`): the heartbeats,
            // whose transactions move an idle slot (the decoder skips
            // every other message).
            .with_messages(true)
            .with_connection_timeout(pg.connect_timeout)
            // One attempt: the pipeline retries with its own backoff.
            .with_retry_config(RetryConfig {
                max_attempts: 1,
                ..RetryConfig::default()
            })
            .with_slot_options(ReplicationSlotOptions {
                snapshot: Some(snapshot.to_string()),
                ..ReplicationSlotOptions::default()
            })
            // Never create a slot behind our back (on start or on a reconnect).
            .with_existing_slot_required(true);
        let stream = LogicalReplicationStream::new(&conninfo(pg), config)
            .await
            .map_err(|err| classify(&pg.user, "cannot open the replication connection", err))?;
        Ok(Wal {
            stream: Box::new(stream),
            never: CancellationToken::new(),
            decoder: Decoder::default(),
            user: pg.user.clone(),
            last_feedback: std::time::Instant::now(),
        })
    }

    /// Creates the slot and returns the name of its exported snapshot, valid
    /// until the next command on this connection.
    pub(super) async fn create_slot(&mut self) -> Result<String, SourceError> {
        self.stream
            .ensure_replication_slot()
            .await
            .map_err(|err| classify(&self.user, "cannot create the replication slot", err))?;
        self.stream
            .exported_snapshot_name()
            .map(str::to_owned)
            .ok_or_else(|| {
                // `ensure_replication_slot` treats "already exists" as success.
                SourceError::transient(
                    RetryClass::Conflict,
                    "the replication slot appeared while it was being created \
                     (another processor?): \
                     no snapshot was exported",
                )
            })
    }

    /// `START_REPLICATION` at `from` (`None`: the slot's own position, right
    /// after creating it).
    pub(super) async fn start(&mut self, from: Option<u64>) -> Result<(), SourceError> {
        self.stream
            .start(from)
            .await
            .map_err(|err| classify(&self.user, "cannot start replication", err))
    }

    /// The next message, or `None` once `deadline` has passed first.
    pub(super) async fn next(
        &mut self,
        deadline: Pin<&mut impl Future<Output = ()>>,
    ) -> Result<Option<WalItem>, SourceError> {
        // Biased: a message that is already there wins over an expired
        // deadline, so a busy stream is never read at the timer's pace.
        let frame = tokio::select! {
            biased;
            frame = self.stream.next_raw_event(&self.never) => frame,
            () = deadline => return Ok(None),
        };
        let frame = frame.map_err(|err| classify(&self.user, "replication stream", err))?;
        self.decoder
            .decode(&frame.data)
            .map(Some)
            .map_err(|err| SourceError::Fatal(err.to_string()))
    }

    /// The server position the stream has reached (XLogData and keepalives).
    pub(super) fn received(&self) -> u64 {
        self.stream.current_lsn()
    }

    /// Moves the slot's confirmed position to `lsn` (which the caller holds
    /// durably) and tells the server now.
    pub(super) async fn confirm(&mut self, lsn: u64) -> Result<(), SourceError> {
        self.stream.shared_lsn_feedback.update_applied_lsn(lsn);
        self.feedback().await
    }

    /// Sends a status update with our acknowledged position.
    pub(super) async fn feedback(&mut self) -> Result<(), SourceError> {
        self.last_feedback = std::time::Instant::now();
        self.stream
            .send_feedback()
            .await
            .map_err(|err| classify(&self.user, "cannot send replication feedback", err))
    }

    /// Sends a status update when none went out for [`STATUS_INTERVAL`].
    pub(super) async fn keep_alive(&mut self) -> Result<(), SourceError> {
        if self.last_feedback.elapsed() >= STATUS_INTERVAL {
            self.feedback().await?;
        }
        Ok(())
    }
}

/// Sorts a `pg_walstream` error into transient and fatal, with an operator's
/// message for the fatal ones we know.
fn classify(user: &str, context: &str, err: ReplicationError) -> SourceError {
    let text = err.to_string();
    if text.contains("wal_level") {
        let actual = if text.contains("replica") {
            "replica"
        } else {
            "minimal"
        };
        return SourceError::Fatal(wal_level_message(actual));
    }
    if text.contains("all replication slots are in use") {
        return SourceError::Fatal(slots_exhausted_message("the"));
    }
    // The walsender refuses the role at connection start-up, which libpq
    // reports without a SQLSTATE (and the crate calls transient): match the
    // server's words (PostgreSQL 14-15, then 16+).
    if text.contains("must be superuser or replication role")
        || text.contains("permission denied to start WAL sender")
    {
        let server = text.rsplit("FATAL:").next().unwrap_or(&text).trim();
        return SourceError::Fatal(no_replication_privilege_message(user, server));
    }
    match err {
        ReplicationError::PermanentConnection(_) if text.contains("[42501]") => {
            SourceError::Fatal(no_replication_privilege_message(user, &text))
        }
        ReplicationError::PermanentConnection(_)
        | ReplicationError::Authentication(_)
        | ReplicationError::Config(_) => SourceError::Fatal(format!("{context}: {text}")),
        // A slot that vanished or was invalidated: the reconnect looks at the
        // slot again and takes a new snapshot if it must.
        _ => SourceError::transient(retry_class(&err, &text), format!("{context}: {text}")),
    }
}

/// What kind of outage a transient `pg_walstream` error is: by the server's
/// SQLSTATE where the crate quotes it (`[57P01] ...`), else by its variant.
fn retry_class(err: &ReplicationError, text: &str) -> RetryClass {
    let quoted = text
        .split_once('[')
        .and_then(|(_, rest)| rest.split_once(']'))
        .map(|(code, _)| code)
        .filter(|code| code.len() == 5 && code.bytes().all(|b| b.is_ascii_alphanumeric()));
    if let Some(code) = quoted {
        return crate::outbox::sqlstate_retry_class(code);
    }
    match err {
        ReplicationError::TransientConnection(_)
        | ReplicationError::ReplicationConnection(_)
        | ReplicationError::Backend(_) => RetryClass::Connection,
        ReplicationError::Io(io) => RetryClass::of_io(io),
        ReplicationError::Timeout(_) => RetryClass::Timeout,
        _ => RetryClass::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Classify, ErrorClass};

    #[test]
    fn errors_are_sorted_for_the_operator() {
        let fatal = classify(
            "app",
            "cannot open the replication connection",
            ReplicationError::PermanentConnection(
                "[42501] must be superuser or replication role to start walsender".into(),
            ),
        );
        assert!(
            matches!(&fatal, SourceError::Fatal(m) if m.contains("ALTER ROLE app WITH REPLICATION")),
            "{fatal:?}"
        );
        let wal_level = classify(
            "app",
            "x",
            ReplicationError::ReplicationSlot(
                "[55000] logical decoding requires wal_level >= logical".into(),
            ),
        );
        assert!(
            matches!(&wal_level, SourceError::Fatal(m) if m.contains("--source polling")),
            "{wal_level:?}"
        );
        let full = classify(
            "app",
            "x",
            ReplicationError::Protocol("[53400] all replication slots are in use".into()),
        );
        assert!(full.to_string().contains("max_replication_slots"), "{full}");
        let refused = classify(
            "app",
            "x",
            ReplicationError::TransientConnection(
                "connection failed: FATAL:  must be superuser or replication role to start walsender"
                    .into(),
            ),
        );
        assert_ne!(refused.class(), ErrorClass::Transient, "{refused:?}");
        let gone = classify(
            "app",
            "x",
            ReplicationError::TransientConnection("PQconsumeInput failed".into()),
        );
        assert_eq!(gone.class(), ErrorClass::Transient);
        let lost = classify(
            "app",
            "x",
            ReplicationError::ReplicationSlot(
                "[42704] replication slot \"s\" does not exist".into(),
            ),
        );
        assert_eq!(lost.class(), ErrorClass::Transient);
    }

    #[test]
    fn transient_errors_say_what_kind_of_outage() {
        let kind = |err: ReplicationError| classify("app", "x", err).retry_class();
        // pg_terminate_backend, or a server shutting down.
        assert_eq!(
            kind(ReplicationError::TransientConnection(
                "[57P01] terminating connection due to administrator command".into()
            )),
            RetryClass::Unavailable
        );
        assert_eq!(
            kind(ReplicationError::TransientConnection(
                "[55006] replication slot \"s\" is active for PID 42".into()
            )),
            RetryClass::Conflict
        );
        // libpq lost the socket: no SQLSTATE.
        assert_eq!(
            kind(ReplicationError::TransientConnection(
                "PQconsumeInput failed: server closed the connection unexpectedly".into()
            )),
            RetryClass::Connection
        );
        assert_eq!(
            kind(ReplicationError::Io(std::io::Error::from(
                std::io::ErrorKind::ConnectionReset
            ))),
            RetryClass::Connection
        );
        assert_eq!(
            kind(ReplicationError::Timeout("no data".into())),
            RetryClass::Timeout
        );
        assert_eq!(
            kind(ReplicationError::ReplicationSlot(
                "[42704] replication slot \"s\" does not exist".into()
            )),
            RetryClass::Other
        );
    }
}
