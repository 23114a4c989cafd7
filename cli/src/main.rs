//! `ferryctl`: parse args → resolve config → install the crypto provider →
//! run the command → map the outcome to an exit code (0 done, 1 the
//! operation failed, 2 bad usage or input, 3 cannot reach or be accepted by
//! the controller). Output whose reader went away (`ferryctl … | head`)
//! ends the command quietly with 0.

mod command;
mod config;
mod connect;
mod jobs;
mod output;
mod storage;

use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = command::Cli::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "error: cannot start the async runtime: {e}"
            );
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(command::run(cli)) {
        Ok(()) | Err(connect::CliError::OutputClosed) => ExitCode::SUCCESS,
        Err(e) => {
            // Like the output, a closed stderr is no reason to panic.
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "error: {e}");
            if let Some(hint) = e.hint() {
                let _ = writeln!(err, "hint: {hint}");
            }
            ExitCode::from(e.exit_code())
        }
    }
}
