//! The `sheaf` command: parse, set up logging, run, map errors to exit codes.

use std::process::ExitCode;

use clap::Parser;
mod cli;
mod commands;

use cli::{run, worker_log, Cli};
use sheaf_plugins::HostError;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Keeps freed memory in the process for reuse: a training step allocates and frees
/// the same large activation buffers every step, and glibc's defaults return each to
/// the kernel (`mmap` above 128 KiB), so every step paid page faults and zeroing again
/// (about a tenth of a GPT step on CPU, measured with perf). 32 MiB is the largest
/// threshold glibc accepts.
fn keep_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    // A rank under another launcher keeps its own log in the run directory.
    let log = worker_log(&cli);
    let to_log = log
        .as_ref()
        .and_then(|f| f.try_clone().ok())
        .map(|f| tracing_subscriber::fmt::layer().with_writer(std::sync::Mutex::new(f)).with_ansi(false));
    tracing_subscriber::registry()
        .with(tracing_subscriber::EnvFilter::try_from_env("SHEAF_LOG").unwrap_or_else(|_| "info".into()))
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                // Colours only for a terminal: under `sheaf launch` the output also
                // goes to each rank's log file.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .with(to_log)
        .init();
    // Not `stdout().lock()`: the launcher's forwarding threads write to stdout too.
    match run(cli, &mut std::io::stdout()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // A preemption is no failure: the run stopped where asked, checkpointed.
            let line = match e {
                HostError::Preempted { .. } => format!("{e}"),
                _ => format!("error: {e}"),
            };
            eprintln!("{line}");
            if let Some(mut f) = log {
                let _ = std::io::Write::write_all(&mut f, format!("{line}\n").as_bytes());
            }
            ExitCode::from(e.exit_code())
        }
    }
}
