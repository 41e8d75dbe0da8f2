//! The activity event processor.
//!
//! It keeps the read models of the activity platform (MongoDB `activity_read`) in
//! step with the domain events the write side commits to the PostgreSQL
//! transactional outbox (`activity.event_outbox`).
//!
//! The stages, top to bottom:
//!
//! 1. **capture** (`source`): logical replication, a polling relay, or Debezium
//!    change events from Kafka;
//! 2. **decode** ([`decode`]): outbox rows and Kafka messages into [`decode::OutboxEvent`];
//! 3. **route** ([`route`]): the handler registry, keyed by event type;
//! 4. **project** ([`projection`]): fenced, idempotent writes to the read models
//!    in MongoDB ([`store`]);
//! 5. **checkpoint**: acknowledge a position only once MongoDB durably holds
//!    every effect before it.
//!
//! Delivery guarantee: the transport is at-least-once; the projections are
//! idempotent and fenced per aggregate, so the effects are exactly-once.

pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod decode;
pub mod failpoint;
pub mod history;
pub mod observe;
pub mod outbox;
pub mod pipeline;
pub mod policy;
pub mod probe;
pub mod projection;
pub mod relay;
pub mod route;
pub mod source;
pub mod store;
pub mod telemetry;
