//! The host's failures, and the exit code each gives the `sheaf` command.

use std::path::PathBuf;

use sheaf_core::PluginKind;

use crate::LoadError;

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
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Job(String),
    #[error("{0}")]
    Data(String),
    #[error("{0}")]
    Output(String),
    #[error("{0}")]
    Core(String),
    #[error("rank {rank}: {detail}")]
    Train { rank: usize, detail: String },
    #[error("{0}")]
    Launch(String),
    #[error("{0}")]
    Check(String),
}

impl HostError {
    /// The process exit code: 2 for a bad command line or job (a plugin refusing its
    /// settings, a component no plugin provides and a dataset that cannot be read
    /// included), 1 for anything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            HostError::Usage(_) | HostError::Job(_) | HostError::Missing { .. } | HostError::Data(_) => 2,
            HostError::Component { source: sheaf_core::Error::InvalidConfig { .. }, .. } => 2,
            _ => 1,
        }
    }
}
