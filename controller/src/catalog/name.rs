//! Validated identifiers used across the catalog API.
//!
//! Every name is checked once, when it is built (`ClusterName::new(s)?`), so
//! the rest of the controller can rely on it. Names never contain `/`, which
//! the engines use to build composite keys.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::CatalogError;

/// Longest DNS label.
const LABEL_MAX: usize = 63;
/// Longest DNS subdomain (node names may be host names).
const SUBDOMAIN_MAX: usize = 253;

fn invalid(kind: &'static str, value: &str, reason: &'static str) -> CatalogError {
    CatalogError::InvalidName {
        kind,
        value: value.chars().take(80).collect(),
        reason,
    }
}

/// DNS-label rules: 1..=63 of `[a-z0-9-]`, starting and ending with `[a-z0-9]`.
fn check_label(kind: &'static str, value: &str) -> Result<(), CatalogError> {
    if value.is_empty() {
        return Err(invalid(kind, value, "must not be empty"));
    }
    if value.len() > LABEL_MAX {
        return Err(invalid(kind, value, "must be at most 63 characters"));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(invalid(
            kind,
            value,
            "may contain only lowercase letters, digits and '-'",
        ));
    }
    if value.starts_with('-') || value.ends_with('-') {
        return Err(invalid(
            kind,
            value,
            "must start and end with a letter or digit",
        ));
    }
    Ok(())
}

/// DNS-subdomain rules: dot-separated labels, at most 253 characters.
fn check_subdomain(kind: &'static str, value: &str) -> Result<(), CatalogError> {
    if value.len() > SUBDOMAIN_MAX {
        return Err(invalid(kind, value, "must be at most 253 characters"));
    }
    if value.is_empty() {
        return Err(invalid(kind, value, "must not be empty"));
    }
    for label in value.split('.') {
        check_label(kind, label).map_err(|_| {
            invalid(
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
fn check_component(kind: &'static str, value: &str) -> Result<(), CatalogError> {
    if value.is_empty() {
        return Err(invalid(kind, value, "must not be empty"));
    }
    if value.len() > SUBDOMAIN_MAX {
        return Err(invalid(kind, value, "must be at most 253 characters"));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'@' | b':' | b'-'))
    {
        return Err(invalid(
            kind,
            value,
            "may contain only letters, digits and '_' '.' '@' ':' '-'",
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
            /// Validates `value` and wraps it.
            pub fn new(value: impl Into<String>) -> Result<Self, CatalogError> {
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
            type Error = CatalogError;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::new(value)
            }
        }

        impl std::str::FromStr for $name {
            type Err = CatalogError;
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
    /// A cluster (or host group) an agent belongs to. DNS label.
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

/// SHA-256 of a join token. The catalog stores only this, never the token.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    /// Hashes a join token as presented by an agent or printed to an operator.
    pub fn of(token: &str) -> Self {
        Self(Sha256::digest(token.as_bytes()).into())
    }

    /// Parses the 64-character lowercase hex form.
    pub fn from_hex(value: &str) -> Result<Self, CatalogError> {
        let mut bytes = [0u8; 32];
        if value.len() != 64 || value.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(invalid(
                "token hash",
                value,
                "must be 64 lowercase hex characters",
            ));
        }
        hex::decode_to_slice(value, &mut bytes)
            .map_err(|_| invalid("token hash", value, "must be 64 lowercase hex characters"))?;
        Ok(Self(bytes))
    }

    /// The full 64-character lowercase hex form (used as the storage key).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 12 hex characters, enough to name a token in messages.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..6])
    }

    /// The raw digest.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.short())
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash({})", self.short())
    }
}

impl Serialize for TokenHash {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for TokenHash {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = String::deserialize(deserializer)?;
        Self::from_hex(&value).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn labels_accept_dns_labels() {
        for ok in ["a", "prod-eu-1", "0", "a-b-c", &"x".repeat(63)] {
            assert!(ClusterName::new(ok).is_ok(), "{ok} should be valid");
            assert!(TeamName::new(ok).is_ok(), "{ok} should be valid");
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
            assert!(!err.is_transient());
        }
        let long = "a".repeat(64);
        assert!(ClusterName::new(long).is_err());
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
    fn deserialization_validates() {
        let ok: ClusterName = serde_json::from_str("\"prod\"").expect("valid name");
        assert_eq!(ok.as_str(), "prod");
        assert!(serde_json::from_str::<ClusterName>("\"Prod\"").is_err());
    }

    #[test]
    fn token_hash_is_sha256_and_round_trips() {
        let h = TokenHash::of("abc");
        assert_eq!(
            h.to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(TokenHash::from_hex(&h.to_hex()).expect("hex"), h);
        assert_eq!(h.short(), "ba7816bf8f01");
        assert!(!format!("{h:?}").contains("abc"));
        assert!(TokenHash::from_hex("zz").is_err());
        assert!(TokenHash::from_hex(&h.to_hex().to_uppercase()).is_err());
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
            let json = serde_json::to_string(&name).expect("serialize");
            let back: ClusterName = serde_json::from_str(&json).expect("deserialize");
            prop_assert_eq!(back, name);
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
