//! Named crash points at the durability boundaries, for the crash-matrix test
//! (`tests/fault_matrix.rs`).
//!
//! Built with the cargo feature `failpoints` (tikv's `fail` crate), a crash
//! point configured with `return` aborts the process on the spot
//! (`std::process::abort`: no destructors, no flush, no goodbye to a server,
//! like `kill -9`), e.g.
//!
//! ```text
//! FAILPOINTS='pipeline.after_sink_write=2*off->return' event-processor run
//! ```
//!
//! passes the point twice and dies at the third pass. Without the feature
//! [`crash_point`] is an empty function and the `fail` crate is not even a
//! dependency: a release build has no crash points.

// The names of the crash points; what each one means is in [`ALL`].
pub const PIPELINE_AFTER_DECODE: &str = "pipeline.after_decode";
pub const PIPELINE_BEFORE_SINK_WRITE: &str = "pipeline.before_sink_write";
pub const PIPELINE_AFTER_SINK_WRITE: &str = "pipeline.after_sink_write";
pub const PROJECTION_AFTER_OWN_WRITES: &str = "projection.after_own_writes";
pub const PIPELINE_AFTER_CHECKPOINT: &str = "pipeline.after_checkpoint";
pub const PIPELINE_BEFORE_MARK_OUTBOX: &str = "pipeline.before_mark_outbox";
pub const PIPELINE_AFTER_MARK_OUTBOX: &str = "pipeline.after_mark_outbox";
pub const PIPELINE_BEFORE_SOURCE_ACK: &str = "pipeline.before_source_ack";
pub const PIPELINE_AFTER_SOURCE_ACK: &str = "pipeline.after_source_ack";
pub const RELAY_BEFORE_DELIVERY: &str = "relay.before_delivery";
pub const RELAY_AFTER_DELIVERY: &str = "relay.after_delivery";
pub const RELAY_BEFORE_CAPTURE_ACK: &str = "relay.before_capture_ack";
pub const RELAY_AFTER_CAPTURE_ACK: &str = "relay.after_capture_ack";
pub const KAFKA_BEFORE_COMMIT: &str = "kafka.before_commit";
pub const KAFKA_AFTER_COMMIT: &str = "kafka.after_commit";

/// Every crash point, with a sentence on where it is: what is durable when it fires.
pub const ALL: [(&str, &str); 15] = [
    (
        PIPELINE_AFTER_DECODE,
        "a batch came from the source; nothing of it is written anywhere yet",
    ),
    (
        PIPELINE_BEFORE_SINK_WRITE,
        "the batch is about to be projected into MongoDB",
    ),
    (
        PROJECTION_AFTER_OWN_WRITES,
        "inside the sink write: the batch's dead letters and own documents are written, its copy refreshes not yet",
    ),
    (
        PIPELINE_AFTER_SINK_WRITE,
        "MongoDB holds the batch's effects; no checkpoint, mark or acknowledgement yet",
    ),
    (
        PIPELINE_AFTER_CHECKPOINT,
        "the replication checkpoint in MongoDB covers the batch; the outbox is not marked",
    ),
    (
        PIPELINE_BEFORE_MARK_OUTBOX,
        "the batch's outbox rows are about to be marked processed or failed",
    ),
    (
        PIPELINE_AFTER_MARK_OUTBOX,
        "the outbox rows are marked; the source is not acknowledged yet",
    ),
    (
        PIPELINE_BEFORE_SOURCE_ACK,
        "the source is about to be acknowledged (slot confirm, polling finish, Kafka commit)",
    ),
    (
        PIPELINE_AFTER_SOURCE_ACK,
        "the source is acknowledged: the batch is done",
    ),
    (
        RELAY_BEFORE_DELIVERY,
        "relay: a batch is encoded and about to be produced",
    ),
    (
        RELAY_AFTER_DELIVERY,
        "relay: the broker acknowledged every message of the batch; the outbox is not marked",
    ),
    (
        RELAY_BEFORE_CAPTURE_ACK,
        "relay: published (and marked, with replication capture); the capture (slot or claim) is about to be acknowledged",
    ),
    (
        RELAY_AFTER_CAPTURE_ACK,
        "relay: the capture is acknowledged",
    ),
    (
        KAFKA_BEFORE_COMMIT,
        "kafka source: offsets are due and about to be committed",
    ),
    (
        KAFKA_AFTER_COMMIT,
        "kafka source: the broker took the offset commit",
    ),
];

/// True when this build has crash points (the `failpoints` feature).
pub const ENABLED: bool = cfg!(feature = "failpoints");

/// Aborts the process here when the crash point `name` is configured with
/// `return`; otherwise (and always without the `failpoints` feature) nothing.
#[inline(always)]
pub fn crash_point(name: &'static str) {
    #[cfg(feature = "failpoints")]
    if fail::eval(name, |_| ()).is_some() {
        eprintln!("crash point `{name}` reached: aborting");
        std::process::abort();
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

/// Reads `FAILPOINTS` (`name=actions;...`) and arms the crash points it
/// names, for as long as the returned scenario lives. An unknown name or a
/// malformed action is an error, never silently ignored.
#[cfg(feature = "failpoints")]
pub fn setup() -> Result<fail::FailScenario<'static>, String> {
    let spec = std::env::var("FAILPOINTS").unwrap_or_default();
    for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let Some((name, actions)) = entry.split_once('=') else {
            return Err(format!("`{entry}` is not name=actions"));
        };
        if !ALL.iter().any(|(known, _)| *known == name) {
            return Err(format!(
                "no crash point is named `{name}` (known: {})",
                ALL.map(|(known, _)| known).join(", ")
            ));
        }
        // Checks the actions (`FailScenario::setup` would panic on them).
        fail::cfg(name, actions).map_err(|e| format!("{name}: {e}"))?;
    }
    Ok(fail::FailScenario::setup())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_follow_the_pattern() {
        let mut names: Vec<&str> = ALL.iter().map(|(name, _)| *name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALL.len());
        for (name, about) in ALL {
            let (area, point) = name.split_once('.').unwrap_or_default();
            assert!(
                ["pipeline", "projection", "relay", "kafka"].contains(&area) && !point.is_empty(),
                "{name}"
            );
            assert!(!about.is_empty(), "{name}");
        }
    }

    #[test]
    fn an_unconfigured_crash_point_does_nothing() {
        for (name, _) in ALL {
            crash_point(name);
        }
    }
}
