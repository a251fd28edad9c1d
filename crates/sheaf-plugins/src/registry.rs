//! The set of loaded plugins, and the factories that build components from them.

use std::path::PathBuf;

use serde::Serialize;
use sheaf_core::{
    ComputeBackend, DataPartitioner, Link, ModelPartitioner, Optimizer, PluginKind, Reach, Strategy,
    TransportInfo,
};

use crate::{candidates, load_plugin, HostError, LoadError, LoadedPlugin, SearchDir};

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
    /// Why a library was not even tried (its name), when it was not.
    pub skipped: Option<String>,
    /// Components this library provides that another loaded library provides too.
    pub conflicts: Vec<String>,
    /// What each transport it provides says of itself.
    pub transports: Vec<TransportRow>,
}

/// A transport as it describes itself (`sheaf plugins`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TransportRow {
    pub name: String,
    /// `host` or `network`.
    pub reach: String,
    pub preference: u32,
    pub resident_bytes_per_peer: Option<u64>,
    /// Why it could not say, when it could not.
    pub error: Option<String>,
}

/// Which library supplied a component of a run (`summary.json`'s `components`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ComponentSource {
    pub kind: String,
    pub name: String,
    pub plugin: String,
    pub file: String,
    pub version: String,
    pub abi_version: String,
}

/// Every library found on the search path: those that loaded, and why the others did not.
#[derive(Debug, Default)]
pub struct Registry {
    pub loaded: Vec<LoadedPlugin>,
    pub failed: Vec<(PathBuf, LoadError)>,
    /// Files in the search directories not tried, and why.
    pub skipped: Vec<(PathBuf, String)>,
    searched: Vec<SearchDir>,
    /// The job's choice of library for components several provide: (kind, name) to a
    /// plugin's name or file.
    choices: std::collections::BTreeMap<(PluginKind, String), String>,
    /// Every component built so far, and where from.
    used: std::sync::Mutex<Vec<ComponentSource>>,
}

impl Registry {
    /// Loads every candidate library in `dirs`; one that fails is recorded, never fatal.
    pub fn load(dirs: &[SearchDir]) -> Registry {
        let found = candidates(dirs);
        let mut registry = Registry::load_files(found.files, dirs);
        registry.skipped = found.skipped;
        registry
    }

    /// The job's `[plugins.<kind>] <name> = "<plugin>"` choices, for components more
    /// than one library provides.
    pub fn choose(
        &mut self,
        choices: &std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>>,
    ) {
        for (kind, names) in choices {
            // The job checked the kinds.
            let Some(kind) = PluginKind::from_name(kind) else { continue };
            for (name, plugin) in names {
                self.choices.insert((kind, name.clone()), plugin.clone());
            }
        }
    }

    /// Every component built so far and the library that supplied it.
    pub fn used(&self) -> Vec<ComponentSource> {
        self.used.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// `(kind:name, providers)` for every component more than one loaded library
    /// provides.
    pub fn conflicts(&self) -> Vec<(String, Vec<&LoadedPlugin>)> {
        let mut out: Vec<(String, Vec<&LoadedPlugin>)> = Vec::new();
        for p in &self.loaded {
            for x in &p.manifest.provides {
                let key = format!("{}:{}", x.kind, x.name);
                match out.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, ps)) => ps.push(p),
                    None => out.push((key, vec![p])),
                }
            }
        }
        out.retain(|(_, ps)| ps.len() > 1);
        out
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
        let conflicts = self.conflicts();
        let ok = self.loaded.iter().map(|p| PluginInfo {
            file: p.file.display().to_string(),
            name: Some(p.manifest.name.clone()),
            kinds: p.manifest.kinds().iter().map(|k| k.name().to_owned()).collect(),
            provides: p.manifest.provides.iter().map(|x| format!("{}:{}", x.kind, x.name)).collect(),
            version: Some(p.manifest.version.clone()),
            abi_version: Some(p.manifest.abi_version.clone()),
            ok: true,
            error: None,
            skipped: None,
            conflicts: conflicts
                .iter()
                .filter(|(_, ps)| ps.iter().any(|q| q.file == p.file))
                .map(|(key, ps)| {
                    let others: Vec<String> = ps
                        .iter()
                        .filter(|q| q.file != p.file)
                        .map(|q| q.file.display().to_string())
                        .collect();
                    format!("{key} also in {}", others.join(", "))
                })
                .collect(),
            transports: p
                .manifest
                .provides
                .iter()
                .filter(|x| x.kind == PluginKind::Transport)
                .map(|x| match p.transport_info(&x.name) {
                    Ok(info) => TransportRow {
                        name: x.name.clone(),
                        reach: if info.reach == Reach::Host { "host" } else { "network" }.into(),
                        preference: info.preference,
                        resident_bytes_per_peer: info.resident_bytes_per_peer,
                        error: None,
                    },
                    Err(e) => TransportRow {
                        name: x.name.clone(),
                        reach: String::new(),
                        preference: 0,
                        resident_bytes_per_peer: None,
                        error: Some(e.to_string()),
                    },
                })
                .collect(),
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
            skipped: None,
            conflicts: vec![],
            transports: vec![],
        });
        let skipped = self.skipped.iter().map(|(file, why)| PluginInfo {
            file: file.display().to_string(),
            name: None,
            kinds: vec![],
            provides: vec![],
            version: None,
            abi_version: None,
            ok: false,
            error: None,
            skipped: Some(why.clone()),
            conflicts: vec![],
            transports: vec![],
        });
        ok.chain(failed).chain(skipped).collect()
    }

    /// Everything the loaded plugins provide, in search order.
    pub fn provided(&self) -> Vec<sheaf_core::Provided> {
        self.loaded.iter().flat_map(|p| p.manifest.provides.iter().cloned()).collect()
    }

    /// The loaded plugin providing `kind` `name`: the only one, or the one the job
    /// chose; an error naming every provider when several do and the job chose none,
    /// and naming the libraries that failed to load or were skipped when none does.
    pub fn provider(&self, kind: PluginKind, name: &str) -> Result<&LoadedPlugin, HostError> {
        let providers: Vec<&LoadedPlugin> =
            self.loaded.iter().filter(|p| p.manifest.provides(kind, name)).collect();
        let describe = |ps: &[&LoadedPlugin]| {
            ps.iter()
                .map(|p| format!("{} ({})", p.manifest.name, p.file.display()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if let Some(choice) = self.choices.get(&(kind, name.to_owned())) {
            let chosen = providers.iter().find(|p| {
                p.manifest.name == *choice
                    || p.file.file_name().is_some_and(|f| f.to_string_lossy() == choice.as_str())
                    || p.file.display().to_string() == *choice
            });
            return chosen.copied().ok_or_else(|| {
                HostError::Job(format!(
                    "[plugins.{kind}] {name} = \"{choice}\": no loaded library by that name or file provides it \
                     (providers: {})",
                    if providers.is_empty() { "none".into() } else { describe(&providers) }
                ))
            });
        }
        match providers.as_slice() {
            [one] => Ok(one),
            [] => {
                let mut available: Vec<String> = self
                    .loaded
                    .iter()
                    .flat_map(|p| p.manifest.provides.iter())
                    .filter(|x| x.kind == kind)
                    .map(|x| x.name.clone())
                    .collect();
                // In order, and each once though several libraries provide it.
                available.sort();
                available.dedup();
                let mut unusable: Vec<String> =
                    self.failed.iter().map(|(_, e)| format!("failed to load {e}")).collect();
                if !self.skipped.is_empty() {
                    let names: Vec<String> = self
                        .skipped
                        .iter()
                        .map(|(f, _)| f.file_name().unwrap_or_default().to_string_lossy().into_owned())
                        .collect();
                    unusable.push(format!("not tried (`sheaf plugins` says why): {}", names.join(", ")));
                }
                Err(HostError::Missing {
                    kind,
                    name: name.to_owned(),
                    available: if available.is_empty() { "none".into() } else { available.join(", ") },
                    searched: self
                        .searched
                        .iter()
                        .map(|d| d.path.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                    unusable: if unusable.is_empty() {
                        String::new()
                    } else {
                        format!("; libraries that could not be used: {}", unusable.join("; "))
                    },
                })
            }
            several => {
                Err(HostError::Ambiguous { kind, name: name.to_owned(), providers: describe(several) })
            }
        }
    }

    fn component<T>(
        &self,
        kind: PluginKind,
        name: &str,
        build: impl FnOnce(&LoadedPlugin) -> Result<T, sheaf_core::Error>,
    ) -> Result<T, HostError> {
        let plugin = self.provider(kind, name)?;
        let built = build(plugin).map_err(|source| HostError::Component {
            plugin: plugin.manifest.name.clone(),
            file: plugin.file.clone(),
            source,
        })?;
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        if !used.iter().any(|u| u.kind == kind.name() && u.name == name) {
            used.push(ComponentSource {
                kind: kind.name().into(),
                name: name.into(),
                plugin: plugin.manifest.name.clone(),
                file: plugin.file.display().to_string(),
                version: plugin.manifest.version.clone(),
                abi_version: plugin.manifest.abi_version.clone(),
            });
        }
        Ok(built)
    }

    pub fn optimizer(&self, name: &str, config_json: &str) -> Result<Box<dyn Optimizer>, HostError> {
        self.component(PluginKind::Optimizer, name, |p| p.optimizer(name, config_json))
    }

    pub fn data_partitioner(
        &self,
        name: &str,
        config_json: &str,
    ) -> Result<Box<dyn DataPartitioner>, HostError> {
        self.component(PluginKind::DataPartitioner, name, |p| p.data_partitioner(name, config_json))
    }

    pub fn model_partitioner(
        &self,
        name: &str,
        config_json: &str,
    ) -> Result<Box<dyn ModelPartitioner>, HostError> {
        self.component(PluginKind::ModelPartitioner, name, |p| p.model_partitioner(name, config_json))
    }

    /// The compute backend that builds model kind `kind`: the compute component of the
    /// library providing the kind (the only one, or the one the job chose under
    /// `[plugins.model]`). An error names every library when several provide the kind
    /// and the job chose none, and when the library has no compute backend or several.
    pub fn compute_for_kind(&self, kind: &str) -> Result<String, HostError> {
        let library = match self.provider(PluginKind::Model, kind) {
            Err(HostError::Missing { available, searched, unusable, .. }) => {
                return Err(HostError::Job(format!(
                    "key `model.kind`: unknown model kind `{kind}` (kinds loaded: {available}); searched \
                     {searched}{unusable}"
                )));
            }
            found => found?,
        };
        let computes: Vec<&str> = library
            .manifest
            .provides
            .iter()
            .filter(|p| p.kind == PluginKind::Compute)
            .map(|p| p.name.as_str())
            .collect();
        match computes.as_slice() {
            [one] => Ok((*one).to_string()),
            _ => Err(HostError::Job(format!(
                "key `compute.backend`: `auto` takes the compute backend of the library providing model kind \
                 `{kind}`, {} ({}), which provides {}: name one",
                library.manifest.name,
                library.file.display(),
                if computes.is_empty() { "none".to_string() } else { computes.join(", ") }
            ))),
        }
    }

    pub fn compute(&self, name: &str, config_json: &str) -> Result<Box<dyn ComputeBackend>, HostError> {
        self.component(PluginKind::Compute, name, |p| p.compute(name, config_json))
    }

    pub fn strategy(&self, name: &str, config_json: &str) -> Result<Box<dyn Strategy>, HostError> {
        self.component(PluginKind::Strategy, name, |p| p.strategy(name, config_json))
    }

    pub fn link(&self, name: &str, config_json: &str) -> Result<Box<dyn Link>, HostError> {
        self.component(PluginKind::Transport, name, |p| p.link(name, config_json))
    }

    /// What transport `name` says of itself (its reach, resident buffers, preference).
    pub fn transport_info(&self, name: &str) -> Result<TransportInfo, HostError> {
        let plugin = self.provider(PluginKind::Transport, name)?;
        plugin.transport_info(name).map_err(|source| HostError::Component {
            plugin: plugin.manifest.name.clone(),
            file: plugin.file.clone(),
            source,
        })
    }

    /// The transport `auto` connects over at `reach`: of those the loaded plugins
    /// provide and can say which is theirs, the one of that reach they prefer most (by
    /// name between equals). Fails naming what is loaded when none has that reach.
    pub fn preferred_transport(&self, reach: Reach) -> Result<String, HostError> {
        let mut names: Vec<String> =
            self.provided().into_iter().filter(|p| p.kind == PluginKind::Transport).map(|p| p.name).collect();
        names.sort();
        names.dedup();
        let said: Vec<(String, TransportInfo)> =
            names.iter().filter_map(|n| Some((n.clone(), self.transport_info(n).ok()?))).collect();
        preferred(&said, reach).ok_or_else(|| {
            let what = match reach {
                Reach::Host => "host",
                _ => "network",
            };
            HostError::Job(format!(
                "key `transport.plugin`: `auto` needs a transport of {what} reach, and the loaded plugins \
                 provide none (transports: {})",
                if names.is_empty() { "none".to_string() } else { names.join(", ") }
            ))
        })
    }
}

/// Of `transports`, the name of the most preferred of `reach` (the first by name
/// between equals).
pub fn preferred(transports: &[(String, TransportInfo)], reach: Reach) -> Option<String> {
    transports
        .iter()
        .filter(|(_, info)| info.reach == reach)
        .min_by(|(a, x), (b, y)| y.preference.cmp(&x.preference).then(a.cmp(b)))
        .map(|(name, _)| name.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `auto`'s choice at a reach: the most preferred transport of that reach, by name
    /// between equals, none when no transport has it; a transport that says nothing
    /// (network, preference 0) never wins over one that says more.
    #[test]
    fn the_preferred_transport_of_a_reach_is_chosen() {
        let t = |name: &str, info: TransportInfo| (name.to_string(), info);
        let all = [
            t("zmq-ipc", TransportInfo::host().with_preference(50)),
            t("unix-c", TransportInfo::network()),
            t("shm", TransportInfo::host().with_preference(100).with_resident_bytes_per_peer(4 << 20)),
            t("zmq-tcp", TransportInfo::network().with_preference(10)),
            t("b-net", TransportInfo::network().with_preference(10)),
        ];
        assert_eq!(preferred(&all, Reach::Host).as_deref(), Some("shm"));
        assert_eq!(preferred(&all, Reach::Network).as_deref(), Some("b-net"), "equals go by name");
        assert_eq!(preferred(&all[..2], Reach::Host).as_deref(), Some("zmq-ipc"));
        assert_eq!(preferred(&all[..1], Reach::Network), None);
        assert_eq!(preferred(&[], Reach::Host), None);
    }
}
