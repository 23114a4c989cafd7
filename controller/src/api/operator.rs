//! The operator API: clusters, agents, apps and join tokens.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_proto::convert::{optional, parse};
use ferry_proto::v1 as pb;
use ferry_proto::v1::operator_server::Operator;
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{ApiError, Shared};
use crate::catalog::{
    AppFilter, AppRecord, ClusterName, NodeName, Page, PageRequest, Timestamp, TokenHash,
    TokenRecord,
};
use crate::link::{Link, LinkError};

/// Join tokens live one hour unless asked otherwise, at most one week.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Records per page unless asked otherwise, and at most.
pub const DEFAULT_PAGE_SIZE: u32 = 500;
pub const MAX_PAGE_SIZE: u32 = 1000;
/// A page ends before its stored records pass this, far below gRPC's
/// 4 MiB message limit.
const PAGE_BYTES: usize = 2 << 20;

/// The longest a ping may hold its reply.
const MAX_PING_HOLD: Duration = Duration::from_secs(60);
/// How long an agent has to send a requested inventory.
const REFRESH_TIMEOUT: Duration = Duration::from_secs(60);

/// The catalog page a request asks for. Page tokens are the hex of the
/// last key of the previous page: opaque to clients; the catalog refuses
/// one that does not belong to the list asked for.
pub(super) fn page_request(page_size: u32, page_token: &str) -> Result<PageRequest, ApiError> {
    let limit = match page_size {
        0 => DEFAULT_PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    };
    let after = if page_token.is_empty() {
        None
    } else {
        let bad = || ApiError::Invalid("page_token is not one this controller issued".to_owned());
        let bytes = hex::decode(page_token).map_err(|_| bad())?;
        Some(String::from_utf8(bytes).map_err(|_| bad())?)
    };
    Ok(PageRequest {
        after,
        limit: limit as usize,
        max_bytes: PAGE_BYTES,
    })
}

pub(super) fn next_token<T>(page: &Page<T>) -> String {
    page.next.as_deref().map(hex::encode).unwrap_or_default()
}

pub struct OperatorApi {
    pub(super) shared: Shared,
}

impl OperatorApi {
    pub fn new(shared: Shared) -> Self {
        Self { shared }
    }
}

/// A new secret join token: `fjt_` + 32 random bytes in hex.
fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("fjt_{}", hex::encode(bytes))
}

pub(crate) fn app_to_pb(rec: AppRecord) -> pb::AppRecord {
    pb::AppRecord {
        cluster: rec.cluster.to_string(),
        node: rec.node.to_string(),
        app: Some(rec.app.into()),
    }
}

impl OperatorApi {
    async fn create_join_token(
        &self,
        r: pb::CreateJoinTokenRequest,
    ) -> Result<pb::CreateJoinTokenResponse, ApiError> {
        let cluster: ClusterName = parse(|| "cluster".to_owned(), r.cluster)?;
        let ttl = match r.ttl_seconds {
            0 => DEFAULT_TOKEN_TTL,
            s if s > MAX_TOKEN_TTL.as_secs() => {
                return Err(ApiError::Invalid(format!(
                    "token ttl of {s} seconds is longer than the maximum of {} seconds",
                    MAX_TOKEN_TTL.as_secs()
                )));
            }
            s => Duration::from_secs(s),
        };
        let now = Timestamp::now();
        let catalog = &self.shared.catalog;
        catalog.create_cluster(&cluster, now).await?;
        let token = new_token();
        let hash = TokenHash::of(&token);
        let expires = now.plus(ttl);
        catalog
            .put_join_token(TokenRecord::new(hash, cluster.clone(), now, expires))
            .await?;
        tracing::info!(cluster = %cluster, token = %hash, expires = %expires, "join token created");
        Ok(pb::CreateJoinTokenResponse {
            token,
            cluster: cluster.to_string(),
            expires_unix_ms: expires.unix_millis(),
            ca_fingerprint: self.shared.pki.ca_fingerprint().to_string(),
        })
    }

    async fn list_clusters(
        &self,
        r: pb::ListClustersRequest,
    ) -> Result<pb::ListClustersResponse, ApiError> {
        let page = page_request(r.page_size, &r.page_token)?;
        let page = self.shared.catalog.list_clusters(&page).await?;
        Ok(pb::ListClustersResponse {
            next_page_token: next_token(&page),
            clusters: page
                .items
                .into_iter()
                .map(|c| pb::Cluster {
                    name: c.name.to_string(),
                    created_unix_ms: c.created_at.unix_millis(),
                })
                .collect(),
        })
    }

    async fn list_agents(
        &self,
        r: pb::ListAgentsRequest,
    ) -> Result<pb::ListAgentsResponse, ApiError> {
        let cluster = optional("cluster", r.cluster)?;
        let page = page_request(r.page_size, &r.page_token)?;
        let page = self
            .shared
            .catalog
            .list_agents(cluster.as_ref(), &page)
            .await?;
        let fleet = &self.shared.fleet;
        Ok(pb::ListAgentsResponse {
            next_page_token: next_token(&page),
            agents: page
                .items
                .into_iter()
                .map(|a| pb::Agent {
                    online: fleet
                        .online(&a.cluster, &a.node)
                        .is_some_and(|o| o.agent == a.id),
                    cluster: a.cluster.to_string(),
                    node: a.node.to_string(),
                    last_seen_unix_ms: a.last_seen.unix_millis(),
                    version: a.version,
                    platform: a.platform,
                    enrolled_unix_ms: a.enrolled_at.unix_millis(),
                })
                .collect(),
        })
    }

    async fn list_apps(&self, r: pb::ListAppsRequest) -> Result<pb::ListAppsResponse, ApiError> {
        let filter = AppFilter {
            cluster: optional("cluster", r.cluster)?,
            team: optional("team", r.team)?,
        };
        let page = page_request(r.page_size, &r.page_token)?;
        let page = self.shared.catalog.list_apps(&filter, &page).await?;
        Ok(pb::ListAppsResponse {
            next_page_token: next_token(&page),
            apps: page.items.into_iter().map(app_to_pb).collect(),
        })
    }

    /// The link to an online agent; an agent never enrolled is not found,
    /// an enrolled one offline is unavailable.
    async fn link(&self, cluster: String, node: String) -> Result<Arc<Link>, ApiError> {
        let cluster: ClusterName = parse(|| "cluster".to_owned(), cluster)?;
        let node: NodeName = parse(|| "node".to_owned(), node)?;
        match self.shared.fleet.link(&cluster, &node) {
            Ok(link) => Ok(link),
            Err(e) => {
                if self
                    .shared
                    .catalog
                    .agent_of_node(&cluster, &node)
                    .await?
                    .is_none()
                {
                    return Err(ApiError::NotFound(format!(
                        "no agent is enrolled as node {node} of cluster {cluster}"
                    )));
                }
                Err(e.into())
            }
        }
    }

    /// Sends the ping and returns its events as they come.
    async fn ping_agent(
        &self,
        r: pb::PingAgentRequest,
    ) -> Result<ReceiverStream<Result<pb::PingAgentEvent, Status>>, ApiError> {
        let (cluster, node) = (r.cluster.clone(), r.node.clone());
        let hold = Duration::from_millis(r.hold_ms);
        if hold > MAX_PING_HOLD {
            return Err(ApiError::Invalid(format!(
                "hold_ms of {} is more than the maximum of {}",
                r.hold_ms,
                MAX_PING_HOLD.as_millis()
            )));
        }
        let timeout = match r.timeout_ms {
            0 => hold + Duration::from_secs(10),
            ms => Duration::from_millis(ms),
        };
        let link = self.link(r.cluster, r.node).await?;
        let started = Instant::now();
        let mut call = link
            .call(
                pb::request::Kind::Ping(pb::PingRequest { hold_ms: r.hold_ms }),
                timeout,
            )
            .await?;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let id = call.id();
            let event = |kind| Ok(pb::PingAgentEvent { kind: Some(kind) });
            // Progress until the agent's reply closes the progress channel,
            // the deadline passes, or the caller goes away (dropping the
            // call then cancels the request on the agent).
            let deadline = call.deadline();
            loop {
                tokio::select! {
                    p = call.progress.recv() => match p {
                        Some(p) => {
                            if tx.send(event(pb::ping_agent_event::Kind::Progress(p))).await.is_err() {
                                return;
                            }
                        }
                        None => break,
                    },
                    () = tx.closed() => return,
                    () = tokio::time::sleep_until(deadline) => break,
                }
            }
            let result = match call.finish().await {
                Ok(pb::reply::Result::Ping(reply)) => {
                    event(pb::ping_agent_event::Kind::Result(pb::PingAgentResult {
                        reply: Some(reply),
                        round_trip_ms: u64::try_from(started.elapsed().as_millis())
                            .unwrap_or(u64::MAX),
                        request_id: id,
                    }))
                }
                Ok(_) => Err(Status::from(ApiError::from(LinkError::UnexpectedReply))),
                Err(e) => {
                    tracing::warn!(cluster = %cluster, node = %node, error = %e, "ping failed");
                    Err(Status::from(ApiError::from(e)))
                }
            };
            let _ = tx.send(result).await;
        });
        Ok(ReceiverStream::new(rx))
    }

    async fn refresh_agent_inventory(
        &self,
        r: pb::RefreshAgentInventoryRequest,
    ) -> Result<pb::RefreshAgentInventoryResponse, ApiError> {
        let link = self.link(r.cluster, r.node).await?;
        let call = link
            .call(
                pb::request::Kind::RefreshInventory(pb::RefreshInventoryRequest {}),
                REFRESH_TIMEOUT,
            )
            .await?;
        match call.finish().await? {
            pb::reply::Result::RefreshInventory(r) => {
                Ok(pb::RefreshAgentInventoryResponse { apps: r.apps })
            }
            _ => Err(LinkError::UnexpectedReply.into()),
        }
    }
}

fn respond<T>(what: &'static str, r: Result<T, ApiError>) -> Result<Response<T>, Status> {
    r.map(Response::new).map_err(|e| {
        tracing::warn!(rpc = what, error = %e, "request refused");
        e.into()
    })
}

type PingStream = Pin<Box<dyn Stream<Item = Result<pb::PingAgentEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Operator for OperatorApi {
    type PingAgentStream = PingStream;
    type WatchJobStream = super::jobs::JobStream;

    async fn watch_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        respond(
            "watch_job",
            OperatorApi::watch_job(self, request.into_inner()).await,
        )
    }

    async fn ping_agent(
        &self,
        request: Request<pb::PingAgentRequest>,
    ) -> Result<Response<Self::PingAgentStream>, Status> {
        let r = OperatorApi::ping_agent(self, request.into_inner())
            .await
            .map(|s| Box::pin(s) as PingStream);
        respond("ping_agent", r)
    }

    async fn refresh_agent_inventory(
        &self,
        request: Request<pb::RefreshAgentInventoryRequest>,
    ) -> Result<Response<pb::RefreshAgentInventoryResponse>, Status> {
        respond(
            "refresh_agent_inventory",
            OperatorApi::refresh_agent_inventory(self, request.into_inner()).await,
        )
    }

    async fn list_clusters(
        &self,
        request: Request<pb::ListClustersRequest>,
    ) -> Result<Response<pb::ListClustersResponse>, Status> {
        respond(
            "list_clusters",
            OperatorApi::list_clusters(self, request.into_inner()).await,
        )
    }

    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        respond(
            "list_agents",
            OperatorApi::list_agents(self, request.into_inner()).await,
        )
    }

    async fn list_apps(
        &self,
        request: Request<pb::ListAppsRequest>,
    ) -> Result<Response<pb::ListAppsResponse>, Status> {
        respond(
            "list_apps",
            OperatorApi::list_apps(self, request.into_inner()).await,
        )
    }

    async fn create_join_token(
        &self,
        request: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        respond(
            "create_join_token",
            OperatorApi::create_join_token(self, request.into_inner()).await,
        )
    }

    async fn add_storage(
        &self,
        request: Request<pb::AddStorageRequest>,
    ) -> Result<Response<pb::Storage>, Status> {
        respond(
            "add_storage",
            OperatorApi::add_storage(self, request.into_inner()).await,
        )
    }

    async fn list_storage(
        &self,
        request: Request<pb::ListStorageRequest>,
    ) -> Result<Response<pb::ListStorageResponse>, Status> {
        respond(
            "list_storage",
            OperatorApi::list_storage(self, request.into_inner()).await,
        )
    }

    async fn get_storage(
        &self,
        request: Request<pb::GetStorageRequest>,
    ) -> Result<Response<pb::Storage>, Status> {
        respond(
            "get_storage",
            OperatorApi::get_storage(self, request.into_inner()).await,
        )
    }

    async fn check_storage(
        &self,
        request: Request<pb::CheckStorageRequest>,
    ) -> Result<Response<pb::CheckStorageResponse>, Status> {
        respond(
            "check_storage",
            OperatorApi::check_storage(self, request.into_inner()).await,
        )
    }

    async fn remove_storage(
        &self,
        request: Request<pb::RemoveStorageRequest>,
    ) -> Result<Response<pb::RemoveStorageResponse>, Status> {
        respond(
            "remove_storage",
            OperatorApi::remove_storage(self, request.into_inner()).await,
        )
    }
    async fn backup_app(
        &self,
        request: Request<pb::BackupAppJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        respond(
            "backup_app",
            OperatorApi::backup_app(self, request.into_inner()).await,
        )
    }

    async fn restore_backup(
        &self,
        request: Request<pb::RestoreBackupRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        respond(
            "restore_backup",
            OperatorApi::restore_backup(self, request.into_inner()).await,
        )
    }

    async fn migrate_app(
        &self,
        request: Request<pb::MigrateAppRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        respond(
            "migrate_app",
            OperatorApi::migrate_app(self, request.into_inner()).await,
        )
    }

    async fn delete_backup(
        &self,
        request: Request<pb::DeleteBackupRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        respond(
            "delete_backup",
            OperatorApi::delete_backup(self, request.into_inner()).await,
        )
    }

    async fn verify_backup(
        &self,
        request: Request<pb::VerifyBackupJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        respond(
            "verify_backup",
            OperatorApi::verify_backup(self, request.into_inner()).await,
        )
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        respond(
            "list_jobs",
            OperatorApi::list_jobs(self, request.into_inner()).await,
        )
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        respond(
            "get_job",
            OperatorApi::get_job(self, request.into_inner()).await,
        )
    }

    async fn cancel_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        respond(
            "cancel_job",
            OperatorApi::cancel_job(self, request.into_inner()).await,
        )
    }

    async fn list_backups(
        &self,
        request: Request<pb::ListBackupsRequest>,
    ) -> Result<Response<pb::ListBackupsResponse>, Status> {
        respond(
            "list_backups",
            OperatorApi::list_backups(self, request.into_inner()).await,
        )
    }

    async fn get_backup(
        &self,
        request: Request<pb::GetBackupRequest>,
    ) -> Result<Response<pb::Backup>, Status> {
        respond(
            "get_backup",
            OperatorApi::get_backup(self, request.into_inner()).await,
        )
    }
}
