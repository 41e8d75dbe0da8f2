//! Where a batch's time goes, stage by stage (docs/design.md §7 names the
//! stages of a batch): summed over a run into `--stats-file`, from which the
//! benchmark prints its per-stage breakdown.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The stages of a batch, in the order a batch goes through them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Waiting for the source and reading and decoding its messages.
    Source,
    /// Reading the documents the batch's events touch.
    Load,
    /// Folding the events into those documents, in memory.
    Fold,
    /// Writing dead letters.
    DeadLetters,
    /// Writing the touched documents (fenced).
    Write,
    /// Refreshing the copies of changed names in other documents.
    Refresh,
    /// Saving the checkpoint.
    Checkpoint,
    /// Marking the outbox rows.
    Mark,
    /// Acknowledging to the source.
    Acknowledge,
}

impl Stage {
    pub const ALL: [Stage; 9] = [
        Stage::Source,
        Stage::Load,
        Stage::Fold,
        Stage::DeadLetters,
        Stage::Write,
        Stage::Refresh,
        Stage::Checkpoint,
        Stage::Mark,
        Stage::Acknowledge,
    ];

    /// The stage's name in the stats file.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Source => "source",
            Stage::Load => "load",
            Stage::Fold => "fold",
            Stage::DeadLetters => "dead_letters",
            Stage::Write => "write",
            Stage::Refresh => "refresh",
            Stage::Checkpoint => "checkpoint",
            Stage::Mark => "mark",
            Stage::Acknowledge => "acknowledge",
        }
    }
}

/// Time spent per stage, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StageTimes([u64; Stage::ALL.len()]);

impl StageTimes {
    /// Adds `spent` to `stage`.
    pub fn add(&mut self, stage: Stage, spent: Duration) {
        let micros = u64::try_from(spent.as_micros()).unwrap_or(u64::MAX);
        let slot = &mut self.0[stage as usize];
        *slot = slot.saturating_add(micros);
    }

    /// Adds the time since `started` to `stage`, and returns now (the start
    /// of the next stage).
    pub fn lap(&mut self, stage: Stage, started: Instant) -> Instant {
        let now = Instant::now();
        self.add(stage, now.saturating_duration_since(started));
        now
    }

    /// Adds every stage of `other`.
    pub fn absorb(&mut self, other: &StageTimes) {
        for (mine, theirs) in self.0.iter_mut().zip(other.0) {
            *mine = mine.saturating_add(theirs);
        }
    }

    /// Microseconds spent in `stage`.
    pub fn micros(&self, stage: Stage) -> u64 {
        self.0[stage as usize]
    }

    /// By stage name, microseconds (every stage, zeros included).
    pub fn by_name(&self) -> BTreeMap<String, u64> {
        Stage::ALL
            .iter()
            .map(|&stage| (stage.as_str().to_string(), self.micros(stage)))
            .collect()
    }
}

/// The stages as the stats file writes them: microseconds by stage name.
pub type StageReport = BTreeMap<String, u64>;

/// Reads back a [`StageReport`] (unknown names are ignored).
pub fn from_report(report: &StageReport) -> StageTimes {
    let mut times = StageTimes::default();
    for stage in Stage::ALL {
        if let Some(&micros) = report.get(stage.as_str()) {
            times.add(stage, Duration::from_micros(micros));
        }
    }
    times
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_add_up_and_round_trip_through_their_names() {
        let mut times = StageTimes::default();
        times.add(Stage::Load, Duration::from_micros(1500));
        times.add(Stage::Load, Duration::from_micros(500));
        let mut other = StageTimes::default();
        other.add(Stage::Write, Duration::from_millis(3));
        other.add(Stage::Load, Duration::from_micros(1));
        times.absorb(&other);
        assert_eq!(times.micros(Stage::Load), 2001);
        assert_eq!(times.micros(Stage::Write), 3000);
        assert_eq!(times.micros(Stage::Source), 0);
        let report = times.by_name();
        assert_eq!(report.len(), Stage::ALL.len());
        assert_eq!(report["load"], 2001);
        assert_eq!(from_report(&report), times);
    }

    #[test]
    fn a_lap_moves_the_start_forward() {
        let mut times = StageTimes::default();
        let start = Instant::now() - Duration::from_millis(5);
        let next = times.lap(Stage::Fold, start);
        assert!(next >= start);
        assert!(times.micros(Stage::Fold) >= 5000);
    }
}
