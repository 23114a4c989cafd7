//! Check that an app runs.

use super::*;

/// What a check step is asked: which app, and how long it may take to run.
#[derive(Debug)]
pub struct CheckApp {
    pub team: TeamName,
    pub app: AppName,
    pub wait: Duration,
}

/// Waits until every component of the app runs; returns their names.
pub async fn check_app(ctx: &StepCtx, r: CheckApp) -> StepResult<Vec<String>> {
    let CheckApp {
        team,
        app: app_name,
        wait,
    } = r;
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
    wait_running(ctx.platform.as_ref(), &refs, wait, true)
        .await
        .map_err(|m| {
            fail(
                ErrorCode::FailedPrecondition,
                format!("app {team}/{app_name}: {m}"),
            )
        })?;
    Ok(app.components.iter().map(|c| c.name.to_string()).collect())
}
