//! Sheaf's vocabulary: the traits and plain data that every other crate speaks.
//!
//! The key design decision is what this crate does *not* contain: no I/O, no async
//! runtime, no candle, no ZeroMQ, no abi_stable. Transports, compute backends and
//! strategies live in plugins; the FFI-safe mirror of these traits lives in `sheaf-abi`,
//! and the training helpers strategies share (sample order, tallies, gradient norms,
//! segments, meshes, prefetching, ZeRO's shards) in `sheaf-train`.
//! Everything that can block takes a [`Deadline`] and fails with a typed [`CommError`]
//! naming the operation and the peer rank.

mod comm;
mod compute;
mod deadline;
mod dtype;
mod error;
mod hf;
mod optim;
mod partition;
mod piece;
mod plugin;
mod report;
mod rng;
mod strategy;

pub use comm::{check_link_peer, chunk_range, Communicator, Link, Tag, TagClass, MAX_USER_TAG};
pub use compute::{
    Batch, Block, ComputeBackend, Dataset, Model, ModelInfo, ModelInput, ModelSpec, ParamLayout, ParamShard,
    ParamSpec, PieceLayout, Samples, ShardSource,
};
pub use deadline::Deadline;
pub use dtype::{DType, ReduceOp};
pub use error::{CommError, Error, Op, Result};
pub use hf::{HfLayout, HfTensor};
pub use optim::{OptimState, Optimizer, Param, StateViews};
pub use partition::{DataPartitioner, ModelPartitioner};
pub use piece::Piece;
pub use plugin::{PluginKind, Provided, Reach, TransportInfo};
pub use report::NamedValue;
pub use rng::SplitMix64;
pub use strategy::{
    CheckpointSink, LrSchedule, MetricsSink, PlanInput, RankPlan, StepMetrics, Strategy, StrategyPlan,
    TrainConfig, TrainContext, TrainSummary,
};
