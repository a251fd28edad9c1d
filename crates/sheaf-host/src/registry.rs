//! The set of loaded plugins, and the factories that build components from them.

use std::path::PathBuf;

use abi_stable::std_types::RStr;
use serde::Serialize;
use sheaf_abi::from_abi;
use sheaf_core::{ComputeBackend, DataPartitioner, Link, ModelPartitioner, Optimizer, PluginKind, Strategy};

use crate::{candidates, load_plugin, LoadError, LoadedPlugin, SearchDir};

/// Failures of the host.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    #[error(
        "no loaded plugin provides {kind} `{name}` (available {kind}s: {available}); searched {searched}"
    )]
    Missing { kind: PluginKind, name: String, available: String, searched: String },
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
    /// settings included), 1 for anything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            HostError::Usage(_) | HostError::Job(_) => 2,
            HostError::Component { source: sheaf_core::Error::InvalidConfig { .. }, .. } => 2,
            _ => 1,
        }
    }
}

/// One row of `sheaf plugins`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PluginInfo {
    pub file: String,
    pub name: Option<String>,
    pub kinds: Vec<String>,
    pub provides: Vec<String>,
    pub version: Option<String>,
    pub abi_version: Option<String>,
    pub ok: bool,
    pub error: Option<String>,
}

/// Every library found on the search path: those that loaded, and why the others did not.
#[derive(Debug, Default)]
pub struct Registry {
    pub loaded: Vec<LoadedPlugin>,
    pub failed: Vec<(PathBuf, LoadError)>,
    searched: Vec<SearchDir>,
}

impl Registry {
    /// Loads every candidate library in `dirs`; one that fails is recorded, never fatal.
    pub fn load(dirs: &[SearchDir]) -> Registry {
        Registry::load_files(candidates(dirs), dirs)
    }

    /// Loads exactly `files` (`searched` only names where they came from in errors).
    pub fn load_files(files: Vec<PathBuf>, searched: &[SearchDir]) -> Registry {
        let mut registry = Registry { searched: searched.to_vec(), ..Registry::default() };
        for file in files {
            match load_plugin(&file) {
                Ok(p) => {
                    tracing::debug!("loaded plugin {} from {}", p.manifest.name, file.display());
                    registry.loaded.push(p);
                }
                Err(e) => {
                    tracing::debug!("{e}");
                    registry.failed.push((file, e));
                }
            }
        }
        registry
    }

    /// One row per library, loaded ones first, in search order.
    pub fn listing(&self) -> Vec<PluginInfo> {
        let ok = self.loaded.iter().map(|p| PluginInfo {
            file: p.file.display().to_string(),
            name: Some(p.manifest.name.clone()),
            kinds: p.manifest.kinds().iter().map(|k| k.name().to_owned()).collect(),
            provides: p.manifest.provides.iter().map(|x| format!("{}:{}", x.kind, x.name)).collect(),
            version: Some(p.manifest.version.clone()),
            abi_version: Some(p.manifest.abi_version.clone()),
            ok: true,
            error: None,
        });
        let failed = self.failed.iter().map(|(file, e)| PluginInfo {
            file: file.display().to_string(),
            name: None,
            kinds: vec![],
            provides: vec![],
            version: None,
            abi_version: match e {
                LoadError::AbiMismatch { plugin, .. } => Some(plugin.clone()),
                LoadError::Layout { version, .. } => Some(version.clone()),
                _ => None,
            },
            ok: false,
            error: Some(e.to_string()),
        });
        ok.chain(failed).collect()
    }

    /// Everything the loaded plugins provide, in search order.
    pub fn provided(&self) -> Vec<sheaf_core::Provided> {
        self.loaded.iter().flat_map(|p| p.manifest.provides.iter().cloned()).collect()
    }

    /// The first loaded plugin providing `kind` `name`.
    pub fn provider(&self, kind: PluginKind, name: &str) -> Result<&LoadedPlugin, HostError> {
        self.loaded.iter().find(|p| p.manifest.provides(kind, name)).ok_or_else(|| {
            let mut available: Vec<String> = self
                .loaded
                .iter()
                .flat_map(|p| p.manifest.provides.iter())
                .filter(|x| x.kind == kind)
                .map(|x| x.name.clone())
                .collect();
            available.dedup();
            HostError::Missing {
                kind,
                name: name.to_owned(),
                available: if available.is_empty() { "none".into() } else { available.join(", ") },
                searched: self
                    .searched
                    .iter()
                    .map(|d| d.path.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            }
        })
    }

    fn component<T>(
        &self,
        kind: PluginKind,
        name: &str,
        build: impl FnOnce(&LoadedPlugin) -> Result<T, sheaf_core::Error>,
    ) -> Result<T, HostError> {
        let plugin = self.provider(kind, name)?;
        build(plugin).map_err(|source| HostError::Component {
            plugin: plugin.manifest.name.clone(),
            file: plugin.file.clone(),
            source,
        })
    }

    pub fn optimizer(&self, name: &str, config_json: &str) -> Result<Box<dyn Optimizer>, HostError> {
        self.component(PluginKind::Optimizer, name, |p| {
            let b = (p.rust()?.new_optimizer())(RStr::from_str(name), RStr::from_str(config_json))
                .into_result()?;
            from_abi::optimizer(b)
        })
    }

    pub fn data_partitioner(
        &self,
        name: &str,
        config_json: &str,
    ) -> Result<Box<dyn DataPartitioner>, HostError> {
        self.component(PluginKind::DataPartitioner, name, |p| {
            let b = (p.rust()?.new_data_partitioner())(RStr::from_str(name), RStr::from_str(config_json))
                .into_result()?;
            Ok(from_abi::data_partitioner(b))
        })
    }

    pub fn model_partitioner(
        &self,
        name: &str,
        config_json: &str,
    ) -> Result<Box<dyn ModelPartitioner>, HostError> {
        self.component(PluginKind::ModelPartitioner, name, |p| {
            let b = (p.rust()?.new_model_partitioner())(RStr::from_str(name), RStr::from_str(config_json))
                .into_result()?;
            Ok(from_abi::model_partitioner(b))
        })
    }

    pub fn compute(&self, name: &str, config_json: &str) -> Result<Box<dyn ComputeBackend>, HostError> {
        self.component(PluginKind::Compute, name, |p| {
            let b =
                (p.rust()?.new_compute())(RStr::from_str(name), RStr::from_str(config_json)).into_result()?;
            from_abi::compute(b)
        })
    }

    pub fn strategy(&self, name: &str, config_json: &str) -> Result<Box<dyn Strategy>, HostError> {
        self.component(PluginKind::Strategy, name, |p| {
            let b = (p.rust()?.new_strategy())(RStr::from_str(name), RStr::from_str(config_json))
                .into_result()?;
            from_abi::strategy(b)
        })
    }

    pub fn link(&self, name: &str, config_json: &str) -> Result<Box<dyn Link>, HostError> {
        self.component(PluginKind::Transport, name, |p| match &p.module {
            crate::loader::Module::CTransport(c) => c.link(config_json),
            crate::loader::Module::Rust(m) => {
                let b = (m.new_link())(RStr::from_str(name), RStr::from_str(config_json)).into_result()?;
                from_abi::link(b)
            }
        })
    }
}
