//! The counters of one process, shared by its workers: what the stop line
//! and the progress line report.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters shared by the workers of one process.
#[derive(Debug, Default)]
pub struct Stats {
    pub applied: AtomicU64,
    pub duplicates: AtomicU64,
    pub unmatched: AtomicU64,
    pub dead_lettered: AtomicU64,
    /// Dead letters written again for a re-delivered event (not counted in
    /// `dead_lettered`).
    pub dead_letters_again: AtomicU64,
    pub batches: AtomicU64,
    pub round_trips: AtomicU64,
    pub documents_written: AtomicU64,
    /// Checkpoint saves refused because they were below the stored position.
    pub checkpoint_refused: AtomicU64,
}

impl Stats {
    /// Events handled, whatever became of them.
    pub fn done(&self) -> u64 {
        self.applied.load(Ordering::Relaxed)
            + self.duplicates.load(Ordering::Relaxed)
            + self.unmatched.load(Ordering::Relaxed)
            + self.dead_lettered.load(Ordering::Relaxed)
    }

    /// One counter's value.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
