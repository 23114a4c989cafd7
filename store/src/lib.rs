//! Object storage behind one trait: a local directory or an S3-compatible
//! bucket. Objects are written once and never modified; every
//! implementation makes a `put` all-or-nothing (a reader sees the whole
//! object or no object).

use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

pub mod local;
pub mod location;
pub mod memory;
pub mod retry;
pub mod s3;

#[cfg(any(test, feature = "testsuite"))]
pub mod conformance;
#[cfg(any(test, feature = "testsuite"))]
pub mod faulty;
#[cfg(any(test, feature = "testsuite"))]
pub mod testing;

#[cfg(any(test, feature = "testsuite"))]
pub use faulty::FaultyStore;
pub use local::LocalStore;
pub use location::{LocationError, S3Config, Secret, StorageConfig};
pub use memory::MemoryStore;
pub use retry::{RetryPolicy, Retrying};
pub use s3::S3Store;

/// The key of an object inside a storage location, `/`-separated and
/// relative (`data/3f/3fa2…`, `snapshots/…`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey(String);

impl ObjectKey {
    /// Builds a key, refusing anything that could escape the location:
    /// empty, absolute, `.`/`..` segments, empty segments or backslashes.
    pub fn new(key: impl Into<String>) -> Result<Self, StoreError> {
        let key = key.into();
        let valid = !key.is_empty()
            && !key.starts_with('/')
            && !key.contains('\\')
            && !key.contains('\0')
            && key
                .split('/')
                .all(|s| !s.is_empty() && s != "." && s != "..");
        if valid {
            Ok(Self(key))
        } else {
            Err(StoreError::InvalidKey { key })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks a listing prefix: every complete segment (before the last `/`)
/// must be a valid key segment; the trailing partial segment may be empty
/// or any text without `\\` and NUL.
pub fn validate_prefix(prefix: &str) -> Result<(), StoreError> {
    let invalid = || StoreError::InvalidKey {
        key: prefix.to_owned(),
    };
    if prefix.contains('\\') || prefix.contains('\0') {
        return Err(invalid());
    }
    if let Some(i) = prefix.rfind('/') {
        ObjectKey::new(&prefix[..i]).map_err(|_| invalid())?;
    }
    Ok(())
}

/// One entry of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: ObjectKey,
    pub size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("object {key} not found")]
    NotFound { key: ObjectKey },
    #[error("invalid object key {key:?}")]
    InvalidKey { key: String },
    /// A retry may help (timeouts, 5xx, throttling, connection resets).
    #[error("storage operation {op} on {key} failed, a retry may help: {source}")]
    Transient {
        op: &'static str,
        key: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Transient failures went on until the retry deadline.
    #[error("{last} (gave up after {attempts} attempts in {elapsed_s} s)")]
    GaveUp {
        attempts: u32,
        elapsed_s: u64,
        last: Box<StoreError>,
    },
    /// A retry will not help (access denied, no such bucket, disk full …).
    #[error("storage operation {op} on {key} failed: {source}")]
    Permanent {
        op: &'static str,
        key: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl StoreError {
    /// Whether a later retry may help. An operation that ran out of retries
    /// stays transient: the job that ran it may try again later.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Transient { .. } | StoreError::GaveUp { .. }
        )
    }

    /// This error, after `attempts` tries over `elapsed`.
    pub fn gave_up(self, attempts: u32, elapsed: std::time::Duration) -> Self {
        StoreError::GaveUp {
            attempts,
            elapsed_s: elapsed.as_secs(),
            last: Box::new(self),
        }
    }
}

/// What a storage location can do. Implementations: [`local`] (a
/// directory), [`s3`] (any S3-compatible endpoint), and the fault-injecting
/// wrapper used by tests.
#[async_trait]
pub trait ObjectStore: Send + Sync + std::fmt::Debug {
    /// Stores `data` under `key`, all-or-nothing. Writing a key that exists
    /// replaces it with identical content in Ferry's usage (objects are
    /// content-addressed), so implementations need not detect it.
    async fn put(&self, key: &ObjectKey, data: Bytes) -> Result<(), StoreError>;

    /// Reads a whole object.
    async fn get(&self, key: &ObjectKey) -> Result<Bytes, StoreError>;

    /// Reads `range` (byte offsets, end exclusive) of an object.
    async fn get_range(&self, key: &ObjectKey, range: Range<u64>) -> Result<Bytes, StoreError>;

    /// The size of an object, or `None` when it does not exist.
    async fn size(&self, key: &ObjectKey) -> Result<Option<u64>, StoreError>;

    /// Every object whose key starts with `prefix` (e.g. `"snapshots/"`),
    /// in no particular order.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError>;

    /// Deletes an object; deleting a missing object is not an error.
    async fn delete(&self, key: &ObjectKey) -> Result<(), StoreError>;
}

/// Opens the store a config names, with the one retry policy applied. For
/// S3 this builds a client (loading the
/// standard credential chain when the config has no credentials); it does
/// not contact the server.
pub async fn open(config: &StorageConfig) -> Result<Arc<dyn ObjectStore>, StoreError> {
    match config {
        StorageConfig::Local { path } => {
            if !path.is_absolute() {
                return Err(StoreError::Permanent {
                    op: "open",
                    key: config.to_string(),
                    source: Box::new(location::LocationError::RelativePath {
                        path: path.display().to_string(),
                    }),
                });
            }
            Ok(Arc::new(Retrying::new(
                Arc::new(LocalStore::new(path)),
                RetryPolicy::default(),
            )))
        }
        StorageConfig::S3(s3) => Ok(Arc::new(Retrying::new(
            Arc::new(S3Store::new(s3).await?),
            s3.tuning.retry,
        ))),
    }
}
