//! Job steps the controller hands to this agent: back up an app, restore
//! a backup as a copy, remove an app, check that one runs, forget, verify
//! and prune backups.
//!
//! One file per step (`backup`, `restore`, `remove`, `check`, and
//! `maintenance` for forget, verify and prune), each taking its domain
//! input (`BackupApp`, …; the link converts the controller's protobuf
//! requests at its edge, `requests/convert.rs`); this module holds what
//! they share: the context, failures, the claim on an app, start order.
//!
//! Every step is idempotent: run again (a retry, or after a restart of
//! either daemon) it finds what an earlier run left and goes on. A step is
//! cancelled through its token; a backup that has stopped components
//! starts them again before it answers, whatever happened.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_core::{
    App, AppManifest, AppName, BackupId, BackupMode, BackupTimings, Chain, ClusterName,
    ComponentName, ComponentRef, ComponentState, ErrorCode, HostPath, ImagesSnapshot, JobId,
    LocationName, NodeName, TeamName, Timestamp, Volume, VolumeName, VolumeSnapshot,
};
use ferry_repo::Repository;
use ferry_repo::backup::{BackupOptions, ProgressInfo};
use ferry_repo::format::SnapshotId;
use ferry_repo::snapshot::BackupSummary;
use tokio_util::sync::CancellationToken;

use crate::journal::{self, Journal};
use crate::platform::{PlatformError, Platforms, Receipt};
pub use crate::storage::RepoAccess;
use crate::storage::{StorageFailure, repo_failure};

/// Why a step failed, with the code the controller sees.
pub type StepResult<T> = Result<T, StepFailure>;

#[derive(Debug)]
pub struct StepFailure {
    pub code: ErrorCode,
    pub message: String,
}

impl From<StorageFailure> for StepFailure {
    fn from(f: StorageFailure) -> Self {
        Self {
            code: f.code,
            message: f.message,
        }
    }
}

impl From<PlatformError> for StepFailure {
    fn from(e: PlatformError) -> Self {
        use ferry_core::CodedError;
        Self {
            code: e.code(),
            message: e.to_string(),
        }
    }
}

fn fail(code: ErrorCode, message: impl Into<String>) -> StepFailure {
    StepFailure {
        code,
        message: message.into(),
    }
}

/// A step cancelled before it did anything.
fn not_started() -> StepFailure {
    fail(
        ErrorCode::Cancelled,
        "cancelled before it started; nothing was done",
    )
}

/// Input a step cannot work with.
pub fn invalid(message: impl Into<String>) -> StepFailure {
    fail(ErrorCode::InvalidArgument, message)
}

/// Sends a step's progress.
pub type Report = Arc<dyn Fn(u64, u64, String) + Send + Sync>;

/// What steps share.
#[derive(Clone)]
pub struct StepCtx {
    pub platform: Arc<Platforms>,
    pub journal: Option<Journal>,
    /// How long a step retries an unreachable S3 location.
    pub storage_retry: Duration,
    /// Bytes a cold backup's delta pass may copy changed files into.
    pub delta_buffer: usize,
    /// Where steps put what they stage on disk (exported images):
    /// `DATA_DIR/tmp`.
    pub scratch_dir: PathBuf,
    /// Apps (`team/app`) a step works on now, across sessions: a step
    /// dispatched again while an earlier attempt still runs (its session
    /// ended, this agent did not) waits for it instead of overlapping, and
    /// then finds what it did (a committed backup, a registered copy).
    busy: Arc<std::sync::Mutex<HashMap<String, Holder>>>,
    /// Told whenever a step lets go of its app.
    released: Arc<tokio::sync::Notify>,
    /// Cancelled when the agent shuts down: every step stops and starts
    /// again what it stopped. Steps outlive their session otherwise.
    pub shutdown: CancellationToken,
}

/// The step holding an app, and how to stop it.
#[derive(Clone)]
pub struct Holder {
    /// (job, plan index, undo) of the step, when it has one.
    pub step: Option<(u64, u32, bool)>,
    pub cancel: CancellationToken,
}

impl StepCtx {
    pub fn new(
        platform: Arc<Platforms>,
        journal: Option<Journal>,
        storage_retry: Duration,
    ) -> Self {
        Self {
            platform,
            journal,
            storage_retry,
            delta_buffer: 256 << 20,
            scratch_dir: std::env::temp_dir(),
            busy: Arc::default(),
            released: Arc::default(),
            shutdown: CancellationToken::new(),
        }
    }

    /// Claims `team/app` for the step `holder`; while another step has it,
    /// returns that one.
    pub fn claim(&self, team: &str, app: &str, holder: &Holder) -> Result<AppClaim, Holder> {
        let key = format!("{team}/{app}");
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = busy.get(&key) {
            return Err(h.clone());
        }
        busy.insert(key.clone(), holder.clone());
        Ok(AppClaim {
            busy: self.busy.clone(),
            released: self.released.clone(),
            key,
        })
    }

    /// Resolves once a step lets go of its app after this was enabled
    /// (`Notified::enable`, before looking at the claims, so no release in
    /// between is missed).
    pub fn released(&self) -> tokio::sync::futures::Notified<'_> {
        self.released.notified()
    }

    /// Resolves once no step holds an app.
    pub async fn idle(&self) {
        loop {
            let released = self.released();
            tokio::pin!(released);
            released.as_mut().enable();
            if self.running() == 0 {
                return;
            }
            released.await;
        }
    }

    /// Steps running now.
    pub fn running(&self) -> usize {
        self.busy.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// An app claimed by a running step, released when dropped.
pub struct AppClaim {
    busy: Arc<std::sync::Mutex<HashMap<String, Holder>>>,
    released: Arc<tokio::sync::Notify>,
    key: String,
}

impl Drop for AppClaim {
    fn drop(&mut self) {
        self.busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
        self.released.notify_waiters();
    }
}

/// Components in start order: each after those it depends on.
fn start_order(app: &App) -> Vec<ComponentName> {
    let mut done: Vec<ComponentName> = Vec::new();
    while done.len() < app.components.len() {
        let before = done.len();
        for c in &app.components {
            if !done.contains(&c.name) && c.depends_on.iter().all(|d| done.contains(d)) {
                done.push(c.name.clone());
            }
        }
        if done.len() == before {
            // A cycle (refused by App::validate): the rest as declared.
            for c in &app.components {
                if !done.contains(&c.name) {
                    done.push(c.name.clone());
                }
            }
        }
    }
    done
}

/// Starts what an earlier step stopped of `team/app` and could not start
/// again (the journal's entries for it), before a step works on the app:
/// an app still down is never taken for one its owner stopped. Fails,
/// having stopped nothing, if that cannot be done.
async fn start_what_was_left(ctx: &StepCtx, team: &TeamName, app: &AppName) -> StepResult<()> {
    let Some(j) = &ctx.journal else {
        return Ok(());
    };
    let problems = journal::replay_app(j, ctx.platform.as_ref(), team, app).await;
    if problems.is_empty() {
        return Ok(());
    }
    Err(fail(
        ErrorCode::Unavailable,
        format!(
            "components of {team}/{app} that Ferry stopped earlier do not start again ({}); nothing was stopped",
            problems.join("; ")
        ),
    ))
}

fn repo_err(target: &str, e: ferry_repo::RepoError) -> StepFailure {
    if matches!(e, ferry_repo::RepoError::Cancelled) {
        return fail(ErrorCode::Cancelled, "cancelled");
    }
    repo_failure(target, e).into()
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Waits until every component runs, or says which do not. With
/// `unknown_runs`, a component whose driver cannot tell (a command without
/// a status command) counts as running: its start command succeeded.
async fn wait_running(
    platform: &Platforms,
    components: &[ComponentRef],
    wait: Duration,
    unknown_runs: bool,
) -> Result<(), String> {
    let deadline = Instant::now() + wait;
    loop {
        let mut down = Vec::new();
        for c in components {
            match platform.status(c).await {
                Ok(ComponentState::Running) => {}
                Ok(ComponentState::Unknown) if unknown_runs => {}
                Ok(s) => down.push(format!("{c} is {s}")),
                Err(e) => down.push(e.to_string()),
            }
        }
        if down.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "not running after {} s: {}",
                wait.as_secs(),
                down.join("; ")
            ));
        }
        // Often: the downtime reported ends when the status says so.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

mod backup;
mod check;
mod maintenance;
mod remove;
mod restore;

pub use backup::{BackupApp, backup_app};
pub use check::{CheckApp, check_app};
pub use maintenance::{
    ForgetBackup, VerifyBackup, forget_backup, prune, snapshot_ids, verify_backup,
};
pub use remove::{RemoveApp, remove_app};
pub use restore::{RestoreApp, Restored, restore_app};

#[cfg(test)]
mod tests;
