//! The FFI-safe mirror of the core traits. Every method returns `RResult` so a
//! panic caught inside the plugin has somewhere to go. Append-only: a new method goes
//! after the last, and bumps the ABI version.

// The `#[sabi_trait]` expansion implements traits inside a generated const block.
#![allow(non_local_definitions)]

use abi_stable::sabi_trait;
use abi_stable::std_types::{RBox, RResult, RSlice, RSliceMut, RStr, RString, RVec};
use abi_stable::StableAbi;

use crate::AbiError;

/// A parameter buffer lent for one optimizer step.
#[repr(C)]
#[derive(StableAbi)]
pub struct AbiParam<'a> {
    pub name: RStr<'a>,
    pub value: RSliceMut<'a, f32>,
    pub grad: RSlice<'a, f32>,
}

/// Optimizer state: step count and named buffers.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct AbiOptimState {
    pub step: u64,
    pub names: RVec<RString>,
    pub buffers: RVec<RVec<f32>>,
}

/// A half-open range of layer indices.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub struct AbiRange {
    pub start: u64,
    pub end: u64,
}

/// A byte buffer and its element type, lent for one collective.
#[repr(C)]
#[derive(StableAbi)]
pub struct AbiBuf<'a> {
    pub bytes: RSliceMut<'a, u8>,
    pub dtype: u8,
}

#[sabi_trait]
pub trait OptimizerAbi: Send {
    fn step(&mut self, params: RSliceMut<'_, AbiParam<'_>>) -> RResult<(), AbiError>;
    fn learning_rate(&self) -> RResult<f64, AbiError>;
    fn set_learning_rate(&mut self, lr: f64) -> RResult<(), AbiError>;
    fn state(&self) -> RResult<AbiOptimState, AbiError>;
    #[sabi(last_prefix_field)]
    fn load_state(&mut self, state: &AbiOptimState) -> RResult<(), AbiError>;
}

#[sabi_trait]
pub trait DataPartitionerAbi: Send + Sync {
    #[sabi(last_prefix_field)]
    fn shard(&self, epoch: u64, num_samples: u64, rank: u64, world: u64) -> RResult<RVec<u64>, AbiError>;
}

#[sabi_trait]
pub trait ModelPartitionerAbi: Send + Sync {
    #[sabi(last_prefix_field)]
    fn cut(&self, layer_costs: RSlice<'_, u64>, stages: u64) -> RResult<RVec<AbiRange>, AbiError>;
}

/// A transport's point-to-point link. Deadlines cross as nanoseconds remaining.
#[sabi_trait]
pub trait LinkAbi: Send + Sync {
    fn rank(&self) -> RResult<u64, AbiError>;
    fn world_size(&self) -> RResult<u64, AbiError>;
    fn send(&self, peer: u64, tag: u64, data: RSlice<'_, u8>, timeout_ns: u64) -> RResult<(), AbiError>;
    fn recv(&self, peer: u64, tag: u64, timeout_ns: u64) -> RResult<RVec<u8>, AbiError>;
    fn abort(&self, culprit: u64, reason: RStr<'_>) -> RResult<(), AbiError>;
    /// `(reporter, blamed)` pairs, as `start`/`end` of an [`AbiRange`].
    fn failure_reports(&self) -> RResult<RVec<AbiRange>, AbiError>;
    fn close(&self, timeout_ns: u64) -> RResult<(), AbiError>;
    #[sabi(last_prefix_field)]
    fn native_allreduce(&self, buf: AbiBuf<'_>, op: u8, timeout_ns: u64) -> RResult<(), AbiError>;
}

pub type OptimizerBox = OptimizerAbi_TO<'static, RBox<()>>;
pub type DataPartitionerBox = DataPartitionerAbi_TO<'static, RBox<()>>;
pub type ModelPartitionerBox = ModelPartitionerAbi_TO<'static, RBox<()>>;
pub type LinkBox = LinkAbi_TO<'static, RBox<()>>;
