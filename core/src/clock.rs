//! Wall-clock time as Unix milliseconds, the unit on the wire and in the
//! catalog.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch (UTC).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The current wall-clock time (the epoch if the clock is before it).
    pub fn now() -> Self {
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        Self(millis)
    }

    /// A timestamp from Unix milliseconds.
    pub const fn from_unix_millis(millis: i64) -> Self {
        Self(millis)
    }

    /// Unix milliseconds.
    pub const fn unix_millis(self) -> i64 {
        self.0
    }

    /// This timestamp moved forward by `d` (saturating).
    pub fn plus(self, d: Duration) -> Self {
        let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        Self(self.0.saturating_add(ms))
    }
}

/// The current wall-clock time in Unix milliseconds.
pub fn now_ms() -> i64 {
    Timestamp::now().unix_millis()
}

impl fmt::Display for Timestamp {
    /// RFC 3339 (`2026-01-02T03:04:05.678Z`), or `unix-ms N` out of range.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nanos = i128::from(self.0) * 1_000_000;
        match ::time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
            .ok()
            .and_then(|t| {
                t.format(&::time::format_description::well_known::Rfc3339)
                    .ok()
            }) {
            Some(s) => f.write_str(&s),
            None => write!(f, "unix-ms {}", self.0),
        }
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Timestamp({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_rfc3339() {
        assert_eq!(
            Timestamp::from_unix_millis(0).to_string(),
            "1970-01-01T00:00:00Z"
        );
        assert_eq!(
            Timestamp::from_unix_millis(1_500).to_string(),
            "1970-01-01T00:00:01.5Z"
        );
        assert_eq!(
            Timestamp::from_unix_millis(i64::MAX).to_string(),
            format!("unix-ms {}", i64::MAX)
        );
    }

    #[test]
    fn now_is_recent_and_plus_saturates() {
        assert!(now_ms() > 1_600_000_000_000);
        assert!(Timestamp::now() > Timestamp::from_unix_millis(1_600_000_000_000));
        let t = Timestamp::from_unix_millis(10);
        assert_eq!(t.plus(Duration::from_millis(5)).unix_millis(), 15);
        assert_eq!(
            Timestamp::from_unix_millis(i64::MAX - 1)
                .plus(Duration::from_secs(1))
                .unix_millis(),
            i64::MAX
        );
    }

    #[test]
    fn serializes_as_a_number() {
        let t = Timestamp::from_unix_millis(42);
        assert_eq!(serde_json::to_string(&t).expect("json"), "42");
    }
}
