//! Restore of a snapshot (or a subtree) into a target directory.
//!
//! The snapshot's trees are walked once, depth first, and restored in
//! batches of at most [`BatchLimits`] files and chunk targets; each batch
//! is restored completely before the walk goes on, so memory does not grow
//! with the number of files.
//!
//! The walk creates directories (each relative to its parent's handle),
//! symlinks, fifos, sockets, devices and empty files, after checking every
//! name, and adds the regular files with data to the current batch. A full
//! batch (and the last one) is written: its blobs are grouped by pack and
//! read in segments, several at once (bounded); each blob is authenticated
//! and re-hashed, then written with positioned writes at its file's data
//! runs (holes are never written). A regular file is created (`O_EXCL`)
//! under a temporary name by the first worker reaching one of its chunks;
//! the worker writing its last one applies its metadata and renames it into
//! place. Then the batch's hard links are made and the metadata of its
//! symlinks, fifos, sockets and devices applied, and that of every
//! directory the walk has left since the last batch (children before their
//! parents, so deepest first). Paths below the target are opened with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` or, without it, a walk
//! of `O_NOFOLLOW` opens: nothing is written through a symlink and nothing
//! lands outside the target. Last, one `syncfs` makes the restore durable.
//!
//! Hard links: the first file of each hard link group is remembered (its
//! path, for hardlinked files only); a link to it is made at the end of the
//! link's batch, when the first file is complete (in that batch or an
//! earlier one).
//!
//! Memory: one batch's files (their tree nodes, chunk lists included) and
//! chunk targets, the trees of the directories being walked (with at most
//! `TREE_PREFETCH` subdirectory trees fetched ahead per level), the path of
//! each hard link group's first file, and the repository index. Blob data in
//! flight is bounded by `PARALLEL_SEGMENTS` segments of at most `SEGMENT`
//! bytes (plus their decoded copies). A pack whose blobs fill files of
//! several batches is read once per batch (only the needed segments).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::StreamExt;
use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, Timespec, Timestamps, XattrFlags};
use rustix::io::Errno;
use serde::Serialize;

use super::format::{BlobId, PackId, SnapshotId};
use super::index::Index;
use super::pack::{self, DecodeBuffer, PackEntry};
use super::progress::{Progress, ProgressInfo};
use super::tree::{Node, NodeKind, Tree, unsafe_name_reason};
use super::{RepoError, Repository, object_key};

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct RestoreSummary {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    /// Fifos, sockets and device nodes.
    pub specials: u64,
    /// Entries that could not be created, each with the reason; a restore
    /// with any is not complete.
    pub skipped: Vec<String>,
    pub bytes_written: u64,
    pub bytes_total: u64,
    /// Pack reads: a pack holding data of several batches counts once per
    /// batch.
    pub packs_read: u64,
    /// Batches the restore was written in.
    pub batches: u64,
    pub duration_ms: u64,
}

/// How much one restore batch may hold. A batch is written once it holds
/// `files` entries (files with data, hard links, symlinks, special files
/// and finished directories) or `chunks` chunk targets; a single file with
/// more chunks is a batch of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    pub files: usize,
    pub chunks: usize,
}

impl Default for BatchLimits {
    /// About 10 MiB of plan per batch, and enough blobs per batch that
    /// grouping them by pack still reads each pack in few requests.
    fn default() -> Self {
        Self {
            files: 20_000,
            chunks: 50_000,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    pub batch: BatchLimits,
}

/// A path below the target: checked names joined with `/` (empty for the
/// target itself).
type RelPath = Vec<u8>;

/// One blob of a pack segment, with the (file, offset) pairs it fills.
type BlobTargets = (PackEntry, Vec<(usize, u64)>);

/// The most bytes of one pack fetched in one request (a larger blob is
/// fetched alone).
const SEGMENT: u64 = 4 << 20;

/// Pack segments decoded and written at the same time.
const PARALLEL_SEGMENTS: usize = 4;

/// Files a data worker keeps open between blobs before closing them all.
const OPEN_FILES_PER_WORKER: usize = 64;

/// Subdirectory trees of one directory fetched ahead, concurrently.
const TREE_PREFETCH: usize = 16;

/// One regular file to fill. It is created by the first data worker that
/// reaches one of its chunks, and its metadata is applied by the worker
/// that writes its last chunk.
struct FileJob {
    /// Index of its parent in its batch's `dirs`.
    dir: usize,
    node: Node,
    /// The name it is written under until complete, then renamed from.
    tmp: Vec<u8>,
    remaining: AtomicUsize,
    created: Mutex<bool>,
}

/// The temporary name of the `seq`-th file with data while it is written:
/// hidden, and unique to this restore.
fn tmp_name(token: &str, seq: u64) -> Vec<u8> {
    format!(".ferry-restore-{token}-{seq:x}").into_bytes()
}

/// What one batch holds until it is written.
#[derive(Default)]
struct Batch {
    files: Vec<FileJob>,
    /// The directories its entries are in (a directory may be listed more
    /// than once).
    dirs: Vec<RelPath>,
    /// Symlinks, fifos, sockets and devices (parent index, node): metadata
    /// applied through their parent.
    others: Vec<(usize, Node)>,
    /// (parent index, name, hard link group).
    links: Vec<(usize, Vec<u8>, u64)>,
    /// Directories the walk has left, children before their parents:
    /// their metadata is applied once the batch is written.
    closed: Vec<(RelPath, Node)>,
    chunks: usize,
}

impl Batch {
    /// The index of directory `path` in `dirs`, added if it is not the
    /// last one listed.
    fn dir(&mut self, path: &[u8]) -> usize {
        if self.dirs.last().map(Vec::as_slice) != Some(path) {
            self.dirs.push(path.to_vec());
        }
        self.dirs.len() - 1
    }

    fn entries(&self) -> usize {
        self.files.len() + self.others.len() + self.links.len() + self.closed.len()
    }

    fn is_full(&self, limits: &BatchLimits) -> bool {
        self.entries() >= limits.files.max(1) || self.chunks >= limits.chunks.max(1)
    }
}

fn file_path(dirs: &[RelPath], f: &FileJob) -> RelPath {
    join(&dirs[f.dir], &f.node.name)
}

fn join(dir: &[u8], name: &[u8]) -> RelPath {
    if dir.is_empty() {
        name.to_vec()
    } else {
        [dir, b"/", name].concat()
    }
}

fn rel_display(rel: &[u8]) -> String {
    String::from_utf8_lossy(rel).into_owned()
}

fn io_err(op: &'static str, rel: &[u8], e: impl Into<std::io::Error>) -> RepoError {
    RepoError::Io {
        op,
        path: rel_display(rel),
        source: e.into(),
    }
}

/// Set once `openat2` turns out to be missing (kernels before 5.6).
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// Opens `rel` below `root` without following any symlink on the way or
/// at the end. One `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` where
/// the kernel has it, else a walk of `openat(O_NOFOLLOW)` per component.
fn open_beneath(
    root: &OwnedFd,
    rel: &[u8],
    flags: OFlags,
    mode: Mode,
) -> Result<OwnedFd, rustix::io::Errno> {
    open_beneath_with(root, rel, flags, mode, !NO_OPENAT2.load(Ordering::Relaxed))
}

fn open_beneath_with(
    root: &OwnedFd,
    rel: &[u8],
    flags: OFlags,
    mode: Mode,
    try_openat2: bool,
) -> Result<OwnedFd, rustix::io::Errno> {
    let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    // openat2 refuses a mode without O_CREAT.
    let mode = if flags.contains(OFlags::CREATE) {
        mode
    } else {
        Mode::empty()
    };
    if rel.is_empty() {
        return rustix::io::dup(root);
    }
    if try_openat2 {
        let resolve =
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
        match rustix::fs::openat2(root, OsStr::from_bytes(rel), flags, mode, resolve) {
            Err(Errno::NOSYS) => NO_OPENAT2.store(true, Ordering::Relaxed),
            // Filtered by a sandbox, or a rename raced the lookup: the walk
            // below gives the definite answer.
            Err(Errno::PERM) | Err(Errno::AGAIN) => {}
            other => return other,
        }
    }
    let mut parts = rel.split(|b| *b == b'/');
    let last = parts.next_back().unwrap_or_default();
    let mut fd = rustix::io::dup(root)?;
    for c in parts {
        fd = rustix::fs::openat(
            &fd,
            OsStr::from_bytes(c),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
    }
    rustix::fs::openat(&fd, OsStr::from_bytes(last), flags, mode)
}

/// Opens the directory at `rel` (relative to `root`) without following
/// any symlink.
fn open_dir_beneath(root: &OwnedFd, rel: &[u8]) -> Result<OwnedFd, RepoError> {
    open_beneath(root, rel, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())
        .map_err(|e| io_err("open directory", rel, e))
}

fn timestamps(n: &Node) -> Timestamps {
    let t = Timespec {
        tv_sec: n.mtime.sec,
        tv_nsec: n.mtime.nsec as _,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

impl Repository {
    /// Restores snapshot `id` (or the entry at `subpath` in it) into
    /// `target`, which must not exist or be an empty directory.
    pub async fn restore(
        &self,
        id: SnapshotId,
        subpath: Option<&str>,
        target: &Path,
        progress: Option<Arc<dyn Progress>>,
    ) -> Result<RestoreSummary, RepoError> {
        self.restore_with(id, subpath, target, progress, RestoreOptions::default())
            .await
    }

    /// [`Repository::restore`] with explicit options.
    pub async fn restore_with(
        &self,
        id: SnapshotId,
        subpath: Option<&str>,
        target: &Path,
        progress: Option<Arc<dyn Progress>>,
        opts: RestoreOptions,
    ) -> Result<RestoreSummary, RepoError> {
        let started = Instant::now();
        let index = Arc::new(self.load_index().await?);
        let snap = self.load_snapshot(id).await?;
        // Resolve the subpath to a tree (directory) or a single node.
        let mut tree = self.load_tree(&index, &snap.tree).await?;
        let mut single: Option<Node> = None;
        if let Some(sub) = subpath {
            let comps: Vec<&str> = sub.split('/').filter(|c| !c.is_empty()).collect();
            for (i, c) in comps.iter().enumerate() {
                let node = tree
                    .nodes
                    .iter()
                    .find(|n| n.name == c.as_bytes())
                    .cloned()
                    .ok_or_else(|| {
                        RepoError::InvalidInput(format!("path {sub} not found in snapshot {id}"))
                    })?;
                match &node.kind {
                    NodeKind::Dir { subtree } => tree = self.load_tree(&index, subtree).await?,
                    _ if i + 1 == comps.len() => single = Some(node),
                    _ => {
                        return Err(RepoError::InvalidInput(format!(
                            "{c} in path {sub} is not a directory in snapshot {id}"
                        )));
                    }
                }
            }
        }
        if let Some(n) = single {
            tree = Tree { nodes: vec![n] };
        }
        // A whole restore gives the target the backed-up directory's own
        // owner and mode (a database refuses a data directory that is not
        // its user's, mode 0700); a subpath restore leaves the target as is.
        let root_node = snap.root.clone().filter(|_| subpath.is_none());
        match std::fs::read_dir(target) {
            Ok(mut rd) => {
                if rd.next().is_some() {
                    return Err(RepoError::InvalidInput(format!(
                        "target directory {} is not empty",
                        target.display()
                    )));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(target).map_err(|e| RepoError::io("create", target, e))?;
            }
            Err(e) => return Err(RepoError::io("read directory", target, e)),
        }
        let root: OwnedFd = File::open(target)
            .map_err(|e| RepoError::io("open", target, e))?
            .into();
        let root = Arc::new(root);
        let token = {
            let mut r = [0u8; 4];
            rand::RngCore::fill_bytes(&mut rand::rng(), &mut r);
            hex::encode(r)
        };
        let repo = self.clone();
        let handle = tokio::runtime::Handle::current();
        let mut summary = tokio::task::spawn_blocking(move || {
            let mut r = Restorer {
                repo: &repo,
                index: &index,
                handle: &handle,
                root: &root,
                snapshot: id,
                token,
                limits: opts.batch,
                progress,
                started,
                batch: Batch::default(),
                next_file: 0,
                groups: HashMap::new(),
                late_dirs: Vec::new(),
                summary: RestoreSummary::default(),
                written: Arc::new(AtomicU64::new(0)),
                files_done: Arc::new(AtomicU64::new(0)),
                decode: Arc::default(),
            };
            let top: &OwnedFd = &root;
            r.create_tree(top, b"", tree)?;
            if let Some(node) = root_node {
                // Last of all, after every child (its times and mode).
                r.late_dirs.push((Vec::new(), node));
            }
            r.finish()?;
            Ok::<_, RepoError>(r.summary)
        })
        .await
        .map_err(|e| RepoError::Task(e.to_string()))??;
        summary.duration_ms = started.elapsed().as_millis() as u64;
        tracing::info!(snapshot = %id, files = summary.files, bytes = summary.bytes_written, batches = summary.batches, "restore done");
        Ok(summary)
    }
}

/// Removes the files of a failed batch that are still under their
/// temporary names (best effort: the restore has failed already).
fn remove_incomplete(root: &OwnedFd, files: &[FileJob], dirs: &[RelPath]) {
    for f in files {
        let created = *f.created.lock().unwrap_or_else(|e| e.into_inner());
        if f.remaining.load(Ordering::Acquire) == 0 || !created {
            continue;
        }
        if let Ok(dir) = open_dir_beneath(root, &dirs[f.dir])
            && let Err(e) = rustix::fs::unlinkat(&dir, OsStr::from_bytes(&f.tmp), AtFlags::empty())
        {
            tracing::warn!(path = %rel_display(&file_path(dirs, f)), error = %e, "cannot remove an incomplete file");
        }
    }
}

/// The walk over the snapshot's trees and the batch being filled.
struct Restorer<'a> {
    repo: &'a Repository,
    index: &'a Index,
    handle: &'a tokio::runtime::Handle,
    root: &'a Arc<OwnedFd>,
    snapshot: SnapshotId,
    /// Makes this restore's temporary names unique.
    token: String,
    limits: BatchLimits,
    progress: Option<Arc<dyn Progress>>,
    started: Instant,
    batch: Batch,
    /// Files with data seen so far (numbers their temporary names).
    next_file: u64,
    /// Hard link group → (directory, name) of its first file.
    groups: HashMap<u64, (RelPath, Vec<u8>)>,
    /// Directories whose metadata is applied after the last batch (see
    /// [`Restorer::close_dir`]), children before their parents.
    late_dirs: Vec<(RelPath, Node)>,
    summary: RestoreSummary,
    written: Arc<AtomicU64>,
    files_done: Arc<AtomicU64>,
    /// Decoding buffers, one set per segment being written.
    decode: Arc<Mutex<Vec<DecodeBuffer>>>,
}

impl Restorer<'_> {
    /// Creates the entries of `tree` in directory `dir` (at `path` below the
    /// target), which restore created itself, writing a batch whenever one
    /// is full.
    fn create_tree(&mut self, dir: &OwnedFd, path: &[u8], tree: Tree) -> Result<(), RepoError> {
        // The subdirectories' trees, fetched a few at a time ahead of the
        // walk. A tree that cannot be fetched is fetched again in order
        // below, so its error comes after the checks of the entries before it.
        let ids: Vec<BlobId> = tree
            .nodes
            .iter()
            .filter_map(|n| match &n.kind {
                NodeKind::Dir { subtree } => Some(*subtree),
                _ => None,
            })
            .collect();
        let mut subtrees: HashMap<BlobId, Tree> = HashMap::new();
        // Subdirectories reached so far, and fetched so far.
        let (mut reached, mut fetched) = (0usize, 0usize);
        for node in tree.nodes {
            self.repo.check_cancel()?;
            let rel = join(path, &node.name);
            if let Some(reason) = unsafe_name_reason(&node.name) {
                return Err(RepoError::UnsafeEntry {
                    path: rel_display(&rel),
                    reason: reason.into(),
                });
            }
            match &node.kind {
                NodeKind::Dir { subtree } => {
                    let subtree = *subtree;
                    let name = OsStr::from_bytes(&node.name);
                    rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o700))
                        .map_err(|e| io_err("create directory", &rel, e))?;
                    let sub_fd = rustix::fs::openat(
                        dir,
                        name,
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(|e| io_err("open directory", &rel, e))?;
                    self.summary.dirs += 1;
                    if reached >= fetched {
                        fetched = (reached + TREE_PREFETCH).min(ids.len());
                        self.prefetch(&ids[reached..fetched], &mut subtrees);
                    }
                    reached += 1;
                    let sub = match subtrees.remove(&subtree) {
                        Some(t) => t,
                        // Not fetched ahead, or the same tree twice in one
                        // directory.
                        None => self
                            .handle
                            .block_on(self.repo.load_tree(self.index, &subtree))?,
                    };
                    self.create_tree(&sub_fd, &rel, sub)?;
                    drop(sub_fd);
                    self.close_dir(rel, node);
                }
                NodeKind::File { .. } | NodeKind::SparseFile { .. } => {
                    self.add_file(dir, path, &rel, node)?
                }
                NodeKind::Symlink { target } => {
                    rustix::fs::symlinkat(
                        OsStr::from_bytes(target),
                        dir,
                        OsStr::from_bytes(&node.name),
                    )
                    .map_err(|e| io_err("create symlink", &rel, e))?;
                    self.summary.symlinks += 1;
                    let di = self.batch.dir(path);
                    self.batch.others.push((di, node));
                }
                NodeKind::Fifo | NodeKind::Socket | NodeKind::Device { .. } => {
                    let (ft, dev, what) = match node.kind {
                        NodeKind::Fifo => (rustix::fs::FileType::Fifo, 0, "fifo"),
                        NodeKind::Socket => (rustix::fs::FileType::Socket, 0, "socket"),
                        NodeKind::Device { block: true, rdev } => {
                            (rustix::fs::FileType::BlockDevice, rdev, "block device")
                        }
                        NodeKind::Device { rdev, .. } => (
                            rustix::fs::FileType::CharacterDevice,
                            rdev,
                            "character device",
                        ),
                        _ => unreachable!("invariant: matched above"),
                    };
                    let name = OsStr::from_bytes(&node.name);
                    match rustix::fs::mknodat(dir, name, ft, Mode::from_raw_mode(0o600), dev) {
                        Ok(()) => {
                            self.summary.specials += 1;
                            let di = self.batch.dir(path);
                            self.batch.others.push((di, node));
                        }
                        // Device nodes need privilege (CAP_MKNOD): without
                        // it the entry is reported as not restored.
                        Err(Errno::PERM) if matches!(node.kind, NodeKind::Device { .. }) => {
                            tracing::warn!(path = %rel_display(&rel), "cannot create {what} without privilege; not restored");
                            self.summary.skipped.push(format!(
                                "{}: {what} needs privilege to create",
                                rel_display(&rel)
                            ));
                        }
                        Err(e) => return Err(io_err("create", &rel, e)),
                    }
                }
            }
            if self.batch.is_full(&self.limits) {
                self.write_batch()?;
            }
        }
        Ok(())
    }

    /// Fetches the trees `ids` concurrently into `into`; failures are left
    /// out (the tree is fetched again when its turn comes).
    fn prefetch(&self, ids: &[BlobId], into: &mut HashMap<BlobId, Tree>) {
        let (repo, index) = (self.repo, self.index);
        let trees: Vec<(BlobId, Tree)> = self.handle.block_on(async {
            futures::stream::iter(ids.iter().copied())
                .map(|id| async move { repo.load_tree(index, &id).await.map(|t| (id, t)) })
                .buffer_unordered(TREE_PREFETCH)
                .filter_map(|r| async move { r.ok() })
                .collect()
                .await
        });
        into.extend(trees);
    }

    /// A regular file: a hard link to a file seen before, a file without
    /// data (created complete now), or a file for the batch.
    fn add_file(
        &mut self,
        dir: &OwnedFd,
        path: &[u8],
        rel: &[u8],
        node: Node,
    ) -> Result<(), RepoError> {
        let hardlink = node.kind.hardlink();
        if let Some(g) = hardlink {
            if self.groups.contains_key(&g) {
                let di = self.batch.dir(path);
                self.batch.links.push((di, node.name, g));
                self.summary.hardlinks += 1;
                return Ok(());
            }
            self.groups.insert(g, (path.to_vec(), node.name.clone()));
        }
        self.summary.files += 1;
        self.summary.bytes_total += node.size;
        let chunks = node.kind.data_blobs().count();
        if chunks == 0 {
            // Nothing to fetch (empty, or all hole): create it complete now.
            let fd = rustix::fs::openat(
                dir,
                OsStr::from_bytes(&node.name),
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .map_err(|e| io_err("create", rel, e))?;
            if node.size > 0 {
                rustix::fs::ftruncate(&fd, node.size).map_err(|e| io_err("resize", rel, e))?;
            }
            apply_fd_metadata(fd.as_fd(), &node, rel)?;
            self.files_done.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let di = self.batch.dir(path);
        let seq = self.next_file;
        self.next_file += 1;
        self.batch.files.push(FileJob {
            dir: di,
            node,
            tmp: tmp_name(&self.token, seq),
            remaining: AtomicUsize::new(chunks),
            created: Mutex::new(false),
        });
        self.batch.chunks += chunks;
        Ok(())
    }

    /// The walk has left directory `rel`: its metadata is applied after the
    /// batch that holds its last entries. Without privilege, a directory
    /// its owner may not search is kept for after the last batch, so a hard
    /// link made later can still reach a file in it.
    fn close_dir(&mut self, rel: RelPath, node: Node) {
        if node.mode & 0o100 == 0 && !is_root() {
            self.late_dirs.push((rel, node));
        } else {
            self.batch.closed.push((rel, node));
        }
    }

    /// Writes the current batch: its files' data, then its hard links, then
    /// the metadata of its other entries and of the directories left.
    fn write_batch(&mut self) -> Result<(), RepoError> {
        let Batch {
            files,
            dirs,
            others,
            links,
            closed,
            chunks,
        } = std::mem::take(&mut self.batch);
        if files.is_empty() && others.is_empty() && links.is_empty() && closed.is_empty() {
            return Ok(());
        }
        self.summary.batches += 1;
        let root = &**self.root;
        let dirs = Arc::new(dirs);
        if !files.is_empty() {
            let files = Arc::new(files);
            let n = files.len();
            match self.handle.block_on(self.write_data(&files, &dirs)) {
                Ok(packs) => self.summary.packs_read += packs,
                Err(e) => {
                    // Nothing half-written keeps a real name: remove every
                    // file of this batch still under its temporary name.
                    remove_incomplete(root, &files, &dirs);
                    return Err(e);
                }
            }
            tracing::debug!(
                batch = self.summary.batches,
                files = n,
                chunks,
                elapsed_ms = self.started.elapsed().as_millis() as u64,
                "restore: batch written"
            );
        }
        for (di, name, g) in &links {
            let (first_dir, first_name) = self
                .groups
                .get(g)
                .expect("invariant: a link's group has a first file");
            let fd1 = open_dir_beneath(root, first_dir)?;
            let fd2 = open_dir_beneath(root, &dirs[*di])?;
            rustix::fs::linkat(
                &fd1,
                OsStr::from_bytes(first_name),
                &fd2,
                OsStr::from_bytes(name),
                AtFlags::empty(),
            )
            .map_err(|e| io_err("link", &join(&dirs[*di], name), e))?;
        }
        for (di, node) in &others {
            let rel = join(&dirs[*di], &node.name);
            let dir = open_dir_beneath(root, &dirs[*di])?;
            apply_entry_metadata(&dir, node, &rel)?;
        }
        for (path, node) in &closed {
            let fd = open_dir_beneath(root, path)?;
            apply_fd_metadata(fd.as_fd(), node, path)?;
        }
        Ok(())
    }

    /// The data of one batch's files, grouped by pack; the number of packs
    /// read.
    async fn write_data(
        &self,
        files: &Arc<Vec<FileJob>>,
        dirs: &Arc<Vec<RelPath>>,
    ) -> Result<u64, RepoError> {
        let mut by_pack: HashMap<PackId, HashMap<BlobId, BlobTargets>> = HashMap::new();
        for (fi, f) in files.iter().enumerate() {
            for (start, content) in f.node.kind.runs().unwrap_or_default() {
                let mut off = start;
                for c in content {
                    let loc = self.index.get(c).ok_or_else(|| RepoError::MissingBlob {
                        blob: *c,
                        context: format!(
                            "file {} of snapshot {}; if an index object was lost, `ferry-agent repo repair index` rebuilds it from the packs",
                            rel_display(&file_path(dirs, f)),
                            self.snapshot
                        ),
                    })?;
                    let slot = by_pack
                        .entry(loc.pack)
                        .or_default()
                        .entry(*c)
                        .or_insert_with(|| (loc.entry, Vec::new()));
                    slot.1.push((fi, off));
                    off += loc.entry.raw_len as u64;
                }
            }
        }
        let packs = by_pack.len() as u64;
        // Read each pack in segments of nearby blobs of at most SEGMENT
        // bytes, so memory stays small whatever the pack size. Blobs stay
        // in pack order, which is the order backup read the files in.
        let mut segments: Vec<(PackId, Vec<BlobTargets>)> = Vec::new();
        for (pack_id, blobs) in by_pack {
            let mut sorted: Vec<BlobTargets> = blobs.into_values().collect();
            sorted.sort_by_key(|(e, _)| e.offset);
            let mut seg: Vec<BlobTargets> = Vec::new();
            let mut seg_start = 0u64;
            for (e, targets) in sorted {
                let end = e.offset as u64 + e.length as u64;
                if !seg.is_empty() && end - seg_start > SEGMENT {
                    segments.push((pack_id, std::mem::take(&mut seg)));
                }
                if seg.is_empty() {
                    seg_start = e.offset as u64;
                }
                seg.push((e, targets));
            }
            if !seg.is_empty() {
                segments.push((pack_id, seg));
            }
        }
        let started = self.started;
        let results: Vec<Result<(), RepoError>> = futures::stream::iter(segments)
            .map(|(pack_id, blobs)| {
                let repo = self.repo.clone();
                let root = self.root.clone();
                let files = files.clone();
                let dirs = dirs.clone();
                let written = self.written.clone();
                let files_done = self.files_done.clone();
                let progress = self.progress.clone();
                let decode = self.decode.clone();
                async move {
                    let start = blobs.first().map(|(e, _)| e.offset as u64).unwrap_or(0);
                    let end = blobs
                        .iter()
                        .map(|(e, _)| e.offset as u64 + e.length as u64)
                        .max()
                        .unwrap_or(0);
                    let key = object_key(&pack_id.object_key())?;
                    let data = repo
                        .io(repo.store().get_range(&key, start..end))
                        .await
                        .map_err(|e| match e {
                            RepoError::Store(source) => RepoError::PackRead {
                                pack: pack_id,
                                blob: blobs.first().map(|(e, _)| e.id).unwrap_or(BlobId([0; 32])),
                                source: Box::new(source),
                            },
                            other => other,
                        })?;
                    tokio::task::spawn_blocking(move || {
                        // Blobs are decrypted where they lie: the segment's
                        // buffer is taken over (copied only if shared).
                        let mut data = Vec::from(data);
                        let out = Output {
                            root: &root,
                            dirs: &dirs,
                            files: &files,
                            written: &written,
                            files_done: &files_done,
                        };
                        let mut bufs = decode
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .pop()
                            .unwrap_or_default();
                        let res = out
                            .write_pack_blobs(&repo, pack_id, &mut data, start, &blobs, &mut bufs);
                        decode.lock().unwrap_or_else(|e| e.into_inner()).push(bufs);
                        res?;
                        if let Some(p) = &progress {
                            p.update(&ProgressInfo {
                                bytes: written.load(Ordering::Relaxed),
                                files: files_done.load(Ordering::Relaxed),
                                elapsed: started.elapsed(),
                            });
                        }
                        Ok(())
                    })
                    .await
                    .map_err(|e| RepoError::Task(e.to_string()))?
                }
            })
            .buffer_unordered(PARALLEL_SEGMENTS)
            .collect()
            .await;
        let failed = results.into_iter().find_map(Result::err).or_else(|| {
            files.iter().find_map(|f| {
                (f.remaining.load(Ordering::Acquire) != 0).then(|| RepoError::Corrupt {
                    object: format!("snapshot {}", self.snapshot),
                    reason: format!(
                        "file {} was not completely restored",
                        rel_display(&file_path(dirs, f))
                    ),
                })
            })
        });
        match failed {
            Some(e) => Err(e),
            None => Ok(packs),
        }
    }

    /// Writes the last batch, applies the metadata kept for the end, and
    /// flushes the target's filesystem.
    fn finish(&mut self) -> Result<(), RepoError> {
        self.write_batch()?;
        let root = &**self.root;
        for (path, node) in &self.late_dirs {
            let fd = open_dir_beneath(root, path)?;
            apply_fd_metadata(fd.as_fd(), node, path)?;
        }
        self.summary.bytes_written = self.written.load(Ordering::Relaxed);
        if let Some(p) = &self.progress {
            p.update(&ProgressInfo {
                bytes: self.summary.bytes_written,
                files: self.files_done.load(Ordering::Relaxed),
                elapsed: self.started.elapsed(),
            });
        }
        // Durable before it is reported done: one flush of the target's
        // filesystem (every file and directory restore wrote) costs far
        // less than an fsync per file.
        rustix::fs::syncfs(root).map_err(|e| io_err("flush", b"", e))
    }
}

/// Applies the metadata of a symlink, fifo, socket or device node `node`
/// (named in `dir`) to that entry itself, never to what a symlink swapped
/// in its place would point to. A symlink is changed by name with
/// no-follow calls; the others are opened as a path handle (`O_PATH |
/// O_NOFOLLOW`), checked to be the kind restore created, and changed
/// through that handle.
fn apply_entry_metadata(dir: &OwnedFd, node: &Node, rel: &[u8]) -> Result<(), RepoError> {
    let name = OsStr::from_bytes(&node.name);
    let owner = (
        Some(rustix::fs::Uid::from_raw_unchecked(node.uid)),
        Some(rustix::fs::Gid::from_raw_unchecked(node.gid)),
    );
    if matches!(node.kind, NodeKind::Symlink { .. }) {
        if is_root() {
            rustix::fs::chownat(dir, name, owner.0, owner.1, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| io_err("chown", rel, e))?;
        }
        return rustix::fs::utimensat(dir, name, &timestamps(node), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| io_err("set times of", rel, e));
    }
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_err("open", rel, e))?;
    let st = rustix::fs::fstat(&fd).map_err(|e| io_err("stat", rel, e))?;
    let expected = match node.kind {
        NodeKind::Fifo => rustix::fs::FileType::Fifo,
        NodeKind::Socket => rustix::fs::FileType::Socket,
        NodeKind::Device { block: true, .. } => rustix::fs::FileType::BlockDevice,
        _ => rustix::fs::FileType::CharacterDevice,
    };
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != expected {
        return Err(RepoError::UnsafeEntry {
            path: rel_display(rel),
            reason: "it was replaced during the restore".into(),
        });
    }
    if is_root() {
        rustix::fs::chownat(&fd, "", owner.0, owner.1, AtFlags::EMPTY_PATH)
            .map_err(|e| io_err("chown", rel, e))?;
    }
    // A path handle takes no chmod or utimens of its own; its /proc link
    // names exactly the inode it holds.
    let proc = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
    rustix::fs::chmod(proc.as_str(), Mode::from_raw_mode(node.mode))
        .map_err(|e| io_err("chmod", rel, e))?;
    rustix::fs::utimensat(
        rustix::fs::CWD,
        proc.as_str(),
        &timestamps(node),
        AtFlags::empty(),
    )
    .map_err(|e| io_err("set times of", rel, e))?;
    Ok(())
}

fn apply_fd_metadata(
    fd: std::os::fd::BorrowedFd<'_>,
    node: &Node,
    rel: &[u8],
) -> Result<(), RepoError> {
    if is_root() {
        rustix::fs::fchown(
            fd,
            Some(rustix::fs::Uid::from_raw_unchecked(node.uid)),
            Some(rustix::fs::Gid::from_raw_unchecked(node.gid)),
        )
        .map_err(|e| io_err("chown", rel, e))?;
    }
    for (k, v) in &node.xattrs {
        if let Err(e) = rustix::fs::fsetxattr(fd, OsStr::from_bytes(k), v, XattrFlags::empty()) {
            tracing::warn!(path = %rel_display(rel), xattr = %String::from_utf8_lossy(k), error = %e, "cannot restore extended attribute");
        }
    }
    // chmod after chown: chown clears setuid/setgid bits.
    rustix::fs::fchmod(fd, Mode::from_raw_mode(node.mode)).map_err(|e| io_err("chmod", rel, e))?;
    rustix::fs::futimens(fd, &timestamps(node)).map_err(|e| io_err("set times of", rel, e))?;
    Ok(())
}

/// Where the data workers write: the target and the files of one batch.
struct Output<'a> {
    root: &'a OwnedFd,
    dirs: &'a [RelPath],
    files: &'a [FileJob],
    written: &'a AtomicU64,
    files_done: &'a AtomicU64,
}

impl Output<'_> {
    /// Opens file `fi` for writing, creating it (`O_EXCL`) if no worker has
    /// yet. A new file is sized to its final length unless `whole` (this
    /// write fills it entirely), so trailing holes stay holes.
    fn open_file(&self, fi: usize, whole: bool) -> Result<File, RepoError> {
        let f = &self.files[fi];
        let path = join(&self.dirs[f.dir], &f.tmp);
        // The lock only orders creation against later opens of the same
        // file; a poisoned lock still holds a valid flag.
        let mut created = f.created.lock().unwrap_or_else(|e| e.into_inner());
        if *created {
            let fd = open_beneath(self.root, &path, OFlags::WRONLY, Mode::empty())
                .map_err(|e| io_err("open", &path, e))?;
            return Ok(File::from(fd));
        }
        let fd = open_beneath(
            self.root,
            &path,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| io_err("create", &path, e))?;
        if !whole {
            rustix::fs::ftruncate(&fd, f.node.size).map_err(|e| io_err("resize", &path, e))?;
        }
        *created = true;
        Ok(File::from(fd))
    }

    /// Decodes the blobs of one pack segment (`data` starts at pack offset
    /// `start`) and writes each into every place it fills. The worker
    /// writing a file's last chunk applies the file's metadata.
    fn write_pack_blobs(
        &self,
        repo: &Repository,
        pack_id: PackId,
        data: &mut [u8],
        start: u64,
        blobs: &[BlobTargets],
        bufs: &mut DecodeBuffer,
    ) -> Result<(), RepoError> {
        let mut open: HashMap<usize, File> = HashMap::new();
        for (entry, targets) in blobs {
            repo.check_cancel()?;
            let lo = (entry.offset as u64 - start) as usize;
            let hi = lo + entry.length as usize;
            let stored = data.get_mut(lo..hi).ok_or_else(|| RepoError::Corrupt {
                object: format!("pack {pack_id}"),
                reason: format!("blob {} is truncated", entry.id),
            })?;
            let plain =
                pack::decode_blob_in_place(repo.key(), entry, stored, bufs).map_err(|source| {
                    self.in_files(
                        targets,
                        RepoError::Blob {
                            pack: pack_id,
                            source: Box::new(source),
                        },
                    )
                })?;
            for (fi, off) in targets {
                let f = &self.files[*fi];
                let file = match open.entry(*fi) {
                    std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                    std::collections::hash_map::Entry::Vacant(v) => {
                        let whole = matches!(f.node.kind, NodeKind::File { .. })
                            && *off == 0
                            && plain.len() as u64 == f.node.size;
                        v.insert(self.open_file(*fi, whole)?)
                    }
                };
                // Zeros are written too: the source had data here (its
                // holes are never in a run).
                file.write_all_at(plain, *off)
                    .map_err(|e| io_err("write", &file_path(self.dirs, f), e))?;
                self.written
                    .fetch_add(plain.len() as u64, Ordering::Relaxed);
                if f.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                    self.finish_file(f, file)?;
                    open.remove(fi);
                    self.files_done.fetch_add(1, Ordering::Relaxed);
                }
            }
            if open.len() > OPEN_FILES_PER_WORKER {
                open.clear();
            }
        }
        Ok(())
    }
}

impl Output<'_> {
    /// A complete file: its metadata, then renamed from its temporary name
    /// to its own (the whole restore is flushed to disk at the end).
    fn finish_file(&self, f: &FileJob, file: &File) -> Result<(), RepoError> {
        let rel = file_path(self.dirs, f);
        apply_fd_metadata(file.as_fd(), &f.node, &rel)?;
        let dir = open_dir_beneath(self.root, &self.dirs[f.dir])?;
        rustix::fs::renameat_with(
            &dir,
            OsStr::from_bytes(&f.tmp),
            &dir,
            OsStr::from_bytes(&f.node.name),
            rustix::fs::RenameFlags::NOREPLACE,
        )
        .map_err(|e| io_err("rename into place", &rel, e))
    }

    /// `err`, naming the files a bad blob belongs to.
    fn in_files(&self, targets: &[(usize, u64)], err: RepoError) -> RepoError {
        let mut names: Vec<String> = targets
            .iter()
            .map(|(fi, _)| rel_display(&file_path(self.dirs, &self.files[*fi])))
            .collect();
        names.sort();
        names.dedup();
        let files = match names.len() {
            0 | 1 => names.concat(),
            n => format!("{} (and {} more)", names[0], n - 1),
        };
        RepoError::FileData {
            files,
            source: Box::new(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both ways of opening below the target refuse a symlink anywhere in
    /// the path and create only where asked.
    #[test]
    fn open_beneath_never_follows_symlinks() {
        let tmp = tempfile::tempdir().expect("tmp");
        let t = tmp.path();
        std::fs::create_dir_all(t.join("d/e")).expect("mkdir");
        std::fs::write(t.join("d/e/f"), b"data").expect("write");
        std::fs::write(tmp.path().join("outside"), b"secret").expect("write");
        std::os::unix::fs::symlink("d", t.join("link")).expect("symlink");
        std::os::unix::fs::symlink("f", t.join("d/e/lf")).expect("symlink");
        std::os::unix::fs::symlink("/", t.join("d/abs")).expect("symlink");
        let root: OwnedFd = File::open(t).expect("open").into();
        for openat2 in [true, false] {
            let open = |rel: &[u8], flags: OFlags| {
                open_beneath_with(&root, rel, flags, Mode::from_raw_mode(0o600), openat2)
            };
            let fd = open(b"d/e/f", OFlags::RDONLY).expect("plain path opens");
            let mut buf = [0u8; 8];
            let n = rustix::io::read(&fd, &mut buf).expect("read");
            assert_eq!(&buf[..n], b"data", "openat2={openat2}");
            for bad in [&b"link/e/f"[..], b"d/e/lf", b"d/abs/etc/passwd", b"link"] {
                assert!(
                    open(bad, OFlags::RDONLY).is_err(),
                    "{} was followed (openat2={openat2})",
                    String::from_utf8_lossy(bad)
                );
            }
            // Creating through a symlinked directory fails and creates nothing.
            assert!(open(b"link/new", OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL).is_err());
            assert!(!t.join("d/new").exists(), "openat2={openat2}");
            // O_EXCL: a second creation of the same name fails.
            let name = if openat2 { &b"d/e/n1"[..] } else { b"d/e/n2" };
            open(name, OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL).expect("create");
            let err = open(name, OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL)
                .expect_err("second create");
            assert_eq!(err, Errno::EXIST, "openat2={openat2}");
        }
    }

    /// Metadata meant for a fifo never reaches a file a symlink swapped in
    /// for it points to.
    #[test]
    fn entry_metadata_never_follows_a_swapped_symlink() {
        let tmp = tempfile::tempdir().expect("tmp");
        let t = tmp.path().join("target");
        std::fs::create_dir(&t).expect("mkdir");
        let outside = tmp.path().join("outside");
        std::fs::write(&outside, b"secret").expect("write");
        std::fs::set_permissions(
            &outside,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .expect("chmod");
        let node = Node {
            name: b"pipe".to_vec(),
            kind: NodeKind::Fifo,
            mode: 0o777,
            uid: 0,
            gid: 0,
            mtime: crate::tree::Timestamp { sec: 1, nsec: 0 },
            ctime: crate::tree::Timestamp::default(),
            inode: 0,
            dev: 0,
            size: 0,
            xattrs: Vec::new(),
        };
        let dir: OwnedFd = File::open(&t).expect("open").into();
        let mkfifo = || {
            rustix::fs::mknodat(
                &dir,
                "pipe",
                rustix::fs::FileType::Fifo,
                Mode::from_raw_mode(0o600),
                0,
            )
            .expect("mkfifo")
        };
        // Restore created the fifo; someone replaced it with a symlink.
        mkfifo();
        std::fs::remove_file(t.join("pipe")).expect("rm");
        std::os::unix::fs::symlink(&outside, t.join("pipe")).expect("symlink");
        assert!(apply_entry_metadata(&dir, &node, b"pipe").is_err());
        let md = std::fs::metadata(&outside).expect("stat");
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&md.permissions()) & 0o777,
            0o600
        );
        assert_ne!(std::os::unix::fs::MetadataExt::mtime(&md), 1);
        // On the real fifo it applies.
        std::fs::remove_file(t.join("pipe")).expect("rm");
        mkfifo();
        apply_entry_metadata(&dir, &node, b"pipe").expect("applies");
        let md = std::fs::symlink_metadata(t.join("pipe")).expect("stat");
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&md.permissions()) & 0o777,
            0o777
        );
        assert_eq!(std::os::unix::fs::MetadataExt::mtime(&md), 1);
    }
}
