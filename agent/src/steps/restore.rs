//! Restore a backup as a copy: fresh volumes in a home of the copy's own,
//! new identities and ports, registered with the agent and started.

use std::path::{Path, PathBuf};

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
    let copies = ctx.platform.copies_by(driver)?;
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
    // One directory per restoring job: an attempt of this job clears what
    // an earlier one left there, and never touches what another job left
    // (a copy removed with its data kept).
    let base = copies.home(&team, &app_name, job)?;
    let filled = fill(&repo, &target, &manifest, &base, &report).await;
    // The driver makes the copy's definition (new identities and ports)
    // and registers it.
    let copied = match filled {
        Ok(all_paths) => copies
            .add(crate::platform::NewCopy {
                original: &manifest.app,
                team: &team,
                name: &app_name,
                paths: &all_paths,
                job,
            })
            .await
            .map(|c| (c, all_paths))
            .map_err(StepFailure::from),
        Err(e) => Err(e),
    };
    let (copied, all_paths) = match copied {
        Ok(c) => c,
        Err(e) => {
            // Nothing registered: this job's home holds only what this
            // restore wrote, and goes (a later attempt starts afresh).
            let home = base.clone();
            let cleared = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&home))
                .await
                .map_err(std::io::Error::other)
                .and_then(|r| r);
            if let Err(err) = cleared
                && err.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(dir = %base.display(), error = %err, "a failed restore's volumes were not cleared");
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

/// Restores the manifest's volumes under `base` (`v0`, `v1`, …; volumes
/// without a snapshot start empty): their directories, in the order of the
/// app's volumes.
async fn fill(
    repo: &Repository,
    target: &str,
    manifest: &AppManifest,
    base: &Path,
    report: &Report,
) -> StepResult<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for (i, v) in manifest.volumes.iter().enumerate() {
        let dir = base.join(format!("v{i}"));
        let partial = base.join(format!(".v{i}.partial"));
        // What an interrupted attempt of this job left goes first.
        for p in [partial.clone(), dir.clone()] {
            if p.exists() {
                tokio::task::spawn_blocking(move || {
                    std::fs::remove_dir_all(&p).map_err(|e| (p, e))
                })
                .await
                .map_err(|e| fail(ErrorCode::Internal, e.to_string()))?
                .map_err(|(p, e)| {
                    fail(
                        ErrorCode::Internal,
                        format!("cannot clear {}: {e}", p.display()),
                    )
                })?;
            }
        }
        let snap: SnapshotId = v
            .snapshot
            .parse()
            .map_err(|_| invalid(format!("snapshot id of volume {}", v.volume)))?;
        let line = format!("restore {} to {}", v.volume, dir.display());
        report(0, v.bytes, line.clone());
        let rep = report.clone();
        let total = v.bytes;
        let progress = Arc::new(move |p: &ProgressInfo| rep(p.bytes, total, line.clone()));
        repo.restore(snap, None, &partial, Some(progress))
            .await
            .map_err(|e| repo_err(target, e))?;
        std::fs::rename(&partial, &dir).map_err(|e| {
            fail(
                ErrorCode::Internal,
                format!("cannot move {} into place: {e}", dir.display()),
            )
        })?;
        paths.push(dir);
    }
    // Volumes the manifest has no snapshot for (none today) start empty.
    let mut all_paths = Vec::new();
    for v in &manifest.app.volumes {
        match manifest.volumes.iter().position(|s| s.volume == v.name) {
            Some(i) => all_paths.push(paths[i].clone()),
            None => {
                let d = base.join(format!("empty-{}", all_paths.len()));
                std::fs::create_dir_all(&d)
                    .map_err(|e| fail(ErrorCode::Internal, e.to_string()))?;
                all_paths.push(d);
            }
        }
    }
    Ok(all_paths)
}
