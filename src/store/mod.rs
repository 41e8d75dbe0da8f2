//! Store: where the read models live (MongoDB `activity_read`).

pub mod codes;
mod error;
pub mod mongo;
