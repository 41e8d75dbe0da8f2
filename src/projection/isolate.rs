//! Isolation of the events whose writes the server refuses (a document over
//! 16 MB, a date it does not take: see [`crate::store::codes`]).
//!
//! A refused batch is split in halves, each applied as a batch of its own
//! (fresh reads, fenced writes), and a refused half is split again, down to
//! single events. The parts run in the batch's order, so each aggregate's
//! events still apply in sequence order. A single event refused alone is tried
//! once more alone (a refusal that does not repeat was not its fault); refused
//! again, it is dead-lettered with the server's error, after a write of nothing
//! to the same collection shows that the server takes other writes (if it
//! refuses that too, no event is to blame and the process stops).
//!
//! What a refused attempt did write is harmless: the users of a batch are
//! written before its activities (which copy their names) and nothing more is
//! written once a write fails, so no copy gets ahead of its source; every
//! document written carries its fence, so the next attempt, reading afresh,
//! finds those events applied and redoes only their copy refresh. What the
//! refused attempt decided about the events of the documents it wrote (dead
//! letters, deferrals) is kept, since their fence now hides those events from
//! the next attempt ([`settled`]). A dead-lettered event took no effect and
//! moved no fence, as an event dead-lettered by its handler: the aggregate's
//! next events apply without it. (A refusal while refreshing copies comes
//! after the event's own document took effect: that event is dead-lettered
//! all the same, as the one whose copies cannot follow.)

use super::{BatchReport, DeadLetter};
use crate::decode::OutboxEvent;
use crate::store::mongo::{Refusal, StoreError};
use std::collections::BTreeSet;
use uuid::Uuid;

/// How one attempt at a batch ended.
pub(super) enum Attempted {
    Done(BatchReport),
    /// The server refused a write of the batch; `settled` is what the attempt
    /// decided for good (see [`settled`]).
    Refused {
        refusal: Refusal,
        settled: BatchReport,
    },
}

/// Attempts a refused batch's parts are made of.
#[allow(async_fn_in_trait)]
pub(super) trait Sink {
    /// Applies `events` as one batch.
    async fn attempt(&self, events: &[OutboxEvent]) -> Result<Attempted, StoreError>;
    /// A write of nothing to `collection`: `Ok` if the server takes writes there.
    async fn probe(&self, collection: &str) -> Result<(), StoreError>;
    /// Records `letter` durably; the round trips it took.
    async fn dead_letter(&self, letter: &DeadLetter) -> Result<u32, StoreError>;
}

impl BatchReport {
    /// Adds what a part of the batch did (an event dead-lettered or deferred
    /// by two parts counts once).
    pub(super) fn absorb(&mut self, part: BatchReport) {
        self.applied += part.applied;
        self.duplicates += part.duplicates;
        self.unmatched += part.unmatched;
        self.letters_again += part.letters_again;
        for letter in part.dead_letters {
            let id = letter.event.event_id;
            if !self.dead_letters.iter().any(|d| d.event.event_id == id) {
                self.dead_letters.push(letter);
            }
        }
        for (event, err) in part.deferred {
            if !self
                .deferred
                .iter()
                .any(|(e, _)| e.event_id == event.event_id)
            {
                self.deferred.push((event, err));
            }
        }
        self.round_trips += part.round_trips;
        self.stages.absorb(&part.stages);
        self.documents_written += part.documents_written;
    }
}

/// What a refused attempt decided for good: the dead letters and deferrals of
/// events whose aggregate's document it wrote (`None`: every document), whose
/// fence now makes the next attempt take those events as applied.
pub(super) fn settled(report: &BatchReport, written: Option<&BTreeSet<Uuid>>) -> BatchReport {
    let keep = |e: &OutboxEvent| written.is_none_or(|w| w.contains(&e.aggregate_id));
    BatchReport {
        dead_letters: report
            .dead_letters
            .iter()
            .filter(|d| keep(&d.event))
            .cloned()
            .collect(),
        deferred: report
            .deferred
            .iter()
            .filter(|(e, _)| keep(e))
            .cloned()
            .collect(),
        round_trips: report.round_trips,
        documents_written: report.documents_written,
        ..BatchReport::default()
    }
}

/// Applies `events`, whose write as one batch the server refused: every event
/// but the ones refused alone takes effect, those are dead-lettered.
pub(super) async fn isolate<S: Sink>(
    sink: &S,
    events: &[OutboxEvent],
) -> Result<BatchReport, StoreError> {
    let mut report = BatchReport::default();
    // Parts still to apply, the next one last.
    let mut parts: Vec<&[OutboxEvent]> = Vec::new();
    let mut refused = Some(events);
    loop {
        match refused.take() {
            None | Some([]) => {}
            Some([event]) => alone(sink, event, &mut report).await?,
            Some(part) => {
                let (first, second) = part.split_at(part.len() / 2);
                parts.push(second);
                parts.push(first);
            }
        }
        let Some(part) = parts.pop() else {
            return Ok(report);
        };
        match sink.attempt(part).await? {
            Attempted::Done(done) => report.absorb(done),
            Attempted::Refused { settled, .. } => {
                report.absorb(settled);
                refused = Some(part);
            }
        }
    }
}

/// One event the server refused in a batch: tried once more alone, then
/// dead-lettered if the server still refuses it and takes other writes.
async fn alone<S: Sink>(
    sink: &S,
    event: &OutboxEvent,
    report: &mut BatchReport,
) -> Result<(), StoreError> {
    let refusal = match sink.attempt(std::slice::from_ref(event)).await? {
        Attempted::Done(done) => {
            report.absorb(done);
            return Ok(());
        }
        Attempted::Refused { refusal, settled } => {
            report.absorb(settled);
            refusal
        }
    };
    report.round_trips += 1;
    match sink.probe(&refusal.collection).await {
        Ok(()) => {}
        Err(StoreError::Refused(every)) => {
            return Err(StoreError::fatal(format!(
                "{} refuses every write, not only an event's: {} (code {}); check the server",
                every.collection, every.message, every.code
            )))
        }
        Err(err) => return Err(err),
    }
    let letter = DeadLetter {
        event: event.clone(),
        error: refusal.to_string(),
        attempts: 2,
    };
    report.round_trips += sink.dead_letter(&letter).await?;
    report.dead_letters.push(letter);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Classify;
    use crate::store::mongo::Refusal;
    use std::cell::RefCell;
    use std::collections::BTreeSet;

    /// A sink that refuses any part holding a poisonous event, and the next
    /// `refuse_next` attempts whatever they hold.
    #[derive(Default)]
    struct Fake {
        poison: BTreeSet<i64>,
        refuse_next: RefCell<usize>,
        refuse_probe: bool,
        transient_at: Option<usize>,
        attempts: RefCell<Vec<Vec<i64>>>,
        applied: RefCell<Vec<i64>>,
        letters: RefCell<Vec<i64>>,
    }

    fn refusal() -> Refusal {
        Refusal {
            collection: "users".into(),
            code: 17420,
            message: "too large".into(),
        }
    }

    fn refused() -> Result<Attempted, StoreError> {
        Ok(Attempted::Refused {
            refusal: refusal(),
            settled: BatchReport::default(),
        })
    }

    fn seq(event: &OutboxEvent) -> i64 {
        event.sequence_id.unwrap_or_default()
    }

    impl Sink for Fake {
        async fn attempt(&self, events: &[OutboxEvent]) -> Result<Attempted, StoreError> {
            let seqs: Vec<i64> = events.iter().map(seq).collect();
            self.attempts.borrow_mut().push(seqs.clone());
            if self.transient_at == Some(self.attempts.borrow().len()) {
                return Err(StoreError::transient(
                    crate::policy::RetryClass::Connection,
                    "down",
                ));
            }
            let mut left = self.refuse_next.borrow_mut();
            if *left > 0 {
                *left -= 1;
                return refused();
            }
            if seqs.iter().any(|s| self.poison.contains(s)) {
                return refused();
            }
            self.applied.borrow_mut().extend(&seqs);
            Ok(Attempted::Done(BatchReport {
                applied: seqs.len(),
                ..BatchReport::default()
            }))
        }

        async fn probe(&self, _: &str) -> Result<(), StoreError> {
            if self.refuse_probe {
                Err(StoreError::Refused(refusal()))
            } else {
                Ok(())
            }
        }

        async fn dead_letter(&self, letter: &DeadLetter) -> Result<u32, StoreError> {
            self.letters.borrow_mut().push(seq(&letter.event));
            Ok(1)
        }
    }

    fn events(n: i64) -> Vec<OutboxEvent> {
        (1..=n)
            .map(|s| OutboxEvent {
                event_id: uuid::Uuid::new_v4(),
                sequence_id: Some(s),
                aggregate_id: uuid::Uuid::new_v4(),
                aggregate_type: "User".into(),
                event_type: "UserCreated".into(),
                payload: serde_json::Value::Null.into(),
                created_at: None,
            })
            .collect()
    }

    fn poisoned(seqs: &[i64]) -> Fake {
        Fake {
            poison: seqs.iter().copied().collect(),
            ..Fake::default()
        }
    }

    #[tokio::test]
    async fn exactly_the_refused_events_are_dead_lettered_and_the_rest_applies_in_order() {
        for poison in [vec![1], vec![20], vec![50], vec![3, 4, 37], vec![]] {
            let sink = poisoned(&poison);
            let batch = events(50);
            let report = isolate(&sink, &batch).await.expect("isolated");
            assert_eq!(*sink.letters.borrow(), poison);
            let rest: Vec<i64> = (1..=50).filter(|s| !poison.contains(s)).collect();
            assert_eq!(*sink.applied.borrow(), rest, "in order, each once");
            assert_eq!(report.applied, rest.len());
            let letters: Vec<i64> = report.dead_letters.iter().map(|d| seq(&d.event)).collect();
            assert_eq!(letters, poison);
            assert!(report
                .dead_letters
                .iter()
                .all(|d| d.attempts == 2 && d.error.contains("code 17420")));
            // Bisection: a few attempts per poison, not one per event.
            let tries = sink.attempts.borrow().len();
            assert!(tries <= 2 + poison.len() * 14, "{tries} attempts");
        }
    }

    #[tokio::test]
    async fn a_refusal_that_does_not_repeat_alone_dead_letters_nothing() {
        // The batch of one was refused; alone, it is not.
        let sink = Fake::default();
        let batch = events(1);
        let report = isolate(&sink, &batch).await.expect("applied");
        assert!(report.dead_letters.is_empty());
        assert_eq!(*sink.applied.borrow(), [1]);
        // Three refusals in a 40-event batch end above the single events.
        let sink = Fake {
            refuse_next: RefCell::new(3),
            ..Fake::default()
        };
        let report = isolate(&sink, &events(40)).await.expect("applied");
        assert!(report.dead_letters.is_empty());
        assert_eq!(*sink.applied.borrow(), (1..=40).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_server_that_refuses_every_write_stops_without_dead_letters() {
        let sink = Fake {
            refuse_next: RefCell::new(usize::MAX),
            refuse_probe: true,
            ..Fake::default()
        };
        let err = isolate(&sink, &events(30)).await.expect_err("stops");
        assert!(matches!(err, StoreError::Fatal { ref what, .. } if what.contains("every write")));
        assert!(sink.letters.borrow().is_empty());
        assert!(
            sink.attempts.borrow().len() < 10,
            "stops at the first single"
        );
    }

    #[tokio::test]
    async fn a_transient_failure_gives_the_batch_back_to_the_retry_loop() {
        let sink = Fake {
            poison: [7].into(),
            transient_at: Some(2),
            ..Fake::default()
        };
        let err = isolate(&sink, &events(16)).await.expect_err("transient");
        assert_eq!(err.class(), crate::policy::ErrorClass::Transient);
        assert!(sink.letters.borrow().is_empty());
    }

    #[test]
    fn decisions_about_written_documents_are_settled_and_count_once() {
        let batch = events(3);
        let letter = |e: &OutboxEvent| DeadLetter {
            event: e.clone(),
            error: "never created".into(),
            attempts: 1,
        };
        let report = BatchReport {
            dead_letters: batch.iter().map(letter).collect(),
            round_trips: 2,
            ..BatchReport::default()
        };
        let written: BTreeSet<Uuid> = [batch[1].aggregate_id].into();
        let kept = settled(&report, Some(&written));
        assert_eq!(kept.dead_letters, [letter(&batch[1])]);
        assert_eq!(kept.round_trips, 2);
        assert_eq!(settled(&report, None).dead_letters.len(), 3);
        let mut total = kept.clone();
        total.absorb(kept);
        total.absorb(report);
        let ids: Vec<Uuid> = total
            .dead_letters
            .iter()
            .map(|d| d.event.event_id)
            .collect();
        assert_eq!(
            ids,
            [batch[1].event_id, batch[0].event_id, batch[2].event_id]
        );
    }
}
