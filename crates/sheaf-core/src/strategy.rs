//! Training strategies: how a training run is spread over the ranks.

use crate::{Batch, Communicator, DataPartitioner, Model, Optimizer, Result, SplitMix64};

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
