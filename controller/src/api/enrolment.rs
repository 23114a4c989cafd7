//! `Enrollment.Join`: trade a single-use join token and a CSR for an agent
//! certificate. Everything is validated before the token is consumed, so a
//! malformed request neither burns the token nor writes to the catalog.

use ferry_proto::v1::enrollment_server::Enrollment;
use ferry_proto::v1::{JoinRequest, JoinResponse};
use tonic::{Request, Response, Status};

use super::{ApiError, Shared};
use crate::catalog::{AgentId, AgentRecord, ClusterName, NodeName, Timestamp, TokenHash};
use crate::pki;

pub struct EnrollmentApi {
    shared: Shared,
}

impl EnrollmentApi {
    pub fn new(shared: Shared) -> Self {
        Self { shared }
    }
}

/// A join request that passed validation.
struct ValidJoin {
    hash: TokenHash,
    node: NodeName,
    claimed_cluster: Option<ClusterName>,
    csr_pem: String,
}

impl TryFrom<JoinRequest> for ValidJoin {
    type Error = ApiError;
    fn try_from(r: JoinRequest) -> Result<Self, ApiError> {
        if r.token.is_empty() || r.token.len() > 256 {
            return Err(ApiError::Invalid(
                "join token is missing or malformed".into(),
            ));
        }
        let node = NodeName::new(r.node)?;
        let claimed_cluster = if r.cluster.is_empty() {
            None
        } else {
            Some(ClusterName::new(r.cluster)?)
        };
        pki::parse_csr(&r.csr_pem)?;
        Ok(Self {
            hash: TokenHash::of(&r.token),
            node,
            claimed_cluster,
            csr_pem: r.csr_pem,
        })
    }
}

fn new_agent_id() -> AgentId {
    let bytes: [u8; 8] = rand::random();
    AgentId::new(format!("a-{}", hex::encode(bytes))).expect("invariant: hex agent ids are valid")
}

impl EnrollmentApi {
    async fn join(&self, req: JoinRequest) -> Result<JoinResponse, ApiError> {
        let join = ValidJoin::try_from(req)?;
        let catalog = &self.shared.catalog;
        if let Some(claimed) = &join.claimed_cluster {
            // Look before consuming: a token for another cluster stays usable.
            let tokens = catalog.list_join_tokens(Some(claimed)).await?;
            if !tokens.iter().any(|t| t.hash == join.hash) {
                return Err(ApiError::Denied(format!(
                    "join token {} is not a token of cluster {claimed}",
                    join.hash
                )));
            }
        }
        let now = Timestamp::now();
        let cluster = catalog
            .consume_join_token(&join.hash, now, &join.node)
            .await?;
        let issued = self
            .shared
            .pki
            .sign_agent_csr(&join.csr_pem, &cluster, &join.node)?;
        let id = new_agent_id();
        catalog
            .upsert_agent(AgentRecord {
                id: id.clone(),
                cluster: cluster.clone(),
                node: join.node.clone(),
                version: String::new(),
                platform: String::new(),
                restores: Vec::new(),
                enrolled_at: now,
                last_seen: now,
                cert_serial: issued.serial.clone(),
                cert_fingerprint: issued.fingerprint.clone(),
            })
            .await?;
        tracing::info!(cluster = %cluster, node = %join.node, agent = %id, token = %join.hash, "agent enrolled");
        Ok(JoinResponse {
            certificate_pem: issued.cert_pem,
            ca_pem: self.shared.pki.ca_pem().to_owned(),
            cluster: cluster.to_string(),
            node: join.node.to_string(),
            not_after_unix_ms: issued.not_after_unix_ms,
        })
    }
}

#[tonic::async_trait]
impl Enrollment for EnrollmentApi {
    #[tracing::instrument(skip_all, name = "join")]
    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        match EnrollmentApi::join(self, request.into_inner()).await {
            Ok(r) => Ok(Response::new(r)),
            Err(e) => {
                tracing::warn!(error = %e, "join refused");
                Err(e.into())
            }
        }
    }
}
