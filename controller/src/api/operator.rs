//! The operator API: clusters, agents, apps and join tokens.

use std::time::Duration;

use ferry_proto::convert::{optional, parse};
use ferry_proto::v1 as pb;
use ferry_proto::v1::operator_server::Operator;
use tonic::{Request, Response, Status};

use super::{ApiError, Shared};
use crate::catalog::{AppFilter, AppRecord, ClusterName, Timestamp, TokenHash, TokenRecord};

/// Join tokens live one hour unless asked otherwise, at most one week.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

pub struct OperatorApi {
    shared: Shared,
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

    async fn list_agents(
        &self,
        r: pb::ListAgentsRequest,
    ) -> Result<pb::ListAgentsResponse, ApiError> {
        let cluster = optional("cluster", r.cluster)?;
        let agents = self.shared.catalog.list_agents(cluster.as_ref()).await?;
        let fleet = &self.shared.fleet;
        Ok(pb::ListAgentsResponse {
            agents: agents
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
        let apps = self.shared.catalog.list_apps(&filter).await?;
        Ok(pb::ListAppsResponse {
            apps: apps.into_iter().map(app_to_pb).collect(),
        })
    }
}

fn respond<T>(what: &'static str, r: Result<T, ApiError>) -> Result<Response<T>, Status> {
    r.map(Response::new).map_err(|e| {
        tracing::warn!(rpc = what, error = %e, "request refused");
        e.into()
    })
}

#[tonic::async_trait]
impl Operator for OperatorApi {
    async fn list_clusters(
        &self,
        _request: Request<pb::ListClustersRequest>,
    ) -> Result<Response<pb::ListClustersResponse>, Status> {
        let r = self
            .shared
            .catalog
            .list_clusters()
            .await
            .map_err(ApiError::from)
            .map(|cs| pb::ListClustersResponse {
                clusters: cs
                    .into_iter()
                    .map(|c| pb::Cluster {
                        name: c.name.to_string(),
                        created_unix_ms: c.created_at.unix_millis(),
                    })
                    .collect(),
            });
        respond("list_clusters", r)
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
}
