//! The catalog layer's error type.

use std::path::PathBuf;

use ferry_core::{CodedError, ErrorCode, NameError};

use super::name::{AgentId, AppName, ClusterName, LocationName, NodeName, TeamName};
use super::record::Timestamp;

/// Everything a catalog operation can fail with.
///
/// Its [`CodedError`] code tells callers what kind of failure it is and
/// whether retrying the same call later can help (I/O trouble) or not (bad
/// input, missing objects, a used token, a database held by another
/// process).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CatalogError {
    #[error(transparent)]
    InvalidName(#[from] NameError),
    #[error("invalid {what}: {reason}")]
    InvalidRecord { what: String, reason: String },
    #[error("cluster {cluster} not found")]
    ClusterNotFound { cluster: ClusterName },
    #[error("agent {agent} not found")]
    AgentNotFound { agent: AgentId },
    #[error("agent {agent} is already enrolled as node {node} of cluster {cluster}")]
    AgentConflict {
        agent: AgentId,
        cluster: ClusterName,
        node: NodeName,
    },
    #[error("storage location {name} already exists")]
    StorageExists { name: LocationName },
    #[error("storage location {name} not found")]
    StorageNotFound { name: LocationName },
    #[error("join token {hash} is unknown")]
    TokenUnknown { hash: String },
    #[error("join token {hash} already exists")]
    TokenExists { hash: String },
    #[error("join token {hash} expired at {expired_at}")]
    TokenExpired { hash: String, expired_at: Timestamp },
    #[error("join token {hash} was already used by node {node} at {at}")]
    TokenUsed {
        hash: String,
        node: NodeName,
        at: Timestamp,
    },
    #[error(
        "app {app} of team {team} in cluster {cluster} is reported by node {owner}, not by node {node}"
    )]
    AppOwnedElsewhere {
        cluster: ClusterName,
        team: TeamName,
        app: AppName,
        owner: NodeName,
        node: NodeName,
    },
    #[error("cannot make the catalog at {} private to its owner: {source}", path.display())]
    Access {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("catalog at {} is in use by another process", path.display())]
    InUse { path: PathBuf },
    #[error(
        "catalog engine {engine} is not built into this binary (build with cargo feature {engine})"
    )]
    EngineNotBuilt { engine: &'static str },
    #[error("unknown catalog engine {name:?} (expected redb or sled)")]
    UnknownEngine { name: String },
    #[error("catalog at {} has format {found}, this build reads up to {supported}", path.display())]
    UnsupportedFormat {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("{table} record {key} has format version {found}, this build reads up to {supported}")]
    UnsupportedVersion {
        table: &'static str,
        key: String,
        found: u32,
        supported: u32,
    },
    #[error("{table} record {key} is corrupt: {reason}")]
    Corrupt {
        table: &'static str,
        key: String,
        reason: String,
    },
    #[error("cannot encode {table} record: {reason}")]
    Encode { table: &'static str, reason: String },
    #[error("catalog storage failed during {op}")]
    Storage {
        op: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("catalog storage is damaged ({op}): {reason}")]
    Damaged { op: &'static str, reason: String },
    #[error("catalog task for {op} did not finish: {reason}")]
    Task { op: &'static str, reason: String },
}

impl CodedError for CatalogError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidName(_) | Self::InvalidRecord { .. } | Self::UnknownEngine { .. } => {
                ErrorCode::InvalidArgument
            }
            Self::ClusterNotFound { .. }
            | Self::AgentNotFound { .. }
            | Self::StorageNotFound { .. } => ErrorCode::NotFound,
            Self::StorageExists { .. } => ErrorCode::AlreadyExists,
            Self::TokenUnknown { .. } | Self::TokenExpired { .. } | Self::TokenUsed { .. } => {
                ErrorCode::Unauthenticated
            }
            Self::AgentConflict { .. }
            | Self::AppOwnedElsewhere { .. }
            | Self::TokenExists { .. }
            | Self::InUse { .. }
            | Self::EngineNotBuilt { .. } => ErrorCode::FailedPrecondition,
            Self::Storage { .. } | Self::Task { .. } => ErrorCode::Unavailable,
            Self::UnsupportedFormat { .. }
            | Self::UnsupportedVersion { .. }
            | Self::Corrupt { .. }
            | Self::Encode { .. }
            | Self::Damaged { .. }
            | Self::Access { .. } => ErrorCode::Internal,
        }
    }
}

impl CatalogError {
    /// True when the error says the named object does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            Self::ClusterNotFound { .. } | Self::AgentNotFound { .. } | Self::TokenUnknown { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_storage_trouble_is_worth_a_retry() {
        let storage = CatalogError::Storage {
            op: "put",
            source: "disk full".into(),
        };
        assert_eq!(storage.code(), ErrorCode::Unavailable);
        assert!(storage.is_transient());
        let used = CatalogError::TokenUnknown { hash: "ab".into() };
        assert_eq!(used.code(), ErrorCode::Unauthenticated);
        assert!(!used.is_transient());
        let corrupt = CatalogError::Corrupt {
            table: "apps",
            key: "k".into(),
            reason: "bad".into(),
        };
        assert_eq!(corrupt.code(), ErrorCode::Internal);
        assert!(!corrupt.is_transient());
    }
}
