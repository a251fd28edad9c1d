//! What a plugin can provide, as plain data.

use std::fmt;

/// A kind of component a plugin library provides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum PluginKind {
    Optimizer,
    DataPartitioner,
    ModelPartitioner,
    Transport,
    Compute,
    Strategy,
    /// A model kind a compute plugin builds (`mlp`, `gpt`).
    Model,
}

impl PluginKind {
    pub const ALL: [PluginKind; 7] = [
        PluginKind::Optimizer,
        PluginKind::DataPartitioner,
        PluginKind::ModelPartitioner,
        PluginKind::Transport,
        PluginKind::Compute,
        PluginKind::Strategy,
        PluginKind::Model,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PluginKind::Optimizer => "optimizer",
            PluginKind::DataPartitioner => "data-partitioner",
            PluginKind::ModelPartitioner => "model-partitioner",
            PluginKind::Transport => "transport",
            PluginKind::Compute => "compute",
            PluginKind::Strategy => "strategy",
            PluginKind::Model => "model",
        }
    }

    pub fn from_name(name: &str) -> Option<PluginKind> {
        PluginKind::ALL.into_iter().find(|k| k.name() == name)
    }
}

impl fmt::Display for PluginKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One named implementation a plugin provides, e.g. `(Optimizer, "adamw")`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Provided {
    pub kind: PluginKind,
    pub name: String,
}
