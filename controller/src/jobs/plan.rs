//! Plans of the job kinds: which steps, on which agents, with what undo.
//! Everything a plan needs is checked here, before the job starts, so a
//! request that cannot work is refused with the reason instead of failing
//! later.

use std::collections::BTreeSet;

use ferry_core::{
    AgentId, App, AppName, BackupId, BackupMode, ClusterName, LocationName, TeamName,
};

use super::machine::{Executor, Job, Limits, Step};
use super::work::{AppAt, JobKind, JobState, Work};
use crate::catalog::{
    AgentRecord, AppFilter, BackupRecord, Catalog, CatalogError, Counter, PageRequest, StorageKind,
    StorageRecord,
};
use crate::fleet::Fleet;
use crate::locations::reachable_from;

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unavailable(String),
}

impl From<ferry_core::NameError> for PlanError {
    fn from(e: ferry_core::NameError) -> Self {
        Self::Catalog(e.into())
    }
}

impl ferry_core::CodedError for PlanError {
    fn code(&self) -> ferry_core::ErrorCode {
        use ferry_core::ErrorCode as C;
        match self {
            Self::Catalog(e) => e.code(),
            Self::Invalid(_) => C::FailedPrecondition,
            Self::NotFound(_) => C::NotFound,
            Self::Unavailable(_) => C::Unavailable,
        }
    }
}

/// Where a restore or migration goes.
#[derive(Clone, Debug)]
pub struct Destination {
    pub cluster: ClusterName,
    pub team: TeamName,
    pub name: Option<AppName>,
    pub delete_source: bool,
}

pub struct Planner<'a> {
    pub catalog: &'a dyn Catalog,
    pub fleet: &'a Fleet,
}

fn agent_step(work: Work, agent: &AgentId, undo: Option<Work>) -> Step<Work> {
    Step {
        work,
        executor: Executor::Agent(agent.clone()),
        resumable: true,
        undo: undo.map(|u| {
            Box::new(Step {
                work: u,
                executor: Executor::Agent(agent.clone()),
                resumable: true,
                undo: None,
            })
        }),
    }
}

fn state(
    kind: JobKind,
    summary: String,
    plan: Vec<Step<Work>>,
    backup: Option<BackupId>,
) -> JobState {
    JobState {
        kind,
        summary,
        machine: Job::new(plan, Limits::default(), Vec::new()),
        backup,
        downtime_ms: 0,
        copy: None,
        remapped_ports: Vec::new(),
        cancel_requested: false,
    }
}

impl Planner<'_> {
    async fn storage(&self, name: &LocationName) -> Result<StorageRecord, PlanError> {
        self.catalog
            .get_storage(name)
            .await?
            .ok_or_else(|| PlanError::NotFound(format!("storage location {name} not found")))
    }

    /// The app, where it is and the agent that reports it.
    async fn source(
        &self,
        cluster: &ClusterName,
        team: &TeamName,
        app: &AppName,
    ) -> Result<(AppAt, AgentId, App), PlanError> {
        let rec = self.catalog.get_app(cluster, team, app).await?.ok_or_else(|| {
            PlanError::NotFound(format!(
                "app {team}/{app} is not in cluster {cluster} (`ferryctl app ls --cluster {cluster}` lists its apps)"
            ))
        })?;
        let agent = self
            .catalog
            .agent_of_node(cluster, &rec.node)
            .await?
            .ok_or_else(|| {
                PlanError::NotFound(format!(
                    "no agent is enrolled for node {} of cluster {cluster}, which reported app {team}/{app}",
                    rec.node
                ))
            })?;
        Ok((
            AppAt {
                cluster: cluster.clone(),
                node: rec.node,
                team: team.clone(),
                app: app.clone(),
            },
            agent.id,
            rec.app,
        ))
    }

    /// The storage a backup of an app in `cluster` goes to: the one named,
    /// or else the only location every cluster reaches.
    async fn pick_storage(
        &self,
        named: Option<&LocationName>,
        cluster: &ClusterName,
        to: Option<&ClusterName>,
    ) -> Result<StorageRecord, PlanError> {
        let rec = match named {
            Some(n) => self.storage(n).await?,
            None => {
                let all = self.catalog.list_storage(&PageRequest::all()).await?.items;
                let fits: Vec<StorageRecord> = all
                    .into_iter()
                    .filter(|s| {
                        reachable_from(&s.kind, cluster)
                            && to.is_none_or(|t| reachable_from(&s.kind, t))
                    })
                    .collect();
                match fits.len() {
                    1 => fits.into_iter().next().expect("invariant: one element"),
                    0 => {
                        return Err(PlanError::Invalid(
                            "no storage location fits; add one with `ferryctl storage add`".into(),
                        ));
                    }
                    _ => {
                        let names: Vec<String> = fits.iter().map(|s| s.name.to_string()).collect();
                        return Err(PlanError::Invalid(format!(
                            "several storage locations fit ({}); name one with --storage",
                            names.join(", ")
                        )));
                    }
                }
            }
        };
        if !reachable_from(&rec.kind, cluster) {
            return Err(PlanError::Invalid(format!(
                "storage {} is local to cluster {}; apps of cluster {cluster} cannot back up there",
                rec.name,
                local_cluster(&rec.kind)
            )));
        }
        if let Some(t) = to
            && !reachable_from(&rec.kind, t)
        {
            return Err(PlanError::Invalid(format!(
                "storage {} is local to cluster {}, so its backups restore only there, not in cluster {t}; use a shared or s3 location",
                rec.name,
                local_cluster(&rec.kind)
            )));
        }
        Ok(rec)
    }

    /// The agent of `cluster` that restores a copy of `app`: one whose
    /// drivers restore every component of it, an online one first. None:
    /// refused now, before anything stops.
    async fn restorer(
        &self,
        cluster: &ClusterName,
        app: &App,
    ) -> Result<(ferry_core::NodeName, AgentId), PlanError> {
        // A systemd unit cannot run twice: no copy of it can start.
        if let Some(c) = app.components.iter().find(|c| {
            matches!(
                c.kind,
                ferry_core::ComponentKind::Host(ferry_core::HostComponent::Systemd { .. })
            )
        }) {
            return Err(PlanError::Invalid(format!(
                "component {} of app {}/{} is a systemd unit, which cannot run twice: a copy needs start/stop commands; nothing was started",
                c.name, app.team, app.name
            )));
        }
        let needed: BTreeSet<&str> = app.components.iter().map(|c| c.kind.driver()).collect();
        let mut agents = self
            .catalog
            .list_agents(Some(cluster), &PageRequest::all())
            .await?
            .items;
        if agents.is_empty() {
            return Err(PlanError::NotFound(format!(
                "cluster {cluster} has no agent"
            )));
        }
        let online: Vec<AgentId> = self
            .fleet
            .online_agents(cluster)
            .into_iter()
            .map(|(_, a)| a)
            .collect();
        agents.sort_by_key(|a| !online.contains(&a.id));
        // An agent older than the `restores` field restores host apps.
        let restores = |a: &AgentRecord| -> Vec<String> {
            if a.restores.is_empty() {
                vec!["host".to_owned()]
            } else {
                a.restores.clone()
            }
        };
        if let Some(a) = agents
            .iter()
            .find(|a| needed.iter().all(|d| restores(a).iter().any(|r| r == d)))
        {
            return Ok((a.node.clone(), a.id.clone()));
        }
        let theirs: BTreeSet<String> = agents.iter().flat_map(restores).collect();
        Err(PlanError::Invalid(format!(
            "no agent of cluster {cluster} restores copies of {} apps (its agents restore: {}); nothing was started",
            needed.into_iter().collect::<Vec<_>>().join(" and "),
            if theirs.is_empty() {
                "none".to_owned()
            } else {
                theirs.into_iter().collect::<Vec<_>>().join(", ")
            }
        )))
    }

    /// The copy's name: the one asked for, if free, or else the original's
    /// if free there, or `<name>-copy`, `<name>-copy-2`, …
    async fn copy_name(&self, original: &AppName, to: &Destination) -> Result<AppName, PlanError> {
        let taken: Vec<AppName> = self
            .catalog
            .list_apps(
                &AppFilter {
                    cluster: Some(to.cluster.clone()),
                    team: Some(to.team.clone()),
                },
                &PageRequest::all(),
            )
            .await?
            .items
            .into_iter()
            .map(|a| a.app.name)
            .collect();
        if let Some(n) = &to.name {
            if taken.contains(n) {
                return Err(PlanError::Invalid(format!(
                    "app {}/{n} already exists in cluster {}; choose another --as",
                    to.team, to.cluster
                )));
            }
            return Ok(n.clone());
        }
        let mut candidates = vec![original.to_string(), format!("{original}-copy")];
        candidates.extend((2..100).map(|i| format!("{original}-copy-{i}")));
        for c in candidates {
            let Ok(name) = AppName::new(c) else { continue };
            if !taken.contains(&name) {
                return Ok(name);
            }
        }
        Err(PlanError::Invalid(format!(
            "no free name for a copy of {original}; choose one with --as"
        )))
    }

    /// The restore steps of a copy of backup `backup` (of `original`).
    async fn restore_steps(
        &self,
        backup: BackupId,
        original: &App,
        source: Option<(&AppAt, &AgentId)>,
        to: &Destination,
    ) -> Result<(Vec<Step<Work>>, AppAt), PlanError> {
        let (node, agent) = self.restorer(&to.cluster, original).await?;
        let copy = AppAt {
            cluster: to.cluster.clone(),
            node,
            team: to.team.clone(),
            app: self.copy_name(&original.name, to).await?,
        };
        let mut steps = vec![
            agent_step(
                Work::Restore {
                    backup,
                    copy: copy.clone(),
                },
                &agent,
                Some(Work::Remove {
                    app: copy.clone(),
                    copy_of_this_job: true,
                }),
            ),
            agent_step(Work::Check { app: copy.clone() }, &agent, None),
        ];
        if to.delete_source {
            let Some((app, agent)) = source else {
                return Err(PlanError::Invalid(
                    "--delete-source needs the original app, which is no longer in the catalog"
                        .into(),
                ));
            };
            steps.push(agent_step(
                Work::Remove {
                    app: app.clone(),
                    copy_of_this_job: false,
                },
                agent,
                None,
            ));
        }
        Ok((steps, copy))
    }

    pub async fn backup(
        &self,
        cluster: &ClusterName,
        team: &TeamName,
        app: &AppName,
        storage: Option<&LocationName>,
        mode: BackupMode,
    ) -> Result<JobState, PlanError> {
        let (source, agent, _) = self.source(cluster, team, app).await?;
        let rec = self.pick_storage(storage, cluster, None).await?;
        let backup = BackupId::new(self.catalog.next_id(Counter::Backup).await?)?;
        let summary = format!("back up {source} to {} ({mode})", rec.name);
        let step = agent_step(
            Work::Backup {
                source,
                storage: rec.name,
                backup,
                mode,
            },
            &agent,
            None,
        );
        Ok(state(JobKind::Backup, summary, vec![step], Some(backup)))
    }

    pub async fn restore(&self, backup: BackupId, to: &Destination) -> Result<JobState, PlanError> {
        let b = self.backup_record(backup).await?;
        let rec = self.storage(&b.manifest.storage).await?;
        if !reachable_from(&rec.kind, &to.cluster) {
            return Err(PlanError::Invalid(format!(
                "backup {backup} is in storage {}, local to cluster {}: it restores only there, not in cluster {}",
                rec.name,
                local_cluster(&rec.kind),
                to.cluster
            )));
        }
        let m = &b.manifest;
        let source = if to.delete_source {
            let (at, agent, _) = self.source(&m.cluster, &m.app.team, &m.app.name).await?;
            Some((at, agent))
        } else {
            None
        };
        let (steps, copy) = self
            .restore_steps(backup, &m.app, source.as_ref().map(|(a, g)| (a, g)), to)
            .await?;
        let summary = format!(
            "restore backup {backup} of {}/{} as {copy}",
            m.app.team, m.app.name
        );
        Ok(state(JobKind::Restore, summary, steps, Some(backup)))
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn migrate(
        &self,
        cluster: &ClusterName,
        team: &TeamName,
        app: &AppName,
        storage: Option<&LocationName>,
        mode: BackupMode,
        to: &Destination,
    ) -> Result<JobState, PlanError> {
        let (source, agent, original) = self.source(cluster, team, app).await?;
        let rec = self
            .pick_storage(storage, cluster, Some(&to.cluster))
            .await?;
        let backup = BackupId::new(self.catalog.next_id(Counter::Backup).await?)?;
        let (restore, copy) = self
            .restore_steps(backup, &original, Some((&source, &agent)), to)
            .await?;
        let summary = format!("migrate {source} to {copy} through {}", rec.name);
        let mut steps = vec![agent_step(
            Work::Backup {
                source: source.clone(),
                storage: rec.name,
                backup,
                mode,
            },
            &agent,
            None,
        )];
        steps.extend(restore);
        Ok(state(JobKind::Migrate, summary, steps, Some(backup)))
    }

    async fn backup_record(&self, backup: BackupId) -> Result<BackupRecord, PlanError> {
        self.catalog
            .get_backup(backup)
            .await?
            .ok_or_else(|| PlanError::NotFound(format!("backup {backup} not found")))
    }

    /// An agent that reaches a backup's location: its source agent if it
    /// is online, else an online agent of a cluster that reaches it.
    async fn agent_for(&self, b: &BackupRecord) -> Result<AgentId, PlanError> {
        let m = &b.manifest;
        let rec = self.storage(&m.storage).await?;
        if let Some(a) = self.catalog.agent_of_node(&m.cluster, &m.node).await?
            && self.fleet.link_of_agent(&a.id).is_some()
        {
            return Ok(a.id);
        }
        let clusters: Vec<ClusterName> = match &rec.kind {
            StorageKind::Local { cluster, .. } => vec![cluster.clone()],
            _ => self
                .catalog
                .list_clusters(&PageRequest::all())
                .await?
                .items
                .into_iter()
                .map(|c| c.name)
                .collect(),
        };
        for c in &clusters {
            if let Some((_, a)) = self.fleet.online_agents(c).into_iter().next() {
                return Ok(a);
            }
        }
        match self.catalog.agent_of_node(&m.cluster, &m.node).await? {
            Some(a) => Ok(a.id),
            None => Err(PlanError::Unavailable(format!(
                "no agent that reaches storage {} is online",
                m.storage
            ))),
        }
    }

    pub async fn delete(&self, backup: BackupId) -> Result<JobState, PlanError> {
        let b = self.backup_record(backup).await?;
        let agent = self.agent_for(&b).await?;
        let storage = b.manifest.storage.clone();
        let summary = format!(
            "delete backup {backup} of {}/{} from {storage}",
            b.manifest.app.team, b.manifest.app.name
        );
        let steps = vec![
            agent_step(Work::Forget { backup }, &agent, None),
            agent_step(Work::Prune { storage }, &agent, None),
        ];
        Ok(state(JobKind::DeleteBackup, summary, steps, Some(backup)))
    }

    pub async fn verify(
        &self,
        backup: BackupId,
        read_data_percent: u32,
    ) -> Result<JobState, PlanError> {
        if read_data_percent > 100 {
            return Err(PlanError::Invalid(format!(
                "--read-data {read_data_percent} is more than 100 percent"
            )));
        }
        let b = self.backup_record(backup).await?;
        let agent = self.agent_for(&b).await?;
        let summary = format!(
            "verify backup {backup} of {}/{} in {}",
            b.manifest.app.team, b.manifest.app.name, b.manifest.storage
        );
        let steps = vec![agent_step(
            Work::Verify {
                backup,
                read_data_percent,
            },
            &agent,
            None,
        )];
        Ok(state(JobKind::Verify, summary, steps, Some(backup)))
    }
}

fn local_cluster(kind: &StorageKind) -> String {
    match kind {
        StorageKind::Local { cluster, .. } => cluster.to_string(),
        _ => "(none)".into(),
    }
}
