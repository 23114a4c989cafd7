//! Back up an app: capture its images and config, copy its volumes while
//! it runs, and in cold mode stop its stateful components for the delta
//! pass only, starting them again whatever happens.

use ferry_repo::LockGuard;

use super::*;

/// What a backup step is asked: which app, how, and where to.
#[derive(Debug)]
pub struct BackupApp {
    pub team: TeamName,
    pub app: AppName,
    pub mode: BackupMode,
    pub backup: BackupId,
    /// The step: its job and place in the job's plan.
    pub job: JobId,
    pub index: u32,
    /// Recorded in the manifest: the location's name, the agent's cluster
    /// and node.
    pub storage: LocationName,
    pub cluster: ClusterName,
    pub node: NodeName,
    pub repo: RepoAccess,
}

/// Backs the app up; returns its committed manifest (the JSON document).
pub async fn backup_app(
    ctx: &StepCtx,
    r: BackupApp,
    cancel: CancellationToken,
    report: Report,
) -> StepResult<Vec<u8>> {
    let started_at = Timestamp::now();
    let started = Instant::now();
    let BackupApp {
        team,
        app: app_name,
        mode,
        backup,
        job,
        index,
        storage,
        cluster,
        node,
        repo,
    } = r;
    let app = ctx.platform.app(&team, &app_name).await?.ok_or_else(|| {
        fail(
            ErrorCode::NotFound,
            format!("app {team}/{app_name} is not on this agent"),
        )
    })?;
    let (repo, target) = repo.open().await?;
    let repo = repo.with_cancel(cancel.clone());
    let object = AppManifest::object_name(backup);
    // Done before (the answer was lost): the same manifest.
    if let Some(doc) = repo
        .load_app_manifest(&object)
        .await
        .map_err(|e| repo_err(&target, e))?
    {
        tracing::info!(backup = %backup, "backup already committed; answering with its manifest");
        return Ok(doc);
    }
    // Cancelled before it began (a settle: an earlier attempt that may
    // have run is stopped, and this one only says what was done).
    if cancel.is_cancelled() {
        return Err(not_started());
    }

    // What an earlier attempt (or another step) stopped and could not
    // start again runs first: an app still down is never taken for one
    // its owner stopped, and never left down by a backup that succeeds.
    start_what_was_left(ctx, &team, &app_name).await?;
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
    // A mount the backup cannot take refuses it before anything runs.
    let refused = app.refused_mounts();
    if !refused.is_empty() {
        return Err(fail(
            ErrorCode::FailedPrecondition,
            format!(
                "{team}/{app_name} has mounts Ferry cannot back up ({}); nothing was stopped",
                refused.join("; ")
            ),
        ));
    }
    // Where each volume is read, asked of its driver before anything
    // stops (a volume that is gone fails the backup now).
    let mut volumes = Vec::new();
    for v in &app.volumes {
        let source = ctx.platform.source(&app, v).await?;
        volumes.push(Volume {
            name: v.name.clone(),
            path: HostPath::new(source.display().to_string())
                .map_err(|e| invalid(format!("volume {}: {e}", v.name)))?,
        });
    }
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
    tracing::info!(volumes = volumes.len(), "{first_pass} started");
    let copied = async {
        let mut pre: Vec<(SnapshotId, BackupSummary)> = Vec::new();
        for v in &volumes {
            let t = tags(if cold { "pre" } else { "final" }, v);
            let opts = pass_options(t, None, None);
            pre.push(copy_volume(&repo, None, &target, v, opts, first_pass, &report).await?);
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

    let mut stopped: Vec<Receipt> = Vec::new();
    // What the stops and starts had to say, for the record.
    let mut remarks: Vec<String> = Vec::new();
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
        // What the delta passes read from the repository (the index, the
        // pre-copy's trees) is read now, while the app runs: while it is
        // down they only read the volumes (and write, past the buffer), so
        // storage that is slow or has stopped answering does not lengthen
        // the downtime.
        // (On a failure the lock is dropped: it goes in the background.)
        let mut prepared = Vec::new();
        for (v, (parent, _)) in volumes.iter().zip(&pre) {
            let opts = pass_options(tags("final", v), Some(*parent), None);
            let p = repo
                .prepare_backup(v.path.as_path(), &opts)
                .await
                .map_err(|e| repo_err(&target, e))?;
            prepared.push(Arc::new(p));
        }
        if cancel.is_cancelled() {
            return Err(fail(ErrorCode::Cancelled, "cancelled; nothing was stopped"));
        }
        // A lock lost meanwhile fails the backup now, not once the app is
        // down.
        shared.check().map_err(|e| repo_err(&target, e))?;
        // What each stop will have to put back, read while the app runs,
        // and recorded durably before anything stops; the entry is this
        // attempt's own.
        let mut receipts: Vec<Receipt> = Vec::new();
        for c in &stop_order {
            receipts.push(ctx.platform.receipt(c).await?);
        }
        let held = match &ctx.journal {
            Some(j) => Some(
                j.begin(&format!("job-{job}-{index}"), &receipts)
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
            for receipt in &receipts {
                // A cancel (or the agent's shutdown) stops nothing more.
                if cancel.is_cancelled() {
                    return Err(fail(ErrorCode::Cancelled, "cancelled"));
                }
                report(0, 0, format!("stopping {}", receipt.component));
                // Counted before the call: a stop that fails half-way (or
                // times out while the platform goes on) is started again
                // all the same (a start checks first whether it runs).
                stopped.push(receipt.clone());
                remarks.extend(ctx.platform.stop(receipt).await?);
            }
            Ok::<_, StepFailure>(())
        }
        .await;
        // A stop that failed may still go on on the platform: its entry is
        // left to the journal's replays, which take the component for
        // running only once the stop's deadline has passed.
        let stop_failed = matches!(&stopping, Err(e) if e.code != ErrorCode::Cancelled);
        let delta_started = Instant::now();
        let work = async {
            stopping?;
            tracing::info!(
                stop_ms = ms(stop_at.elapsed()),
                components = stopped.len(),
                "stopped; delta pass started"
            );
            let passes = volumes.iter().zip(&pre).zip(&read_dones).zip(prepared).map(
                |(((v, (parent, _)), done), prepared)| {
                    let opts = BackupOptions {
                        read_ahead: Some(read_ahead),
                        // Moved in: the pass takes it without a copy.
                        prepared: Some(prepared),
                        ..pass_options(tags("final", v), Some(*parent), Some(done.clone()))
                    };
                    copy_volume(
                        &delta_repo,
                        Some(&shared),
                        &target,
                        v,
                        opts,
                        "delta pass",
                        &report,
                    )
                },
            );
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
        // Boxed, so it can be dropped (its borrow of the lock with it)
        // before the lock is released.
        let mut work = Box::pin(work);
        let mut result = tokio::select! {
            r = &mut work => Some(r),
            () = all_read => None,
        };
        // The delta pass's share of the downtime: until its last read.
        timings.delta_ms = ms(delta_started.elapsed());
        // A component running again before Ferry starts it was started by
        // someone else: what the delta pass read may be a live copy.
        let mut started_by_other = None;
        for r in &stopped {
            if let Ok(ComponentState::Running) = ctx.platform.status(&r.component).await {
                started_by_other.get_or_insert_with(|| r.component.clone());
            }
        }
        if started_by_other.is_some() {
            delta_cancel.cancel();
        }
        // Whatever happened: start again exactly what was stopped, in
        // start order, never what was not.
        report(0, 0, "starting the app again".into());
        let restarted = journal::restart(ctx.platform.as_ref(), &stopped).await;
        let stopped_refs: Vec<ComponentRef> = stopped.iter().map(|r| r.component.clone()).collect();
        // Waited for only once started: one that could not be started is
        // said at once (the journal's replays go on with it).
        let wait = match &restarted {
            Ok(_) => {
                wait_running(
                    ctx.platform.as_ref(),
                    &stopped_refs,
                    Duration::from_secs(60),
                    false,
                )
                .await
            }
            Err(e) => Err(format!("not started again: {e}")),
        };
        timings.downtime_ms = ms(stop_at.elapsed());
        tracing::info!(downtime_ms = timings.downtime_ms, "the app runs again");
        match (&restarted, &wait, held) {
            (Ok(_), Ok(()), Some(held)) if stop_failed => {
                tracing::warn!(
                    journal = held.key(),
                    "a stop failed and may still go on; the journal's replays see that what it stopped stays running"
                );
            }
            (Ok(_), Ok(()), Some(held)) => {
                if let Err(e) = held.clear() {
                    tracing::error!(error = %e, "journal entry not cleared");
                }
            }
            (Ok(_), Ok(()), None) => {}
            (_, _, held) => {
                // Released: the journal's replays start them once they can.
                tracing::error!(journal = ?held.as_ref().map(|h| h.key()), "components Ferry stopped did not all start again; the journal keeps them")
            }
        }
        // The uploads drain while the app runs.
        let finals = match result.take() {
            Some(r) => r,
            None => (&mut work).await,
        };
        let finals = finals.map_err(|e| match shared.check() {
            Err(lost) => repo_err(&target, lost),
            Ok(()) => e,
        });
        drop(work);
        // A failed delta pass does not wait for the lock's removal.
        if finals.is_ok() {
            shared.release().await;
        }
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
        remarks.extend(restarted?);
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
        storage,
        ferry_version: env!("CARGO_PKG_VERSION").to_owned(),
        cluster,
        node,
        app: captured,
        mode,
        stopped: stopped
            .iter()
            .map(|r| r.component.component.clone())
            .collect(),
        volumes: vols,
        images,
        remarks,
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
    Ok(doc)
}

/// Backs a volume up; its progress has no total (a backup does not know
/// how much it will read).
async fn copy_volume(
    repo: &Repository,
    lock: Option<&LockGuard>,
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
    let out = match lock {
        Some(lock) => {
            repo.backup_under(lock, v.path.as_path(), opts, Some(progress))
                .await
        }
        None => repo.backup(v.path.as_path(), opts, Some(progress)).await,
    }
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
        let Some((images, bytes)) = ctx.platform.capture(app, &dir.join("images.tar")).await?
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
        let (id, summary) =
            copy_volume(repo, None, target, &volume, opts, "images", report).await?;
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
