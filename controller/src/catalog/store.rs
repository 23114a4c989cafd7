//! Catalog logic shared by the embedded engines.
//!
//! An engine only provides a small transactional key-value surface
//! ([`Kv`]); the catalog rules (idempotent creation, single-use tokens,
//! inventory replacement, indexes) live here once, so every engine behaves
//! the same. Write closures read only by key, never by scan, because
//! optimistic engines (sled) cannot scan inside a transaction.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::record::{Record, decode, encode};
use super::{
    AgentId, AgentRecord, App, AppFilter, AppName, AppRecord, Catalog, CatalogError, ClusterName,
    ClusterRecord, LocationName, NodeName, Page, PageRequest, StorageKind, StorageRecord, TeamName,
    TeamRecord, Timestamp, TokenHash, TokenRecord, TokenUse, run_blocking,
};
use super::{BackupFilter, BackupId, BackupRecord, Counter, JobId, JobRecord, id_key};

/// Version of the catalog layout (tables, keys, indexes) as a whole.
pub(crate) const FORMAT_VERSION: u32 = 1;
const FORMAT_KEY: &str = "format";

/// The logical tables of the catalog.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Table {
    Meta,
    Clusters,
    Teams,
    Agents,
    /// `cluster/node` → the agent holding that node.
    AgentNodes,
    Tokens,
    /// `cluster/team/app` → app record.
    Apps,
    /// `cluster/node` → keys of the apps that node reported.
    NodeApps,
    /// `name` → storage location.
    Storage,
    /// Zero-padded job id → job.
    Jobs,
    /// Zero-padded backup id → backup.
    Backups,
}

impl Table {
    pub(crate) const ALL: [Table; 11] = [
        Table::Meta,
        Table::Clusters,
        Table::Teams,
        Table::Agents,
        Table::AgentNodes,
        Table::Tokens,
        Table::Apps,
        Table::NodeApps,
        Table::Storage,
        Table::Jobs,
        Table::Backups,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Table::Meta => "meta",
            Table::Clusters => "clusters",
            Table::Teams => "teams",
            Table::Agents => "agents",
            Table::AgentNodes => "agent_nodes",
            Table::Tokens => "tokens",
            Table::Apps => "apps",
            Table::NodeApps => "node_apps",
            Table::Storage => "storage",
            Table::Jobs => "jobs",
            Table::Backups => "backups",
        }
    }
}

/// Called per entry of a scan with its key and value; false stops the scan.
pub(crate) type Visit<'a> = dyn FnMut(&str, &[u8]) -> Result<bool, CatalogError> + 'a;

/// Turns a scanned entry into its record and stored size (`None`: skip it).
type Resolve<'a, T> = dyn Fn(&str, &[u8]) -> Result<Option<(T, usize)>, CatalogError> + 'a;

/// Reads and writes inside one atomic write transaction.
pub(crate) trait KvTxn {
    fn get(&mut self, table: Table, key: &str) -> Result<Option<Vec<u8>>, CatalogError>;
    fn put(&mut self, table: Table, key: &str, value: &[u8]) -> Result<(), CatalogError>;
    fn remove(&mut self, table: Table, key: &str) -> Result<bool, CatalogError>;
}

/// What an embedded engine provides. All methods block.
pub(crate) trait Kv: Send + Sync + 'static {
    /// Runs `f` in one atomic write transaction, durable on return when `f`
    /// succeeds and discarded when it fails. `f` may run more than once.
    fn write<T>(
        &self,
        op: &'static str,
        f: &dyn Fn(&mut dyn KvTxn) -> Result<T, CatalogError>,
    ) -> Result<T, CatalogError>;

    /// Reads one key.
    fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, CatalogError>;

    /// Visits the entries of `table` whose key starts with `prefix` and,
    /// given `after`, sorts after it, in key order, until `visit` returns
    /// false.
    fn scan_from(
        &self,
        table: Table,
        prefix: &str,
        after: Option<&str>,
        visit: &mut Visit<'_>,
    ) -> Result<(), CatalogError>;

    /// All entries of `table` whose key starts with `prefix`, ordered by key.
    fn scan(&self, table: Table, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, CatalogError> {
        let mut out = Vec::new();
        self.scan_from(table, prefix, None, &mut |k, v| {
            out.push((k.to_owned(), v.to_vec()));
            Ok(true)
        })?;
        Ok(out)
    }
}

#[derive(Serialize, Deserialize)]
struct FormatRecord {
    format: u32,
}

impl Record for FormatRecord {}

/// The next id of a sequence (`Table::Meta`).
#[derive(Serialize, Deserialize)]
struct NextId {
    next: u64,
}

impl Record for NextId {}

/// Makes sure the sequence never hands out `id` (or a lower one) again.
fn bump_counter(tx: &mut dyn KvTxn, counter: Counter, id: u64) -> Result<(), CatalogError> {
    let next = get_rec::<NextId>(tx, Table::Meta, counter.key())?.map_or(1, |n| n.next);
    if next <= id {
        let next = following(counter, id)?;
        put_rec(tx, Table::Meta, counter.key(), &NextId { next })?;
    }
    Ok(())
}

/// The id after `id` in `counter`'s sequence; refused at the end of `u64`
/// rather than wrapping to an id already handed out.
fn following(counter: Counter, id: u64) -> Result<u64, CatalogError> {
    id.checked_add(1)
        .ok_or_else(|| CatalogError::InvalidRecord {
            what: format!("id {id} of sequence {}", counter.key()),
            reason: "it is the last id the sequence has".to_owned(),
        })
}

#[derive(Serialize, Deserialize)]
struct NodeAgent {
    agent: AgentId,
}

#[derive(Serialize, Deserialize, Default)]
struct NodeApps {
    apps: Vec<String>,
}

impl Record for NodeApps {}
impl Record for NodeAgent {}

fn node_key(cluster: &ClusterName, node: &NodeName) -> String {
    format!("{cluster}/{node}")
}

fn app_key(cluster: &ClusterName, team: &TeamName, app: &AppName) -> String {
    format!("{cluster}/{team}/{app}")
}

fn get_rec<T: Record>(
    tx: &mut dyn KvTxn,
    table: Table,
    key: &str,
) -> Result<Option<T>, CatalogError> {
    tx.get(table, key)?
        .map(|b| decode(table.name(), key, &b))
        .transpose()
}

fn put_rec<T: Record>(
    tx: &mut dyn KvTxn,
    table: Table,
    key: &str,
    record: &T,
) -> Result<(), CatalogError> {
    tx.put(table, key, &encode(table.name(), record)?)
}

fn require_cluster(tx: &mut dyn KvTxn, cluster: &ClusterName) -> Result<(), CatalogError> {
    match tx.get(Table::Clusters, cluster.as_str())? {
        Some(_) => Ok(()),
        None => Err(CatalogError::ClusterNotFound {
            cluster: cluster.clone(),
        }),
    }
}

/// Removes the inventory a node reported.
fn drop_node_apps(tx: &mut dyn KvTxn, node_key: &str) -> Result<(), CatalogError> {
    let old: NodeApps = get_rec(tx, Table::NodeApps, node_key)?.unwrap_or_default();
    for key in &old.apps {
        tx.remove(Table::Apps, key)?;
    }
    tx.remove(Table::NodeApps, node_key)?;
    Ok(())
}

/// The [`Catalog`] over any embedded engine.
pub(crate) struct KvCatalog<K: Kv> {
    kv: Arc<K>,
}

impl<K: Kv> KvCatalog<K> {
    /// Checks (or, on a new store, writes) the layout version. Blocking.
    pub(crate) fn init(kv: K, path: &Path) -> Result<Self, CatalogError> {
        let found = kv.write("open", &|tx| match get_rec::<FormatRecord>(
            tx,
            Table::Meta,
            FORMAT_KEY,
        ) {
            Ok(Some(f)) => Ok(f.format),
            Ok(None) => {
                put_rec(
                    tx,
                    Table::Meta,
                    FORMAT_KEY,
                    &FormatRecord {
                        format: FORMAT_VERSION,
                    },
                )?;
                Ok(FORMAT_VERSION)
            }
            Err(CatalogError::UnsupportedVersion { found, .. }) => {
                Ok(found.max(FORMAT_VERSION + 1))
            }
            Err(e) => Err(e),
        })?;
        if found != FORMAT_VERSION {
            return Err(CatalogError::UnsupportedFormat {
                path: path.to_path_buf(),
                found,
                supported: FORMAT_VERSION,
            });
        }
        Ok(Self { kv: Arc::new(kv) })
    }

    /// The engine underneath, for tests that plant raw records.
    #[cfg(test)]
    pub(crate) fn kv(&self) -> &K {
        &self.kv
    }

    async fn blocking<T, F>(&self, op: &'static str, f: F) -> Result<T, CatalogError>
    where
        T: Send + 'static,
        F: FnOnce(&K) -> Result<T, CatalogError> + Send + 'static,
    {
        let kv = Arc::clone(&self.kv);
        run_blocking(op, move || f(&kv)).await
    }
}

/// One page of `table` below `prefix`: records after `page.after` that
/// `keep` accepts, up to the page's limits. `resolve` turns an entry into
/// its record (decoding it, or following an index to it).
fn scan_page<T>(
    kv: &impl Kv,
    table: Table,
    prefix: &str,
    page: &PageRequest,
    resolve: &Resolve<'_, T>,
    keep: &dyn Fn(&T) -> bool,
) -> Result<Page<T>, CatalogError> {
    if let Some(after) = &page.after
        && !after.starts_with(prefix)
    {
        return Err(CatalogError::InvalidRecord {
            what: "page token".to_owned(),
            reason: "it belongs to another list (another cluster?)".to_owned(),
        });
    }
    let mut items = Vec::new();
    let mut bytes = 0usize;
    let mut scanned: Option<String> = None;
    let mut next = None;
    let limit = page.limit.max(1);
    kv.scan_from(table, prefix, page.after.as_deref(), &mut |k, v| {
        let Some((rec, size)) = resolve(k, v)? else {
            scanned = Some(k.to_owned());
            return Ok(true);
        };
        if !keep(&rec) {
            scanned = Some(k.to_owned());
            return Ok(true);
        }
        if items.len() >= limit || (!items.is_empty() && bytes + size > page.max_bytes) {
            // A further record exists: the next page starts after the last
            // entry looked at.
            next = scanned.take();
            return Ok(false);
        }
        bytes += size;
        items.push(rec);
        scanned = Some(k.to_owned());
        Ok(true)
    })?;
    Ok(Page { items, next })
}

fn scan_decode<T: Record>(
    kv: &impl Kv,
    table: Table,
    prefix: &str,
) -> Result<Vec<T>, CatalogError> {
    kv.scan(table, prefix)?
        .into_iter()
        .map(|(k, v)| decode(table.name(), &k, &v))
        .collect()
}

#[async_trait]
impl<K: Kv> Catalog for KvCatalog<K> {
    async fn create_cluster(
        &self,
        name: &ClusterName,
        now: Timestamp,
    ) -> Result<ClusterRecord, CatalogError> {
        let name = name.clone();
        self.blocking("create cluster", move |kv| {
            kv.write("create cluster", &|tx| {
                if let Some(existing) = get_rec(tx, Table::Clusters, name.as_str())? {
                    return Ok(existing);
                }
                let rec = ClusterRecord {
                    name: name.clone(),
                    created_at: now,
                };
                put_rec(tx, Table::Clusters, name.as_str(), &rec)?;
                Ok(rec)
            })
        })
        .await
    }

    async fn get_cluster(&self, name: &ClusterName) -> Result<Option<ClusterRecord>, CatalogError> {
        let name = name.clone();
        self.blocking("get cluster", move |kv| {
            kv.get(Table::Clusters, name.as_str())?
                .map(|b| decode(Table::Clusters.name(), name.as_str(), &b))
                .transpose()
        })
        .await
    }

    async fn list_clusters(&self, page: &PageRequest) -> Result<Page<ClusterRecord>, CatalogError> {
        let page = page.clone();
        self.blocking("list clusters", move |kv| {
            scan_page(
                kv,
                Table::Clusters,
                "",
                &page,
                &decode_sized(Table::Clusters),
                &|_| true,
            )
        })
        .await
    }

    async fn create_team(
        &self,
        name: &TeamName,
        now: Timestamp,
    ) -> Result<TeamRecord, CatalogError> {
        let name = name.clone();
        self.blocking("create team", move |kv| {
            kv.write("create team", &|tx| {
                if let Some(existing) = get_rec(tx, Table::Teams, name.as_str())? {
                    return Ok(existing);
                }
                let rec = TeamRecord {
                    name: name.clone(),
                    created_at: now,
                };
                put_rec(tx, Table::Teams, name.as_str(), &rec)?;
                Ok(rec)
            })
        })
        .await
    }

    async fn list_teams(&self) -> Result<Vec<TeamRecord>, CatalogError> {
        self.blocking("list teams", |kv| scan_decode(kv, Table::Teams, ""))
            .await
    }

    async fn put_join_token(&self, token: TokenRecord) -> Result<(), CatalogError> {
        self.blocking("put join token", move |kv| {
            kv.write("put join token", &|tx| {
                require_cluster(tx, &token.cluster)?;
                let key = token.hash.to_hex();
                if tx.get(Table::Tokens, &key)?.is_some() {
                    return Err(CatalogError::TokenExists {
                        hash: token.hash.short(),
                    });
                }
                put_rec(tx, Table::Tokens, &key, &token)
            })
        })
        .await
    }

    async fn consume_join_token(
        &self,
        hash: &TokenHash,
        now: Timestamp,
        node: &NodeName,
    ) -> Result<ClusterName, CatalogError> {
        let hash = *hash;
        let node = node.clone();
        self.blocking("consume join token", move |kv| {
            kv.write("consume join token", &|tx| {
                let key = hash.to_hex();
                let Some(mut token) = get_rec::<TokenRecord>(tx, Table::Tokens, &key)? else {
                    return Err(CatalogError::TokenUnknown { hash: hash.short() });
                };
                if let Some(used) = &token.used {
                    return Err(CatalogError::TokenUsed {
                        hash: hash.short(),
                        node: used.node.clone(),
                        at: used.at,
                    });
                }
                if now >= token.expires_at {
                    return Err(CatalogError::TokenExpired {
                        hash: hash.short(),
                        expired_at: token.expires_at,
                    });
                }
                token.used = Some(TokenUse {
                    at: now,
                    node: node.clone(),
                });
                put_rec(tx, Table::Tokens, &key, &token)?;
                Ok(token.cluster)
            })
        })
        .await
    }

    async fn list_join_tokens(
        &self,
        cluster: Option<&ClusterName>,
    ) -> Result<Vec<TokenRecord>, CatalogError> {
        let cluster = cluster.cloned();
        self.blocking("list join tokens", move |kv| {
            let all: Vec<TokenRecord> = scan_decode(kv, Table::Tokens, "")?;
            Ok(all
                .into_iter()
                .filter(|t| cluster.as_ref().is_none_or(|c| *c == t.cluster))
                .collect())
        })
        .await
    }

    async fn remove_join_token(&self, hash: &TokenHash) -> Result<bool, CatalogError> {
        let key = hash.to_hex();
        self.blocking("remove join token", move |kv| {
            kv.write("remove join token", &|tx| tx.remove(Table::Tokens, &key))
        })
        .await
    }

    async fn upsert_agent(&self, agent: AgentRecord) -> Result<(), CatalogError> {
        self.blocking("upsert agent", move |kv| {
            kv.write("upsert agent", &|tx| {
                require_cluster(tx, &agent.cluster)?;
                if let Some(existing) =
                    get_rec::<AgentRecord>(tx, Table::Agents, agent.id.as_str())?
                    && (existing.cluster != agent.cluster || existing.node != agent.node)
                {
                    return Err(CatalogError::AgentConflict {
                        agent: existing.id,
                        cluster: existing.cluster,
                        node: existing.node,
                    });
                }
                let nkey = node_key(&agent.cluster, &agent.node);
                if let Some(holder) = get_rec::<NodeAgent>(tx, Table::AgentNodes, &nkey)?
                    && holder.agent != agent.id
                {
                    // The node re-enrolled: the new agent replaces the old one.
                    tx.remove(Table::Agents, holder.agent.as_str())?;
                }
                put_rec(tx, Table::Agents, agent.id.as_str(), &agent)?;
                put_rec(
                    tx,
                    Table::AgentNodes,
                    &nkey,
                    &NodeAgent {
                        agent: agent.id.clone(),
                    },
                )
            })
        })
        .await
    }

    async fn get_agent(&self, id: &AgentId) -> Result<Option<AgentRecord>, CatalogError> {
        let id = id.clone();
        self.blocking("get agent", move |kv| {
            kv.get(Table::Agents, id.as_str())?
                .map(|b| decode(Table::Agents.name(), id.as_str(), &b))
                .transpose()
        })
        .await
    }

    async fn touch_agents(&self, seen: &[(AgentId, Timestamp)]) -> Result<(), CatalogError> {
        if seen.is_empty() {
            return Ok(());
        }
        let seen = seen.to_vec();
        self.blocking("touch agents", move |kv| {
            kv.write("touch agents", &|tx| {
                for (id, at) in &seen {
                    let Some(mut agent) = get_rec::<AgentRecord>(tx, Table::Agents, id.as_str())?
                    else {
                        return Err(CatalogError::AgentNotFound { agent: id.clone() });
                    };
                    if *at > agent.last_seen {
                        agent.last_seen = *at;
                        put_rec(tx, Table::Agents, id.as_str(), &agent)?;
                    }
                }
                Ok(())
            })
        })
        .await
    }

    async fn list_agents(
        &self,
        cluster: Option<&ClusterName>,
        page: &PageRequest,
    ) -> Result<Page<AgentRecord>, CatalogError> {
        let prefix = cluster.map(|c| format!("{c}/")).unwrap_or_default();
        let page = page.clone();
        self.blocking("list agents", move |kv| {
            // Through the node index: ordered by (cluster, node), and one
            // cluster's agents without reading the others'.
            let resolve = |k: &str, v: &[u8]| {
                let holder: NodeAgent = decode(Table::AgentNodes.name(), k, v)?;
                let Some(bytes) = kv.get(Table::Agents, holder.agent.as_str())? else {
                    return Ok(None);
                };
                let agent: AgentRecord =
                    decode(Table::Agents.name(), holder.agent.as_str(), &bytes)?;
                Ok(Some((agent, bytes.len())))
            };
            scan_page(kv, Table::AgentNodes, &prefix, &page, &resolve, &|_| true)
        })
        .await
    }

    async fn agent_of_node(
        &self,
        cluster: &ClusterName,
        node: &NodeName,
    ) -> Result<Option<AgentRecord>, CatalogError> {
        let nkey = node_key(cluster, node);
        self.blocking("get agent of node", move |kv| {
            let Some(v) = kv.get(Table::AgentNodes, &nkey)? else {
                return Ok(None);
            };
            let holder: NodeAgent = decode(Table::AgentNodes.name(), &nkey, &v)?;
            kv.get(Table::Agents, holder.agent.as_str())?
                .map(|b| decode(Table::Agents.name(), holder.agent.as_str(), &b))
                .transpose()
        })
        .await
    }

    async fn remove_agent(&self, id: &AgentId) -> Result<bool, CatalogError> {
        let id = id.clone();
        self.blocking("remove agent", move |kv| {
            kv.write("remove agent", &|tx| {
                let Some(agent) = get_rec::<AgentRecord>(tx, Table::Agents, id.as_str())? else {
                    return Ok(false);
                };
                tx.remove(Table::Agents, id.as_str())?;
                let nkey = node_key(&agent.cluster, &agent.node);
                if let Some(holder) = get_rec::<NodeAgent>(tx, Table::AgentNodes, &nkey)?
                    && holder.agent == id
                {
                    tx.remove(Table::AgentNodes, &nkey)?;
                    drop_node_apps(tx, &nkey)?;
                }
                Ok(true)
            })
        })
        .await
    }

    async fn replace_inventory(
        &self,
        cluster: &ClusterName,
        node: &NodeName,
        apps: Vec<App>,
        now: Timestamp,
    ) -> Result<(), CatalogError> {
        let mut keys = BTreeSet::new();
        for app in &apps {
            app.validate().map_err(|e| CatalogError::InvalidRecord {
                what: format!("app {} of team {}", e.app, e.team),
                reason: e.problem.to_string(),
            })?;
            if !keys.insert(app_key(cluster, &app.team, &app.name)) {
                return Err(CatalogError::InvalidRecord {
                    what: format!("inventory of node {node} in cluster {cluster}"),
                    reason: format!("app {} of team {} is listed twice", app.name, app.team),
                });
            }
        }
        let cluster = cluster.clone();
        let node = node.clone();
        self.blocking("replace inventory", move |kv| {
            kv.write("replace inventory", &|tx| {
                require_cluster(tx, &cluster)?;
                let nkey = node_key(&cluster, &node);
                let old: NodeApps = get_rec(tx, Table::NodeApps, &nkey)?.unwrap_or_default();
                let mut new_keys = Vec::with_capacity(apps.len());
                for app in &apps {
                    let key = app_key(&cluster, &app.team, &app.name);
                    if let Some(existing) = get_rec::<AppRecord>(tx, Table::Apps, &key)?
                        && existing.node != node
                    {
                        return Err(CatalogError::AppOwnedElsewhere {
                            cluster: cluster.clone(),
                            team: app.team.clone(),
                            app: app.name.clone(),
                            owner: existing.node,
                            node: node.clone(),
                        });
                    }
                    new_keys.push(key);
                }
                for key in &old.apps {
                    if !new_keys.contains(key) {
                        tx.remove(Table::Apps, key)?;
                    }
                }
                let mut teams = BTreeSet::new();
                for (app, key) in apps.iter().zip(&new_keys) {
                    let rec = AppRecord {
                        cluster: cluster.clone(),
                        node: node.clone(),
                        reported_at: now,
                        app: app.clone(),
                    };
                    put_rec(tx, Table::Apps, key, &rec)?;
                    teams.insert(app.team.clone());
                }
                for team in teams {
                    if tx.get(Table::Teams, team.as_str())?.is_none() {
                        let rec = TeamRecord {
                            name: team.clone(),
                            created_at: now,
                        };
                        put_rec(tx, Table::Teams, team.as_str(), &rec)?;
                    }
                }
                if new_keys.is_empty() {
                    tx.remove(Table::NodeApps, &nkey)?;
                } else {
                    put_rec(tx, Table::NodeApps, &nkey, &NodeApps { apps: new_keys })?;
                }
                Ok(())
            })
        })
        .await
    }

    async fn get_app(
        &self,
        cluster: &ClusterName,
        team: &TeamName,
        app: &AppName,
    ) -> Result<Option<AppRecord>, CatalogError> {
        let key = app_key(cluster, team, app);
        self.blocking("get app", move |kv| {
            kv.get(Table::Apps, &key)?
                .map(|b| decode(Table::Apps.name(), &key, &b))
                .transpose()
        })
        .await
    }

    async fn list_apps(
        &self,
        filter: &AppFilter,
        page: &PageRequest,
    ) -> Result<Page<AppRecord>, CatalogError> {
        let filter = filter.clone();
        let page = page.clone();
        self.blocking("list apps", move |kv| {
            let prefix = filter
                .cluster
                .as_ref()
                .map(|c| format!("{c}/"))
                .unwrap_or_default();
            scan_page(
                kv,
                Table::Apps,
                &prefix,
                &page,
                &decode_sized(Table::Apps),
                &|a| filter.matches(a),
            )
        })
        .await
    }

    async fn add_storage(&self, storage: StorageRecord) -> Result<(), CatalogError> {
        self.blocking("add storage", move |kv| {
            kv.write("add storage", &|tx| {
                if let StorageKind::Local { cluster, .. } = &storage.kind {
                    require_cluster(tx, cluster)?;
                }
                let key = storage.name.as_str();
                if tx.get(Table::Storage, key)?.is_some() {
                    return Err(CatalogError::StorageExists {
                        name: storage.name.clone(),
                    });
                }
                put_rec(tx, Table::Storage, key, &storage)
            })
        })
        .await
    }

    async fn update_storage(&self, storage: StorageRecord) -> Result<(), CatalogError> {
        self.blocking("update storage", move |kv| {
            kv.write("update storage", &|tx| {
                let key = storage.name.as_str();
                if tx.get(Table::Storage, key)?.is_none() {
                    return Err(CatalogError::StorageNotFound {
                        name: storage.name.clone(),
                    });
                }
                put_rec(tx, Table::Storage, key, &storage)
            })
        })
        .await
    }

    async fn get_storage(
        &self,
        name: &LocationName,
    ) -> Result<Option<StorageRecord>, CatalogError> {
        let name = name.clone();
        self.blocking("get storage", move |kv| {
            kv.get(Table::Storage, name.as_str())?
                .map(|b| decode(Table::Storage.name(), name.as_str(), &b))
                .transpose()
        })
        .await
    }

    async fn list_storage(&self, page: &PageRequest) -> Result<Page<StorageRecord>, CatalogError> {
        let page = page.clone();
        self.blocking("list storage", move |kv| {
            scan_page(
                kv,
                Table::Storage,
                "",
                &page,
                &decode_sized(Table::Storage),
                &|_| true,
            )
        })
        .await
    }

    async fn remove_storage(&self, name: &LocationName) -> Result<bool, CatalogError> {
        let name = name.clone();
        self.blocking("remove storage", move |kv| {
            kv.write("remove storage", &|tx| {
                tx.remove(Table::Storage, name.as_str())
            })
        })
        .await
    }

    async fn next_id(&self, counter: Counter) -> Result<u64, CatalogError> {
        self.blocking("allocate an id", move |kv| {
            kv.write("allocate an id", &|tx| {
                let id = get_rec::<NextId>(tx, Table::Meta, counter.key())?.map_or(1, |n| n.next);
                let next = following(counter, id)?;
                put_rec(tx, Table::Meta, counter.key(), &NextId { next })?;
                Ok(id)
            })
        })
        .await
    }

    async fn reserve_id(&self, counter: Counter, id: u64) -> Result<(), CatalogError> {
        self.blocking("reserve an id", move |kv| {
            kv.write("reserve an id", &|tx| bump_counter(tx, counter, id))
        })
        .await
    }

    async fn put_job(&self, job: JobRecord) -> Result<(), CatalogError> {
        let id = job.id.get();
        self.put_numbered("put job", Table::Jobs, Counter::Job, id, job)
            .await
    }

    async fn get_job(&self, id: JobId) -> Result<Option<JobRecord>, CatalogError> {
        self.get_numbered("get job", Table::Jobs, id.get()).await
    }

    async fn list_jobs(
        &self,
        active_only: bool,
        page: &PageRequest,
    ) -> Result<Page<JobRecord>, CatalogError> {
        let page = page.clone();
        self.blocking("list jobs", move |kv| {
            scan_page(
                kv,
                Table::Jobs,
                "",
                &page,
                &decode_sized(Table::Jobs),
                &|j: &JobRecord| !active_only || !j.done,
            )
        })
        .await
    }

    async fn put_backup(&self, backup: BackupRecord) -> Result<(), CatalogError> {
        let id = backup.id().get();
        self.put_numbered("put backup", Table::Backups, Counter::Backup, id, backup)
            .await
    }

    async fn get_backup(&self, id: BackupId) -> Result<Option<BackupRecord>, CatalogError> {
        self.get_numbered("get backup", Table::Backups, id.get())
            .await
    }

    async fn list_backups(
        &self,
        filter: &BackupFilter,
        page: &PageRequest,
    ) -> Result<Page<BackupRecord>, CatalogError> {
        let page = page.clone();
        let filter = filter.clone();
        self.blocking("list backups", move |kv| {
            scan_page(
                kv,
                Table::Backups,
                "",
                &page,
                &decode_sized(Table::Backups),
                &|b| filter.matches(b),
            )
        })
        .await
    }

    async fn remove_backup(&self, id: BackupId) -> Result<bool, CatalogError> {
        self.blocking("remove backup", move |kv| {
            kv.write("remove backup", &|tx| {
                tx.remove(Table::Backups, &id_key(id.get()))
            })
        })
        .await
    }
}

impl<K: Kv> KvCatalog<K> {
    async fn put_numbered<T: Record + Send + Sync + 'static>(
        &self,
        op: &'static str,
        table: Table,
        counter: Counter,
        id: u64,
        record: T,
    ) -> Result<(), CatalogError> {
        self.blocking(op, move |kv| {
            kv.write(op, &|tx| {
                bump_counter(tx, counter, id)?;
                put_rec(tx, table, &id_key(id), &record)
            })
        })
        .await
    }

    async fn get_numbered<T: Record + Send + 'static>(
        &self,
        op: &'static str,
        table: Table,
        id: u64,
    ) -> Result<Option<T>, CatalogError> {
        self.blocking(op, move |kv| {
            let key = id_key(id);
            kv.get(table, &key)?
                .map(|b| decode(table.name(), &key, &b))
                .transpose()
        })
        .await
    }
}

/// Decodes an entry of `table` as its record, with its stored size.
fn decode_sized<T: Record>(
    table: Table,
) -> impl Fn(&str, &[u8]) -> Result<Option<(T, usize)>, CatalogError> {
    move |k, v| Ok(Some((decode(table.name(), k, v)?, v.len())))
}
