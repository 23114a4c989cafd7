//! Catalog records and their versioned on-disk envelope.
//!
//! Every value is stored as JSON `{"v": N, "record": {...}}`, where `N` is
//! the version of that record type ([`Record::VERSION`]). Readers check `v`
//! before decoding the record: a record written by a newer Ferry is refused
//! with a clear error instead of being misread, and an older one is read
//! through its type's [`Record::upgrade`].

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use ferry_core::{App, Timestamp};
use ferry_core::{AppManifest, BackupId, JobId};

use super::CatalogError;
use super::name::{AgentId, ClusterName, LocationName, NodeName, TeamName, TokenHash};

/// A value stored in a catalog table.
pub(crate) trait Record: Serialize + DeserializeOwned {
    /// The version this build writes, and the newest it reads.
    const VERSION: u32 = 1;

    /// Reads `record` written in an older version `found` (1 ≤ found <
    /// VERSION). Types that never changed keep the default, never called.
    fn upgrade(found: u32, record: serde_json::Value) -> Result<Self, String> {
        drop(record);
        Err(format!("no reader for format version {found}"))
    }
}

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
    /// The drivers whose apps the agent restores copies of, as it said at
    /// its last hello (empty: an agent older than that, which restores
    /// host apps).
    #[serde(default)]
    pub restores: Vec<String>,
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

/// An application as the catalog holds it: the app model as its agent
/// reported it, plus where and when.
///
/// Version 2. Version 1 (before ferry-core) kept `name`, `team` and
/// `components` at the top level, a tagged component `kind`
/// (`systemd_unit`, `commands`, `container`) and volumes inside each
/// component; it is still read (see [`legacy`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppRecord {
    pub cluster: ClusterName,
    /// The node whose agent reported this app.
    pub node: NodeName,
    pub reported_at: Timestamp,
    pub app: App,
}

impl Record for AppRecord {
    const VERSION: u32 = 2;

    fn upgrade(found: u32, record: serde_json::Value) -> Result<Self, String> {
        match found {
            1 => serde_json::from_value::<legacy::AppRecordV1>(record)
                .map_err(|e| e.to_string())?
                .upgrade(),
            other => Err(format!("no reader for format version {other}")),
        }
    }
}

/// Where a storage location keeps its repository, and who can reach it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum StorageKind {
    /// A directory on the hosts of one cluster: its backups restore in
    /// that cluster only (into any team).
    Local { cluster: ClusterName, path: String },
    /// A directory every cluster mounts (NFS, …).
    Shared { path: String },
    /// An S3-compatible bucket, reachable from every cluster.
    S3 {
        endpoint: String,
        bucket: String,
        #[serde(default)]
        prefix: String,
        #[serde(default)]
        region: String,
    },
}

impl StorageKind {
    /// `local`, `shared` or `s3`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Local { .. } => "local",
            Self::Shared { .. } => "shared",
            Self::S3 { .. } => "s3",
        }
    }

    /// Whether an agent of `cluster` can reach the location.
    pub fn reachable_from(&self, cluster: &ClusterName) -> bool {
        match self {
            Self::Local { cluster: c, .. } => c == cluster,
            Self::Shared { .. } | Self::S3 { .. } => true,
        }
    }
}

/// A storage location. Its secrets (the repository password, S3
/// credentials) are sealed under the controller's seal key
/// ([`crate::seal`]), bound to the location's name: the record alone
/// reveals none of them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageRecord {
    pub name: LocationName,
    pub kind: StorageKind,
    /// Hex of the sealed secrets.
    pub sealed: String,
    /// The repository's id once it has been created.
    #[serde(default)]
    pub repository_id: Option<String>,
    pub created_at: Timestamp,
}

/// A job: what it is about and its state machine, owned by the job engine
/// and stored here as it is (JSON), so the catalog need not know it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: JobId,
    /// "backup", "restore", "migrate", "delete-backup", "verify".
    pub kind: String,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    /// Ended (succeeded, failed or cancelled).
    pub done: bool,
    pub state: serde_json::Value,
}

/// A backup: its app manifest, as written into its location's
/// repository (which can rebuild this record).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupRecord {
    pub manifest: AppManifest,
    pub recorded_at: Timestamp,
}

impl BackupRecord {
    pub fn id(&self) -> BackupId {
        self.manifest.backup
    }
}

impl Record for JobRecord {}
impl Record for BackupRecord {}
impl Record for ClusterRecord {}
impl Record for StorageRecord {}
impl Record for TeamRecord {}
impl Record for AgentRecord {}
impl Record for TokenRecord {}

/// Which apps `list_apps` returns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppFilter {
    pub cluster: Option<ClusterName>,
    pub team: Option<TeamName>,
}

impl AppFilter {
    pub(crate) fn matches(&self, rec: &AppRecord) -> bool {
        self.cluster.as_ref().is_none_or(|c| *c == rec.cluster)
            && self.team.as_ref().is_none_or(|t| *t == rec.app.team)
    }
}

/// Version 1 of the app record, read and upgraded, never written.
mod legacy {
    use ferry_core::{
        AppName, Argv, Component, ComponentKind, ComponentName, ComponentState, HostComponent,
        HostPath, TeamName, UnitName, Volume, VolumeName,
    };
    use serde::Deserialize;

    use super::{App, AppRecord, ClusterName, NodeName, Timestamp};

    #[derive(Deserialize)]
    pub(super) struct AppRecordV1 {
        name: AppName,
        team: TeamName,
        cluster: ClusterName,
        node: NodeName,
        components: Vec<ComponentV1>,
        reported_at: Timestamp,
    }

    #[derive(Deserialize)]
    struct ComponentV1 {
        name: ComponentName,
        kind: KindV1,
        stateful: bool,
        volumes: Vec<VolumeV1>,
        #[serde(default)]
        state: ComponentState,
    }

    #[derive(Deserialize)]
    #[serde(tag = "type", rename_all = "snake_case")]
    enum KindV1 {
        SystemdUnit {
            unit: String,
        },
        Commands {
            start: Vec<String>,
            stop: Vec<String>,
        },
        Container {
            container: String,
        },
    }

    #[derive(Deserialize)]
    struct VolumeV1 {
        name: String,
        path: String,
    }

    impl AppRecordV1 {
        /// The same app in the model: volumes move up to the app (one per
        /// name), components refer to them by name.
        pub(super) fn upgrade(self) -> Result<AppRecord, String> {
            let mut volumes: Vec<Volume> = Vec::new();
            let mut components = Vec::with_capacity(self.components.len());
            for c in self.components {
                let what = |e: &dyn std::fmt::Display| format!("component {}: {e}", c.name);
                let kind = match c.kind {
                    KindV1::SystemdUnit { unit } => HostComponent::Systemd {
                        unit: UnitName::new(unit).map_err(|e| what(&e))?,
                    },
                    KindV1::Commands { start, stop } => HostComponent::Commands {
                        start: Argv::new(start).map_err(|e| what(&e))?,
                        stop: Argv::new(stop).map_err(|e| what(&e))?,
                        status: None,
                    },
                    KindV1::Container { container } => {
                        return Err(what(&format!(
                            "container {container:?} cannot be read by this build (no container driver)"
                        )));
                    }
                };
                let mut names = Vec::with_capacity(c.volumes.len());
                for v in c.volumes {
                    let name = VolumeName::new(v.name).map_err(|e| what(&e))?;
                    let path = HostPath::new(v.path).map_err(|e| what(&e))?;
                    match volumes.iter().find(|known| known.name == name) {
                        Some(known) if known.path != path => {
                            return Err(what(&format!(
                                "volume {name} has two paths, {} and {path}",
                                known.path
                            )));
                        }
                        Some(_) => {}
                        None => volumes.push(Volume {
                            name: name.clone(),
                            path,
                        }),
                    }
                    if !names.contains(&name) {
                        names.push(name);
                    }
                }
                components.push(Component {
                    name: c.name,
                    kind: ComponentKind::Host(kind),
                    stateful: c.stateful,
                    volumes: names,
                    depends_on: Vec::new(),
                    state: c.state,
                    hooks: Default::default(),
                });
            }
            let app = App {
                name: self.name,
                team: self.team,
                components,
                volumes,
            };
            app.validate().map_err(|e| e.to_string())?;
            Ok(AppRecord {
                cluster: self.cluster,
                node: self.node,
                reported_at: self.reported_at,
                app,
            })
        }
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

/// Encodes a record in its type's current envelope.
pub(crate) fn encode<T: Record>(table: &'static str, record: &T) -> Result<Vec<u8>, CatalogError> {
    serde_json::to_vec(&EnvelopeOut {
        v: T::VERSION,
        record,
    })
    .map_err(|e| CatalogError::Encode {
        table,
        reason: e.to_string(),
    })
}

/// Decodes a record, upgrading older versions and refusing newer ones.
pub(crate) fn decode<T: Record>(
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
    if probe.v == 0 || probe.v > T::VERSION {
        return Err(CatalogError::UnsupportedVersion {
            table,
            key: key.to_owned(),
            found: probe.v,
            supported: T::VERSION,
        });
    }
    if probe.v == T::VERSION {
        let env: EnvelopeIn<T> =
            serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
        return Ok(env.record);
    }
    let env: EnvelopeIn<serde_json::Value> =
        serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    T::upgrade(probe.v, env.record)
        .map_err(|reason| corrupt(format!("format version {}: {reason}", probe.v)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::{
        Argv, CodedError, Component, ComponentKind, ComponentState, HostComponent, HostPath,
        UnitName, Volume,
    };

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
        let err = decode::<AppRecord>("apps", "k", br#"{"v":3,"record":{}}"#).expect_err("v3");
        assert!(matches!(
            err,
            CatalogError::UnsupportedVersion {
                found: 3,
                supported: 2,
                ..
            }
        ));
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

    fn app_record() -> AppRecord {
        AppRecord {
            cluster: ClusterName::new("prod").expect("valid"),
            node: NodeName::new("node-1").expect("valid"),
            reported_at: Timestamp::from_unix_millis(1_700_000_000_000),
            app: App {
                name: "shop".parse().expect("valid"),
                team: "web".parse().expect("valid"),
                volumes: vec![Volume {
                    name: "/var/lib/pg".parse().expect("valid"),
                    path: HostPath::new("/var/lib/pg").expect("valid"),
                }],
                components: vec![
                    Component {
                        name: "db".parse().expect("valid"),
                        kind: ComponentKind::Host(HostComponent::Systemd {
                            unit: UnitName::new("postgresql.service").expect("valid"),
                        }),
                        stateful: true,
                        volumes: vec!["/var/lib/pg".parse().expect("valid")],
                        depends_on: vec![],
                        state: ComponentState::Running,
                        hooks: Default::default(),
                    },
                    Component {
                        name: "web".parse().expect("valid"),
                        kind: ComponentKind::Host(HostComponent::Commands {
                            start: Argv::new(vec!["/bin/web".into()]).expect("valid"),
                            stop: Argv::new(vec!["pkill".into(), "web".into()]).expect("valid"),
                            status: None,
                        }),
                        stateful: false,
                        volumes: vec![],
                        depends_on: vec![],
                        state: ComponentState::Unknown,
                        hooks: Default::default(),
                    },
                ],
            },
        }
    }

    /// An app record exactly as Ferry wrote it before ferry-core (version 1).
    const APP_V1: &str = r#"{"v":1,"record":{"name":"shop","team":"web","cluster":"prod","node":"node-1","components":[{"name":"db","kind":{"type":"systemd_unit","unit":"postgresql.service"},"stateful":true,"volumes":[{"name":"/var/lib/pg","path":"/var/lib/pg"}],"state":"running"},{"name":"web","kind":{"type":"commands","start":["/bin/web"],"stop":["pkill","web"]},"stateful":false,"volumes":[]}],"reported_at":1700000000000}}"#;

    #[test]
    fn app_records_of_version_1_are_read_as_the_model() {
        let rec: AppRecord = decode("apps", "prod/web/shop", APP_V1.as_bytes()).expect("v1 reads");
        assert_eq!(rec, app_record());
        // Written back, it is version 2.
        let bytes = encode("apps", &rec).expect("encode");
        assert!(bytes.starts_with(b"{\"v\":2,"));
        assert_eq!(decode::<AppRecord>("apps", "k", &bytes).expect("v2"), rec);
    }

    #[test]
    fn version_1_volumes_shared_by_components_become_one_app_volume() {
        let text = APP_V1.replace(
            r#""stateful":false,"volumes":[]"#,
            r#""stateful":false,"volumes":[{"name":"/var/lib/pg","path":"/var/lib/pg"}]"#,
        );
        let rec: AppRecord = decode("apps", "k", text.as_bytes()).expect("v1 reads");
        assert_eq!(rec.app.volumes.len(), 1);
        assert_eq!(rec.app.components[1].volumes.len(), 1);
    }

    #[test]
    fn unreadable_version_1_app_records_are_corrupt_and_named() {
        let container = APP_V1.replace(
            r#"{"type":"systemd_unit","unit":"postgresql.service"}"#,
            r#"{"type":"container","container":"shop_db_1"}"#,
        );
        let bad_path = APP_V1.replace(r#""path":"/var/lib/pg""#, r#""path":"relative""#);
        for (text, needle) in [
            (container, "container \"shop_db_1\" cannot be read"),
            (bad_path, "invalid volume path \"relative\""),
        ] {
            let err =
                decode::<AppRecord>("apps", "prod/web/shop", text.as_bytes()).expect_err(needle);
            assert!(matches!(err, CatalogError::Corrupt { .. }), "{err}");
            let msg = err.to_string();
            assert!(msg.contains("apps record prod/web/shop"), "{msg}");
            assert!(msg.contains("component db"), "{msg}");
            assert!(msg.contains(needle), "{msg}");
        }
    }

    #[test]
    fn app_record_version_2_shape_is_pinned() {
        // The on-disk shape; changing it needs version 3 and an upgrade.
        let json: serde_json::Value =
            serde_json::from_slice(&encode("apps", &app_record()).expect("encode")).expect("json");
        let expected = serde_json::json!({"v": 2, "record": {
            "cluster": "prod", "node": "node-1", "reported_at": 1_700_000_000_000_i64,
            "app": {
                "name": "shop", "team": "web",
                "components": [
                    {"name": "db", "kind": {"host": {"systemd": {"unit": "postgresql.service"}}},
                     "stateful": true, "volumes": ["/var/lib/pg"], "depends_on": [], "state": "running"},
                    {"name": "web", "kind": {"host": {"commands": {"start": ["/bin/web"], "stop": ["pkill", "web"], "status": null}}},
                     "stateful": false, "volumes": [], "depends_on": [], "state": "unknown"}
                ],
                "volumes": [{"name": "/var/lib/pg", "path": "/var/lib/pg"}]
            }
        }});
        assert_eq!(json, expected);
    }
}
