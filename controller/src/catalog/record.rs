//! Catalog records and their versioned on-disk envelope.
//!
//! Every value is stored as JSON `{"v": 1, "record": {...}}`. Readers check
//! `v` before decoding the record, so a record written by a newer Ferry is
//! refused with a clear error instead of being misread.

use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::CatalogError;
pub use ferry_core::Timestamp;

use super::name::{AgentId, AppName, ClusterName, ComponentName, NodeName, TeamName, TokenHash};

/// The record format version this build writes and the newest it reads.
pub const RECORD_VERSION: u32 = 1;

/// A cluster (or group of hosts) agents enrol into.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterRecord {
    pub name: ClusterName,
    pub created_at: Timestamp,
}

/// A team owning applications.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeamRecord {
    pub name: TeamName,
    pub created_at: Timestamp,
}

/// An enrolled agent. Whether it is online right now is session state kept
/// by the daemon; `last_seen` is the persisted trace of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub id: AgentId,
    pub cluster: ClusterName,
    pub node: NodeName,
    /// Agent software version as reported by the agent.
    pub version: String,
    /// Platform driver: `containers`, `kubernetes`, `host`, …
    pub platform: String,
    pub enrolled_at: Timestamp,
    pub last_seen: Timestamp,
    /// Serial number of the agent's client certificate (hex).
    pub cert_serial: String,
    /// SHA-256 fingerprint of the agent's client certificate (hex).
    pub cert_fingerprint: String,
}

/// How a join token was used.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUse {
    pub at: Timestamp,
    pub node: NodeName,
}

/// A single-use, expiring join token, known only by its hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub hash: TokenHash,
    pub cluster: ClusterName,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    /// Set once, atomically, by `consume_join_token`.
    pub used: Option<TokenUse>,
}

impl TokenRecord {
    /// A fresh, unused token record for `cluster`.
    pub fn new(
        hash: TokenHash,
        cluster: ClusterName,
        created_at: Timestamp,
        expires_at: Timestamp,
    ) -> Self {
        Self {
            hash,
            cluster,
            created_at,
            expires_at,
            used: None,
        }
    }
}

/// How the agent starts and stops a component.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ComponentKind {
    /// A systemd unit, stopped and started with systemctl.
    SystemdUnit { unit: String },
    /// Explicit commands (argv vectors) declared in the agent's config.
    Commands {
        start: Vec<String>,
        stop: Vec<String>,
    },
    /// A container managed through the Docker Engine API (Docker or Podman).
    Container { container: String },
}

/// A directory holding a component's persistent data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    /// Name of the volume as the platform knows it (may equal the path).
    pub name: String,
    /// Absolute directory on the node.
    pub path: PathBuf,
}

/// Whether a component was running when its agent last reported it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComponentState {
    Running,
    Stopped,
    /// The driver could not tell, or the record predates the field.
    #[default]
    Unknown,
}

/// One component of an application.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Component {
    pub name: ComponentName,
    pub kind: ComponentKind,
    /// Stateful components are stopped during a cold backup.
    pub stateful: bool,
    pub volumes: Vec<Volume>,
    /// As last reported (see the app's `reported_at`).
    #[serde(default)]
    pub state: ComponentState,
}

/// An application as an agent reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppInventory {
    pub name: AppName,
    pub team: TeamName,
    pub components: Vec<Component>,
}

/// An application as the catalog holds it: the inventory plus where it was
/// reported from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppRecord {
    pub name: AppName,
    pub team: TeamName,
    pub cluster: ClusterName,
    /// The node whose agent reported this app.
    pub node: NodeName,
    pub components: Vec<Component>,
    pub reported_at: Timestamp,
}

impl AppInventory {
    /// Checks what names cannot: volume paths are absolute and plain,
    /// component names are unique, strings are bounded.
    pub(crate) fn validate(&self) -> Result<(), CatalogError> {
        let bad = |reason: String| CatalogError::InvalidRecord {
            what: format!("app {} of team {}", self.name, self.team),
            reason,
        };
        let mut seen = std::collections::BTreeSet::new();
        for c in &self.components {
            if !seen.insert(c.name.as_str()) {
                return Err(bad(format!("component {} is listed twice", c.name)));
            }
            for v in &c.volumes {
                if v.name.is_empty() || v.name.len() > 253 || v.name.contains('\0') {
                    return Err(bad(format!(
                        "component {} has a volume with an empty or oversized name",
                        c.name
                    )));
                }
                let plain = v.path.is_absolute()
                    && v.path.components().all(|p| {
                        matches!(
                            p,
                            std::path::Component::RootDir | std::path::Component::Normal(_)
                        )
                    });
                if !plain {
                    return Err(bad(format!(
                        "volume {} of component {} must be an absolute path without '..': {}",
                        v.name,
                        c.name,
                        v.path.display()
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Which apps `list_apps` returns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppFilter {
    pub cluster: Option<ClusterName>,
    pub team: Option<TeamName>,
}

impl AppFilter {
    pub(crate) fn matches(&self, app: &AppRecord) -> bool {
        self.cluster.as_ref().is_none_or(|c| *c == app.cluster)
            && self.team.as_ref().is_none_or(|t| *t == app.team)
    }
}

#[derive(Serialize)]
struct EnvelopeOut<'a, T> {
    v: u32,
    record: &'a T,
}

#[derive(Deserialize)]
struct VersionProbe {
    v: u32,
}

#[derive(Deserialize)]
struct EnvelopeIn<T> {
    #[allow(dead_code)]
    v: u32,
    record: T,
}

/// Encodes a record in the current envelope.
pub(crate) fn encode<T: Serialize>(
    table: &'static str,
    record: &T,
) -> Result<Vec<u8>, CatalogError> {
    serde_json::to_vec(&EnvelopeOut {
        v: RECORD_VERSION,
        record,
    })
    .map_err(|e| CatalogError::Encode {
        table,
        reason: e.to_string(),
    })
}

/// Decodes a record, refusing versions this build does not know.
pub(crate) fn decode<T: DeserializeOwned>(
    table: &'static str,
    key: &str,
    bytes: &[u8],
) -> Result<T, CatalogError> {
    let corrupt = |reason: String| CatalogError::Corrupt {
        table,
        key: key.to_owned(),
        reason,
    };
    let probe: VersionProbe = serde_json::from_slice(bytes)
        .map_err(|e| corrupt(format!("no readable format version: {e}")))?;
    if probe.v == 0 || probe.v > RECORD_VERSION {
        return Err(CatalogError::UnsupportedVersion {
            table,
            key: key.to_owned(),
            found: probe.v,
            supported: RECORD_VERSION,
        });
    }
    let env: EnvelopeIn<T> = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    Ok(env.record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::CodedError;

    fn cluster() -> ClusterRecord {
        ClusterRecord {
            name: ClusterName::new("prod").expect("valid"),
            created_at: Timestamp::from_unix_millis(1_700_000_000_000),
        }
    }

    #[test]
    fn envelope_round_trips_and_carries_version() {
        let bytes = encode("clusters", &cluster()).expect("encode");
        let text = String::from_utf8(bytes.clone()).expect("utf8");
        assert!(text.starts_with("{\"v\":1,"), "{text}");
        let back: ClusterRecord = decode("clusters", "prod", &bytes).expect("decode");
        assert_eq!(back, cluster());
    }

    #[test]
    fn future_version_is_refused_not_misread() {
        let bytes = br#"{"v":2,"record":{"name":"prod","created_at":1}}"#;
        let err = decode::<ClusterRecord>("clusters", "prod", bytes).expect_err("v2");
        assert!(matches!(
            err,
            CatalogError::UnsupportedVersion {
                found: 2,
                supported: 1,
                ..
            }
        ));
        assert!(err.to_string().contains("clusters record prod"), "{err}");
        assert!(!err.is_transient());
    }

    #[test]
    fn garbage_is_reported_as_corrupt() {
        for bytes in [
            &b"not json"[..],
            br#"{"record":{}}"#,
            br#"{"v":1,"record":{"name":"BAD","created_at":1}}"#,
        ] {
            let err = decode::<ClusterRecord>("clusters", "k", bytes).expect_err("corrupt");
            assert!(matches!(err, CatalogError::Corrupt { .. }), "{err}");
        }
    }

    #[test]
    fn inventory_validation_rejects_unsafe_paths() {
        let comp = |path: &str| Component {
            state: ComponentState::default(),
            name: ComponentName::new("db").expect("valid"),
            kind: ComponentKind::SystemdUnit {
                unit: "postgresql.service".into(),
            },
            stateful: true,
            volumes: vec![Volume {
                name: "data".into(),
                path: path.into(),
            }],
        };
        let app = |c: Component| AppInventory {
            name: AppName::new("shop").expect("valid"),
            team: TeamName::new("web").expect("valid"),
            components: vec![c],
        };
        assert!(app(comp("/var/lib/postgresql")).validate().is_ok());
        for bad in ["relative/dir", "/var/../etc", ""] {
            let err = app(comp(bad)).validate().expect_err(bad);
            assert!(err.to_string().contains("app shop of team web"), "{err}");
        }
        let mut twice = app(comp("/a"));
        twice.components.push(comp("/b"));
        assert!(twice.validate().is_err());
    }
}
