//! Restore a backup as a copy: fresh volumes (targets the copy's driver
//! gives), new identities and ports, registered with the agent and
//! started.

use std::path::PathBuf;

use crate::platform::{CopyId, NewCopy, Volumes};

use super::*;

/// What a restore step is asked: the backup's manifest, the copy's name,
/// and where the backup is.
#[derive(Debug)]
pub struct RestoreApp {
    pub manifest: AppManifest,
    pub team: TeamName,
    pub app: AppName,
    /// The restoring job: the copy's home is its own.
    pub job: u64,
    pub repo: RepoAccess,
}

/// A copy as restored: its volumes' directories (in the manifest's order)
/// and the ports moved (`NAME=PORT`).
#[derive(Debug, PartialEq, Eq)]
pub struct Restored {
    pub volume_paths: Vec<String>,
    pub remapped_ports: Vec<String>,
}

pub async fn restore_app(
    ctx: &StepCtx,
    r: RestoreApp,
    cancel: CancellationToken,
    report: Report,
) -> StepResult<Restored> {
    let RestoreApp {
        manifest,
        team,
        app: app_name,
        job,
        repo,
    } = r;
    // The driver of the original's kind makes the copy.
    let driver = manifest
        .app
        .components
        .first()
        .map(|c| c.kind.driver())
        .ok_or_else(|| invalid("the backed-up app has no components"))?;
    if let Some(c) = manifest
        .app
        .components
        .iter()
        .find(|c| c.kind.driver() != driver)
    {
        return Err(invalid(format!(
            "component {} of the backed-up app runs on {}, the others on {driver}",
            c.name,
            c.kind.driver()
        )));
    }
    let (volumes, copies) = ctx.platform.copies_by(driver)?;
    // Done before (the answer was lost)?
    if let Some(existing) = ctx.platform.app(&team, &app_name).await? {
        let ours = ctx
            .platform
            .copies_of(&team, &app_name)
            .ok()
            .filter(|c| c.job_of(&team, &app_name) == Some(job));
        if let Some(copies) = ours {
            return Ok(Restored {
                volume_paths: existing
                    .volumes
                    .iter()
                    .map(|v| v.path.to_string())
                    .collect(),
                remapped_ports: copies.remapped_ports_of(&team, &app_name),
            });
        }
        return Err(fail(
            ErrorCode::AlreadyExists,
            format!("app {team}/{app_name} already exists on this agent"),
        ));
    }
    if cancel.is_cancelled() {
        return Err(not_started());
    }
    let (repo, target) = repo.open().await?;
    let repo = repo.with_cancel(cancel);
    let id = CopyId {
        team: &team,
        name: &app_name,
        job,
    };
    let filled = fill(volumes, id, &repo, &target, &manifest, &report).await;
    // The driver makes the copy's definition (new identities and ports)
    // and registers it.
    let copied = match filled {
        Ok(paths) => copies
            .add(NewCopy {
                original: &manifest.app,
                copy: id,
                paths: &paths,
            })
            .await
            .map(|c| (c, paths))
            .map_err(StepFailure::from),
        Err(e) => Err(e),
    };
    let (copied, all_paths) = match copied {
        Ok(c) => c,
        Err(e) => {
            // Nothing registered: the targets hold only what this restore
            // wrote, and go (a later attempt starts afresh).
            if let Err(err) = volumes.discard(id).await {
                tracing::warn!(error = %err, "a failed restore's volumes were not deleted");
            }
            return Err(e);
        }
    };
    let copy = copied.app;
    report(0, 0, format!("starting {team}/{app_name}"));
    for c in start_order(&copy) {
        let r = copy.reference(&c);
        ctx.platform.start_component(&r).await?;
    }
    tracing::info!(team = %team, app = %app_name, job, "copy restored and started");
    Ok(Restored {
        volume_paths: all_paths.iter().map(|p| p.display().to_string()).collect(),
        remapped_ports: copied.remapped_ports,
    })
}

/// Restores the manifest's volumes into targets the driver gives (volumes
/// without a snapshot start empty): their directories, in the order of the
/// app's volumes.
async fn fill(
    volumes: &dyn Volumes,
    copy: CopyId<'_>,
    repo: &Repository,
    target: &str,
    manifest: &AppManifest,
    report: &Report,
) -> StepResult<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for (i, original) in manifest.app.volumes.iter().enumerate() {
        let dir = volumes.target(copy, &manifest.app, i).await?;
        if let Some(v) = manifest.volumes.iter().find(|s| s.volume == original.name) {
            let snap: SnapshotId = v
                .snapshot
                .parse()
                .map_err(|_| invalid(format!("snapshot id of volume {}", v.volume)))?;
            let line = format!("restore {} to {}", v.volume, dir.display());
            report(0, v.bytes, line.clone());
            let rep = report.clone();
            let total = v.bytes;
            let progress = Arc::new(move |p: &ProgressInfo| rep(p.bytes, total, line.clone()));
            repo.restore(snap, None, &dir, Some(progress))
                .await
                .map_err(|e| repo_err(target, e))?;
        }
        paths.push(dir);
    }
    Ok(paths)
}
