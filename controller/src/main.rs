//! `ferry-controller`: parse args → install the crypto provider → init
//! tracing → run the chosen command.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ferry_controller::catalog::{Engine, LocationName};
use ferry_controller::config::{ConnectionLimits, ServeConfig};
use ferry_controller::pki::{self, Pki, PkiPaths};
use ferry_controller::rebuild;

#[derive(Debug, Parser)]
#[command(name = "ferry-controller", version, about = "Ferry controller")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the CA, the server certificate and the first operator identity.
    Init {
        #[arg(long, env = "FERRY_DATA_DIR")]
        data_dir: PathBuf,
        /// DNS name or IP address for the server certificate (repeatable).
        /// Default: localhost, 127.0.0.1, ::1 and the host name.
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Name of the first operator (URI SAN ferry://operator/NAME).
        #[arg(long, default_value = "admin")]
        operator: String,
    },
    /// Serve the operator and agent APIs over mTLS.
    Serve {
        #[arg(long, env = "FERRY_DATA_DIR")]
        data_dir: PathBuf,
        /// Address to listen on; port 0 lets the OS choose.
        #[arg(long, env = "FERRY_LISTEN", default_value = "0.0.0.0:7443")]
        listen: SocketAddr,
        /// Write the bound address (`IP:PORT`) to this file once listening.
        #[arg(long)]
        addr_file: Option<PathBuf>,
        /// Catalog engine: redb (default) or sled.
        #[arg(long, default_value = "redb")]
        catalog_engine: Engine,
        /// Heartbeat interval asked of agents, in seconds.
        #[arg(long, default_value_t = 10)]
        heartbeat_secs: u64,
        /// How often agents' last-seen times are written to the catalog.
        #[arg(long, default_value_t = 5)]
        last_seen_flush_secs: u64,
        /// Connections open at once; one more is closed as soon as it is
        /// accepted. Lowered to fit the open-file limit if need be.
        #[arg(long, env = "FERRY_MAX_CONNECTIONS", default_value_t = 10_000)]
        max_connections: usize,
        /// Seconds a new connection has to complete its TLS handshake.
        #[arg(long, env = "FERRY_HANDSHAKE_TIMEOUT_SECS", default_value_t = 10)]
        handshake_timeout_secs: u64,
        /// HTTP/2 keepalive ping interval in seconds; a ping unanswered for as
        /// long, or a connection silent for three intervals, is closed.
        #[arg(long, env = "FERRY_KEEPALIVE_SECS", default_value_t = 30)]
        keepalive_secs: u64,
        /// Seconds a job step waits for its agent to come online before it
        /// fails.
        #[arg(long, env = "FERRY_STEP_OFFLINE_SECS", default_value_t = 600)]
        step_offline_secs: u64,
        /// Job steps one agent runs at once; more wait their turn.
        #[arg(long, env = "FERRY_STEPS_PER_AGENT", default_value_t = 2)]
        steps_per_agent: usize,
    },
    /// Offline maintenance of the catalog (the controller must be stopped).
    Catalog {
        #[command(subcommand)]
        command: CatalogCommand,
    },
}

#[derive(Debug, Subcommand)]
enum CatalogCommand {
    /// Recreate the backup records of a storage location from its
    /// repository: record the backups whose manifests it holds, remove the
    /// records whose manifests it does not.
    Rebuild {
        #[arg(long, env = "FERRY_DATA_DIR")]
        data_dir: PathBuf,
        /// The storage location whose backups are rebuilt.
        #[arg(long)]
        storage: LocationName,
        /// Catalog engine the controller serves with: redb (default) or sled.
        #[arg(long, default_value = "redb")]
        catalog_engine: Engine,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", ferry_core::Chain(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    rustls::crypto::ring::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a rustls crypto provider was already installed"))?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Init {
            data_dir,
            sans,
            operator,
        } => init(&data_dir, sans, &operator),
        Command::Serve {
            data_dir,
            listen,
            addr_file,
            catalog_engine,
            heartbeat_secs,
            last_seen_flush_secs,
            max_connections,
            handshake_timeout_secs,
            keepalive_secs,
            step_offline_secs,
            steps_per_agent,
        } => {
            let config = ServeConfig {
                data_dir,
                listen,
                addr_file,
                engine: catalog_engine,
                heartbeat: Duration::from_secs(heartbeat_secs.max(1)),
                last_seen_flush: Duration::from_secs(last_seen_flush_secs.max(1)),
                connections: ConnectionLimits {
                    max_connections: max_connections.max(1),
                    handshake_timeout: Duration::from_secs(handshake_timeout_secs.max(1)),
                    keepalive: Duration::from_secs(keepalive_secs.max(1)),
                },
                jobs: ferry_controller::config::JobLimits {
                    offline: Duration::from_secs(step_offline_secs.max(1)),
                    per_agent: steps_per_agent.max(1),
                },
            };
            tokio::runtime::Runtime::new()
                .context("cannot start the async runtime")?
                .block_on(serve(config))
        }
        Command::Catalog {
            command:
                CatalogCommand::Rebuild {
                    data_dir,
                    storage,
                    catalog_engine,
                },
        } => {
            let opts = rebuild::Options {
                data_dir,
                engine: catalog_engine,
                storage,
            };
            tokio::runtime::Runtime::new()
                .context("cannot start the async runtime")?
                .block_on(rebuild::run(&opts))?;
            Ok(())
        }
    }
}

fn init(data_dir: &Path, sans: Vec<String>, operator: &str) -> anyhow::Result<()> {
    let sans = if sans.is_empty() {
        pki::default_sans()
    } else {
        sans
    };
    let pki = Pki::init(data_dir, &sans, operator)?;
    let p = PkiPaths::new(data_dir);
    println!("initialised {}", data_dir.display());
    println!("ca fingerprint: {}", pki.ca_fingerprint());
    println!("server names: {}", sans.join(", "));
    println!();
    println!("operator {operator} can use ferryctl with:");
    println!("  export FERRY_CA={}", p.operator_ca.display());
    println!("  export FERRY_CERT={}", p.operator_cert.display());
    println!("  export FERRY_KEY={}", p.operator_key.display());
    println!("  export FERRY_CONTROLLER=https://{}:7443", sans[0]);
    Ok(())
}

async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    // Watch for SIGTERM before anything can see the controller listening: a
    // stop that comes right after start is then a clean shutdown, not a kill.
    let shutdown = shutdown_signal();
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener
        .local_addr()
        .context("cannot read the bound address")?;
    if let Some(file) = &config.addr_file {
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, format!("{addr}\n"))
            .and_then(|()| std::fs::rename(&tmp, file))
            .with_context(|| format!("cannot write the address file {}", file.display()))?;
    }
    println!("ferry-controller listening on {addr}");
    ferry_controller::server::run(config, listener, shutdown).await?;
    Ok(())
}

/// Registers the SIGTERM handler now and returns a future that ends on
/// SIGTERM or SIGINT.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    async move {
        match term {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {},
                    _ = term.recv() => {},
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGTERM; only SIGINT stops the controller");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
