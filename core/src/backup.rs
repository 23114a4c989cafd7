//! What an application backup is: its [`AppManifest`], written into the
//! repository last (the commit point) and mirrored by the controller's
//! catalog, which can be rebuilt from the manifests.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::model::{App, HostPath};
use crate::name::{
    BackupId, ClusterName, ComponentName, JobId, LocationName, NodeName, VolumeName,
};

/// The manifest format this build writes, and the newest it reads.
pub const MANIFEST_FORMAT: u32 = 1;

/// How a backup treats stateful components that run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupMode {
    /// Stop them for the final delta, then start them again.
    #[default]
    Cold,
    /// Refuse while one runs; nothing is stopped.
    Refuse,
    /// Copy while they run, between their pre/post hook commands.
    Hot,
}

impl BackupMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cold => "cold",
            Self::Refuse => "refuse",
            Self::Hot => "hot",
        }
    }
}

impl fmt::Display for BackupMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BackupMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cold" => Ok(Self::Cold),
            "refuse" => Ok(Self::Refuse),
            "hot" => Ok(Self::Hot),
            other => Err(format!(
                "backup mode {other:?} is not one of cold, refuse, hot"
            )),
        }
    }
}

/// One volume of the backup: the snapshot that holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSnapshot {
    pub volume: VolumeName,
    /// Where the volume was on the source.
    pub path: HostPath,
    /// The snapshot id, 64 hex characters.
    pub snapshot: String,
    pub files: u64,
    /// Bytes of the files in the snapshot.
    pub bytes: u64,
}

/// The images an app's containers run, exported as one archive the engine
/// loads (`docker save` format) and stored as a snapshot of its own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImagesSnapshot {
    /// The snapshot id, 64 hex characters.
    pub snapshot: String,
    /// What was exported: image references (`name:tag`) where they still
    /// name the containers' images, else image ids.
    pub images: Vec<String>,
    /// Size of the archive.
    pub bytes: u64,
    /// Of it, bytes new to the repository (an archive of the same images
    /// costs next to nothing the second time).
    pub bytes_new: u64,
}

/// Figures of one backup.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupTimings {
    /// Copying every volume while the app ran (cold mode), or the only
    /// copy (refuse and hot modes).
    pub pre_copy_ms: u64,
    /// Copying what changed since the pre-copy, with the app stopped.
    pub delta_ms: u64,
    /// From the first stop until every stopped component ran again; 0 when
    /// nothing was stopped.
    pub downtime_ms: u64,
    /// The whole backup.
    pub total_ms: u64,
    /// Plaintext bytes that were new to the repository.
    pub bytes_new: u64,
    /// Bytes read from the volumes in the delta pass.
    pub delta_bytes_read: u64,
}

/// An application backup, as written into the repository.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppManifest {
    pub format: u32,
    pub backup: BackupId,
    /// The job that took it.
    pub job: JobId,
    pub storage: LocationName,
    pub ferry_version: String,
    pub cluster: ClusterName,
    pub node: NodeName,
    /// The app's definition as the driver captured it.
    pub app: App,
    pub mode: BackupMode,
    /// Components Ferry stopped and started again, in stop order.
    #[serde(default)]
    pub stopped: Vec<ComponentName>,
    pub volumes: Vec<VolumeSnapshot>,
    /// The containers' images; none for apps that have none (host apps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images: Option<ImagesSnapshot>,
    /// What the stops and starts had to say beyond "done as asked" (a
    /// container the engine killed at its stop timeout; one whose health
    /// was never known).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remarks: Vec<String>,
    pub started_at: Timestamp,
    pub finished_at: Timestamp,
    pub timings: BackupTimings,
}

impl AppManifest {
    /// Every snapshot the backup is made of: its volumes', its images'.
    pub fn snapshots(&self) -> Vec<String> {
        self.volumes
            .iter()
            .map(|v| v.snapshot.clone())
            .chain(self.images.iter().map(|i| i.snapshot.clone()))
            .collect()
    }

    /// The manifest's name in the repository (`apps/<name>`).
    pub fn object_name(backup: BackupId) -> String {
        backup.to_string()
    }

    /// Parses a manifest, refusing newer formats and inconsistent content.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        #[derive(Deserialize)]
        struct Format {
            format: u32,
        }
        let f: Format = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if f.format > MANIFEST_FORMAT || f.format == 0 {
            return Err(format!(
                "manifest format {} is not supported by this Ferry (reads 1 to {MANIFEST_FORMAT}); upgrade Ferry",
                f.format
            ));
        }
        let m: Self = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        m.validate()?;
        Ok(m)
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("invariant: a manifest serialises")
    }

    /// Every volume names a volume of the app, once, with a snapshot id.
    pub fn validate(&self) -> Result<(), String> {
        self.app.validate().map_err(|e| e.to_string())?;
        let mut seen = std::collections::BTreeSet::new();
        for v in &self.volumes {
            if self.app.volume(&v.volume).is_none() {
                return Err(format!("volume {} is not a volume of the app", v.volume));
            }
            if !seen.insert(&v.volume) {
                return Err(format!("volume {} is listed twice", v.volume));
            }
            if v.snapshot.len() != 64 || !v.snapshot.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("volume {} has no valid snapshot id", v.volume));
            }
        }
        for c in &self.stopped {
            if self.app.component(c).is_none() {
                return Err(format!(
                    "stopped component {c} is not a component of the app"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Argv, Component, ComponentKind, ComponentState, HostComponent, Volume};

    fn manifest() -> AppManifest {
        let argv = |s: &str| Argv::new(vec![s.to_owned()]).expect("argv");
        AppManifest {
            format: MANIFEST_FORMAT,
            backup: BackupId::new(3).expect("id"),
            job: JobId::new(9).expect("id"),
            storage: "s3-main".parse().expect("location"),
            ferry_version: "0.1.0".into(),
            cluster: "a".parse().expect("cluster"),
            node: "n1".parse().expect("node"),
            app: App {
                name: "shop".parse().expect("app"),
                team: "web".parse().expect("team"),
                components: vec![Component {
                    name: "db".parse().expect("component"),
                    kind: ComponentKind::Host(HostComponent::Commands {
                        start: argv("start"),
                        stop: argv("stop"),
                        status: None,
                    }),
                    stateful: true,
                    volumes: vec!["/srv/db".parse().expect("volume")],
                    depends_on: vec![],
                    state: ComponentState::Running,
                    hooks: Default::default(),
                }],
                volumes: vec![Volume {
                    name: "/srv/db".parse().expect("volume"),
                    path: HostPath::new("/srv/db").expect("path"),
                }],
            },
            mode: BackupMode::Cold,
            stopped: vec!["db".parse().expect("component")],
            volumes: vec![VolumeSnapshot {
                volume: "/srv/db".parse().expect("volume"),
                path: HostPath::new("/srv/db").expect("path"),
                snapshot: "ab".repeat(32),
                files: 3,
                bytes: 10,
            }],
            images: None,
            remarks: Vec::new(),
            started_at: Timestamp::from_unix_millis(1),
            finished_at: Timestamp::from_unix_millis(2),
            timings: BackupTimings::default(),
        }
    }

    #[test]
    fn a_manifest_round_trips_and_bad_ones_are_refused() {
        let m = manifest();
        assert_eq!(AppManifest::parse(&m.to_json()).expect("parse"), m);

        let mut newer = serde_json::to_value(&m).expect("value");
        newer["format"] = 2.into();
        let err =
            AppManifest::parse(&serde_json::to_vec(&newer).expect("json")).expect_err("newer");
        assert!(err.contains("upgrade Ferry"), "{err}");

        let mut bad = m.clone();
        bad.volumes[0].volume = "/elsewhere".parse().expect("volume");
        assert!(
            AppManifest::parse(&bad.to_json())
                .expect_err("unknown")
                .contains("not a volume")
        );
        let mut bad = m.clone();
        bad.volumes[0].snapshot = "xyz".into();
        assert!(AppManifest::parse(&bad.to_json()).is_err());
        let mut bad = m;
        bad.stopped = vec!["web".parse().expect("component")];
        assert!(AppManifest::parse(&bad.to_json()).is_err());
        assert!(AppManifest::parse(b"not json").is_err());
    }

    #[test]
    fn modes_parse_and_print() {
        for m in [BackupMode::Cold, BackupMode::Refuse, BackupMode::Hot] {
            assert_eq!(m.as_str().parse::<BackupMode>(), Ok(m));
        }
        assert!("warm".parse::<BackupMode>().is_err());
    }
}
