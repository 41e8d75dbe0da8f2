-- Indexes for the polling source's claim query: the unfinished rows in
-- sequence order, and an aggregate's unfinished rows (per-aggregate order).
-- Partial, so they stay small however many processed rows the outbox keeps.
-- Released: never edit this file; add a new migration instead.

CREATE INDEX IF NOT EXISTS idx_event_outbox_unfinished_sequence
    ON event_outbox (sequence_id)
    WHERE status IN ('pending', 'processing', 'retry');

CREATE INDEX IF NOT EXISTS idx_event_outbox_unfinished_aggregate
    ON event_outbox (aggregate_id, aggregate_type, sequence_id)
    WHERE status IN ('pending', 'processing', 'retry');
