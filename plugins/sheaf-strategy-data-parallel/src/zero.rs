//! ZeRO stages 1 and 2: the optimizer state, and with stage 2 the reduced gradients,
//! sharded across the replicas.
//!
//! Each gradient bucket (see `buckets`) is cut in `world` chunks ([`chunk_range`]);
//! rank `r` owns chunk `r` of every bucket. Stage 1 sums a step's gradients over its
//! micro-batches in a full-size buffer and reduce-scatters it bucket by bucket after
//! the backward pass ([`Shards::reduce_scatter`]). Stage 2 holds no full-size reduced
//! gradient: each micro-batch's buckets are reduce-scattered on the communication
//! thread as the backward pass finishes them and summed into this rank's chunks
//! ([`Shards::scatter_add`], driven by `Exchange::scatter`). Either way each rank ends
//! with the sum of its chunks only; it clips with the norm summed over all ranks'
//! chunks, steps the optimizer on its chunks (so its optimizer state is 1/world of the
//! model's) and the updated chunks are allgathered into every rank's full parameters.
//! Elementwise optimizers (SGD with momentum, AdamW) step each element as plain data
//! parallelism would, so the parameters are the same up to the order of the gradient
//! sums.

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

    /// This rank's chunk of each bucket within `shard`, in bucket order.
    pub fn split_shard<'s>(&self, mut shard: &'s mut [f32]) -> Vec<&'s mut [f32]> {
        self.buckets
            .iter()
            .map(|b| {
                let (mine, rest) = std::mem::take(&mut shard).split_at_mut(self.owned(b).len());
                shard = rest;
                mine
            })
            .collect()
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
        for (b, out) in self.buckets.iter().zip(self.split_shard(shard)) {
            reduce_scatter_bucket(comm, &grads[b.clone()], out, wire, deadline())?;
        }
        Ok(())
    }

    /// Stage 2's step for one finished bucket: scales `bucket` (this rank's gradient
    /// values of it, overwritten) by `share`, reduce-scatters it and adds the sum of
    /// this rank's chunk into `out`. `scratch` is reused from bucket to bucket.
    pub fn scatter_add(
        comm: &dyn Communicator,
        bucket: &mut [f32],
        share: f32,
        out: &mut [f32],
        wire: GradDType,
        deadline: Deadline,
        scratch: &mut Vec<f32>,
    ) -> Result<()> {
        for v in bucket.iter_mut() {
            *v *= share;
        }
        scratch.clear();
        scratch.resize(out.len(), 0.0);
        reduce_scatter_bucket(comm, bucket, scratch, wire, deadline)?;
        for (o, s) in out.iter_mut().zip(scratch.iter()) {
            *o += s;
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

/// One bucket's reduce-scatter: `out` gets this rank's chunk of the sum of every rank's
/// `input`, over an f32 or a bfloat16 wire.
fn reduce_scatter_bucket(
    comm: &dyn Communicator,
    input: &[f32],
    out: &mut [f32],
    wire: GradDType,
    deadline: Deadline,
) -> Result<()> {
    match wire {
        GradDType::F32 => {
            comm.reduce_scatter(
                bytemuck::cast_slice(input),
                bytemuck::cast_slice_mut(out),
                DType::F32,
                ReduceOp::Sum,
                deadline,
            )?;
            Ok(())
        }
        GradDType::Bf16 => {
            let mut got = vec![bf16::ZERO; out.len()];
            comm.reduce_scatter(
                bytemuck::cast_slice(&narrow(input)),
                bytemuck::cast_slice_mut(&mut got),
                DType::BF16,
                ReduceOp::Sum,
                deadline,
            )?;
            widen(out, &got);
            Ok(())
        }
    }
}
