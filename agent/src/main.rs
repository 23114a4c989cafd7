//! `ferry-agent`: parse args → init tracing → run the chosen command.

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "ferry-agent", version, about = "Ferry agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    // Foundation commands (join, run) go here.
    // Data mover commands (repo …, snapshot …) go here.
    /// Repository management: init, keys, verify, prune.
    Repo(ferry_agent::repo::cli::RepoArgs),
    /// Snapshots: create, ls, restore, verify, forget.
    Snapshot(ferry_agent::repo::cli::SnapshotArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Repo(args) => run_data_mover(ferry_agent::repo::cli::run_repo(args)),
        Command::Snapshot(args) => run_data_mover(ferry_agent::repo::cli::run_snapshot(args)),
    }
}

/// Runs a data mover command to completion and exits with its code.
fn run_data_mover(fut: impl std::future::Future<Output = i32>) -> ! {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let code = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt.block_on(fut),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            1
        }
    };
    std::process::exit(code)
}
