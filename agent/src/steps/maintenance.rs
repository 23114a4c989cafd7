//! Backups in a repository: forget, verify and prune.

use super::*;

/// Snapshot ids as a request names them (hex).
pub fn snapshot_ids(ids: &[String]) -> StepResult<Vec<SnapshotId>> {
    ids.iter()
        .map(|s| s.parse().map_err(|_| invalid(format!("snapshot id {s:?}"))))
        .collect()
}

/// What a forget step is asked: the backup and the snapshots it named.
#[derive(Debug)]
pub struct ForgetBackup {
    pub backup: BackupId,
    pub snapshots: Vec<SnapshotId>,
    pub repo: RepoAccess,
}

/// Forgets a backup; returns how many of its snapshots were still there.
pub async fn forget_backup(r: ForgetBackup, cancel: CancellationToken) -> StepResult<u32> {
    let (repo, target) = r.repo.open().await?;
    let repo = repo.with_cancel(cancel);
    let backup = r.backup;
    // The manifest first: once it is gone, so is the backup.
    repo.remove_app_manifest(&AppManifest::object_name(backup))
        .await
        .map_err(|e| repo_err(&target, e))?;
    let present: std::collections::HashSet<SnapshotId> = repo
        .snapshot_ids()
        .await
        .map_err(|e| repo_err(&target, e))?
        .into_iter()
        .collect();
    let ids: Vec<SnapshotId> = r
        .snapshots
        .into_iter()
        .filter(|s| present.contains(s))
        .collect();
    repo.forget(&ids).await.map_err(|e| repo_err(&target, e))?;
    Ok(u32::try_from(ids.len()).unwrap_or(u32::MAX))
}

/// What a verify step is asked: the backup's snapshots, and how much of
/// their data to read back.
#[derive(Debug)]
pub struct VerifyBackup {
    pub backup: BackupId,
    pub snapshots: Vec<SnapshotId>,
    /// 0 to 100.
    pub read_data_percent: u8,
    pub repo: RepoAccess,
}

/// Verifies a backup; returns a one-line summary per snapshot.
pub async fn verify_backup(r: VerifyBackup, cancel: CancellationToken) -> StepResult<String> {
    let (repo, target) = r.repo.open().await?;
    let repo = repo.with_cancel(cancel);
    let pct = r.read_data_percent.min(100);
    let mut lines = Vec::new();
    for &snap in &r.snapshots {
        let report = repo
            .verify(ferry_repo::verify::VerifyOptions {
                snapshot: Some(snap),
                read_data_percent: (pct > 0).then_some(pct),
            })
            .await
            .map_err(|e| repo_err(&target, e))?;
        if let Some(first) = report.problems.first() {
            return Err(fail(
                ErrorCode::FailedPrecondition,
                format!(
                    "backup {} snapshot {} has {} problem(s); first: {first}",
                    r.backup,
                    snap.short(),
                    report.problems.len()
                ),
            ));
        }
        lines.push(format!(
            "snapshot {}: {} trees, {} blobs, {} packs read",
            snap.short(),
            report.trees,
            report.data_blobs,
            report.packs_read
        ));
    }
    Ok(lines.join("; "))
}

/// Packs no snapshot uses are deleted by a prune this long after an
/// earlier one marked them.
const PRUNE_SAFETY_DELAY: Duration = Duration::from_secs(3600);

/// Prunes the repository; returns a summary.
pub async fn prune(repo: RepoAccess, cancel: CancellationToken) -> StepResult<String> {
    let (repo, target) = repo.open().await?;
    let repo = repo.with_cancel(cancel);
    let report = repo
        .prune(PRUNE_SAFETY_DELAY)
        .await
        .map_err(|e| repo_err(&target, e))?;
    Ok(format!(
        "{} packs newly marked unused, {} deleted ({} bytes)",
        report.packs_newly_marked, report.packs_deleted, report.bytes_deleted
    ))
}
