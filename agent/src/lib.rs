//! Ferry agent: platform drivers, the session with the controller, and the
//! command line over the data mover (`ferry-repo`).

pub mod config;
pub mod data_mover;
pub mod durable;
pub mod enrol;
pub mod journal;
pub mod platform;
pub mod requests;
pub mod session;
pub mod steps;
pub mod storage;
