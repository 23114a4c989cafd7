//! What job steps do, and the job state the engine persists.

use serde::{Deserialize, Serialize};

use ferry_core::{AppName, BackupId, BackupMode, ClusterName, LocationName, NodeName, TeamName};

use super::machine::{Executor, Job, Phase, StepStatus};

/// The kinds of jobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobKind {
    Backup,
    Restore,
    Migrate,
    DeleteBackup,
    Verify,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Backup => "backup",
            Self::Restore => "restore",
            Self::Migrate => "migrate",
            Self::DeleteBackup => "delete-backup",
            Self::Verify => "verify",
        }
    }
}

/// An app on a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppAt {
    pub cluster: ClusterName,
    pub node: NodeName,
    pub team: TeamName,
    pub app: AppName,
}

impl std::fmt::Display for AppAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} on {}/{}",
            self.team, self.app, self.cluster, self.node
        )
    }
}

/// One step's work.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "step")]
pub enum Work {
    /// Back the app up into the location as backup `backup`.
    Backup {
        source: AppAt,
        storage: LocationName,
        backup: BackupId,
        mode: BackupMode,
    },
    /// Restore backup `backup` as the new app `copy`.
    Restore { backup: BackupId, copy: AppAt },
    /// Wait until every component of the app runs.
    Check { app: AppAt },
    /// Remove an app: a copy this job restored (with its data), or the
    /// source of a move (data kept).
    Remove {
        app: AppAt,
        /// Only a copy this job restored; its data goes too.
        copy_of_this_job: bool,
    },
    /// Delete backup `backup` from its repository and the catalog.
    Forget { backup: BackupId },
    /// Prune the location's repository.
    Prune { storage: LocationName },
    Verify {
        backup: BackupId,
        read_data_percent: u32,
    },
}

impl Work {
    /// What the step does, for people.
    pub fn describe(&self) -> String {
        match self {
            Self::Backup {
                source,
                storage,
                backup,
                mode,
            } => format!("back up {source} to {storage} as backup {backup} ({mode})"),
            Self::Restore { backup, copy } => format!("restore backup {backup} as {copy}"),
            Self::Check { app } => format!("check that {app} runs"),
            Self::Remove {
                app,
                copy_of_this_job: true,
            } => format!("remove the copy {app} and its data"),
            Self::Remove { app, .. } => format!("remove the source {app} (its data is kept)"),
            Self::Forget { backup } => format!("delete backup {backup} from its repository"),
            Self::Prune { storage } => format!("prune the repository of {storage}"),
            Self::Verify {
                backup,
                read_data_percent,
            } => format!("verify backup {backup} (reading {read_data_percent}% of its data)"),
        }
    }
}

/// Live progress of the running step (memory only).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepProgress {
    pub step: String,
    pub done: u64,
    pub total: u64,
    pub message: String,
    pub bytes_per_second: u64,
    pub eta_seconds: u64,
}

/// Everything the engine keeps of a job, persisted as its catalog record's
/// state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobState {
    pub kind: JobKind,
    pub summary: String,
    pub machine: Job<Work>,
    /// The backup taken or used.
    #[serde(default)]
    pub backup: Option<BackupId>,
    #[serde(default)]
    pub downtime_ms: u64,
    /// The copy made, once restored.
    #[serde(default)]
    pub copy: Option<AppAt>,
    #[serde(default)]
    pub remapped_ports: Vec<String>,
    #[serde(default)]
    pub cancel_requested: bool,
}

impl JobState {
    /// "running", "undoing", "succeeded", "failed" or "cancelled", and the
    /// reason of a failure.
    pub fn status(&self) -> (&'static str, String) {
        use super::machine::Outcome;
        match &self.machine.phase {
            Phase::Running => ("running", String::new()),
            Phase::Undoing { cause } => (
                "undoing",
                match cause {
                    Outcome::Failed { reason } => reason.clone(),
                    Outcome::Cancelled => "cancelled".into(),
                    Outcome::Succeeded => String::new(),
                },
            ),
            Phase::Done { outcome, .. } => match outcome {
                Outcome::Succeeded => ("succeeded", String::new()),
                Outcome::Failed { reason } => ("failed", reason.clone()),
                Outcome::Cancelled => ("cancelled", "cancelled by request".into()),
            },
        }
    }

    /// The agents the job's steps run on.
    pub fn agents(&self) -> Vec<ferry_core::AgentId> {
        let mut v: Vec<_> = self
            .machine
            .plan
            .iter()
            .chain(self.machine.undo.iter())
            .flat_map(|s| {
                std::iter::once(&s.step.executor).chain(s.step.undo.as_deref().map(|u| &u.executor))
            })
            .filter_map(|e| match e {
                Executor::Agent(a) => Some(a.clone()),
                Executor::Controller => None,
            })
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// The step running now, if any.
    pub fn running_step(&self) -> Option<String> {
        let list = match self.machine.phase {
            Phase::Undoing { .. } => &self.machine.undo,
            _ => &self.machine.plan,
        };
        list.iter()
            .find(|s| matches!(s.status, StepStatus::Dispatched { .. }))
            .map(|s| s.step.work.describe())
    }
}
