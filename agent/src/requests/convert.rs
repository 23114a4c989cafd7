//! The controller's step requests as the steps' domain inputs, and the
//! steps' answers as replies: protobuf stays on this side of the link's
//! edge. Every name, id and target is checked here, before a step acts.

use std::str::FromStr;
use std::time::Duration;

use ferry_core::{AppManifest, BackupId, JobId, NameError};
use ferry_proto::v1 as pb;

use crate::steps::{self, RepoAccess, StepResult, invalid};

fn name<T: FromStr<Err = NameError>>(what: &str, v: &str) -> StepResult<T> {
    v.parse().map_err(|e| invalid(format!("{what}: {e}")))
}

fn backup_id(id: u64) -> StepResult<BackupId> {
    BackupId::new(id).map_err(|e| invalid(e.to_string()))
}

fn repo(
    target: Option<pb::StorageTarget>,
    password: Vec<u8>,
    retry: Duration,
) -> StepResult<RepoAccess> {
    Ok(RepoAccess::new(target, password, retry)?)
}

pub fn backup(r: pb::BackupAppRequest, retry: Duration) -> StepResult<steps::BackupApp> {
    let step = r.step.unwrap_or_default();
    Ok(steps::BackupApp {
        team: name("team", &r.team)?,
        app: name("app", &r.app)?,
        mode: r.mode.parse().map_err(invalid)?,
        backup: backup_id(r.backup_id)?,
        job: JobId::new(step.job_id).map_err(|e| invalid(e.to_string()))?,
        index: step.index,
        storage: name("storage", &r.storage)?,
        cluster: name("cluster", &r.cluster)?,
        node: name("node", &r.node)?,
        repo: repo(r.target, r.password, retry)?,
    })
}

pub fn restore(r: pb::RestoreAppRequest, retry: Duration) -> StepResult<steps::RestoreApp> {
    Ok(steps::RestoreApp {
        manifest: AppManifest::parse(&r.manifest).map_err(|e| invalid(format!("manifest: {e}")))?,
        team: name("team", &r.team)?,
        app: name("app", &r.app)?,
        job: r.step.unwrap_or_default().job_id,
        repo: repo(r.target, r.password, retry)?,
    })
}

pub fn restored(r: steps::Restored) -> pb::RestoreAppReply {
    pb::RestoreAppReply {
        volume_paths: r.volume_paths,
        remapped_ports: r.remapped_ports,
    }
}

pub fn remove(r: pb::RemoveAppRequest) -> StepResult<steps::RemoveApp> {
    Ok(steps::RemoveApp {
        team: name("team", &r.team)?,
        app: name("app", &r.app)?,
        delete_data: r.delete_data,
        restored_by_job: (r.restored_by_job != 0).then_some(r.restored_by_job),
    })
}

pub fn check(r: pb::CheckAppRequest) -> StepResult<steps::CheckApp> {
    Ok(steps::CheckApp {
        team: name("team", &r.team)?,
        app: name("app", &r.app)?,
        wait: Duration::from_millis(r.wait_ms),
    })
}

pub fn forget(r: pb::ForgetBackupRequest, retry: Duration) -> StepResult<steps::ForgetBackup> {
    Ok(steps::ForgetBackup {
        backup: backup_id(r.backup_id)?,
        snapshots: steps::snapshot_ids(&r.snapshots)?,
        repo: repo(r.target, r.password, retry)?,
    })
}

pub fn verify(r: pb::VerifyBackupRequest, retry: Duration) -> StepResult<steps::VerifyBackup> {
    Ok(steps::VerifyBackup {
        backup: backup_id(r.backup_id)?,
        snapshots: steps::snapshot_ids(&r.snapshots)?,
        read_data_percent: u8::try_from(r.read_data_percent.min(100)).unwrap_or(100),
        repo: repo(r.target, r.password, retry)?,
    })
}

pub fn prune(r: pb::PruneRequest, retry: Duration) -> StepResult<RepoAccess> {
    repo(r.target, r.password, retry)
}
