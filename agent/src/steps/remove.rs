//! Remove an app: stop it (starting again what it stopped if that fails
//! half-way) and forget it, deleting a copy's volumes when asked.

use super::*;

/// What a remove step is asked.
#[derive(Debug)]
pub struct RemoveApp {
    pub team: TeamName,
    pub app: AppName,
    /// Delete a copy's volumes too.
    pub delete_data: bool,
    /// Only the copy this job restored (an undo); none: the app, whatever
    /// it is.
    pub restored_by_job: Option<u64>,
}

/// Removes the app; whether it was there (and, for an undo, the copy its
/// job made).
pub async fn remove_app(
    ctx: &StepCtx,
    r: RemoveApp,
    cancel: CancellationToken,
) -> StepResult<bool> {
    let RemoveApp {
        team,
        app: app_name,
        delete_data,
        restored_by_job,
    } = r;
    let Some(app) = ctx.platform.app(&team, &app_name).await? else {
        return Ok(false);
    };
    let copy_job = ctx
        .platform
        .copies_of(&team, &app_name)
        .ok()
        .and_then(|c| c.job_of(&team, &app_name));
    if restored_by_job.is_some() && copy_job != restored_by_job {
        // Not the copy this job made: not ours to remove.
        return Ok(false);
    }
    // Refused before anything stops if its driver cannot remove apps.
    let copies = ctx.platform.copies_of(&team, &app_name)?;
    if cancel.is_cancelled() {
        return Err(not_started());
    }
    // What an earlier step left down runs first, so this one stops and
    // records it itself (and no replay starts it behind its back).
    start_what_was_left(ctx, &team, &app_name).await?;
    // What runs is recorded before it stops: a remove that fails or is
    // cancelled half-way starts again what it stopped, so the app is left
    // as it was (an original whose copy is then undone keeps running).
    let mut running: Vec<Receipt> = Vec::new();
    for c in start_order(&app).iter().rev() {
        let cr = app.reference(c);
        // One that cannot tell (no status command) is stopped all the same.
        if ctx.platform.status(&cr).await? != ComponentState::Stopped {
            running.push(ctx.platform.receipt(&cr).await?);
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
        copies.remove(&team, &app_name, delete_data).await?;
        Ok(())
    }
    .await;
    if let Err(e) = removed {
        match journal::restart(ctx.platform.as_ref(), &stopped).await {
            Ok(_) => {
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
    tracing::info!(team = %team, app = %app_name, copy = copy_job.is_some(), "app removed");
    Ok(true)
}
