//! Snapshot manifests (`snapshots/<id>`): the commit point of a backup.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::format::{BlobId, SnapshotId};

/// The manifest format this build writes and reads (and every older one).
pub const SNAPSHOT_VERSION: u32 = 1;

/// A snapshot manifest, stored encrypted as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub version: u32,
    /// RFC 3339 UTC time of the backup start.
    pub time: String,
    /// Unix seconds of the backup start.
    pub time_unix: i64,
    pub host: String,
    /// The backed-up path, as given.
    pub path: String,
    pub tags: BTreeMap<String, String>,
    pub parent: Option<SnapshotId>,
    /// The root tree: the entries of the backed-up directory.
    pub tree: BlobId,
    /// The backed-up directory's own owner, mode, times and extended
    /// attributes (its name is empty), applied to the target of a whole
    /// restore. Absent in snapshots of older builds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<super::tree::Node>,
    pub summary: BackupSummary,
}

/// Figures of one backup run; also printed by `snapshot create`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupSummary {
    pub files: u64,
    pub dirs: u64,
    pub files_unchanged: u64,
    pub bytes_read: u64,
    /// Bytes of files in the snapshot (sum of sizes).
    pub bytes_total: u64,
    /// Plaintext bytes of blobs that were new to the repository.
    pub bytes_new: u64,
    /// Bytes of packs written (after compression and encryption).
    pub bytes_stored: u64,
    pub blobs_new: u64,
    pub packs_written: u64,
    pub duration_ms: u64,
}

impl Snapshot {
    /// Whether this snapshot matches every `key=value` in `tags`.
    pub fn has_tags(&self, tags: &BTreeMap<String, String>) -> bool {
        tags.iter().all(|(k, v)| self.tags.get(k) == Some(v))
    }
}
