//! The plugin ABI: an FFI-safe mirror of `sheaf-core`'s traits, built on abi_stable.
//!
//! Two layers, as in abi_stable's own examples: idiomatic traits live in `sheaf-core`;
//! this crate mirrors them as `#[sabi_trait]` objects and `StableAbi` data, and holds
//! the adapters both ways. A plugin implements the core traits and calls
//! [`export_plugin!`]; the host loads it and gets core trait objects back. Nothing
//! else in Sheaf names abi_stable.
//!
//! The crate's version is the ABI version ([`ABI_VERSION`]). A host loads every plugin
//! of its major version: within 1.x, a minor release only appends (a trait method
//! with a default, a factory after the root module's prefix), so a plugin built before
//! an appended method loads and gets the default, and one built after loads into an
//! older host that never calls what it added (see ARCHITECTURE.md, "ABI versioning").
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
    AbiBatch, AbiBlock, AbiBuf, AbiEval, AbiHfLayout, AbiHfTensor, AbiLossGrad, AbiModelInfo, AbiModelSpec,
    AbiNamedValue, AbiOptimState, AbiParam, AbiParamShard, AbiParamSpec, AbiPiece, AbiPieceLayout,
    AbiPlanInput, AbiRange, AbiSamples, AbiShardSource, AbiStateViews, AbiStrategyPlan, AbiTrainConfig,
    AbiTrainContext, CheckpointSinkAbi, CommunicatorAbi, CommunicatorBox, ComputeAbi, ComputeBox,
    DataPartitionerAbi, DataPartitionerBox, DatasetAbi, LinkAbi, LinkBox, MetricsSinkAbi, ModelAbi, ModelBox,
    ModelPartitionerAbi, ModelPartitionerBox, OptimizerAbi, OptimizerBox, StrategyAbi, StrategyBox,
    BATCH_ROWS, BATCH_TOKENS, RECV_COPY,
};

#[doc(hidden)]
pub mod __private {
    pub use abi_stable;
}

/// The plugin ABI version this copy of the crate speaks.
pub const ABI_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The symbol of a plugin's build facts ([`export_plugin!`]): a C function returning a
/// NUL-terminated JSON object, `{"panic": "unwind"}` or `{"panic": "abort"}`, read by
/// the host before the root module. Outside the abi_stable layout, so it changes no
/// ABI type; a library without it (built before it existed) is loaded as before.
pub const BUILD_INFO_SYMBOL: &str = "sheaf_plugin_build_info";

/// Exports `$plugin` (a type implementing [`Plugin`]) as this library's root module,
/// and the plugin's build facts ([`BUILD_INFO_SYMBOL`]): the host refuses a plugin
/// built with `panic = "abort"`, where a panic would kill the process instead of
/// becoming an error.
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

        /// This library's build facts, as JSON (`sheaf_abi::BUILD_INFO_SYMBOL`).
        #[no_mangle]
        pub extern "C" fn sheaf_plugin_build_info() -> *const ::std::ffi::c_char {
            // Evaluated where the macro expands: the plugin crate's own panic strategy.
            const INFO: &::std::ffi::CStr =
                if cfg!(panic = "abort") { c"{\"panic\":\"abort\"}" } else { c"{\"panic\":\"unwind\"}" };
            INFO.as_ptr()
        }
    };
}
