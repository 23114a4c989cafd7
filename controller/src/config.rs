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
