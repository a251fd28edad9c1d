//! Sheaf's vocabulary: the traits and plain data that every other crate speaks.
//!
//! The key design decision is what this crate does *not* contain: no I/O, no async
//! runtime, no candle, no ZeroMQ, no abi_stable. Transports, compute backends and
//! strategies live in plugins; the FFI-safe mirror of these traits lives in `sheaf-abi`.
//! Everything that can block takes a [`Deadline`] and fails with a typed [`CommError`]
//! naming the operation and the peer rank.

mod comm;
mod compute;
mod deadline;
mod dtype;
mod error;
mod optim;
mod pages;
mod params;
mod partition;
mod piece;
mod plugin;
mod prefetch;
mod report;
mod rng;
mod shards;
mod strategy;

pub use comm::{check_link_peer, chunk_range, Communicator, Link, Tag, TagClass, MAX_USER_TAG};
pub use compute::{
    Batch, Block, ComputeBackend, Dataset, Model, ModelInfo, ModelInput, ModelSpec, ParamLayout, ParamShard,
    ParamSpec, PieceLayout, Samples, ShardSource,
};
pub use deadline::Deadline;
pub use dtype::{DType, ReduceOp};
pub use error::{CommError, Error, Op, Result};
pub use optim::{OptimState, Optimizer, Param};
pub use pages::{take_release, zero_release};
pub use params::ModelParams;
pub use partition::{DataPartitioner, ModelPartitioner};
pub use piece::Piece;
pub use plugin::{PluginKind, Provided};
pub use prefetch::{prefetched_steps, with_prefetch, Prefetch};
pub use report::NamedValue;
pub use rng::SplitMix64;
pub use shards::{check_piece_zero_stage, ReplicaStep, Shards};
pub use strategy::{
    backward_segments, clip_factor, clip_to, epoch_order, epochs_done, evaluate_indices, forward_segments,
    global_batches, mean_loss, norm_contribution, optimizer_state_bytes, optimizer_steps,
    save_checkpoint_if_due, sum_of_squares, test_totals, CheckpointSink, EpochOrder, LrSchedule, Mesh,
    MetricsSink, PlanInput, RankPlan, RunTally, StageInput, StepDone, StepMetrics, Strategy, StrategyPlan,
    TrainConfig, TrainContext, TrainSummary,
};
