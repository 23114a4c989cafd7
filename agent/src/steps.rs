//! Job steps the controller hands to this agent: back up an app, restore
//! a backup as a copy, remove an app, check that one runs, forget, verify
//! and prune backups.
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
    ComponentKind, ComponentName, ComponentRef, ComponentState, ErrorCode, HostComponent, HostPath,
    ImagesSnapshot, JobId, NodeName, TeamName, Timestamp, Volume, VolumeName, VolumeSnapshot,
};
use ferry_proto::v1 as pb;
use ferry_repo::Repository;
use ferry_repo::backup::{BackupOptions, ProgressInfo};
use ferry_repo::format::SnapshotId;
use ferry_repo::snapshot::BackupSummary;
use tokio_util::sync::CancellationToken;

use crate::journal::{self, Journal};
use crate::platform::{Platform, PlatformError};
use crate::storage::{StorageFailure, open_repository, repo_failure};

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

fn invalid(message: impl Into<String>) -> StepFailure {
    fail(ErrorCode::InvalidArgument, message)
}

fn name<T: std::str::FromStr<Err = ferry_core::NameError>>(what: &str, v: &str) -> StepResult<T> {
    v.parse().map_err(|e| invalid(format!("{what}: {e}")))
}

/// Sends a step's progress.
pub type Report = Arc<dyn Fn(u64, u64, String) + Send + Sync>;

/// What steps share.
#[derive(Clone)]
pub struct StepCtx {
    pub platform: Arc<dyn Platform>,
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
        platform: Arc<dyn Platform>,
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
            key,
        })
    }

    /// Steps running now.
    pub fn running(&self) -> usize {
        self.busy.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// An app claimed by a running step, released when dropped.
pub struct AppClaim {
    busy: Arc<std::sync::Mutex<HashMap<String, Holder>>>,
    key: String,
}

impl Drop for AppClaim {
    fn drop(&mut self) {
        self.busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
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

fn repo_err(target: &str, e: ferry_repo::RepoError) -> StepFailure {
    if matches!(e, ferry_repo::RepoError::Cancelled) {
        return fail(ErrorCode::Cancelled, "cancelled");
    }
    repo_failure(target, e).into()
}

// ---- backup -------------------------------------------------------------

pub async fn backup_app(
    ctx: &StepCtx,
    r: pb::BackupAppRequest,
    cancel: CancellationToken,
    report: Report,
) -> StepResult<pb::BackupAppReply> {
    let started_at = Timestamp::now();
    let started = Instant::now();
    let team: TeamName = name("team", &r.team)?;
    let app_name: AppName = name("app", &r.app)?;
    let mode: BackupMode = r.mode.parse().map_err(invalid)?;
    let backup = BackupId::new(r.backup_id).map_err(|e| invalid(e.to_string()))?;
    let step = r.step.unwrap_or_default();
    let job = JobId::new(step.job_id).map_err(|e| invalid(e.to_string()))?;
    let app = ctx.platform.app(&team, &app_name).await?.ok_or_else(|| {
        fail(
            ErrorCode::NotFound,
            format!("app {team}/{app_name} is not on this agent"),
        )
    })?;
    let (repo, target) = open_repository(r.target, r.password, ctx.storage_retry).await?;
    let repo = repo.with_cancel(cancel.clone());
    let object = AppManifest::object_name(backup);
    // Done before (the answer was lost): the same manifest.
    if let Some(doc) = repo
        .load_app_manifest(&object)
        .await
        .map_err(|e| repo_err(&target, e))?
    {
        tracing::info!(backup = %backup, "backup already committed; answering with its manifest");
        return Ok(pb::BackupAppReply { manifest: doc });
    }

    // What an earlier attempt (or another step) stopped and could not
    // start again runs first: an app still down is never taken for one
    // its owner stopped, and never left down by a backup that succeeds.
    if let Some(j) = &ctx.journal {
        let problems = journal::replay_app(j, ctx.platform.as_ref(), &team, &app_name).await;
        if !problems.is_empty() {
            return Err(fail(
                ErrorCode::Unavailable,
                format!(
                    "components of {team}/{app_name} that Ferry stopped earlier do not start again ({}); nothing was stopped",
                    problems.join("; ")
                ),
            ));
        }
    }
    // Which stateful components run now: those are what cold mode stops.
    let mut running = Vec::new();
    for c in start_order(&app) {
        let comp = app.component(&c).expect("invariant: ordered from the app");
        let r = app.reference(&c);
        let state = ctx.platform.status(&r).await?;
        if comp.stateful && state == ComponentState::Running {
            running.push(r);
        } else if comp.stateful && state == ComponentState::Unknown && mode != BackupMode::Hot {
            return Err(fail(
                ErrorCode::FailedPrecondition,
                format!("cannot tell whether {r} runs (it has no status command); give it one"),
            ));
        }
    }
    if mode == BackupMode::Refuse
        && let Some(r) = running.first()
    {
        return Err(fail(
            ErrorCode::FailedPrecondition,
            format!("{r} runs, and mode refuse backs up only stopped apps; nothing was stopped"),
        ));
    }
    let volumes = app.volumes.clone();
    let tags = |pass: &str, v: &Volume| {
        BTreeMap::from([
            ("ferry.backup".to_owned(), backup.to_string()),
            ("ferry.pass".to_owned(), pass.to_owned()),
            ("ferry.volume".to_owned(), v.name.to_string()),
        ])
    };

    // The containers' images and config, once, while the app runs, before
    // the volumes' first pass (so the gap from it to the stop stays short).
    let images = store_images(ctx, &repo, &target, &app, backup, &report).await?;

    // Pass one, while the app runs.
    let pass_started = Instant::now();
    let cold = mode == BackupMode::Cold && !running.is_empty();
    let first_pass = if cold { "pre-copy" } else { "copy" };
    // Hot mode: each running component's pre_backup hook, in start order;
    // its post_backup hook after the copy, in reverse, whatever happened.
    let hooked = if mode == BackupMode::Hot {
        pre_backup_hooks(ctx, &app, &report).await?
    } else {
        Vec::new()
    };
    let copied = async {
        let mut pre: Vec<(SnapshotId, BackupSummary)> = Vec::new();
        for v in &volumes {
            let t = tags(if cold { "pre" } else { "final" }, v);
            let opts = pass_options(t, None, None);
            pre.push(copy_volume(&repo, &target, v, opts, first_pass, &report).await?);
        }
        Ok::<_, StepFailure>(pre)
    }
    .await;
    let after = post_backup_hooks(ctx, &app, &hooked, &report).await;
    let pre = copied?;
    after?;
    let mut bytes_new: u64 = pre.iter().map(|(_, s)| s.bytes_new).sum();
    if let Some(i) = &images {
        bytes_new += i.bytes_new;
    }
    let pre_copy_ms = ms(pass_started.elapsed());

    let mut stopped: Vec<ComponentRef> = Vec::new();
    let mut timings = BackupTimings {
        pre_copy_ms,
        ..BackupTimings::default()
    };
    let finals = if cold {
        let stop_order: Vec<ComponentRef> = running.iter().rev().cloned().collect();
        // Each pre_stop hook, in stop order, while everything still runs.
        for c in &stop_order {
            let hook = app
                .component(&c.component)
                .and_then(|x| x.hooks.pre_stop.as_ref());
            if let Some(hook) = hook {
                report(0, 0, format!("pre_stop hook of {c}"));
                ctx.platform.hook(c, "pre_stop", hook).await?;
            }
        }
        // No prune may start between the stop and the delta pass: the lock
        // is taken while the app runs (refused now, not once it is down).
        let delta_cancel = cancel.child_token();
        let shared = repo
            .lock_shared("backup", delta_cancel.clone())
            .await
            .map_err(|e| repo_err(&target, e))?;
        if cancel.is_cancelled() {
            return Err(fail(ErrorCode::Cancelled, "cancelled; nothing was stopped"));
        }
        // Record what is about to stop, durably, before stopping anything;
        // the entry is this attempt's own.
        let held = match &ctx.journal {
            Some(j) => Some(
                j.begin(&format!("job-{}-{}", step.job_id, step.index), &stop_order)
                    .map_err(|e| fail(ErrorCode::Unavailable, e.to_string()))?,
            ),
            None => None,
        };
        let stop_at = Instant::now();
        // Stop, then the delta pass; the app starts again as soon as the
        // delta pass has read every changed file, while its uploads drain.
        // The volumes' passes run at once, each reading first: it copies
        // the changed files into memory (up to its share of the delta
        // buffer) and stores them once the app runs again.
        let read_dones: Vec<_> = volumes
            .iter()
            .map(|_| Arc::new(tokio::sync::Notify::new()))
            .collect();
        let read_ahead = ctx.delta_buffer / volumes.len().max(1);
        // The delta passes alone are cancelled if the app did not stay down.
        let delta_repo = repo.with_cancel(delta_cancel.clone());
        let stopping = async {
            for c in &stop_order {
                // A cancel (or the agent's shutdown) stops nothing more.
                if cancel.is_cancelled() {
                    return Err(fail(ErrorCode::Cancelled, "cancelled"));
                }
                report(0, 0, format!("stopping {c}"));
                // Counted before the call: a stop that fails half-way (or
                // times out while the platform goes on) is started again
                // all the same (a start checks first whether it runs).
                stopped.push(c.clone());
                ctx.platform.stop(c).await?;
            }
            Ok::<_, StepFailure>(())
        }
        .await;
        let delta_started = Instant::now();
        let work = async {
            stopping?;
            tracing::info!(
                stop_ms = ms(stop_at.elapsed()),
                components = stopped.len(),
                "stopped; delta pass started"
            );
            let passes =
                volumes
                    .iter()
                    .zip(&pre)
                    .zip(&read_dones)
                    .map(|((v, (parent, _)), done)| {
                        let opts = BackupOptions {
                            read_ahead: Some(read_ahead),
                            ..pass_options(tags("final", v), Some(*parent), Some(done.clone()))
                        };
                        copy_volume(&delta_repo, &target, v, opts, "delta pass", &report)
                    });
            let passes = futures::future::try_join_all(passes).await;
            if passes.is_err() {
                // The other volumes' passes stop too, not only their futures.
                delta_cancel.cancel();
            }
            passes
        };
        // Every volume read ends the app's downtime (a notification before
        // the wait is kept).
        let all_read = async {
            for done in &read_dones {
                done.notified().await;
            }
        };
        tokio::pin!(work);
        let mut result = tokio::select! {
            r = &mut work => Some(r),
            () = all_read => None,
        };
        // The delta pass's share of the downtime: until its last read.
        timings.delta_ms = ms(delta_started.elapsed());
        // A component running again before Ferry starts it was started by
        // someone else: what the delta pass read may be a live copy.
        let mut started_by_other = None;
        for c in &stopped {
            if let Ok(ComponentState::Running) = ctx.platform.status(c).await {
                started_by_other.get_or_insert_with(|| c.clone());
            }
        }
        if started_by_other.is_some() {
            delta_cancel.cancel();
        }
        // Whatever happened: start again exactly what was stopped, in
        // start order, never what was not.
        let entry = journal::Entry {
            key: held
                .as_ref()
                .map(|h| h.key().to_owned())
                .unwrap_or_default(),
            stopped: stopped.clone(),
        };
        report(0, 0, "starting the app again".into());
        let restarted = journal::restart(ctx.platform.as_ref(), &entry).await;
        let wait = wait_running(
            ctx.platform.as_ref(),
            &stopped,
            Duration::from_secs(60),
            false,
        )
        .await;
        timings.downtime_ms = ms(stop_at.elapsed());
        tracing::info!(downtime_ms = timings.downtime_ms, "the app runs again");
        match (&restarted, &wait, held) {
            (Ok(()), Ok(()), Some(held)) => {
                if let Err(e) = held.clear() {
                    tracing::error!(error = %e, "journal entry not cleared");
                }
            }
            (Ok(()), Ok(()), None) => {}
            (_, _, held) => {
                // Released: the journal's replays start them once they can.
                tracing::error!(journal = ?held.as_ref().map(|h| h.key()), "components Ferry stopped did not all start again; the journal keeps them")
            }
        }
        // The uploads drain while the app runs.
        let finals = match result.take() {
            Some(r) => r,
            None => work.await,
        };
        let finals = finals.map_err(|e| match shared.check() {
            Err(lost) => repo_err(&target, lost),
            Ok(()) => e,
        });
        shared.release().await;
        if let Some(c) = started_by_other {
            // Whatever the passes stored is no backup.
            let mut made: Vec<SnapshotId> = pre.iter().map(|(id, _)| *id).collect();
            if let Ok(finals) = &finals {
                made.extend(finals.iter().map(|(id, _)| *id));
            }
            if let Some(i) = &images
                && let Ok(id) = i.snapshot.parse::<SnapshotId>()
            {
                made.push(id);
            }
            if let Err(e) = repo.forget(&made).await {
                tracing::warn!(error = %Chain(&e), "snapshots of the failed backup not forgotten");
            }
            return Err(fail(
                ErrorCode::FailedPrecondition,
                format!(
                    "{c} was started by someone else while Ferry had it stopped for the delta pass; nothing was committed (the backup would not be consistent)"
                ),
            ));
        }
        let finals = finals?;
        restarted?;
        wait.map_err(|m| fail(ErrorCode::FailedPrecondition, m))?;
        timings.delta_bytes_read = finals.iter().map(|(_, s)| s.bytes_read).sum();
        bytes_new += finals.iter().map(|(_, s)| s.bytes_new).sum::<u64>();
        // The pre-copy snapshots are superseded by the final ones (their
        // data is shared); forget them so only the final state is listed.
        let pre: Vec<SnapshotId> = pre.iter().map(|(id, _)| *id).collect();
        if let Err(e) = repo.forget(&pre).await {
            tracing::warn!(error = %Chain(&e), "pre-copy snapshots not forgotten");
        }
        finals
    } else {
        pre
    };

    timings.bytes_new = bytes_new;
    let vols = volumes
        .iter()
        .zip(&finals)
        .map(|(v, (snap, s))| VolumeSnapshot {
            volume: v.name.clone(),
            path: v.path.clone(),
            snapshot: snap.to_hex(),
            files: s.files,
            bytes: s.bytes_total,
        })
        .collect();
    timings.total_ms = ms(started.elapsed());
    let mut captured = app.clone();
    for c in &mut captured.components {
        c.state = ComponentState::Unknown;
    }
    let manifest = AppManifest {
        format: ferry_core::backup::MANIFEST_FORMAT,
        backup,
        job,
        storage: name("storage", &r.storage)?,
        ferry_version: env!("CARGO_PKG_VERSION").to_owned(),
        cluster: name::<ClusterName>("cluster", &r.cluster)?,
        node: name::<NodeName>("node", &r.node)?,
        app: captured,
        mode,
        stopped: stopped.iter().map(|c| c.component.clone()).collect(),
        volumes: vols,
        images,
        started_at,
        finished_at: Timestamp::now(),
        timings,
    };
    let doc = manifest.to_json();
    // The commit point.
    repo.save_app_manifest(&object, &doc)
        .await
        .map_err(|e| repo_err(&target, e))?;
    tracing::info!(backup = %backup, app = %app_name, team = %team, downtime_ms = manifest.timings.downtime_ms, "backup committed");
    Ok(pb::BackupAppReply { manifest: doc })
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Backs a volume up; its progress has no total (a backup does not know
/// how much it will read).
async fn copy_volume(
    repo: &Repository,
    target: &str,
    v: &Volume,
    opts: BackupOptions,
    pass: &str,
    report: &Report,
) -> StepResult<(SnapshotId, BackupSummary)> {
    let line = format!("{pass} of {}", v.path);
    report(0, 0, line.clone());
    let r = report.clone();
    let progress = Arc::new(move |p: &ProgressInfo| {
        r(p.bytes, 0, format!("{line}: {} files", p.files));
    });
    let out = repo
        .backup(v.path.as_path(), opts, Some(progress))
        .await
        .map_err(|e| repo_err(target, e))?;
    let id = out
        .id
        .ok_or_else(|| fail(ErrorCode::Internal, "the backup stored no snapshot"))?;
    Ok((id, out.snapshot.summary))
}

/// Exports the images the app's components run (none on the host driver)
/// into `DATA_DIR/tmp/images-<backup>/images.tar` and stores that directory
/// as a snapshot of its own; the archive is removed afterwards.
async fn store_images(
    ctx: &StepCtx,
    repo: &Repository,
    target: &str,
    app: &App,
    backup: BackupId,
    report: &Report,
) -> StepResult<Option<ImagesSnapshot>> {
    let dir = ctx.scratch_dir.join(format!("images-{backup}"));
    let staged = |e: std::io::Error| {
        fail(
            ErrorCode::Internal,
            format!("staging images in {}: {e}", dir.display()),
        )
    };
    let _ = std::fs::remove_dir_all(&dir);
    // What is staged (container config holds secrets) is the agent's
    // alone: 0700 directories whatever the umask, 0600 files.
    crate::durable::private_dir(&ctx.scratch_dir)
        .and_then(|()| crate::durable::private_dir(&dir))
        .map_err(staged)?;
    let stored = async {
        report(0, 0, "exporting images".into());
        let Some((images, bytes)) = ctx
            .platform
            .export_images(app, &dir.join("images.tar"))
            .await?
        else {
            return Ok(None);
        };
        let volume = Volume {
            name: VolumeName::new("images").map_err(|e| invalid(e.to_string()))?,
            path: HostPath::new(dir.display().to_string()).map_err(|e| invalid(e.to_string()))?,
        };
        let tags = BTreeMap::from([
            ("ferry.backup".to_owned(), backup.to_string()),
            ("ferry.pass".to_owned(), "images".to_owned()),
        ]);
        let opts = pass_options(tags, None, None);
        let (id, summary) = copy_volume(repo, target, &volume, opts, "images", report).await?;
        Ok(Some(ImagesSnapshot {
            snapshot: id.to_hex(),
            images,
            bytes,
            bytes_new: summary.bytes_new,
        }))
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    stored
}

/// Runs the `pre_backup` hook of every component that is not stopped, in
/// start order; returns those to run `post_backup` for (hooked ones, and
/// those with only a `post_backup`). A failing hook fails the backup once
/// the `post_backup` hooks of the components before it have run.
async fn pre_backup_hooks(
    ctx: &StepCtx,
    app: &App,
    report: &Report,
) -> StepResult<Vec<ComponentName>> {
    let mut hooked = Vec::new();
    for c in start_order(app) {
        let comp = app.component(&c).expect("invariant: ordered from the app");
        let r = app.reference(&c);
        if !comp.hooks.has_hot() {
            continue;
        }
        match ctx.platform.status(&r).await {
            Ok(ComponentState::Stopped) => continue,
            Ok(_) => {}
            Err(e) => {
                let _ = post_backup_hooks(ctx, app, &hooked, report).await;
                return Err(e.into());
            }
        }
        if let Some(pre) = &comp.hooks.pre_backup {
            report(0, 0, format!("pre_backup hook of {r}"));
            if let Err(e) = ctx.platform.hook(&r, "pre_backup", pre).await {
                let _ = post_backup_hooks(ctx, app, &hooked, report).await;
                return Err(e.into());
            }
        }
        hooked.push(c);
    }
    Ok(hooked)
}

/// Runs the `post_backup` hooks of `hooked`, in reverse order, every one
/// even when one fails; fails with the first failure.
async fn post_backup_hooks(
    ctx: &StepCtx,
    app: &App,
    hooked: &[ComponentName],
    report: &Report,
) -> StepResult<()> {
    let mut first = None;
    for c in hooked.iter().rev() {
        let Some(post) = app.component(c).and_then(|c| c.hooks.post_backup.as_ref()) else {
            continue;
        };
        let r = app.reference(c);
        report(0, 0, format!("post_backup hook of {r}"));
        if let Err(e) = ctx.platform.hook(&r, "post_backup", post).await {
            tracing::error!(component = %r, error = %Chain(&e), "post_backup hook failed");
            first.get_or_insert(e);
        }
    }
    match first {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

/// A pass's backup options: its tags, its parent (none: read everything),
/// and whom to tell once it has read every file.
fn pass_options(
    tags: BTreeMap<String, String>,
    parent: Option<SnapshotId>,
    read_done: Option<Arc<tokio::sync::Notify>>,
) -> BackupOptions {
    BackupOptions {
        tags,
        parent,
        no_parent: parent.is_none(),
        read_done,
        ..BackupOptions::default()
    }
}

/// Waits until every component runs, or says which do not. With
/// `unknown_runs`, a component whose driver cannot tell (a command without
/// a status command) counts as running: its start command succeeded.
async fn wait_running(
    platform: &dyn Platform,
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

// ---- restore ------------------------------------------------------------

/// Replaces `{port:NAME=OLD}` with `{port:NAME=NEW}` where NAME is remapped.
fn remap_ports(arg: &str, ports: &BTreeMap<String, (u16, u16)>) -> String {
    let mut out = arg.to_owned();
    for (name, (old, new)) in ports {
        out = out.replace(
            &format!("{{port:{name}={old}}}"),
            &format!("{{port:{name}={new}}}"),
        );
    }
    out
}

fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("0.0.0.0", port)).is_ok()
}

/// The copy of `app` as `team/name`, with its volumes at `paths` and its
/// ports moved where the original's are taken.
fn copy_of(
    app: &App,
    team: &TeamName,
    name: &AppName,
    paths: &[PathBuf],
    taken: &[u16],
) -> StepResult<(App, Vec<String>)> {
    // Longest first, so /a/b is replaced before /a.
    let mut moves: Vec<(String, String)> = app
        .volumes
        .iter()
        .zip(paths)
        .map(|(v, p)| (v.path.to_string(), p.display().to_string()))
        .collect();
    moves.sort_by_key(|m| std::cmp::Reverse(m.0.len()));
    let mut ports = BTreeMap::new();
    let mut used: Vec<u16> = taken.to_vec();
    for (pname, port) in crate::platform::host::declared_ports(app) {
        let mut p = port;
        while used.contains(&p) || !port_free(p) {
            p = p.checked_add(1).ok_or_else(|| {
                fail(
                    ErrorCode::Unavailable,
                    format!("no free port above {port} for {pname}"),
                )
            })?;
        }
        used.push(p);
        if p != port {
            ports.insert(pname, (port, p));
        }
    }
    let rewrite = |arg: &String| {
        let mut a = arg.clone();
        for (from, to) in &moves {
            a = a.replace(from.as_str(), to);
        }
        remap_ports(&a, &ports)
    };
    let argv = |a: &ferry_core::Argv| {
        ferry_core::Argv::new(a.as_slice().iter().map(rewrite).collect())
            .map_err(|e| invalid(e.to_string()))
    };
    let mut copy = app.clone();
    copy.team = team.clone();
    copy.name = name.clone();
    for (v, p) in copy.volumes.iter_mut().zip(paths) {
        v.path = HostPath::new(p.display().to_string()).map_err(|e| invalid(e.to_string()))?;
    }
    for c in &mut copy.components {
        c.state = ComponentState::Unknown;
        c.hooks = ferry_core::Hooks {
            pre_backup: c.hooks.pre_backup.as_ref().map(argv).transpose()?,
            post_backup: c.hooks.post_backup.as_ref().map(argv).transpose()?,
            pre_stop: c.hooks.pre_stop.as_ref().map(argv).transpose()?,
        };
        if let ComponentKind::Host(HostComponent::Commands {
            start,
            stop,
            status,
        }) = &c.kind
        {
            c.kind = ComponentKind::Host(HostComponent::Commands {
                start: argv(start)?,
                stop: argv(stop)?,
                status: status.as_ref().map(argv).transpose()?,
            });
        } else {
            return Err(fail(
                ErrorCode::FailedPrecondition,
                format!(
                    "component {} is a systemd unit; a copy needs start/stop commands (a unit cannot run twice)",
                    c.name
                ),
            ));
        }
    }
    copy.validate().map_err(|e| invalid(e.to_string()))?;
    let remapped = ports
        .iter()
        .map(|(n, (_, new))| format!("{n}={new}"))
        .collect();
    Ok((copy, remapped))
}

pub async fn restore_app(
    ctx: &StepCtx,
    r: pb::RestoreAppRequest,
    cancel: CancellationToken,
    report: Report,
) -> StepResult<pb::RestoreAppReply> {
    let manifest =
        AppManifest::parse(&r.manifest).map_err(|e| invalid(format!("manifest: {e}")))?;
    let team: TeamName = name("team", &r.team)?;
    let app_name: AppName = name("app", &r.app)?;
    let job = r.step.unwrap_or_default().job_id;
    let root = ctx.platform.copies_dir().ok_or_else(|| {
        fail(
            ErrorCode::FailedPrecondition,
            "this agent cannot hold copies",
        )
    })?;
    // Done before (the answer was lost)?
    if let Some(existing) = ctx.platform.app(&team, &app_name).await? {
        if ctx.platform.copy_job(&team, &app_name) == Some(job) {
            return Ok(pb::RestoreAppReply {
                volume_paths: existing
                    .volumes
                    .iter()
                    .map(|v| v.path.to_string())
                    .collect(),
                remapped_ports: Vec::new(),
            });
        }
        return Err(fail(
            ErrorCode::AlreadyExists,
            format!("app {team}/{app_name} already exists on this agent"),
        ));
    }
    let (repo, target) = open_repository(r.target, r.password, ctx.storage_retry).await?;
    let repo = repo.with_cancel(cancel);
    // One directory per restoring job: an attempt of this job clears what
    // an earlier one left there, and never touches what another job left
    // (a copy removed with its data kept).
    let base = copy_home(&root, &team, &app_name, job)?;
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
            .map_err(|e| repo_err(&target, e))?;
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
    let (copy, remapped) = copy_of(
        &manifest.app,
        &team,
        &app_name,
        &all_paths,
        &ctx.platform.ports_in_use(),
    )?;
    ctx.platform.add_copy(copy.clone(), job).await?;
    report(0, 0, format!("starting {team}/{app_name}"));
    for c in start_order(&copy) {
        let r = copy.reference(&c);
        if ctx.platform.status(&r).await? != ComponentState::Running {
            ctx.platform.start(&r).await?;
        }
    }
    tracing::info!(team = %team, app = %app_name, job, "copy restored and started");
    Ok(pb::RestoreAppReply {
        volume_paths: all_paths.iter().map(|p| p.display().to_string()).collect(),
        remapped_ports: remapped,
    })
}

/// `ROOT/TEAM/APP/job-N`, the home of the copy job `N` restores: every
/// directory Ferry makes on the way is 0711 (whatever the umask), so the
/// copy's own user passes through to its volumes (which get the backed-up
/// directories' owners and modes) without listing anything.
fn copy_home(
    root: &std::path::Path,
    team: &TeamName,
    app: &AppName,
    job: u64,
) -> StepResult<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let team_dir = root.join(team.as_str());
    let app_dir = team_dir.join(app.as_str());
    let home = app_dir.join(format!("job-{job}"));
    for dir in [root, &team_dir, &app_dir, &home] {
        if dir.is_dir() {
            continue;
        }
        std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)))
            .map_err(|e| {
                fail(
                    ErrorCode::Internal,
                    format!("cannot create the copies directory {}: {e}", dir.display()),
                )
            })?;
    }
    Ok(home)
}

// ---- remove, check ------------------------------------------------------

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
    if r.delete_data && copy_job.is_some() {
        let root = ctx.platform.copies_dir();
        for v in &app.volumes {
            // Only directories under the copies root are Ferry's to delete.
            if root
                .as_ref()
                .is_some_and(|root| v.path.as_path().starts_with(root))
                && let Err(e) = std::fs::remove_dir_all(v.path.as_path())
                && e.kind() != std::io::ErrorKind::NotFound
            {
                return Err(fail(
                    ErrorCode::Internal,
                    format!("cannot remove {}: {e}", v.path),
                ));
            }
        }
    }
    tracing::info!(team = %team, app = %app_name, copy = copy_job.is_some(), "app removed");
    Ok(pb::RemoveAppReply { removed: true })
}

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

// ---- forget, verify, prune ----------------------------------------------

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

#[cfg(test)]
mod tests;
