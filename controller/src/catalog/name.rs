//! Identifiers used across the catalog API. The names are ferry-core's
//! validated newtypes; the catalog adds [`TokenHash`], which needs SHA-256.

use std::fmt;

use ferry_core::NameError;
pub use ferry_core::{
    AgentId, AppName, ClusterName, ComponentName, LocationName, NodeName, TeamName,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// SHA-256 of a join token. The catalog stores only this, never the token.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    /// Hashes a join token as presented by an agent or printed to an operator.
    pub fn of(token: &str) -> Self {
        Self(Sha256::digest(token.as_bytes()).into())
    }

    /// Parses the 64-character lowercase hex form.
    pub fn from_hex(value: &str) -> Result<Self, NameError> {
        let invalid = || NameError::new("token hash", value, "must be 64 lowercase hex characters");
        let mut bytes = [0u8; 32];
        if value.len() != 64 || value.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(invalid());
        }
        hex::decode_to_slice(value, &mut bytes).map_err(|_| invalid())?;
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
        let json = serde_json::to_string(&h).expect("json");
        assert_eq!(serde_json::from_str::<TokenHash>(&json).expect("back"), h);
    }

    #[test]
    fn catalog_names_are_the_core_names() {
        // One rule everywhere: the catalog refuses what ferry-core refuses.
        let err = ClusterName::new("Prod").expect_err("invalid");
        let err = crate::catalog::CatalogError::from(err);
        assert!(err.to_string().starts_with("invalid cluster name"), "{err}");
    }
}
