//! Two-phase removal of unreferenced packs.
//!
//! Prune marks every pack that holds no blob referenced by any snapshot
//! (`marks/<pack>` with the time), and deletes a marked pack only once the
//! mark is older than the safety delay, no backup holds a live lock, and a
//! fresh look at the snapshots still finds it unreferenced. Backups never
//! reuse blobs from marked packs. Packs that are only partly referenced are
//! kept whole (no repacking yet).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::format::{BlobId, MARKS_PREFIX, PackId, SnapshotId, id_from_key};
use super::index::{Index, IndexedPack};
use super::lock::{LockGuard, MAINTENANCE};
use super::tree::NodeKind;
use super::{RepoError, Repository, object_key};
use ferry_store::StoreError;

/// A mark object (`marks/<pack>`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Mark {
    pub marked_at: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PruneReport {
    pub packs_total: usize,
    pub packs_referenced: usize,
    /// Referenced packs that also hold unreferenced blobs (kept whole).
    pub packs_partly_referenced: usize,
    pub packs_newly_marked: usize,
    pub packs_marked_waiting: usize,
    pub packs_deleted: usize,
    pub bytes_deleted: u64,
    pub marks_cleared: usize,
    /// Deletion was postponed because a backup holds a live lock.
    pub deferred_by_backup: bool,
}

impl Repository {
    /// Every blob (trees and data) referenced by the given snapshots.
    pub async fn referenced_blobs(
        &self,
        index: &Index,
        snapshots: &[SnapshotId],
    ) -> Result<HashSet<BlobId>, RepoError> {
        let mut seen = HashSet::new();
        for sid in snapshots {
            let snap = self.load_snapshot(*sid).await?;
            let mut stack = vec![snap.tree];
            seen.insert(snap.tree);
            while let Some(tid) = stack.pop() {
                let tree = self.load_tree(index, &tid).await.map_err(|e| match e {
                    RepoError::MissingBlob { blob, .. } => RepoError::MissingBlob {
                        blob,
                        context: format!("tree of snapshot {sid}"),
                    },
                    other => other,
                })?;
                for n in tree.nodes {
                    match n.kind {
                        NodeKind::Dir { subtree } if seen.insert(subtree) => stack.push(subtree),
                        kind => seen.extend(kind.data_blobs().copied()),
                    }
                }
            }
        }
        Ok(seen)
    }

    /// One prune pass: mark unreferenced packs, delete those marked longer
    /// than `safety_delay` ago that are still unreferenced.
    pub async fn prune(&self, safety_delay: Duration) -> Result<PruneReport, RepoError> {
        let op = self.for_operation();
        let lock = op.lock_maintenance(op.cancel_token().clone()).await?;
        let res = op.prune_locked(safety_delay, &lock).await;
        let res = match res {
            Ok(r) => lock.check().map(|()| r),
            Err(e) => Err(lock.explain(e)),
        };
        lock.release().await;
        res
    }

    async fn prune_locked(
        &self,
        safety_delay: Duration,
        lock: &LockGuard,
    ) -> Result<PruneReport, RepoError> {
        let mut report = PruneReport::default();
        let index_files = self.load_index_files().await?;
        let mut index = Index::default();
        for (_, f) in &index_files {
            index.add_file(f);
        }
        let snaps = self.snapshot_ids().await?;
        let mut referenced = self.referenced_blobs(&index, &snaps).await?;
        for b in &referenced {
            if !index.contains(b) {
                return Err(RepoError::MissingBlob {
                    blob: *b,
                    context: "referenced by a snapshot; run verify before prune".into(),
                });
            }
        }
        let stored: HashMap<PackId, u64> = self.list_packs().await?.into_iter().collect();
        report.packs_total = stored.len();
        // Existing marks.
        let mut marks: HashMap<PackId, i64> = HashMap::new();
        for o in self.io(self.store().list(MARKS_PREFIX)).await? {
            let Some(p) = id_from_key::<PackId>(o.key.as_str()) else {
                continue;
            };
            let at = match self.io(self.store().get(&o.key)).await {
                Ok(b) => serde_json::from_slice::<Mark>(&b)
                    .map(|m| m.marked_at)
                    .unwrap_or(0),
                Err(RepoError::Store(StoreError::NotFound { .. })) => continue,
                Err(e) => return Err(e),
            };
            marks.insert(p, at);
        }
        // Every copy of each blob; a blob stored twice (a resumed backup,
        // or data stored again after its pack was marked) needs only one
        // pack, preferably an unmarked one.
        let mut copies: HashMap<BlobId, Vec<PackId>> = HashMap::new();
        for (p, entries) in index.packs() {
            if stored.contains_key(p) {
                for e in entries {
                    copies.entry(e.id).or_default().push(*p);
                }
            }
        }
        let needed_packs = |referenced: &HashSet<BlobId>| -> HashSet<PackId> {
            let mut needed = HashSet::new();
            for b in referenced {
                if let Some(p) = copies
                    .get(b)
                    .and_then(|ps| ps.iter().min_by_key(|p| (marks.contains_key(*p), **p)))
                {
                    needed.insert(*p);
                }
            }
            needed
        };
        let needed = needed_packs(&referenced);
        for (p, entries) in index.packs() {
            if needed.contains(p) && entries.iter().any(|b| !referenced.contains(&b.id)) {
                report.packs_partly_referenced += 1;
            }
        }
        let mut unreferenced = Vec::new();
        for p in stored.keys() {
            if needed.contains(p) {
                report.packs_referenced += 1;
            } else {
                unreferenced.push(*p);
            }
        }
        let now = self.clock().now_unix();
        let unref_set: HashSet<PackId> = unreferenced.iter().copied().collect();
        for p in marks.keys() {
            if !unref_set.contains(p) {
                self.io(self.store().delete(&object_key(&mark_key(p))?))
                    .await?;
                report.marks_cleared += 1;
            }
        }
        let mut candidates = Vec::new();
        for p in &unreferenced {
            match marks.get(p) {
                Some(at) if now.saturating_sub(*at) >= safety_delay.as_secs() as i64 => {
                    candidates.push(*p)
                }
                Some(_) => report.packs_marked_waiting += 1,
                None => {
                    let json = serde_json::to_vec(&Mark { marked_at: now })
                        .expect("invariant: mark serialises");
                    let key = object_key(&mark_key(p))?;
                    self.io(self.store().put(&key, Bytes::from(json))).await?;
                    report.packs_newly_marked += 1;
                }
            }
        }
        if candidates.is_empty() {
            return Ok(report);
        }
        // Delete only if no backup is running and the packs are still
        // unreferenced by every snapshot that exists now.
        let backups = self
            .live_locks()
            .await?
            .into_iter()
            .any(|(k, l)| l.kind != MAINTENANCE && k != lock.key());
        if backups {
            report.deferred_by_backup = true;
            report.packs_marked_waiting += candidates.len();
            return Ok(report);
        }
        let known: HashSet<SnapshotId> = snaps.iter().copied().collect();
        let new_snaps: Vec<SnapshotId> = self
            .snapshot_ids()
            .await?
            .into_iter()
            .filter(|s| !known.contains(s))
            .collect();
        if !new_snaps.is_empty() {
            let fresh = self.load_index().await?;
            referenced.extend(self.referenced_blobs(&fresh, &new_snaps).await?);
        }
        let needed = needed_packs(&referenced);
        candidates.retain(|p| !needed.contains(p));
        let doomed: HashSet<PackId> = candidates.iter().copied().collect();
        // Nothing is deleted by a prune whose lock is gone.
        lock.check()?;
        // 1. Rewrite the index objects that mention doomed packs.
        let mut keep: Vec<IndexedPack> = Vec::new();
        let mut old = Vec::new();
        for (iid, f) in &index_files {
            if f.packs.iter().any(|p| doomed.contains(&p.id)) {
                old.push(*iid);
                keep.extend(f.packs.iter().filter(|p| !doomed.contains(&p.id)).cloned());
            }
        }
        if !old.is_empty() {
            if !keep.is_empty() {
                self.write_index(keep).await?;
            }
            for iid in old {
                self.io(self.store().delete(&object_key(&iid.object_key())?))
                    .await?;
            }
        }
        // 2. Delete the packs, then their marks.
        for p in candidates {
            self.io(self.store().delete(&object_key(&p.object_key())?))
                .await?;
            self.io(self.store().delete(&object_key(&mark_key(&p))?))
                .await?;
            report.packs_deleted += 1;
            report.bytes_deleted += stored.get(&p).copied().unwrap_or(0);
            tracing::info!(pack = %p, "pack deleted");
        }
        Ok(report)
    }
}

fn mark_key(p: &PackId) -> String {
    format!("{MARKS_PREFIX}{}", p.to_hex())
}
