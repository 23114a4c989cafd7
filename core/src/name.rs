//! Identifiers as validated newtypes.
//!
//! Every name is checked once, when it is built (`ClusterName::new(s)?`,
//! `s.parse::<AppName>()?`, or while deserializing), so the rest of Ferry
//! can rely on it. Names other than [`VolumeName`] never contain `/`, which
//! the catalog uses to build composite keys.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{CodedError, ErrorCode};

/// Longest DNS label.
const LABEL_MAX: usize = 63;
/// Longest DNS subdomain (node names may be host names).
const SUBDOMAIN_MAX: usize = 253;

/// A value that is not a valid name of its kind.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {value:?}: {reason}")]
pub struct NameError {
    kind: &'static str,
    value: String,
    reason: &'static str,
}

impl NameError {
    /// A refusal of `value` as a `kind` ("app name"); the value is kept
    /// shortened to 80 characters for messages.
    pub fn new(kind: &'static str, value: &str, reason: &'static str) -> Self {
        Self {
            kind,
            value: value.chars().take(80).collect(),
            reason,
        }
    }

    /// What was being named ("app name", "cluster name", …).
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// Why the value was refused.
    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

impl CodedError for NameError {
    fn code(&self) -> ErrorCode {
        ErrorCode::InvalidArgument
    }
}

/// DNS-label rules: 1..=63 of `[a-z0-9-]`, starting and ending with `[a-z0-9]`.
fn check_label(kind: &'static str, value: &str) -> Result<(), NameError> {
    if value.is_empty() {
        return Err(NameError::new(kind, value, "must not be empty"));
    }
    if value.len() > LABEL_MAX {
        return Err(NameError::new(kind, value, "must be at most 63 characters"));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(NameError::new(
            kind,
            value,
            "may contain only lowercase letters, digits and '-'",
        ));
    }
    if value.starts_with('-') || value.ends_with('-') {
        return Err(NameError::new(
            kind,
            value,
            "must start and end with a letter or digit",
        ));
    }
    Ok(())
}

/// DNS-subdomain rules: dot-separated labels, at most 253 characters.
fn check_subdomain(kind: &'static str, value: &str) -> Result<(), NameError> {
    if value.is_empty() {
        return Err(NameError::new(kind, value, "must not be empty"));
    }
    if value.len() > SUBDOMAIN_MAX {
        return Err(NameError::new(
            kind,
            value,
            "must be at most 253 characters",
        ));
    }
    for label in value.split('.') {
        check_label(kind, label).map_err(|_| {
            NameError::new(
                kind,
                value,
                "must be dot-separated labels of lowercase letters, digits and '-'",
            )
        })?;
    }
    Ok(())
}

/// Component names follow the platform (systemd units, container names):
/// 1..=253 of `[A-Za-z0-9_.@:-]`.
fn check_component(kind: &'static str, value: &str) -> Result<(), NameError> {
    if value.is_empty() {
        return Err(NameError::new(kind, value, "must not be empty"));
    }
    if value.len() > SUBDOMAIN_MAX {
        return Err(NameError::new(
            kind,
            value,
            "must be at most 253 characters",
        ));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'@' | b':' | b'-'))
    {
        return Err(NameError::new(
            kind,
            value,
            "may contain only letters, digits and '_' '.' '@' ':' '-'",
        ));
    }
    Ok(())
}

/// Volume names are what the platform calls the volume (a directory on a
/// host, a named volume, a claim): 1..=253 bytes without control characters.
fn check_volume(kind: &'static str, value: &str) -> Result<(), NameError> {
    if value.is_empty() {
        return Err(NameError::new(kind, value, "must not be empty"));
    }
    if value.len() > SUBDOMAIN_MAX {
        return Err(NameError::new(kind, value, "must be at most 253 bytes"));
    }
    if value.chars().any(char::is_control) {
        return Err(NameError::new(
            kind,
            value,
            "must not contain control characters",
        ));
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $check:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// What this type names, as used in messages.
            pub const KIND: &'static str = $kind;

            /// Validates `value` and wraps it.
            pub fn new(value: impl Into<String>) -> Result<Self, NameError> {
                let value = value.into();
                $check($kind, &value)?;
                Ok(Self(value))
            }

            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::new(value)
            }
        }

        impl FromStr for $name {
            type Err = NameError;
            fn from_str(value: &str) -> Result<Self, Self::Err> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }
    };
}

name_type!(
    /// A cluster (or host group) agents belong to. DNS label.
    ClusterName,
    "cluster name",
    check_label
);
name_type!(
    /// A node within a cluster. DNS subdomain, so host names fit.
    NodeName,
    "node name",
    check_subdomain
);
name_type!(
    /// The controller-assigned identity of an enrolled agent. DNS label.
    AgentId,
    "agent id",
    check_label
);
name_type!(
    /// A team that owns applications. DNS label.
    TeamName,
    "team name",
    check_label
);
name_type!(
    /// An application, unique per (cluster, team). DNS label.
    AppName,
    "app name",
    check_label
);
name_type!(
    /// A component of an application: systemd unit, container, command set.
    ComponentName,
    "component name",
    check_component
);
name_type!(
    /// A storage location (local disk, S3 bucket, shared filesystem). DNS label.
    LocationName,
    "location name",
    check_label
);
name_type!(
    /// A volume of an application, unique within the app. For the host
    /// driver it is the directory itself, so it may contain `/`.
    VolumeName,
    "volume name",
    check_volume
);

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "u64", into = "u64")]
        pub struct $name(u64);

        impl $name {
            /// What this type names, as used in messages.
            pub const KIND: &'static str = $kind;

            /// Wraps a number; 0 is refused (on the wire it means "none").
            pub fn new(value: u64) -> Result<Self, NameError> {
                if value == 0 {
                    return Err(NameError::new($kind, "0", "must be at least 1"));
                }
                Ok(Self(value))
            }

            /// The number.
            pub const fn get(self) -> u64 {
                self.0
            }
        }

        impl TryFrom<u64> for $name {
            type Error = NameError;
            fn try_from(value: u64) -> Result<Self, Self::Error> {
                Self::new(value)
            }
        }

        impl From<$name> for u64 {
            fn from(value: $name) -> u64 {
                value.0
            }
        }

        impl FromStr for $name {
            type Err = NameError;
            fn from_str(value: &str) -> Result<Self, Self::Err> {
                // Digits only: no sign, no spaces, no leading zeros.
                if value.is_empty()
                    || !value.bytes().all(|b| b.is_ascii_digit())
                    || (value.len() > 1 && value.starts_with('0'))
                {
                    return Err(NameError::new(
                        $kind,
                        value,
                        "must be a positive decimal number",
                    ));
                }
                let n = value.parse::<u64>().map_err(|_| {
                    NameError::new($kind, value, "must fit in 64 bits")
                })?;
                Self::new(n)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }
    };
}

id_type!(
    /// A backup, numbered by the controller from 1.
    BackupId,
    "backup id"
);
id_type!(
    /// A job (backup, restore, migrate, …), numbered by the controller from 1.
    JobId,
    "job id"
);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn labels_accept_dns_labels() {
        for ok in ["a", "prod-eu-1", "0", "a-b-c", &"x".repeat(63)] {
            assert!(ClusterName::new(ok).is_ok(), "{ok} should be valid");
            assert!(TeamName::new(ok).is_ok(), "{ok} should be valid");
            assert!(LocationName::new(ok).is_ok(), "{ok} should be valid");
        }
    }

    #[test]
    fn labels_reject_bad_input_with_reason() {
        let cases = [
            ("", "must not be empty"),
            ("Prod", "lowercase"),
            ("-a", "start and end"),
            ("a-", "start and end"),
            ("a/b", "lowercase"),
            ("a.b", "lowercase"),
            ("a b", "lowercase"),
            ("é", "lowercase"),
        ];
        for (bad, reason) in cases {
            let err = AppName::new(bad).expect_err(bad);
            let msg = err.to_string();
            assert!(msg.contains(reason), "{bad:?}: {msg}");
            assert!(msg.starts_with("invalid app name"), "{msg}");
            assert_eq!(err.kind(), "app name");
            assert_eq!(err.code(), ErrorCode::InvalidArgument);
            assert!(!err.is_transient());
        }
        assert!(ClusterName::new("a".repeat(64)).is_err());
    }

    #[test]
    fn messages_shorten_long_values() {
        let err = AppName::new("X".repeat(500)).expect_err("too long");
        assert!(err.to_string().len() < 200, "{err}");
    }

    #[test]
    fn node_names_accept_host_names() {
        assert!(NodeName::new("node-1.dc2.example.com").is_ok());
        assert!(NodeName::new("n").is_ok());
        assert!(NodeName::new("a..b").is_err());
        assert!(NodeName::new(".a").is_err());
        assert!(NodeName::new("a/b").is_err());
        assert!(NodeName::new(format!("{}.{}", "a".repeat(63), "b".repeat(64))).is_err());
    }

    #[test]
    fn component_names_accept_units_and_containers() {
        for ok in ["postgresql@15-main.service", "web_db_1", "ns:pod", "A.B"] {
            assert!(ComponentName::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a/b", "a b", "x\n"] {
            assert!(ComponentName::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn volume_names_accept_paths_but_not_control_characters() {
        assert!(VolumeName::new("/var/lib/postgresql/15/main").is_ok());
        assert!(VolumeName::new("pgdata").is_ok());
        for bad in ["", "a\0b", "a\nb", &"v".repeat(254)] {
            assert!(VolumeName::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ids_are_positive_decimals() {
        assert_eq!("17".parse::<BackupId>().expect("valid").get(), 17);
        assert_eq!(JobId::new(3).expect("valid").to_string(), "3");
        for bad in [
            "",
            "0",
            "007",
            "-1",
            "+1",
            " 1",
            "1x",
            "99999999999999999999",
        ] {
            let err = bad.parse::<JobId>().expect_err(bad);
            assert!(err.to_string().starts_with("invalid job id"), "{err}");
        }
        assert!(serde_json::from_str::<BackupId>("0").is_err());
        assert_eq!(
            serde_json::to_string(&BackupId::new(9).expect("valid")).expect("json"),
            "9"
        );
    }

    #[test]
    fn deserialization_validates() {
        let ok: ClusterName = serde_json::from_str("\"prod\"").expect("valid name");
        assert_eq!(ok.as_str(), "prod");
        let err = serde_json::from_str::<ClusterName>("\"Prod\"").expect_err("invalid");
        assert!(err.to_string().contains("invalid cluster name"), "{err}");
    }

    proptest! {
        #[test]
        fn label_validation_matches_rule(s in "[a-zA-Z0-9_./ -]{0,70}") {
            let expected = !s.is_empty()
                && s.len() <= 63
                && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !s.starts_with('-')
                && !s.ends_with('-');
            prop_assert_eq!(ClusterName::new(s.clone()).is_ok(), expected);
        }

        #[test]
        fn valid_labels_round_trip(s in "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?") {
            let name = ClusterName::new(s.clone()).expect("generated valid");
            prop_assert_eq!(name.as_str(), s.as_str());
            let back: ClusterName = name.to_string().parse().expect("display parses");
            prop_assert_eq!(&back, &name);
            let json = serde_json::to_string(&name).expect("serialize");
            let back: ClusterName = serde_json::from_str(&json).expect("deserialize");
            prop_assert_eq!(back, name);
        }

        #[test]
        fn component_names_round_trip(s in "[A-Za-z0-9_.@:-]{1,253}") {
            let name: ComponentName = s.parse().expect("generated valid");
            prop_assert_eq!(name.to_string().parse::<ComponentName>().expect("again"), name);
        }

        #[test]
        fn ids_round_trip(n in 1u64..) {
            let id = JobId::new(n).expect("positive");
            prop_assert_eq!(id.to_string().parse::<JobId>().expect("display parses"), id);
        }

        #[test]
        fn names_never_contain_slash(s in ".{0,80}") {
            if let Ok(n) = NodeName::new(s.clone()) {
                prop_assert!(!n.as_str().contains('/'));
            }
            if let Ok(n) = ComponentName::new(s) {
                prop_assert!(!n.as_str().contains('/'));
            }
        }
    }
}
