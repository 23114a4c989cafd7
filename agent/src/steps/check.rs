//! Check that an app runs.

use super::*;

pub async fn check_app(ctx: &StepCtx, r: pb::CheckAppRequest) -> StepResult<pb::CheckAppReply> {
    let team: TeamName = name("team", &r.team)?;
    let app_name: AppName = name("app", &r.app)?;
    let app = ctx.platform.app(&team, &app_name).await?.ok_or_else(|| {
        fail(
            ErrorCode::NotFound,
            format!("app {team}/{app_name} is not on this agent"),
        )
    })?;
    let refs: Vec<ComponentRef> = app
        .components
        .iter()
        .map(|c| app.reference(&c.name))
        .collect();
    // A component without a status command runs once its start command
    // has succeeded (the restore started it): there is nothing to ask.
    wait_running(
        ctx.platform.as_ref(),
        &refs,
        Duration::from_millis(r.wait_ms),
        true,
    )
    .await
    .map_err(|m| {
        fail(
            ErrorCode::FailedPrecondition,
            format!("app {team}/{app_name}: {m}"),
        )
    })?;
    Ok(pb::CheckAppReply {
        running: app.components.iter().map(|c| c.name.to_string()).collect(),
    })
}
