//! `serve`: open the catalog, load the PKI, run the APIs until shutdown.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::{self, Shared};
use crate::catalog::{self, CatalogError};
use crate::config::{self, ServeConfig};
use crate::fleet::Fleet;
use crate::pki::{Pki, PkiError, PkiPaths};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot load the pki of {}: {source}", dir.display())]
    Pki {
        dir: std::path::PathBuf,
        #[source]
        source: PkiError,
    },
    #[error("cannot secure {}: {source}", path.display())]
    DataDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the catalog: {0}")]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Seal(#[from] crate::seal::SealError),
    #[error("grpc server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves until `shutdown` resolves, then ends agent sessions, flushes
/// last-seen times and returns.
pub async fn run(
    config: ServeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    secure_data_dir(&config.data_dir)?;
    let pki = Pki::load(&config.data_dir).map_err(|source| ServeError::Pki {
        dir: config.data_dir.clone(),
        source,
    })?;
    let seal = Arc::new(crate::seal::SealKey::load_or_create(&config.data_dir)?);
    let catalog = catalog::open(config.engine, &config.catalog_path()).await?;
    let fleet = Fleet::new();
    let root = CancellationToken::new();
    let flusher = tokio::spawn(fleet.clone().run_flusher(
        catalog.clone(),
        config.last_seen_flush,
        root.child_token(),
    ));
    let limits = crate::jobs::machine::Limits {
        offline_ms: u64::try_from(config.jobs.offline.as_millis()).unwrap_or(u64::MAX),
        ..crate::jobs::machine::Limits::default()
    };
    let (engine, engine_task) = crate::jobs::engine::Engine::start(
        catalog.clone(),
        fleet.clone(),
        seal.clone(),
        limits,
        config.jobs.per_agent,
        root.child_token(),
    )
    .await?;
    let shared = Shared {
        engine,
        catalog,
        pki: Arc::new(pki),
        fleet,
        seal,
        heartbeat: config.heartbeat,
        shutdown: root.child_token(),
    };
    let stop = root.clone();
    let served = api::serve(shared, listener, &config.connections, async move {
        shutdown.await;
        tracing::info!("shutting down");
        stop.cancel();
    })
    .await;
    root.cancel();
    if let Err(e) = engine_task.await {
        tracing::warn!(error = %e, "job engine task failed");
    }
    if let Err(e) = flusher.await {
        tracing::warn!(error = %e, "last-seen flusher task failed");
    }
    served?;
    Ok(())
}

/// Warns when others may read the data directory, and tightens what Ferry
/// owns in it (`pki/`, `operator/`) in case an older Ferry or a copy left
/// them open. The catalog tightens its own file when it opens.
fn secure_data_dir(data_dir: &std::path::Path) -> Result<(), ServeError> {
    config::warn_if_open(data_dir);
    let paths = PkiPaths::new(data_dir);
    for dir in [paths.pki_dir, paths.operator_dir] {
        if dir.is_dir() {
            config::private_dir(&dir)
                .map_err(|source| ServeError::DataDir { path: dir, source })?;
        }
    }
    Ok(())
}
