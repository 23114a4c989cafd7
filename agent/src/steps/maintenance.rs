//! Backups in a repository: forget, verify and prune.

use super::*;

fn snapshot_ids(ids: &[String]) -> StepResult<Vec<SnapshotId>> {
    ids.iter()
        .map(|s| s.parse().map_err(|_| invalid(format!("snapshot id {s:?}"))))
        .collect()
}

pub async fn forget_backup(
    ctx: &StepCtx,
    r: pb::ForgetBackupRequest,
    cancel: CancellationToken,
) -> StepResult<pb::ForgetBackupReply> {
    let (repo, target) = open_repository(r.target, r.password, ctx.storage_retry).await?;
    let repo = repo.with_cancel(cancel);
    let backup = BackupId::new(r.backup_id).map_err(|e| invalid(e.to_string()))?;
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
    let ids: Vec<SnapshotId> = snapshot_ids(&r.snapshots)?
        .into_iter()
        .filter(|s| present.contains(s))
        .collect();
    repo.forget(&ids).await.map_err(|e| repo_err(&target, e))?;
    Ok(pb::ForgetBackupReply {
        snapshots_forgotten: u32::try_from(ids.len()).unwrap_or(u32::MAX),
    })
}

pub async fn verify_backup(
    ctx: &StepCtx,
    r: pb::VerifyBackupRequest,
    cancel: CancellationToken,
) -> StepResult<pb::VerifyBackupReply> {
    let (repo, target) = open_repository(r.target, r.password, ctx.storage_retry).await?;
    let repo = repo.with_cancel(cancel);
    let pct = u8::try_from(r.read_data_percent.min(100)).unwrap_or(100);
    let mut lines = Vec::new();
    for snap in snapshot_ids(&r.snapshots)? {
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
                    r.backup_id,
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
    Ok(pb::VerifyBackupReply {
        summary: lines.join("; "),
    })
}

/// Packs no snapshot uses are deleted by a prune this long after an
/// earlier one marked them.
const PRUNE_SAFETY_DELAY: Duration = Duration::from_secs(3600);

pub async fn prune(
    ctx: &StepCtx,
    r: pb::PruneRequest,
    cancel: CancellationToken,
) -> StepResult<pb::PruneReply> {
    let (repo, target) = open_repository(r.target, r.password, ctx.storage_retry).await?;
    let repo = repo.with_cancel(cancel);
    let report = repo
        .prune(PRUNE_SAFETY_DELAY)
        .await
        .map_err(|e| repo_err(&target, e))?;
    Ok(pb::PruneReply {
        summary: format!(
            "{} packs newly marked unused, {} deleted ({} bytes)",
            report.packs_newly_marked, report.packs_deleted, report.bytes_deleted
        ),
    })
}
