//! Plugin ABI 0.9, frozen as released (see ARCHITECTURE.md, "ABI versioning"): the
//! FFI-safe mirror of `sheaf-core`'s traits that plugins built for Sheaf's 0.9 hosts
//! speak. Today's host loads such a plugin through these types, so abi_stable checks
//! its layout against exactly the types it was built with, and these adapters turn its
//! objects into today's core traits. Its types never change; only the adapter glue is
//! kept compiling against today's `sheaf-core`.
//!
//! What 0.9 cannot carry, today's traits default: a 0.9 model has no units to run
//! fully sharded (`Model::units` is empty), a 0.9 compute backend builds no shards,
//! and a 0.9 strategy plans no sharded parameters.

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
    AbiShardSource, AbiStrategyPlan, AbiTrainConfig, AbiTrainContext, CheckpointSinkAbi, CommunicatorAbi,
    CommunicatorBox, ComputeAbi, ComputeBox, DataPartitionerAbi, DataPartitionerBox, DatasetAbi, LinkAbi,
    LinkBox, MetricsSinkAbi, ModelAbi, ModelBox, ModelPartitionerAbi, ModelPartitionerBox, OptimizerAbi,
    OptimizerBox, StrategyAbi, StrategyBox, BATCH_ROWS, BATCH_TOKENS, RECV_COPY,
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
