//! Training strategies: how a training run is spread over the ranks.

use crate::{
    Batch, Communicator, DType, DataPartitioner, Deadline, Error, Model, Optimizer, ReduceOp, Result,
    SplitMix64,
};

/// The sample order of one epoch: a permutation of `0..n` from `(seed, epoch)`, the
/// same for every strategy, rank and world size, so that every strategy trains on the
/// global batches one process would.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    SplitMix64::new(seed ^ epoch.wrapping_mul(0xD6E8_FEB8_6659_FD93) ^ 0xA5A5_5A5A).permutation(n)
}

/// What one optimizer step reports.
#[derive(Clone, Debug, PartialEq)]
pub struct StepMetrics {
    pub step: u64,
    pub epoch: u64,
    pub loss: f64,
    pub lr: f64,
    pub samples_per_sec: f64,
}

/// Receives per-step metrics (rank 0's are written to `metrics.jsonl`).
pub trait MetricsSink {
    fn record(&mut self, metrics: &StepMetrics);
}

/// The run-level knobs every strategy honours.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    pub seed: u64,
    pub epochs: u64,
    /// The global batch, summed over data-parallel ranks.
    pub batch_size: usize,
    pub max_steps: Option<u64>,
}

/// Everything a strategy trains with, lent by the host for one run.
pub struct TrainContext<'a> {
    pub config: TrainConfig,
    pub comm: &'a dyn Communicator,
    pub model: &'a mut dyn Model,
    pub optimizer: &'a mut dyn Optimizer,
    pub partitioner: &'a dyn DataPartitioner,
    pub train: Batch<'a>,
    pub test: Batch<'a>,
    pub metrics: &'a mut dyn MetricsSink,
}

/// What a run reports at its end.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainSummary {
    pub epochs: u64,
    pub steps: u64,
    pub final_loss: f64,
    pub test_accuracy: f64,
    pub samples_per_sec: f64,
    pub wall_seconds: f64,
    /// Most bytes of activations this rank kept for backward passes at once (0: not
    /// measured by the strategy).
    pub peak_activation_bytes: u64,
    /// Seconds this rank computed, and waited on other ranks, during training steps
    /// (pipeline stages measure them; 0 when not measured).
    pub busy_seconds: f64,
    pub idle_seconds: f64,
}

/// Data-parallel, pipeline, tensor-parallel, ...
pub trait Strategy: Send {
    fn name(&self) -> &str;
    fn train(&mut self, ctx: TrainContext<'_>) -> Result<TrainSummary>;
}

/// Every step's global batch, in order: `(epoch, sample indices)` from
/// [`epoch_order`], cut into `batch_size` batches, stopping after `max_steps`.
pub fn global_batches(n: usize, config: &TrainConfig) -> impl Iterator<Item = (u64, Vec<usize>)> {
    let (seed, batch) = (config.seed, config.batch_size.max(1));
    let limit = config.max_steps.map_or(usize::MAX, |m| usize::try_from(m).unwrap_or(usize::MAX));
    (0..config.epochs)
        .flat_map(move |e| epoch_order(n, seed, e).chunks(batch).map(|c| (e, c.to_vec())).collect::<Vec<_>>())
        .take(limit)
}

/// Whole epochs in `steps` steps over `n` samples.
pub fn epochs_done(steps: u64, n: usize, config: &TrainConfig) -> u64 {
    let per_epoch = n.div_ceil(config.batch_size.max(1)).max(1) as u64;
    (steps / per_epoch).min(config.epochs)
}

/// Test accuracy from every rank's `[loss sum, correct, samples]`, summed over `comm`.
pub fn test_accuracy(comm: &dyn Communicator, mut totals: [f64; 3], dl: Deadline) -> Result<f64> {
    comm.allreduce(bytemuck::cast_slice_mut(&mut totals), DType::F64, ReduceOp::Sum, dl)?;
    Ok(if totals[2] > 0.0 { totals[1] / totals[2] } else { f64::NAN })
}

/// A world of `replicas x width` ranks seen by a model-parallel strategy: rank
/// `d * width + m` is model rank `m` (a stage or a tensor slice) of replica `d`.
pub struct Mesh {
    pub replica: usize,
    pub model_rank: usize,
    /// The ranks of this replica, ordered by model rank.
    pub model: Box<dyn Communicator>,
    /// The ranks holding the same piece, one per replica, ordered by replica.
    pub replicas: Box<dyn Communicator>,
}

impl Mesh {
    /// Splits `comm`; `what` names the layout in the error when the sizes do not fit.
    pub fn split(
        comm: &dyn Communicator,
        replicas: usize,
        width: usize,
        what: &str,
        dl: Deadline,
    ) -> Result<Mesh> {
        let world = comm.world_size();
        if replicas * width != world {
            return Err(Error::config(
                "parallel",
                format!("{replicas} replicas of {width} {what} need {} ranks, not {world}", replicas * width),
            ));
        }
        let (replica, model_rank) = (comm.rank() / width, comm.rank() % width);
        let model = comm
            .split(Some(replica as u32), model_rank as u32, dl)?
            .ok_or_else(|| Error::BadState("no model-parallel group".into()))?;
        let peers = comm
            .split(Some(model_rank as u32), replica as u32, dl)?
            .ok_or_else(|| Error::BadState("no data-parallel group".into()))?;
        Ok(Mesh { replica, model_rank, model, replicas: peers })
    }

    /// Makes every replica start from replica 0's parameters; returns them.
    pub fn sync_replicas(&self, model: &mut dyn Model, dl: Deadline) -> Result<Vec<f32>> {
        let mut params = vec![0f32; model.layout().total()];
        model.read_params(&mut params)?;
        self.replicas.broadcast(bytemuck::cast_slice_mut(&mut params), 0, dl)?;
        model.write_params(&params)?;
        Ok(params)
    }

    /// Sums `grads` over the replicas (each already scaled by its share).
    pub fn sum_over_replicas(&self, grads: &mut [f32], dl: Deadline) -> Result<()> {
        if self.replicas.world_size() > 1 {
            self.replicas.allreduce(bytemuck::cast_slice_mut(grads), DType::F32, ReduceOp::Sum, dl)?;
        }
        Ok(())
    }
}
