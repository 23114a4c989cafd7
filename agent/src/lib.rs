//! Ferry agent: platform drivers, the session with the controller, and the
//! data mover.

pub mod repo;
pub mod store;
