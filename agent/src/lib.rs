//! Ferry agent: platform drivers, the session with the controller, and the
//! data mover.

pub mod config;
pub mod enrol;
pub mod platform;
pub mod repo;
pub mod session;
pub mod store;
