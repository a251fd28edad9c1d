//! Adapters between the two layers. [`to_abi`] wraps core trait objects (owned, or
//! borrowed for one call) as ABI objects, running every call inside `catch_unwind`;
//! [`from_abi`] wraps ABI objects back into core traits. Plugins export through
//! `to_abi` and the host lends its communicator, model, optimizer, partitioner and
//! metrics sink to strategy plugins through it too, so a panic on either side of the
//! boundary becomes an error.
//!
//! One module per trait holds both directions: the `impl XAbi for Exported<P>` that
//! exports a core object and the `LoadedX` that wraps an ABI object back into the core
//! trait. [`to_abi`] and [`from_abi`] gather the entry points.

mod communicator;
mod compute;
mod convert;
mod dataset;
mod link;
mod metrics;
mod model;
mod optimizer;
mod partitioner;
mod strategy;

/// Everything the adapter modules use, in one place (glob-imported by each).
mod prelude {
    pub(crate) use std::ops::{Deref, DerefMut, Range};
    pub(crate) use std::panic::{catch_unwind, AssertUnwindSafe};
    pub(crate) use std::time::Duration;

    pub(crate) use abi_stable::pointer_trait::{AsMutPtr, AsPtr, GetPointerKind};
    pub(crate) use abi_stable::sabi_trait::TD_Opaque;
    pub(crate) use abi_stable::std_types::{ROption, RResult, RSlice, RSliceMut, RStr, RString, RVec};
    pub(crate) use sheaf_core::{
        Batch, Block, CheckpointSink, CommError, Communicator, ComputeBackend, DType, DataPartitioner,
        Dataset, Deadline, Error, HfLayout, HfTensor, Link, LrSchedule, MetricsSink, Model, ModelInfo,
        ModelInput, ModelPartitioner, ModelSpec, OptimState, Optimizer, Param, ParamLayout, ParamShard,
        ParamSpec, Piece, PieceLayout, PlanInput, RankPlan, ReduceOp, Result, Samples, ShardSource,
        StateViews, StepMetrics, Strategy, StrategyPlan, Tag, TrainConfig, TrainContext, TrainSummary,
    };

    pub(crate) use super::{
        communicator::*, convert::*, dataset::*, metrics::*, model::*, optimizer::*, partitioner::*, *,
    };
    pub(crate) use crate::traits::*;
    pub(crate) use crate::{AbiError, AbiOptimState, AbiParam, AbiRange, AbiStateViews};
}

use prelude::*;

/// Runs `f`, turning a panic into an [`AbiError`] naming `plugin` and `what`.
pub(crate) fn guard<T>(
    plugin: &str,
    what: &str,
    f: impl FnOnce() -> Result<T, AbiError>,
) -> RResult<T, AbiError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r.into(),
        Err(payload) => RResult::RErr(AbiError::panic(plugin, what, payload.as_ref())),
    }
}

pub(crate) fn deadline(timeout_ns: u64) -> Deadline {
    Deadline::after(Duration::from_nanos(timeout_ns))
}

pub(crate) fn timeout_ns(d: Deadline) -> u64 {
    d.remaining().as_nanos().min(u128::from(u64::MAX)) as u64
}

pub(crate) fn usize_of(v: u64, what: &str) -> Result<usize> {
    usize::try_from(v).map_err(|_| Error::invalid(format!("{what} {v} too large")))
}

pub(crate) fn nan_none(v: f64) -> Option<f64> {
    (!v.is_nan()).then_some(v)
}

/// A core object (behind any pointer: a `Box`, a `&`, a `&mut`) exported by
/// `plugin`. Every ABI method it implements catches panics.
pub struct Exported<P> {
    pub(crate) plugin: &'static str,
    pub(crate) inner: P,
}

impl<P> Exported<P> {
    pub fn new(plugin: &'static str, inner: P) -> Exported<P> {
        Exported { plugin, inner }
    }
}

pub(crate) fn usize_arg(v: u64, what: &str) -> Result<usize, AbiError> {
    usize::try_from(v).map_err(|_| sheaf_core::Error::invalid(format!("{what} {v} too large")).into())
}

pub(crate) fn dtype_op(dtype: u8, op: u8, which: sheaf_core::Op) -> Result<(DType, ReduceOp), AbiError> {
    let bad = |what: &str, code: u8| {
        AbiError::from(sheaf_core::CommError::InvalidArgument {
            op: which,
            detail: format!("unknown {what} code {code}"),
        })
    };
    Ok((
        DType::from_code(dtype).ok_or_else(|| bad("dtype", dtype))?,
        ReduceOp::from_code(op).ok_or_else(|| bad("reduce op", op))?,
    ))
}

pub(crate) fn comm_err(e: AbiError) -> CommError {
    e.into_comm()
}

/// The ABI crate logs nothing (no `tracing` dependency); a failure of a call whose
/// core signature has no error (a metrics sink, `drop_saved`, `saved_bytes`) is
/// reported on stderr, never dropped.
pub(crate) fn tracing_free_warn(what: &str, e: &Error) {
    eprintln!("warning: {what} failed: {e}");
}

/// Core objects into ABI objects.
pub mod to_abi {
    pub use super::communicator::export_communicator as communicator;
    pub use super::compute::export_compute as compute;
    pub use super::link::export_link as link;
    pub use super::model::export_model as model;
    pub use super::optimizer::export_optimizer as optimizer;
    pub use super::partitioner::{
        export_data_partitioner as data_partitioner, export_model_partitioner as model_partitioner,
    };
    pub use super::strategy::{export_strategy as strategy, with_plan_input, with_train_context};
    pub use super::Exported;
}

/// ABI objects into core trait objects.
pub mod from_abi {
    pub use super::communicator::load_communicator as communicator;
    pub use super::compute::load_compute as compute;
    pub use super::link::load_link as link;
    pub use super::model::load_model as model;
    pub use super::optimizer::load_optimizer as optimizer;
    pub use super::partitioner::{
        load_data_partitioner as data_partitioner, load_model_partitioner as model_partitioner,
    };
    pub use super::strategy::{load_strategy as strategy, plan_input, train_context};
}
