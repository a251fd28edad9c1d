//! The `sheaf` command: parse, set up logging, run, map errors to exit codes.

use std::process::ExitCode;

use clap::Parser;
use sheaf_host::cli::{run, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHEAF_LOG").unwrap_or_else(|_| "info".into()),
        )
        .init();
    // Not `stdout().lock()`: the launcher's forwarding threads write to stdout too.
    match run(cli, &mut std::io::stdout()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
