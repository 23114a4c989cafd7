//! The controller's durable catalog: clusters, agents, teams, apps and their
//! inventory, join tokens.
//!
//! [`Catalog`] is the interface the rest of the controller uses. It is async
//! so a networked store (etcd) fits behind it; the embedded engines run their
//! blocking work on `spawn_blocking` threads. Every write is durable when the
//! call returns. [`open`] picks an engine: `redb` (default) or `sled`
//! (cargo feature `sled`). See `docs/catalog.md` for the measurements behind
//! that choice, the record format and versioning.

mod error;
mod name;
mod record;
mod store;

mod redb;
#[cfg(feature = "sled")]
mod sled;

#[cfg(test)]
mod conformance;
#[cfg(test)]
mod crash;

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;

pub use error::CatalogError;
pub use ferry_core::{BackupId, JobId};
pub use name::{
    AgentId, AppName, ClusterName, ComponentName, LocationName, NodeName, TeamName, TokenHash,
};
pub use record::{
    AgentRecord, App, AppFilter, AppRecord, BackupRecord, ClusterRecord, JobRecord, StorageKind,
    StorageRecord, TeamRecord, Timestamp, TokenRecord, TokenUse,
};

/// The controller's durable state. All writes are durable on return.
#[async_trait]
pub trait Catalog: Send + Sync + 'static {
    /// Creates a cluster, or returns the existing record unchanged.
    async fn create_cluster(
        &self,
        name: &ClusterName,
        now: Timestamp,
    ) -> Result<ClusterRecord, CatalogError>;

    /// The cluster, if it exists.
    async fn get_cluster(&self, name: &ClusterName) -> Result<Option<ClusterRecord>, CatalogError>;

    /// Clusters, ordered by name, one page at a time.
    async fn list_clusters(&self, page: &PageRequest) -> Result<Page<ClusterRecord>, CatalogError>;

    /// Creates a team, or returns the existing record unchanged.
    async fn create_team(
        &self,
        name: &TeamName,
        now: Timestamp,
    ) -> Result<TeamRecord, CatalogError>;

    /// All teams, ordered by name. Teams named in a reported inventory are
    /// created on the way.
    async fn list_teams(&self) -> Result<Vec<TeamRecord>, CatalogError>;

    /// Stores a new join token. Fails if its cluster is unknown or the hash
    /// is already stored.
    async fn put_join_token(&self, token: TokenRecord) -> Result<(), CatalogError>;

    /// Atomically checks that the token is known, unexpired and unused, and
    /// marks it used by `node`. Exactly one of any number of concurrent
    /// callers succeeds. Returns the cluster the token enrols into.
    async fn consume_join_token(
        &self,
        hash: &TokenHash,
        now: Timestamp,
        node: &NodeName,
    ) -> Result<ClusterName, CatalogError>;

    /// Join tokens (used or not), optionally of one cluster, ordered by hash.
    async fn list_join_tokens(
        &self,
        cluster: Option<&ClusterName>,
    ) -> Result<Vec<TokenRecord>, CatalogError>;

    /// Removes a join token; false if it did not exist.
    async fn remove_join_token(&self, hash: &TokenHash) -> Result<bool, CatalogError>;

    /// Inserts or replaces an agent. The cluster must exist. A different
    /// agent id already holding the same (cluster, node) is replaced, with
    /// its inventory kept for the new agent of that node.
    async fn upsert_agent(&self, agent: AgentRecord) -> Result<(), CatalogError>;

    /// The agent, if it exists.
    async fn get_agent(&self, id: &AgentId) -> Result<Option<AgentRecord>, CatalogError>;

    /// Records that agents were seen, in one durable write. Fails without
    /// changing anything if one of them is unknown. `last_seen` never moves
    /// backwards.
    async fn touch_agents(&self, seen: &[(AgentId, Timestamp)]) -> Result<(), CatalogError>;

    /// Records that one agent was seen.
    async fn touch_agent(&self, id: &AgentId, last_seen: Timestamp) -> Result<(), CatalogError> {
        self.touch_agents(&[(id.clone(), last_seen)]).await
    }

    /// Agents, optionally of one cluster, ordered by (cluster, node), one
    /// page at a time.
    async fn list_agents(
        &self,
        cluster: Option<&ClusterName>,
        page: &PageRequest,
    ) -> Result<Page<AgentRecord>, CatalogError>;

    /// The agent enrolled as `node` of `cluster`, by index (no scan).
    async fn agent_of_node(
        &self,
        cluster: &ClusterName,
        node: &NodeName,
    ) -> Result<Option<AgentRecord>, CatalogError>;

    /// Removes an agent and the inventory its node reported; false if it
    /// did not exist.
    async fn remove_agent(&self, id: &AgentId) -> Result<bool, CatalogError>;

    /// Atomically replaces every app that `node` of `cluster` reported with
    /// `apps`. Fails, changing nothing, if the cluster is unknown, an app is
    /// inconsistent ([`App::validate`]) or listed twice, or another node of
    /// the cluster already reports an app with the same (team, name).
    async fn replace_inventory(
        &self,
        cluster: &ClusterName,
        node: &NodeName,
        apps: Vec<App>,
        now: Timestamp,
    ) -> Result<(), CatalogError>;

    /// One app, if it exists.
    async fn get_app(
        &self,
        cluster: &ClusterName,
        team: &TeamName,
        app: &AppName,
    ) -> Result<Option<AppRecord>, CatalogError>;

    /// Apps matching the filter, ordered by (cluster, team, name), one page
    /// at a time.
    async fn list_apps(
        &self,
        filter: &AppFilter,
        page: &PageRequest,
    ) -> Result<Page<AppRecord>, CatalogError>;

    /// Adds a storage location; fails if the name is taken, or if a local
    /// location's cluster is unknown.
    async fn add_storage(&self, storage: StorageRecord) -> Result<(), CatalogError>;

    /// Replaces a storage location that exists (its repository id, once
    /// created).
    async fn update_storage(&self, storage: StorageRecord) -> Result<(), CatalogError>;

    /// The storage location, if it exists.
    async fn get_storage(&self, name: &LocationName)
    -> Result<Option<StorageRecord>, CatalogError>;

    /// Storage locations, ordered by name, one page at a time.
    async fn list_storage(&self, page: &PageRequest) -> Result<Page<StorageRecord>, CatalogError>;

    /// Removes a storage location; false if it did not exist.
    async fn remove_storage(&self, name: &LocationName) -> Result<bool, CatalogError>;

    /// Allocates the next id of a kind (1, 2, …; never handed out twice).
    async fn next_id(&self, counter: Counter) -> Result<u64, CatalogError>;

    /// Makes sure `next_id(counter)` never hands out `id` or a lower id,
    /// for ids used where the catalog did not see them (found in a
    /// repository). The sequence never moves back.
    async fn reserve_id(&self, counter: Counter, id: u64) -> Result<(), CatalogError>;

    /// Inserts or replaces a job.
    async fn put_job(&self, job: JobRecord) -> Result<(), CatalogError>;

    async fn get_job(&self, id: JobId) -> Result<Option<JobRecord>, CatalogError>;

    /// Jobs, oldest first, optionally only those that have not ended, one
    /// page at a time.
    async fn list_jobs(
        &self,
        active_only: bool,
        page: &PageRequest,
    ) -> Result<Page<JobRecord>, CatalogError>;

    /// Inserts or replaces a backup; its id is never allocated again.
    async fn put_backup(&self, backup: BackupRecord) -> Result<(), CatalogError>;

    async fn get_backup(&self, id: BackupId) -> Result<Option<BackupRecord>, CatalogError>;

    /// Backups, oldest first, one page at a time.
    async fn list_backups(
        &self,
        filter: &BackupFilter,
        page: &PageRequest,
    ) -> Result<Page<BackupRecord>, CatalogError>;

    /// Removes a backup record; false if it did not exist.
    async fn remove_backup(&self, id: BackupId) -> Result<bool, CatalogError>;
}

/// The id sequences the catalog keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    Job,
    Backup,
}

impl Counter {
    pub(crate) fn key(self) -> &'static str {
        match self {
            Self::Job => "next_job",
            Self::Backup => "next_backup",
        }
    }
}

/// Which backups `list_backups` returns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackupFilter {
    pub cluster: Option<ClusterName>,
    pub team: Option<TeamName>,
    pub app: Option<AppName>,
    pub storage: Option<LocationName>,
}

impl BackupFilter {
    pub(crate) fn matches(&self, b: &BackupRecord) -> bool {
        let m = &b.manifest;
        self.cluster.as_ref().is_none_or(|c| *c == m.cluster)
            && self.team.as_ref().is_none_or(|t| *t == m.app.team)
            && self.app.as_ref().is_none_or(|a| *a == m.app.name)
            && self.storage.as_ref().is_none_or(|s| *s == m.storage)
    }
}

/// The key of a numbered record: zero-padded, so keys sort as numbers.
pub(crate) fn id_key(id: u64) -> String {
    format!("{id:020}")
}

/// Which page of a list to return.
#[derive(Debug, Clone)]
pub struct PageRequest {
    /// Start after this key (a previous page's [`Page::next`]).
    pub after: Option<String>,
    /// At most this many records (at least one is returned).
    pub limit: usize,
    /// Stop before the stored records' sizes add up to more than this
    /// (a page holds at least one record, whatever its size).
    pub max_bytes: usize,
}

impl PageRequest {
    /// Everything in one page.
    pub fn all() -> Self {
        Self {
            after: None,
            limit: usize::MAX,
            max_bytes: usize::MAX,
        }
    }

    /// The first page of at most `limit` records.
    pub fn first(limit: usize) -> Self {
        Self {
            limit,
            ..Self::all()
        }
    }
}

/// One page of a list.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<String>,
}

/// Which embedded engine holds the catalog.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Engine {
    /// redb: one file, copy-on-write B-trees, immediate durability.
    #[default]
    Redb,
    /// sled: a directory, log-structured; needs cargo feature `sled`.
    Sled,
}

impl Engine {
    /// The engine's name as used in configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Redb => "redb",
            Self::Sled => "sled",
        }
    }
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Engine {
    type Err = CatalogError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "redb" => Ok(Self::Redb),
            "sled" => Ok(Self::Sled),
            other => Err(CatalogError::UnknownEngine {
                name: other.chars().take(40).collect(),
            }),
        }
    }
}

/// Opens (creating if needed) the catalog at `path`: a file for redb, a
/// directory for sled. Fails with [`CatalogError::InUse`] if another process
/// holds it.
pub async fn open(engine: Engine, path: &Path) -> Result<Arc<dyn Catalog>, CatalogError> {
    let path = path.to_path_buf();
    match engine {
        Engine::Redb => {
            let catalog = run_blocking("open", move || {
                make_private(Engine::Redb, &path)?;
                redb::RedbKv::open(&path)
            })
            .await?;
            Ok(Arc::new(catalog))
        }
        #[cfg(feature = "sled")]
        Engine::Sled => {
            let catalog = run_blocking("open", move || {
                make_private(Engine::Sled, &path)?;
                sled::SledKv::open(&path)
            })
            .await?;
            Ok(Arc::new(catalog))
        }
        #[cfg(not(feature = "sled"))]
        Engine::Sled => {
            drop(path);
            Err(CatalogError::EngineNotBuilt { engine: "sled" })
        }
    }
}

/// The catalog names every agent and token of the fleet: its file (or
/// directory) is created for its owner only, whatever the umask, and
/// tightened to that if an older Ferry left it open to others. Blocking.
fn make_private(engine: Engine, path: &Path) -> Result<(), CatalogError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let err = |source| CatalogError::Access {
        path: path.to_path_buf(),
        source,
    };
    let mode = match engine {
        Engine::Redb => {
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .map_err(err)?;
            0o600
        }
        Engine::Sled => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(path)
                .map_err(err)?;
            0o700
        }
    };
    if std::fs::metadata(path).map_err(err)?.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    }
    Ok(())
}

/// Runs blocking catalog work off the async runtime.
pub(crate) async fn run_blocking<T, F>(op: &'static str, f: F) -> Result<T, CatalogError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, CatalogError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CatalogError::Task {
            op,
            reason: e.to_string(),
        })?
}
