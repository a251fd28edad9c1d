//! The plugin ABI: an FFI-safe mirror of `sheaf-core`'s traits, built on abi_stable.
//!
//! Two layers, as in abi_stable's own examples: idiomatic traits live in `sheaf-core`;
//! this crate mirrors them as `#[sabi_trait]` objects and `StableAbi` data, and holds
//! the adapters both ways. A plugin implements the core traits and calls
//! [`export_plugin!`]; the host loads it and gets core trait objects back. Nothing
//! else in Sheaf names abi_stable.
//!
//! The crate's version is the ABI version ([`ABI_VERSION`]). A host loads a plugin
//! only when their ABI versions agree up to the patch number (see ARCHITECTURE.md).
//! Every entry point catches panics and returns them as errors naming the plugin;
//! nothing unwinds across the boundary.

mod adapters;
mod error;
mod module;
mod traits;

pub use adapters::{from_abi, to_abi};
pub use error::AbiError;
pub use module::{
    abi_version_compatible, root_module, AbiProvided, Manifest, Plugin, PluginMod, PluginModRef,
};
pub use traits::{
    AbiBatch, AbiBlock, AbiBuf, AbiEval, AbiLossGrad, AbiModelInfo, AbiModelSpec, AbiNamedValue,
    AbiOptimState, AbiParam, AbiParamSpec, AbiPiece, AbiPieceLayout, AbiPlanInput, AbiRange, AbiSamples,
    AbiShardSource, AbiStrategyPlan, AbiTrainConfig, AbiTrainContext, CommunicatorAbi, CommunicatorBox,
    ComputeAbi, ComputeBox, DataPartitionerAbi, DataPartitionerBox, DatasetAbi, LinkAbi, LinkBox,
    MetricsSinkAbi, ModelAbi, ModelBox, ModelPartitionerAbi, ModelPartitionerBox, OptimizerAbi, OptimizerBox,
    StrategyAbi, StrategyBox, BATCH_ROWS, BATCH_TOKENS, RECV_COPY,
};

#[doc(hidden)]
pub mod __private {
    pub use abi_stable;
}

/// The plugin ABI version this copy of the crate speaks.
pub const ABI_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Exports `$plugin` (a type implementing [`Plugin`]) as this library's root module.
///
/// The plugin crate must be a `cdylib` and list `abi_stable` among its dependencies
/// (the export attribute names it by absolute path); its code never uses it.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        #[::abi_stable::export_root_module]
        pub fn sheaf_plugin_root_module() -> $crate::PluginModRef {
            $crate::root_module::<$plugin>()
        }
    };
}
