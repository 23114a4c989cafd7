//! The backup pipeline.
//!
//! ```text
//! walker thread: walk → stat → (unchanged? reuse parent chunk list)
//!                read → chunk (FastCDC) → hash (keyed BLAKE3) → dedup
//!      │ bounded channel of new blobs
//!      ▼
//! N worker threads: compress (zstd, probe first) → encrypt → pack
//!      │ bounded channel of finished packs
//!      ▼
//! uploader task: bounded number of concurrent uploads
//! ```
//! Then one index object for the new packs, then the snapshot manifest
//! (the commit point).
//!
//! Memory is bounded by configuration, whatever the number or size of
//! files. Big buffers are allocated once and recycled, never freed and
//! reallocated per chunk or per pack (with many threads, glibc's malloc
//! otherwise keeps freed megabytes in per-thread arenas):
//! - the walker's read buffer: 2 × max chunk size;
//! - chunk buffers: at most `workers + 1` queued or in a worker, plus one
//!   being filled, each up to the max chunk size, returned by the workers
//!   to a free list;
//! - pack buffers: a fixed pool of `workers + upload concurrency`, each
//!   pack size + max chunk size; a worker takes one to start a pack, the
//!   uploader gives it back after the upload.
//!
//! What grows with the data set is the index of known blobs (the
//! repository's, shared with reading parent trees, not copied) and, for the
//! new blobs, their ids and pack entries (about 150 bytes per new blob).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::{File, Metadata};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::chunker::{Chunker, is_zero};
use super::crypto::MasterKey;
use super::format::{BlobId, BlobKind, MARKS_PREFIX, PackId, SnapshotId, id_from_key};
use super::index::{Index, IndexedPack};
use super::lock::LockGuard;
use super::pack::{BLOB_OVERHEAD, BlobEncoder, FinishedPack, PackBuilder};
pub use super::progress::{Progress, ProgressInfo};
use super::snapshot::{BackupSummary, Snapshot};
use super::tree::{Extent, Node, NodeKind, Timestamp, Tree};
use super::{RepoError, Repository, object_key};

#[derive(Debug, Clone, Default)]
pub struct BackupOptions {
    pub tags: BTreeMap<String, String>,
    /// Explicit parent; otherwise the latest snapshot of the same host,
    /// path and tags.
    pub parent: Option<SnapshotId>,
    /// Do not use any parent (read everything).
    pub no_parent: bool,
    /// Run the whole pipeline but store nothing.
    pub dry_run: bool,
    /// Host name recorded in the snapshot (default: this machine's).
    pub host: Option<String>,
    /// Concurrent pack uploads (default 2).
    pub upload_concurrency: Option<usize>,
}

/// The result of a backup: the snapshot id is `None` on a dry run.
#[derive(Debug, Clone)]
pub struct BackupOutcome {
    pub id: Option<SnapshotId>,
    pub snapshot: Snapshot,
}

fn rfc3339(unix: i64) -> String {
    let t =
        time::OffsetDateTime::from_unix_timestamp(unix).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| unix.to_string())
}

struct BlobJob {
    id: BlobId,
    kind: BlobKind,
    data: Vec<u8>,
}

/// Keeps the first error raised by any stage.
#[derive(Clone, Default)]
struct FirstError(Arc<Mutex<Option<RepoError>>>);

impl FirstError {
    fn set(&self, e: RepoError) {
        if let Ok(mut g) = self.0.lock()
            && g.is_none()
        {
            *g = Some(e);
        }
    }
    fn take(&self) -> Option<RepoError> {
        self.0.lock().ok().and_then(|mut g| g.take())
    }
}

impl Repository {
    /// Adds packs that exist in storage but are in no index (left by an
    /// interrupted backup) to the index, writing an index object for them
    /// unless `dry_run`. Unreadable packs are skipped (prune removes them).
    pub async fn recover_unindexed_packs(
        &self,
        index: &mut Index,
        dry_run: bool,
    ) -> Result<usize, RepoError> {
        let mut found = Vec::new();
        for (id, size) in self.list_packs().await? {
            if index.has_pack(&id) {
                continue;
            }
            match self.read_pack_header(id, size).await {
                Ok(entries) => found.push(IndexedPack { id, blobs: entries }),
                Err(e) => {
                    tracing::warn!(pack = %id, error = %e, "ignoring unreadable unindexed pack")
                }
            }
        }
        let n = found.len();
        if n > 0 {
            for p in &found {
                index.add_pack(p.id, &p.blobs);
            }
            if !dry_run {
                self.write_index(found).await?;
            }
            tracing::info!(packs = n, "recovered packs of an interrupted backup");
        }
        Ok(n)
    }

    /// Packs currently marked for deletion by prune.
    pub async fn marked_packs(&self) -> Result<HashSet<PackId>, RepoError> {
        Ok(self
            .io(self.store().list(MARKS_PREFIX))
            .await?
            .iter()
            .filter_map(|o| id_from_key(o.key.as_str()))
            .collect())
    }

    /// Backs up the directory `path` and commits a snapshot.
    ///
    /// The backup holds a shared lock for its whole run (refused while
    /// prune holds the maintenance lock) and reads prune's marks only once
    /// it holds it, so prune never deletes a pack this backup reuses.
    pub async fn backup(
        &self,
        path: &Path,
        opts: BackupOptions,
        progress: Option<Arc<dyn Progress>>,
    ) -> Result<BackupOutcome, RepoError> {
        let op = self.for_operation();
        let lock = if opts.dry_run {
            None
        } else {
            Some(op.lock_shared("backup", op.cancel_token().clone()).await?)
        };
        let res = op.backup_locked(path, opts, progress, lock.as_ref()).await;
        match lock {
            Some(lock) => {
                let res = res.map_err(|e| lock.explain(e));
                lock.release().await;
                res
            }
            None => res,
        }
    }

    async fn backup_locked(
        &self,
        path: &Path,
        opts: BackupOptions,
        progress: Option<Arc<dyn Progress>>,
        lock: Option<&LockGuard>,
    ) -> Result<BackupOutcome, RepoError> {
        let started = Instant::now();
        let start_unix = self.clock().now_unix();
        // One lineage per directory, however it is spelled (`src`, `src/`,
        // `./src`, a symlink to it).
        let path = &std::fs::canonicalize(path).map_err(|e| RepoError::io("resolve", path, e))?;
        let meta = std::fs::metadata(path).map_err(|e| RepoError::io("stat", path, e))?;
        if !meta.is_dir() {
            return Err(RepoError::InvalidInput(format!(
                "{} is not a directory",
                path.display()
            )));
        }
        let host = opts.host.clone().unwrap_or_else(super::hostname);
        let path_str = path.display().to_string();

        let mut index = self.load_index().await?;
        self.recover_unindexed_packs(&mut index, opts.dry_run)
            .await?;
        let marked = self.marked_packs().await?;
        // Never reuse blobs of packs that prune may delete. Without marks
        // the index itself serves (no copy of it).
        let dedup = if marked.is_empty() {
            None
        } else {
            Some(index.without_packs(|p| marked.contains(p)))
        };

        let parent = if opts.no_parent {
            None
        } else if let Some(p) = opts.parent {
            Some((p, self.load_snapshot(p).await?))
        } else {
            self.list_snapshots()
                .await?
                .into_iter()
                .rev()
                .find(|(_, s)| s.host == host && s.path == path_str && s.tags == opts.tags)
        };
        let parent_tree = match &parent {
            Some((_, s)) => Some(self.load_tree(&index, &s.tree).await?),
            None => None,
        };

        let (root, mut summary, new_packs) = self
            .run_pipeline(path, index, dedup, parent_tree, &opts, progress, started)
            .await?;
        summary.duration_ms = started.elapsed().as_millis() as u64;
        let snapshot = Snapshot {
            version: super::snapshot::SNAPSHOT_VERSION,
            time: rfc3339(start_unix),
            time_unix: start_unix,
            host,
            path: path_str,
            tags: opts.tags.clone(),
            parent: parent.map(|(id, _)| id),
            tree: root,
            summary,
        };
        let id = if opts.dry_run {
            None
        } else {
            if let Some(lock) = lock {
                lock.check()?;
            }
            if !new_packs.is_empty() {
                self.write_index(new_packs).await?;
            }
            self.check_cancel()?;
            Some(self.save_snapshot(&snapshot).await?)
        };
        if let Some(id) = id {
            tracing::info!(snapshot = %id, files = snapshot.summary.files, bytes_new = snapshot.summary.bytes_new, "snapshot committed");
        }
        Ok(BackupOutcome { id, snapshot })
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_pipeline(
        &self,
        path: &Path,
        index: Index,
        dedup: Option<Index>,
        parent_tree: Option<Tree>,
        opts: &BackupOptions,
        progress: Option<Arc<dyn Progress>>,
        started: Instant,
    ) -> Result<(BlobId, BackupSummary, Vec<IndexedPack>), RepoError> {
        let workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .clamp(1, 16);
        let concurrency = opts.upload_concurrency.unwrap_or(2).max(1);
        let pack_size = self.config().pack_size as usize;
        let max_chunk = self.config().chunker.max_size as usize;
        // A pack is closed once it reaches pack_size, so it holds at most
        // pack_size plus one blob, then its header.
        let pack_cap = pack_size + max_chunk + BLOB_OVERHEAD + pack_size / 16;
        // The pool bounds the packs being filled, queued and uploaded.
        let n_pack_buffers = workers + concurrency;
        let (pool_tx, pool_rx) = crossbeam_channel::bounded::<Vec<u8>>(n_pack_buffers);
        for _ in 0..n_pack_buffers {
            let _ = pool_tx.try_send(Vec::new());
        }
        let (pack_tx, pack_rx) = mpsc::channel::<FinishedPack>(n_pack_buffers);
        let errors = FirstError::default();

        let uploader = {
            let repo = self.clone();
            let dry_run = opts.dry_run;
            tokio::spawn(
                async move { upload_packs(repo, pack_rx, pool_tx, dry_run, concurrency).await },
            )
        };

        let repo = self.clone();
        let path = path.to_path_buf();
        let handle = tokio::runtime::Handle::current();
        let errs = errors.clone();
        let walk = tokio::task::spawn_blocking(move || {
            let chunker = Chunker::new(repo.config().chunker, repo.key().chunker_seed())
                .map_err(|e| RepoError::InvalidInput(e.to_string()))?;
            let (blob_tx, blob_rx) = crossbeam_channel::bounded::<BlobJob>(1);
            let (free_tx, free_rx) = crossbeam_channel::bounded::<Vec<u8>>(workers + 2);
            std::thread::scope(|s| {
                let mut joins = Vec::new();
                for _ in 0..workers {
                    let io = WorkerIo {
                        jobs: blob_rx.clone(),
                        free_chunks: free_tx.clone(),
                        pack_buffers: pool_rx.clone(),
                        packs: pack_tx.clone(),
                    };
                    let key = repo.key().clone();
                    let level = repo.config().compression_level;
                    let errs = errs.clone();
                    joins.push(s.spawn(move || {
                        if let Err(e) = pack_worker(&key, level, pack_size, pack_cap, io) {
                            errs.set(e);
                        }
                    }));
                }
                drop(blob_rx);
                drop(free_tx);
                drop(pool_rx);
                drop(pack_tx);
                let mut walker = Walker {
                    repo: &repo,
                    index: &index,
                    dedup: dedup.as_ref().unwrap_or(&index),
                    sent: HashSet::new(),
                    chunker,
                    blob_tx,
                    free_chunks: free_rx,
                    handle,
                    summary: BackupSummary::default(),
                    progress,
                    started,
                    last_progress: started,
                    buf: Vec::new(),
                    zero_ids: HashMap::new(),
                };
                let res = walker.walk_dir(&path, parent_tree.as_ref());
                walker.report(true);
                let summary = std::mem::take(&mut walker.summary);
                drop(walker);
                for j in joins {
                    let _ = j.join();
                }
                res.map(|root| (root, summary))
            })
        });
        let walked = walk.await.map_err(|e| RepoError::Task(e.to_string()))?;
        let uploaded = uploader.await.map_err(|e| RepoError::Task(e.to_string()))?;
        // An upload failure is the cause of the workers stopping; otherwise
        // the first failure is the cause and later ones are consequences.
        let (packs, stored, n_packs) = uploaded?;
        if let Some(e) = errors.take() {
            return Err(e);
        }
        let (root, mut summary) = walked?;
        summary.bytes_stored = stored;
        summary.packs_written = n_packs;
        Ok((root, summary, packs))
    }
}

/// A pack worker's channels.
struct WorkerIo {
    jobs: crossbeam_channel::Receiver<BlobJob>,
    /// Chunk buffers go back to the walker here.
    free_chunks: crossbeam_channel::Sender<Vec<u8>>,
    /// Empty pack buffers, from the pool.
    pack_buffers: crossbeam_channel::Receiver<Vec<u8>>,
    packs: mpsc::Sender<FinishedPack>,
}

fn pack_worker(
    key: &MasterKey,
    level: i32,
    pack_size: usize,
    pack_cap: usize,
    io: WorkerIo,
) -> Result<(), RepoError> {
    let mut enc = BlobEncoder::new(level).map_err(|e| RepoError::Io {
        op: "create",
        path: "zstd compressor".into(),
        source: e,
    })?;
    let stopped = || RepoError::Task("pack upload stopped".into());
    let send = |pb: PackBuilder| {
        io.packs
            .blocking_send(pb.finish(key))
            .map_err(|_| stopped())
    };
    let mut current: Option<PackBuilder> = None;
    for job in io.jobs.iter() {
        let pb = match current.as_mut() {
            Some(pb) => pb,
            None => {
                let mut buf = io.pack_buffers.recv().map_err(|_| stopped())?;
                buf.clear();
                buf.reserve_exact(pack_cap);
                current.insert(PackBuilder::from_buffer(buf))
            }
        };
        pb.add(&mut enc, key, job.id, job.kind, &job.data);
        // The walker may have stopped; then the buffer is simply freed.
        let _ = io.free_chunks.try_send(job.data);
        if pb.len() >= pack_size
            && let Some(full) = current.take()
        {
            send(full)?;
        }
    }
    if let Some(pb) = current
        && !pb.is_empty()
    {
        send(pb)?;
    }
    Ok(())
}

async fn upload_packs(
    repo: Repository,
    mut rx: mpsc::Receiver<FinishedPack>,
    pool: crossbeam_channel::Sender<Vec<u8>>,
    dry_run: bool,
    concurrency: usize,
) -> Result<(Vec<IndexedPack>, u64, u64), RepoError> {
    let mut set = tokio::task::JoinSet::new();
    let mut done = Vec::new();
    let mut bytes = 0u64;
    let mut count = 0u64;
    let collect = |r: Result<Result<(IndexedPack, u64), RepoError>, tokio::task::JoinError>,
                   done: &mut Vec<IndexedPack>,
                   bytes: &mut u64,
                   count: &mut u64|
     -> Result<(), RepoError> {
        let (p, n) = r.map_err(|e| RepoError::Task(e.to_string()))??;
        if !dry_run {
            done.push(p);
        }
        *bytes += n;
        *count += 1;
        Ok(())
    };
    while let Some(pack) = rx.recv().await {
        while set.len() >= concurrency {
            if let Some(r) = set.join_next().await {
                collect(r, &mut done, &mut bytes, &mut count)?;
            }
        }
        let repo = repo.clone();
        let pool = pool.clone();
        set.spawn(async move {
            let len = pack.data.len() as u64;
            let buf = if dry_run {
                pack.data
            } else {
                let key = object_key(&pack.id.object_key())?;
                let data = Bytes::from(pack.data);
                repo.io(repo.store().put(&key, data.clone())).await?;
                tracing::debug!(pack = %pack.id, bytes = len, "pack uploaded");
                // Recover the buffer when the store kept no reference.
                data.try_into_mut().map(Vec::from).unwrap_or_default()
            };
            // The pool has room: this pack's buffer came from it.
            let _ = pool.try_send(buf);
            Ok((
                IndexedPack {
                    id: pack.id,
                    blobs: pack.entries,
                },
                len,
            ))
        });
    }
    while let Some(r) = set.join_next().await {
        collect(r, &mut done, &mut bytes, &mut count)?;
    }
    Ok((done, bytes, count))
}

struct Walker<'a> {
    repo: &'a Repository,
    /// Full index, to read parent trees.
    index: &'a Index,
    /// Blobs that may be reused.
    dedup: &'a Index,
    sent: HashSet<BlobId>,
    chunker: Chunker,
    blob_tx: crossbeam_channel::Sender<BlobJob>,
    /// Chunk buffers returned by the workers.
    free_chunks: crossbeam_channel::Receiver<Vec<u8>>,
    handle: tokio::runtime::Handle,
    summary: BackupSummary,
    progress: Option<Arc<dyn Progress>>,
    started: Instant,
    last_progress: Instant,
    buf: Vec<u8>,
    zero_ids: HashMap<usize, BlobId>,
}

/// A file node's kind with its hard link group as it is now.
fn with_hardlink(kind: NodeKind, now: Option<u64>) -> NodeKind {
    match kind {
        NodeKind::File { content, .. } => NodeKind::File {
            content,
            hardlink: now,
        },
        NodeKind::SparseFile { extents, .. } => NodeKind::SparseFile {
            extents,
            hardlink: now,
        },
        other => other,
    }
}

/// The data runs `[start, end)` of a file of `size` bytes, found with
/// `SEEK_DATA`/`SEEK_HOLE` so holes are never read. One run over the whole
/// file where the filesystem cannot tell.
pub(crate) fn data_runs(file: &File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use rustix::fs::SeekFrom as S;
    let mut runs = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let start = match rustix::fs::seek(file, S::Data(pos)) {
            Ok(o) => o,
            // No data after `pos`.
            Err(rustix::io::Errno::NXIO) => break,
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP) if pos == 0 => {
                return Ok(vec![(0, size)]);
            }
            Err(e) => return Err(e.into()),
        };
        if start >= size {
            break;
        }
        let end = match rustix::fs::seek(file, S::Hole(start)) {
            Ok(o) => o.min(size),
            Err(rustix::io::Errno::NXIO) => size,
            Err(e) => return Err(e.into()),
        };
        if end <= start {
            break;
        }
        runs.push((start, end));
        pos = end;
    }
    Ok(runs)
}

fn ts(sec: i64, nsec: i64) -> Timestamp {
    Timestamp {
        sec,
        nsec: nsec.clamp(0, 999_999_999) as u32,
    }
}

/// Extended attributes as (name, value) pairs.
type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

fn read_xattrs(path: &Path) -> Result<Xattrs, std::io::Error> {
    let mut names = vec![0u8; 1024];
    let n = loop {
        match rustix::fs::llistxattr(path, &mut names[..]) {
            Ok(n) => break n,
            Err(rustix::io::Errno::RANGE) => names.resize(names.len() * 4, 0),
            Err(rustix::io::Errno::NOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        }
    };
    let mut out = Vec::new();
    for name in names[..n].split(|&b| b == 0).filter(|s| !s.is_empty()) {
        let mut value = vec![0u8; 256];
        let len = loop {
            match rustix::fs::lgetxattr(path, OsStr::from_bytes(name), &mut value[..]) {
                Ok(len) => break Some(len),
                Err(rustix::io::Errno::RANGE) => value.resize(value.len() * 4, 0),
                Err(rustix::io::Errno::NODATA) => break None,
                Err(e) => return Err(e.into()),
            }
        };
        if let Some(len) = len {
            value.truncate(len);
            out.push((name.to_vec(), value));
        }
    }
    out.sort();
    Ok(out)
}

fn base_node(name: &[u8], md: &Metadata, kind: NodeKind, xattrs: Xattrs) -> Node {
    Node {
        name: name.to_vec(),
        kind,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime: ts(md.mtime(), md.mtime_nsec()),
        ctime: ts(md.ctime(), md.ctime_nsec()),
        inode: md.ino(),
        dev: md.dev(),
        size: md.len(),
        xattrs,
    }
}

impl Walker<'_> {
    fn is_known(&self, id: &BlobId) -> bool {
        self.dedup.contains(id) || self.sent.contains(id)
    }

    fn submit(&mut self, id: BlobId, kind: BlobKind, data: Vec<u8>) -> Result<(), RepoError> {
        if self.is_known(&id) {
            return Ok(());
        }
        self.sent.insert(id);
        self.summary.blobs_new += 1;
        self.summary.bytes_new += data.len() as u64;
        self.blob_tx
            .send(BlobJob { id, kind, data })
            .map_err(|_| RepoError::Task("blob workers stopped".into()))
    }

    fn report(&mut self, force: bool) {
        if let Some(p) = &self.progress {
            let now = Instant::now();
            if force || now.duration_since(self.last_progress) >= Duration::from_millis(200) {
                self.last_progress = now;
                p.update(&ProgressInfo {
                    bytes: self.summary.bytes_read,
                    files: self.summary.files,
                    elapsed: now.duration_since(self.started),
                });
            }
        }
    }

    fn walk_dir(&mut self, dir: &Path, parent: Option<&Tree>) -> Result<BlobId, RepoError> {
        let mut entries: Vec<(Vec<u8>, PathBuf)> = Vec::new();
        for e in std::fs::read_dir(dir).map_err(|e| RepoError::io("read directory", dir, e))? {
            let e = e.map_err(|e| RepoError::io("read directory", dir, e))?;
            entries.push((e.file_name().as_bytes().to_vec(), e.path()));
        }
        entries.sort();
        let parent_nodes: HashMap<&[u8], &Node> = parent
            .map(|t| t.nodes.iter().map(|n| (n.name.as_slice(), n)).collect())
            .unwrap_or_default();
        let mut tree = Tree::default();
        for (name, path) in entries {
            self.repo.check_cancel()?;
            let md = match std::fs::symlink_metadata(&path) {
                Ok(md) => md,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    tracing::warn!(path = %path.display(), "file vanished during backup");
                    continue;
                }
                Err(e) => return Err(RepoError::io("stat", &path, e)),
            };
            let xattrs =
                read_xattrs(&path).map_err(|e| RepoError::io("read xattrs of", &path, e))?;
            let ft = md.file_type();
            let prev = parent_nodes.get(name.as_slice()).copied();
            let node = if ft.is_dir() {
                self.summary.dirs += 1;
                let prev_tree = match prev.map(|n| &n.kind) {
                    Some(NodeKind::Dir { subtree }) => Some(
                        self.handle
                            .block_on(self.repo.load_tree(self.index, subtree))?,
                    ),
                    _ => None,
                };
                let subtree = self.walk_dir(&path, prev_tree.as_ref())?;
                base_node(&name, &md, NodeKind::Dir { subtree }, xattrs)
            } else if ft.is_file() {
                let hardlink = (md.nlink() > 1).then(|| md.ino() ^ md.dev().rotate_left(32));
                let kind = match prev {
                    Some(p) if self.unchanged(p, &md) => {
                        self.summary.files_unchanged += 1;
                        with_hardlink(p.kind.clone(), hardlink)
                    }
                    _ => match self.read_file(&path, &md, hardlink)? {
                        Some(kind) => kind,
                        None => continue,
                    },
                };
                self.summary.files += 1;
                self.summary.bytes_total += md.len();
                self.report(false);
                base_node(&name, &md, kind, xattrs)
            } else if ft.is_symlink() {
                let target =
                    std::fs::read_link(&path).map_err(|e| RepoError::io("read link", &path, e))?;
                let target = target.as_os_str().as_bytes().to_vec();
                base_node(&name, &md, NodeKind::Symlink { target }, xattrs)
            } else if ft.is_fifo() {
                base_node(&name, &md, NodeKind::Fifo, xattrs)
            } else if ft.is_block_device() || ft.is_char_device() {
                let kind = NodeKind::Device {
                    block: ft.is_block_device(),
                    rdev: md.rdev(),
                };
                base_node(&name, &md, kind, xattrs)
            } else if ft.is_socket() {
                base_node(&name, &md, NodeKind::Socket, xattrs)
            } else {
                return Err(RepoError::UnsupportedEntry {
                    path: path.display().to_string(),
                });
            };
            tree.nodes.push(node);
        }
        let data = tree.encode();
        let id = self.repo.key().blob_id(&data);
        self.submit(id, BlobKind::Tree, data)?;
        Ok(id)
    }

    fn unchanged(&self, prev: &Node, md: &Metadata) -> bool {
        prev.kind.is_file()
            && prev.size == md.len()
            && prev.inode == md.ino()
            && prev.mtime == ts(md.mtime(), md.mtime_nsec())
            && prev.ctime == ts(md.ctime(), md.ctime_nsec())
            && prev.kind.data_blobs().all(|c| self.is_known(c))
    }

    /// Reads, chunks and hashes one file's data, never its holes; `None`
    /// when it vanished. A file with holes becomes a `SparseFile`.
    fn read_file(
        &mut self,
        path: &Path,
        md: &Metadata,
        hardlink: Option<u64>,
    ) -> Result<Option<NodeKind>, RepoError> {
        let mut file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(RepoError::io("open", path, e)),
        };
        let size = md.len();
        let runs = data_runs(&file, size).map_err(|e| RepoError::io("find data in", path, e))?;
        let dense = runs.len() == 1 && runs[0] == (0, size);
        let mut extents = Vec::with_capacity(runs.len());
        for (start, end) in runs {
            file.seek(SeekFrom::Start(start))
                .map_err(|e| RepoError::io("seek", path, e))?;
            let content = self.read_run(path, (&file).take(end - start), end - start)?;
            extents.push(Extent {
                offset: start,
                content,
            });
        }
        Ok(Some(if size == 0 {
            NodeKind::File {
                content: Vec::new(),
                hardlink,
            }
        } else if dense {
            NodeKind::File {
                content: extents.pop().map(|e| e.content).unwrap_or_default(),
                hardlink,
            }
        } else {
            NodeKind::SparseFile { extents, hardlink }
        }))
    }

    /// Chunks one run of a file's data.
    fn read_run(
        &mut self,
        path: &Path,
        reader: impl Read,
        len: u64,
    ) -> Result<Vec<BlobId>, RepoError> {
        let mut content = Vec::with_capacity((len / (1 << 20)) as usize + 1);
        let chunker = self.chunker.clone();
        let mut buf = std::mem::take(&mut self.buf);
        let res = chunker.chunk_reader(
            reader,
            &mut buf,
            |chunk| {
                self.repo.check_cancel()?;
                self.summary.bytes_read += chunk.len() as u64;
                let id = self.chunk_id(chunk);
                content.push(id);
                if !self.is_known(&id) {
                    let mut data = self.free_chunks.try_recv().unwrap_or_default();
                    data.clear();
                    data.extend_from_slice(chunk);
                    self.submit(id, BlobKind::Data, data)?;
                }
                self.report(false);
                Ok(())
            },
            |e| RepoError::io("read", path, e),
        );
        self.buf = buf;
        res?;
        Ok(content)
    }

    /// The blob id of a chunk; all-zero chunks (holes) are cached by length.
    fn chunk_id(&mut self, chunk: &[u8]) -> BlobId {
        if is_zero(chunk) {
            if let Some(id) = self.zero_ids.get(&chunk.len()) {
                return *id;
            }
            let id = self.repo.key().blob_id(chunk);
            self.zero_ids.insert(chunk.len(), id);
            return id;
        }
        self.repo.key().blob_id(chunk)
    }
}
