//! The host's failures, and the exit code each gives the `sheaf` command.

use std::path::{Path, PathBuf};

use sheaf_core::PluginKind;

use crate::LoadError;

/// The `sheaf` command's exit codes. Every failure is one of these; `sheaf --help`
/// and the README list them.
pub mod exit {
    /// The command did what it was asked.
    pub const OK: u8 = 0;
    /// The run (or the check, or the benchmark) failed: a rank's error, a worker that
    /// died, a file that could not be written, a conformance check that failed.
    pub const FAILED: u8 = 1;
    /// The command line or the job cannot be run as given (a malformed or
    /// contradictory job, a component no plugin provides, a plugin refusing its
    /// settings, a dataset that cannot be read): nothing was trained.
    pub const USAGE: u8 = 2;
    /// Stopped from outside (preempted): `sheaf launch` got SIGINT or SIGTERM, stopped
    /// its workers and exits with 128 + the signal's number, as a shell reports a
    /// process the signal killed (130, 143); `--resume RUN_DIR` continues the run.
    pub const SIGNALLED: u8 = 128;
    /// Preempted and checkpointed: a preemption signal (SIGTERM, SIGINT,
    /// `--preempt-signal`) reached the run, its ranks stopped together after a step and
    /// saved it; `--resume RUN_DIR` continues bit for bit. 75 is sysexits' `EX_TEMPFAIL`
    /// ("try again later"), what a scheduler's requeue hook can test for.
    pub const PREEMPTED: u8 = 75;
}

/// Failures of the host.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    #[error(
        "no loaded plugin provides {kind} `{name}` (available: {available}); searched {searched}{unusable}"
    )]
    Missing { kind: PluginKind, name: String, available: String, searched: String, unusable: String },
    #[error(
        "{kind} `{name}` is provided by more than one library: {providers}; remove one from the plugin path, \
         or choose in the job: [plugins.{kind}] {name} = \"<plugin name>\""
    )]
    Ambiguous { kind: PluginKind, name: String, providers: String },
    #[error("plugin `{plugin}` ({file}): {source}")]
    Component { plugin: String, file: PathBuf, source: sheaf_core::Error },
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A command line that cannot be run.
    #[error("{0}")]
    Usage(String),
    /// A job that cannot be run: malformed, contradictory, or asking for what no
    /// plugin offers.
    #[error("{0}")]
    Job(String),
    /// A dataset that cannot be read, or is of the wrong shape.
    #[error("{0}")]
    Data(String),
    /// A file or stream that could not be read or written: `what` names it.
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    /// A file whose contents could not be made (serialised) or read back.
    #[error("{0}")]
    Output(String),
    /// Something the command was given (a job file, a dataset, an address, a
    /// worker's spec) that could not be read or parsed: `what` names it, `source` is
    /// the reader's own error.
    #[error("{what}: {}", source.to_string().trim_end())]
    Input { what: String, source: BoxError },
    /// An output (a checkpoint's tensors, a report, a plot) that could not be made:
    /// `what` names it, `source` is the serialiser's own error.
    #[error("{what}: {}", source.to_string().trim_end())]
    Encode { what: String, source: BoxError },
    /// A component (model, optimizer, strategy) failed outside training.
    #[error("{}{source}", during.map(|d| format!("{d}: ")).unwrap_or_default())]
    Core { during: Option<&'static str>, source: sheaf_core::Error },
    /// A rank's training failed.
    #[error("rank {rank}: {detail}")]
    Train { rank: usize, detail: String },
    /// A rank of a launched world failed, and its world was stopped.
    #[error(
        "{message}; stopped the other workers; once the cause is fixed, the same command with --resume {} \
         continues the run from its newest checkpoint",
        run_dir.display()
    )]
    RankFailed { rank: usize, message: String, run_dir: PathBuf },
    /// The launcher was told to stop (SIGINT, SIGTERM: a preemption) and stopped its
    /// workers.
    #[error(
        "stopped by signal {signal}; the workers were stopped; the same command with --resume {} continues \
         the run from its newest checkpoint",
        run_dir.display()
    )]
    Stopped { signal: i32, run_dir: PathBuf },
    /// A preemption signal stopped the run at a step boundary, checkpointed.
    #[error(
        "preempted: stopped after step {}, checkpointed; the same command with --resume {} continues the run",
        step.map_or("?".to_string(), |s| s.to_string()),
        run_dir.display()
    )]
    Preempted { step: Option<u64>, run_dir: PathBuf },
    /// The launcher could not start or watch its workers.
    #[error("{0}")]
    Launch(String),
    /// A check the command ran failed (conformance, the plugin listing).
    #[error("{0}")]
    Check(String),
}

/// A source error of any kind, kept whole for [`std::error::Error::source`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

impl From<sheaf_core::Error> for HostError {
    fn from(source: sheaf_core::Error) -> Self {
        HostError::Core { during: None, source }
    }
}

impl HostError {
    /// A failed read or write of `path`.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> HostError {
        HostError::Io { what: path.as_ref().display().to_string(), source }
    }

    /// A failed call to the operating system (a process, a socket, a signal): `what`
    /// says what was being done.
    pub fn os(what: impl std::fmt::Display, source: std::io::Error) -> HostError {
        HostError::Io { what: what.to_string(), source }
    }

    /// A failed write of the command's own output (standard output).
    pub fn output(source: std::io::Error) -> HostError {
        HostError::Io { what: "cannot write output".into(), source }
    }

    /// Something given that could not be read or parsed ([`HostError::Input`]).
    pub fn input(what: impl std::fmt::Display, source: impl Into<BoxError>) -> HostError {
        HostError::Input { what: what.to_string(), source: source.into() }
    }

    /// An output that could not be made ([`HostError::Encode`]).
    pub fn encode(what: impl std::fmt::Display, source: impl Into<BoxError>) -> HostError {
        HostError::Encode { what: what.to_string(), source: source.into() }
    }

    /// The process exit code ([`exit`]).
    pub fn exit_code(&self) -> u8 {
        match self {
            HostError::Usage(_)
            | HostError::Job(_)
            | HostError::Missing { .. }
            | HostError::Data(_)
            | HostError::Input { .. } => exit::USAGE,
            HostError::Component { source: sheaf_core::Error::InvalidConfig { .. }, .. }
            | HostError::Core { source: sheaf_core::Error::InvalidConfig { .. }, .. } => exit::USAGE,
            HostError::Preempted { .. } => exit::PREEMPTED,
            HostError::Stopped { signal, .. } => {
                exit::SIGNALLED.saturating_add((*signal).clamp(0, 127) as u8)
            }
            _ => exit::FAILED,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{exit, HostError};

    /// Each kind of failure gives the code `sheaf --help` promises.
    #[test]
    fn exit_codes_follow_the_kind_of_failure() {
        let io = || std::io::Error::other("disk full");
        assert_eq!(HostError::Usage("x".into()).exit_code(), exit::USAGE);
        assert_eq!(HostError::Job("x".into()).exit_code(), exit::USAGE);
        assert_eq!(HostError::Data("x".into()).exit_code(), exit::USAGE);
        assert_eq!(HostError::output(io()).exit_code(), exit::FAILED);
        assert_eq!(HostError::io("/x", io()).exit_code(), exit::FAILED);
        assert_eq!(HostError::Train { rank: 1, detail: "x".into() }.exit_code(), exit::FAILED);
        let failed = HostError::RankFailed { rank: 1, message: "x".into(), run_dir: "/r".into() };
        assert_eq!(failed.exit_code(), exit::FAILED);
        assert!(failed.to_string().contains("--resume /r"), "{failed}");
        let stopped = |signal| HostError::Stopped { signal, run_dir: "/r".into() };
        assert_eq!(stopped(15).exit_code(), 143);
        assert_eq!(stopped(2).exit_code(), 130);
        let preempted = HostError::Preempted { step: Some(7), run_dir: "/r".into() };
        assert_eq!(preempted.exit_code(), exit::PREEMPTED);
        assert!(
            preempted.to_string().contains("after step 7") && preempted.to_string().contains("--resume /r")
        );
        let refused = sheaf_core::Error::InvalidConfig { key: "lr".into(), detail: "negative".into() };
        let component = HostError::Component { plugin: "p".into(), file: "/p.so".into(), source: refused };
        assert_eq!(component.exit_code(), exit::USAGE);
        let core =
            HostError::Core { during: Some("measuring"), source: sheaf_core::Error::Unsupported("x".into()) };
        assert_eq!(core.exit_code(), exit::FAILED);
        assert!(core.to_string().starts_with("measuring: "), "{core}");
        let refused = sheaf_core::Error::InvalidConfig { key: "n_head".into(), detail: "odd".into() };
        assert_eq!(HostError::Core { during: None, source: refused }.exit_code(), exit::USAGE);
    }

    /// What was given and could not be read is the user's to fix (exit 2); an output
    /// that could not be made is a failed run (exit 1). Both keep their source error
    /// for `Error::source`, and print it on one line after what they name.
    #[test]
    fn inputs_and_outputs_keep_their_source() {
        use std::error::Error as _;
        let parse = "1.5x".parse::<f64>().unwrap_err();
        let input = HostError::input("job.toml: key `lr`", parse.clone());
        assert_eq!(input.exit_code(), exit::USAGE);
        assert_eq!(input.to_string(), format!("job.toml: key `lr`: {parse}"));
        let source = input.source().expect("the parser's error is kept");
        assert_eq!(source.downcast_ref::<std::num::ParseFloatError>(), Some(&parse));
        let encode = HostError::encode("loss.svg", "no room\n".to_string());
        assert_eq!(encode.exit_code(), exit::FAILED);
        assert_eq!(encode.to_string(), "loss.svg: no room");
        let os = HostError::os("cannot start rank 3", std::io::Error::other("EAGAIN"));
        assert_eq!((os.exit_code(), os.to_string().as_str()), (exit::FAILED, "cannot start rank 3: EAGAIN"));
    }
}
