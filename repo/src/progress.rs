//! Progress reports of long operations.

use std::time::Duration;

/// Progress of a running backup or restore.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProgressInfo {
    pub bytes: u64,
    pub files: u64,
    pub elapsed: Duration,
}

impl ProgressInfo {
    /// Bytes per second since the start.
    pub fn rate(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 { self.bytes as f64 / s } else { 0.0 }
    }
}

/// Receives progress reports (at most a few per second).
pub trait Progress: Send + Sync {
    fn update(&self, info: &ProgressInfo);
}

impl<F: Fn(&ProgressInfo) + Send + Sync> Progress for F {
    fn update(&self, info: &ProgressInfo) {
        self(info)
    }
}
