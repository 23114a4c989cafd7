//! Where the repository reads the time: the system clock, or a clock that
//! tests move by hand (a lock that must outlive hours of "time").

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

#[derive(Debug, Clone, Default)]
pub enum Clock {
    #[default]
    System,
    /// Unix seconds, set by whoever holds the other handle.
    Manual(Arc<AtomicI64>),
}

impl Clock {
    /// A manual clock starting at `unix` seconds.
    pub fn manual(unix: i64) -> Self {
        Clock::Manual(Arc::new(AtomicI64::new(unix)))
    }

    pub fn now_unix(&self) -> i64 {
        match self {
            Clock::System => super::crypto::now_unix(),
            Clock::Manual(t) => t.load(Ordering::SeqCst),
        }
    }

    /// Moves a manual clock forward; the system clock cannot be moved.
    pub fn advance(&self, secs: i64) {
        if let Clock::Manual(t) = self {
            t.fetch_add(secs, Ordering::SeqCst);
        }
    }
}
