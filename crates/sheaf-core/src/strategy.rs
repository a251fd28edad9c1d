//! Training strategies: how a training run is spread over the ranks.

use crate::{
    Block, Communicator, DataPartitioner, Dataset, Error, Model, ModelPartitioner, OptimState, Optimizer,
    ParamShard, Piece, Result,
};

crate::report::report! {
    /// What one optimizer step reports.
    pub struct StepMetrics {
        pub step: u64,
        pub epoch: u64,
        pub loss: f64,
        pub lr: f64,
        pub samples_per_sec: f64,
        /// The gradient's global norm before clipping (NaN: not measured).
        pub grad_norm: f64,
        /// The mean validation loss, on the steps that evaluate (`train.eval_every`).
        pub val_loss: Option<f64>,
    }
}

/// Receives per-step metrics (rank 0's are written to `metrics.jsonl`).
pub trait MetricsSink {
    fn record(&mut self, metrics: &StepMetrics);
}

/// Where a strategy hands its state every `checkpoint_every` steps. Every rank calls
/// [`CheckpointSink::save`] after the same optimizer step with what it holds: its
/// piece's parameters (the whole model's under data parallelism) and its optimizer's
/// state (its shard under ZeRO). The sink may talk to the other ranks (they agree that
/// every rank's part is written), so a strategy calls it on every rank or on none. The
/// optimizer's buffers are named `<param>.<slot>`, or `<param>@<first index>.<slot>`
/// for part of a parameter, after the parameters the strategy hands it, so the host can
/// save and restore them by parameter under any layout. See
/// [`save_checkpoint_if_due`].
pub trait CheckpointSink {
    /// `step` optimizer steps are done; `params` are the rank's piece's, in its layout.
    fn save(&mut self, step: u64, params: &[f32], optimizer: &OptimState) -> Result<()>;

    /// (1.3.) [`CheckpointSink::save`] handed the optimizer's state to keep, so a
    /// sink that writes it later (on a thread) takes it without a copy. The default
    /// lends it to `save`.
    fn save_owned(&mut self, step: u64, params: &[f32], optimizer: OptimState) -> Result<()> {
        self.save(step, params, &optimizer)
    }

    /// (1.4.) [`CheckpointSink::save`] from the optimizer's state lent as it is
    /// ([`crate::Optimizer::state_views`]): a sink that writes later copies it into
    /// buffers it keeps, one that writes now writes it as it is. The default copies it
    /// out and hands it to `save_owned`.
    fn save_views(&mut self, step: u64, params: &[f32], optimizer: &crate::StateViews<'_>) -> Result<()> {
        self.save_owned(step, params, optimizer.copied())
    }

    /// (1.3.) Whether the world stops after optimizer step `step`, preempted: every
    /// rank calls it after each step (after any [`CheckpointSink::save`]), so the
    /// sink may agree with the other ranks (the host allreduces whether a preemption
    /// signal reached any). On `true` the strategy saves at `step` and returns
    /// [`crate::Error::Preempted`]. The default never stops.
    fn preempted(&mut self, step: u64) -> Result<bool> {
        let _ = step;
        Ok(false)
    }
}

/// The learning rate over a run: linear warmup over `warmup_steps`, then constant or
/// cosine decay to `min_lr` at the last step (nanoGPT's `get_lr`).
#[derive(Clone, Debug, PartialEq)]
pub struct LrSchedule {
    pub base: f64,
    pub cosine: bool,
    pub warmup_steps: u64,
    pub min_lr: f64,
}

impl LrSchedule {
    pub fn constant(base: f64) -> LrSchedule {
        LrSchedule { base, cosine: false, warmup_steps: 0, min_lr: base }
    }

    /// The learning rate of optimizer step `step` (from 0) of `total`.
    pub fn at(&self, step: u64, total: u64) -> f64 {
        if step < self.warmup_steps {
            return self.base * (step + 1) as f64 / (self.warmup_steps + 1) as f64;
        }
        if !self.cosine {
            return self.base;
        }
        if step >= total {
            return self.min_lr;
        }
        let ratio = (step - self.warmup_steps) as f64 / (total - self.warmup_steps).max(1) as f64;
        let coeff = 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos());
        self.min_lr + coeff * (self.base - self.min_lr)
    }
}

/// The run-level knobs every strategy honours.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    pub seed: u64,
    pub epochs: u64,
    /// The global batch of one micro-step, summed over data-parallel ranks.
    pub batch_size: usize,
    /// Optimizer steps at most.
    pub max_steps: Option<u64>,
    pub lr: LrSchedule,
    /// Clip the whole model's gradient to this global norm.
    pub grad_clip: Option<f64>,
    /// Micro-steps (global batches) per optimizer step.
    pub grad_accum: usize,
    /// Evaluate on the validation split every this many steps.
    pub eval_every: Option<u64>,
    /// Optimizer steps already done (a resumed run): the host has restored the
    /// parameters and optimizer state they left, and [`global_batches`] and
    /// [`optimizer_steps`] start after them, so the run goes on with the batches,
    /// learning rates and step numbers it would have had uninterrupted.
    pub start_step: u64,
    /// Hand the state to the [`CheckpointSink`] every this many optimizer steps.
    pub checkpoint_every: Option<u64>,
}

impl TrainConfig {
    /// A config with only the basics set: a constant learning rate `lr`, no clipping,
    /// one micro-step per step, no evaluation during training.
    pub fn basic(seed: u64, epochs: u64, batch_size: usize, max_steps: Option<u64>, lr: f64) -> TrainConfig {
        TrainConfig {
            seed,
            epochs,
            batch_size,
            max_steps,
            lr: LrSchedule::constant(lr),
            grad_clip: None,
            grad_accum: 1,
            eval_every: None,
            start_step: 0,
            checkpoint_every: None,
        }
    }

    /// Whether a checkpoint is due after `step` optimizer steps.
    pub fn checkpoint_due(&self, step: u64) -> bool {
        self.checkpoint_every.is_some_and(|every| every > 0 && step > 0 && step.is_multiple_of(every))
    }

    /// Micro-steps (global batches) already taken by a resumed run.
    pub fn start_micro_step(&self) -> u64 {
        self.start_step * self.grad_accum.max(1) as u64
    }

    /// Fails naming the first setting beyond the basics (a learning-rate schedule is
    /// basic), for a strategy that does not implement it.
    pub fn refuse_beyond_basics(&self, strategy: &str) -> Result<()> {
        let unsupported = if self.grad_clip.is_some() {
            Some("train.grad_clip")
        } else if self.grad_accum > 1 {
            Some("train.grad_accum")
        } else if self.eval_every.is_some() {
            Some("train.eval_every")
        } else if self.checkpoint_every.is_some() || self.start_step > 0 {
            Some("train.checkpoint_every")
        } else {
            None
        };
        match unsupported {
            Some(key) => Err(Error::config(key, format!("not supported by the {strategy} strategy yet"))),
            None => Ok(()),
        }
    }

    /// Optimizer steps a run over `n` samples takes.
    pub fn total_steps(&self, n: usize) -> u64 {
        let micro = n.div_ceil(self.batch_size.max(1)) as u64 * self.epochs;
        let steps = micro.div_ceil(self.grad_accum.max(1) as u64);
        self.max_steps.map_or(steps, |m| m.min(steps))
    }
}

/// Everything a strategy trains with, lent by the host for one run.
pub struct TrainContext<'a> {
    pub config: TrainConfig,
    pub comm: &'a dyn Communicator,
    pub model: &'a mut dyn Model,
    pub optimizer: &'a mut dyn Optimizer,
    pub partitioner: &'a dyn DataPartitioner,
    pub train: &'a dyn Dataset,
    /// The test (validation) split.
    pub test: &'a dyn Dataset,
    pub metrics: &'a mut dyn MetricsSink,
    pub checkpoints: &'a mut dyn CheckpointSink,
}

crate::report::report! {
    /// What a run reports at its end.
    pub struct TrainSummary {
        pub epochs: u64,
        pub steps: u64,
        pub final_loss: f64,
        pub test_accuracy: f64,
        /// The mean loss per prediction on the test split.
        pub test_loss: f64,
        pub samples_per_sec: f64,
        pub wall_seconds: f64,
        /// Most bytes of activations this rank kept for backward passes at once (0: not
        /// measured by the strategy).
        pub peak_activation_bytes: u64,
        /// Seconds this rank computed, and waited on other ranks, during training steps
        /// (pipeline stages measure them; 0 when not measured).
        pub busy_seconds: f64,
        pub idle_seconds: f64,
        /// Bytes of optimizer state this rank holds at the end (its shard under ZeRO).
        pub optimizer_state_bytes_per_rank: u64,
        /// Bytes of the gradient buffers the strategy holds on this rank: the model's
        /// gradients, any full-size sum of them, and this rank's shard under ZeRO
        /// (absent: not measured by the strategy).
        pub gradient_bytes_per_rank: Option<f64>,
    }
}

/// What a strategy lays a job out from.
pub struct PlanInput<'a> {
    pub world: usize,
    /// The model's blocks, in order.
    pub blocks: &'a [Block],
    /// What each block weighs when blocks are cut into stages: its parameter count, or
    /// its measured time (`parallel.balance = "time"`).
    pub costs: &'a [u64],
    /// The global batch of one micro-step.
    pub batch_size: usize,
    /// The job's model partitioner (`parallel.partitioner`), for cutting blocks.
    pub partitioner: &'a dyn ModelPartitioner,
}

/// One rank's part in a plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankPlan {
    pub piece: Piece,
    /// Samples whose activations the rank keeps at once, at most (for the memory
    /// budget: a pipeline stage keeps its schedule's micro-batches in flight).
    pub activation_samples: u64,
    /// Ranks this rank's optimizer state is sharded over (ZeRO stage 1: the
    /// data-parallel replicas each keep `1 / state_shards` of it); 1 when the rank
    /// keeps all of its piece's. For the memory budget.
    pub state_shards: u64,
    /// The row shard of every parameter the rank holds under ZeRO stage 3 (built with
    /// [`crate::ComputeBackend::build_shard`]); `None`: its piece's parameters whole.
    pub param_shard: Option<ParamShard>,
}

/// How a strategy lays a job out over the world: every rank's piece. The host checks
/// it (one entry per rank, every block placed whole or in every slice of its
/// tensor-parallel group) and the memory budget, builds each rank's piece, and
/// gathers the checkpoint from the pieces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StrategyPlan {
    pub ranks: Vec<RankPlan>,
    /// Whether ranks train through the stage interface (`build_piece`) rather than
    /// `forward_backward` on a whole model.
    pub stage_interface: bool,
}

impl StrategyPlan {
    /// Every rank holds the whole model and takes `share` of each global batch:
    /// data parallelism's layout.
    pub fn replicas(world: usize, blocks: usize, batch_size: usize) -> StrategyPlan {
        let share = batch_size.div_ceil(world.max(1)) as u64;
        StrategyPlan {
            ranks: (0..world)
                .map(|_| RankPlan {
                    piece: Piece::whole(blocks),
                    activation_samples: share,
                    state_shards: 1,
                    param_shard: None,
                })
                .collect(),
            stage_interface: false,
        }
    }

    /// The same plan with every rank's parameters sharded by rows over its group of
    /// `count` ranks: rank `r` holds shard `r % count` (ZeRO stage 3 over consecutive
    /// ranks). Its optimizer state is its shard's, whole (`state_shards` 1).
    pub fn with_param_shards(mut self, count: usize) -> StrategyPlan {
        let count = count.max(1);
        for (r, rank) in self.ranks.iter_mut().enumerate() {
            rank.param_shard = Some(ParamShard { index: r % count, count });
            rank.state_shards = 1;
        }
        self
    }

    /// The same plan with every rank's optimizer state sharded over `shards` ranks.
    pub fn with_state_shards(mut self, shards: u64) -> StrategyPlan {
        self.ranks.iter_mut().for_each(|r| r.state_shards = shards.max(1));
        self
    }
}

/// Data-parallel, pipeline, tensor-parallel, ...
pub trait Strategy: Send {
    fn name(&self) -> &str;
    /// Each rank's piece of the model, from the world, the model's blocks and the
    /// strategy's own settings. The default: data parallelism's whole model per rank.
    fn plan(&self, input: &PlanInput<'_>) -> Result<StrategyPlan> {
        Ok(StrategyPlan::replicas(input.world, input.blocks.len(), input.batch_size))
    }
    fn train(&mut self, ctx: TrainContext<'_>) -> Result<TrainSummary>;

    /// (1.2.) Bytes of gradient buffers each rank holds at its peak, one per rank of
    /// the plan for `input`, where the strategy knows them better than the host's
    /// reckoning (a full-size sum of the piece's gradients, a second with
    /// accumulation, and its shard under ZeRO stages 1 and 2): ZeRO stage 2 holding a
    /// bucket and a backward step rather than a full-size sum. `None` (the default):
    /// the host's.
    fn planned_gradient_bytes(&self, input: &PlanInput<'_>) -> Result<Option<Vec<u64>>> {
        let _ = input;
        Ok(None)
    }

    /// (1.2.) Bytes of parameters each rank holds at its peak, one per rank of the
    /// plan for `input`, where the strategy knows them better than the host's
    /// reckoning (its piece's, or under ZeRO 3 its rows and one unit gathered): ZeRO 3
    /// keeping gathered units through a step. `None` (the default): the host's.
    fn planned_parameter_bytes(&self, input: &PlanInput<'_>) -> Result<Option<Vec<u64>>> {
        let _ = input;
        Ok(None)
    }
}
