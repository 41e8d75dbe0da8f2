//! Where a batch's durability boundaries are, for the crash points
//! (`failpoint`) the runtime passes on its way (docs/design.md, section 7).

use crate::failpoint::{self, crash_point};

/// The crash points (`failpoint`) at the durability boundaries of a batch.
#[derive(Debug, Clone, Copy)]
pub struct CrashPoints {
    pub after_decode: Option<&'static str>,
    pub before_write: &'static str,
    pub after_write: &'static str,
    pub after_checkpoint: &'static str,
    pub before_mark: Option<&'static str>,
    pub after_mark: Option<&'static str>,
    pub before_ack: &'static str,
    pub after_ack: &'static str,
}

impl CrashPoints {
    /// `run`: into the read models.
    pub const RUN: CrashPoints = CrashPoints {
        after_decode: Some(failpoint::PIPELINE_AFTER_DECODE),
        before_write: failpoint::PIPELINE_BEFORE_SINK_WRITE,
        after_write: failpoint::PIPELINE_AFTER_SINK_WRITE,
        after_checkpoint: failpoint::PIPELINE_AFTER_CHECKPOINT,
        before_mark: Some(failpoint::PIPELINE_BEFORE_MARK_OUTBOX),
        after_mark: Some(failpoint::PIPELINE_AFTER_MARK_OUTBOX),
        before_ack: failpoint::PIPELINE_BEFORE_SOURCE_ACK,
        after_ack: failpoint::PIPELINE_AFTER_SOURCE_ACK,
    };
    /// `relay`: onto the Kafka topic.
    pub const RELAY: CrashPoints = CrashPoints {
        after_decode: None,
        before_write: failpoint::RELAY_BEFORE_DELIVERY,
        after_write: failpoint::RELAY_AFTER_DELIVERY,
        after_checkpoint: failpoint::PIPELINE_AFTER_CHECKPOINT,
        before_mark: None,
        after_mark: None,
        before_ack: failpoint::RELAY_BEFORE_CAPTURE_ACK,
        after_ack: failpoint::RELAY_AFTER_CAPTURE_ACK,
    };
}

pub(super) fn crash_at(point: Option<&'static str>) {
    if let Some(point) = point {
        crash_point(point);
    }
}
