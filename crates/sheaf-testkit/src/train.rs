//! What a strategy's in-process tests train with besides the model: momentum SGD, a
//! partitioner of contiguous blocks, and sinks that keep what they are handed.

use sheaf_core::{
    CheckpointSink, DataPartitioner, MetricsSink, OptimState, Optimizer, Param, Result, StepMetrics,
};

/// Momentum SGD (momentum 0.9), its buffer over the parameters in order.
pub struct Momentum {
    pub lr: f64,
    pub buf: Vec<f32>,
}

impl Momentum {
    pub fn new(lr: f64) -> Momentum {
        Momentum { lr, buf: Vec::new() }
    }
}

impl Optimizer for Momentum {
    fn step(&mut self, params: &mut [Param<'_>]) -> Result<()> {
        let total: usize = params.iter().map(|p| p.value.len()).sum();
        self.buf.resize(total, 0.0);
        let mut off = 0;
        for p in params.iter_mut() {
            for ((w, g), b) in p.value.iter_mut().zip(p.grad).zip(&mut self.buf[off..]) {
                *b = 0.9 * *b + g;
                *w -= self.lr as f32 * *b;
            }
            off += p.value.len();
        }
        Ok(())
    }
    fn learning_rate(&self) -> f64 {
        self.lr
    }
    fn set_learning_rate(&mut self, lr: f64) {
        self.lr = lr;
    }
    fn state(&self) -> Result<OptimState> {
        Ok(OptimState { step: 0, buffers: vec![("momentum".into(), self.buf.clone())] })
    }
    fn load_state(&mut self, state: &OptimState) -> Result<()> {
        self.buf = state.get("momentum").unwrap_or_default().to_vec();
        Ok(())
    }
}

/// Balanced contiguous blocks of every batch.
pub struct Blocks;

impl DataPartitioner for Blocks {
    fn shard(&self, _: u64, n: usize, rank: usize, world: usize) -> Result<Vec<usize>> {
        Ok(sheaf_core::chunk_range(n, world, rank).collect())
    }
}

/// Every step's metrics handed over.
#[derive(Default)]
pub struct Collect(pub Vec<StepMetrics>);

impl MetricsSink for Collect {
    fn record(&mut self, m: &StepMetrics) {
        self.0.push(m.clone());
    }
}

/// Every checkpoint handed over: step, parameters, optimizer state.
#[derive(Default)]
pub struct Saved(pub Vec<(u64, Vec<f32>, OptimState)>);

impl CheckpointSink for Saved {
    fn save(&mut self, step: u64, params: &[f32], optimizer: &OptimState) -> Result<()> {
        self.0.push((step, params.to_vec(), optimizer.clone()));
        Ok(())
    }
}
