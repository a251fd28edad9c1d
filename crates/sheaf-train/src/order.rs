//! The order samples are trained in: each epoch's permutation, the global batches of
//! every micro-step and optimizer step, and how many epochs a number of steps makes.

use sheaf_core::{SplitMix64, TrainConfig};

/// The sample order of one epoch: a permutation of `0..n` from `(seed, epoch)`, the
/// same for every strategy, rank and world size, so that every strategy trains on the
/// global batches one process would.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let order = EpochOrder::new(n, seed, epoch);
    (0..n).map(|i| order.at(i)).collect()
}

/// [`epoch_order`] without the table: position `i`'s sample computed on demand by a
/// keyed Feistel network over the smallest even power of two at least `n`, walking
/// the cycle until it lands below `n` (fewer than 4 rounds of walking on average). A
/// rank's memory does not grow with the dataset however many samples an epoch has.
#[derive(Clone, Debug)]
pub struct EpochOrder {
    n: usize,
    half_bits: u32,
    keys: [u64; 4],
}

impl EpochOrder {
    pub fn new(n: usize, seed: u64, epoch: u64) -> EpochOrder {
        let mut rng = SplitMix64::new(seed ^ epoch.wrapping_mul(0xD6E8_FEB8_6659_FD93) ^ 0xA5A5_5A5A);
        let bits = (usize::BITS - n.saturating_sub(1).leading_zeros()).max(2);
        let half_bits = bits.div_ceil(2);
        EpochOrder { n, half_bits, keys: [rng.next_u64(), rng.next_u64(), rng.next_u64(), rng.next_u64()] }
    }

    fn feistel(&self, x: u64) -> u64 {
        let mask = (1u64 << self.half_bits) - 1;
        let (mut l, mut r) = (x >> self.half_bits, x & mask);
        for k in self.keys {
            let f = SplitMix64::new(k ^ r).next_u64() & mask;
            (l, r) = (r, l ^ f);
        }
        (l << self.half_bits) | r
    }

    /// The sample at position `i < n` of the epoch.
    pub fn at(&self, i: usize) -> usize {
        let mut x = i as u64;
        loop {
            x = self.feistel(x);
            if (x as usize) < self.n {
                return x as usize;
            }
        }
    }
}

/// Every micro-step's global batch, in order: `(epoch, sample indices)` from
/// [`epoch_order`], cut into `batch_size` batches, stopping after `max_steps`
/// optimizer steps of `grad_accum` micro-steps, and starting after the
/// `start_step` optimizer steps a resumed run has done.
pub fn global_batches(n: usize, config: &TrainConfig) -> impl Iterator<Item = (u64, Vec<usize>)> {
    let (seed, batch) = (config.seed, config.batch_size.max(1));
    let accum = config.grad_accum.max(1);
    let limit = config
        .max_steps
        .map_or(usize::MAX, |m| usize::try_from(m).unwrap_or(usize::MAX).saturating_mul(accum));
    (0..config.epochs)
        .flat_map(move |e| {
            let order = EpochOrder::new(n, seed, e);
            (0..n).step_by(batch).map(move |s| (e, (s..(s + batch).min(n)).map(|i| order.at(i)).collect()))
        })
        .take(limit)
        .skip(usize::try_from(config.start_micro_step()).unwrap_or(usize::MAX))
}

/// Every optimizer step's micro-steps: [`global_batches`] in groups of `grad_accum`.
pub fn optimizer_steps(n: usize, config: &TrainConfig) -> impl Iterator<Item = Vec<(u64, Vec<usize>)>> {
    let accum = config.grad_accum.max(1);
    let mut batches = global_batches(n, config).peekable();
    std::iter::from_fn(move || {
        batches.peek()?;
        Some(batches.by_ref().take(accum).collect())
    })
}

/// Whole epochs in `steps` optimizer steps over `n` samples.
pub fn epochs_done(steps: u64, n: usize, config: &TrainConfig) -> u64 {
    let per_epoch = n.div_ceil(config.batch_size.max(1)).max(1) as u64;
    (steps * config.grad_accum.max(1) as u64 / per_epoch).min(config.epochs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every epoch order is a permutation, seeded by `(seed, epoch)`, for sizes around
    /// powers of two.
    #[test]
    fn epoch_orders_are_seeded_permutations() {
        for n in [0usize, 1, 2, 3, 4, 5, 63, 64, 65, 1000, 4097] {
            let order = epoch_order(n, 7, 1);
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "n = {n}");
            assert_eq!(order, epoch_order(n, 7, 1));
            if n > 8 {
                assert_ne!(order, epoch_order(n, 7, 2));
                assert_ne!(order, epoch_order(n, 8, 1));
                assert_ne!(order, (0..n).collect::<Vec<_>>());
            }
        }
    }
}
