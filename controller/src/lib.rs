//! Ferry controller.
pub mod api;
pub mod catalog;
pub mod config;
pub mod fleet;
pub mod link;
pub mod pki;
pub mod server;
