//! The one duration syntax used across Ferry (token lifetimes, safety
//! delays, schedules): a number with a unit, `30s`, `15m`, `24h`, `7d`,
//! `250ms`, or several of them from the largest unit down, `1h30m`. A bare
//! number counts seconds. [`HumanDuration`] displays in the same syntax, so
//! `parse(d.to_string()) == d` for whole milliseconds.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{CodedError, ErrorCode};

/// Units from the largest down, with their length in milliseconds.
const UNITS: [(&str, u64); 5] = [
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1_000),
    ("ms", 1),
];

/// A text that is not a duration.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {value:?}: {reason}")]
pub struct DurationError {
    value: String,
    reason: &'static str,
}

impl DurationError {
    fn new(value: &str, reason: &'static str) -> Self {
        Self {
            value: value.chars().take(40).collect(),
            reason,
        }
    }

    /// Why the text was refused.
    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

impl CodedError for DurationError {
    fn code(&self) -> ErrorCode {
        ErrorCode::InvalidArgument
    }
}

/// Parses `30s`, `15m`, `24h`, `7d`, `250ms`, `1h30m` or bare seconds.
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    const HINT: &str =
        "use a number with a unit (ms, s, m, h, d) such as 30s, 15m, 24h, 7d or 1h30m";
    let s = text.trim();
    if s.is_empty() {
        return Err(DurationError::new(text, "must not be empty"));
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        let secs: u64 = s
            .parse()
            .map_err(|_| DurationError::new(text, "is too long"))?;
        return Ok(Duration::from_secs(secs));
    }
    let mut total: u64 = 0;
    // Index into UNITS of the next unit allowed: strictly descending.
    let mut next_unit = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(DurationError::new(text, HINT));
        }
        let (num, after) = rest.split_at(digits);
        let letters = after.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, after) = after.split_at(letters);
        let Some(pos) = UNITS.iter().position(|(u, _)| *u == unit) else {
            return Err(DurationError::new(text, HINT));
        };
        if pos < next_unit {
            return Err(DurationError::new(
                text,
                "units must go from the largest down, each at most once (1h30m, not 30m1h)",
            ));
        }
        next_unit = pos + 1;
        let n: u64 = num
            .parse()
            .map_err(|_| DurationError::new(text, "is too long"))?;
        total = n
            .checked_mul(UNITS[pos].1)
            .and_then(|ms| total.checked_add(ms))
            .ok_or_else(|| DurationError::new(text, "is too long"))?;
        rest = after;
    }
    Ok(Duration::from_millis(total))
}

/// A duration that reads and displays in Ferry's syntax (`1h30m`, `0s`).
/// Display truncates below a millisecond.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HumanDuration(pub Duration);

impl From<Duration> for HumanDuration {
    fn from(d: Duration) -> Self {
        Self(d)
    }
}

impl From<HumanDuration> for Duration {
    fn from(d: HumanDuration) -> Self {
        d.0
    }
}

impl FromStr for HumanDuration {
    type Err = DurationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse(s).map(Self)
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ms = u64::try_from(self.0.as_millis()).unwrap_or(u64::MAX);
        if ms == 0 {
            return f.write_str("0s");
        }
        for (unit, len) in UNITS {
            let n = ms / len;
            if n > 0 {
                write!(f, "{n}{unit}")?;
                ms -= n * len;
            }
        }
        Ok(())
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn single_units_and_bare_seconds() {
        assert_eq!(parse("30s"), Ok(secs(30)));
        assert_eq!(parse("15m"), Ok(secs(900)));
        assert_eq!(parse("24h"), Ok(secs(86_400)));
        assert_eq!(parse("7d"), Ok(secs(604_800)));
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("90"), Ok(secs(90)));
        assert_eq!(parse(" 2h "), Ok(secs(7200)));
        assert_eq!(parse("0s"), Ok(Duration::ZERO));
        assert_eq!(parse("0"), Ok(Duration::ZERO));
    }

    #[test]
    fn combinations_go_from_the_largest_unit_down() {
        assert_eq!(parse("1h30m"), Ok(secs(5400)));
        assert_eq!(parse("1d2h3m4s5ms"), Ok(Duration::from_millis(93_784_005)));
        let err = parse("30m1h").expect_err("ascending");
        assert!(err.reason().contains("largest down"), "{err}");
        assert!(parse("1h1h").is_err());
        assert!(parse("1s1ms1s").is_err());
    }

    #[test]
    fn bad_input_is_refused_with_the_text_named() {
        for bad in [
            "", "h", "5y", "-1h", "1.5h", "1 h", "1H", "h1", "10m5", "1hm",
        ] {
            let err = parse(bad).expect_err(bad);
            assert!(err.to_string().starts_with("invalid duration"), "{err}");
            assert_eq!(err.code(), ErrorCode::InvalidArgument);
        }
        let err = parse("5y").expect_err("unit");
        assert!(err.to_string().contains("\"5y\""), "{err}");
    }

    #[test]
    fn overflow_is_refused() {
        for bad in [
            "99999999999999999999",
            "99999999999999999999d",
            "213503982334601d",
            "18446744073709551615d1ms",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn display_uses_the_same_syntax() {
        let show = |d: Duration| HumanDuration(d).to_string();
        assert_eq!(show(Duration::ZERO), "0s");
        assert_eq!(show(secs(90)), "1m30s");
        assert_eq!(show(secs(3600)), "1h");
        assert_eq!(show(secs(7 * 86_400)), "7d");
        assert_eq!(show(Duration::from_millis(1500)), "1s500ms");
        assert_eq!(show(Duration::from_micros(1)), "0s");
    }

    #[test]
    fn serde_reads_and_writes_text() {
        let d: HumanDuration = serde_json::from_str("\"1h30m\"").expect("valid");
        assert_eq!(d.0, secs(5400));
        assert_eq!(serde_json::to_string(&d).expect("json"), "\"1h30m\"");
        assert!(serde_json::from_str::<HumanDuration>("\"soon\"").is_err());
    }

    proptest! {
        #[test]
        fn display_round_trips(ms in 0u64..=u64::MAX / 2) {
            let d = HumanDuration(Duration::from_millis(ms));
            prop_assert_eq!(d.to_string().parse::<HumanDuration>().expect("display parses"), d);
        }

        #[test]
        fn never_panics(s in ".{0,30}") {
            let _ = parse(&s);
        }
    }
}
