//! Store: where the read models live (MongoDB `activity_read`).

pub mod codes;
pub mod mongo;
