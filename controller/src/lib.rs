//! Ferry controller.
pub mod api;
pub mod catalog;
pub mod config;
pub mod fleet;
pub mod pki;
pub mod server;
