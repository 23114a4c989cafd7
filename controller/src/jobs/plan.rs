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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{Engine, Timestamp};
    use ferry_core::{
        Argv, Component, ComponentKind, ComponentName, ComponentState, ContainerComponent,
        HostComponent, NodeName, UnitName,
    };

    fn agent(id: &str, cluster: &str, restores: &[&str]) -> AgentRecord {
        AgentRecord {
            id: id.parse().expect("agent id"),
            cluster: cluster.parse().expect("cluster"),
            node: NodeName::new(format!("node-{id}")).expect("node"),
            version: "0.1.0".into(),
            platform: "host".into(),
            restores: restores.iter().map(|r| (*r).to_owned()).collect(),
            enrolled_at: Timestamp::from_unix_millis(1),
            last_seen: Timestamp::from_unix_millis(1),
            cert_serial: format!("{id}-serial"),
            cert_fingerprint: format!("{id}-fp"),
        }
    }

    /// An app of one component of each kind given.
    fn app(kinds: &[ComponentKind]) -> App {
        App {
            name: "shop".parse().expect("app"),
            team: "web".parse().expect("team"),
            volumes: vec![],
            components: kinds
                .iter()
                .enumerate()
                .map(|(i, kind)| Component {
                    state: ComponentState::Running,
                    hooks: Default::default(),
                    name: ComponentName::new(format!("c{i}")).expect("component"),
                    kind: kind.clone(),
                    stateful: false,
                    volumes: vec![],
                    depends_on: vec![],
                })
                .collect(),
        }
    }

    fn commands() -> ComponentKind {
        ComponentKind::Host(HostComponent::Commands {
            start: Argv::new(vec!["/usr/bin/web".into()]).expect("argv"),
            stop: Argv::new(vec!["/usr/bin/true".into()]).expect("argv"),
            status: None,
        })
    }

    fn container() -> ComponentKind {
        ComponentKind::Container(ContainerComponent {
            id: "abc".into(),
            name: "shop-db".into(),
            image: "busybox".into(),
            image_id: "sha256:00".into(),
            mounts: Vec::new(),
        })
    }

    /// Which agent of cluster `b` restores a copy of `app`, among `agents`
    /// (none online).
    async fn restorer_of(
        agents: Vec<AgentRecord>,
        app: &App,
    ) -> Result<(NodeName, AgentId), PlanError> {
        let dir = tempfile::tempdir().expect("tmp");
        let catalog = crate::catalog::open(Engine::Redb, &dir.path().join("catalog.redb"))
            .await
            .expect("catalog");
        for a in agents {
            catalog
                .create_cluster(&a.cluster, Timestamp::from_unix_millis(1))
                .await
                .expect("cluster");
            catalog.upsert_agent(a).await.expect("agent");
        }
        let fleet = Fleet::new();
        let planner = Planner {
            catalog: catalog.as_ref(),
            fleet: &fleet,
        };
        planner.restorer(&"b".parse().expect("cluster"), app).await
    }

    /// The restoring agent is one whose drivers restore every component's
    /// kind; an agent that says nothing (older than `restores`) restores
    /// host apps; the refusal names what is needed and what there is.
    #[tokio::test]
    async fn a_copy_goes_to_an_agent_that_restores_its_kind_or_is_refused_with_why() {
        let agents = || {
            vec![
                agent("a1", "b", &["host"]),
                agent("a2", "b", &["host", "containers"]),
                agent("a3", "other", &["containers"]),
            ]
        };
        let (_, id) = restorer_of(agents(), &app(&[container()]))
            .await
            .expect("a2 restores containers");
        assert_eq!(id.as_str(), "a2");
        let (_, id) = restorer_of(agents(), &app(&[commands(), container()]))
            .await
            .expect("a2 restores both");
        assert_eq!(id.as_str(), "a2");

        let (_, id) = restorer_of(vec![agent("old", "b", &[])], &app(&[commands()]))
            .await
            .expect("an older agent restores host apps");
        assert_eq!(id.as_str(), "old");

        let refused = restorer_of(
            vec![agent("old", "b", &[]), agent("a1", "b", &["host"])],
            &app(&[container()]),
        )
        .await
        .expect_err("no agent restores containers");
        assert!(matches!(refused, PlanError::Invalid(_)), "{refused}");
        assert_eq!(
            refused.to_string(),
            "no agent of cluster b restores copies of containers apps (its agents restore: host); nothing was started"
        );

        let none = restorer_of(vec![agent("a3", "other", &["host"])], &app(&[commands()]))
            .await
            .expect_err("cluster b has no agent");
        assert!(matches!(none, PlanError::NotFound(_)), "{none}");
    }

    /// A systemd unit cannot run twice: its copy is refused before anything
    /// stops, whatever the agents.
    #[tokio::test]
    async fn a_copy_of_a_systemd_unit_is_refused() {
        let unit = ComponentKind::Host(HostComponent::Systemd {
            unit: UnitName::new("postgresql@15-main.service").expect("unit"),
        });
        let refused = restorer_of(vec![agent("a1", "b", &["host"])], &app(&[unit]))
            .await
            .expect_err("refused");
        assert!(
            refused
                .to_string()
                .contains("is a systemd unit, which cannot run twice"),
            "{refused}"
        );
    }
}
