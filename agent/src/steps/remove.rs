//! Remove an app: stop it (starting again what it stopped if that fails
//! half-way) and forget it, deleting a copy's volumes when asked.

use super::*;

pub async fn remove_app(
    ctx: &StepCtx,
    r: pb::RemoveAppRequest,
    cancel: CancellationToken,
) -> StepResult<pb::RemoveAppReply> {
    let team: TeamName = name("team", &r.team)?;
    let app_name: AppName = name("app", &r.app)?;
    let Some(app) = ctx.platform.app(&team, &app_name).await? else {
        return Ok(pb::RemoveAppReply { removed: false });
    };
    let copy_job = ctx.platform.copy_job(&team, &app_name);
    if r.restored_by_job != 0 && copy_job != Some(r.restored_by_job) {
        // Not the copy this job made: not ours to remove.
        return Ok(pb::RemoveAppReply { removed: false });
    }
    if cancel.is_cancelled() {
        return Err(not_started());
    }
    // What an earlier step left down runs first, so this one stops and
    // records it itself (and no replay starts it behind its back).
    start_what_was_left(ctx, &team, &app_name).await?;
    // What runs is recorded before it stops: a remove that fails or is
    // cancelled half-way starts again what it stopped, so the app is left
    // as it was (an original whose copy is then undone keeps running).
    let mut running = Vec::new();
    for c in start_order(&app).iter().rev() {
        let cr = app.reference(c);
        if ctx.platform.status(&cr).await? != ComponentState::Stopped {
            running.push(cr);
        }
    }
    let held = match &ctx.journal {
        Some(j) => Some(
            j.begin("remove", &running)
                .map_err(|e| fail(ErrorCode::Unavailable, e.to_string()))?,
        ),
        None => None,
    };
    let mut stopped = Vec::new();
    let removed = async {
        for c in &running {
            if cancel.is_cancelled() {
                return Err(fail(ErrorCode::Cancelled, "cancelled"));
            }
            stopped.push(c.clone());
            ctx.platform.stop(c).await?;
        }
        ctx.platform.forget_app(&team, &app_name).await?;
        Ok(())
    }
    .await;
    if let Err(e) = removed {
        let entry = journal::Entry {
            key: String::new(),
            stopped,
        };
        match journal::restart(ctx.platform.as_ref(), &entry).await {
            Ok(()) => {
                if let Some(held) = held
                    && let Err(e) = held.clear()
                {
                    tracing::error!(error = %e, "journal entry not cleared");
                }
            }
            Err(start) => {
                tracing::error!(error = %start, "what the remove stopped did not all start again; the journal keeps it")
            }
        }
        return Err(e);
    }
    // Removed: what it stopped stays stopped.
    if let Some(held) = held
        && let Err(e) = held.clear()
    {
        tracing::error!(error = %e, "journal entry not cleared");
    }
    if r.delete_data
        && copy_job.is_some()
        && let Some(root) = ctx.platform.copies_dir()
    {
        // Only directories under the copies root are Ferry's to delete:
        // the volumes, then their job's directory once it is empty.
        let volumes: Vec<PathBuf> = app
            .volumes
            .iter()
            .map(|v| v.path.as_path().to_path_buf())
            .filter(|p| p.starts_with(&root))
            .collect();
        tokio::task::spawn_blocking(move || {
            for v in &volumes {
                match std::fs::remove_dir_all(v) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(format!("cannot remove {}: {e}", v.display())),
                }
                if let Some(home) = v.parent().filter(|h| *h != root) {
                    let _ = std::fs::remove_dir(home);
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| fail(ErrorCode::Internal, e.to_string()))?
        .map_err(|m| fail(ErrorCode::Internal, m))?;
    }
    tracing::info!(team = %team, app = %app_name, copy = copy_job.is_some(), "app removed");
    Ok(pb::RemoveAppReply { removed: true })
}
