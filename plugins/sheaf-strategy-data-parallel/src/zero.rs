//! ZeRO stage 1: the optimizer state sharded across the replicas.
//!
//! Each gradient bucket (see `buckets`) is cut in `world` chunks ([`chunk_range`]);
//! rank `r` owns chunk `r` of every bucket. After the backward pass the summed
//! gradient is reduce-scattered bucket by bucket, so each rank receives the sum of
//! its chunks only; it clips with the norm summed over all ranks' chunks, steps the
//! optimizer on its chunks (so its optimizer state is 1/world of the model's) and the
//! updated chunks are allgathered into every rank's full parameters. Elementwise
//! optimizers (SGD with momentum, AdamW) step each element as plain data parallelism
//! would, so the parameters are the same up to the order of the gradient sums.

use std::ops::Range;

use half::bf16;
use sheaf_core::{
    chunk_range, Communicator, DType, Deadline, Optimizer, Param, ParamLayout, ReduceOp, Result,
};

use crate::buckets::{narrow, widen};
use crate::GradDType;

/// What this rank owns of each bucket, and the optimizer's pieces of it.
pub struct Shards {
    world: usize,
    rank: usize,
    buckets: Vec<Range<usize>>,
    /// Per owned piece of a parameter: the name the optimizer keys its state by
    /// (`<param>@<first index in the parameter>`), where it sits in the flat buffer,
    /// and where in the shard.
    pieces: Vec<(String, Range<usize>, Range<usize>)>,
    len: usize,
}

impl Shards {
    pub fn new(layout: &ParamLayout, buckets: &[Range<usize>], rank: usize, world: usize) -> Shards {
        let mut pieces = Vec::new();
        let mut len = 0;
        for b in buckets {
            let own = chunk_range(b.len(), world, rank);
            let own = b.start + own.start..b.start + own.end;
            for (p, spec) in layout.specs().iter().enumerate() {
                let r = layout.range(p);
                let (lo, hi) = (r.start.max(own.start), r.end.min(own.end));
                if lo < hi {
                    pieces.push((format!("{}@{}", spec.name, lo - r.start), lo..hi, len..len + hi - lo));
                    len += hi - lo;
                }
            }
        }
        Shards { world, rank, buckets: buckets.to_vec(), pieces, len }
    }

    /// Values this rank owns.
    pub fn len(&self) -> usize {
        self.len
    }

    fn owned(&self, b: &Range<usize>) -> Range<usize> {
        let own = chunk_range(b.len(), self.world, self.rank);
        b.start + own.start..b.start + own.end
    }

    /// Reduce-scatters each bucket of `grads` (the whole model's, this rank's
    /// weighted share) into `shard`, this rank's chunks of the sum in bucket order.
    pub fn reduce_scatter(
        &self,
        comm: &dyn Communicator,
        grads: &[f32],
        shard: &mut [f32],
        wire: GradDType,
        deadline: impl Fn() -> Deadline,
    ) -> Result<()> {
        let mut at = 0;
        for b in &self.buckets {
            let out = &mut shard[at..at + self.owned(b).len()];
            at += out.len();
            match wire {
                GradDType::F32 => comm.reduce_scatter(
                    bytemuck::cast_slice(&grads[b.clone()]),
                    bytemuck::cast_slice_mut(out),
                    DType::F32,
                    ReduceOp::Sum,
                    deadline(),
                )?,
                GradDType::Bf16 => {
                    let mut got = vec![bf16::ZERO; out.len()];
                    comm.reduce_scatter(
                        bytemuck::cast_slice(&narrow(&grads[b.clone()])),
                        bytemuck::cast_slice_mut(&mut got),
                        DType::BF16,
                        ReduceOp::Sum,
                        deadline(),
                    )?;
                    widen(out, &got);
                }
            }
        }
        Ok(())
    }

    /// One optimizer step on this rank's chunks of `params`, with `shard`'s gradients.
    pub fn step(&self, optimizer: &mut dyn Optimizer, params: &mut [f32], shard: &[f32]) -> Result<()> {
        // Pieces lie in increasing flat order within a bucket and buckets run from the
        // end of the buffer down, so sort the views by flat position to split them.
        let mut order: Vec<usize> = (0..self.pieces.len()).collect();
        order.sort_by_key(|&i| self.pieces[i].1.start);
        let mut views: Vec<Option<Param<'_>>> = (0..self.pieces.len()).map(|_| None).collect();
        let mut rest = params;
        let mut base = 0;
        for i in order {
            let (name, flat, at) = &self.pieces[i];
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(flat.start - base);
            let (value, tail) = tail.split_at_mut(flat.len());
            rest = tail;
            base = flat.end;
            views[i] = Some(Param { name, value, grad: &shard[at.clone()] });
        }
        let mut views: Vec<Param<'_>> = views.into_iter().flatten().collect();
        optimizer.step(&mut views)
    }

    /// Every rank's updated chunks into every rank's `params`, bucket by bucket.
    pub fn allgather(
        &self,
        comm: &dyn Communicator,
        params: &mut [f32],
        deadline: impl Fn() -> Deadline,
    ) -> Result<()> {
        for b in &self.buckets {
            // Chunks differ by one value at most: each travels padded to the longest.
            let pad = b.len().div_ceil(self.world);
            let mut mine = vec![0f32; pad];
            let own = self.owned(b);
            mine[..own.len()].copy_from_slice(&params[own]);
            let mut all = vec![0f32; pad * self.world];
            comm.allgather(bytemuck::cast_slice(&mine), bytemuck::cast_slice_mut(&mut all), deadline())?;
            for q in 0..self.world {
                let theirs = chunk_range(b.len(), self.world, q);
                params[b.start + theirs.start..b.start + theirs.end]
                    .copy_from_slice(&all[q * pad..q * pad + theirs.len()]);
            }
        }
        Ok(())
    }
}
