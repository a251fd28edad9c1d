//! Partitioners: which samples each rank trains on, which layers each stage holds.

use std::ops::Range;

use crate::Result;

/// Splits `num_samples` indices among `world` ranks for one epoch.
///
/// Law (checked by the conformance suite): for every epoch, every index in
/// `0..num_samples` goes to exactly one rank, and shard sizes differ by at most one.
pub trait DataPartitioner: Send + Sync {
    fn shard(&self, epoch: u64, num_samples: usize, rank: usize, world: usize) -> Result<Vec<usize>>;
}

/// Cuts a model's layers into pipeline stages.
pub trait ModelPartitioner: Send + Sync {
    /// `layer_costs[i]` is the cost of layer `i` (parameter count, or a measured time).
    /// Returns `stages` contiguous, non-empty, covering ranges of layer indices.
    fn cut(&self, layer_costs: &[u64], stages: usize) -> Result<Vec<Range<usize>>>;
}
