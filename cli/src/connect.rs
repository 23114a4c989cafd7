//! Connecting to the controller with the operator's certificate, and what
//! a failure means for the user.

use ferry_proto::v1::operator_client::OperatorClient;
use tonic::transport::Channel;

use crate::config::{ConfigError, Connection};

/// Why a command failed, with the exit code it maps to.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot read {what} {path}: {source}")]
    ReadFile {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("invalid input: {0}")]
    Input(String),
    #[error("cannot reach the controller at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("the server at {url} is not the controller this client trusts: {message}")]
    Untrusted { url: String, message: String },
    #[error("the controller at {url} refused this client: {message}")]
    Refused { url: String, message: String },
    #[error("the controller rejected the request: {message}")]
    Rejected { message: String },
    #[error("{message}")]
    Failed { message: String },
    /// Whoever read the output stopped reading: not a failure of the command.
    #[error("the output was closed")]
    OutputClosed,
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Config(_) | CliError::ReadFile { .. } | CliError::Input(_) => 2,
            CliError::Rejected { .. } => 2,
            CliError::Unreachable { .. }
            | CliError::Refused { .. }
            | CliError::Untrusted { .. } => 3,
            CliError::Failed { .. } => 1,
            CliError::OutputClosed => 0,
        }
    }

    pub fn hint(&self) -> Option<&'static str> {
        match self {
            CliError::Config(_) => Some("run `ferryctl config` to see the settings in effect"),
            CliError::Unreachable { .. } => Some(
                "check that ferry-controller is running and that --controller (FERRY_CONTROLLER) names it",
            ),
            CliError::Untrusted { .. } => Some(
                "check --ca (FERRY_CA): it must be the ca.crt written by `ferry-controller init` of this controller",
            ),
            CliError::Refused { .. } => Some(
                "use the operator certificate written by `ferry-controller init` (--cert/--key, FERRY_CERT/FERRY_KEY) and the controller's CA (--ca, FERRY_CA)",
            ),
            _ => None,
        }
    }

    /// Maps the status of a request relayed to an agent: the controller
    /// answered, so an unavailable agent is the agent's failure (exit 1),
    /// not the controller's.
    pub fn from_agent_status(url: &str, status: tonic::Status) -> Self {
        use tonic::Code;
        let about_agent = status.message().contains("agent");
        match status.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Aborted | Code::Cancelled
                if about_agent =>
            {
                CliError::Failed {
                    message: status.message().to_owned(),
                }
            }
            _ => Self::from_status(url, status),
        }
    }

    /// Maps a gRPC status to what it means for the user.
    pub fn from_status(url: &str, status: tonic::Status) -> Self {
        use tonic::Code;
        let message = status.message().to_owned();
        // With TLS 1.3 the server checks the client certificate after the
        // client has finished its side of the handshake: a refused
        // certificate shows up as a connection closed on the first call.
        let lower = format!("{status:?}").to_lowercase();
        let handshake_refusal = [
            "connection closed",
            "certificate",
            "handshake",
            "alert",
            "broken pipe",
        ]
        .iter()
        .any(|w| lower.contains(w));
        if matches!(
            status.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled
        ) && handshake_refusal
        {
            return CliError::Refused {
                url: url.to_owned(),
                message: format!(
                    "the connection was closed during the TLS handshake; the client certificate is most likely expired or not signed by the controller's CA ({message})"
                ),
            };
        }
        match status.code() {
            Code::Unavailable | Code::DeadlineExceeded => CliError::Unreachable {
                url: url.to_owned(),
                reason: message,
            },
            Code::Unauthenticated | Code::PermissionDenied => CliError::Refused {
                url: url.to_owned(),
                message,
            },
            Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::FailedPrecondition => CliError::Rejected { message },
            _ => CliError::Failed { message },
        }
    }
}

fn read(what: &'static str, path: &std::path::Path) -> Result<String, CliError> {
    std::fs::read_to_string(path).map_err(|source| CliError::ReadFile {
        what,
        path: path.display().to_string(),
        source,
    })
}

/// Opens an mTLS channel to the controller, failing fast when it cannot
/// be reached or refuses the handshake.
pub async fn operator(conn: &Connection) -> Result<OperatorClient<Channel>, CliError> {
    let ca = read("CA certificate", &conn.ca)?;
    let cert = read("client certificate", &conn.cert)?;
    let key = read("client key", &conn.key)?;
    let channel = ferry_proto::tls::channel(&conn.controller, &ca, &cert, &key)
        .await
        .map_err(|e| classify_connect_error(&conn.controller, &e))?;
    Ok(OperatorClient::new(channel))
}

/// Tells a refused handshake (bad or foreign certificate) from a controller
/// that cannot be reached, from the error chain.
fn classify_connect_error(url: &str, e: &ferry_proto::tls::TlsError) -> CliError {
    use ferry_proto::tls::TlsError as E;
    match e {
        E::Connect { .. } => {
            let chain = error_chain(e);
            let lower = chain.to_lowercase();
            if lower.contains("invalid peer certificate") {
                CliError::Untrusted {
                    url: url.to_owned(),
                    message: chain,
                }
            } else if lower.contains("certificate")
                || lower.contains("handshake")
                || lower.contains("alert")
            {
                CliError::Refused {
                    url: url.to_owned(),
                    message: chain,
                }
            } else {
                CliError::Unreachable {
                    url: url.to_owned(),
                    reason: chain,
                }
            }
        }
        _ => CliError::Input(e.to_string()),
    }
}

/// The innermost causes of an error, joined: tonic's transport errors say
/// little at the top.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !parts.contains(&s) {
            parts.push(s);
        }
        cur = c.source();
    }
    if parts.is_empty() {
        e.to_string()
    } else {
        parts.join(": ")
    }
}
