//! Who a Ferry certificate speaks for. The controller puts exactly one URI
//! SAN in every client certificate it issues:
//!
//! - an agent: `ferry://cluster/<cluster>/node/<node>`
//! - an operator: `ferry://operator/<name>`
//!
//! Both daemons parse it with [`PeerIdentity::from_cert_der`], so the format
//! lives in one place. Names are checked for the characters the URI form
//! needs (no `/`, no empty parts); the controller validates them further
//! with its catalog name rules.

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

const PREFIX: &str = "ferry://";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("certificate cannot be parsed: {reason}")]
    BadCertificate { reason: String },
    #[error("certificate has no ferry:// uri subject alternative name")]
    NoFerryUri,
    #[error("certificate has more than one ferry:// uri subject alternative name")]
    SeveralFerryUris,
    #[error("malformed ferry identity uri {uri:?}")]
    Malformed { uri: String },
}

/// The identity a client certificate carries.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PeerIdentity {
    Agent { cluster: String, node: String },
    Operator { name: String },
}

fn plain(part: &str) -> bool {
    !part.is_empty()
        && part
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

impl PeerIdentity {
    /// The URI SAN for this identity.
    pub fn to_uri(&self) -> String {
        match self {
            Self::Agent { cluster, node } => format!("{PREFIX}cluster/{cluster}/node/{node}"),
            Self::Operator { name } => format!("{PREFIX}operator/{name}"),
        }
    }

    /// Parses a `ferry://` URI.
    pub fn from_uri(uri: &str) -> Result<Self, IdentityError> {
        let malformed = || IdentityError::Malformed {
            uri: uri.chars().take(200).collect(),
        };
        let rest = uri.strip_prefix(PREFIX).ok_or_else(malformed)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            ["cluster", cluster, "node", node] if plain(cluster) && plain(node) => {
                Ok(Self::Agent {
                    cluster: (*cluster).to_owned(),
                    node: (*node).to_owned(),
                })
            }
            ["operator", name] if plain(name) => Ok(Self::Operator {
                name: (*name).to_owned(),
            }),
            _ => Err(malformed()),
        }
    }

    /// The identity named by a DER certificate's single `ferry://` URI SAN.
    pub fn from_cert_der(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).map_err(|e| {
            IdentityError::BadCertificate {
                reason: e.to_string(),
            }
        })?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| IdentityError::BadCertificate {
                reason: e.to_string(),
            })?;
        let mut found = None;
        for name in san.iter().flat_map(|s| s.value.general_names.iter()) {
            if let GeneralName::URI(uri) = name
                && uri.starts_with(PREFIX)
            {
                if found.is_some() {
                    return Err(IdentityError::SeveralFerryUris);
                }
                found = Some(Self::from_uri(uri)?);
            }
        }
        found.ok_or(IdentityError::NoFerryUri)
    }
}

impl std::fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Agent { cluster, node } => write!(f, "agent {node} of cluster {cluster}"),
            Self::Operator { name } => write!(f, "operator {name}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_round_trip() {
        for id in [
            PeerIdentity::Agent {
                cluster: "prod-eu".into(),
                node: "node-1.dc2".into(),
            },
            PeerIdentity::Operator {
                name: "admin".into(),
            },
        ] {
            assert_eq!(PeerIdentity::from_uri(&id.to_uri()), Ok(id));
        }
    }

    #[test]
    fn malformed_uris_are_refused() {
        for bad in [
            "",
            "ferry://",
            "https://cluster/a/node/b",
            "ferry://cluster/a",
            "ferry://cluster//node/b",
            "ferry://cluster/a/node/b/extra",
            "ferry://cluster/a/node/b%2f",
            "ferry://operator/",
            "ferry://operator/a/b",
            "ferry://root/a",
        ] {
            assert!(
                matches!(
                    PeerIdentity::from_uri(bad),
                    Err(IdentityError::Malformed { .. })
                ),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn garbage_der_is_a_bad_certificate() {
        assert!(matches!(
            PeerIdentity::from_cert_der(b"garbage"),
            Err(IdentityError::BadCertificate { .. })
        ));
    }
}
