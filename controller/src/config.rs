//! Controller settings for `serve`, and the data directory layout.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::catalog::Engine;

/// What `ferry-controller serve` needs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Holds `pki/`, `operator/` and the catalog.
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// Where to write the bound address once listening (for port 0).
    pub addr_file: Option<PathBuf>,
    pub engine: Engine,
    /// Heartbeat interval asked of agents.
    pub heartbeat: Duration,
    /// How often last-seen times are flushed to the catalog.
    pub last_seen_flush: Duration,
    pub connections: ConnectionLimits,
    /// Job steps: how long one waits for its offline agent, how many run
    /// on one agent at once.
    pub jobs: JobLimits,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobLimits {
    pub offline: Duration,
    pub per_agent: usize,
}

impl Default for JobLimits {
    fn default() -> Self {
        Self {
            offline: Duration::from_secs(600),
            per_agent: 2,
        }
    }
}

/// What a connection may take of the controller (see `api::incoming`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections open at once; one more is closed as soon as accepted.
    pub max_connections: usize,
    /// Time a new connection has to complete its TLS handshake.
    pub handshake_timeout: Duration,
    /// HTTP/2 ping interval, and how long a ping may go unanswered.
    pub keepalive: Duration,
}

impl ConnectionLimits {
    /// A connection that sends nothing at all for this long is closed: a
    /// live client answers every keepalive ping well before.
    pub fn idle_timeout(&self) -> Duration {
        self.keepalive * 3
    }
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            handshake_timeout: Duration::from_secs(10),
            keepalive: Duration::from_secs(30),
        }
    }
}

impl ServeConfig {
    pub fn catalog_path(&self) -> PathBuf {
        catalog_path(&self.data_dir, self.engine)
    }
}

/// `D/catalog.redb` (a file) or `D/catalog.sled` (a directory).
pub fn catalog_path(data_dir: &Path, engine: Engine) -> PathBuf {
    data_dir.join(format!("catalog.{engine}"))
}

/// Creates `dir` (and any missing parent) readable by its owner only,
/// whatever the umask, or tightens it to 0700 if it exists and others may
/// enter it. For the directories Ferry owns inside the data directory.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    if std::fs::metadata(dir)?.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Creates the data directory (and missing parents) 0700 whatever the
/// umask. An existing one keeps its mode: see [`warn_if_open`].
pub fn prepare_data_dir(dir: &Path) -> std::io::Result<()> {
    if dir.exists() {
        warn_if_open(dir);
        return Ok(());
    }
    private_dir(dir)
}

/// Warns when others may enter the data directory. Its mode is left as it
/// is, since it may be a directory others need (a chmod could lock them
/// out); what Ferry writes into it is private anyway.
pub fn warn_if_open(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::metadata(dir) else {
        return;
    };
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        tracing::warn!(
            dir = %dir.display(),
            mode = format!("{mode:04o}"),
            "the data directory is open to other users; make it private with chmod 700"
        );
    }
}
