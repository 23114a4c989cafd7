//! The repository: Ferry's data format and the data mover that fills and
//! reads it (chunk → hash → compress → encrypt → pack → upload, and back).
//! The format is described in `docs/repository-format.md`.

pub mod apps;
pub mod backup;
pub mod chunker;
pub mod clock;
pub mod crypto;
pub mod format;
pub mod index;
pub mod lock;
pub mod pack;
pub mod progress;
pub mod prune;
pub mod repair;
pub mod restore;
pub mod snapshot;
pub mod tree;
pub mod verify;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crypto::{CryptoError, KdfParams, KeyFile, MasterKey};
use ferry_store::{ObjectKey, ObjectStore, StoreError};
use format::{
    BlobId, CONFIG_KEY, ChunkerParams, DATA_PREFIX, FORMAT_VERSION, INDEX_PREFIX, IndexId,
    KEYS_PREFIX, KeyId, PackId, RepoConfig, SNAPSHOTS_PREFIX, SnapshotId, content_hash,
    id_from_key,
};
use index::{Index, IndexFile, IndexedPack};
use pack::{BlobError, PackEntry};
use snapshot::Snapshot;
use tree::Tree;

pub use clock::Clock;
pub use lock::{LockGuard, LockTiming};

/// Errors of the repository layer.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("wrong password: no key file in the repository opens with it")]
    WrongPassword,
    #[error("no repository at this location: object config is missing")]
    NotARepository,
    #[error("a repository already exists at this location")]
    AlreadyInitialized,
    #[error(
        "repository format version {found} is not supported (this build reads version {FORMAT_VERSION})"
    )]
    UnsupportedVersion { found: u32 },
    #[error("{object} is corrupted: {reason}")]
    Corrupt { object: String, reason: String },
    #[error("blob {blob} is not in any index{}", context_suffix(.context))]
    MissingBlob { blob: BlobId, context: String },
    #[error("pack {pack} holding blob {blob} cannot be read: {source}")]
    PackRead {
        pack: PackId,
        blob: BlobId,
        #[source]
        source: Box<StoreError>,
    },
    #[error("pack {pack}: {source}")]
    Blob {
        pack: PackId,
        #[source]
        source: Box<BlobError>,
    },
    #[error(
        "snapshot {id} has format version {found}, newer than this build reads ({}); upgrade Ferry to read it",
        snapshot::SNAPSHOT_VERSION
    )]
    UnsupportedSnapshot { id: String, found: u32 },
    #[error("snapshot {id} not found")]
    SnapshotNotFound { id: String },
    #[error("snapshot id prefix {prefix} is ambiguous")]
    AmbiguousSnapshot { prefix: String },
    #[error("key {id} not found")]
    KeyNotFound { id: String },
    #[error("{0}")]
    InvalidInput(String),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot restore {files}: {source}")]
    FileData {
        files: String,
        #[source]
        source: Box<RepoError>,
    },
    #[error("{path} is of a file type Ferry cannot back up")]
    UnsupportedEntry { path: String },
    #[error("refusing to restore {path}: {reason}")]
    UnsafeEntry { path: String, reason: String },
    #[error("repository is locked by {owner} until {expires_unix} (unix time)")]
    Locked { owner: String, expires_unix: i64 },
    #[error("verification found {count} problem(s); first: {first}")]
    VerifyFailed { count: usize, first: String },
    #[error("background task failed: {0}")]
    Task(String),
    #[error("the operation was cancelled")]
    Cancelled,
    #[error("lost the repository lock {lock}: {reason}")]
    LockLost { lock: String, reason: String },
}

fn context_suffix(c: &str) -> String {
    if c.is_empty() {
        String::new()
    } else {
        format!(" ({c})")
    }
}

impl RepoError {
    /// Whether retrying the operation may help.
    pub fn is_transient(&self) -> bool {
        match self {
            RepoError::Store(e) => e.is_transient(),
            RepoError::PackRead { source, .. } => source.is_transient(),
            RepoError::Locked { .. } | RepoError::LockLost { .. } => true,
            _ => false,
        }
    }

    /// Whether the error comes from bad input (exit code 2 in the CLI).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            RepoError::InvalidInput(_)
                | RepoError::WrongPassword
                | RepoError::NotARepository
                | RepoError::AlreadyInitialized
                | RepoError::SnapshotNotFound { .. }
                | RepoError::AmbiguousSnapshot { .. }
                | RepoError::KeyNotFound { .. }
        )
    }

    pub(crate) fn io(op: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        RepoError::Io {
            op,
            path: path.display().to_string(),
            source,
        }
    }
}

pub(crate) fn object_key(key: &str) -> Result<ObjectKey, RepoError> {
    Ok(ObjectKey::new(key)?)
}

/// The outcome of reading every snapshot manifest.
#[derive(Debug, Default)]
pub struct SnapshotScan {
    /// Oldest first.
    pub snapshots: Vec<(SnapshotId, Snapshot)>,
    pub unreadable: Vec<(SnapshotId, RepoError)>,
}

/// This machine's host name, recorded in snapshots and locks.
pub fn hostname() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

/// An open repository: storage plus the unwrapped master key.
///
/// Every operation stops when the repository's cancellation token is
/// cancelled ([`Repository::with_cancel`]): storage calls and retry waits at
/// once, the backup and restore threads at their next file or blob, and
/// the operation returns [`RepoError::Cancelled`], leaving the repository
/// valid (an interrupted backup leaves only unreferenced packs).
#[derive(Clone, Debug)]
pub struct Repository {
    store: Arc<dyn ObjectStore>,
    key: MasterKey,
    config: RepoConfig,
    key_id: KeyId,
    cancel: CancellationToken,
    clock: Clock,
    locks: LockTiming,
}

const INDEX_AAD: &[u8] = b"ferry index v1";
const SNAPSHOT_AAD: &[u8] = b"ferry snapshot v1";

impl Repository {
    /// Creates a new repository with one key file.
    pub async fn init(
        store: Arc<dyn ObjectStore>,
        password: &[u8],
        label: &str,
    ) -> Result<Self, RepoError> {
        Self::init_with(
            store,
            password,
            label,
            KdfParams::default(),
            ChunkerParams::default(),
            format::DEFAULT_PACK_SIZE,
        )
        .await
    }

    pub async fn init_with(
        store: Arc<dyn ObjectStore>,
        password: &[u8],
        label: &str,
        kdf: KdfParams,
        chunker: ChunkerParams,
        pack_size: u32,
    ) -> Result<Self, RepoError> {
        if store.size(&object_key(CONFIG_KEY)?).await?.is_some() {
            return Err(RepoError::AlreadyInitialized);
        }
        chunker::Chunker::new(chunker, 0).map_err(|e| RepoError::InvalidInput(e.to_string()))?;
        let key = MasterKey::generate();
        let mut rid = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut rid);
        let config = RepoConfig {
            version: FORMAT_VERSION,
            id: hex::encode(rid),
            chunker,
            pack_size: pack_size.max(4096),
            compression_level: format::DEFAULT_COMPRESSION_LEVEL,
        };
        let key_id = write_key_file(&*store, &key, password, label, kdf).await?;
        let cfg = serde_json::to_vec_pretty(&config).expect("invariant: config serialises");
        store
            .put(&object_key(CONFIG_KEY)?, Bytes::from(cfg))
            .await?;
        tracing::info!(repo_id = %config.id, "repository initialised");
        Ok(Self {
            store,
            key,
            config,
            key_id,
            cancel: CancellationToken::new(),
            clock: Clock::System,
            locks: LockTiming::default(),
        })
    }

    /// Opens a repository with a password, trying every key file.
    pub async fn open(store: Arc<dyn ObjectStore>, password: &[u8]) -> Result<Self, RepoError> {
        let cfg_bytes = match store.get(&object_key(CONFIG_KEY)?).await {
            Ok(b) => b,
            Err(StoreError::NotFound { .. }) => return Err(RepoError::NotARepository),
            Err(e) => return Err(e.into()),
        };
        let config: RepoConfig =
            serde_json::from_slice(&cfg_bytes).map_err(|e| RepoError::Corrupt {
                object: CONFIG_KEY.into(),
                reason: e.to_string(),
            })?;
        if config.version != FORMAT_VERSION {
            return Err(RepoError::UnsupportedVersion {
                found: config.version,
            });
        }
        for (id, kf) in list_key_files(&*store).await? {
            let pw = password.to_vec();
            let kf2 = kf.clone();
            let res = tokio::task::spawn_blocking(move || kf2.unwrap_key(&pw))
                .await
                .map_err(|e| RepoError::Task(e.to_string()))?;
            match res {
                Ok(key) => {
                    return Ok(Self {
                        store,
                        key,
                        config,
                        key_id: id,
                        cancel: CancellationToken::new(),
                        clock: Clock::System,
                        locks: LockTiming::default(),
                    });
                }
                Err(CryptoError::Authentication) => continue,
                Err(e) => {
                    tracing::warn!(key = %id, error = %e, "skipping unreadable key file");
                }
            }
        }
        Err(RepoError::WrongPassword)
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// This repository, with operations that stop when `token` is
    /// cancelled.
    pub fn with_cancel(&self, token: CancellationToken) -> Self {
        Self {
            cancel: token,
            ..self.clone()
        }
    }

    /// This repository, reading time from `clock` (locks, snapshot times).
    pub fn with_clock(&self, clock: Clock) -> Self {
        Self {
            clock,
            ..self.clone()
        }
    }

    /// This repository, refreshing its locks with `timing`.
    pub fn with_lock_timing(&self, timing: LockTiming) -> Self {
        Self {
            locks: timing,
            ..self.clone()
        }
    }

    pub fn lock_timing(&self) -> LockTiming {
        self.locks
    }

    /// A handle for one operation: cancelled with this repository's token,
    /// and on its own (a lost lock cancels only its operation).
    pub(crate) fn for_operation(&self) -> Self {
        self.with_cancel(self.cancel.child_token())
    }

    pub fn cancel_token(&self) -> &CancellationToken {
        &self.cancel
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// `Cancelled` once the operation should stop.
    pub(crate) fn check_cancel(&self) -> Result<(), RepoError> {
        if self.cancel.is_cancelled() {
            Err(RepoError::Cancelled)
        } else {
            Ok(())
        }
    }

    /// Runs a storage call, stopping at once when the operation is
    /// cancelled. Every storage call of the repository goes through here;
    /// retries happen below, in the store (`ferry_store::retry`).
    pub(crate) async fn io<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, RepoError> {
        tokio::select! {
            biased;
            _ = self.cancel.cancelled() => Err(RepoError::Cancelled),
            r = call => r.map_err(RepoError::from),
        }
    }

    pub fn key(&self) -> &MasterKey {
        &self.key
    }

    pub fn config(&self) -> &RepoConfig {
        &self.config
    }

    /// The key file this repository was opened with.
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    // ---- keys -------------------------------------------------------

    /// Adds a key file wrapping the master key under another password.
    pub async fn add_key(&self, password: &[u8], label: &str) -> Result<KeyId, RepoError> {
        write_key_file(
            &*self.store,
            &self.key,
            password,
            label,
            KdfParams::default(),
        )
        .await
    }

    pub async fn add_key_with(
        &self,
        password: &[u8],
        label: &str,
        kdf: KdfParams,
    ) -> Result<KeyId, RepoError> {
        write_key_file(&*self.store, &self.key, password, label, kdf).await
    }

    pub async fn list_keys(&self) -> Result<Vec<(KeyId, KeyFile)>, RepoError> {
        list_key_files(&*self.store).await
    }

    /// Removes a key file. Refuses the key in use (so the caller can still
    /// open the repository) and thereby the last key.
    pub async fn remove_key(&self, prefix: &str) -> Result<KeyId, RepoError> {
        let keys = self.list_keys().await?;
        let matches: Vec<_> = keys
            .iter()
            .filter(|(id, _)| id.to_hex().starts_with(prefix))
            .collect();
        let id = match matches.as_slice() {
            [(id, _)] => *id,
            [] => return Err(RepoError::KeyNotFound { id: prefix.into() }),
            _ => {
                return Err(RepoError::InvalidInput(format!(
                    "key id prefix {prefix} is ambiguous"
                )));
            }
        };
        if id == self.key_id {
            return Err(RepoError::InvalidInput(format!(
                "key {} is the one in use; open the repository with another key to remove it",
                id.short()
            )));
        }
        self.store.delete(&object_key(&id.object_key())?).await?;
        Ok(id)
    }

    // ---- encrypted objects -------------------------------------------

    async fn get_object(&self, key: &str) -> Result<Bytes, RepoError> {
        let k = object_key(key)?;
        self.io(self.store.get(&k)).await
    }

    async fn put_object(&self, key: &str, data: Vec<u8>) -> Result<(), RepoError> {
        let k = object_key(key)?;
        let b = Bytes::from(data);
        self.io(self.store.put(&k, b)).await
    }

    // ---- index --------------------------------------------------------

    /// Loads every index object. Corrupt index objects are an error that
    /// names them.
    pub async fn load_index(&self) -> Result<Index, RepoError> {
        let mut index = Index::default();
        for (_, file) in self.load_index_files().await? {
            index.add_file_owned(file);
        }
        Ok(index)
    }

    pub async fn load_index_files(&self) -> Result<Vec<(IndexId, IndexFile)>, RepoError> {
        let list = self.io(self.store.list(INDEX_PREFIX)).await?;
        let ids: Vec<IndexId> = list
            .iter()
            .filter_map(|o| id_from_key(o.key.as_str()))
            .collect();
        let results: Vec<Result<(IndexId, IndexFile), RepoError>> = futures::stream::iter(ids)
            .map(|id| async move {
                let bytes = self.get_object(&id.object_key()).await?;
                let file = self.decode_index(id, &bytes).map_err(|e| match e {
                    RepoError::Corrupt { object, reason } => RepoError::Corrupt {
                        object,
                        reason: format!(
                            "{reason}; `ferry-agent repo repair index` rebuilds the index from the packs"
                        ),
                    },
                    other => other,
                })?;
                Ok((id, file))
            })
            .buffer_unordered(16)
            .collect()
            .await;
        results.into_iter().collect()
    }

    fn decode_index(&self, id: IndexId, bytes: &[u8]) -> Result<IndexFile, RepoError> {
        let corrupt = |reason: String| RepoError::Corrupt {
            object: format!("index {id}"),
            reason,
        };
        if content_hash(bytes) != id.0 {
            return Err(corrupt("content does not match its id".into()));
        }
        let plain = self
            .key
            .open(INDEX_AAD, bytes)
            .map_err(|e| corrupt(e.to_string()))?;
        let raw = zstd::stream::decode_all(&plain[..]).map_err(|e| corrupt(e.to_string()))?;
        postcard::from_bytes(&raw).map_err(|e| corrupt(e.to_string()))
    }

    /// Writes an index object listing `packs`.
    pub async fn write_index(&self, packs: Vec<IndexedPack>) -> Result<IndexId, RepoError> {
        let file = IndexFile { packs };
        let raw = postcard::to_stdvec(&file).expect("invariant: index serialises");
        let compressed = zstd::bulk::compress(&raw, 3).map_err(|e| RepoError::Io {
            op: "compress",
            path: "index".into(),
            source: e,
        })?;
        let sealed = self.key.seal(INDEX_AAD, &compressed);
        let id = IndexId(content_hash(&sealed));
        self.put_object(&id.object_key(), sealed).await?;
        Ok(id)
    }

    /// Packs present in storage, with their sizes.
    pub async fn list_packs(&self) -> Result<Vec<(PackId, u64)>, RepoError> {
        Ok(self
            .io(self.store.list(DATA_PREFIX))
            .await?
            .into_iter()
            .filter_map(|o| id_from_key::<PackId>(o.key.as_str()).map(|id| (id, o.size)))
            .collect())
    }

    /// Reads the header of a pack.
    pub async fn read_pack_header(
        &self,
        id: PackId,
        len: u64,
    ) -> Result<Vec<PackEntry>, RepoError> {
        let key = object_key(&id.object_key())?;
        let corrupt = |reason: String| RepoError::Corrupt {
            object: format!("pack {id}"),
            reason,
        };
        let mut want = pack::HEADER_PROBE.min(len);
        loop {
            let tail = self.io(self.store.get_range(&key, len - want..len)).await?;
            match pack::parse_header(&self.key, &tail, len).map_err(|e| corrupt(e.to_string()))? {
                Ok(entries) => return Ok(entries),
                Err(needed) if needed > want && needed <= len => want = needed,
                Err(_) => return Err(corrupt("header length is inconsistent".into())),
            }
        }
    }

    // ---- blobs and trees ------------------------------------------------

    /// Reads, decrypts and verifies one blob.
    pub async fn read_blob(&self, index: &Index, id: &BlobId) -> Result<Vec<u8>, RepoError> {
        let loc = index.get(id).ok_or_else(|| RepoError::MissingBlob {
            blob: *id,
            context: "if an index object was lost, `ferry-agent repo repair index` rebuilds it from the packs".into(),
        })?;
        let key = object_key(&loc.pack.object_key())?;
        let start = loc.entry.offset as u64;
        let range = start..start + loc.entry.length as u64;
        let stored = self
            .io(self.store.get_range(&key, range.clone()))
            .await
            .map_err(|e| match e {
                RepoError::Store(source) => RepoError::PackRead {
                    pack: loc.pack,
                    blob: *id,
                    source: Box::new(source),
                },
                other => other,
            })?;
        if stored.len() as u64 != range.end - range.start {
            return Err(RepoError::Corrupt {
                object: format!("pack {}", loc.pack),
                reason: format!("blob {id} is truncated"),
            });
        }
        let entry = loc.entry;
        let key = self.key.clone();
        let pack = loc.pack;
        tokio::task::spawn_blocking(move || pack::decode_blob(&key, &entry, &stored))
            .await
            .map_err(|e| RepoError::Task(e.to_string()))?
            .map_err(|source| RepoError::Blob {
                pack,
                source: Box::new(source),
            })
    }

    pub async fn load_tree(&self, index: &Index, id: &BlobId) -> Result<Tree, RepoError> {
        let data = self.read_blob(index, id).await?;
        Tree::decode(&data).map_err(|e| RepoError::Corrupt {
            object: format!("tree {id}"),
            reason: e.to_string(),
        })
    }

    // ---- snapshots --------------------------------------------------------

    pub async fn save_snapshot(&self, snap: &Snapshot) -> Result<SnapshotId, RepoError> {
        let json = serde_json::to_vec(snap).expect("invariant: snapshot serialises");
        let sealed = self.key.seal(SNAPSHOT_AAD, &json);
        let id = SnapshotId(content_hash(&sealed));
        self.put_object(&id.object_key(), sealed).await?;
        Ok(id)
    }

    pub async fn load_snapshot(&self, id: SnapshotId) -> Result<Snapshot, RepoError> {
        let bytes = match self.get_object(&id.object_key()).await {
            Err(RepoError::Store(StoreError::NotFound { .. })) => {
                return Err(RepoError::SnapshotNotFound { id: id.to_hex() });
            }
            other => other?,
        };
        let corrupt = |reason: String| RepoError::Corrupt {
            object: format!("snapshot {id}"),
            reason,
        };
        if content_hash(&bytes) != id.0 {
            return Err(corrupt("content does not match its id".into()));
        }
        let plain = self
            .key
            .open(SNAPSHOT_AAD, &bytes)
            .map_err(|e| corrupt(e.to_string()))?;
        // The version first: a newer format may not parse as this one.
        #[derive(serde::Deserialize)]
        struct Version {
            version: u32,
        }
        let v: Version = serde_json::from_slice(&plain).map_err(|e| corrupt(e.to_string()))?;
        if v.version > snapshot::SNAPSHOT_VERSION {
            return Err(RepoError::UnsupportedSnapshot {
                id: id.to_hex(),
                found: v.version,
            });
        }
        serde_json::from_slice(&plain).map_err(|e| corrupt(e.to_string()))
    }

    pub async fn snapshot_ids(&self) -> Result<Vec<SnapshotId>, RepoError> {
        Ok(self
            .io(self.store.list(SNAPSHOTS_PREFIX))
            .await?
            .iter()
            .filter_map(|o| id_from_key(o.key.as_str()))
            .collect())
    }

    /// Every readable snapshot, oldest first, and the ones that cannot be
    /// read (corrupt, or of a newer format) with why. Storage failures are
    /// errors.
    pub async fn scan_snapshots(&self) -> Result<SnapshotScan, RepoError> {
        let ids = self.snapshot_ids().await?;
        let results: Vec<(SnapshotId, Result<Snapshot, RepoError>)> = futures::stream::iter(ids)
            .map(|id| async move { (id, self.load_snapshot(id).await) })
            .buffer_unordered(16)
            .collect()
            .await;
        let mut scan = SnapshotScan::default();
        for (id, r) in results {
            match r {
                Ok(s) => scan.snapshots.push((id, s)),
                Err(RepoError::SnapshotNotFound { .. }) => {} // forgotten meanwhile
                Err(e @ (RepoError::Corrupt { .. } | RepoError::UnsupportedSnapshot { .. })) => {
                    scan.unreadable.push((id, e))
                }
                Err(e) => return Err(e),
            }
        }
        scan.snapshots
            .sort_by(|a, b| (a.1.time_unix, &a.1.time).cmp(&(b.1.time_unix, &b.1.time)));
        Ok(scan)
    }

    /// Every readable snapshot, oldest first; an unreadable one is skipped
    /// with a warning that names it.
    pub async fn list_snapshots(&self) -> Result<Vec<(SnapshotId, Snapshot)>, RepoError> {
        let scan = self.scan_snapshots().await?;
        for (id, e) in &scan.unreadable {
            tracing::warn!(snapshot = %id, error = %e, "skipping unreadable snapshot");
        }
        Ok(scan.snapshots)
    }

    /// Resolves a full id, a unique prefix (at least 4 hex digits), or
    /// `latest` (the newest readable snapshot).
    pub async fn resolve_snapshot(&self, prefix: &str) -> Result<SnapshotId, RepoError> {
        if prefix == "latest" {
            return self
                .list_snapshots()
                .await?
                .pop()
                .map(|(id, _)| id)
                .ok_or_else(|| RepoError::SnapshotNotFound {
                    id: "latest".into(),
                });
        }
        if prefix.len() < 4 || !prefix.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(RepoError::InvalidInput(format!(
                "snapshot id {prefix:?} must be at least 4 hex digits"
            )));
        }
        let prefix = prefix.to_ascii_lowercase();
        let ids: Vec<_> = self
            .snapshot_ids()
            .await?
            .into_iter()
            .filter(|id| id.to_hex().starts_with(&prefix))
            .collect();
        match ids.as_slice() {
            [id] => Ok(*id),
            [] => Err(RepoError::SnapshotNotFound { id: prefix }),
            _ => Err(RepoError::AmbiguousSnapshot { prefix }),
        }
    }

    /// Deletes snapshot manifests. Their data stays until `prune`.
    pub async fn forget(&self, ids: &[SnapshotId]) -> Result<(), RepoError> {
        for id in ids {
            self.store
                .size(&object_key(&id.object_key())?)
                .await?
                .ok_or(RepoError::SnapshotNotFound { id: id.to_hex() })?;
        }
        for id in ids {
            self.store.delete(&object_key(&id.object_key())?).await?;
            tracing::info!(snapshot = %id, "snapshot forgotten");
        }
        Ok(())
    }
}

async fn write_key_file(
    store: &dyn ObjectStore,
    key: &MasterKey,
    password: &[u8],
    label: &str,
    kdf: KdfParams,
) -> Result<KeyId, RepoError> {
    if password.is_empty() {
        return Err(RepoError::InvalidInput("password is empty".into()));
    }
    let (key, pw, label) = (key.clone(), password.to_vec(), label.to_owned());
    let kf = tokio::task::spawn_blocking(move || KeyFile::wrap(&key, &pw, &label, kdf))
        .await
        .map_err(|e| RepoError::Task(e.to_string()))?
        .map_err(|e| RepoError::InvalidInput(e.to_string()))?;
    let json = serde_json::to_vec_pretty(&kf).expect("invariant: key file serialises");
    let id = KeyId(content_hash(&json));
    store
        .put(&object_key(&id.object_key())?, Bytes::from(json))
        .await?;
    Ok(id)
}

async fn list_key_files(store: &dyn ObjectStore) -> Result<Vec<(KeyId, KeyFile)>, RepoError> {
    let mut out = Vec::new();
    for o in store.list(KEYS_PREFIX).await? {
        let Some(id) = id_from_key::<KeyId>(o.key.as_str()) else {
            continue;
        };
        let bytes = store.get(&o.key).await?;
        match serde_json::from_slice::<KeyFile>(&bytes) {
            Ok(kf) => out.push((id, kf)),
            Err(e) => tracing::warn!(key = %id, error = %e, "skipping malformed key file"),
        }
    }
    out.sort_by_key(|(_, kf)| kf.created);
    Ok(out)
}
