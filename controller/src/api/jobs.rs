//! Jobs and backups over the operator API: start a job (checked and
//! planned first), list, show, watch and cancel jobs, list and show
//! backups.

use std::pin::Pin;

use ferry_core::{AppName, BackupId, BackupMode, ClusterName, JobId, LocationName, TeamName};
use ferry_proto::convert::parse;
use ferry_proto::v1 as pb;
use futures::Stream;
use tonic::Status;

use super::ApiError;
use super::operator::{OperatorApi, next_token, page_request};
use crate::catalog::{BackupFilter, BackupRecord};
use crate::jobs::engine::JobView;
use crate::jobs::machine::{StepState, StepStatus};
use crate::jobs::plan::{Destination, Planner};
use crate::jobs::work::Work;

pub type JobStream = Pin<Box<dyn Stream<Item = Result<pb::Job, Status>> + Send>>;

fn mode(text: &str) -> Result<BackupMode, ApiError> {
    if text.is_empty() {
        return Ok(BackupMode::default());
    }
    text.parse().map_err(ApiError::Invalid)
}

fn optional<T>(field: &'static str, text: String) -> Result<Option<T>, ApiError>
where
    T: TryFrom<String, Error = ferry_core::NameError>,
{
    if text.is_empty() {
        return Ok(None);
    }
    Ok(Some(parse(|| field.to_owned(), text)?))
}

fn backup_id(field: &'static str, id: u64) -> Result<BackupId, ApiError> {
    BackupId::new(id).map_err(|_| ApiError::Invalid(format!("{field} is missing")))
}

fn job_id(id: u64) -> Result<JobId, ApiError> {
    JobId::new(id).map_err(|_| ApiError::Invalid("job_id is missing".into()))
}

fn step_pb(s: &StepState<Work>, undo: bool) -> pb::JobStep {
    let (status, reason) = match &s.status {
        StepStatus::Pending => ("pending", String::new()),
        StepStatus::Dispatched { .. } => ("running", String::new()),
        StepStatus::Succeeded { .. } => ("succeeded", String::new()),
        StepStatus::Failed { reason, .. } => ("failed", reason.clone()),
        StepStatus::Skipped => ("skipped", String::new()),
    };
    pb::JobStep {
        name: s.step.work.describe(),
        status: status.to_owned(),
        attempts: s.attempts,
        reason,
        undo,
    }
}

pub(super) fn job_pb(v: &JobView) -> pb::Job {
    let (state, reason) = v.state.status();
    let finished = match &v.state.machine.phase {
        crate::jobs::machine::Phase::Done { at, .. } => at.unix_millis(),
        _ => 0,
    };
    let leftovers = match &v.state.machine.phase {
        crate::jobs::machine::Phase::Done { leftovers, .. } => leftovers.clone(),
        _ => Vec::new(),
    };
    let m = &v.state.machine;
    pb::Job {
        id: v.id.get(),
        kind: v.state.kind.as_str().to_owned(),
        state: state.to_owned(),
        reason,
        summary: v.state.summary.clone(),
        created_unix_ms: v.created_at.unix_millis(),
        finished_unix_ms: finished,
        steps: m
            .plan
            .iter()
            .map(|s| step_pb(s, false))
            .chain(m.undo.iter().map(|s| step_pb(s, true)))
            .collect(),
        progress: v.progress.as_ref().map(|p| pb::JobProgress {
            step: p.step.clone(),
            done_bytes: p.done,
            total_bytes: p.total,
            message: p.message.clone(),
            bytes_per_second: p.bytes_per_second,
            eta_seconds: p.eta_seconds,
        }),
        backup_id: v.state.backup.map_or(0, BackupId::get),
        downtime_ms: v.state.downtime_ms,
        copy: v
            .state
            .copy
            .as_ref()
            .map(|c| format!("{}/{}/{}", c.cluster, c.team, c.app))
            .unwrap_or_default(),
        remapped_ports: v.state.remapped_ports.clone(),
        leftovers,
        cancel_requested: v.state.cancel_requested,
    }
}

pub(super) fn backup_pb(b: &BackupRecord) -> pb::Backup {
    let m = &b.manifest;
    pb::Backup {
        id: m.backup.get(),
        storage: m.storage.to_string(),
        cluster: m.cluster.to_string(),
        node: m.node.to_string(),
        team: m.app.team.to_string(),
        app: m.app.name.to_string(),
        mode: m.mode.as_str().to_owned(),
        created_unix_ms: m.started_at.unix_millis(),
        duration_ms: m.timings.total_ms,
        downtime_ms: m.timings.downtime_ms,
        bytes: m.volumes.iter().map(|v| v.bytes).sum(),
        files: m.volumes.iter().map(|v| v.files).sum(),
        volumes: m
            .volumes
            .iter()
            .map(|v| pb::BackupVolume {
                volume: v.volume.to_string(),
                path: v.path.to_string(),
                snapshot: v.snapshot.clone(),
                files: v.files,
                bytes: v.bytes,
            })
            .collect(),
        ferry_version: m.ferry_version.clone(),
        job_id: m.job.get(),
        stopped: m.stopped.iter().map(ToString::to_string).collect(),
        pre_copy_ms: m.timings.pre_copy_ms,
        delta_ms: m.timings.delta_ms,
        bytes_new: m.timings.bytes_new,
        delta_bytes_read: m.timings.delta_bytes_read,
        images: m.images.as_ref().map(|i| pb::BackupImages {
            snapshot: i.snapshot.clone(),
            images: i.images.clone(),
            bytes: i.bytes,
            bytes_new: i.bytes_new,
        }),
        remarks: m.remarks.clone(),
        mounts: m
            .app
            .components
            .iter()
            .flat_map(|c| match &c.kind {
                ferry_core::ComponentKind::Container(k) => k
                    .mounts
                    .iter()
                    .map(|mt| pb::BackupMount {
                        component: c.name.to_string(),
                        destination: mt.destination.clone(),
                        source: mt.source.clone(),
                        kind: mt.kind.clone(),
                        read_only: mt.read_only,
                        backup: mt.backup.code().0.to_owned(),
                        why: mt.backup.code().1.to_owned(),
                    })
                    .collect(),
                ferry_core::ComponentKind::Host(_) => Vec::new(),
            })
            .collect(),
    }
}

impl OperatorApi {
    fn planner(&self) -> Planner<'_> {
        Planner {
            catalog: self.shared.catalog.as_ref(),
            fleet: &self.shared.fleet,
        }
    }

    async fn start(&self, state: crate::jobs::work::JobState) -> Result<pb::Job, ApiError> {
        Ok(job_pb(&self.shared.engine.submit(state).await?))
    }

    pub(super) async fn backup_app(&self, r: pb::BackupAppJobRequest) -> Result<pb::Job, ApiError> {
        let cluster: ClusterName = parse(|| "cluster".to_owned(), r.cluster)?;
        let team: TeamName = parse(|| "team".to_owned(), r.team)?;
        let app: AppName = parse(|| "app".to_owned(), r.app)?;
        let storage: Option<LocationName> = optional("storage", r.storage)?;
        let state = self
            .planner()
            .backup(&cluster, &team, &app, storage.as_ref(), mode(&r.mode)?)
            .await?;
        self.start(state).await
    }

    pub(super) async fn restore_backup(
        &self,
        r: pb::RestoreBackupRequest,
    ) -> Result<pb::Job, ApiError> {
        let backup = backup_id("backup_id", r.backup_id)?;
        let to = Destination {
            cluster: parse(|| "to_cluster".to_owned(), r.to_cluster)?,
            team: parse(|| "to_team".to_owned(), r.to_team)?,
            name: optional("as_name", r.as_name)?,
            delete_source: r.delete_source,
        };
        let state = self.planner().restore(backup, &to).await?;
        self.start(state).await
    }

    pub(super) async fn migrate_app(&self, r: pb::MigrateAppRequest) -> Result<pb::Job, ApiError> {
        let cluster: ClusterName = parse(|| "cluster".to_owned(), r.cluster)?;
        let team: TeamName = parse(|| "team".to_owned(), r.team)?;
        let app: AppName = parse(|| "app".to_owned(), r.app)?;
        let storage: Option<LocationName> = optional("storage", r.storage)?;
        let to = Destination {
            cluster: parse(|| "to_cluster".to_owned(), r.to_cluster)?,
            team: parse(|| "to_team".to_owned(), r.to_team)?,
            name: optional("as_name", r.as_name)?,
            delete_source: r.delete_source,
        };
        let state = self
            .planner()
            .migrate(&cluster, &team, &app, storage.as_ref(), mode(&r.mode)?, &to)
            .await?;
        self.start(state).await
    }

    pub(super) async fn delete_backup(
        &self,
        r: pb::DeleteBackupRequest,
    ) -> Result<pb::Job, ApiError> {
        let state = self
            .planner()
            .delete(backup_id("backup_id", r.backup_id)?)
            .await?;
        self.start(state).await
    }

    pub(super) async fn verify_backup(
        &self,
        r: pb::VerifyBackupJobRequest,
    ) -> Result<pb::Job, ApiError> {
        let state = self
            .planner()
            .verify(backup_id("backup_id", r.backup_id)?, r.read_data_percent)
            .await?;
        self.start(state).await
    }

    pub(super) async fn list_jobs(
        &self,
        r: pb::ListJobsRequest,
    ) -> Result<pb::ListJobsResponse, ApiError> {
        let page = self
            .shared
            .catalog
            .list_jobs(r.active, &page_request(r.page_size, &r.page_token)?)
            .await?;
        let mut jobs = Vec::with_capacity(page.items.len());
        for rec in &page.items {
            // A running job's progress lives in the engine.
            let view = match self.shared.engine.get(rec.id).await? {
                Some(v) => v,
                None => JobView::from_record(rec)?,
            };
            jobs.push(job_pb(&view));
        }
        Ok(pb::ListJobsResponse {
            jobs,
            next_page_token: next_token(&page),
        })
    }

    pub(super) async fn get_job(&self, r: pb::GetJobRequest) -> Result<pb::Job, ApiError> {
        let id = job_id(r.job_id)?;
        match self.shared.engine.get(id).await? {
            Some(v) => Ok(job_pb(&v)),
            None => Err(ApiError::NotFound(format!("job {id} not found"))),
        }
    }

    pub(super) async fn cancel_job(&self, r: pb::GetJobRequest) -> Result<pb::Job, ApiError> {
        let id = job_id(r.job_id)?;
        match self.shared.engine.cancel(id).await? {
            Some(v) => Ok(job_pb(&v)),
            None => Err(ApiError::NotFound(format!("job {id} not found"))),
        }
    }

    pub(super) async fn watch_job(&self, r: pb::GetJobRequest) -> Result<JobStream, ApiError> {
        let id = job_id(r.job_id)?;
        let Some(mut rx) = self.shared.engine.watch(id).await? else {
            // Not running: it has ended (or never was).
            let job = self.get_job(r).await?;
            return Ok(Box::pin(futures::stream::iter([Ok(job)])));
        };
        let engine = self.shared.engine.clone();
        let stream = async_stream(move |tx| async move {
            loop {
                let job = job_pb(&rx.borrow_and_update().clone());
                if tx.send(Ok(job)).await.is_err() {
                    return;
                }
                if rx.changed().await.is_err() {
                    break;
                }
            }
            // The job ended: its final state from the catalog.
            match engine.get(id).await {
                Ok(Some(v)) => {
                    let _ = tx.send(Ok(job_pb(&v))).await;
                }
                Ok(None) => {}
                Err(e) => {
                    let _ = tx.send(Err(ApiError::from(e).into())).await;
                }
            }
        });
        Ok(stream)
    }

    pub(super) async fn list_backups(
        &self,
        r: pb::ListBackupsRequest,
    ) -> Result<pb::ListBackupsResponse, ApiError> {
        let filter = BackupFilter {
            cluster: optional("cluster", r.cluster)?,
            team: optional("team", r.team)?,
            app: optional("app", r.app)?,
            storage: optional("storage", r.storage)?,
        };
        let page = self
            .shared
            .catalog
            .list_backups(&filter, &page_request(r.page_size, &r.page_token)?)
            .await?;
        Ok(pb::ListBackupsResponse {
            backups: page.items.iter().map(backup_pb).collect(),
            next_page_token: next_token(&page),
        })
    }

    pub(super) async fn get_backup(&self, r: pb::GetBackupRequest) -> Result<pb::Backup, ApiError> {
        let id = backup_id("backup_id", r.backup_id)?;
        match self.shared.catalog.get_backup(id).await? {
            Some(b) => Ok(backup_pb(&b)),
            None => Err(ApiError::NotFound(format!("backup {id} not found"))),
        }
    }
}

/// A stream fed by a task through a small channel.
fn async_stream<F, Fut>(f: F) -> JobStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::Job, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
