//! Ferry controller.
