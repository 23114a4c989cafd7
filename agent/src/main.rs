//! `ferry-agent`: parse args → init tracing → run the chosen command.

use clap::{Parser, Subcommand};

const ENVIRONMENT: &str = "\
Environment:
  FERRY_LOG              log filter (e.g. info, debug, ferry_repo=debug)
  FERRY_REPO             repository location for repo/snapshot commands
  FERRY_REPO_PASSWORD    repository password (or --password-file)
  AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE
                         S3 credentials when the location names none

Exit codes: 0 done, 1 the operation failed, 2 bad usage or input,
3 cannot reach or be accepted by the controller (join, run).";

#[derive(Debug, Parser)]
#[command(name = "ferry-agent", version, about = "Ferry agent", after_help = ENVIRONMENT)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Enrol with the controller: key generated here, certificate signed there.
    Join(JoinArgs),
    /// Run the agent: keep a session with the controller and report apps.
    Run {
        /// The agent's TOML config (written by `join` as DATA_DIR/agent.toml).
        #[arg(long, env = "FERRY_AGENT_CONFIG")]
        config: std::path::PathBuf,
    },
    // Data mover commands (repo …, snapshot …) go here.
    /// Repository management: init, keys, verify, prune, repair, unlock.
    #[command(after_help = ENVIRONMENT)]
    Repo(ferry_agent::data_mover::RepoArgs),
    /// Snapshots: create, ls, restore, verify, forget (IDs may be `latest`).
    #[command(after_help = ENVIRONMENT)]
    Snapshot(ferry_agent::data_mover::SnapshotArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Join(args) => foundation(join(args)),
        Command::Run { config } => foundation(run(config)),
        Command::Repo(args) => run_data_mover(ferry_agent::data_mover::run_repo(args)),
        Command::Snapshot(args) => run_data_mover(ferry_agent::data_mover::run_snapshot(args)),
    }
}

/// Logs to stderr, filtered by `FERRY_LOG` (default: `default_level`).
fn init_tracing(default_level: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Runs a data mover command to completion and exits with its code.
fn run_data_mover(fut: impl std::future::Future<Output = i32>) -> ! {
    init_tracing("warn");
    let code = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt.block_on(fut),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            1
        }
    };
    std::process::exit(code)
}

#[derive(Debug, clap::Args)]
struct JoinArgs {
    /// `https://HOST:PORT` of the controller.
    #[arg(long, env = "FERRY_CONTROLLER")]
    controller: String,
    /// The join token from `ferryctl token create`.
    #[arg(long, env = "FERRY_JOIN_TOKEN", hide_env_values = true)]
    token: String,
    /// `sha256:<hex>` of the controller's CA, printed with the token.
    #[arg(long)]
    ca_fingerprint: String,
    #[arg(
        long,
        env = "FERRY_AGENT_DATA_DIR",
        default_value = "/var/lib/ferry-agent"
    )]
    data_dir: std::path::PathBuf,
    /// Node name; default: the host name.
    #[arg(long)]
    node: Option<String>,
    /// Refuse unless the token belongs to this cluster.
    #[arg(long)]
    cluster: Option<String>,
}

/// Installs the crypto provider and tracing, runs `fut`, maps errors to
/// exit codes (1 failed, 2 bad input, 3 controller unreachable or refused).
fn foundation(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    rustls::crypto::ring::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a rustls crypto provider was already installed"))?;
    init_tracing("info");
    let rt = tokio::runtime::Runtime::new()?;
    match rt.block_on(fut) {
        Ok(()) => Ok(()),
        Err(e) => {
            eprintln!("error: {}", ferry_core::Chain(e.as_ref()));
            let code = if let Some(err) = e.downcast_ref::<ferry_agent::enrol::EnrolError>() {
                use ferry_agent::enrol::EnrolError as E;
                match err {
                    E::InvalidNode { .. } | E::AlreadyEnrolled { .. } => 2,
                    E::Tls(_) | E::Refused { .. } | E::CaMismatch { .. } => 3,
                    _ => 1,
                }
            } else if e
                .downcast_ref::<ferry_agent::config::ConfigError>()
                .is_some()
                || e.downcast_ref::<ferry_agent::enrol::OpenDataDir>()
                    .is_some()
                || e.downcast_ref::<ferry_proto::tls::TlsError>().is_some()
            {
                2
            } else {
                1
            };
            std::process::exit(code)
        }
    }
}

async fn join(a: JoinArgs) -> anyhow::Result<()> {
    let pin = ferry_proto::tls::CaFingerprint::parse(&a.ca_fingerprint)?;
    let node = a.node.unwrap_or_else(ferry_agent::enrol::default_node);
    let done = ferry_agent::enrol::join(
        &a.controller,
        &a.token,
        &pin,
        &a.data_dir,
        &node,
        a.cluster.as_deref(),
    )
    .await?;
    println!("enrolled node {} in cluster {}", done.node, done.cluster);
    println!("certificate: {}", done.files.cert.display());
    if done.wrote_config {
        println!(
            "wrote {}; declare apps there, then:",
            done.files.config.display()
        );
    }
    println!("  ferry-agent run --config {}", done.files.config.display());
    Ok(())
}

async fn run(config: std::path::PathBuf) -> anyhow::Result<()> {
    use std::sync::Arc;
    let config = ferry_agent::config::AgentConfig::load(&config)?;
    ferry_agent::enrol::refuse_if_open(&config.data_dir)?;
    let settings = ferry_agent::session::SessionSettings::load(&config)?;
    // The agent's drivers, in order: the host driver has the apps the
    // config declares (and their copies), a container engine the rest.
    let mut drivers: Vec<Arc<dyn ferry_agent::platform::Driver>> = vec![Arc::new(
        ferry_agent::platform::host::HostPlatform::with_copies(
            config.app_model()?,
            config.command_timeout(),
            &config.data_dir,
            &config.copies_dir(),
        )?,
    )];
    if let Some(s) = config.engine_settings()? {
        drivers.push(Arc::new(
            ferry_agent::platform::containers::ContainerPlatform::new(s),
        ));
    }
    let platform = Arc::new(ferry_agent::platform::Platforms::new(drivers));
    tracing::info!(cluster = %settings.cluster, node = %settings.node, controller = %settings.controller, "agent starting");
    // Whatever an interrupted operation stopped runs again before anything else.
    let journal = ferry_agent::journal::Journal::open(&config.data_dir)?;
    for problem in ferry_agent::journal::replay(&journal, platform.as_ref()).await {
        tracing::error!("{problem}");
    }
    let cancel = tokio_util::sync::CancellationToken::new();
    let mut steps = ferry_agent::steps::StepCtx::new(
        platform.clone(),
        Some(journal.clone()),
        std::time::Duration::from_secs(config.storage_retry_secs.max(1)),
    );
    steps.delta_buffer = config.delta_buffer();
    steps.scratch_dir = config.data_dir.join("tmp");
    // What could not be started at once (an engine or a unit still away)
    // is retried until it runs.
    let retries = tokio::spawn(ferry_agent::journal::retry(
        journal.clone(),
        platform.clone(),
        config.journal_retry(),
        cancel.child_token(),
    ));
    // What an interrupted step staged there (exported images and container
    // config, which may hold secrets) goes before any step runs.
    if let Err(e) = std::fs::remove_dir_all(&steps.scratch_dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %steps.scratch_dir.display(), error = %e, "staging directory not cleared");
    }
    let stop_steps = steps.shutdown.clone();
    let running = steps.clone();
    let session = tokio::spawn(ferry_agent::session::run(settings, steps, cancel.clone()));
    shutdown_signal().await;
    tracing::info!("shutting down");
    // Steps stop first (stopping nothing more) and start again what they
    // stopped. One still running after the grace keeps its journal entry
    // for the next start: the replay below leaves it alone, so it never
    // races a stop still under way.
    stop_steps.cancel();
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, running.idle()).await;
    cancel.cancel();
    session.await?;
    let _ = retries.await;
    // What failed steps left is replayed once more before the agent exits.
    for problem in ferry_agent::journal::replay(&journal, platform.as_ref()).await {
        tracing::error!("{problem}");
    }
    if running.running() > 0 {
        tracing::error!(
            steps = running.running(),
            "steps still running at exit; what they stopped starts again when the agent does"
        );
    }
    Ok(())
}

/// How long a shutdown waits for steps to start again what they stopped:
/// longer than a container's stop, shorter than the systemd unit's
/// `TimeoutStopSec` (120 s).
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(90);

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
