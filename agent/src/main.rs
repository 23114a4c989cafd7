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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {}
}
