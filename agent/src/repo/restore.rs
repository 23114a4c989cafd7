//! Restore of a snapshot (or a subtree) into a target directory.
//!
//! Every entry is created relative to a directory handle that restore
//! itself created, with `O_NOFOLLOW`/`O_EXCL`, after checking the name;
//! nothing is ever written through a symlink and nothing lands outside the
//! target. Data: needed blobs are grouped by pack, packs are fetched in
//! parallel (bounded), each blob is authenticated and re-hashed, then
//! written with positioned writes; all-zero chunks are skipped so holes
//! stay holes. A file counts as done only when every chunk was verified and
//! written; metadata is applied last (directories deepest first).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use futures::StreamExt;
use rustix::fs::{AtFlags, Mode, OFlags, Timespec, Timestamps, XattrFlags};
use serde::Serialize;

use super::backup::{Progress, ProgressInfo};
use super::format::{BlobId, PackId, SnapshotId};
use super::index::Index;
use super::pack::{self, PackEntry};
use super::tree::{Node, NodeKind, Tree, unsafe_name_reason};
use super::{RepoError, Repository, object_key, with_retry};

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct RestoreSummary {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    pub bytes_written: u64,
    pub bytes_total: u64,
    pub packs_read: u64,
    pub duration_ms: u64,
}

/// A path below the target, one name per component.
type RelPath = Vec<Vec<u8>>;
/// The blobs needed from one pack, each with the (file, offset) pairs it fills.
type PackPlan = HashMap<BlobId, (PackEntry, Vec<(usize, u64)>)>;

/// The most bytes of one pack fetched in one request (a larger blob is
/// fetched alone).
const SEGMENT: u64 = 4 << 20;

/// One regular file to fill.
struct FileJob {
    rel: Vec<Vec<u8>>,
    node: Node,
    remaining: AtomicUsize,
}

struct DirJob {
    rel: Vec<Vec<u8>>,
    node: Option<Node>,
}

struct Plan {
    files: Vec<FileJob>,
    dirs: Vec<DirJob>,
    /// Symlinks and fifos: metadata applied through their parent.
    others: Vec<(Vec<Vec<u8>>, Node)>,
    /// (link path, path of the first entry of its group).
    links: Vec<(RelPath, RelPath)>,
    summary: RestoreSummary,
}

fn rel_display(rel: &[Vec<u8>]) -> String {
    let parts: Vec<String> = rel
        .iter()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    parts.join("/")
}

fn io_err(op: &'static str, rel: &[Vec<u8>], e: impl Into<std::io::Error>) -> RepoError {
    RepoError::Io {
        op,
        path: rel_display(rel),
        source: e.into(),
    }
}

/// Opens the directory at `rel` (relative to `root`) without following
/// any symlink.
fn open_dir_beneath(root: &OwnedFd, rel: &[Vec<u8>]) -> Result<OwnedFd, RepoError> {
    let mut fd = rustix::io::dup(root).map_err(|e| io_err("open", rel, e))?;
    for c in rel {
        fd = rustix::fs::openat(
            &fd,
            OsStr::from_bytes(c),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io_err("open directory", rel, e))?;
    }
    Ok(fd)
}

fn open_file_beneath(root: &OwnedFd, rel: &[Vec<u8>]) -> Result<File, RepoError> {
    let (name, parent) = rel
        .split_last()
        .ok_or_else(|| RepoError::InvalidInput("empty path".into()))?;
    let dir = open_dir_beneath(root, parent)?;
    let fd = rustix::fs::openat(
        &dir,
        OsStr::from_bytes(name),
        OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_err("open", rel, e))?;
    Ok(File::from(fd))
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

        // Phase 1: structure.
        let plan = {
            let repo = self.clone();
            let index = index.clone();
            let root = root.clone();
            let handle = tokio::runtime::Handle::current();
            tokio::task::spawn_blocking(move || {
                let mut plan = Plan {
                    files: Vec::new(),
                    dirs: Vec::new(),
                    others: Vec::new(),
                    links: Vec::new(),
                    summary: RestoreSummary::default(),
                };
                let mut groups = HashMap::new();
                create_tree(
                    &repo,
                    &index,
                    &handle,
                    &root,
                    &tree,
                    &mut Vec::new(),
                    &mut plan,
                    &mut groups,
                )?;
                Ok::<_, RepoError>(plan)
            })
            .await
            .map_err(|e| RepoError::Task(e.to_string()))??
        };
        let Plan {
            files,
            dirs,
            others,
            links,
            mut summary,
        } = plan;
        let files = Arc::new(files);

        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            files = files.len(),
            "restore: structure created"
        );
        // Phase 2: data, grouped by pack.
        let mut by_pack: HashMap<PackId, PackPlan> = HashMap::new();
        for (fi, f) in files.iter().enumerate() {
            if let NodeKind::File { content, .. } = &f.node.kind {
                let mut off = 0u64;
                for c in content {
                    let loc = index.get(c).ok_or_else(|| RepoError::MissingBlob {
                        blob: *c,
                        context: format!("file {} of snapshot {id}", rel_display(&f.rel)),
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
        let written = Arc::new(AtomicU64::new(0));
        let files_done = Arc::new(AtomicU64::new(0));
        summary.packs_read = by_pack.len() as u64;
        // Read each pack in segments of nearby blobs of at most SEGMENT
        // bytes, so memory stays small whatever the pack size.
        let mut packs: Vec<(PackId, PackPlan)> = Vec::new();
        for (pack_id, blobs) in by_pack {
            let mut sorted: Vec<_> = blobs.into_iter().collect();
            sorted.sort_by_key(|(_, (e, _))| e.offset);
            let mut seg: PackPlan = HashMap::new();
            let mut seg_start = 0u64;
            for (id, (e, targets)) in sorted {
                let end = e.offset as u64 + e.length as u64;
                if !seg.is_empty() && end - seg_start > SEGMENT {
                    packs.push((pack_id, std::mem::take(&mut seg)));
                }
                if seg.is_empty() {
                    seg_start = e.offset as u64;
                }
                seg.insert(id, (e, targets));
            }
            if !seg.is_empty() {
                packs.push((pack_id, seg));
            }
        }
        let results: Vec<Result<(), RepoError>> = futures::stream::iter(packs)
            .map(|(pack_id, blobs)| {
                let repo = self.clone();
                let root = root.clone();
                let files = files.clone();
                let written = written.clone();
                let files_done = files_done.clone();
                let progress = progress.clone();
                async move {
                    let start = blobs
                        .values()
                        .map(|(e, _)| e.offset as u64)
                        .min()
                        .unwrap_or(0);
                    let end = blobs
                        .values()
                        .map(|(e, _)| e.offset as u64 + e.length as u64)
                        .max()
                        .unwrap_or(0);
                    let key = object_key(&pack_id.object_key())?;
                    let data = with_retry(|| repo.store().get_range(&key, start..end))
                        .await
                        .map_err(|source| RepoError::PackRead {
                            pack: pack_id,
                            blob: blobs.keys().next().copied().unwrap_or(BlobId([0; 32])),
                            source: Box::new(source),
                        })?;
                    tokio::task::spawn_blocking(move || {
                        write_pack_blobs(
                            &repo,
                            pack_id,
                            &data,
                            start,
                            &blobs,
                            &root,
                            &files,
                            &written,
                            &files_done,
                        )?;
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
            .buffer_unordered(4)
            .collect()
            .await;
        for r in results {
            r?;
        }
        for f in files.iter() {
            if f.remaining.load(Ordering::Acquire) != 0 {
                return Err(RepoError::Corrupt {
                    object: format!("snapshot {id}"),
                    reason: format!("file {} was not completely restored", rel_display(&f.rel)),
                });
            }
        }
        summary.bytes_written = written.load(Ordering::Relaxed);

        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "restore: data written"
        );
        // Phase 3: links and metadata.
        let root2 = root.clone();
        let files2 = files.clone();
        tokio::task::spawn_blocking(move || -> Result<(), RepoError> {
            let root = &*root2;
            for (link, first) in &links {
                let (fname, fparent) = first.split_last().expect("invariant: non-empty path");
                let (lname, lparent) = link.split_last().expect("invariant: non-empty path");
                let fd1 = open_dir_beneath(root, fparent)?;
                let fd2 = open_dir_beneath(root, lparent)?;
                rustix::fs::linkat(
                    &fd1,
                    OsStr::from_bytes(fname),
                    &fd2,
                    OsStr::from_bytes(lname),
                    AtFlags::empty(),
                )
                .map_err(|e| io_err("link", link, e))?;
            }
            for f in files2.iter() {
                let file = open_file_beneath(root, &f.rel)?;
                apply_fd_metadata(file.as_fd(), &f.node, &f.rel)?;
            }
            for (rel, node) in &others {
                let (name, parent) = rel.split_last().expect("invariant: non-empty path");
                let dir = open_dir_beneath(root, parent)?;
                let name = OsStr::from_bytes(name);
                if is_root() {
                    rustix::fs::chownat(
                        &dir,
                        name,
                        Some(rustix::fs::Uid::from_raw_unchecked(node.uid)),
                        Some(rustix::fs::Gid::from_raw_unchecked(node.gid)),
                        AtFlags::SYMLINK_NOFOLLOW,
                    )
                    .map_err(|e| io_err("chown", rel, e))?;
                }
                if matches!(node.kind, NodeKind::Fifo) {
                    rustix::fs::chmodat(
                        &dir,
                        name,
                        Mode::from_raw_mode(node.mode),
                        AtFlags::empty(),
                    )
                    .map_err(|e| io_err("chmod", rel, e))?;
                }
                rustix::fs::utimensat(&dir, name, &timestamps(node), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| io_err("set times of", rel, e))?;
            }
            for d in dirs.iter().rev() {
                if let Some(node) = &d.node {
                    let fd = open_dir_beneath(root, &d.rel)?;
                    apply_fd_metadata(fd.as_fd(), node, &d.rel)?;
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| RepoError::Task(e.to_string()))??;
        summary.duration_ms = started.elapsed().as_millis() as u64;
        tracing::info!(snapshot = %id, files = summary.files, bytes = summary.bytes_written, "restore done");
        Ok(summary)
    }
}

fn apply_fd_metadata(
    fd: std::os::fd::BorrowedFd<'_>,
    node: &Node,
    rel: &[Vec<u8>],
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

#[allow(clippy::too_many_arguments)]
fn write_pack_blobs(
    repo: &Repository,
    pack_id: PackId,
    data: &[u8],
    start: u64,
    blobs: &PackPlan,
    root: &OwnedFd,
    files: &[FileJob],
    written: &AtomicU64,
    files_done: &AtomicU64,
) -> Result<(), RepoError> {
    let mut open: HashMap<usize, File> = HashMap::new();
    for (entry, targets) in blobs.values() {
        let lo = (entry.offset as u64 - start) as usize;
        let hi = lo + entry.length as usize;
        let stored = data.get(lo..hi).ok_or_else(|| RepoError::Corrupt {
            object: format!("pack {pack_id}"),
            reason: format!("blob {} is truncated", entry.id),
        })?;
        let plain =
            pack::decode_blob(repo.key(), entry, stored).map_err(|source| RepoError::Blob {
                pack: pack_id,
                source: Box::new(source),
            })?;
        let zero = super::backup::is_zero(&plain);
        for (fi, off) in targets {
            let f = &files[*fi];
            if !zero {
                if !open.contains_key(fi) {
                    open.insert(*fi, open_file_beneath(root, &f.rel)?);
                }
                let file = open.get(fi).expect("invariant: just inserted");
                file.write_all_at(&plain, *off)
                    .map_err(|e| io_err("write", &f.rel, e))?;
                written.fetch_add(plain.len() as u64, Ordering::Relaxed);
            }
            if f.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                files_done.fetch_add(1, Ordering::Relaxed);
            }
        }
        if open.len() > 64 {
            open.clear();
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn create_tree(
    repo: &Repository,
    index: &Index,
    handle: &tokio::runtime::Handle,
    root: &OwnedFd,
    tree: &Tree,
    rel: &mut Vec<Vec<u8>>,
    plan: &mut Plan,
    groups: &mut HashMap<u64, Vec<Vec<u8>>>,
) -> Result<(), RepoError> {
    let dir = open_dir_beneath(root, rel)?;
    for node in &tree.nodes {
        rel.push(node.name.clone());
        if let Some(reason) = unsafe_name_reason(&node.name) {
            return Err(RepoError::UnsafeEntry {
                path: rel_display(rel),
                reason: reason.into(),
            });
        }
        let name = OsStr::from_bytes(&node.name);
        match &node.kind {
            NodeKind::Dir { subtree } => {
                rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o700))
                    .map_err(|e| io_err("create directory", rel, e))?;
                plan.summary.dirs += 1;
                plan.dirs.push(DirJob {
                    rel: rel.clone(),
                    node: Some(node.clone()),
                });
                let sub = handle.block_on(repo.load_tree(index, subtree))?;
                create_tree(repo, index, handle, root, &sub, rel, plan, groups)?;
            }
            NodeKind::File { content, hardlink } => {
                if let Some(g) = hardlink
                    && let Some(first) = groups.get(g)
                {
                    plan.links.push((rel.clone(), first.clone()));
                    plan.summary.hardlinks += 1;
                    rel.pop();
                    continue;
                }
                let fd = rustix::fs::openat(
                    &dir,
                    name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| io_err("create", rel, e))?;
                rustix::fs::ftruncate(&fd, node.size).map_err(|e| io_err("resize", rel, e))?;
                if let Some(g) = hardlink {
                    groups.insert(*g, rel.clone());
                }
                plan.summary.files += 1;
                plan.summary.bytes_total += node.size;
                plan.files.push(FileJob {
                    rel: rel.clone(),
                    node: node.clone(),
                    remaining: AtomicUsize::new(content.len()),
                });
            }
            NodeKind::Symlink { target } => {
                rustix::fs::symlinkat(OsStr::from_bytes(target), &dir, name)
                    .map_err(|e| io_err("create symlink", rel, e))?;
                plan.summary.symlinks += 1;
                plan.others.push((rel.clone(), node.clone()));
            }
            NodeKind::Fifo => {
                rustix::fs::mknodat(
                    &dir,
                    name,
                    rustix::fs::FileType::Fifo,
                    Mode::from_raw_mode(0o600),
                    0,
                )
                .map_err(|e| io_err("create fifo", rel, e))?;
                plan.others.push((rel.clone(), node.clone()));
            }
        }
        rel.pop();
    }
    Ok(())
}

/// The path a restore would give an entry (for messages).
pub fn restored_path(target: &Path, rel: &[Vec<u8>]) -> PathBuf {
    let mut p = target.to_path_buf();
    for c in rel {
        p.push(OsStr::from_bytes(c));
    }
    p
}
