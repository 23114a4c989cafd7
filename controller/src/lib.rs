//! Ferry controller.
pub mod catalog;
