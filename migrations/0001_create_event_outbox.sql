-- The transactional outbox the write side commits its domain events to.
-- Released: never edit this file; add a new migration instead.

CREATE TABLE event_outbox (
    event_id UUID PRIMARY KEY,
    sequence_id BIGSERIAL NOT NULL,
    aggregate_id UUID NOT NULL,
    aggregate_type VARCHAR(100) NOT NULL,
    event_type VARCHAR(100) NOT NULL,
    payload JSONB NOT NULL,
    status VARCHAR(20) NOT NULL DEFAULT 'pending',
    retry_count INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    lock_id VARCHAR(100),
    created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
    published_at TIMESTAMP WITH TIME ZONE,
    CONSTRAINT status_check CHECK (status IN ('pending', 'processing', 'processed', 'failed', 'retry'))
);

CREATE INDEX idx_event_outbox_status ON event_outbox (status);
CREATE INDEX idx_event_outbox_created_at ON event_outbox (created_at);
CREATE INDEX idx_event_outbox_aggregate ON event_outbox (aggregate_type, aggregate_id);
CREATE INDEX idx_event_outbox_event_type ON event_outbox (event_type);
CREATE INDEX idx_event_outbox_sequence ON event_outbox (sequence_id);

COMMENT ON TABLE event_outbox IS 'Transactional outbox: domain events committed by the write side in the same transaction as their state change, read by the activity event processor.';
COMMENT ON COLUMN event_outbox.event_id IS 'Unique id of the event, assigned by the write side; the idempotency key.';
COMMENT ON COLUMN event_outbox.sequence_id IS 'Insert order of the event, assigned at INSERT (not at COMMIT); orders the events of one aggregate.';
COMMENT ON COLUMN event_outbox.aggregate_id IS 'Id of the aggregate (User or Activity) the event belongs to.';
COMMENT ON COLUMN event_outbox.aggregate_type IS 'Type of the aggregate: User or Activity.';
COMMENT ON COLUMN event_outbox.event_type IS 'Type of the event, e.g. UserCreated, ActivityCreated, ParticipantJoined.';
COMMENT ON COLUMN event_outbox.payload IS 'Event body as a camelCase JSON object.';
COMMENT ON COLUMN event_outbox.status IS 'pending: waiting; processing: claimed (see lock_id); processed: applied to the read models; retry: failed, will be tried again; failed: dead-lettered.';
COMMENT ON COLUMN event_outbox.retry_count IS 'How many times processing this event has failed.';
COMMENT ON COLUMN event_outbox.last_error IS 'The error of the last failed attempt, if any.';
COMMENT ON COLUMN event_outbox.lock_id IS 'Identity of the worker that claimed the event while status is processing.';
COMMENT ON COLUMN event_outbox.created_at IS 'When the write side created the event.';
COMMENT ON COLUMN event_outbox.published_at IS 'When the event was applied to the read models (status processed).';
