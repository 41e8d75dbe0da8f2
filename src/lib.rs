//! The activity event processor.
//!
//! It keeps the read models of the activity platform (MongoDB `activity_read`) in
//! step with the domain events the write side commits to the PostgreSQL
//! transactional outbox (`activity.event_outbox`).
//!
//! The stages, top to bottom:
//!
//! 1. **capture** ([`source`]): logical replication, a polling relay, or Debezium
//!    change events from Kafka; each source acknowledges with a position of its
//!    own type;
//! 2. **decode** ([`decode`]): outbox rows and Kafka messages into [`decode::OutboxEvent`];
//! 3. **route** ([`route`]): the handler registry, keyed by event type;
//! 4. **sink** ([`sink`]): the read models in MongoDB ([`projection`], fenced,
//!    idempotent writes through [`store`]), the relay's Kafka topic, or nothing;
//! 5. **checkpoint** ([`checkpoint`]): acknowledge a position only once the sink
//!    durably holds every effect before it.
//!
//! The [`runtime`] runs stages 1, 4 and 5 for every command, with one retry
//! helper and one error policy ([`policy`]). What an operator sees of a
//! running process is [`observe`]'s (metrics, health) and [`console`]'s (the
//! live page on the same address).
//!
//! Delivery guarantee: the transport is at-least-once; the projections are
//! idempotent and fenced per aggregate, so the effects are exactly-once.

pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod console;
pub mod counters;
pub mod dead_letter;
pub mod decode;
pub mod failpoint;
pub mod observe;
pub mod outbox;
pub mod policy;
pub mod projection;
pub mod rebuild;
pub mod relay;
pub mod route;
pub mod runtime;
pub mod sink;
pub mod source;
pub mod stages;
pub mod stats_file;
pub mod store;
pub mod telemetry;
pub mod verify;
