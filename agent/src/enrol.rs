//! `ferry-agent join`: generate a key locally, send a CSR with the join
//! token over a connection pinned to the CA fingerprint, and store the
//! signed certificate. The private key never leaves the machine.
//!
//! Data directory after a join:
//!
//! ```text
//! D/agent.key   private key, 0600
//! D/agent.crt   certificate, URI SAN ferry://cluster/<cluster>/node/<node>
//! D/ca.crt      the Ferry CA (its fingerprint matched the pin)
//! D/agent.toml  a starting config for `ferry-agent run` (only if absent), 0600
//! ```
//!
//! `join` creates `D` 0700 when it is missing, whatever the umask.

use std::io::Write;
use std::path::{Path, PathBuf};

use ferry_core::{CodedError, ErrorCode};
use ferry_proto::identity::PeerIdentity;
use ferry_proto::tls::{self, CaFingerprint, TlsError};
use ferry_proto::v1::JoinRequest;
use ferry_proto::v1::enrollment_client::EnrollmentClient;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};

#[derive(Debug, thiserror::Error)]
pub enum EnrolError {
    #[error("{} already exists: this data directory is enrolled; use another --data-dir or remove it first", path.display())]
    AlreadyEnrolled { path: PathBuf },
    #[error("invalid node name {node:?}: use lowercase letters, digits, '-' and '.'")]
    InvalidNode { node: String },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("the controller refused the join ({code:?}): {message}")]
    Refused { code: tonic::Code, message: String },
    #[error("the controller returned ca {got}, not the pinned {pinned}")]
    CaMismatch { pinned: String, got: String },
    #[error("the controller returned a certificate for {got}, expected node {node}")]
    WrongIdentity { node: String, got: String },
    #[error("cannot create the key or csr: {0}")]
    Key(String),
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl CodedError for EnrolError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::AlreadyEnrolled { .. } => ErrorCode::AlreadyExists,
            Self::InvalidNode { .. } => ErrorCode::InvalidArgument,
            Self::Tls(e) => e.code(),
            Self::Refused { code, .. } => ferry_proto::status::code_from_grpc(*code),
            Self::CaMismatch { .. } | Self::WrongIdentity { .. } => ErrorCode::PermissionDenied,
            Self::Key(_) | Self::Write { .. } => ErrorCode::Internal,
        }
    }
}

/// Paths of an agent's identity files.
#[derive(Debug, Clone)]
pub struct AgentFiles {
    pub key: PathBuf,
    pub cert: PathBuf,
    pub ca: PathBuf,
    pub config: PathBuf,
}

impl AgentFiles {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            key: data_dir.join("agent.key"),
            cert: data_dir.join("agent.crt"),
            ca: data_dir.join("ca.crt"),
            config: data_dir.join("agent.toml"),
        }
    }
}

/// What a join produced.
#[derive(Debug, Clone)]
pub struct Enrolled {
    pub cluster: String,
    pub node: String,
    pub files: AgentFiles,
    pub wrote_config: bool,
}

/// The host name, used as the default node name.
pub fn default_node() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_lowercase())
        .unwrap_or_else(|_| "localhost".to_owned())
}

/// Creates the data directory (and missing parents) 0700 whatever the
/// umask; an existing one is made 0700 too: it is about to hold the agent's
/// key, and nothing in it is for others (copies live beside it).
pub fn prepare_data_dir(dir: &Path) -> std::io::Result<()> {
    if let Some(mode) = open_mode(dir) {
        tracing::info!(dir = %dir.display(), mode = format!("{mode:04o}"), "the data directory was open to other users; made private (0700)");
    }
    crate::durable::private_dir(dir)
}

/// The data directory is open to other users.
#[derive(Debug, thiserror::Error)]
#[error("the data directory {} is open to other users (mode {mode:04o}); it holds the agent's key and what it stages: make it private with chmod 700 {}", dir.display(), dir.display())]
pub struct OpenDataDir {
    pub dir: std::path::PathBuf,
    pub mode: u32,
}

/// Refuses a data directory others may enter (`run`): nothing in it is
/// theirs (copies' volumes live under `copies_dir`).
pub fn refuse_if_open(dir: &Path) -> Result<(), OpenDataDir> {
    match open_mode(dir) {
        Some(mode) => Err(OpenDataDir {
            dir: dir.to_owned(),
            mode,
        }),
        None => Ok(()),
    }
}

fn open_mode(dir: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir).ok()?.permissions().mode() & 0o7777;
    (mode & 0o077 != 0).then_some(mode)
}

fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), EnrolError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| EnrolError::Write {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    f.write_all(contents.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)
}

/// Enrols this agent. `cluster`, when given, must be the token's cluster.
pub async fn join(
    controller: &str,
    token: &str,
    pin: &CaFingerprint,
    data_dir: &Path,
    node: &str,
    cluster: Option<&str>,
) -> Result<Enrolled, EnrolError> {
    let files = AgentFiles::new(data_dir);
    for p in [&files.key, &files.cert] {
        if p.exists() {
            return Err(EnrolError::AlreadyEnrolled { path: p.clone() });
        }
    }
    let node_ok = !node.is_empty()
        && node.len() <= 253
        && node
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !node_ok {
        return Err(EnrolError::InvalidNode {
            node: node.to_owned(),
        });
    }

    let key = KeyPair::generate().map_err(|e| EnrolError::Key(e.to_string()))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node);
    params.distinguished_name = dn;
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| EnrolError::Key(e.to_string()))?;

    let channel = tls::pinned_channel(controller, pin).await?;
    let response = EnrollmentClient::new(channel)
        .join(JoinRequest {
            token: token.to_owned(),
            csr_pem: csr,
            node: node.to_owned(),
            cluster: cluster.unwrap_or_default().to_owned(),
        })
        .await
        .map_err(|s| EnrolError::Refused {
            code: s.code(),
            message: s.message().to_owned(),
        })?
        .into_inner();

    let got = CaFingerprint::of_pem(&response.ca_pem)?;
    if got != *pin {
        return Err(EnrolError::CaMismatch {
            pinned: pin.to_string(),
            got: got.to_string(),
        });
    }
    let der = tls::first_cert_der(&response.certificate_pem, "agent certificate")?;
    let identity =
        PeerIdentity::from_cert_der(der.as_ref()).map_err(|e| EnrolError::WrongIdentity {
            node: node.to_owned(),
            got: e.to_string(),
        })?;
    let cluster = match identity {
        PeerIdentity::Agent { cluster, node: n } if n == node => cluster,
        other => {
            return Err(EnrolError::WrongIdentity {
                node: node.to_owned(),
                got: other.to_string(),
            });
        }
    };

    prepare_data_dir(data_dir).map_err(|source| EnrolError::Write {
        path: data_dir.to_owned(),
        source,
    })?;
    write_new(&files.key, &key.serialize_pem(), 0o600)?;
    write_new(&files.cert, &response.certificate_pem, 0o644)?;
    if files.ca.exists() {
        std::fs::remove_file(&files.ca).map_err(|source| EnrolError::Write {
            path: files.ca.clone(),
            source,
        })?;
    }
    write_new(&files.ca, &response.ca_pem, 0o644)?;
    let wrote_config = !files.config.exists();
    if wrote_config {
        let text = format!(
            "# Written by `ferry-agent join`; declare apps with [[apps]] (see the docs).\ncontroller = {:?}\ndata_dir = {:?}\n",
            controller,
            data_dir.display().to_string()
        );
        // Apps' commands may carry credentials: the config is private.
        write_new(&files.config, &text, 0o600)?;
    }
    tracing::info!(cluster = %cluster, node, "enrolled");
    Ok(Enrolled {
        cluster,
        node: node.to_owned(),
        files,
        wrote_config,
    })
}
