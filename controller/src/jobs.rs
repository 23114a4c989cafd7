//! The job engine: every operation (backup, restore, migrate, delete,
//! verify) is a job, a persisted plan of steps handed to agents over their
//! link.
//!
//! - [`machine`]: the state machine of one job, pure (no IO, no clock), so
//!   it can be tested exhaustively: a plan of steps, each with an executor
//!   and an optional undo step; retries of transient failures; waiting for
//!   an offline agent up to a deadline; cancel; what a controller restart
//!   leaves to resume or to fail.

pub mod engine;
pub mod machine;
pub mod plan;
pub mod work;
