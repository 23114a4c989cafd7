//! Locks, and two-phase removal of unreferenced packs.
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

use super::crypto::now_unix;
use super::format::{BlobId, LOCKS_PREFIX, MARKS_PREFIX, PackId, SnapshotId, id_from_key};
use super::index::{Index, IndexedPack};
use super::tree::NodeKind;
use super::{RepoError, Repository, object_key};
use crate::store::StoreError;

/// A lock object (`locks/<kind>-<random>`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LockInfo {
    pub kind: String,
    pub owner: String,
    pub created: i64,
    pub expires: i64,
}

/// A held lock; call [`Lock::release`] when done.
#[derive(Debug)]
pub struct Lock {
    key: String,
}

const BACKUP_LOCK_TTL: i64 = 6 * 3600;
const MAINTENANCE_LOCK_TTL: i64 = 3600;

fn owner() -> String {
    format!("{}:{}", super::backup::hostname(), std::process::id())
}

impl Lock {
    async fn write(repo: &Repository, kind: &str, ttl: i64) -> Result<Self, RepoError> {
        let mut r = [0u8; 8];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut r);
        let key = format!("{LOCKS_PREFIX}{kind}-{}", hex::encode(r));
        let now = now_unix();
        let info = LockInfo {
            kind: kind.into(),
            owner: owner(),
            created: now,
            expires: now + ttl,
        };
        let json = serde_json::to_vec(&info).expect("invariant: lock serialises");
        repo.store()
            .put(&object_key(&key)?, Bytes::from(json))
            .await?;
        Ok(Self { key })
    }

    /// A lock that many holders may take at once (backups).
    pub async fn acquire_shared(repo: &Repository, kind: &str) -> Result<Self, RepoError> {
        Self::write(repo, kind, BACKUP_LOCK_TTL).await
    }

    /// The maintenance lock: refused while another live one exists.
    pub async fn acquire_maintenance(repo: &Repository) -> Result<Self, RepoError> {
        let busy = |locks: &[(String, LockInfo)], mine: Option<&str>| {
            locks
                .iter()
                .filter(|(k, l)| {
                    l.kind == "maintenance" && l.expires > now_unix() && Some(k.as_str()) != mine
                })
                .min_by_key(|(k, l)| (l.created, k.clone()))
                .cloned()
        };
        if let Some((_, l)) = busy(&live_locks(repo).await?, None) {
            return Err(RepoError::Locked {
                owner: l.owner,
                expires_unix: l.expires,
            });
        }
        let lock = Self::write(repo, "maintenance", MAINTENANCE_LOCK_TTL).await?;
        // Two writers may both have passed the first check: the older lock
        // (then the smaller key) wins, the other backs off.
        let locks = live_locks(repo).await?;
        let mine = locks
            .iter()
            .find(|(k, _)| *k == lock.key)
            .map(|(_, l)| l.created);
        if let Some((k, l)) = busy(&locks, Some(&lock.key))
            && mine.is_none_or(|c| (l.created, k.as_str()) < (c, lock.key.as_str()))
        {
            lock.release(repo).await;
            return Err(RepoError::Locked {
                owner: l.owner,
                expires_unix: l.expires,
            });
        }
        Ok(lock)
    }

    pub async fn release(self, repo: &Repository) {
        if let Ok(k) = object_key(&self.key)
            && let Err(e) = repo.store().delete(&k).await
        {
            tracing::warn!(lock = %self.key, error = %e, "could not remove lock");
        }
    }
}

/// Every lock that has not expired.
pub async fn live_locks(repo: &Repository) -> Result<Vec<(String, LockInfo)>, RepoError> {
    let mut out = Vec::new();
    for o in repo.store().list(LOCKS_PREFIX).await? {
        let bytes = match repo.store().get(&o.key).await {
            Ok(b) => b,
            Err(StoreError::NotFound { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        match serde_json::from_slice::<LockInfo>(&bytes) {
            Ok(l) if l.expires > now_unix() => out.push((o.key.as_str().to_owned(), l)),
            Ok(_) => {}
            Err(e) => tracing::warn!(lock = %o.key, error = %e, "ignoring malformed lock"),
        }
    }
    Ok(out)
}

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

/// Parses `90s`, `30m`, `24h`, `7d` or a number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, RepoError> {
    let bad = || {
        RepoError::InvalidInput(format!(
            "invalid duration {s:?}: use e.g. 30s, 15m, 24h, 7d"
        ))
    };
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        Some((i, 'd')) => (&s[..i], 86400),
        Some(_) => (s, 1),
        None => return Err(bad()),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    n.checked_mul(mult).map(Duration::from_secs).ok_or_else(bad)
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
                        NodeKind::File { content, .. } => seen.extend(content),
                        _ => {}
                    }
                }
            }
        }
        Ok(seen)
    }

    /// One prune pass: mark unreferenced packs, delete those marked longer
    /// than `safety_delay` ago that are still unreferenced.
    pub async fn prune(&self, safety_delay: Duration) -> Result<PruneReport, RepoError> {
        let lock = Lock::acquire_maintenance(self).await?;
        let res = self.prune_locked(safety_delay, &lock).await;
        lock.release(self).await;
        res
    }

    async fn prune_locked(
        &self,
        safety_delay: Duration,
        lock: &Lock,
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
        for o in self.store().list(MARKS_PREFIX).await? {
            let Some(p) = id_from_key::<PackId>(o.key.as_str()) else {
                continue;
            };
            let at = match self.store().get(&o.key).await {
                Ok(b) => serde_json::from_slice::<Mark>(&b)
                    .map(|m| m.marked_at)
                    .unwrap_or(0),
                Err(StoreError::NotFound { .. }) => continue,
                Err(e) => return Err(e.into()),
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
        let now = now_unix();
        let unref_set: HashSet<PackId> = unreferenced.iter().copied().collect();
        for p in marks.keys() {
            if !unref_set.contains(p) {
                self.store().delete(&object_key(&mark_key(p))?).await?;
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
                    self.store()
                        .put(&object_key(&mark_key(p))?, Bytes::from(json))
                        .await?;
                    report.packs_newly_marked += 1;
                }
            }
        }
        if candidates.is_empty() {
            return Ok(report);
        }
        // Delete only if no backup is running and the packs are still
        // unreferenced by every snapshot that exists now.
        let backups = live_locks(self)
            .await?
            .into_iter()
            .any(|(k, l)| l.kind != "maintenance" && k != lock.key);
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
                self.store().delete(&object_key(&iid.object_key())?).await?;
            }
        }
        // 2. Delete the packs, then their marks.
        for p in candidates {
            self.store().delete(&object_key(&p.object_key())?).await?;
            self.store().delete(&object_key(&mark_key(&p))?).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("0s").ok(), Some(Duration::ZERO));
        assert_eq!(parse_duration("15m").ok(), Some(Duration::from_secs(900)));
        assert_eq!(
            parse_duration("2d").ok(),
            Some(Duration::from_secs(172_800))
        );
        assert_eq!(parse_duration("42").ok(), Some(Duration::from_secs(42)));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-1h").is_err());
    }
}
