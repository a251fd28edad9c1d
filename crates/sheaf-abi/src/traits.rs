//! The FFI-safe mirror of the core traits. Every method returns `RResult` so a
//! panic caught inside the plugin has somewhere to go. Append-only: a new method goes
//! after the last, and bumps the ABI version.

// The `#[sabi_trait]` expansion implements traits inside a generated const block.
#![allow(non_local_definitions)]

use abi_stable::sabi_trait;
use abi_stable::std_types::{RBox, ROption, RResult, RSlice, RSliceMut, RStr, RString, RVec};
use abi_stable::StableAbi;
use abi_stable::{RMut, RRef};

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

/// (1.4.) An optimizer's state lent across the boundary: its step count and its
/// buffers as they are, valid for the call that lends them.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct AbiStateViews<'a> {
    pub step: u64,
    pub names: RVec<RString>,
    pub buffers: RVec<RSlice<'a, f32>>,
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
    fn load_state(&mut self, state: &AbiOptimState) -> RResult<(), AbiError>;
    fn take_state(&mut self) -> RResult<AbiOptimState, AbiError>;
    #[sabi(last_prefix_field)]
    fn state_bytes(&self) -> RResult<u64, AbiError>;
    /// (1.1.) A 1.0 plugin's vtable lacks it: calls get this default, `RNone`.
    fn state_values_per_param(&self) -> RResult<ROption<u32>, AbiError> {
        RResult::ROk(ROption::RNone)
    }
    /// (1.4.) [`sheaf_core::Optimizer::state_views`]; a plugin built before 1.4 gets
    /// this default, `RNone` (not lent: the state is copied).
    fn state_views(&self) -> RResult<ROption<AbiStateViews<'_>>, AbiError> {
        RResult::ROk(ROption::RNone)
    }
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
    fn native_allreduce(&self, buf: AbiBuf<'_>, op: u8, timeout_ns: u64) -> RResult<(), AbiError>;
    /// `op` is [`RECV_COPY`] to copy, else a reduce-op code.
    #[sabi(last_prefix_field)]
    fn recv_into(
        &self,
        peer: u64,
        tag: u64,
        dst: AbiBuf<'_>,
        op: u8,
        timeout_ns: u64,
    ) -> RResult<(), AbiError>;
}

/// The `op` of [`LinkAbi::recv_into`] that asks for a plain copy.
pub const RECV_COPY: u8 = u8::MAX;

pub type OptimizerBox = OptimizerAbi_TO<'static, RBox<()>>;
pub type DataPartitionerBox = DataPartitionerAbi_TO<'static, RBox<()>>;
pub type ModelPartitionerBox = ModelPartitionerAbi_TO<'static, RBox<()>>;
pub type LinkBox = LinkAbi_TO<'static, RBox<()>>;

/// One named parameter's shape.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct AbiParamSpec {
    pub name: RString,
    pub shape: RVec<u64>,
}

/// `AbiBatch::kind` and `AbiSamples::kind`: feature rows with labels.
pub const BATCH_ROWS: u8 = 0;
/// `AbiBatch::kind` and `AbiSamples::kind`: token windows (in `labels`).
pub const BATCH_TOKENS: u8 = 1;

/// A batch lent for one call: rows (`inputs` `[labels.len(), width]`) or token
/// windows (`labels` `[n, width]`), by `kind`.
#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct AbiBatch<'a> {
    pub kind: u8,
    pub inputs: RSlice<'a, f32>,
    pub labels: RSlice<'a, u32>,
    pub width: u64,
}

/// Samples gathered from a dataset, owned; laid out as [`AbiBatch`].
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct AbiSamples {
    pub kind: u8,
    pub inputs: RVec<f32>,
    pub labels: RVec<u32>,
    pub width: u64,
}

/// A dataset split, lent to a strategy for one `train` call.
#[sabi_trait]
pub trait DatasetAbi: Send + Sync {
    fn len(&self) -> RResult<u64, AbiError>;
    #[sabi(last_prefix_field)]
    fn gather(&self, indices: RSlice<'_, u64>) -> RResult<AbiSamples, AbiError>;
}

/// What `evaluate` returns.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq)]
pub struct AbiEval {
    pub loss_sum: f64,
    pub correct: u64,
}

/// A model spec: its kind, the kind's settings as JSON, and the dataset's vocabulary
/// size (`u64::MAX`: none).
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct AbiModelSpec {
    pub kind: RString,
    pub config: RString,
    pub vocab_size: u64,
}

/// (1.5.) [`sheaf_core::HfLayout`].
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct AbiHfLayout {
    pub config: RString,
    pub tensors: RVec<AbiHfTensor>,
}

/// (1.5.) [`sheaf_core::HfTensor`].
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct AbiHfTensor {
    pub name: RString,
    pub aliases: RVec<RString>,
    pub transposed: bool,
}

/// One block a pipeline may cut between.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct AbiBlock {
    pub name: RString,
    pub params: u64,
}

/// What `describe` reports. `input_kind` is [`BATCH_ROWS`] (`a` features, `b`
/// classes) or [`BATCH_TOKENS`] (`a` vocabulary size, `b` block size).
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct AbiModelInfo {
    pub layout: RVec<AbiParamSpec>,
    pub blocks: RVec<AbiBlock>,
    pub input_kind: u8,
    pub input_a: u64,
    pub input_b: u64,
}

/// Where one parameter of a piece comes from.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct AbiShardSource {
    pub param: u64,
    pub by_columns: bool,
    pub ranges: RVec<AbiRange>,
}

/// What `piece_layout` reports.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct AbiPieceLayout {
    pub layout: RVec<AbiParamSpec>,
    pub sources: RVec<AbiShardSource>,
    pub activation_bytes_per_sample: u64,
}

/// One named number of a report (step metrics, a run's summary): reports cross as lists
/// of these, so a new field changes no ABI type.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct AbiNamedValue {
    pub name: RString,
    pub value: f64,
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct AbiTrainConfig {
    pub seed: u64,
    pub epochs: u64,
    pub batch_size: u64,
    /// `u64::MAX` when unset.
    pub max_steps: u64,
    pub lr: f64,
    pub lr_cosine: bool,
    pub warmup_steps: u64,
    pub min_lr: f64,
    /// NaN when unset.
    pub grad_clip: f64,
    pub grad_accum: u64,
    /// 0 when unset.
    pub eval_every: u64,
    /// Optimizer steps a resumed run has done.
    pub start_step: u64,
    /// 0 when unset.
    pub checkpoint_every: u64,
}

/// A communicator: the host's collectives, lent to strategy plugins.
#[sabi_trait]
pub trait CommunicatorAbi: Send + Sync {
    fn rank(&self) -> RResult<u64, AbiError>;
    fn world_size(&self) -> RResult<u64, AbiError>;
    fn send(&self, peer: u64, tag: u32, data: RSlice<'_, u8>, timeout_ns: u64) -> RResult<(), AbiError>;
    fn recv(&self, peer: u64, tag: u32, timeout_ns: u64) -> RResult<RVec<u8>, AbiError>;
    fn allreduce(&self, buf: AbiBuf<'_>, op: u8, timeout_ns: u64) -> RResult<(), AbiError>;
    fn broadcast(&self, buf: RSliceMut<'_, u8>, root: u64, timeout_ns: u64) -> RResult<(), AbiError>;
    fn allgather(
        &self,
        input: RSlice<'_, u8>,
        output: RSliceMut<'_, u8>,
        timeout_ns: u64,
    ) -> RResult<(), AbiError>;
    fn reduce_scatter(
        &self,
        input: RSlice<'_, u8>,
        output: AbiBuf<'_>,
        op: u8,
        timeout_ns: u64,
    ) -> RResult<(), AbiError>;
    fn barrier(&self, timeout_ns: u64) -> RResult<(), AbiError>;
    fn split(
        &self,
        color: ROption<u32>,
        key: u32,
        timeout_ns: u64,
    ) -> RResult<ROption<CommunicatorBox>, AbiError>;
    fn reduce(&self, buf: AbiBuf<'_>, op: u8, root: u64, timeout_ns: u64) -> RResult<(), AbiError>;
    fn gather(
        &self,
        input: RSlice<'_, u8>,
        output: RSliceMut<'_, u8>,
        root: u64,
        timeout_ns: u64,
    ) -> RResult<(), AbiError>;
    fn scatter(
        &self,
        input: RSlice<'_, u8>,
        output: RSliceMut<'_, u8>,
        root: u64,
        timeout_ns: u64,
    ) -> RResult<(), AbiError>;
    #[sabi(last_prefix_field)]
    fn all_to_all(
        &self,
        input: RSlice<'_, u8>,
        output: RSliceMut<'_, u8>,
        timeout_ns: u64,
    ) -> RResult<(), AbiError>;
    /// (1.4.) [`sheaf_core::Communicator::order_point_to_point`]; a communicator from
    /// a host built before 1.4 gets this default: unchecked.
    fn order_point_to_point(&self) -> RResult<bool, AbiError> {
        RResult::ROk(false)
    }
}

#[sabi_trait]
pub trait ModelAbi: Send {
    fn layout(&self) -> RResult<RVec<AbiParamSpec>, AbiError>;
    fn read_params(&self, out: RSliceMut<'_, f32>) -> RResult<(), AbiError>;
    fn write_params(&mut self, src: RSlice<'_, f32>) -> RResult<(), AbiError>;
    fn forward_backward(&mut self, batch: AbiBatch<'_>, grads: RSliceMut<'_, f32>) -> RResult<f32, AbiError>;
    fn evaluate(&mut self, batch: AbiBatch<'_>) -> RResult<AbiEval, AbiError>;
    // The stage interface.
    fn piece(&self) -> RResult<ROption<AbiPiece>, AbiError>;
    fn segments(&self) -> RResult<u64, AbiError>;
    fn stage_forward(
        &mut self,
        micro: u64,
        segment: u64,
        input: RSlice<'_, f32>,
        rows: u64,
    ) -> RResult<RVec<f32>, AbiError>;
    fn stage_backward(
        &mut self,
        micro: u64,
        segment: u64,
        grad_output: RSlice<'_, f32>,
    ) -> RResult<RVec<f32>, AbiError>;
    fn loss_grad(
        &mut self,
        logits: RSlice<'_, f32>,
        labels: RSlice<'_, u32>,
        scale: f32,
    ) -> RResult<AbiLossGrad, AbiError>;
    fn take_grads(&mut self, out: RSliceMut<'_, f32>) -> RResult<(), AbiError>;
    fn drop_saved(&mut self) -> RResult<(), AbiError>;
    fn saved_bytes(&self) -> RResult<u64, AbiError>;
    fn predict(&mut self, batch: AbiBatch<'_>) -> RResult<RVec<f32>, AbiError>;
    fn stage_forward_batch(
        &mut self,
        micro: u64,
        segment: u64,
        batch: AbiBatch<'_>,
    ) -> RResult<RVec<f32>, AbiError>;
    /// `(index in the piece, index in the whole model)` as `start`/`end`.
    fn tied_params(&self) -> RResult<RVec<AbiRange>, AbiError>;
    /// One flag per parameter: 1 where the tensor-parallel group holds it whole.
    fn replicated_params(&self) -> RResult<RVec<u8>, AbiError>;
    /// The stepped backward pass.
    fn backward_in_steps(&self) -> RResult<bool, AbiError>;
    fn backward_begin(&mut self, batch: AbiBatch<'_>) -> RResult<f32, AbiError>;
    fn backward_next(&mut self, pending: RSliceMut<'_, f32>) -> RResult<u64, AbiError>;
    /// The model's own parameter buffer, lent for an update in place.
    fn params_mut(&mut self) -> RResult<ROption<RSliceMut<'_, f32>>, AbiError>;
    /// Backward steps into a window of the gradient buffer.
    fn backward_window(&self) -> RResult<ROption<u64>, AbiError>;
    fn backward_next_into(&mut self, window: RSliceMut<'_, f32>, end: u64) -> RResult<u64, AbiError>;
    /// Fully sharded units: each unit's parameter indices.
    fn units(&self) -> RResult<RVec<RVec<u64>>, AbiError>;
    fn unit_begin(&mut self, batch: AbiBatch<'_>, train: bool) -> RResult<(), AbiError>;
    fn unit_forward(&mut self, unit: u64, params: RSlice<'_, f32>) -> RResult<ROption<AbiEval>, AbiError>;
    #[sabi(last_prefix_field)]
    fn unit_backward(
        &mut self,
        unit: u64,
        params: RSlice<'_, f32>,
        grads: RSliceMut<'_, f32>,
    ) -> RResult<(), AbiError>;
    /// (1.2.) A piece shard's buffers of the whole piece's parameters and gradients.
    /// A plugin built before 1.2 gets these defaults: `RNone`, no piece shard.
    fn piece_params_mut(&mut self) -> RResult<ROption<RSliceMut<'_, f32>>, AbiError> {
        RResult::ROk(ROption::RNone)
    }
    fn piece_grads_mut(&mut self) -> RResult<ROption<RSliceMut<'_, f32>>, AbiError> {
        RResult::ROk(ROption::RNone)
    }
}

/// A rank's row shard of every parameter (ZeRO stage 3); `count` 0: none.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq)]
pub struct AbiParamShard {
    pub index: u64,
    pub count: u64,
}

/// A model piece: blocks `start..end`, and a place in a tensor-parallel group.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq)]
pub struct AbiPiece {
    pub start: u64,
    pub end: u64,
    pub tensor_rank: u64,
    pub tensor_width: u64,
}

/// What `loss_grad` returns.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct AbiLossGrad {
    pub loss_sum: f64,
    pub correct: u64,
    pub grad: RVec<f32>,
}

#[sabi_trait]
pub trait ComputeAbi: Send + Sync {
    fn device(&self) -> RResult<RString, AbiError>;
    fn build_model(&self, spec: AbiModelSpec, seed: u64) -> RResult<ModelBox, AbiError>;
    fn build_piece(&self, spec: AbiModelSpec, piece: AbiPiece, seed: u64) -> RResult<ModelBox, AbiError>;
    fn model_kinds(&self) -> RResult<RVec<RString>, AbiError>;
    fn describe(&self, spec: AbiModelSpec) -> RResult<AbiModelInfo, AbiError>;
    fn piece_layout(&self, spec: AbiModelSpec, piece: AbiPiece) -> RResult<AbiPieceLayout, AbiError>;
    #[sabi(last_prefix_field)]
    fn build_shard(&self, spec: AbiModelSpec, shard: AbiParamShard, seed: u64)
        -> RResult<ModelBox, AbiError>;
    /// (1.2.) A row shard of a piece. A plugin built before 1.2 gets this default.
    fn build_piece_shard(
        &self,
        spec: AbiModelSpec,
        piece: AbiPiece,
        shard: AbiParamShard,
        seed: u64,
    ) -> RResult<ModelBox, AbiError> {
        let _ = (spec, piece, shard, seed);
        RResult::RErr(AbiError::from(sheaf_core::Error::Unsupported(
            "this compute plugin (built before plugin ABI 1.2) cannot shard the parameters of model \
             pieces (ZeRO stage 3 inside a pipeline stage)"
                .into(),
        )))
    }
    /// (1.5.) [`sheaf_core::ComputeBackend::hf_layout`]. A plugin built before 1.5
    /// gets this default.
    fn hf_layout(&self, spec: AbiModelSpec) -> RResult<AbiHfLayout, AbiError> {
        RResult::RErr(AbiError::from(sheaf_core::Error::Unsupported(format!(
            "this compute plugin (built before plugin ABI 1.5) has no Hugging Face layout for `{}` models",
            spec.kind
        ))))
    }
    /// (1.5.) [`sheaf_core::ComputeBackend::hf_model`]. A plugin built before 1.5
    /// gets this default.
    fn hf_model(&self, config_json: RString) -> RResult<AbiModelSpec, AbiError> {
        let _ = config_json;
        RResult::RErr(AbiError::from(sheaf_core::Error::Unsupported(
            "this compute plugin (built before plugin ABI 1.5) reads no Hugging Face configurations".into(),
        )))
    }
}

#[sabi_trait]
pub trait MetricsSinkAbi {
    #[sabi(last_prefix_field)]
    fn record(&mut self, metrics: RVec<AbiNamedValue>) -> RResult<(), AbiError>;
}

/// Where a strategy hands each rank's state at a checkpoint step.
#[sabi_trait]
pub trait CheckpointSinkAbi {
    #[sabi(last_prefix_field)]
    fn save(&mut self, step: u64, params: RSlice<'_, f32>, optimizer: AbiOptimState)
        -> RResult<(), AbiError>;
    /// (1.3.) Whether the world stops after `step`, preempted; a sink from a host built
    /// before 1.3 gets this default: never.
    fn preempted(&mut self, step: u64) -> RResult<bool, AbiError> {
        let _ = step;
        RResult::ROk(false)
    }
    /// (1.4.) [`sheaf_core::CheckpointSink::save_views`]; a sink from a host built
    /// before 1.4 gets this default, which copies the state and calls `save`.
    fn save_views(
        &mut self,
        step: u64,
        params: RSlice<'_, f32>,
        optimizer: AbiStateViews<'_>,
    ) -> RResult<(), AbiError> {
        let buffers = optimizer.buffers.iter().map(|b| b.to_vec().into()).collect();
        self.save(step, params, AbiOptimState { step: optimizer.step, names: optimizer.names, buffers })
    }
}

/// Everything a strategy trains with, lent by the host for one `train` call.
#[repr(C)]
#[derive(StableAbi)]
pub struct AbiTrainContext<'a> {
    pub config: AbiTrainConfig,
    pub comm: CommunicatorAbi_TO<'a, RRef<'a, ()>>,
    pub model: ModelAbi_TO<'a, RMut<'a, ()>>,
    pub optimizer: OptimizerAbi_TO<'a, RMut<'a, ()>>,
    pub partitioner: DataPartitionerAbi_TO<'a, RRef<'a, ()>>,
    pub train: DatasetAbi_TO<'a, RRef<'a, ()>>,
    pub test: DatasetAbi_TO<'a, RRef<'a, ()>>,
    pub metrics: MetricsSinkAbi_TO<'a, RMut<'a, ()>>,
    pub checkpoints: CheckpointSinkAbi_TO<'a, RMut<'a, ()>>,
}

/// What a strategy lays a job out from, lent for one `plan` call.
#[repr(C)]
#[derive(StableAbi)]
pub struct AbiPlanInput<'a> {
    pub world: u64,
    pub blocks: RSlice<'a, AbiBlock>,
    pub costs: RSlice<'a, u64>,
    pub batch_size: u64,
    pub partitioner: ModelPartitionerAbi_TO<'a, RRef<'a, ()>>,
}

/// A strategy's plan: per rank, its piece, the samples whose activations it keeps and
/// the ranks its optimizer state is sharded over.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct AbiStrategyPlan {
    pub pieces: RVec<AbiPiece>,
    pub activation_samples: RVec<u64>,
    pub state_shards: RVec<u64>,
    pub stage_interface: bool,
    pub param_shards: RVec<AbiParamShard>,
}

#[sabi_trait]
pub trait StrategyAbi: Send {
    fn name(&self) -> RResult<RString, AbiError>;
    fn train(&mut self, ctx: AbiTrainContext<'_>) -> RResult<RVec<AbiNamedValue>, AbiError>;
    #[sabi(last_prefix_field)]
    fn plan(&self, input: AbiPlanInput<'_>) -> RResult<AbiStrategyPlan, AbiError>;
    /// (1.2.) Each rank's gradient bytes at its peak; a plugin built before 1.2 gets
    /// this default, `RNone`: the host's reckoning.
    fn planned_gradient_bytes(&self, input: AbiPlanInput<'_>) -> RResult<ROption<RVec<u64>>, AbiError> {
        let _ = input;
        RResult::ROk(ROption::RNone)
    }
    /// (1.2.) Each rank's parameter bytes at its peak; the default as above.
    fn planned_parameter_bytes(&self, input: AbiPlanInput<'_>) -> RResult<ROption<RVec<u64>>, AbiError> {
        let _ = input;
        RResult::ROk(ROption::RNone)
    }
}

pub type CommunicatorBox = CommunicatorAbi_TO<'static, RBox<()>>;
pub type ModelBox = ModelAbi_TO<'static, RBox<()>>;
pub type ComputeBox = ComputeAbi_TO<'static, RBox<()>>;
pub type StrategyBox = StrategyAbi_TO<'static, RBox<()>>;
