//! The controller's gRPC surface on one mTLS port: enrolment (no client
//! certificate), agent sessions (agent certificates), the operator API
//! (operator certificates) and the standard health service.
//!
//! Domain errors become `tonic::Status` in one place: [`ApiError`]'s
//! `From` impl below, through `ferry_proto::status`.

pub mod agent_session;
pub mod auth;
pub mod enrolment;
pub mod incoming;
mod jobs;
pub mod operator;
mod storage;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferry_core::Chain;
use ferry_proto::v1::agent_sessions_server::AgentSessionsServer;
use ferry_proto::v1::enrollment_server::EnrollmentServer;
use ferry_proto::v1::operator_server::OperatorServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use ferry_core::{CodedError, ErrorCode, RetryClass};
use ferry_proto::convert::ConvertError;

use crate::catalog::{Catalog, CatalogError};
use crate::config::ConnectionLimits;
use crate::fleet::Fleet;
use crate::link::LinkError;
use crate::pki::{Pki, PkiError};

/// Everything the handlers share.
#[derive(Clone)]
pub struct Shared {
    pub catalog: Arc<dyn Catalog>,
    pub engine: crate::jobs::engine::Engine,
    pub pki: Arc<Pki>,
    pub fleet: Arc<Fleet>,
    /// Seals secrets kept in the catalog.
    pub seal: Arc<crate::seal::SealKey>,
    /// Heartbeat interval asked of agents.
    pub heartbeat: Duration,
    /// Ends agent sessions at shutdown.
    pub shutdown: CancellationToken,
}

/// Errors of the API layer. Each reports its [`ErrorCode`]; the gRPC code
/// comes from the one mapping in `ferry_proto::status`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("invalid request: {0}")]
    Convert(#[from] ConvertError),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error(transparent)]
    Seal(#[from] crate::seal::SealError),
    #[error(transparent)]
    Plan(#[from] crate::jobs::plan::PlanError),
    #[error(transparent)]
    Engine(#[from] crate::jobs::engine::EngineError),
    /// Nothing that could do it is reachable now.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Denied(String),
    #[error("{0}")]
    NotFound(String),
}

impl From<ferry_core::NameError> for ApiError {
    fn from(e: ferry_core::NameError) -> Self {
        Self::Catalog(e.into())
    }
}

impl CodedError for ApiError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::Catalog(e) => e.code(),
            Self::Pki(e) => e.code(),
            Self::Convert(e) => e.code(),
            Self::Link(e) => e.code(),
            Self::Seal(e) => e.code(),
            Self::Plan(e) => e.code(),
            Self::Engine(e) => e.code(),
            Self::Unavailable(_) => ErrorCode::Unavailable,
            Self::Invalid(_) => ErrorCode::InvalidArgument,
            Self::Denied(_) => ErrorCode::PermissionDenied,
            Self::NotFound(_) => ErrorCode::NotFound,
        }
    }

    fn retry_class(&self) -> RetryClass {
        match self {
            Self::Catalog(e) => e.retry_class(),
            Self::Pki(e) => e.retry_class(),
            Self::Convert(e) => e.retry_class(),
            Self::Link(e) => e.retry_class(),
            Self::Seal(e) => e.retry_class(),
            Self::Plan(e) => e.retry_class(),
            Self::Engine(e) => e.retry_class(),
            Self::Invalid(_) | Self::Denied(_) | Self::NotFound(_) | Self::Unavailable(_) => {
                self.code().retry_class()
            }
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        if e.code() == ErrorCode::Internal {
            tracing::error!(error = %Chain(&e), "internal failure");
        }
        ferry_proto::status::to_status(&e)
    }
}

/// Serves every API on `listener`, within `limits`, until `shutdown`
/// resolves.
pub async fn serve(
    shared: Shared,
    listener: TcpListener,
    limits: &ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let max_connections = incoming::fit_open_file_limit(limits.max_connections);
    let tls = ServerTlsConfig::new()
        .timeout(limits.handshake_timeout)
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
    tracing::info!(
        addr = ?local,
        max_connections,
        handshake_timeout_ms = u64::try_from(limits.handshake_timeout.as_millis()).unwrap_or(u64::MAX),
        keepalive_ms = u64::try_from(limits.keepalive.as_millis()).unwrap_or(u64::MAX),
        "serving"
    );
    Server::builder()
        .http2_keepalive_interval(Some(limits.keepalive))
        .http2_keepalive_timeout(Some(limits.keepalive))
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
        .serve_with_incoming_shutdown(
            incoming::accept(listener, max_connections, limits),
            shutdown,
        )
        .await
}
