//! The controller's gRPC surface on one mTLS port: enrolment (no client
//! certificate), agent sessions (agent certificates), the operator API
//! (operator certificates) and the standard health service.
//!
//! Domain errors become `tonic::Status` in one place: [`ApiError`]'s
//! `From` impl below.

pub mod agent_session;
pub mod auth;
pub mod enrolment;
pub mod operator;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferry_proto::v1::agent_sessions_server::AgentSessionsServer;
use ferry_proto::v1::enrollment_server::EnrollmentServer;
use ferry_proto::v1::operator_server::OperatorServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use ferry_core::CodedError;

use crate::catalog::{Catalog, CatalogError};
use crate::fleet::Fleet;
use crate::pki::{Pki, PkiError};

/// Everything the handlers share.
#[derive(Clone)]
pub struct Shared {
    pub catalog: Arc<dyn Catalog>,
    pub pki: Arc<Pki>,
    pub fleet: Arc<Fleet>,
    /// Heartbeat interval asked of agents.
    pub heartbeat: Duration,
    /// Ends agent sessions at shutdown.
    pub shutdown: CancellationToken,
}

/// Errors of the API layer, mapped to gRPC statuses in one place.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("{0}")]
    Denied(String),
}

impl From<ferry_core::NameError> for ApiError {
    fn from(e: ferry_core::NameError) -> Self {
        Self::Catalog(e.into())
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        let msg = e.to_string();
        match e {
            ApiError::Invalid(_) => Status::invalid_argument(msg),
            ApiError::Denied(_) => Status::permission_denied(msg),
            ApiError::Pki(PkiError::InvalidCsr { .. } | PkiError::InvalidSan { .. }) => {
                Status::invalid_argument(msg)
            }
            ApiError::Pki(_) => {
                tracing::error!(error = %msg, "pki failure");
                Status::internal(msg)
            }
            ApiError::Catalog(c) => match c {
                CatalogError::InvalidName(_) | CatalogError::InvalidRecord { .. } => {
                    Status::invalid_argument(msg)
                }
                CatalogError::ClusterNotFound { .. } | CatalogError::AgentNotFound { .. } => {
                    Status::not_found(msg)
                }
                CatalogError::TokenUnknown { .. }
                | CatalogError::TokenExpired { .. }
                | CatalogError::TokenUsed { .. } => Status::unauthenticated(msg),
                CatalogError::AgentConflict { .. }
                | CatalogError::AppOwnedElsewhere { .. }
                | CatalogError::TokenExists { .. } => Status::failed_precondition(msg),
                other if other.is_transient() => Status::unavailable(msg),
                _ => {
                    tracing::error!(error = %msg, "catalog failure");
                    Status::internal(msg)
                }
            },
        }
    }
}

/// Serves every API on `listener` until `shutdown` resolves.
pub async fn serve(
    shared: Shared,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            shared.pki.server_chain_pem(),
            shared.pki.server_key_pem(),
        ))
        .client_ca_root(Certificate::from_pem(shared.pki.ca_pem()))
        .client_auth_optional(true);

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<OperatorServer<operator::OperatorApi>>()
        .await;
    health_reporter
        .set_serving::<AgentSessionsServer<agent_session::AgentSessionApi>>()
        .await;

    let local: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(addr = ?local, "serving");
    Server::builder()
        .tls_config(tls)?
        .add_service(tonic::service::interceptor::InterceptedService::new(
            health,
            auth::any_identity,
        ))
        .add_service(EnrollmentServer::new(enrolment::EnrollmentApi::new(
            shared.clone(),
        )))
        .add_service(AgentSessionsServer::with_interceptor(
            agent_session::AgentSessionApi::new(shared.clone()),
            auth::agent,
        ))
        .add_service(OperatorServer::with_interceptor(
            operator::OperatorApi::new(shared),
            auth::operator,
        ))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
}
