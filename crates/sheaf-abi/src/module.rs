//! The root module every plugin library exports, and the [`Plugin`] trait a plugin
//! implements to fill it.

use abi_stable::library::RootModule;
use abi_stable::prefix_type::PrefixTypeTrait;
use abi_stable::sabi_types::VersionStrings;
use abi_stable::std_types::{RResult, RStr, RString, RVec};
use abi_stable::StableAbi;
use sheaf_core::{
    ComputeBackend, DataPartitioner, Error, Link, ModelPartitioner, Optimizer, PluginKind, Provided, Result,
    Strategy, TransportInfo,
};

use crate::adapters::{guard, to_abi};
use crate::{
    AbiError, ComputeBox, DataPartitionerBox, LinkBox, ModelPartitionerBox, OptimizerBox, StrategyBox,
};

/// What a plugin library says about itself.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct Manifest {
    pub name: RString,
    pub version: RString,
    pub abi_version: RString,
    pub provides: RVec<AbiProvided>,
}

/// One implementation a plugin provides: a kind (`"optimizer"`) and a name (`"sgd"`).
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct AbiProvided {
    pub kind: RString,
    pub name: RString,
}

/// The root module: a manifest and one factory per kind. Configuration crosses as a
/// JSON string, so new settings never change the layout. Prefix type: 1.0's fields
/// are its prefix, which every 1.x plugin has; a factory added in a minor release is
/// appended after it, and a host reading a plugin built before it finds it missing.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
#[sabi(missing_field(panic))]
pub struct PluginMod {
    pub manifest: extern "C" fn() -> RResult<Manifest, AbiError>,
    pub new_optimizer: extern "C" fn(RStr<'_>, RStr<'_>) -> RResult<OptimizerBox, AbiError>,
    pub new_data_partitioner: extern "C" fn(RStr<'_>, RStr<'_>) -> RResult<DataPartitionerBox, AbiError>,
    pub new_model_partitioner: extern "C" fn(RStr<'_>, RStr<'_>) -> RResult<ModelPartitionerBox, AbiError>,
    pub new_link: extern "C" fn(RStr<'_>, RStr<'_>) -> RResult<LinkBox, AbiError>,
    pub new_compute: extern "C" fn(RStr<'_>, RStr<'_>) -> RResult<ComputeBox, AbiError>,
    #[sabi(last_prefix_field)]
    pub new_strategy: extern "C" fn(RStr<'_>, RStr<'_>) -> RResult<StrategyBox, AbiError>,
    /// (1.2.) What a transport the plugin provides says of itself
    /// ([`sheaf_core::TransportInfo::encode`]'s text); absent from a plugin built
    /// before 1.2, whose transports the host takes as network reach.
    #[sabi(missing_field(option))]
    pub transport_info: extern "C" fn(RStr<'_>) -> RResult<RString, AbiError>,
}

impl RootModule for PluginModRef {
    abi_stable::declare_root_module_statics! {PluginModRef}
    const BASE_NAME: &'static str = "sheaf_plugin";
    const NAME: &'static str = "sheaf plugin";
    const VERSION_STRINGS: VersionStrings = abi_stable::package_version_strings!();
}

/// Whether a plugin built against ABI `plugin` may be loaded by a host speaking ABI
/// `host`: the same major version, whatever the minors (from 1.0, minors only append
/// methods with defaults and factories, which abi_stable's prefix types let either side
/// lack; see ARCHITECTURE.md, "ABI versioning"). Before 1.0 every minor was a major.
pub fn abi_version_compatible(host: &str, plugin: &str) -> bool {
    fn major_minor(v: &str) -> Option<(u64, u64)> {
        let mut parts = v.trim().split('.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        Some((major, minor))
    }
    match (major_minor(host), major_minor(plugin)) {
        (Some((0, h)), Some((0, p))) => h == p,
        (Some((h, _)), Some((p, _))) => h == p,
        _ => false,
    }
}

/// What a plugin implements. Every factory has a default that says the plugin does
/// not provide that kind; the export glue catches panics in all of them.
pub trait Plugin: 'static {
    /// The plugin's name, as `sheaf plugins` lists it.
    const NAME: &'static str;
    /// The plugin's own version (its crate version).
    const VERSION: &'static str;

    fn provides() -> Vec<Provided>;

    fn optimizer(name: &str, config: &str) -> Result<Box<dyn Optimizer>> {
        let _ = config;
        Err(unsupported::<Self>(PluginKind::Optimizer, name))
    }

    fn data_partitioner(name: &str, config: &str) -> Result<Box<dyn DataPartitioner>> {
        let _ = config;
        Err(unsupported::<Self>(PluginKind::DataPartitioner, name))
    }

    fn model_partitioner(name: &str, config: &str) -> Result<Box<dyn ModelPartitioner>> {
        let _ = config;
        Err(unsupported::<Self>(PluginKind::ModelPartitioner, name))
    }

    /// A transport's link for this process; `config` carries the rank, the world
    /// size and the rendezvous address.
    fn link(name: &str, config: &str) -> Result<Box<dyn Link>> {
        let _ = config;
        Err(unsupported::<Self>(PluginKind::Transport, name))
    }

    fn compute(name: &str, config: &str) -> Result<Box<dyn ComputeBackend>> {
        let _ = config;
        Err(unsupported::<Self>(PluginKind::Compute, name))
    }

    fn strategy(name: &str, config: &str) -> Result<Box<dyn Strategy>> {
        let _ = config;
        Err(unsupported::<Self>(PluginKind::Strategy, name))
    }

    /// (1.2.) What transport `name` says of itself before it connects: its reach, the
    /// buffers it keeps resident, its preference among those of its reach. The default,
    /// for a plugin that says nothing: network reach.
    fn transport_info(name: &str) -> Result<TransportInfo> {
        let _ = name;
        Ok(TransportInfo::network())
    }
}

fn unsupported<P: Plugin + ?Sized>(kind: PluginKind, name: &str) -> Error {
    Error::Unsupported(format!("plugin `{}` provides no {kind} named `{name}`", P::NAME))
}

extern "C" fn manifest<P: Plugin>() -> RResult<Manifest, AbiError> {
    guard(P::NAME, "manifest", || {
        Ok(Manifest {
            name: P::NAME.into(),
            version: P::VERSION.into(),
            abi_version: crate::ABI_VERSION.into(),
            provides: P::provides()
                .into_iter()
                .map(|p| AbiProvided { kind: p.kind.name().into(), name: p.name.into() })
                .collect(),
        })
    })
}

extern "C" fn new_optimizer<P: Plugin>(name: RStr<'_>, config: RStr<'_>) -> RResult<OptimizerBox, AbiError> {
    guard(P::NAME, "new_optimizer", || {
        Ok(to_abi::optimizer(P::NAME, P::optimizer(name.as_str(), config.as_str())?))
    })
}

extern "C" fn new_data_partitioner<P: Plugin>(
    name: RStr<'_>,
    config: RStr<'_>,
) -> RResult<DataPartitionerBox, AbiError> {
    guard(P::NAME, "new_data_partitioner", || {
        Ok(to_abi::data_partitioner(P::NAME, P::data_partitioner(name.as_str(), config.as_str())?))
    })
}

extern "C" fn new_model_partitioner<P: Plugin>(
    name: RStr<'_>,
    config: RStr<'_>,
) -> RResult<ModelPartitionerBox, AbiError> {
    guard(P::NAME, "new_model_partitioner", || {
        Ok(to_abi::model_partitioner(P::NAME, P::model_partitioner(name.as_str(), config.as_str())?))
    })
}

extern "C" fn new_link<P: Plugin>(name: RStr<'_>, config: RStr<'_>) -> RResult<LinkBox, AbiError> {
    guard(P::NAME, "new_link", || Ok(to_abi::link(P::NAME, P::link(name.as_str(), config.as_str())?)))
}

extern "C" fn new_compute<P: Plugin>(name: RStr<'_>, config: RStr<'_>) -> RResult<ComputeBox, AbiError> {
    guard(P::NAME, "new_compute", || {
        Ok(to_abi::compute(P::NAME, P::compute(name.as_str(), config.as_str())?))
    })
}

extern "C" fn new_strategy<P: Plugin>(name: RStr<'_>, config: RStr<'_>) -> RResult<StrategyBox, AbiError> {
    guard(P::NAME, "new_strategy", || {
        Ok(to_abi::strategy(P::NAME, P::strategy(name.as_str(), config.as_str())?))
    })
}

extern "C" fn transport_info<P: Plugin>(name: RStr<'_>) -> RResult<RString, AbiError> {
    guard(P::NAME, "transport_info", || Ok(P::transport_info(name.as_str())?.encode().into()))
}

/// The root module for plugin `P`; called by [`crate::export_plugin!`].
pub fn root_module<P: Plugin>() -> PluginModRef {
    PluginMod {
        manifest: manifest::<P>,
        new_optimizer: new_optimizer::<P>,
        new_data_partitioner: new_data_partitioner::<P>,
        new_model_partitioner: new_model_partitioner::<P>,
        new_link: new_link::<P>,
        new_compute: new_compute::<P>,
        new_strategy: new_strategy::<P>,
        transport_info: transport_info::<P>,
    }
    .leak_into_prefix()
}
