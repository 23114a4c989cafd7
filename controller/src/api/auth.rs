//! Per-service authentication on the one mTLS port.
//!
//! The TLS layer already verified any client certificate against the Ferry
//! CA (chain and validity); a client may also come without one, because
//! `Enrollment.Join` must be reachable before an agent has a certificate.
//! The interceptors here require a certificate for everything else, read the
//! identity from its `ferry://` URI SAN, and admit agents only to the agent
//! API and operators only to the operator API. The identity is put into the
//! request extensions for the handlers.

use ferry_proto::identity::PeerIdentity;
use ferry_proto::tls::CaFingerprint;
use tonic::{Request, Status};

use crate::catalog::{ClusterName, NodeName};

/// An authenticated agent, from its certificate.
#[derive(Debug, Clone)]
pub struct AgentPeer {
    pub cluster: ClusterName,
    pub node: NodeName,
    /// `sha256:<hex>` of the presented certificate.
    pub cert_fingerprint: String,
}

/// An authenticated operator, from its certificate.
#[derive(Debug, Clone)]
pub struct OperatorPeer {
    pub name: String,
}

fn identity<T>(req: &Request<T>, api: &str) -> Result<(PeerIdentity, String), Status> {
    let certs = req.peer_certs().ok_or_else(|| {
        Status::unauthenticated(format!("the {api} api requires a client certificate"))
    })?;
    let leaf = certs.first().ok_or_else(|| {
        Status::unauthenticated(format!("the {api} api requires a client certificate"))
    })?;
    let id = PeerIdentity::from_cert_der(leaf.as_ref()).map_err(|e| {
        Status::permission_denied(format!("client certificate is not a ferry identity: {e}"))
    })?;
    Ok((id, CaFingerprint::of_der(leaf.as_ref()).to_string()))
}

/// Interceptor for the operator API.
pub fn operator(mut req: Request<()>) -> Result<Request<()>, Status> {
    match identity(&req, "operator")? {
        (PeerIdentity::Operator { name }, _) => {
            req.extensions_mut().insert(OperatorPeer { name });
            Ok(req)
        }
        (other @ PeerIdentity::Agent { .. }, _) => Err(Status::permission_denied(format!(
            "{other} may not use the operator api"
        ))),
    }
}

/// Interceptor for the agent-session API.
pub fn agent(mut req: Request<()>) -> Result<Request<()>, Status> {
    match identity(&req, "agent session")? {
        (PeerIdentity::Agent { cluster, node }, cert_fingerprint) => {
            let cluster = ClusterName::new(cluster)
                .map_err(|e| Status::permission_denied(format!("agent certificate names {e}")))?;
            let node = NodeName::new(node)
                .map_err(|e| Status::permission_denied(format!("agent certificate names {e}")))?;
            req.extensions_mut().insert(AgentPeer {
                cluster,
                node,
                cert_fingerprint,
            });
            Ok(req)
        }
        (other @ PeerIdentity::Operator { .. }, _) => Err(Status::permission_denied(format!(
            "{other} may not use the agent session api"
        ))),
    }
}

/// Interceptor for services any Ferry identity may use (health).
pub fn any_identity(req: Request<()>) -> Result<Request<()>, Status> {
    identity(&req, "health")?;
    Ok(req)
}
