//! Micro-batches: how a pipeline's share of a step is cut, and what each stage takes
//! of each.

use sheaf_core::{chunk_range, Result, Samples};

/// Micro-batch `m`: how many samples, the samples themselves (first stage) and what
/// its predictions are scored against (last stage).
pub(crate) struct Micro {
    pub(crate) rows: usize,
    pub(crate) samples: Option<Samples>,
    pub(crate) targets: Vec<u32>,
}

/// The samples an evaluation pass takes at once: a training micro-batch's (a
/// pipeline's share of the global batch `batch` over `pipelines`, cut into
/// `micro_batches`), so an evaluation, whose forward pass keeps what a backward pass
/// would read until it ends, holds no more activations than one micro-batch in flight
/// (in whole global batches it held 8 times those of the reference GPT's training, up
/// to a third of a rank's peak).
pub(crate) fn eval_rows(batch: usize, pipelines: usize, micro_batches: usize) -> usize {
    let share = batch.div_ceil(pipelines.max(1)).max(1);
    share.div_ceil(micro_batches.min(share).max(1))
}

/// Where `n` samples are cut into at most `m` micro-batches of nearly equal size (one,
/// empty, when there are none).
pub(crate) fn micro_ranges(n: usize, m: usize) -> Vec<std::ops::Range<usize>> {
    micro_cut(n, m.min(n))
}

/// Where `n` samples are cut into exactly `count` micro-batches (at least one) of
/// nearly equal size, some empty where `n < count`: what a pipeline runs when every
/// pipeline must run as many (under ZeRO 3 a stage's replicas gather each unit
/// together, once a micro-batch).
pub(crate) fn micro_cut(n: usize, count: usize) -> Vec<std::ops::Range<usize>> {
    let count = count.max(1);
    (0..count).map(|k| chunk_range(n, count, k)).collect()
}

impl Micro {
    /// A micro-batch of `rows` samples with what the stage needs of `samples`: the
    /// inputs on the first stage, the labels on the last, nothing in between (where
    /// `samples` is `None`: a middle stage gathers none).
    pub(crate) fn new(rows: usize, samples: Option<Samples>, first: bool, last: bool) -> Micro {
        Micro {
            rows,
            targets: match &samples {
                Some(s) if last => s.targets(),
                _ => Vec::new(),
            },
            samples: samples.filter(|_| first),
        }
    }
}

/// `share` (sample indices) cut into at most `m` micro-batches of nearly equal size,
/// with the inputs and labels each stage needs, gathered here.
pub(crate) fn micro_batches(
    data: &dyn sheaf_core::Dataset,
    share: &[usize],
    m: usize,
    first: bool,
    last: bool,
) -> Result<Vec<Micro>> {
    micro_ranges(share.len(), m)
        .into_iter()
        .map(|r| {
            let samples = (first || last).then(|| data.gather(&share[r.clone()])).transpose()?;
            Ok(Micro::new(r.len(), samples, first, last))
        })
        .collect()
}
